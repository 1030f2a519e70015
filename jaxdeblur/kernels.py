"""Motion-kernel and kernel-field synthesis, and synthetic blurring with known ground truth.

Three generators, all pure JAX (``jit``/``vmap``-able, keyword-only ``key``):

* `motion_kernel` — one random camera-shake kernel ``(size, size)`` from the trajectory
  model of Boracchi & Foi (2012), as in their public generator (also used by DeblurGAN).
  Neither UFPNet nor Deep EM publishes its kernel generator (SPEC §2); this is ours.
  ``jax.vmap`` over keys draws batches.
* `kernel_field` — a smoothly varying per-pixel kernel field ``(H, W, size, size)``,
  either from a small camera rotation during the exposure (the homography
  ``K·R(t)·K⁻¹`` of Whyte et al. 2012 / Lai et al. 2016, exact per pixel), or by
  bilinearly interpolating a few `motion_kernel` draws over the image (cheaper, not
  physical).
* `synthesize_blur` — ``blurry = per_pixel_blur(sharp, field) + noise``.

Generators calibrated to measured camera shake (issue #16; `draw_kernel`, returning a
`KernelDraw` with the random quantities behind each kernel): Boracchi–Foi shakes with a
drawn exposure (`boracchi_foi_trajectory`), Gaussian-process trajectories
(`gaussian_process_trajectory`), smooth random splines (`spline_trajectory`) and their
mixture, each with a drawn length (`sample_length`) and the window fit of
`rasterise_trajectory`. Their numbers live in ``jaxdeblur/configs/flow_prior.py``
(`generator_config` reads them into frozen dataclasses); `kernel_sampler` is the flow
prior's data source. Measured kernels of any size are fitted into the same window by
`fit_kernel` and augmented by `kernel_variants`.

Every kernel follows the library's cross-correlation convention: entry ``(i, j)`` of the
kernel at pixel ``p`` weights the sharp pixel at ``p + (i - r, j - r)``, ``r = (k-1)/2``.
A trajectory point displaced by ``(dy, dx)`` from the pixel therefore lands at kernel
position ``(r + dy, r + dx)``; no flip is involved anywhere.

Trajectories are rasterised by bilinear splatting (`tent_splat`, a ``.at[].add`` scatter
of four corner shares per point, or the equivalent dense tent-matrix product for TPUs).
Bilinear splatting preserves mass and the first moment exactly (a point at ``y`` gives its
weight to ``floor(y)`` and ``floor(y)+1`` with mean ``y``), which is what makes exact
sub-pixel centring possible (`motion_path`).

References:
  G. Boracchi and A. Foi, "Modeling the performance of image restoration from motion
  blur", IEEE TIP 21(8), 2012 (trajectory model; their public MATLAB/Python generators
  give the default parameters used here).
  O. Whyte, J. Sivic, A. Zisserman, J. Ponce, "Non-uniform deblurring for shaken images",
  IJCV 98, 2012; W.-S. Lai, J.-B. Huang, Z. Hu, N. Ahuja, M.-H. Yang, "A comparative study
  for single image blind deblurring", CVPR 2016 (rotational camera shake).
  C. J. Schuler, M. Hirsch, S. Harmeling, B. Schölkopf, "Learning to deblur", IEEE TPAMI
  38(7), 2016 (Gaussian-process trajectories); A. Chakrabarti, "A neural approach to blind
  motion deblurring", ECCV 2016 (spline trajectories).
"""

import dataclasses
import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.interpolate

from jaxdeblur import configs
from jaxdeblur.blur import per_pixel_blur

# Exposure fractions of the public Boracchi-Foi generator: the PSF integrates the first
# 1%, 10%, 50% or 100% of the trajectory.
DEFAULT_EXPOSURES = (0.01, 0.1, 0.5, 1.0)

_HIGHEST = jax.lax.Precision.HIGHEST


def _check_kernel_size(size) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1 or size % 2 == 0:
        raise ValueError(
            f"kernel size must be a positive odd Python int (a static argument), got {size!r}; "
            "pass e.g. 19 or 31 and mark it static under jax.jit")
    return size


def _check_image_shape(image_shape) -> tuple[int, int]:
    shape = tuple(image_shape)
    if len(shape) not in (2, 3) or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(
            f"image_shape must be (H, W) or (H, W, C) positive Python ints, got {image_shape!r}")
    return shape[0], shape[1]


def tent_splat(points, weights, size: int, *, method: str = "scatter"):
    """Bilinearly splats weighted points onto a ``(size, size)`` grid.

    ``k[i, j] = Σ_t w_t · max(0, 1 - |y_t - i|) · max(0, 1 - |x_t - j|)``: every point
    gives its weight to the four pixels around it with bilinear shares.

    Args:
      points: ``(T, 2)`` float, ``(y, x)`` = (row, column) positions in grid pixels, inside
        ``[0, size - 1]`` (callers clip; with ``"scatter"`` outside points would be dropped
        or, for negative indices, wrap around).
      weights: ``(T,)`` float, non-negative.
      size: grid side (static).
      method: ``"scatter"`` accumulates the four corner shares with ``.at[].add`` (faster
        on the CPU: 76 ms against 169 ms for 1000 × 2000 points; not timed on GPUs);
        ``"matmul"`` computes the same sum as the dense product ``Aᵀ diag(w) B`` of
        tent-weight matrices ``A[t, i] = max(0, 1 - |y_t - i|)``, which suits TPUs, where
        scatters are slow. They agree to float rounding.

    Returns:
      ``(size, size)`` float32, non-negative, summing to ``Σ w``.
    """
    if points.ndim != 2 or points.shape[-1] != 2:
        raise ValueError(f"points must be (T, 2) (row, column), got shape {points.shape}")
    if weights.shape != points.shape[:1]:
        raise ValueError(
            f"weights must be (T,) = {points.shape[:1]}, got shape {weights.shape}")
    points = points.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    if method == "scatter":
        corner = jnp.floor(points)
        frac = points - corner
        corner = corner.astype(jnp.int32)
        # One spare row and column take the zero-weight right/bottom share of points that
        # sit exactly on the last pixel.
        grid = jnp.zeros((size + 1, size + 1), jnp.float32)
        for dy in (0, 1):
            for dx in (0, 1):
                share_y = frac[:, 0] if dy else 1.0 - frac[:, 0]
                share_x = frac[:, 1] if dx else 1.0 - frac[:, 1]
                grid = grid.at[corner[:, 0] + dy, corner[:, 1] + dx].add(
                    weights * share_y * share_x)
        return grid[:size, :size]
    if method == "matmul":
        grid = jnp.arange(size, dtype=jnp.float32)
        rows = jnp.maximum(0.0, 1.0 - jnp.abs(points[:, 0:1] - grid))
        cols = jnp.maximum(0.0, 1.0 - jnp.abs(points[:, 1:2] - grid))
        # HIGHEST keeps GPUs/TPUs from running this product in TF32/bfloat16.
        return jnp.einsum("ti,tj->ij", rows * weights[:, None], cols, precision=_HIGHEST)
    raise ValueError(f"method must be 'scatter' or 'matmul', got {method!r}")


