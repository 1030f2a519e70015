"""UFPNet whole-image inference in row blocks: same outputs, memory linear in the image.

`UFPNet.flow_chunk_pixels` runs the per-pixel flow (KE-Net heads, noise, flow) and
`UFPNet.kernel_map_chunk_pixels` the kernel map's convolutions in row blocks; the configs
set both (``benchmarks/ufpnet_step.py --memory-only``: official 720p 15.09 -> 3.66 GiB).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_fixture
from jaxdeblur import configs, convert
from jaxdeblur.nets import ufpnet as U
from jaxdeblur.train import kernel_estimator as ke_lib

TINY = dict(img_channel=3, width=8, enc_blk_nums=(1, 1, 1, 2), middle_blk_num=1,
            dec_blk_nums=(1, 1, 1, 1), kernel_size=19)
# Blocks of a few rows at test sizes: 4 flow rows and 8 kernel-map rows of a 48x64 canvas.
SMALL_BLOCKS = dict(flow_chunk_pixels=256, kernel_map_chunk_pixels=256)


def _gib(compiled) -> float:
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes) / 2**30


def _compiled_gib(model, size) -> float:
    mult = 2 ** len(model.enc_blk_nums)
    variables = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, mult, mult, 3)), key=jax.random.key(1)))
    image = jax.ShapeDtypeStruct((1,) + size + (3,), jnp.float32)
    fn = jax.jit(lambda v, x, key: model.apply(v, x, key=key))
    return _gib(fn.lower(variables, image, jax.random.key(2)).compile())


@functools.lru_cache(maxsize=1)
def _random_tiny():
    """The tiny UFPNet with the shipped flow and every other weight random (non-zero layer
    scales and ending conv, so that the backbone really changes the image; small enough
    that few pixels clip, which would hide differences)."""
    config = configs.load("ufpnet_tiny")
    model = ke_lib.make_model(config)
    variables = ke_lib.init_variables(model, 0, ke_lib.load_flow_variables(config))
    rng = np.random.default_rng(3)
    params = {name: sub if name == "flow" else jax.tree.map(
        lambda x: jnp.asarray(rng.normal(0.0, 0.05, x.shape), jnp.float32), sub)
        for name, sub in variables["params"].items()}
    return model, {"params": params, "batch_stats": variables["batch_stats"]}


def test_block_rows():
    assert U.block_rows(720, 1280, 65536) == 48
    assert U.block_rows(1088, 1920, 65536, multiple=8) == 32
    assert U.block_rows(48, 64, 256) == 4
    assert U.block_rows(48, 64, 256, multiple=8) == 8  # never fewer rows than `multiple`
    assert U.block_rows(32, 10, 10**6) == 32
    with pytest.raises(ValueError, match="multiple of 8"):
        U.block_rows(20, 64, 256, multiple=8)


def test_blocks_match_whole_image_with_padding_and_batch():
    """40x56 (padded to 48x64: padding rows and columns), batch 2, noise from a key: the
    blocked pass (flow 4 rows, kernel map 8 rows) equals the whole-image pass."""
    model, variables = _random_tiny()
    blurry = jnp.asarray(np.random.default_rng(0).random((2, 40, 56, 3), np.float32))
    whole_fn = jax.jit(lambda v, x, k: model.apply(v, x, key=k))
    blocks_fn = jax.jit(lambda v, x, k: model.clone(**SMALL_BLOCKS).apply(v, x, key=k))
    field, restored = whole_fn(variables, blurry, jax.random.key(7))
    field_b, restored_b = blocks_fn(variables, blurry, jax.random.key(7))
    assert field_b.shape == (2, 40, 56, 19, 19) and restored_b.shape == (2, 40, 56, 3)
    assert float(jnp.abs(restored - blurry).max()) > 0.05  # the backbone does something
    np.testing.assert_allclose(np.asarray(field_b), np.asarray(field), atol=5e-6)
    np.testing.assert_allclose(np.asarray(restored_b), np.asarray(restored), atol=1e-5)


def test_noise_is_drawn_row_by_row():
    """Any rows of any image, drawn alone, are those rows of the whole batch's noise (what
    lets blocks, and `estimate_kernels`, draw the same ε for a key)."""
    key = jax.random.key(5)
    whole = U.uncertainty_noise(key, (2, 12, 7, 361))
    rows = U.uncertainty_noise_rows(key, 1, jnp.arange(4, 9), 7, 361)
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(whole[1, 4:9]))
    assert abs(float(whole.mean())) < 0.02 and abs(float(whole.std()) - 1) < 0.02


@pytest.mark.parametrize("case", ["main", "pad"])
def test_blocks_match_official(case):
    """The official tiny UFPNet fixture (32x48, and 12x20 padded to 16x32) in blocks, with
    the fixture's noise: kernels, restored image and the kernel-map intermediates."""
    fx = load_fixture("ufpnet_tiny.npz")
    state_dict = {k[len("param/"):]: v for k, v in fx.items() if k.startswith("param/")}
    variables = convert.ufpnet_variables_from_state_dict(state_dict, config=TINY)
    model = U.UFPNet(**TINY, flow_chunk_pixels=100, kernel_map_chunk_pixels=100)
    prefix, shape = ("in/", (32, 48)) if case == "main" else ("in/pad/", (16, 32))
    x = np.asarray(fx[prefix + "x"]).transpose(0, 2, 3, 1)
    eps = fx[prefix + "eps"].reshape((1,) + shape + (361,))
    (field, restored), state = jax.jit(lambda v, x, e: model.apply(
        v, x, eps=e, mutable=["intermediates"]))(variables, x, eps)
    h, w = x.shape[1:3]
    if case == "main":
        want_k = fx["out/kernel_f64"].reshape(1, h, w, 19, 19)
        want_r = fx["out/restored_f64"]
    else:
        want_k = fx["out/pad/kernel"].reshape((1,) + shape + (19, 19))[:, :h, :w]
        want_r = fx["out/pad/restored_f64"]
    assert np.abs(np.asarray(field) - want_k).max() < 2e-5
    assert np.abs(np.asarray(restored) - want_r.transpose(0, 2, 3, 1)).max() < 1e-5
    if case == "main":
        inter = state["intermediates"]
        code = np.asarray(inter["ke_code"][0]).reshape(1, h * w, 19, 19)
        assert np.abs(code - fx["out/inter/ke_code"]).max() < 5e-8
        for level in range(3):
            got = np.asarray(inter[f"kernel_down{level}"][0])
            want = fx[f"out/inter/kernel_down{level}"].transpose(0, 2, 3, 1)
            assert np.abs(got - want).max() < 2e-5, level


