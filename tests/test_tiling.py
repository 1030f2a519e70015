"""Tests for jaxdeblur.tiling: overlapping-tile inference with blended seams."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdeblur import tiling


class _TinyUNet(nn.Module):
    """A two-level conv net with a bounded receptive field (radius 1+1+2*(1+1)+1+1 = 8)."""

    @nn.compact
    def __call__(self, image):
        feat = nn.gelu(nn.Conv(8, (3, 3))(image))
        down = nn.avg_pool(feat, (2, 2), strides=(2, 2))
        down = nn.gelu(nn.Conv(8, (3, 3))(down))
        up = jnp.repeat(jnp.repeat(down, 2, axis=0), 2, axis=1)
        out = nn.Conv(image.shape[-1], (3, 3))(jnp.concatenate([feat, up], axis=-1))
        return {"image": image + out, "energy": jnp.mean(out ** 2, axis=-1)}


@pytest.fixture(scope="module")
def tiny_net():
    module = _TinyUNet()
    variables = module.init(jax.random.key(0), jnp.zeros((16, 16, 3)))
    return lambda tile: module.apply(variables, tile)


def _random_image(shape, seed=0):
    return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def test_identity_is_reproduced_exactly():
    image = _random_image((37, 53, 3))
    out = tiling.tiled_apply(lambda t: t, image, tile=16, overlap=8, multiple=4)
    np.testing.assert_allclose(out, image, atol=1e-6)


@pytest.mark.parametrize("shape,tile,overlap,batch_size", [
    ((70, 90, 3), 48, 32, 1),
    ((100, 61, 3), (64, 48), 32, 3),
])
def test_tiled_matches_whole_image(tiny_net, shape, tile, overlap, batch_size):
    image = _random_image(shape, seed=1)
    whole = jax.jit(tiny_net)(tiling.pad_to_multiple(image, 16))
    tiled = tiling.tiled_apply(tiny_net, image, tile=tile, overlap=overlap, multiple=16,
                               margin=8, batch_size=batch_size)
    grid = tiling.plan_tiles(shape, tile=tile, overlap=overlap, multiple=16, margin=8)
    assert len(grid.origins) > 2  # the test really exercises seams
    for name in ("image", "energy"):
        expected = np.asarray(whole[name])[:shape[0], :shape[1]]
        assert tiled[name].shape == expected.shape
        np.testing.assert_allclose(tiled[name], expected, atol=1e-3)
        assert np.max(np.abs(tiled[name] - expected)) < 1e-5


def test_margin_too_small_leaves_a_seam_error(tiny_net):
    # The receptive-field radius is 8; without a guard margin the seams differ (which is
    # why the margin exists), but the blend keeps the error small.
    image = _random_image((64, 96, 3), seed=2)
    whole = np.asarray(jax.jit(tiny_net)(image)["image"])
    tiled = tiling.tiled_apply(tiny_net, image, tile=48, overlap=32, multiple=16, margin=0)
    error = np.abs(tiled["image"] - whole)
    assert 1e-4 < error.max() < 0.5


@pytest.mark.parametrize("size,tile,overlap,margin", [(97, 32, 16, 4), (64, 32, 16, 0),
                                                      (200, 48, 32, 8)])
def test_windows_cover_every_pixel_and_partition_unity(size, tile, overlap, margin):
    grid = tiling.plan_tiles((size, size), tile=tile, overlap=overlap, multiple=16,
                             margin=margin)
    total = np.zeros(grid.padded_shape)
    for y, x in grid.origins:
        total[y:y + grid.tile_shape[0], x:x + grid.tile_shape[1]] += tiling.tile_weights(
            grid, (y, x))
    assert total.min() > 0.05
    # Tiles at the regular stride overlap by exactly `overlap`: their ramps sum to one.
    regular = grid.tile_shape[0] - overlap
    if len(grid.starts_y) > 2 and grid.starts_y[1] == regular:
        np.testing.assert_allclose(total[:regular + overlap, :regular + overlap], 1.0,
                                   atol=1e-6)


def test_plan_tiles_alignment():
    grid = tiling.plan_tiles((1000, 750, 3), tile=256, overlap=40, multiple=16)
    assert grid.padded_shape == (1008, 752)
    assert grid.overlap == 48 and grid.margin == 12
    for starts, size, t in ((grid.starts_y, 1008, 256), (grid.starts_x, 752, 256)):
        assert all(s % 16 == 0 for s in starts)
        assert starts[0] == 0 and starts[-1] == size - t
    small = tiling.plan_tiles((20, 30), tile=512, overlap=32, multiple=16)
    assert small.tile_shape == (32, 32) and small.origins == [(0, 0)]


def test_keys_are_folded_per_tile_and_host_loop_path():
    image = _random_image((40, 40, 1), seed=3)
    calls = []

    def noisy(tile, key):
        calls.append(tile.shape)
        return tile + 0.0 * jax.random.normal(key, tile.shape)

    out = tiling.tiled_apply(noisy, image, tile=32, overlap=16, multiple=8,
                             key=jax.random.key(0), compile_fn=False)
    np.testing.assert_allclose(out, image, atol=1e-6)
    grid = tiling.plan_tiles(image.shape, tile=32, overlap=16, multiple=8)
    assert len(calls) == len(grid.origins) == 4  # called exactly once per tile, untraced

    def key_value(tile, key):
        return jnp.broadcast_to(jax.random.uniform(key), tile.shape[:2])

    a = tiling.tiled_apply(key_value, image, tile=32, overlap=16, multiple=8,
                           key=jax.random.key(1), batch_size=2)
    b = tiling.tiled_apply(key_value, image, tile=32, overlap=16, multiple=8,
                           key=jax.random.key(1), batch_size=1)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert a.std() > 0  # different tiles saw different keys


def test_bad_arguments_raise():
    image = np.zeros((32, 32, 3), np.float32)
    with pytest.raises(ValueError, match="shape"):
        tiling.tiled_apply(lambda t: t, np.zeros((32, 32)), tile=16, overlap=8)
    with pytest.raises(ValueError, match="tile"):
        tiling.tiled_apply(lambda t: t[:8], image, tile=16, overlap=0, multiple=8)
    with pytest.raises(ValueError, match="exceed the overlap"):
        tiling.plan_tiles((64, 64), tile=16, overlap=16, multiple=16)
    with pytest.raises(ValueError, match="margin"):
        tiling.plan_tiles((64, 64), tile=32, overlap=16, multiple=16, margin=8)
    with pytest.raises(ValueError, match="batch_size"):
        tiling.tiled_apply(lambda t: t, image, tile=16, overlap=8, batch_size=2,
                           compile_fn=False)


def test_tiny_ufpnet_with_tlc_tiled_matches_whole_image():
    """The official tiny UFPNet (TLC local pooling, 24-px window at full resolution) with
    the noise fixed to zero: tiles with a 16-px guard agree with whole-image inference."""
    from conftest import load_fixture
    from jaxdeblur import convert
    from jaxdeblur.nets import ufpnet

    fixture = load_fixture("ufpnet_tiny.npz")
    state_dict = {k[len("param/"):]: v for k, v in fixture.items() if k.startswith("param/")}
    variables = convert.ufpnet_variables_from_state_dict(state_dict)
    module = ufpnet.UFPNet(**convert.ufpnet_config_from_state_dict(state_dict),
                           train_size=(16, 16))

    def restore(tile):
        eps = jnp.zeros((1,) + tile.shape[:2] + (module.kernel_size ** 2,))
        return module.apply(variables, tile[None], eps=eps)[1][0]

    image = _random_image((32, 80, 3), seed=4)
    whole = np.asarray(jax.jit(restore)(image))
    tiled = tiling.tiled_apply(restore, image, tile=48, overlap=32, margin=8, multiple=16)
    assert len(tiling.plan_tiles(image.shape, tile=48, overlap=32).origins) == 3
    assert np.abs(whole - image).max() > 0.1  # the network really changes the image
    np.testing.assert_allclose(tiled, whole, atol=1e-3)


def test_compiled_tile_function_is_reused_across_calls():
    traces = []

    def double(tile):
        traces.append(tile.shape)
        return 2.0 * tile

    for seed in range(3):
        image = _random_image((40, 56, 3), seed=seed)
        out = tiling.tiled_apply(double, image, tile=32, overlap=16, multiple=8)
        np.testing.assert_allclose(out, 2.0 * image, atol=1e-6)
    assert len(traces) == 1  # one trace for every tile of every image


_MEMORY_SCRIPT = """
import resource, sys
import jax.numpy as jnp, numpy as np
from jaxdeblur import tiling
def blur3(tile):
    padded = jnp.pad(tile, ((1, 1), (1, 1), (0, 0)), mode="edge")
    return sum(padded[i:i + tile.shape[0], j:j + tile.shape[1]]
               for i in range(3) for j in range(3)) / 9.0