def shake_trajectory(key, *, n_steps: int = 2000, max_length: float = 60.0, anxiety=None,
                     big_shake_prob=None, centripetal=None, gaussian_shake=None):
    """Draws one random camera-shake trajectory (Boracchi & Foi 2012).

    A point with constant speed ``ℓ = max_length / (n_steps - 1)`` per step. Its velocity is
    updated with inertia, a Gaussian shake, a centripetal pull back to the start and rare
    impulsive jerks, then renormalised to speed ``ℓ`` (so the whole path is exactly
    ``max_length`` long)::

        dv_t = J_t + a · (g · n_t − c · x_t) · ℓ,   n_t ~ N(0, I₂)
        J_t  = 2 · rot(v_t, π + u_t − 1/2)  with probability p · a, else 0,   u_t ~ U(0, 1)
        v_{t+1} = ℓ · (v_t + dv_t) / |v_t + dv_t|,   x_{t+1} = x_t + v_{t+1},   x_0 = 0

    with anxiety ``a``, Gaussian shake ``g``, centripetal pull ``c`` and big-shake
    probability ``p``. The initial direction is uniform; the initial velocity is
    ``a · v̂₀`` as in the public generator (``ℓ · v̂₀`` when ``a = 0``).

    Args:
      key: PRNG key.
      n_steps: number of trajectory points ``T`` (static).
      max_length: path length in canvas pixels.
      anxiety: ``a``; None draws ``0.1 · U(0, 1)`` (public generator).
      big_shake_prob: ``p``; None draws ``0.2 · U(0, 1)``.
      centripetal: ``c``; None draws ``0.7 · U(0, 1)``.
      gaussian_shake: ``g``; None draws ``10 · U(0, 1)``.

    Returns:
      ``(T, 2)`` float32 positions ``(y, x)`` in canvas pixels, starting at the origin.
    """
    if not isinstance(n_steps, int) or n_steps < 2:
        raise ValueError(f"n_steps must be a Python int >= 2, got {n_steps!r}")
    keys = jax.random.split(key, 8)

    def draw(value, k, scale):
        if value is None:
            return scale * jax.random.uniform(k, dtype=jnp.float32)
        return jnp.asarray(value, jnp.float32)

    anxiety = draw(anxiety, keys[0], 0.1)
    big_shake_prob = draw(big_shake_prob, keys[1], 0.2)
    centripetal = draw(centripetal, keys[2], 0.7)
    gaussian_shake = draw(gaussian_shake, keys[3], 10.0)
    step = jnp.asarray(max_length, jnp.float32) / (n_steps - 1)
    angle0 = 2.0 * jnp.pi * jax.random.uniform(keys[4], dtype=jnp.float32)
    direction0 = jnp.stack([jnp.sin(angle0), jnp.cos(angle0)])
    velocity0 = direction0 * jnp.where(anxiety > 0, anxiety, step)

    # Everything random is drawn up front so the sequential scan body is a few multiply-adds.
    shake = (anxiety * gaussian_shake * step) * jax.random.normal(
        keys[5], (n_steps - 1, 2), jnp.float32)
    is_jerk = jax.random.uniform(keys[6], (n_steps - 1,), jnp.float32) < big_shake_prob * anxiety
    jerk_angle = jnp.pi + jax.random.uniform(keys[7], (n_steps - 1,), jnp.float32) - 0.5
    jerk_cos = jnp.where(is_jerk, 2.0 * jnp.cos(jerk_angle), 0.0)
    jerk_sin = jnp.where(is_jerk, 2.0 * jnp.sin(jerk_angle), 0.0)
    pull = anxiety * centripetal * step

    def advance(carry, inputs):
        position, velocity = carry
        noise, cos, sin = inputs
        # (y, x) stands for the complex number x + i·y of the public generator, so the jerk
        # 2·v·e^{iθ} is a rotation of the velocity by θ, scaled by 2.
        jerk = jnp.stack([velocity[1] * sin + velocity[0] * cos,
                          velocity[1] * cos - velocity[0] * sin])
        velocity = velocity + jerk + noise - pull * position
        # Renormalising to the step length; a velocity of exactly zero (probability zero)
        # would stay zero instead of producing NaNs.
        velocity = velocity * (step / jnp.maximum(jnp.linalg.norm(velocity), 1e-30))
        position = position + velocity
        return (position, velocity), position

    origin = jnp.zeros(2, jnp.float32)
    _, path = jax.lax.scan(advance, (origin, velocity0), (shake, jerk_cos, jerk_sin))
    return jnp.concatenate([origin[None], path], axis=0)


def motion_path(key, size: int, *, canvas: int = 64, n_steps: int = 2000,
                max_length: float = 60.0, exposure=None,
                exposures: Sequence[float] = DEFAULT_EXPOSURES, anxiety=None,
                big_shake_prob=None, centripetal=None, gaussian_shake=None):
    """Draws the exposed, centred trajectory that `motion_kernel` rasterises.

    The trajectory of `shake_trajectory` (canvas pixels) is weighted by the exposure:
    point ``t`` gets ``w_t = clip(e·(T−1) + 1 − t, 0, 1)``, so the first fraction ``e`` of
    the path is integrated (the last point partially). It is then translated so that its
    weighted centre of mass sits at the kernel centre ``r = (size−1)/2`` and scaled by

        s = min(size / canvas, (size − 1) / max_length)

    kernel pixels per canvas pixel. ``size / canvas`` rasterises as if the ``canvas``-pixel
    PSF of the public generator were resampled to ``size`` pixels; the second term only
    acts when ``max_length`` would not fit. Every point of a constant-speed path lies within
    half its (exposed) length of the path's centre of mass (``|x_s − x̄| ≤ mean_t |s − t|·ℓ``),
    so with this ``s`` every point is within ``r`` of the centre: long kernels are never
    clipped by the support, and centring is exact rather than an interpolated shift of the
    rasterised kernel.

    Args:
      key: PRNG key.
      size: kernel side, odd (static).
      canvas: side of the public generator's canvas, in canvas pixels; sets the scale.
      n_steps: trajectory points (static).
      max_length: trajectory length in canvas pixels.
      exposure: fraction of the trajectory integrated, in (0, 1]; None draws uniformly
        from ``exposures``.
      exposures: the choices for ``exposure=None`` (static).
      anxiety, big_shake_prob, centripetal, gaussian_shake: see `shake_trajectory`.

    Returns:
      ``(points, weights)``: ``(T, 2)`` float32 ``(row, column)`` positions in kernel pixels
      and ``(T,)`` float32 exposure weights.
    """
    _check_kernel_size(size)
    if not canvas > 0:
        raise ValueError(f"canvas must be positive, got {canvas!r}")
    trajectory_key, exposure_key = jax.random.split(key)
    path = shake_trajectory(trajectory_key, n_steps=n_steps, max_length=max_length,
                            anxiety=anxiety, big_shake_prob=big_shake_prob,
                            centripetal=centripetal, gaussian_shake=gaussian_shake)
    if exposure is None:
        exposure = jax.random.choice(exposure_key, jnp.asarray(exposures, jnp.float32))
    exposure = jnp.asarray(exposure, jnp.float32)
    end = exposure * (n_steps - 1)
    weights = jnp.clip(end + 1.0 - jnp.arange(n_steps, dtype=jnp.float32), 0.0, 1.0)
    centre_of_mass = jnp.sum(path * weights[:, None], axis=0) / jnp.sum(weights)
    scale = jnp.minimum(size / canvas, (size - 1) / jnp.asarray(max_length, jnp.float32))
    centre = (size - 1) / 2.0
    # The bound above keeps points inside; the clip only absorbs float rounding.
    points = jnp.clip((path - centre_of_mass) * scale + centre, 0.0, size - 1.0)
    return points, weights


