"""Tests for jaxdeblur.blind (coarse-to-fine kernel estimation) and jaxdeblur.photo."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data

from jaxdeblur import blind, blur, configs, metrics, photo


def _settings(**changes) -> blind.KernelEstimation:
    base = photo.settings_from_config(configs.load("photo")).estimation
    return dataclasses.replace(base, **changes)


def _stroke(size: int) -> np.ndarray:
    """An asymmetric L-shaped camera-shake stroke, sum 1."""
    k = np.zeros((size, size), np.float32)
    c = size // 2
    k[c, c - size // 3:c + size // 3 + 1] = 1.0
    k[c - size // 3:c + 1, c + size // 3] = 0.6
    return k / k.sum()


def _blurred(kernel: np.ndarray, size: int, noise: float = 0.005, seed: int = 0):
    k = kernel.shape[0]
    scene = skimage.data.camera()[100:100 + size + k - 1, 150:150 + size + k - 1] / 255.0
    scene = scene.astype(np.float32)
    blurry = np.asarray(blur.conv(jnp.asarray(scene)[..., None], jnp.asarray(kernel),
                                  boundary="valid"))[..., 0]
    blurry = blurry + noise * np.random.default_rng(seed).standard_normal(blurry.shape)
    r = k // 2
    return np.clip(blurry, 0, 1).astype(np.float32), scene[r:r + size, r:r + size]


def _padded_cosine(a, b):
    n = max(a.shape[0], b.shape[0])
    return metrics.kernel_cosine_similarity(np.pad(a, (n - a.shape[0]) // 2),
                                            np.pad(b, (n - b.shape[0]) // 2), max_shift=3)


def test_pyramid_levels_coarse_to_fine():
    levels = blind.pyramid((255, 255), _settings(max_kernel_size=35))
    assert [lv.kernel_size for lv in levels] == [7, 9, 13, 19, 25, 35]
    assert levels[-1].shape == (255, 255) and levels[-1].factor == 1
    assert all(a.shape[0] < b.shape[0] for a, b in zip(levels, levels[1:]))
    assert [lv.kernel_size for lv in blind.pyramid((64, 64), _settings(max_kernel_size=11,
                                                                       coarsest_kernel=7))] \
        == [9, 11]


def test_fit_kernel_recovers_the_kernel_from_the_sharp_image():
    kernel = _stroke(11)
    blurry, sharp = _blurred(kernel, 96, noise=0.0)
    pad = (blur.next_fast_len(96 + 11) - 96,) * 2
    canvas = blind.periodic_extension(jnp.asarray(blurry), pad)
    latent = blind.periodic_extension(jnp.asarray(sharp), pad)
    gradients = blind.select_gradients(latent, 11, fraction=jnp.float32(1e6))  # all pixels
    raw = blind.fit_kernel(gradients, canvas, 11, reg=1e-3, iterations=100,
                           init=jnp.zeros((11, 11)))
    estimate = blind.clean_kernel(np.asarray(raw), threshold=0.05, min_component=0.1)
    assert abs(estimate.sum() - 1) < 1e-5 and estimate.min() >= 0
    # convention: the asymmetric kernel is recovered unflipped (its flip scores 0.85)
    assert _padded_cosine(estimate, kernel) > 0.97
    assert _padded_cosine(estimate, kernel[::-1, ::-1]) < 0.9


def test_coarse_to_fine_recovers_a_known_kernel():
    kernel = _stroke(9)
    blurry, _ = _blurred(kernel, 96)
    settings = _settings(max_kernel_size=11, coarsest_kernel=7)
    estimate = blind.estimate_kernel(blurry, settings)
    assert [size for _, size in estimate.levels] == [9, 11]            # two levels
    assert _padded_cosine(estimate.kernel, kernel) > 0.85
    assert estimate.kernel.min() >= 0 and abs(estimate.kernel.sum() - 1) < 1e-5


def test_automatic_kernel_size_follows_the_blur_extent():
    kernel = _stroke(13)
    blurry, sharp = _blurred(kernel, 128)
    settings = dataclasses.replace(photo.settings_from_config(configs.load("photo")),
                                   min_kernel_size=15)
    result = photo.deblur_uniform(blurry[..., None], settings)
    assert result.searched_size == 19                       # 0.15 · 128 → 19 searched
    # 90% of the mass within the true 13 px window (the stroke spans 9 × 5 px)
    assert blind.crop_kernel_by_energy(result.kernel, 0.9, margin=0).shape[0] <= 13
    assert _padded_cosine(result.kernel, kernel) > 0.8
    # the estimate is centred on its centre of mass: compare after the best shift
    aligned = lambda x: float(metrics.shift_searched_psnr(  # noqa: E731
        jnp.asarray(x), jnp.asarray(sharp[..., None]), max_shift=5, step=0.5))
    assert aligned(result.restored) > aligned(blurry[..., None]) + 3


def test_informative_crop_prefers_edges_over_flat_and_saturated_areas():
    rng = np.random.default_rng(0)
    image = np.full((300, 400), 0.5, np.float32)
    image[200:280, 300:380] = (rng.random((80, 80)) > 0.5) * 0.6 + 0.2    # edges here
    image[10:90, 10:90] = (rng.random((80, 80)) > 0.5) * 1.0              # clipped edges
    rows, cols = blind.informative_crop(image, 128)
    assert rows.stop - rows.start == 128 and cols.stop - cols.start == 128
    assert rows.start <= 200 and rows.stop >= 280 and cols.start <= 300 and cols.stop >= 380
    assert blind.informative_crop(image[:100, :100], 128) == (slice(0, 100), slice(0, 100))


def test_bad_inputs_are_named():
    settings = _settings(max_kernel_size=35)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        blind.estimate_kernel(np.zeros((30, 30), np.float32), settings)
    with pytest.raises(ValueError, match="NaN"):
        blind.estimate_kernel(np.full((64, 64), np.nan, np.float32), _settings(
            max_kernel_size=9))
    with pytest.raises(ValueError, match=r"\(H, W\) gray"):
        blind.estimate_kernel(np.zeros((64, 64, 3), np.float32), settings)
    with pytest.raises(ValueError, match="odd"):
        _settings(max_kernel_size=10)
    photo_settings = photo.settings_from_config(configs.load("photo"))
    with pytest.raises(ValueError, match="does not fit"):
        photo.deblur_uniform(np.zeros((12, 12, 1), np.float32), photo_settings)
    with pytest.raises(ValueError, match=r"\(H, W, 1\) or \(H, W, 3\)"):
        photo.deblur_uniform(np.zeros((64, 64, 4), np.float32), photo_settings)


def test_photo_config_fields_are_exact():
    config = configs.load("photo")
    config.estimation.unknown_field = 1
    with pytest.raises(ValueError, match="unknown_field"):
        photo.settings_from_config(config)
    config = configs.load("photo")
    del config.restoration["alpha"]
    with pytest.raises(ValueError, match="alpha"):
        photo.settings_from_config(config)
