"""Tests for jaxdeblur.nets.unet: the DIP image network and the multi-head kernel network."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_fixture
from jaxdeblur.nets import unet


def test_image_net_shape_range_odd_sizes():
    net = unet.DIPImageNet(features=(8, 8, 8), skip_features=4, out_channels=3)
    z = unet.fixed_noise(jax.random.key(0), (21, 34, 8))
    params = net.init(jax.random.key(1), z)
    x = jax.jit(net.apply)(params, z)
    assert x.shape == (21, 34, 3) and x.dtype == jnp.float32
    assert float(x.min()) > 0.0 and float(x.max()) < 1.0


def test_image_net_vmap_is_per_example():
    net = unet.DIPImageNet(features=(8, 8), skip_features=4, out_channels=1)
    z = unet.fixed_noise(jax.random.key(0), (3, 16, 16, 4))
    params = net.init(jax.random.key(1), z[0])
    batched = jax.jit(jax.vmap(net.apply, in_axes=(None, 0)))(params, z)
    single = jnp.stack([net.apply(params, zi) for zi in z])
    np.testing.assert_allclose(batched, single, atol=1e-6)


def test_kernel_net_softmax_heads():
    net = unet.KernelNet(num_kernels=6, features=(8, 8, 16, 16), skip_features=4)
    z = unet.fixed_noise(jax.random.key(0), (9, 9, 8))
    params = net.init(jax.random.key(1), z)
    k = jax.jit(net.apply)(params, z)
    assert k.shape == (6, 9, 9)
    # Zero-initialised head: a fresh network gives identical flat kernels.
    np.testing.assert_allclose(k, np.full((6, 9, 9), 1 / 81), atol=1e-7)
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(2), p.shape),
                          params)
    k = net.apply(params, z)
    assert float(k.min()) >= 0.0
    np.testing.assert_allclose(k.sum(axis=(1, 2)), np.ones(6), atol=1e-6)
    assert float(jnp.abs(k[0] - k[1]).max()) > 1e-4
    tied = net.apply(params, z, tie_heads=True)
    assert tied.shape == (1, 9, 9)
    np.testing.assert_allclose(tied.sum(), 1.0, atol=1e-6)


@pytest.mark.parametrize("case", ["a", "b", "gray"])
def test_mysoftmax_parity(case):
    fx = load_fixture("eff.npz")
    logits = fx[f"in/{case}/kernel_logits"][0]
    got = jax.jit(unet.per_kernel_softmax)(jnp.asarray(logits))
    np.testing.assert_allclose(got, fx[f"in/{case}/kernels"][0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(got, fx[f"out/{case}/mysoftmax_f64"][0], atol=1e-6, rtol=0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="G, kh, kw"):
        unet.per_kernel_softmax(jnp.zeros((7, 7)))
    net = unet.DIPImageNet(features=(8,), skip_features=4)
    with pytest.raises(ValueError, match="one example"):
        net.init(jax.random.key(0), jnp.zeros((2, 8, 8, 3)))
    with pytest.raises(ValueError, match="skip_features"):
        unet.DIPImageNet(features=(8,), skip_features=0).init(jax.random.key(0),
                                                             jnp.zeros((8, 8, 3)))