def motion_kernel(key, size: int, *, canvas: int = 64, n_steps: int = 2000,
                  max_length: float = 60.0, exposure=None,
                  exposures: Sequence[float] = DEFAULT_EXPOSURES, anxiety=None,
                  big_shake_prob=None, centripetal=None, gaussian_shake=None,
                  splat_method: str = "scatter"):
    """Draws one random camera-shake motion kernel (Boracchi & Foi 2012).

    The trajectory of `shake_trajectory` over the exposure fraction, centred and scaled as
    in `motion_path`, is bilinearly splatted onto the ``size × size`` grid (`tent_splat`)
    and normalised to sum 1: ``k = Aᵀ diag(w) B / Σ w``. Its centre of mass is the kernel
    centre ``((size−1)/2, (size−1)/2)`` up to float rounding (no interpolated re-shift).

    Distribution with the defaults (``canvas=64, n_steps=2000, max_length=60``, the
    public generator's values), measured over 4000 keys per size by
    ``python benchmarks/kernel_stats.py``. The exposed trajectory length is
    ``e · max_length · s`` with ``e`` uniform over ``{1/100, 1/10, 1/2, 1}``: exactly
    0.18 / 1.78 / 8.9 / 17.8 px at size 19 and 0.29 / 2.9 / 14.5 / 29.1 px at size 31.
    The Gaussian shake turns the direction by ~0.2 rad per step for a typical draw, so most
    paths curl up into compact scribbles much smaller than their length. Support = pixels
    above 1% of the kernel's maximum; extent = the larger side of their bounding box;
    spread = RMS distance of the mass from its centre::

        size  quantity      mean   q10   q50   q90    max
        19    support px    7.56  3.00  7.00 12.00  44.00
        19    extent px     3.36  3.00  3.00  5.00  19.00
        19    length px     7.22  0.18  1.78 17.81  17.81
        19    spread px     0.64  0.23  0.59  1.04   5.18
        31    support px   10.79  5.00  8.00 21.00  74.00
        31    extent px     4.04  3.00  3.00  6.00  29.00
        31    length px    11.78  0.29  2.91 29.06  29.06
        31    spread px     0.88  0.30  0.75  1.53   8.41

    At full exposure the extent's median / q90 is 3 / 6 px (size 19) and 4 / 9 px (size
    31). Larger, straighter kernels come from a smaller ``anxiety`` or ``gaussian_shake``.

    Speed: ``jax.jit(jax.vmap(partial(motion_kernel, size=19)))`` over 1000 keys draws
    3,825 kernels/s on the development machine's 2-core CPU when it is nearly idle (best of
    5 batches, 261 ms per 1000), and 700–1,260 kernels/s while it was shared by other jobs
    (load average 20–28). The 2000-step ``lax.scan`` and the threefry draws dominate.

    Args:
      key: PRNG key.
      size: kernel side, odd (static).
      canvas, n_steps, max_length, exposure, exposures, anxiety, big_shake_prob,
        centripetal, gaussian_shake: see `motion_path` and `shake_trajectory`.
      splat_method: ``"scatter"`` or ``"matmul"`` (TPUs), see `tent_splat`.

    Returns:
      ``(size, size)`` float32, non-negative, sum 1, centre of mass at the centre.

    Example:
      >>> keys = jax.random.split(jax.random.key(0), 100)
      >>> jax.vmap(lambda k: motion_kernel(k, 19))(keys).shape
      (100, 19, 19)
    """
    points, weights = motion_path(
        key, size, canvas=canvas, n_steps=n_steps, max_length=max_length, exposure=exposure,
        exposures=exposures, anxiety=anxiety, big_shake_prob=big_shake_prob,
        centripetal=centripetal, gaussian_shake=gaussian_shake)
    kernel = tent_splat(points, weights, size, method=splat_method)
    return kernel / jnp.sum(kernel)


def rotation_matrices(angles):
    """Rotation matrices of a camera trajectory given as roll, pitch and yaw angles.

    ``R = R_z(roll) · R_x(pitch) · R_y(yaw)`` in camera coordinates (x right, y down,
    z along the optical axis): roll turns the image about the principal point, pitch moves
    it vertically, yaw horizontally. For the few-degree rotations of camera shake the order
    of the three factors changes the result only at second order.

    Args:
      angles: ``(T, 3)`` float, ``(roll, pitch, yaw)`` in radians.

    Returns:
      ``(T, 3, 3)`` float32 rotation matrices.
    """
    if angles.ndim != 2 or angles.shape[-1] != 3:
        raise ValueError(f"angles must be (T, 3) (roll, pitch, yaw), got shape {angles.shape}")
    angles = angles.astype(jnp.float32)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    one, zero = jnp.ones_like(cos[:, 0]), jnp.zeros_like(cos[:, 0])

    def matrix(rows):
        return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=-2)

    roll = matrix([[cos[:, 0], -sin[:, 0], zero], [sin[:, 0], cos[:, 0], zero],
                   [zero, zero, one]])
    pitch = matrix([[one, zero, zero], [zero, cos[:, 1], -sin[:, 1]],
                    [zero, sin[:, 1], cos[:, 1]]])
    yaw = matrix([[cos[:, 2], zero, sin[:, 2]], [zero, one, zero],
                  [-sin[:, 2], zero, cos[:, 2]]])
    return jnp.einsum("tij,tjk,tkl->til", roll, pitch, yaw, precision=_HIGHEST)


def _camera_homographies(angles, image_shape, focal):
    """``K·R(t)·K⁻¹`` for the pinhole camera with the principal point at the image centre."""
    height, width = image_shape
    focal = float(max(height, width)) if focal is None else focal
    focal = jnp.asarray(focal, jnp.float32)
    centre_x, centre_y = (width - 1) / 2.0, (height - 1) / 2.0
    intrinsics = jnp.stack([jnp.stack([focal, 0.0, centre_x]),
                            jnp.stack([0.0, focal, centre_y]),
                            jnp.array([0.0, 0.0, 1.0], jnp.float32)])
    inverse = jnp.stack([jnp.stack([1.0 / focal, 0.0, -centre_x / focal]),
                         jnp.stack([0.0, 1.0 / focal, -centre_y / focal]),
                         jnp.array([0.0, 0.0, 1.0], jnp.float32)])
    return jnp.einsum("ij,tjk,kl->til", intrinsics, rotation_matrices(angles), inverse,
                      precision=_HIGHEST)


def _homography_offsets(homographies, rows, cols):
    """Displacements ``(dy, dx)`` of pixels ``(rows, cols)`` (any shape S) -> ``S + (T, 2)``."""
    pixels = jnp.stack([cols, rows, jnp.ones_like(rows)], axis=-1).astype(jnp.float32)
    mapped = jnp.einsum("tij,...j->...ti", homographies, pixels, precision=_HIGHEST)
    mapped = mapped[..., :2] / mapped[..., 2:3]
    return jnp.stack([mapped[..., 1] - rows[..., None], mapped[..., 0] - cols[..., None]],
                     axis=-1)


def rotation_kernel_field(angles, image_shape, size: int, *, focal=None, weights=None,
                          splat_method: str = "scatter"):
    """Per-pixel kernels of a camera rotating during the exposure (exact per pixel).

    A pinhole camera ``K = [[f, 0, c_x], [0, f, c_y], [0, 0, 1]]`` (principal point at the
    image centre) rotates through ``R(t)``; the sharp image is the view at ``R = I``. Pixel
    ``p`` of the blurry image integrates the sharp scene along ``q_t = π(K·R(t)·K⁻¹·p̃)``,
    so its kernel is the bilinear splat of the displacements ``q_t − p`` placed at the
    kernel centre (cross-correlation convention), normalised to sum 1::

        k_p = Σ_t w_t · splat(r + (q_t − p)) / Σ_t w_t

    Displacements beyond the half-width ``r = (size−1)/2`` are clipped to the support
    border (`kernel_field` scales its random trajectories so that this never happens).
    Rows are processed one at a time (``lax.map``) so the working memory is that of one
    row of kernels besides the ``(H, W, size, size)`` output.

    Args:
      angles: ``(T, 3)`` float, ``(roll, pitch, yaw)`` radians at the T exposure samples
        (`rotation_matrices`). Consecutive samples should move pixels by less than one
        kernel pixel for a continuous-looking trace.
      image_shape: ``(H, W)`` or ``(H, W, C)`` Python ints (static).
      size: kernel side, odd (static).
      focal: focal length ``f`` in pixels; None uses ``max(H, W)`` (a 53° field of view
        across the longer side).
      weights: ``(T,)`` non-negative exposure weights; None weights the samples equally.
      splat_method: see `tent_splat`.

    Returns:
      ``(H, W, size, size)`` float32 kernel field, each kernel non-negative with sum 1.
    """
    height, width = _check_image_shape(image_shape)
    _check_kernel_size(size)
    homographies = _camera_homographies(angles, (height, width), focal)
    n_samples = angles.shape[0]
    weights = (jnp.ones((n_samples,), jnp.float32) if weights is None
               else jnp.asarray(weights, jnp.float32))
    if weights.shape != (n_samples,):
        raise ValueError(f"weights must be (T,) = ({n_samples},), got shape {weights.shape}")
    centre = (size - 1) / 2.0
    cols = jnp.arange(width, dtype=jnp.float32)

    def row_kernels(row):
        offsets = _homography_offsets(homographies, jnp.full_like(cols, row), cols)
        points = jnp.clip(offsets + centre, 0.0, size - 1.0)
        kernels = jax.vmap(lambda p: tent_splat(p, weights, size, method=splat_method))(points)
        return kernels / jnp.sum(kernels, axis=(-2, -1), keepdims=True)

    return jax.lax.map(row_kernels, jnp.arange(height, dtype=jnp.float32))