def test_memory_grows_linearly_with_the_image():
    """Tiny config, blocks of 4096 pixels: 192x288 (2.25x the pixels of 128x192) compiles to
    at most 2.5x the memory of 128x192, both under a fixed bound. Measured (XLA:CPU, jax
    0.10.2): 0.113 and 0.169 GiB (ratio 1.50); the whole image at once needs 0.378 and
    0.841 GiB (ratio 2.22)."""
    model = ke_lib.make_model(configs.load("ufpnet_tiny"), train_size=(32, 32)).clone(
        flow_chunk_pixels=4096, kernel_map_chunk_pixels=4096)
    small, large = _compiled_gib(model, (128, 192)), _compiled_gib(model, (192, 288))
    print(f"tiny UFPNet in blocks: 128x192 {small:.3f} GiB, 192x288 {large:.3f} GiB")
    assert large / small <= 2.5
    assert small <= 0.16 and large <= 0.24


@pytest.mark.slow
def test_official_720p_inference_fits_in_4_gib():
    """The official configuration (its own row blocks, TLC from 256²) at 1280x720: measured
    3.66 GiB (XLA:CPU; the whole image at once: 15.09 GiB)."""
    config = configs.load("ufpnet_gopro")
    model = ke_lib.make_model(config, train_size=(256, 256), row_blocks=True)
    gib = _compiled_gib(model, (720, 1280))
    print(f"official UFPNet 720p whole-image inference: {gib:.3f} GiB")
    assert gib <= 4.0