warm = tiling.tiled_apply(blur3, np.zeros((64, 64, 3), np.float32), tile=512, overlap=64)
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = np.random.default_rng(0).uniform(size=(3000, 4000, 3)).astype(np.float32)
out = tiling.tiled_apply(blur3, image, tile=512, overlap=64)
assert out.shape == image.shape
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) / 1024)
"""


def test_memory_of_a_4000x3000_tiled_inference_is_bounded():
    """Peak RSS growth of a 4000x3000 RGB tiled inference (512-px tiles): the input image
    (137 MB) + the two accumulators of tiled_apply (weighted sum 138 MB, weight sum 46 MB)
    + one tile batch; bound 500 MB, the figure stated in the README (measured 412 MB;
    whole-image inference compiles to 2.8 GB even for the small conv net of
    benchmarks/tiled_inference.py)."""
    import os
    import pathlib
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo), JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    growth_mb = float(result.stdout.strip().splitlines()[-1])
    print(f"peak RSS growth of a 4000x3000 tiled inference: {growth_mb:.0f} MB")
    assert growth_mb < 500


@pytest.mark.parametrize("mode", ["reflect", "symmetric", "edge", "constant"])
def test_tiles_are_read_from_the_padded_canvas(mode):
    image = _random_image((21, 37, 2), seed=5)
    grid = tiling.plan_tiles(image.shape, tile=16, overlap=8, multiple=8)
    read = tiling._tile_reader(image, grid, mode)
    canvas = tiling.pad_to_multiple(image, 8, mode=mode)
    for y, x in grid.origins:
        np.testing.assert_array_equal(read(y, x), canvas[y:y + 16, x:x + 16])