def random_rotation_trajectory(key, n_samples: int = 64, *, max_angle_deg: float = 1.0,
                               jitter: float = 1.0):
    """Draws a smooth random camera rotation ``(roll, pitch, yaw)`` over the exposure.

    Each axis follows a doubly integrated random walk (a random constant angular velocity
    plus a Brownian perturbation of it), so the angles are continuously differentiable in
    time like a hand's shake::

        ω_t = ω₀ + jitter · Σ_{s≤t} n_s / √T,   θ_t = Σ_{s≤t} ω_s,   ω₀, n_s ~ N(0, 1)

    then re-centred to zero mean over the exposure (the sharp reference pose is the mean
    pose, so kernels are roughly centred) and scaled per axis to a peak ``|θ|`` drawn from
    ``U(0, max_angle_deg)``.

    Args:
      key: PRNG key.
      n_samples: exposure samples ``T`` (static).
      max_angle_deg: largest peak rotation per axis, degrees.
      jitter: weight of the Brownian part of the angular velocity against the constant part.

    Returns:
      ``(T, 3)`` float32 ``(roll, pitch, yaw)`` in radians.
    """
    if not isinstance(n_samples, int) or n_samples < 2:
        raise ValueError(f"n_samples must be a Python int >= 2, got {n_samples!r}")
    velocity_key, walk_key, amplitude_key = jax.random.split(key, 3)
    velocity0 = jax.random.normal(velocity_key, (1, 3), jnp.float32)
    walk = jax.random.normal(walk_key, (n_samples, 3), jnp.float32)
    velocity = velocity0 + jitter * jnp.cumsum(walk, axis=0) / math.sqrt(n_samples)
    angles = jnp.cumsum(velocity, axis=0)
    angles = angles - jnp.mean(angles, axis=0)
    peak = jnp.max(jnp.abs(angles), axis=0)
    amplitude = jnp.deg2rad(max_angle_deg) * jax.random.uniform(amplitude_key, (3,))
    return angles * (amplitude / jnp.maximum(peak, 1e-12))


def _grid_weights(length: int, nodes: int):
    """``(length, nodes)`` bilinear (tent) weights of pixels on nodes spread end to end."""
    if nodes == 1:
        return jnp.ones((length, 1), jnp.float32)
    position = jnp.arange(length, dtype=jnp.float32) * (nodes - 1) / max(length - 1, 1)
    return jnp.maximum(0.0, 1.0 - jnp.abs(position[:, None] - jnp.arange(nodes)))


def interpolated_kernel_field(kernels, image_shape):
    """Bilinearly interpolates a grid of kernels over the image.

    Node ``(a, b)`` of the ``G_h × G_w`` grid sits at pixel
    ``(a·(H−1)/(G_h−1), b·(W−1)/(G_w−1))`` (corners of the image), and
    ``k_p = Σ_{a,b} t_a(p_y) · t_b(p_x) · kernels[a, b]`` with tent weights that sum to 1.
    Convex combinations of non-negative, sum-1, centred kernels are non-negative, sum 1 and
    centred; in between nodes they are superpositions (ghosts) of the neighbouring
    trajectories, not the trajectory of any real camera motion.

    Args:
      kernels: ``(G_h, G_w, k, k)`` float kernels at the grid nodes.
      image_shape: ``(H, W)`` or ``(H, W, C)`` Python ints.

    Returns:
      ``(H, W, k, k)`` float32 kernel field.
    """
    height, width = _check_image_shape(image_shape)
    if kernels.ndim != 4 or kernels.shape[-1] != kernels.shape[-2]:
        raise ValueError(f"kernels must be (G_h, G_w, k, k), got shape {kernels.shape}")
    rows = _grid_weights(height, kernels.shape[0])
    cols = _grid_weights(width, kernels.shape[1])
    # Rows first, then columns: two small contractions instead of one three-way einsum.
    per_row = jnp.einsum("ha,abij->hbij", rows, kernels.astype(jnp.float32),
                         precision=_HIGHEST)
    return jnp.einsum("wb,hbij->hwij", cols, per_row, precision=_HIGHEST)


def line_kernel(size: int, length: float, angle: float, *, samples: int = 200):
    """A straight motion kernel through the centre of a ``size × size`` grid.

    ``samples`` equally spaced points from ``-length/2`` to ``length/2`` along the direction
    ``(sin angle, cos angle)`` (row, column) from the centre are splatted bilinearly
    (`tent_splat`) and the kernel is normalised to sum 1: uniform linear motion, the
    synthetic blur of the recovery tests and benchmarks.

    Args:
      size: odd grid side.
      length: extent of the motion in pixels (at most ``size - 1``).
      angle: direction in radians, counter-clockwise from the column axis.
      samples: number of points along the line.

    Returns:
      ``(size, size)`` float32, non-negative, summing to 1.
    """
    size = _check_kernel_size(size)
    if not 0 <= length <= size - 1:
        raise ValueError(f"length must be in [0, {size - 1}] for a {size}x{size} kernel, "
                         f"got {length}")
    t = jnp.linspace(-length / 2, length / 2, samples)
    centre = (size - 1) / 2
    points = jnp.stack([centre + t * jnp.sin(angle), centre + t * jnp.cos(angle)], axis=-1)
    kernel = tent_splat(points, jnp.ones((samples,), jnp.float32), size)
    return kernel / jnp.sum(kernel)


def kernel_field_from_kernel(kernel, image_shape):
    """The uniform kernel field: the same ``(k, k)`` kernel at every pixel.

    Args:
      kernel: ``(k, k)`` float kernel.
      image_shape: ``(H, W)`` or ``(H, W, C)`` Python ints.

    Returns:
      ``(H, W, k, k)`` float32 (a broadcast; XLA materialises it only where needed).
    """
    height, width = _check_image_shape(image_shape)
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"kernel must be square (k, k), got shape {kernel.shape}")
    return jnp.broadcast_to(jnp.asarray(kernel, jnp.float32), (height, width) + kernel.shape)


