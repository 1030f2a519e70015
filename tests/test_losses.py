"""UFPNet losses: PSNR loss, reblur L1 (detached kernels), L_KE, KL, reblur PSNR."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_fixture
from jaxdeblur import losses


def _delta_field(b, h, w, k=5):
    field = np.zeros((b, h, w, k, k), np.float32)
    field[..., k // 2, k // 2] = 1.0
    return jnp.asarray(field)


def test_psnr_loss_formula():
    rng = np.random.default_rng(0)
    pred = rng.random((3, 8, 6, 3)).astype(np.float32)
    gt = rng.random((3, 8, 6, 3)).astype(np.float32)
    want = 10 / math.log(10) * np.mean(np.log(((pred - gt) ** 2).mean(axis=(1, 2, 3)) + 1e-8))
    np.testing.assert_allclose(jax.jit(losses.psnr_loss)(pred, gt), want, rtol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        losses.psnr_loss(pred, gt[:, :4])


def test_reblur_matches_official_sv_blur_batch2():
    fx = load_fixture("sv_blur.npz")
    x = fx["in/batch2/x"].transpose(0, 2, 3, 1)
    kernels = fx["in/batch2/kernel"].reshape(2, 24, 32, 19, 19)
    y = jax.jit(losses.reblur)(x, kernels)
    np.testing.assert_allclose(np.asarray(y), fx["out/batch2/y_f64"].transpose(0, 2, 3, 1),
                               atol=1e-6)


def test_reblur_l1_detaches_kernels_and_ke_loss_does_not():
    key = jax.random.key(0)
    x = jax.random.uniform(key, (2, 8, 8, 3))
    y = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3))
    field = _delta_field(2, 8, 8) * 0.9
    np.testing.assert_allclose(losses.reblur_l1(x, field, y), jnp.mean(jnp.abs(0.9 * x - y)),
                               rtol=1e-6)
    g_field = jax.grad(lambda f: losses.reblur_l1(x, f, y))(field)
    assert float(jnp.abs(g_field).max()) == 0.0
    g_x = jax.grad(lambda x: losses.reblur_l1(x, field, y))(x)
    assert float(jnp.abs(g_x).max()) > 0.0
    g_ke = jax.grad(lambda f: losses.kernel_estimation_l1(x, f, y))(field)
    assert float(jnp.abs(g_ke).max()) > 0.0


def test_reblur_psnr_and_kl():
    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
    field = _delta_field(2, 8, 8)
    noisy = x + 0.01
    np.testing.assert_allclose(losses.reblur_psnr(x, field, noisy), 40.0, atol=1e-3)
    code = jax.nn.softmax(jax.random.normal(jax.random.key(2), (2, 4, 4, 361)))
    kl = losses.code_kl(code, jnp.full((2, 4, 4), 0.5))
    assert np.isfinite(float(kl)) and float(kl) > 0
