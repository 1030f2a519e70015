"""UFPNet against the official PyTorch code (shared/fixtures/ufpnet_tiny*.npz)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_fixture
from jaxdeblur import convert
from jaxdeblur.nets import ufpnet as U
from jaxdeblur.train import ufpnet as ufpnet_runs

TINY = dict(img_channel=3, width=8, enc_blk_nums=(1, 1, 1, 2), middle_blk_num=1,
            dec_blk_nums=(1, 1, 1, 1), kernel_size=19)
GOPRO = dict(img_channel=3, width=64, enc_blk_nums=(1, 1, 1, 28), middle_blk_num=1,
             dec_blk_nums=(1, 1, 1, 1), kernel_size=19)


def nhwc(a):
    return np.asarray(a).transpose(0, 2, 3, 1)


@functools.lru_cache(maxsize=1)
def _tiny():
    fx = load_fixture("ufpnet_tiny.npz")
    sd = {k[len("param/"):]: v for k, v in fx.items() if k.startswith("param/")}
    return fx, sd, convert.ufpnet_variables_from_state_dict(sd, config=TINY)


def _apply(model, variables, x, eps):
    fn = jax.jit(lambda v, x, e: model.apply(v, x, eps=e, mutable=["intermediates"]))
    (kernel_field, restored), state = fn(variables, jnp.asarray(x), jnp.asarray(eps))
    inter = {"/".join(str(getattr(k, "key", k)) for k in path[:-1]): np.asarray(v)
             for path, v in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]}
    return np.asarray(kernel_field), np.asarray(restored), inter


@functools.lru_cache(maxsize=1)
def _main_case():
    fx, _, variables = _tiny()
    x = nhwc(fx["in/x"])
    eps = fx["in/eps"].reshape(1, 32, 48, 361)
    return _apply(U.UFPNet(**TINY), variables, x, eps)


def test_config_inferred_from_state_dict():
    _, sd, _ = _tiny()
    assert convert.ufpnet_config_from_state_dict(sd) == TINY


def test_kernels_and_restored_match_official():
    fx, _, _ = _tiny()
    kernel_field, restored, _ = _main_case()
    assert kernel_field.shape == (1, 32, 48, 19, 19)
    err_k = np.abs(kernel_field.reshape(1, 1536, 19, 19) - fx["out/kernel_f64"]).max()
    err_r = np.abs(restored - nhwc(fx["out/restored_f64"])).max()
    print(f"ufpnet_tiny max |err|: kernel {err_k:.2e}, restored {err_r:.2e}")
    assert err_k < 2e-5
    assert err_r < 1e-5


@pytest.mark.parametrize("name,ours,atol", [
    ("ke_code", "ke_code", 5e-8), ("ke_sigma_f64", "ke_sigma", 1e-6),
    ("intro", "intro_out", 1e-5),
    ("katt0", "encoders_0_0/katt", 1e-5), ("katt1", "encoders_1_0/katt", 1e-5),
    ("katt2", "encoders_2_0/katt", 1e-5),
    ("enc0", "enc0", 1e-5), ("enc1", "enc1", 1e-5), ("enc2", "enc2", 1e-5),
    ("enc3", "enc3", 1e-5), ("middle", "middle", 1e-5),
    ("dec0", "dec0", 1e-5), ("dec1", "dec1", 1e-5), ("dec2", "dec2", 1e-5),
    ("dec3", "dec3", 1e-5), ("ending_f64", "ending_out", 1e-5),
    ("kernel_down0", "kernel_down0", 2e-5), ("kernel_down1", "kernel_down1", 2e-5),
    ("kernel_down2", "kernel_down2", 2e-5),
])
def test_intermediates_match_official(name, ours, atol):
    fx, _, _ = _tiny()
    _, _, inter = _main_case()
    want = fx[f"out/inter/{name}"]
    got = inter[ours]
    if name == "ke_code":
        got = got.reshape(1, 1536, 19, 19)
    elif name.startswith("ke_sigma"):
        got = got.reshape(1, 1536)
    else:
        want = nhwc(want)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < atol, (name, np.abs(got - want).max())


def test_padding_case_matches_official():
    """12x20 input: reflect-padded to 16x32 at the bottom/right, cropped back."""
    fx, _, variables = _tiny()
    model = U.UFPNet(**TINY)
    eps = fx["in/pad/eps"].reshape(1, 16, 32, 361)
    kernel_field, restored, inter = _apply(model, variables, nhwc(fx["in/pad/x"]), eps)
    assert restored.shape == (1, 12, 20, 3) and kernel_field.shape == (1, 12, 20, 19, 19)
    want_k = fx["out/pad/kernel"].reshape(1, 16, 32, 19, 19)[:, :12, :20]
    assert np.abs(kernel_field - want_k).max() < 2e-5
    assert np.abs(restored - nhwc(fx["out/pad/restored_f64"])).max() < 1e-5
    assert np.abs(inter["ending_out"] - nhwc(fx["out/pad/ending"])).max() < 1e-5


@pytest.mark.parametrize("case", ["train16x16", "train16x32"])
def test_tlc_local_pooling_matches_official(case):
    fx, _, variables = _tiny()
    local = load_fixture("ufpnet_tiny_local.npz")
    train_size = tuple(int(v) for v in local[f"meta/{case}/train_size"][2:])
    windows = U.tlc_windows(train_size, 4)
    for name, want in (("encoders.0.0.sca.0", 0), ("encoders.3.1.sca.0", 3),
                       ("middle_blks.0.sca.0", 4), ("decoders.3.0.sca.0", 0)):
        assert windows[want] == tuple(local[f"meta/{case}/pool_kernel_size/{name}"]), name
    model = U.UFPNet(**TINY, train_size=train_size)
    _, restored, inter = _apply(model, variables, nhwc(fx["in/x"]),
                                fx["in/eps"].reshape(1, 32, 48, 361))
    assert np.abs(restored - nhwc(local[f"out/{case}/restored_f64"])).max() < 1e-5
    assert np.abs(inter["ending_out"] - nhwc(local[f"out/{case}/ending"])).max() < 1e-5
    for name in ("enc0", "enc1", "enc2", "enc3", "middle", "dec0", "dec1", "dec2", "dec3"):
        err = np.abs(inter[name] - nhwc(local[f"out/{case}/inter/{name}"])).max()
        assert err < 1e-5, (name, err)


def test_conv_transpose_matches_scatter_definition():
    """out[y] = sum over iy, ky with y = 2 iy - 1 + ky of in[iy] W[ky] (torch semantics)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 3, 5, 2)).astype(np.float32)
    w = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)  # (kh, kw, in, out)
    layer = U.ConvTranspose2d(4)
    for out_size in ((6, 10), (5, 9)):
        y = jax.jit(lambda v, x: layer.apply(v, x, out_size))(
            {"params": {"kernel": w, "bias": np.zeros(4, np.float32)}}, x)
        ref = np.zeros((1, out_size[0] + 2, out_size[1] + 2, 4))
        for iy in range(3):
            for ix in range(5):
                ref[0, 2 * iy:2 * iy + 3, 2 * ix:2 * ix + 3] += np.einsum(
                    "c,hwco->hwo", x[0, iy, ix], w)
        ref = ref[:, 1:1 + out_size[0], 1:1 + out_size[1]]
        np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5)
    with pytest.raises(ValueError, match="cannot map size"):
        layer.apply({"params": {"kernel": w, "bias": np.zeros(4, np.float32)}}, x, (9, 10))