def kernel_field(key, image_shape, size: int, *, mode: str = "rotation",
                 n_samples: int = 64, max_angle_deg: float = 1.0, jitter: float = 1.0,
                 focal=None, grid: tuple[int, int] = (3, 3), motion_kwargs=None,
                 splat_method: str = "scatter"):
    """Draws a smoothly varying per-pixel kernel field with known ground truth.

    ``mode="rotation"`` (physical): a smooth random camera rotation
    (`random_rotation_trajectory`) rasterised exactly per pixel
    (`rotation_kernel_field`). When some pixel's path would leave the kernel support, all
    angles are shrunk by one factor ``r / max|d|`` (``max|d|`` = largest displacement
    component, measured on a 17 × 17 probe grid spanning the image, borders included);
    the small nonlinearity of the homography is absorbed by the support clip. A pure roll
    leaves the principal point fixed (delta kernel there) and moves the corners most.

    ``mode="interpolate"`` (cheap, not physical): ``grid`` independent `motion_kernel`
    draws bilinearly interpolated over the image (`interpolated_kernel_field`).

    A 256 × 256 field of 19 × 19 kernels (95 MB, the output itself) takes 0.21 s in
    rotation mode (64 samples) and 0.13 s in interpolate mode (3 × 3 grid) on the
    development CPU after compilation.

    Args:
      key: PRNG key.
      image_shape: ``(H, W)`` or ``(H, W, C)`` Python ints (static).
      size: kernel side, odd (static).
      mode: ``"rotation"`` or ``"interpolate"``.
      n_samples: exposure samples of the rotation (rotation mode).
      max_angle_deg: peak rotation per axis before the support fit (rotation mode).
      jitter: see `random_rotation_trajectory` (rotation mode).
      focal: focal length in pixels, None = ``max(H, W)`` (rotation mode).
      grid: ``(G_h, G_w)`` kernel nodes (interpolate mode).
      motion_kwargs: keyword arguments for `motion_kernel` (interpolate mode), e.g.
        ``{"max_length": 40.0}``.
      splat_method: see `tent_splat`.

    Returns:
      ``(H, W, size, size)`` float32, every kernel non-negative with sum 1.
    """
    height, width = _check_image_shape(image_shape)
    _check_kernel_size(size)
    if mode == "rotation":
        angles = random_rotation_trajectory(key, n_samples, max_angle_deg=max_angle_deg,
                                            jitter=jitter)
        probe_rows = jnp.linspace(0.0, height - 1.0, 17)
        probe_cols = jnp.linspace(0.0, width - 1.0, 17)
        probe_rows, probe_cols = jnp.meshgrid(probe_rows, probe_cols, indexing="ij")
        offsets = _homography_offsets(_camera_homographies(angles, (height, width), focal),
                                      probe_rows, probe_cols)
        largest = jnp.max(jnp.abs(offsets))
        angles = angles * jnp.minimum(1.0, ((size - 1) / 2.0) / jnp.maximum(largest, 1e-12))
        return rotation_kernel_field(angles, (height, width), size, focal=focal,
                                     splat_method=splat_method)
    if mode == "interpolate":
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"grid must be (G_h, G_w) positive ints, got {grid!r}")
        keys = jax.random.split(key, grid[0] * grid[1])
        kwargs = dict(motion_kwargs or {})
        kwargs.setdefault("splat_method", splat_method)
        kernels = jax.vmap(lambda k: motion_kernel(k, size, **kwargs))(keys)
        return interpolated_kernel_field(kernels.reshape(grid + (size, size)),
                                         (height, width))
    raise ValueError(f"mode must be 'rotation' or 'interpolate', got {mode!r}")


def synthesize_blur(key, sharp, kernel_field, *, noise_sigma: float = 0.01, clip: bool = True,
                    boundary: str = "replicate"):
    """Blurs a sharp image with a per-pixel kernel field and adds Gaussian noise.

    ``blurry = clip(per_pixel_blur(sharp, kernel_field) + σ·n, 0, 1)`` with
    ``n = jax.random.normal(key, sharp.shape)``. With ``clip=False`` the noise is exactly
    recoverable: ``blurry − per_pixel_blur(sharp, kernel_field) = σ·n`` up to float32
    rounding, which the data-set tests check.

    Args:
      key: PRNG key for the noise.
      sharp: ``(H, W, C)`` float32 in [0, 1].
      kernel_field: ``(H, W, k, k)`` per-pixel kernels (cross-correlation convention).
      noise_sigma: standard deviation ``σ`` of the additive Gaussian noise.
      clip: clip the result to [0, 1] (as a camera's sensor would).
      boundary: padding of `jaxdeblur.blur.per_pixel_blur` (official code: replicate).

    Returns:
      ``(H, W, C)`` float32 blurry image.
    """
    if sharp.ndim != 3:
        raise ValueError(f"sharp must be (H, W, C), got shape {sharp.shape}")
    if kernel_field.ndim != 4 or kernel_field.shape[:2] != sharp.shape[:2]:
        raise ValueError(
            f"kernel_field must be (H, W, k, k) with (H, W) = {sharp.shape[:2]}, got shape "
            f"{kernel_field.shape}; build it with kernel_field(key, sharp.shape, k)")
    sharp = jnp.asarray(sharp, jnp.float32)
    blurry = per_pixel_blur(sharp, kernel_field, boundary=boundary)
    blurry = blurry + noise_sigma * jax.random.normal(key, sharp.shape, jnp.float32)
    return jnp.clip(blurry, 0.0, 1.0) if clip else blurry


# --- Generators calibrated to measured camera shake -----------------------------------------
#
# Every generator below draws a trajectory of some shape, then `rasterise_trajectory` gives
# it a drawn exposed length, centres it on its centre of mass and fits it into the window by
# the same rule as `fit_kernel` applies to measured kernels. The numbers come from a config
# (`jaxdeblur/configs/flow_prior.py`, ``generator_settings``) as the frozen dataclasses here;
# none of these functions has a numeric default.


@dataclasses.dataclass(frozen=True)
class LengthLaw:
    """A log-normal law of trajectory lengths truncated to ``[minimum, maximum]``.

    ``log L ~ N(log median, log_sigma²)`` conditioned on ``minimum ≤ L ≤ maximum``, drawn
    exactly by inverting the CDF (`sample_length`). Lengths are in kernel pixels of the
    output window, before the window fit of `rasterise_trajectory`.
    """
    median: float
    log_sigma: float
    minimum: float
    maximum: float


@dataclasses.dataclass(frozen=True)
class BoracchiFoiConfig:
    """Boracchi–Foi shake trajectories, calibrated length and exposure (`boracchi_foi_trajectory`).

    Attributes:
      length: law of the exposed trajectory length.
      exposure_min, exposure_max: the exposure fraction ``e ~ U(exposure_min, exposure_max)``
        of the ``n_steps``-step shake that is integrated (it sets how many turns the exposed
        path takes, not its length).
      n_steps: trajectory points of the whole shake (static).
      canvas_length: length of the whole shake in canvas pixels; a shape parameter, since
        the centripetal pull acts on positions (public generator: 60).
      anxiety_max, big_shake_prob_max, centripetal_max, gaussian_shake_max: the shake
        parameters are drawn as ``max · U(0, 1)`` (public generator: 0.1, 0.2, 0.7, 10).
      fit_size: the window fit (`rasterise_trajectory`).
    """
    length: LengthLaw
    exposure_min: float
    exposure_max: float
    n_steps: int
    canvas_length: float
    anxiety_max: float
    big_shake_prob_max: float
    centripetal_max: float
    gaussian_shake_max: float
    fit_size: int


@dataclasses.dataclass(frozen=True)
class GaussianProcessConfig:
    """Gaussian-process trajectories (`gaussian_process_trajectory`).

    Attributes:
      length: law of the trajectory length.
      n_steps: time samples over the exposure (static).
      duration: exposure time in the units of ``lengthscale``.
      lengthscale: Matérn lengthscale ``l``.
      smoothness: Matérn ``ν``, 1.5 or 2.5.
      fit_size: the window fit (`rasterise_trajectory`).
    """
    length: LengthLaw
    n_steps: int
    duration: float
    lengthscale: float
    smoothness: float
    fit_size: int


@dataclasses.dataclass(frozen=True)
class SplineConfig:
    """Smooth random spline trajectories (`spline_trajectory`).

    Attributes:
      length: law of the trajectory length.
      n_control: control points, drawn uniformly in the unit square (static).
      n_steps: samples of the curve, uniform in the spline parameter (static).
      fit_size: the window fit (`rasterise_trajectory`).
    """
    length: LengthLaw
    n_control: int
    n_steps: int
    fit_size: int


@dataclasses.dataclass(frozen=True)
class MixtureConfig:
    """A mixture of the three families; ``weights`` (Boracchi–Foi, Gaussian process,
    spline) are non-negative and need not sum to 1."""
    boracchi_foi: BoracchiFoiConfig
    gaussian_process: GaussianProcessConfig
    spline: SplineConfig
    weights: tuple[float, float, float]


