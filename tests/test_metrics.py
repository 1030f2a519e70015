"""Tests for jaxdeblur.metrics: PSNR/SSIM against scikit-image and the aligned protocols."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from skimage import metrics as skmetrics

from jaxdeblur import metrics


def _smooth_image(seed, shape=(64, 64, 3)):
    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.uniform(size=shape), (2.5, 2.5, 0))
    return ((image - image.min()) / (image.max() - image.min())).astype(np.float32)


def _pair(seed=0, shape=(40, 37, 3), noise=0.1):
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=shape)
    y = np.clip(x + noise * rng.normal(size=shape), 0.0, 1.0)
    return x.astype(np.float32), y.astype(np.float32)


def test_psnr_matches_skimage_and_vmaps():
    x, y = _pair()
    expected = skmetrics.peak_signal_noise_ratio(y.astype(np.float64), x.astype(np.float64),
                                                 data_range=1.0)
    np.testing.assert_allclose(jax.jit(metrics.psnr)(x, y), expected, atol=1e-4)
    batch = jax.jit(jax.vmap(metrics.psnr))(np.stack([x, y]), np.stack([y, y]))
    assert batch.shape == (2,) and np.isinf(batch[1])
    np.testing.assert_allclose(metrics.psnr(255 * x, 255 * y, max_val=255.0), expected,
                               atol=1e-4)


def test_psnr_uint8_quantises_like_the_official_eval():
    x, y = _pair(1, noise=0.03)
    x8 = np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
    y8 = np.round(np.clip(y, 0, 1) * 255).astype(np.uint8)
    expected = skmetrics.peak_signal_noise_ratio(y8, x8, data_range=255)
    np.testing.assert_allclose(jax.jit(metrics.psnr_uint8)(x, y), expected, atol=1e-4)


@pytest.mark.parametrize("options", [
    {},
    {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False},
    {"win_size": 5},
])
def test_ssim_matches_skimage(options):
    x, y = _pair(2)
    expected = skmetrics.structural_similarity(
        x.astype(np.float64), y.astype(np.float64), data_range=1.0, channel_axis=-1,
        **options)
    got = jax.jit(functools.partial(metrics.ssim, **options))(x, y)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_ssim_uint8_matches_skimage_on_quantised_images():
    x, y = _pair(3, noise=0.05)
    x8 = np.round(np.clip(x, 0, 1) * 255)
    y8 = np.round(np.clip(y, 0, 1) * 255)
    expected = skmetrics.structural_similarity(x8, y8, data_range=255, channel_axis=-1,
                                               gaussian_weights=True,
                                               use_sample_covariance=False)
    np.testing.assert_allclose(jax.jit(metrics.ssim_uint8)(x, y), expected, atol=1e-4)


def test_ssim_of_identical_images_is_one_and_batches():
    x, _ = _pair(4)
    values = jax.jit(jax.vmap(metrics.ssim))(np.stack([x, x]), np.stack([x, x]))
    np.testing.assert_allclose(values, 1.0, atol=1e-6)


def test_metrics_reject_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(jnp.zeros((8, 8, 3)), jnp.zeros((8, 9, 3)))
    with pytest.raises(ValueError, match="same shape"):
        metrics.ssim(jnp.zeros((8, 8, 3)), jnp.zeros((8, 8, 1)))
    with pytest.raises(ValueError, match=r"\(H, W, C\)"):
        metrics.psnr(jnp.zeros((2, 8, 8, 3)), jnp.zeros((2, 8, 8, 3)))
    with pytest.raises(ValueError, match="window"):
        metrics.ssim(jnp.zeros((5, 5, 1)), jnp.zeros((5, 5, 1)))
    with pytest.raises(ValueError, match="crop"):
        metrics.shift_searched_psnr(jnp.zeros((40, 40, 1)), jnp.zeros((40, 40, 1)),
                                    crop=3, max_shift=5)


def test_shift_search_recovers_a_subpixel_shift():
    sharp = _smooth_image(5, (64, 64, 1))
    # estimate(p) = sharp(p - d): the search must find s = d.
    shifted = ndimage.shift(sharp, (1.25, -2.5, 0.0), order=1, mode="nearest")
    search = jax.jit(functools.partial(metrics.shift_searched_psnr, crop=12, max_shift=4,
                                       return_shift=True))
    value, shift = search(shifted, sharp)
    np.testing.assert_allclose(shift, (1.25, -2.5))
    assert value > 40.0 > float(metrics.psnr(shifted, sharp)) + 10.0
    unshifted = search(sharp, sharp)
    assert np.isinf(unshifted[0]) and np.all(np.asarray(unshifted[1]) == 0.0)


def test_shift_search_y_channel_uses_matlab_luma():
    rgb = _smooth_image(6, (48, 48, 3))
    y = metrics.rgb_to_y(rgb)
    expected = 16 / 255 + rgb @ np.array([65.481, 128.553, 24.966]) / 255
    np.testing.assert_allclose(y[..., 0], expected, atol=1e-6)
    noisy = np.clip(rgb + 0.02 * np.random.default_rng(0).normal(size=rgb.shape), 0, 1)
    value = metrics.shift_searched_psnr(noisy, rgb, crop=10, max_shift=1, y_channel=True)
    crop = (slice(10, -10), slice(10, -10))
    mse = np.mean((np.asarray(metrics.rgb_to_y(noisy))[crop] - np.asarray(y)[crop]) ** 2)
    assert value >= 10 * np.log10(1 / mse) - 1e-3


def test_kohler_psnr_finds_scale_translation_and_frame():
    frames = np.stack([_smooth_image(s, (40, 44, 3)) for s in (7, 8, 9)])
    # The estimate is frame 1 translated by (2, -3) with 20% less intensity.
    estimate = 0.8 * np.roll(frames[1], (-2, 3), axis=(0, 1))
    value = jax.jit(metrics.kohler_psnr)(estimate, frames)
    assert value > 60.0
    wrong = metrics.kohler_psnr(estimate, frames[[0, 2]])
    assert wrong < 30.0
    with pytest.raises(ValueError, match="frames"):
        metrics.kohler_psnr(estimate, frames[:, :20])


def test_realblur_alignment_undoes_translation_and_gain():
    gt = _smooth_image(10, (72, 80, 3))
    shift = (1.5, -0.75)
    deblurred = 0.9 * np.stack([ndimage.shift(gt[..., c], shift, order=3, mode="reflect")
                                for c in range(3)], axis=-1)
    psnr, ssim = jax.jit(functools.partial(metrics.realblur_psnr_ssim, n_iter=50))(
        deblurred, gt)
    warp = jax.jit(functools.partial(metrics.realblur_align, n_iter=50))(deblurred, gt)[3]
    # The warp maps ground-truth pixels (x, y) to deblurred ones: a translation by the shift.
    np.testing.assert_allclose(warp[:2, 2], (shift[1], shift[0]), atol=0.05)
    np.testing.assert_allclose(warp[:2, :2], np.eye(2), atol=5e-3)
    assert psnr > 38.0 > float(metrics.psnr(deblurred, gt)) + 10.0
    assert ssim > 0.99


def test_realblur_of_identical_images_keeps_the_identity():
    gt = _smooth_image(11, (48, 48, 3))
    aligned, reference, mask, warp = metrics.realblur_align(gt, gt, n_iter=5)
    np.testing.assert_allclose(warp, np.eye(3), atol=1e-5)
    np.testing.assert_allclose(mask, 1.0)
    np.testing.assert_allclose(aligned, reference, atol=1e-5)
