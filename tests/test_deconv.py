"""Tests of jaxdeblur.deconv: the w-step, dense references, restoration, filter flow, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import skimage.data

from jaxdeblur import blur, deconv, kernels


def _l_kernel():
    """A 15×15 L-shaped stroke: no symmetry, off-centre mass, so a flip error shows."""
    kernel = np.zeros((15, 15), np.float32)
    kernel[4, 2:12] = np.linspace(1.0, 2.0, 10)
    kernel[4:13, 11] = 2.0
    kernel[12, 11:14] = 1.0
    return jnp.asarray(kernel / kernel.sum())


def _psnr(x, y, band=None):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if band is not None:
        keep = np.ones(x.shape[:2], bool)
        keep[band:-band, band:-band] = False
        x, y = x[keep], y[keep]
    return 10.0 * math.log10(1.0 / np.mean((x - y) ** 2))


def _camera_scene(kernel_size, size=128, sigma=0.01, seed=0):
    """(sharp (size, size, 1), the larger scene around it, noise of std sigma): camera.

    The blurry images of the tests are the 'valid' blur of the larger scene, the same size
    as the sharp crop: what a camera records, with no assumption about the border.
    """
    r = kernel_size // 2
    scene = skimage.data.camera()[40:40 + size + 2 * r, 190:190 + size + 2 * r, None]
    scene = jnp.asarray(scene / 255.0, jnp.float32)
    noise = sigma * jax.random.normal(jax.random.PRNGKey(seed), (size, size, 1))
    return scene[r:-r, r:-r], scene, noise


# --------------------------------------------------------------------------------------
# The w-step and the schedule.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 2.0 / 3.0, 0.8, 1.0, 2.0])
@pytest.mark.parametrize("beta", [1.0, 8.0, 181.0, 1e4])
def test_shrink_is_the_global_minimiser(alpha, beta):
    v = np.linspace(-1.5, 1.5, 301).astype(np.float32)
    w = np.asarray(jax.jit(lambda v: deconv.shrink(v, beta=beta, alpha=alpha,
                                                   newton_iterations=3))(v), np.float64)
    grid = np.linspace(-1.6, 1.6, 64001)[None, :]
    objective = lambda w: np.abs(w) ** alpha + beta / 2 * (w - v[:, None].astype(np.float64)) ** 2
    best = objective(grid).min(axis=1)
    assert np.all(np.isfinite(w))
    assert np.all(objective(w[:, None])[:, 0] <= best + 1e-6)


def test_beta_schedule_is_krishnan_fergus():
    betas = deconv.beta_schedule(beta_init=1.0, beta_max=256.0, beta_rate=2 * math.sqrt(2))
    np.testing.assert_allclose(betas, [2 ** (1.5 * i) for i in range(6)], rtol=1e-12)


# --------------------------------------------------------------------------------------
# (a) Against a dense least-squares reference on the same extended canvas.
# --------------------------------------------------------------------------------------

_TINY_HW, _TINY_MARGIN = (12, 12), 1


def _tiny_problem():
    rng = np.random.default_rng(0)
    kernel = rng.random((5, 5)) ** 3
    kernel[0, :] += 0.5  # asymmetric: the top row dominates
    kernel = (kernel / kernel.sum()).astype(np.float32)
    blurry = rng.random(_TINY_HW + (2,)).astype(np.float32)
    return blurry, kernel


def _dense_operators(kernel, canvas, image_hw):
    """Dense matrices on the periodic canvas: blur (correlation, y at the origin), the mask
    (a 0/1 vector), forward differences along rows (h) and columns (v). Written from the definition
    y[p] = Σ_ij k[i, j] x[p + (i − rh, j − rw)], independent of the library's FFTs."""
    n1, n2 = canvas
    kh, kw = kernel.shape
    index = np.arange(n1 * n2).reshape(n1, n2)
    blur_matrix = np.zeros((n1 * n2, n1 * n2))
    d_h = np.zeros_like(blur_matrix)
    d_v = np.zeros_like(blur_matrix)
    for p1 in range(n1):
        for p2 in range(n2):
            row = index[p1, p2]
            for i in range(kh):
                for j in range(kw):
                    blur_matrix[row, index[(p1 + i - kh // 2) % n1, (p2 + j - kw // 2) % n2]] += (
                        kernel[i, j])
            d_h[row, index[p1, (p2 + 1) % n2]] += 1.0
            d_h[row, row] -= 1.0
            d_v[row, index[(p1 + 1) % n1, p2]] += 1.0
            d_v[row, row] -= 1.0
    mask = np.zeros(canvas)
    mask[:image_hw[0], :image_hw[1]] = 1.0
    return blur_matrix, mask.ravel(), d_h, d_v


def _periodic_extension(image, canvas):
    h, w = image.shape
    rows = [(1 - t) * image[-1] + t * image[0]
            for t in np.arange(1, canvas[0] - h + 1) / (canvas[0] - h + 1)]
    image = np.concatenate([image, np.array(rows).reshape(-1, w)], axis=0)
    cols = [(1 - t) * image[:, -1] + t * image[:, 0]
            for t in np.arange(1, canvas[1] - w + 1) / (canvas[1] - w + 1)]
    return np.concatenate([image, np.array(cols).T.reshape(canvas[0], -1)], axis=1)


def test_dense_reference_is_the_repo_blur_convention():
    blurry, kernel = _tiny_problem()
    canvas = deconv.canvas_shape(_TINY_HW, kernel.shape, _TINY_MARGIN)
    blur_matrix, mask, _, _ = _dense_operators(kernel, canvas, _TINY_HW)
    latent = np.random.default_rng(1).random(canvas)
    dense = (blur_matrix @ latent.ravel()).reshape(canvas)[:_TINY_HW[0], :_TINY_HW[1]]
    # The pixels the masked data term reads: rows −2 .. H + 1 of the periodic canvas.
    extended = np.roll(latent, (2, 2), axis=(0, 1))[:_TINY_HW[0] + 4, :_TINY_HW[1] + 4]
    expected = blur.conv(jnp.asarray(extended[..., None], jnp.float32), jnp.asarray(kernel),
                         boundary="valid", method="direct")[..., 0]
    np.testing.assert_allclose(dense, expected, atol=1e-6)


def test_uniform_hqs_with_alpha_2_equals_dense_hqs():
    """alpha = 2 makes every w-step linear and every x-step a least-squares problem: the
    solver's iterates must equal exact dense solves of the same x-subproblems."""
    blurry, kernel = _tiny_problem()
    weight = 0.05
    betas = deconv.beta_schedule(beta_init=1.0, beta_max=64.0, beta_rate=4.0)
    canvas = deconv.canvas_shape(_TINY_HW, kernel.shape, _TINY_MARGIN)
    blur_matrix, mask, d_h, d_v = _dense_operators(kernel, canvas, _TINY_HW)
    data_normal = blur_matrix.T @ (mask[:, None] * blur_matrix)
    gradient_normal = d_h.T @ d_h + d_v.T @ d_v
    y = np.zeros(canvas + blurry.shape[-1:])
    y[:_TINY_HW[0], :_TINY_HW[1]] = blurry
    data_rhs = blur_matrix.T @ (mask[:, None] * y.reshape(-1, blurry.shape[-1]))
    x = np.stack([_periodic_extension(blurry[..., c].astype(np.float64), canvas).ravel()
                  for c in range(blurry.shape[-1])], -1)
    for beta in betas:
        factor = scipy.linalg.cho_factor(data_normal + weight * beta * gradient_normal)
        for _ in range(2):
            w_h, w_v = beta / (beta + 2) * (d_h @ x), beta / (beta + 2) * (d_v @ x)
            x = scipy.linalg.cho_solve(factor,
                                       data_rhs + weight * beta * (d_h.T @ w_h + d_v.T @ w_v))
    expected = x.reshape(canvas + blurry.shape[-1:])[:_TINY_HW[0], :_TINY_HW[1]]
    restored = deconv.uniform(jnp.asarray(blurry), jnp.asarray(kernel), weight=weight, alpha=2.0,
                              beta_init=1.0, beta_max=64.0, beta_rate=4.0, inner_iterations=2,
                              cg_iterations=60, margin=_TINY_MARGIN)
    # Measured 5.7e-7 (float32 PCG against float64 solves).
    np.testing.assert_allclose(restored, expected, atol=1e-5)


def test_uniform_with_alpha_2_minimises_the_dense_objective():
    """At one β the alternation converges to the minimiser over x of
    1/2 ||M(k ⋆ x) − y||² + weight · β/(β + 2) · ||∇x||² (w minimised out)."""
    blurry, kernel = _tiny_problem()
    weight, beta = 0.05, 1.0
    canvas = deconv.canvas_shape(_TINY_HW, kernel.shape, _TINY_MARGIN)
    blur_matrix, mask, d_h, d_v = _dense_operators(kernel, canvas, _TINY_HW)
    system = (blur_matrix.T @ (mask[:, None] * blur_matrix)
              + 2 * weight * beta / (beta + 2) * (d_h.T @ d_h + d_v.T @ d_v))
    y = np.zeros(canvas + blurry.shape[-1:])
    y[:_TINY_HW[0], :_TINY_HW[1]] = blurry
    x = np.linalg.solve(system, blur_matrix.T @ (mask[:, None] * y.reshape(-1, y.shape[-1])))
    expected = x.reshape(canvas + blurry.shape[-1:])[:_TINY_HW[0], :_TINY_HW[1]]
    restored = deconv.uniform(jnp.asarray(blurry), jnp.asarray(kernel), weight=weight, alpha=2.0,
                              beta_init=beta, beta_max=1.5 * beta, beta_rate=2.0,
                              inner_iterations=40, cg_iterations=40, margin=_TINY_MARGIN)
    # Measured 7.3e-7.
    np.testing.assert_allclose(restored, expected, atol=1e-5)


# --------------------------------------------------------------------------------------
# (b) Restoration of a camera scene with the true kernel.
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def camera_scene():
    kernel = _l_kernel()
    sharp, scene, noise = _camera_scene(kernel.shape[0])
    blurry = blur.conv(scene, kernel, boundary="valid") + noise
    return sharp, blurry, kernel


def test_uniform_restores_a_camera_scene_without_border_ringing(camera_scene):
    sharp, blurry, kernel = camera_scene
    restored = deconv.uniform(blurry, kernel, weight=1e-3, alpha=0.8)
    assert restored.shape == sharp.shape and restored.dtype == jnp.float32
    # Measured: blurry 20.35 dB (border band 19.81), restored 31.00 dB (band 28.64).
    assert _psnr(restored, sharp) >= _psnr(blurry, sharp) + 9.1
    assert _psnr(restored, sharp, band=10) >= _psnr(blurry, sharp, band=10) + 7.3
    # The flipped kernel (a convolution instead of the repo's correlation) must fail:
    # measured 17.1 dB, below the blurry input.
    flipped = deconv.uniform(blurry, blur.flip_kernel(kernel), weight=1e-3, alpha=0.8)
    assert _psnr(flipped, sharp) < _psnr(blurry, sharp)


def test_uniform_channels_are_independent_and_vmap(camera_scene):
    _, blurry, kernel = camera_scene
    first, second = blurry[:48, :40], 1.0 - blurry[:48, :40]
    settings = dict(weight=1e-3, alpha=0.8, cg_iterations=4)
    pairs = jnp.stack([jnp.concatenate([first, second], -1),
                       jnp.concatenate([second, first], -1)])
    batched = jax.vmap(lambda y: deconv.uniform(y, kernel, **settings))(pairs)
    alone = [deconv.uniform(y, kernel, **settings)[..., 0] for y in (first, second)]
    np.testing.assert_allclose(batched[..., 0], np.stack(alone), atol=1e-5)
    np.testing.assert_allclose(batched[..., 1], np.stack(alone[::-1]), atol=1e-5)


def test_estimate_noise_per_channel_on_blurred_photos():
    """Immerkær's estimator recovers the noise of a blurred photo within 10% for σ from
    0.005 to 0.02, channel by channel, and rejects what is not an (H, W, C) image."""
    kernel = _l_kernel()
    _, scene, _ = _camera_scene(kernel.shape[0])
    clean = blur.conv(scene, kernel, boundary="valid")
    noise = jax.random.normal(jax.random.PRNGKey(3), clean.shape[:2] + (3,))
    sigmas = jnp.asarray([0.005, 0.01, 0.02])
    estimate = deconv.estimate_noise(clean + sigmas * noise)
    assert estimate.shape == (3,)
    np.testing.assert_allclose(estimate, sigmas, rtol=0.1)
    # The blurred scene alone: the content left over is well below 0.005.
    assert float(deconv.estimate_noise(clean)[0]) < 0.002
    for bad in (jnp.zeros((8, 8)), jnp.zeros((2, 8, 1))):
        with pytest.raises(ValueError, match="at least 3x3"):
            deconv.estimate_noise(bad)


# --------------------------------------------------------------------------------------
# (c) Filter flow.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["mask_first", "mask_after"])
def test_valid_filter_flow_adjoint_dot_product(order):
    geometry = blur.eff_windows((24, 32), (2, 3), 7)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    kernels_ = jax.random.uniform(keys[0], (geometry.num_patches, 5, 7))
    latent = jax.random.normal(keys[1], (28, 38, 2))
    blurry = jax.random.normal(keys[2], (24, 32, 2))
    forward = deconv.valid_filter_flow_blur(latent, kernels_, geometry, order=order)
    adjoint = deconv.valid_filter_flow_blur_adjoint(blurry, kernels_, geometry, order=order)
    assert forward.shape == blurry.shape and adjoint.shape == latent.shape
    lhs, rhs = jnp.vdot(forward, blurry), jnp.vdot(latent, adjoint)
    assert abs(lhs - rhs) <= 1e-5 * abs(lhs)


def test_valid_filter_flow_of_one_kernel_is_valid_conv():
    geometry = blur.eff_windows((24, 32), (1, 1), 7)
    kernel = _l_kernel()[3:10, 5:14:2]
    latent = jax.random.uniform(jax.random.PRNGKey(1), (30, 36, 1))
    np.testing.assert_allclose(
        deconv.valid_filter_flow_blur(latent, kernel[None], geometry),
        blur.conv(latent, kernel, boundary="valid"), atol=1e-5)


def test_filter_flow_with_one_kernel_agrees_with_uniform(camera_scene):
    sharp, blurry, kernel = camera_scene
    geometry = blur.eff_windows(blurry.shape, (2, 2), kernel.shape[0])
    kernels_ = jnp.broadcast_to(kernel, (geometry.num_patches,) + kernel.shape)
    by_cells = deconv.filter_flow(blurry, kernels_, geometry, weight=1e-3, alpha=0.8)
    by_fft = deconv.uniform(blurry, kernel, weight=1e-3, alpha=0.8)
    # Measured 67.0 dB between the two in the interior (they differ at the borders:
    # Neumann vs periodic gradients of the latent) and 20.35 -> 31.06 dB against sharp.
    assert _psnr(by_cells[16:-16, 16:-16], by_fft[16:-16, 16:-16]) > 60.0
    assert _psnr(by_cells, sharp) > _psnr(blurry, sharp) + 9.2


def test_filter_flow_restores_a_spatially_varying_blur():
    sharp, scene, noise = _camera_scene(15, seed=1)
    geometry = blur.eff_windows(sharp.shape, (2, 2), 15)
    kernels_ = jnp.stack([kernels.line_kernel(15, 12.0, a) for a in (0.0, 0.8, 1.6, 2.4)])
    blurry = deconv.valid_filter_flow_blur(scene, kernels_, geometry) + noise
    restored = deconv.filter_flow(blurry, kernels_, geometry, weight=1e-3, alpha=0.8)
    # Measured: blurry 24.29 dB, restored 28.33 dB (band 23.52 -> 27.11 dB); the uniform
    # solver with the mean kernel only reaches 23.46 dB.
    assert _psnr(restored, sharp) >= _psnr(blurry, sharp) + 2.5
    assert _psnr(restored, sharp, band=10) >= _psnr(blurry, sharp, band=10) + 2.1


# --------------------------------------------------------------------------------------
# (d) Bad input.
# --------------------------------------------------------------------------------------

_GOOD = dict(weight=1e-3, alpha=0.8)


@pytest.mark.parametrize("blurry, kernel, settings, message", [
    (np.zeros((8, 8, 1), np.float32), np.ones((9, 9), np.float32) / 81, {}, "larger than"),
    (np.zeros((16, 16, 1), np.float32), np.ones((4, 4), np.float32) / 16, {}, "odd"),
    (np.full((16, 16, 1), np.nan, np.float32), np.ones((3, 3), np.float32) / 9, {}, "NaN"),
    (np.zeros((16, 16, 1), np.float32), np.full((3, 3), np.nan, np.float32), {}, "NaN"),
    (np.zeros((16, 16), np.float32), np.ones((3, 3), np.float32) / 9, {}, r"\(H, W, C\)"),
    (np.zeros((2, 16, 16, 1), np.float32), np.ones((3, 3), np.float32) / 9, {}, "vmap"),
    (np.zeros((16, 16, 1), np.float32), np.ones((1, 3, 3), np.float32) / 9, {}, r"\(kh, kw\)"),
    (np.zeros((16, 16, 1), np.int32), np.ones((3, 3), np.float32) / 9, {}, "floating"),
    (np.zeros((16, 16, 1), np.float32), np.ones((3, 3), np.float32) / 9, {"alpha": 1.5},
     "alpha"),
    (np.zeros((16, 16, 1), np.float32), np.ones((3, 3), np.float32) / 9, {"weight": 0.0},
     "weight"),
    (np.zeros((16, 16, 1), np.float32), np.ones((3, 3), np.float32) / 9,
     {"cg_iterations": 0}, "cg_iterations"),
    (np.zeros((16, 16, 1), np.float32), np.ones((3, 3), np.float32) / 9,
     {"beta_max": 0.5}, "beta_max"),
])
def test_uniform_rejects_bad_input(blurry, kernel, settings, message):
    with pytest.raises(ValueError, match=message):
        deconv.uniform(blurry, kernel, **{**_GOOD, **settings})


def test_filter_flow_rejects_bad_input():
    geometry = blur.eff_windows((32, 32), (2, 2), 7)
    blurry = jnp.zeros((32, 32, 1))
    with pytest.raises(ValueError, match="G = 4"):
        deconv.filter_flow(blurry, jnp.ones((3, 7, 7)) / 49, geometry, **_GOOD)
    with pytest.raises(ValueError, match="blur_size"):
        deconv.filter_flow(blurry, jnp.ones((4, 9, 9)) / 81, geometry, **_GOOD)
    with pytest.raises(ValueError, match="does not match"):
        deconv.filter_flow(jnp.zeros((32, 30, 1)), jnp.ones((4, 7, 7)) / 49, geometry, **_GOOD)
    with pytest.raises(ValueError, match="NaN"):
        deconv.filter_flow(blurry.at[3, 3].set(jnp.nan), jnp.ones((4, 7, 7)) / 49, geometry,
                           **_GOOD)
    with pytest.raises(ValueError, match="extend"):
        deconv.valid_filter_flow_blur(blurry, jnp.ones((4, 7, 7)) / 49, geometry)