#: The families of `draw_kernel`, in the order of `KernelDraw.family` and of the mixture
#: weights.
FAMILIES = ("boracchi_foi", "gaussian_process", "spline")
_FAMILY_CONFIGS = {"boracchi_foi": BoracchiFoiConfig, "gaussian_process": GaussianProcessConfig,
                   "spline": SplineConfig, "mixture": MixtureConfig}


class Trajectory(NamedTuple):
    """A trajectory before rasterisation.

    Attributes:
      points: ``(T, 2)`` float32 ``(row, column)`` positions, in any units and placement
        (`rasterise_trajectory` rescales and centres them).
      weights: ``(T,)`` float32 exposure weights (time spent at each point), ``≥ 0``.
      length: the drawn exposed length in kernel pixels (before the window fit).
      exposure: the drawn exposure fraction (1 for families without one).
    """
    points: jax.Array
    weights: jax.Array
    length: jax.Array
    exposure: jax.Array


class KernelDraw(NamedTuple):
    """One generated kernel and the random quantities behind it.

    Attributes:
      kernel: ``(size, size)`` float32, non-negative, sum 1, centre of mass at the centre.
      length: the drawn trajectory length in kernel pixels (its law: the config's
        `LengthLaw`); the rasterised path is ``length · fit_scale`` long.
      exposure: the drawn exposure fraction (Boracchi–Foi; 1 otherwise).
      fit_scale: the window-fit factor in (0, 1].
      family: index into `FAMILIES`.
    """
    kernel: jax.Array
    length: jax.Array
    exposure: jax.Array
    fit_scale: jax.Array
    family: jax.Array


def _check_length_law(law: LengthLaw) -> None:
    if not (0 < law.minimum <= law.median <= law.maximum and law.log_sigma > 0):
        raise ValueError(f"a LengthLaw needs 0 < minimum <= median <= maximum and "
                         f"log_sigma > 0, got {law}")


def sample_length(law: LengthLaw, *, key):
    """Draws one trajectory length from a truncated log-normal `LengthLaw`.

    ``L = exp(μ + s·Φ⁻¹(u))``, ``u ~ U(Φ(a), Φ(b))`` with ``μ = log median``,
    ``s = log_sigma``, ``a = (log minimum − μ)/s``, ``b = (log maximum − μ)/s``: exact
    inverse-CDF sampling of the truncated law (no rejection, so ``vmap`` friendly).

    Args:
      law: the `LengthLaw`.
      key: PRNG key.

    Returns:
      scalar float32 length in kernel pixels.
    """
    _check_length_law(law)
    mu, s = math.log(law.median), law.log_sigma
    lower = jax.scipy.special.ndtr((math.log(law.minimum) - mu) / s)
    upper = jax.scipy.special.ndtr((math.log(law.maximum) - mu) / s)
    u = jax.random.uniform(key, (), jnp.float32, lower, upper)
    length = jnp.exp(mu + s * jax.scipy.special.ndtri(u))
    # ndtri in float32 can overshoot a bound by an ulp.
    return jnp.clip(length, law.minimum, law.maximum)


def rasterise_trajectory(trajectory: Trajectory, size: int, fit_size: int, *,
                         splat_method: str = "scatter"):
    """Rasterises a trajectory at its drawn length, centred, fitted into the window.

    1. Scale: the exposed path length ``Σ_t w_t·|p_t − p_{t−1}|`` becomes ``length``.
    2. Centre: the weighted centre of mass ``Σ w_t p_t / Σ w_t`` goes to the kernel centre
       ``r = (size − 1)/2``.
    3. Fit: if an exposed point lies farther than ``h = (fit_size − 1)/2`` from the centre
       along a row or column, the path is scaled about the centre by
       ``fit_scale = h / max_t |p_t − r|_∞`` — the rule `fit_kernel` applies to measured
       kernels, so generated and measured kernels meet the window alike.
    4. Splat bilinearly (`tent_splat`, mass and first moment exact) and normalise.

    Args:
      trajectory: a `Trajectory`.
      size: kernel side, odd (static).
      fit_size: odd, ``≤ size``; the support of a balanced path spans at most this many
        pixels (17 in a 19 window keeps a one-pixel border).
      splat_method: see `tent_splat`.

    Returns:
      ``(kernel, fit_scale)``: ``(size, size)`` float32 (non-negative, sum 1, centre of mass
      at the centre up to float rounding) and the scalar fit factor in (0, 1].
    """
    _check_kernel_size(size)
    if not isinstance(fit_size, int) or not 1 <= fit_size <= size:
        raise ValueError(f"fit_size must be a Python int in [1, size={size}], got {fit_size!r}")
    points = trajectory.points.astype(jnp.float32)
    weights = trajectory.weights.astype(jnp.float32)
    steps = jnp.linalg.norm(points[1:] - points[:-1], axis=-1)
    measured = jnp.sum(steps * weights[1:])
    points = points * (trajectory.length / jnp.maximum(measured, 1e-30))
    centre_of_mass = jnp.sum(points * weights[:, None], axis=0) / jnp.sum(weights)
    points = points - centre_of_mass
    reach = jnp.max(jnp.where(weights[:, None] > 0, jnp.abs(points), 0.0))
    half = (fit_size - 1) / 2.0
    fit_scale = jnp.minimum(1.0, half / jnp.maximum(reach, 1e-30))
    centre = (size - 1) / 2.0
    # The fit keeps exposed points inside; the clip only absorbs float rounding and
    # unexposed points (weight 0).
    points = jnp.clip(points * fit_scale + centre, 0.0, size - 1.0)
    kernel = tent_splat(points, weights, size, method=splat_method)
    return kernel / jnp.sum(kernel), fit_scale


def boracchi_foi_trajectory(config: BoracchiFoiConfig, *, key) -> Trajectory:
    """A Boracchi–Foi camera-shake trajectory with a drawn length and exposure.

    The shake of `shake_trajectory` (inertia, Gaussian shake, centripetal pull, impulsive
    jerks; ``config.n_steps`` points, ``config.canvas_length`` canvas pixels long) with
    parameters ``anxiety, big_shake_prob, centripetal, gaussian_shake = max · U(0, 1)``.
    An exposure fraction ``e ~ U(exposure_min, exposure_max)`` integrates its first part
    (weights ``w_t = clip(e·(T−1) + 1 − t, 0, 1)``, as in `motion_path`); the exposed part
    is then rasterised at a length drawn from ``config.length``. The exposure thus sets how
    much of the shake's wandering the kernel shows, the length law how far the image moved.

    Args:
      config: a `BoracchiFoiConfig`.
      key: PRNG key.

    Returns:
      a `Trajectory` (points in canvas pixels).

    References:
      G. Boracchi and A. Foi, "Modeling the performance of image restoration from motion
      blur", IEEE TIP 21(8), 2012, Sec. II.
    """
    if not 0 < config.exposure_min <= config.exposure_max <= 1:
        raise ValueError(f"need 0 < exposure_min <= exposure_max <= 1, got "
                         f"{config.exposure_min}, {config.exposure_max}")
    keys = jax.random.split(key, 7)
    draw = functools.partial(jax.random.uniform, shape=(), dtype=jnp.float32)
    path = shake_trajectory(
        keys[0], n_steps=config.n_steps, max_length=config.canvas_length,
        anxiety=config.anxiety_max * draw(keys[1]),
        big_shake_prob=config.big_shake_prob_max * draw(keys[2]),
        centripetal=config.centripetal_max * draw(keys[3]),
        gaussian_shake=config.gaussian_shake_max * draw(keys[4]))
    exposure = draw(keys[5], minval=config.exposure_min, maxval=config.exposure_max)
    end = exposure * (config.n_steps - 1)
    weights = jnp.clip(end + 1.0 - jnp.arange(config.n_steps, dtype=jnp.float32), 0.0, 1.0)
    return Trajectory(path, weights, sample_length(config.length, key=keys[6]), exposure)


