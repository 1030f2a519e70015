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


def _brute_force_shift_search(x, y, crop, max_shift, step):
    """The exhaustive loop of comp_upto_shift.m, in float64."""
    height, width = x.shape[:2]
    reference = y[crop:height - crop, crop:width - crop].astype(np.float64)
    source = np.pad(x.astype(np.float64), ((0, 1), (0, 1), (0, 0)), mode="edge")
    best_ssd, best_shift = np.inf, None
    shifts = np.arange(-max_shift, max_shift + 1e-9, step)
    for sy in shifts:
        for sx in shifts:
            iy, ix = int(np.floor(crop + sy)), int(np.floor(crop + sx))
            fy, fx = crop + sy - iy, crop + sx - ix
            window = source[iy:iy + reference.shape[0] + 1, ix:ix + reference.shape[1] + 1]
            rows = (1 - fy) * window[:-1] + fy * window[1:]
            moved = (1 - fx) * rows[:, :-1] + fx * rows[:, 1:]
            ssd = np.sum((moved - reference) ** 2)
            if ssd < best_ssd:
                best_ssd, best_shift = ssd, (sy, sx)
    return 10 * np.log10(reference.size / best_ssd), best_shift


@pytest.mark.parametrize("seed", [0, 1])
def test_shift_search_matches_the_exhaustive_loop(seed):
    rng = np.random.default_rng(seed)
    sharp = _smooth_image(seed + 20, (40, 44, 3))
    shift = rng.uniform(-2, 2, 2)
    estimate = ndimage.shift(sharp, (shift[0], shift[1], 0), order=3, mode="nearest")
    estimate = np.clip(estimate + 0.01 * rng.normal(size=sharp.shape), 0, 1).astype(np.float32)
    expected, expected_shift = _brute_force_shift_search(estimate, sharp, 8, 3, 0.25)
    value, found = jax.jit(functools.partial(metrics.shift_searched_psnr, crop=8, max_shift=3,
                                             return_shift=True))(estimate, sharp)
    np.testing.assert_allclose(found, expected_shift)
    np.testing.assert_allclose(value, expected, atol=1e-3)


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


def test_kohler_psnr_matches_the_exhaustive_loop():
    rng = np.random.default_rng(12)
    frames = np.stack([_smooth_image(s, (30, 34, 3)) for s in (13, 14)])
    estimate = np.clip(0.9 * np.roll(frames[0], (1, -2), axis=(0, 1))
                       + 0.05 * rng.normal(size=frames[0].shape), 0, 1).astype(np.float32)
    gray = lambda a: a.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    interior = gray(estimate)[3:-3, 3:-3]
    best = np.inf
    for frame in frames:
        for dy in range(7):
            for dx in range(7):
                window = gray(frame)[dy:dy + 24, dx:dx + 28]
                scale = np.sum(interior * window) / np.sum(interior * interior)
                best = min(best, np.mean((scale * interior - window) ** 2))
    value = jax.jit(functools.partial(metrics.kohler_psnr, max_shift=3))(estimate, frames)
    np.testing.assert_allclose(value, -10 * np.log10(best), atol=1e-3)


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
    aligned, reference, mask, warp = jax.jit(functools.partial(
        metrics.realblur_align, n_iter=5))(gt, gt)
    np.testing.assert_allclose(warp, np.eye(3), atol=1e-5)
    np.testing.assert_allclose(mask, 1.0)
    np.testing.assert_allclose(aligned, reference, atol=1e-5)


def test_realblur_scores_follow_the_official_formulas_on_the_aligned_images():
    gt = _smooth_image(15, (48, 52, 3))
    deblurred = 0.95 * ndimage.shift(gt, (0.5, -0.5, 0), order=3, mode="reflect")
    align = jax.jit(functools.partial(metrics.realblur_align, n_iter=20))
    score = jax.jit(functools.partial(metrics.realblur_psnr_ssim, n_iter=20))
    aligned, reference, mask, _ = [np.asarray(a, np.float64) for a in align(deblurred, gt)]
    psnr, ssim = score(deblurred, gt)
    # evaluate_RealBlur.py's compute_psnr and compute_ssim, on our aligned images.
    expected_psnr = 10 * np.log10(1 / (np.sum((reference - aligned) ** 2) / np.sum(mask)))
    _, ssim_map = skmetrics.structural_similarity(
        reference, aligned, channel_axis=-1, gaussian_weights=True,
        use_sample_covariance=False, data_range=1.0, full=True)
    ssim_map = (ssim_map * mask)[5:-5, 5:-5]
    expected_ssim = np.mean(ssim_map.sum((0, 1)) / mask[5:-5, 5:-5].sum((0, 1)))
    np.testing.assert_allclose(psnr, expected_psnr, atol=1e-3)
    np.testing.assert_allclose(ssim, expected_ssim, atol=1e-4)


def test_kernel_cosine_similarity_ignores_small_shifts():
    k = np.zeros((9, 9))
    k[4, 2:7] = 0.2
    shifted = np.roll(k, (1, -2), axis=(0, 1))
    assert metrics.kernel_cosine_similarity(shifted, k) == pytest.approx(1.0)
    assert metrics.kernel_cosine_similarity(np.roll(k, 3, axis=0), k, max_shift=2) < 0.5