def test_code_to_latent_unbiased_std_and_mixing():
    row = np.random.default_rng(1).random(361).astype(np.float32)
    code = jnp.asarray(np.tile(row, (4, 1)))
    sigma = jnp.asarray([0.0, 0.3, 0.6, 0.9])
    z0 = U.code_to_latent(code, sigma, jnp.zeros_like(code))
    np.testing.assert_allclose(np.std(np.asarray(z0[0]), ddof=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(z0[0]), (row - row.mean()) / row.std(ddof=1),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(z0[3]), np.asarray(z0[0]) * np.sqrt(1 - 0.81),
                               atol=1e-5)
    z1 = U.code_to_latent(code, sigma, jnp.ones_like(code))
    np.testing.assert_allclose(np.asarray(z1 - z0), np.broadcast_to(sigma[:, None], (4, 361)),
                               atol=1e-6)
    flat = U.code_to_latent(jnp.full((2, 361), 1 / 361), jnp.full((2,), 0.5),
                            jnp.ones((2, 361)))
    np.testing.assert_allclose(np.asarray(flat), 0.5, atol=1e-2)  # constant code: no NaN
    kl = U.kl_to_standard_normal(code, jnp.full((4,), 0.5))
    assert kl.shape == (4,) and np.all(np.asarray(kl) > 0)


def test_param_count_official_gopro_config():
    """80.34 M official parameters (paper 80.3 M), counted with jax.eval_shape (no init).

    The official model also builds ``kernel_down.3`` (361->361, 2x2) at the level with 28
    plain blocks and never uses it: 521,645 parameters that exist only in its state dict.
    """
    model = U.UFPNet(**GOPRO)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)),
                                               key=jax.random.key(1)))
    count = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes["params"]))
    dead = 361 * 361 * 4 + 361
    ke = sum(int(np.prod(s.shape))
             for s in jax.tree_util.tree_leaves(shapes["params"]["kernel_extra"]))
    print(f"UFPNet GoPro params: {count:,} used + {dead:,} unused official kernel_down.3 = "
          f"{(count + dead) / 1e6:.3f} M (KE-Net {ke / 1e6:.3f} M)")
    assert abs((count + dead) / 1e6 - 80.34) < 0.05
    assert abs(ke / 1e6 - 5.62) < 0.01


