"""NAFNet blocks: layer norm, gating, pixel shuffle and TLC pooling (official semantics)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_fixture
from jaxdeblur.nets import nafnet as N


def test_layer_norm_2d_biased_variance_eps():
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 6)).astype(np.float32)
    ln = N.LayerNorm2d()
    variables = {"params": {"scale": np.full(6, 2.0, np.float32),
                            "bias": np.full(6, 0.5, np.float32)}}
    y = np.asarray(jax.jit(ln.apply)(variables, x))
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    np.testing.assert_allclose(y, 2 * (x - mu) / np.sqrt(var + 1e-6) + 0.5, atol=1e-5)


def test_simple_gate_and_pixel_shuffle_torch_order():
    x = jnp.arange(2 * 3 * 16, dtype=jnp.float32).reshape(1, 2, 3, 16)
    np.testing.assert_array_equal(N.simple_gate(x), x[..., :8] * x[..., 8:])
    with pytest.raises(ValueError, match="even channel"):
        N.simple_gate(x[..., :3])
    y = jax.jit(N.pixel_shuffle)(x)  # (1, 4, 6, 4)
    assert y.shape == (1, 4, 6, 4)
    # torch: out[c, 2y+i, 2x+j] = in[4c + 2i + j, y, x]
    for c in range(4):
        for i in range(2):
            for j in range(2):
                np.testing.assert_array_equal(y[0, i::2, j::2, c], x[0, :, :, 4 * c + 2 * i + j])


def test_gelu_is_exact_erf():
    from scipy.special import erf
    x = np.linspace(-4, 4, 41).astype(np.float32)
    np.testing.assert_allclose(N.gelu(x), 0.5 * x * (1 + erf(x / np.sqrt(2))), atol=1e-6)


@pytest.mark.parametrize("case", ["k5x7", "k4x6", "k13x5", "k20x30", "k1x1"])
def test_local_avg_pool_matches_official(case):
    fx = load_fixture("ufpnet_tiny_local.npz")
    x = fx["in/avgpool/x"].transpose(0, 2, 3, 1)  # (2, 13, 18, 4)
    window = tuple(int(v) for v in fx[f"meta/avgpool/{case}/kernel_size"])
    got = jax.jit(jax.vmap(lambda f: N.local_avg_pool(f, window)))(x)
    want = fx[f"out/avgpool/{case}_f64"].transpose(0, 2, 3, 1)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def test_local_avg_pool_large_window_accuracy():
    """Cumulative sums over a 720p map stay accurate (mean removed first); the box of output
    row r starts at r - (k - 1) // 2."""
    x = jax.random.uniform(jax.random.key(0), (720, 1280, 2)) + 10.0
    got = jax.jit(lambda f: N.local_avg_pool(f, (384, 384)))(x)
    xs = np.asarray(x, np.float64)
    ref = xs[100:484, 200:584].mean(axis=(0, 1))
    np.testing.assert_allclose(np.asarray(got)[100 + 191, 200 + 191], ref, atol=2e-5)


def test_tlc_window_official_values():
    assert [N.tlc_window((256 >> l, 256 >> l), (256, 256)) for l in range(5)] == [
        (384, 384), (192, 192), (96, 96), (48, 48), (24, 24)]


def test_naf_block_identity_at_init_and_local_pooling():
    block = N.NAFBlock(8)
    x = jax.random.normal(jax.random.key(0), (2, 16, 12, 8))
    variables = block.init(jax.random.key(1), x)
    np.testing.assert_array_equal(jax.jit(block.apply)(variables, x), x)  # beta = gamma = 0
    variables = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.full_like(v, 0.3) if p[-1].key in ("beta", "gamma") else v, variables)
    y_global = block.apply(variables, x)
    y_local = N.NAFBlock(8, pool_window=(4, 4)).apply(variables, x)
    y_cover = N.NAFBlock(8, pool_window=(16, 12)).apply(variables, x)
    assert np.abs(np.asarray(y_global - y_local)).max() > 1e-4
    np.testing.assert_allclose(np.asarray(y_cover), np.asarray(y_global), atol=1e-6)
    with pytest.raises(ValueError, match=r"NAFBlock\(8\) expects"):
        block.apply(variables, x[..., :4])