@functools.lru_cache(maxsize=8)
def _matern_factor(n_steps: int, duration: float, lengthscale: float, smoothness: float):
    """``F`` with ``F Fᵀ = C``, the Matérn covariance of ``n_steps`` equally spaced times.

    Computed once per setting in float64 numpy (a constant of the traced function): the
    Cholesky factor of ``C + 10⁻⁹·I``. The Matérn matrix of a smooth process is numerically
    singular (smallest eigenvalue ~10⁻⁷ for ν = 3/2 and ~10⁻¹¹ for ν = 5/2 at 512 samples,
    l = 0.3); the jitter adds white noise of standard deviation 3·10⁻⁵ of the process's,
    far below a pixel, and makes the factorisation succeed.
    """
    times = np.linspace(0.0, duration, n_steps)
    distance = np.abs(times[:, None] - times[None, :]) / lengthscale
    if smoothness == 1.5:
        scaled = math.sqrt(3.0) * distance
        covariance = (1.0 + scaled) * np.exp(-scaled)
    elif smoothness == 2.5:
        scaled = math.sqrt(5.0) * distance
        covariance = (1.0 + scaled + scaled**2 / 3.0) * np.exp(-scaled)
    else:
        raise ValueError(f"smoothness (Matérn nu) must be 1.5 or 2.5, got {smoothness!r}")
    return np.linalg.cholesky(covariance + 1e-9 * np.eye(n_steps)).astype(np.float32)


def gaussian_process_trajectory(config: GaussianProcessConfig, *, key) -> Trajectory:
    """A trajectory whose two coordinates are independent Matérn Gaussian processes.

    ``y(t), x(t) ~ GP(0, k)`` at ``n_steps`` equally spaced times of ``[0, duration]``,

        ν = 3/2:  k(d) = (1 + √3·d/l) · exp(−√3·d/l)
        ν = 5/2:  k(d) = (1 + √5·d/l + 5d²/(3l²)) · exp(−√5·d/l)

    (unit variance: the process's σ only scales the path, and `rasterise_trajectory` sets
    its length from ``config.length``). Samples are uniform in time, so the kernel is
    brighter where the path slows down, as in measured kernels.

    Args:
      config: a `GaussianProcessConfig`.
      key: PRNG key.

    Returns:
      a `Trajectory` with unit weights and exposure 1.

    References:
      C. J. Schuler, M. Hirsch, S. Harmeling, B. Schölkopf, "Learning to deblur", IEEE
      TPAMI 38(7), 2016 (Gaussian-process camera-shake trajectories); the deepinv
      ``MotionBlurGenerator`` (``l = 0.3``, ``σ = 0.25`` over a unit exposure; its docstring
      names ν = 3/2 while its formula is the ν = 5/2 one — both are available here).
    """
    if not (config.duration > 0 and config.lengthscale > 0):
        raise ValueError(f"duration and lengthscale must be positive, got {config}")
    factor = _matern_factor(config.n_steps, float(config.duration), float(config.lengthscale),
                            float(config.smoothness))
    path_key, length_key = jax.random.split(key)
    noise = jax.random.normal(path_key, (config.n_steps, 2), jnp.float32)
    points = jnp.matmul(factor, noise, precision=_HIGHEST)
    return Trajectory(points, jnp.ones((config.n_steps,), jnp.float32),
                      sample_length(config.length, key=length_key), jnp.float32(1.0))


@functools.lru_cache(maxsize=8)
def _spline_matrix(n_control: int, n_steps: int):
    """``(n_steps, n_control)`` natural-cubic-spline interpolation weights on uniform knots."""
    if not isinstance(n_control, int) or n_control < 2:
        raise ValueError(f"n_control must be a Python int >= 2, got {n_control!r}")
    knots = np.linspace(0.0, 1.0, n_control)
    # A natural cubic spline is linear in the values it interpolates: interpolating the
    # unit vectors gives the weights of every control point at every sample.
    spline = scipy.interpolate.CubicSpline(knots, np.eye(n_control), bc_type="natural")
    return spline(np.linspace(0.0, 1.0, n_steps)).astype(np.float32)


def spline_trajectory(config: SplineConfig, *, key) -> Trajectory:
    """A smooth random trajectory: a natural cubic spline through random control points.

    ``n_control`` points uniform in the unit square, joined in the order drawn by the
    natural cubic spline on uniform knots and sampled at ``n_steps`` uniform parameter
    values; like a hand that slows down near the points where it turns, the kernel is
    brighter where the samples crowd.

    Args:
      config: a `SplineConfig`.
      key: PRNG key.

    Returns:
      a `Trajectory` with unit weights and exposure 1.

    References:
      A. Chakrabarti, "A neural approach to blind motion deblurring", ECCV 2016 (kernels
      from splines through a few random points).
    """
    matrix = _spline_matrix(config.n_control, config.n_steps)
    control_key, length_key = jax.random.split(key)
    control = jax.random.uniform(control_key, (config.n_control, 2), jnp.float32)
    points = jnp.matmul(matrix, control, precision=_HIGHEST)
    return Trajectory(points, jnp.ones((config.n_steps,), jnp.float32),
                      sample_length(config.length, key=length_key), jnp.float32(1.0))


_TRAJECTORIES = {BoracchiFoiConfig: (0, boracchi_foi_trajectory),
                 GaussianProcessConfig: (1, gaussian_process_trajectory),
                 SplineConfig: (2, spline_trajectory)}


def draw_kernel(config, size: int, *, key, splat_method: str = "scatter") -> KernelDraw:
    """Draws one kernel from a family, or from the mixture of the three.

    A `MixtureConfig` picks the family ``f ~ Categorical(weights / Σ weights)`` and then
    draws from it (``lax.switch``; under ``vmap`` every family is computed and selected).

    Args:
      config: a `BoracchiFoiConfig`, `GaussianProcessConfig`, `SplineConfig` or
        `MixtureConfig` (hashable: a static argument under ``jit``).
      size: kernel side, odd (static).
      key: PRNG key.
      splat_method: see `tent_splat`.

    Returns:
      a `KernelDraw`.

    Example:
      >>> from jaxdeblur.configs import flow_prior
      >>> config = generator_config("mixture", flow_prior.generator_settings("mixture"))
      >>> keys = jax.random.split(jax.random.key(0), 8)
      >>> jax.vmap(lambda k: draw_kernel(config, 19, key=k).kernel)(keys).shape
      (8, 19, 19)
    """
    if isinstance(config, MixtureConfig):
        weights = np.asarray(config.weights, np.float64)
        if weights.shape != (3,) or weights.min() < 0 or weights.sum() <= 0:
            raise ValueError(f"mixture weights must be 3 non-negative numbers, not all 0 "
                             f"(order {FAMILIES}), got {config.weights!r}")
        family_key, draw_key = jax.random.split(key)
        family = jax.random.choice(family_key, 3, p=jnp.asarray(weights / weights.sum(),
                                                                jnp.float32))
        branches = [functools.partial(draw_kernel, getattr(config, name), size,
                                      splat_method=splat_method) for name in FAMILIES]
        return jax.lax.switch(family, [lambda k, b=b: b(key=k) for b in branches], draw_key)
    if type(config) not in _TRAJECTORIES:
        names = ", ".join(c.__name__ for c in _FAMILY_CONFIGS.values())
        raise ValueError(f"config must be one of {names}, got {type(config).__name__}")
    family, trajectory_fn = _TRAJECTORIES[type(config)]
    trajectory = trajectory_fn(config, key=key)
    kernel, fit_scale = rasterise_trajectory(trajectory, size, config.fit_size,
                                             splat_method=splat_method)
    return KernelDraw(kernel, trajectory.length, trajectory.exposure, fit_scale,
                      jnp.int32(family))