def test_checkpoint_from_another_config_is_refused():
    _, sd, _ = _tiny()
    with pytest.raises(ValueError, match="another config.*width is 8.*64"):
        convert.ufpnet_variables_from_state_dict(sd, config=GOPRO)
    broken = dict(sd)
    del broken["encoders.0.0.kernel_atttion.conv_2.0.weight"]
    with pytest.raises(ValueError, match="missing keys.*conv_2.0.weight"):
        convert.ufpnet_variables_from_state_dict(broken)
    broken = dict(sd, **{"intro.weight": np.zeros((8, 3, 5, 5), np.float32)})
    with pytest.raises(ValueError, match="shape mismatches.*intro.weight"):
        convert.ufpnet_variables_from_state_dict(broken)


def test_bad_inputs():
    model = U.UFPNet(**TINY)
    x = jnp.zeros((1, 16, 16, 1))
    with pytest.raises(ValueError, match="RGB only.*jnp.repeat"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), x, key=jax.random.key(1)))
    with pytest.raises(ValueError, match="pass key="):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
    with pytest.raises(ValueError, match="too small"):
        U.pad_to_multiple(jnp.zeros((1, 5, 16, 3)), 16)
    padded = U.pad_to_multiple(
        jnp.arange(12.0).reshape(1, 12, 1, 1) * jnp.ones((1, 1, 16, 3)), 16)
    assert padded.shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(np.asarray(padded[0, 12:, 0, 0]), [10, 9, 8, 7])


def test_load_official_pth_with_params_key(tmp_path):
    """Official checkpoints are ``torch.save({"params": state_dict})``."""
    torch = pytest.importorskip("torch")
    _, sd, variables = _tiny()
    path = tmp_path / "ufpnet_tiny.pth"
    torch.save({"params": {k: torch.from_numpy(v) for k, v in sd.items()}}, path)
    model, loaded, _ = ufpnet_runs.load_checkpoint(path, train_size=(16, 16), config=TINY)
    assert model.width == 8 and model.enc_blk_nums == (1, 1, 1, 2)
    assert model.train_size == (16, 16)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(a, b)
