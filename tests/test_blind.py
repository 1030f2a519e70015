"""Tests for jaxdeblur.blind (coarse-to-fine kernel estimation) and jaxdeblur.photo."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from scipy import ndimage

from jaxdeblur import blind, blur, configs, deconv, metrics, photo


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


def _fit_problem(kernel: np.ndarray, noise: float, fraction: float):
    """(selected sharp gradients, blurry canvas) of a 96² crop blurred by ``kernel``."""
    blurry, sharp = _blurred(kernel, 96, noise=noise)
    pad = (blur.next_fast_len(96 + kernel.shape[0]) - 96,) * 2
    canvas = blind.periodic_extension(jnp.asarray(blurry), pad)
    latent = blind.periodic_extension(jnp.asarray(sharp), pad)
    return (blind.select_gradients(latent, kernel.shape[0], fraction=jnp.float32(fraction)),
            canvas)


def test_fit_kernel_recovers_the_kernel_from_the_sharp_image():
    kernel = _stroke(11)
    gradients, canvas = _fit_problem(kernel, 0.0, 1e6)  # all pixels
    raw = blind.fit_kernel(gradients, canvas, 11, reg=1e-3, iterations=100,
                           init=jnp.zeros((11, 11)))
    estimate = blind.clean_kernel(np.asarray(raw), threshold=0.05, min_component=0.1)
    assert abs(estimate.sum() - 1) < 1e-5 and estimate.min() >= 0
    # convention: the asymmetric kernel is recovered unflipped (its flip scores 0.85)
    assert _padded_cosine(estimate, kernel) > 0.97
    assert _padded_cosine(estimate, kernel[::-1, ::-1]) < 0.9


def test_nonnegative_kernel_fit_is_feasible_and_fits_better_than_clipping():
    kernel = _stroke(11)
    gradients, canvas = _fit_problem(kernel, 0.01, 2.0)
    kwargs = dict(reg=20.0, iterations=20, init=jnp.zeros((11, 11)))
    unconstrained = blind.fit_kernel(gradients, canvas, 11, **kwargs)
    projected = blind.fit_kernel(gradients, canvas, 11, nonneg_iterations=100, **kwargs)
    assert float(jnp.min(unconstrained)) < 0 <= float(jnp.min(projected))

    def objective(k):   # the fit's own objective, by direct convolution
        kx = [blur.conv(g[..., None], k, boundary="circular")[..., 0] for g in gradients]
        ys = deconv.circular_gradients(canvas)
        return sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(kx, ys)) + \
            20.0 * float(jnp.sum(k ** 2))

    # the constrained optimum beats the unconstrained one clipped at zero
    assert objective(projected) < objective(jnp.maximum(unconstrained, 0))
    estimate = blind.clean_kernel(np.asarray(projected), threshold=0.1, min_component=0.1)
    assert _padded_cosine(estimate, kernel) > 0.9


def test_centring_a_kernel_drops_taps_past_the_edge_instead_of_wrapping_them():
    k = np.zeros((9, 9))
    k[4, 7:9] = [0.5, 0.4]           # the path at the right edge ...
    k[4, 0] = 0.1                     # ... and a faint tap at the far left
    centred = blind.centre_kernel(k)  # shifted 3 left: the faint tap leaves the window
    assert centred[:, 6:].sum() == 0 and centred[4, 0] == 0   # wrapped, it would be at col 6
    assert centred[4, 4:6] == pytest.approx([0.5 / 0.9, 0.4 / 0.9])
    assert centred.sum() == pytest.approx(k.sum())
    assert np.array_equal(blind.centre_kernel(centred), centred)   # centred stays put


def test_coarse_to_fine_recovers_a_known_kernel():
    kernel = _stroke(9)
    blurry, _ = _blurred(kernel, 96)
    settings = _settings(max_kernel_size=11, coarsest_kernel=7)
    estimate = blind.estimate_kernel(blurry, settings)
    assert [size for _, size in estimate.levels] == [9, 11]            # two levels
    assert _padded_cosine(estimate.kernel, kernel) > 0.85
    assert estimate.kernel.min() >= 0 and abs(estimate.kernel.sum() - 1) < 1e-5


def test_the_last_fit_keeps_fainter_taps_of_a_path_only():
    kernel = _stroke(9)
    blurry, _ = _blurred(kernel, 96)
    run = lambda **c: blind.estimate_kernel(blurry, _settings(  # noqa: E731
        max_kernel_size=11, coarsest_kernel=7, **c)).full_kernel
    strict = run(final_threshold=0.1)                 # off: every fit at threshold 0.1
    path = run(final_threshold=0.02, final_max_spread=5.5)
    diffuse = run(final_threshold=0.02, final_max_spread=0.5)   # treated as diffuse
    np.testing.assert_allclose(diffuse, strict, atol=1e-6)
    assert (path > 0).sum() > (strict > 0).sum()      # the faint taps are kept ...
    # ... and they are all the last fit changed: cleaned at 0.1 it is the strict estimate
    settings = photo.settings_from_config(configs.load("photo"))
    recleaned = blind.clean_kernel(path, threshold=0.1, min_component=0.1)
    assert metrics.kernel_cosine_similarity(recleaned, strict, max_shift=1) > 0.999
    assert photo.estimate_spread(path, settings) == pytest.approx(
        photo.estimate_spread(strict, settings), abs=0.2)
    with pytest.raises(ValueError, match="final_threshold"):
        _settings(final_threshold=0.2)


def test_polishing_brings_an_estimate_closer_to_the_kernel():
    """`blind.polish_kernel`: alternations at full resolution with a light L0 weight, from a
    finished estimate, thin what the cartoon latent fattened."""
    kernel = _stroke(9)
    blurry, _ = _blurred(kernel, 96)
    settings = _settings(max_kernel_size=11, coarsest_kernel=7)
    estimate = blind.estimate_kernel(blurry, settings)
    calls = []
    polished = blind.polish_kernel(blurry, estimate.full_kernel, settings,
                                   progress=lambda i, n: calls.append((i, n)))
    assert calls == [(i, settings.polish_iterations) for i in range(settings.polish_iterations)]
    # measured 0.876 -> 0.908 (noise 0.005; 0.906 with 10 iterations)
    assert _padded_cosine(polished.kernel, kernel) > _padded_cosine(estimate.kernel, kernel) + 0.01
    assert polished.kernel.min() >= 0 and abs(polished.kernel.sum() - 1) < 1e-5
    # from a thick start (the stroke under a 3x3 box): measured 0.585 -> 0.726 (0.637 with 10)
    fat = ndimage.uniform_filter(np.pad(kernel, 1).astype(np.float64), 3, mode="constant")
    fat = (fat / fat.sum()).astype(np.float32)
    assert _padded_cosine(blind.polish_kernel(blurry, fat, settings).kernel, kernel) > \
        _padded_cosine(fat, kernel) + 0.03
    off = blind.polish_kernel(blurry, fat, dataclasses.replace(settings, polish_iterations=0))
    np.testing.assert_array_equal(off.full_kernel, fat)
    with pytest.raises(ValueError, match="full 11x11"):
        blind.polish_kernel(blurry, fat[1:-1, 1:-1], settings)
    with pytest.raises(ValueError, match="polish_lambda"):
        _settings(polish_lambda=0.0)


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


def test_dark_pixels_are_the_window_minima():
    """`dark_pixels` marks exactly the pixels some window takes its minimum from (brute
    force: every window's argmin, windows clipped at the border)."""
    rng = np.random.default_rng(3)
    image = rng.random((23, 19)).astype(np.float32)
    patch = 5
    r = patch // 2
    expected = np.zeros(image.shape, bool)
    for i in range(image.shape[0]):
        for j in range(image.shape[1]):
            window = image[max(0, i - r):i + r + 1, max(0, j - r):j + r + 1]
            a, b = np.unravel_index(np.argmin(window), window.shape)
            expected[max(0, i - r) + a, max(0, j - r) + b] = True
    got = np.asarray(blind.dark_pixels(jnp.asarray(image), patch))
    np.testing.assert_array_equal(got, expected)


def test_dark_channel_term_darkens_the_latent_and_can_be_off():
    """With ``dark_weight = 0`` the latent is the plain L0-gradient one; with the term on,
    the blurred dark channel (lifted by the blur) comes back towards 0."""
    sharp = np.full((64, 64), 0.6, np.float32)
    sharp[20:44, 20:44] = 0.05
    kernel = _stroke(7)
    blurry = np.asarray(blur.conv(jnp.asarray(sharp)[..., None], jnp.asarray(kernel),
                                  boundary="circular"))[..., 0]
    args = dict(lam=jnp.float32(4e-3), beta_max=1e5, num_beta=jnp.int32(25))
    plain = blind.l0_latent(jnp.asarray(blurry), jnp.asarray(kernel), **args)
    off = blind.l0_latent(jnp.asarray(blurry), jnp.asarray(kernel), **args,
                          dark_weight=jnp.float32(0), dark_patch=5,
                          dark_beta_init=jnp.float32(1.0), num_dark=jnp.int32(4))
    np.testing.assert_array_equal(np.asarray(off), np.asarray(plain))
    on = blind.l0_latent(jnp.asarray(blurry), jnp.asarray(kernel), **args,
                         dark_weight=jnp.float32(4e-2), dark_patch=5,
                         dark_beta_init=jnp.float32(0.16), num_dark=jnp.int32(6))
    assert np.isfinite(np.asarray(on)).all()
    dark = lambda x: float(np.asarray(x)[22:42, 22:42].mean())  # noqa: E731
    assert dark(on) < dark(plain)


def test_kernel_field_follows_a_blur_that_changes_across_the_photo():
    """A photo whose left and right halves are blurred by different strokes (a filter flow
    of two cells): the field path refines each cell's kernel from the photo's and beats
    the single kernel where the blur differs."""
    size, k = 192, 11
    left, right = _stroke(k), _stroke(k).T.copy()
    m = 2 * k        # the flow zero-pads the frame: blur a larger scene, keep its middle
    big = skimage.data.camera()[60:60 + size + 2 * m, 100:100 + size + 2 * m] / 255.0
    geometry = blur.eff_windows(big.shape, (1, 2), k)
    blurry = np.asarray(blur.filter_flow_blur(
        jnp.asarray(big, jnp.float32)[..., None], jnp.asarray(np.stack([left, right])),
        geometry))[m:-m, m:-m, 0]
    scene = big[m:-m, m:-m].astype(np.float32)
    blurry = np.clip(blurry + 0.003 * np.random.default_rng(1).standard_normal(blurry.shape),
                     0, 1).astype(np.float32)
    # the single kernel unpolished: the one the cells start from (the field is not polished)
    base = photo.settings_from_config(configs.load(
        "photo", ["kernel_size=21", "estimation.iterations=6", "field_levels=1",
                  "field_crop=128", "candidates=((0.15, 0),)",
                  "estimation.polish_iterations=0"]))
    uniform = photo.deblur_uniform(blurry[..., None], base)
    field = photo.deblur_uniform(blurry[..., None],
                                 dataclasses.replace(base, field_grid=(1, 2)))
    assert field.kernels.shape[0] == 2 and np.allclose(field.kernels.sum((1, 2)), 1)
    assert (field.kernels >= 0).all() and field.centres.shape == (2, 2)
    assert field.centres[0, 1] < field.centres[1, 1]            # left cell first
    assert _padded_cosine(field.kernels[0], left) > _padded_cosine(field.kernels[1], left)
    assert _padded_cosine(field.kernels[1], right) > _padded_cosine(field.kernels[0], right)

    def psnr(x, columns):
        return float(metrics.psnr(jnp.asarray(x[12:-12, columns]),
                                  jnp.asarray(scene[12:-12, columns, None])))

    halves = (slice(12, size // 2), slice(size // 2, -12))
    gains = [psnr(field.restored, h) - psnr(uniform.restored, h) for h in halves]
    print(f"blurry {psnr(blurry[..., None], slice(12, -12)):.2f} dB, one kernel "
          f"{psnr(uniform.restored, slice(12, -12)):.2f} dB, field "
          f"{psnr(field.restored, slice(12, -12)):.2f} dB; the field's gain per half "
          f"{gains[0]:+.2f} / {gains[1]:+.2f} dB")
    # Measured: the one kernel follows the right stroke (cosine 0.81 to it, 0.49 to the
    # left); the field gains 1.86 dB on the left half and gives up 0.14 on the right
    # (whole image 25.54 → 26.14 dB; the true field: 32.74). Per half, so that the margin
    # does not hang on which stroke the single kernel happens to follow.
    assert max(gains) > 1.0 and min(gains) > -0.5


def test_a_diffuse_estimate_leaves_the_photo_unchanged_with_a_warning():
    """A shake path has few taps per pixel of its side, a cloud many; a photo whose estimate
    is a cloud comes back unchanged, with a warning that says what to try."""
    line = np.zeros((15, 15), np.float32)
    line[7, 2:13] = 1
    cloud = np.random.default_rng(0).random((15, 15)).astype(np.float32)
    assert photo.kernel_spread(line) < 1 < 8 < photo.kernel_spread(cloud)
    blurry, _ = _blurred(_stroke(9), 64)
    settings = dataclasses.replace(
        photo.settings_from_config(configs.load("photo", ["kernel_size=13",
                                                          "estimation.iterations=2"])),
        max_kernel_spread=0.01)
    result = photo.deblur_uniform(blurry[..., None], settings)
    np.testing.assert_array_equal(result.restored[..., 0], blurry)
    assert "returned unchanged" in result.warning and "kernel_size" in result.warning


def test_an_estimate_in_several_pieces_is_not_used(monkeypatch):
    """A camera path is one connected piece; two strokes apart are not one blur."""
    path = _stroke(15)
    two = np.zeros((15, 15), np.float32)
    two[2, 2:7] = 1
    two[10:14, 11] = 1
    diagonal = np.eye(15, dtype=np.float32)          # 8-neighbours: one piece
    assert [photo.kernel_pieces(k) for k in (path, two, diagonal)] == [1, 2, 1]
    blurry, _ = _blurred(_stroke(9), 64)
    settings = photo.settings_from_config(configs.load("photo", ["kernel_size=13",
                                                                 "estimation.iterations=2"]))
    monkeypatch.setattr(photo, "kernel_pieces", lambda kernel: 2)
    result = photo.deblur_uniform(blurry[..., None], settings)
    np.testing.assert_array_equal(result.restored[..., 0], blurry)
    assert "2 separate pieces" in result.warning and "returned unchanged" in result.warning
    with pytest.raises(ValueError, match="max_kernel_pieces"):
        dataclasses.replace(settings, max_kernel_pieces=0)


def test_the_restoration_weight_follows_the_noise():
    """`photo.restoration_weight`: the floor on a clean photo (a higher one for a JPEG),
    noise_weight · σ on a noisy one, the fixed weight when noise_weight is 0; with the
    true kernel the adapted weight restores both a clean and a noisy photo better than one
    fixed weight does."""
    kernel = _stroke(11)
    settings = photo.settings_from_config(configs.load("photo"))
    r = settings.restoration
    fixed = dataclasses.replace(settings, restoration=dataclasses.replace(r, noise_weight=0.0))
    for noise, expected in ((0.001, r.min_weight), (0.02, r.noise_weight * 0.02)):
        blurry, sharp = _blurred(kernel, 128, noise=noise)
        weight, sigma = photo.restoration_weight(blurry[..., None], settings)
        assert weight == pytest.approx(expected, rel=0.1)
        # (measured) 0.0020 (the edges left in the blurred scene) and 0.0201.
        assert sigma < 0.003 if noise < 0.002 else sigma == pytest.approx(noise, rel=0.1)
        assert photo.restoration_weight(blurry[..., None], fixed)[0] == r.weight
        lossy = photo.restoration_weight(blurry[..., None], settings, lossy=True)[0]
        assert lossy == max(r.lossy_min_weight, weight)
        adapted = photo.restore(blurry[..., None], kernel, settings)[0][..., 0]
        constant = photo.restore(blurry[..., None], kernel, fixed)[0][..., 0]
        # (measured) σ 0.001: 36.07 vs 34.03 dB; σ 0.02: 29.67 vs 27.81 dB.
        assert metrics.psnr(adapted, sharp) > metrics.psnr(constant, sharp) + 1.0


def test_the_sharpest_of_several_estimates_is_kept():
    """Normalised sparsity (L1/L2 of the gradients) is lower for the sharp image than for
    the blurry one, and lower for the restoration with the true kernel than with a wrong
    one; `deblur_uniform` makes each distinct candidate estimate and keeps the lowest."""
    kernel = _stroke(11)
    blurry, sharp = _blurred(kernel, 96)
    score = photo.normalized_sparsity
    assert score(sharp) < score(blurry)
    settings = photo.settings_from_config(configs.load(
        "photo", ["kernel_size=15", "estimation.iterations=4",
                  "candidates=((0.15, 0), (0.2, 0), (0.15, 50))"]))
    right = photo.restore(blurry[..., None], kernel, settings)[0][..., 0]
    wrong = photo.restore(blurry[..., None], kernel.T.copy(), settings)[0][..., 0]
    assert score(right) < score(wrong)
    result = photo.deblur_uniform(blurry[..., None], settings)
    # kernel_size is given: the two fractions are one estimate, the non-negative fit another
    assert len(result.scores) == 2 and None not in result.scores
    assert result.chosen == int(np.argmin(result.scores))
    assert _padded_cosine(result.kernel, kernel) > 0.8