def generator_config(name: str, settings):
    """The frozen config of generator ``name`` from a config section (`configs.as_dataclass`).

    Args:
      name: one of `FAMILIES` or ``"mixture"``.
      settings: ConfigDict or mapping with every field of that config (nested
        ``length`` sections; the mixture has one section per family and ``weights``).

    Returns:
      the frozen dataclass, hashable.
    """
    if name not in _FAMILY_CONFIGS:
        raise ValueError(f"unknown kernel generator {name!r}; choose one of "
                         f"{', '.join(_FAMILY_CONFIGS)} (or 'motion' for motion_kernel)")
    return configs.as_dataclass(_FAMILY_CONFIGS[name], settings, "kernels.",
                                source="jaxdeblur/configs/flow_prior.py")


def kernel_sampler(generator: str, settings, size: int):
    """``key -> (size, size)`` kernel for a named generator: the flow prior's data source.

    Args:
      generator: ``"motion"`` (`motion_kernel`, ``settings`` = its keyword arguments, the
        generator of the shipped prior) or a name of `generator_config`.
      settings: the config section of that generator.
      size: kernel side, odd.

    Returns:
      a function of a PRNG key, ``jit``/``vmap``-able.
    """
    if generator == "motion":
        kwargs = dict(settings.to_dict() if hasattr(settings, "to_dict") else settings)
        return functools.partial(motion_kernel, size=size, **kwargs)
    config = generator_config(generator, settings)
    return lambda key: draw_kernel(config, size, key=key).kernel


# --- Measured kernels -------------------------------------------------------------------------


def _box_resample_matrix(mass, scale: float, offset: float, size: int):
    """``(size, length)`` box-filter resampling: input pixel ``j`` (the interval
    ``[j − ½, j + ½]``) is mapped to ``[offset + s·(j − ½), offset + s·(j + ½)]`` and gives
    its mass to the output pixels ``[i − ½, i + ½]`` it overlaps, in proportion to the overlap
    (an area-preserving resize; with ``s = 1`` a sub-pixel shift with bilinear shares).
    ``mass`` is the input's marginal ``(length,)``; returns None if some of it would fall
    outside ``[−½, size − ½]``."""
    lower_in = offset + scale * (np.arange(len(mass)) - 0.5)
    upper_in = lower_in + scale
    occupied = np.flatnonzero(mass > 0)
    # A tolerance keeps float rounding from putting 1e-16 of a pixel outside.
    if (lower_in[occupied[0]] < -0.5 - 1e-9
            or upper_in[occupied[-1]] > size - 0.5 + 1e-9):
        return None
    edges = np.arange(size) - 0.5
    overlap = (np.minimum(upper_in[None, :], edges[:, None] + 1.0)
               - np.maximum(lower_in[None, :], edges[:, None]))
    return np.clip(overlap, 0.0, None) / scale


def fit_kernel(kernel, size: int, *, fit_size: int, threshold: float) -> np.ndarray:
    """Fits a measured kernel of any size into a ``size × size`` window.

    1. Support: entries ``≤ threshold · max`` are set to 0 (the measurement floor), the
       kernel is cropped to the bounding box of the rest and normalised to sum 1.
    2. Fit: with ``c`` the centre of mass and ``R`` the largest distance, along a row or a
       column, from ``c`` to the outer edge of a support pixel, the kernel is downscaled by
       ``s = min(1, (fit_size/2) / R)`` with an area-preserving (box-filter) resize that
       maps ``c`` onto the window centre and keeps the mass of every input pixel. A balanced
       kernel then spans ``fit_size`` pixels (17 in a 19 window: a one-pixel border);
       measuring from the centre of mass rather than the box lets a lopsided kernel (mass
       piled at one end) be centred without clipping its tail.
    3. Centre: a last sub-pixel shift with bilinear shares (mass and centre of mass move
       exactly) removes the resize's rounding, so the centre of mass is the window centre
       to float precision; it can spread a small share into the border pixels.

    Generated kernels get the same fit (`rasterise_trajectory`), so statistics of generated
    and measured kernels compare like for like.

    Args:
      kernel: ``(H, W)`` array, any size, non-negative, finite, not all zero (any sum).
      size: window side, odd.
      fit_size: ``≤ size``; 17 in a 19 window.
      threshold: relative support threshold in ``[0, 1)``; 0 keeps every non-zero entry.

    Returns:
      ``(size, size)`` float32, non-negative, sum 1, centre of mass at the centre.

    Raises:
      ValueError: for a non-2-D, non-finite, negative or all-zero kernel, or bad sizes.

    Example:
      >>> line = np.zeros((41, 41)); line[20] = 1.0
      >>> fitted = fit_kernel(line, 19, fit_size=17, threshold=0.02)
      >>> fitted.shape, np.flatnonzero(fitted[9] > 1e-6).tolist() == list(range(1, 18))
      ((19, 19), True)
    """
    _check_kernel_size(size)
    if not isinstance(fit_size, int) or not 1 <= fit_size <= size:
        raise ValueError(f"fit_size must be an int in [1, size={size}], got {fit_size!r}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold!r}")
    values = np.asarray(kernel, np.float64)
    if values.ndim != 2 or min(values.shape) < 1:
        raise ValueError(f"a measured kernel must be a non-empty 2-D array (H, W), got shape "
                         f"{values.shape}; convert RGB kernels to one channel first")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"the kernel has {np.sum(~np.isfinite(values))} NaN or infinite "
                         "entries")
    if values.min() < 0:
        raise ValueError(f"the kernel has negative entries (min {values.min():.3g}); "
                         "clip them to 0 first if they are estimation noise")
    if values.max() <= 0:
        raise ValueError(f"the kernel {values.shape} is all zero")
    values = np.where(values > threshold * values.max(), values, 0.0)
    rows = np.flatnonzero(values.any(axis=1))
    cols = np.flatnonzero(values.any(axis=0))
    values = values[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    values = values / values.sum()

    def centre_of_mass(k):
        return np.array([k.sum(1) @ np.arange(k.shape[0]), k.sum(0) @ np.arange(k.shape[1])])

    com = centre_of_mass(values)
    reach = 0.5 + max(com[0], values.shape[0] - 1 - com[0], com[1],
                      values.shape[1] - 1 - com[1])
    scale = min(1.0, fit_size / 2.0 / reach)
    centre = (size - 1) / 2.0
    while True:
        matrices = [_box_resample_matrix(values.sum(1 - axis), scale,
                                         centre - scale * com[axis], size) for axis in (0, 1)]
        if all(m is not None for m in matrices):
            window = matrices[0] @ values @ matrices[1].T
            residual = centre - centre_of_mass(window)
            matrices = [_box_resample_matrix(window.sum(1 - axis), 1.0, residual[axis], size)
                        for axis in (0, 1)]
            if all(m is not None for m in matrices):
                window = matrices[0] @ window @ matrices[1].T
                return (window / window.sum()).astype(np.float32)
        # Only when the window has no border (fit_size = size) can the residual shift
        # leave it: shrink a little more.
        scale *= 0.97


def kernel_variants(kernel):
    """The 8 rotations and flips of kernels (the dihedral group of the square).

    Rotations by 0°, 90°, 180°, 270° of the kernel and of its transpose. They keep a
    kernel's sum, support and (for odd sizes) its centring; for augmenting the few measured
    kernels that exist.

    Args:
      kernel: ``(..., k, k)`` array.

    Returns:
      ``(8, ..., k, k)``; index 0 is the kernel itself.
    """
    kernel = jnp.asarray(kernel)
    if kernel.ndim < 2 or kernel.shape[-1] != kernel.shape[-2]:
        raise ValueError(f"kernels must be square (..., k, k), got shape {kernel.shape}")
    transposed = jnp.swapaxes(kernel, -1, -2)
    return jnp.stack([jnp.rot90(k, r, axes=(-2, -1))
                      for k in (kernel, transposed) for r in range(4)])
