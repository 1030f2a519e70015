"""Coarse-to-fine blind kernel estimation with a sparse (L0) gradient prior.

Classical blind deconvolution estimates the kernel from the image's strong edges, from the
coarsest scale up: a 75 px kernel is a 10 px kernel at 1/8 scale, where few unknowns and
little noise make the estimate stable, and each finer level starts from the upsampled
kernel of the level below. At every level the estimate alternates

  latent:  x = argmin ||k ⋆ x − y||² + λ ||∇x||₀          (half-quadratic splitting, Xu et
           al. 2013 / Pan et al. 2014: the L0 prior keeps only salient edges, the ones that
           constrain the kernel)
  kernel:  k = argmin ||k ⋆ ∇x − ∇y||² + γ ||k||²          (closed form in Fourier, cropped
           to the support, negatives and faint taps removed, normalised to sum 1)

with ``λ`` shrinking over the iterations so that finer edges join as the kernel sharpens.
``y`` is extended to a smoothly periodic canvas (Liu & Jia 2008) so the Fourier solvers do
not see the image border as an edge. The image convention is the library's: ``y =
blur.conv(x, k)``, a cross-correlation.

Every function works on one gray image ``(H, W)`` float32; the kernel size is estimated
with the kernel (`estimate_kernel` returns the support the energy occupies). Settings come
in one frozen `KernelEstimation` built from a config (`jaxdeblur/configs/deblur.py`).

References: Xu, Zheng, Jia, "Unnatural L0 sparse representation for natural image
deblurring", CVPR 2013; Pan, Hu, Su, Yang, "Deblurring text images via L0-regularized
intensity and gradient prior", CVPR 2014; Cho & Lee, "Fast motion deblurring", 2009;
Liu & Jia, "Reducing boundary artifacts in image deconvolution", ICIP 2008.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from jaxdeblur import blur, configs, deconv

__all__ = [
    "KernelEstimation",
    "KernelEstimate",
    "settings_from_config",
    "pyramid",
    "periodic_extension",
    "dark_pixels",
    "l0_latent",
    "select_gradients",
    "fit_kernel",
    "clean_kernel",
    "kernel_pieces",
    "kernel_spread",
    "estimate_spread",
    "centre_kernel",
    "resize_kernel",
    "crop_kernel_by_energy",
    "EstimationState",
    "state_to_arrays",
    "state_from_arrays",
    "estimate_kernel",
    "polish_kernel",
    "informative_crop",
]


@dataclasses.dataclass(frozen=True)
class KernelEstimation:
    """Settings of `estimate_kernel` (hashable: a static argument of the jitted steps).

    Attributes:
      max_kernel_size: largest kernel searched (odd); the estimate's support is cropped by
        energy afterwards.
      scale: size ratio between pyramid levels (< 1).
      coarsest_kernel: kernel size at the coarsest level (odd, ≥ 3).
      iterations: alternations (latent, kernel) per level.
      lambda_grad: L0 weight of the latent step at the first iteration of a level.
      lambda_decay: λ is divided by this after every alternation ...
      lambda_min: ... down to this floor.
      beta_max: last penalty of the half-quadratic splitting (β doubles from 2λ).
      kernel_reg: γ, the ridge weight of the kernel fit (sums over the canvas).
      kernel_cg_iterations: conjugate-gradient steps of each kernel fit.
      kernel_nonneg_iterations: projected (non-negative) accelerated-gradient steps after
        the CG solve, from its clipped result; 0 keeps the unconstrained fit.
      edge_fraction: r of the gradient selection (r·k·sqrt(N) strongest edges kept).
      edge_decay: r is multiplied by this after every alternation (more edges join).
      threshold: taps below threshold·max are set to zero after each kernel fit.
      final_threshold: the same for the last fit of the finest level, applied when the
        estimate cleaned at ``threshold`` is a path (`kernel_spread` at most
        ``final_max_spread``): a path's faint taps are where the camera moved fast, part of
        the blur, while a diffuse estimate's are noise. Equal to ``threshold``: off.
      final_max_spread: see ``final_threshold``.
      min_component: connected kernel pieces holding less than this mass are removed.
      energy: fraction of the kernel's mass kept when cropping its support.
      dark_weight: L0 weight of the dark channel in the latent step (Pan et al. 2016);
        0 turns the term off. Decays with ``lambda_grad``'s rule.
      dark_patch: side of the dark channel's window (odd).
      dark_start: μ starts at ``dark_weight / dark_start`` (Pan: the Otsu threshold of x²).
      dark_beta_max: last μ (doubling).
      polish_iterations: alternations `polish_kernel` runs at full resolution from a
        finished estimate ...
      polish_lambda: ... with this L0 weight (and dark-channel weight, when that term is
        on), held fixed: a near-photographic latent whose edges keep their own width, so
        the kernel fit stops absorbing it ...
      polish_threshold: ... and this tap threshold after every fit.
    """

    max_kernel_size: int
    scale: float
    coarsest_kernel: int
    iterations: int
    lambda_grad: float
    lambda_decay: float
    lambda_min: float
    beta_max: float
    kernel_reg: float
    kernel_cg_iterations: int
    kernel_nonneg_iterations: int
    edge_fraction: float
    edge_decay: float
    threshold: float
    final_threshold: float
    final_max_spread: float
    min_component: float
    energy: float
    dark_weight: float
    dark_patch: int
    dark_start: float
    dark_beta_max: float
    polish_iterations: int
    polish_lambda: float
    polish_threshold: float

    def __post_init__(self):
        if self.max_kernel_size < 3 or self.max_kernel_size % 2 == 0:
            raise ValueError(f"max_kernel_size must be odd and >= 3, got "
                             f"{self.max_kernel_size}")
        if not 0.2 < self.scale < 1:
            raise ValueError(f"scale must lie in (0.2, 1), got {self.scale}")
        if self.coarsest_kernel < 3 or self.coarsest_kernel % 2 == 0:
            raise ValueError(f"coarsest_kernel must be odd and >= 3, got "
                             f"{self.coarsest_kernel}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if not 0 <= self.final_threshold <= self.threshold < 1:
            raise ValueError(f"need 0 <= final_threshold <= threshold < 1, got "
                             f"{self.final_threshold}, {self.threshold}")
        if not 0 < self.energy <= 1:
            raise ValueError(f"energy must lie in (0, 1], got {self.energy}")
        if self.polish_iterations < 0 or self.polish_lambda <= 0 or not (
                0 <= self.polish_threshold < 1):
            raise ValueError(f"need polish_iterations >= 0, polish_lambda > 0 and 0 <= "
                             f"polish_threshold < 1, got {self.polish_iterations}, "
                             f"{self.polish_lambda}, {self.polish_threshold}")
        if self.dark_weight < 0 or self.dark_patch < 1 or self.dark_patch % 2 == 0:
            raise ValueError(f"dark_weight must be >= 0 and dark_patch odd, got "
                             f"{self.dark_weight}, {self.dark_patch}")


def settings_from_config(config: Any) -> KernelEstimation:
    """`KernelEstimation` from a config section; a missing or unknown field is an error."""
    return configs.as_dataclass(KernelEstimation, config, "estimation.",
                                source="jaxdeblur/configs/photo.py")


def _odd(value: float) -> int:
    n = max(3, int(math.ceil(value)))
    return n if n % 2 else n + 1


class Level(NamedTuple):
    """One pyramid level: image size and kernel size at that scale."""
    shape: tuple[int, int]
    kernel_size: int
    factor: float


def pyramid(shape: tuple[int, int], settings: KernelEstimation) -> list[Level]:
    """Pyramid levels, coarsest first, finest = the image itself.

    The number of levels is the one that brings ``max_kernel_size`` down to
    ``coarsest_kernel`` by steps of ``scale`` (Pan et al.: ``sqrt(1/2)``, to 5 px).
    """
    k = settings.max_kernel_size
    n = max(0, int(math.floor(math.log(settings.coarsest_kernel / k) /
                              math.log(settings.scale))))
    levels = []
    for s in range(n, -1, -1):
        factor = settings.scale ** s
        size = (max(8, int(round(shape[0] * factor))), max(8, int(round(shape[1] * factor))))
        levels.append(Level(size, _odd(k * factor) if s else k, factor))
    return levels


def _fast(n: int) -> int:
    return blur.next_fast_len(n)


def periodic_extension(image: jax.Array, pad_hw: tuple[int, int]) -> jax.Array:
    """Extends ``(H, W)`` to ``(H + ph, W + pw)`` so that the canvas is smoothly periodic.

    The added band interpolates between the last and the first row (column) with a
    raised-cosine ramp, so the circular Fourier solvers see no step at the image border
    (Liu & Jia 2008 solve a Laplace equation there; the ramp gives the same continuity of
    value at the seams).
    """
    ph, pw = pad_hw
    if ph:
        t = (jnp.arange(1, ph + 1, dtype=image.dtype) / (ph + 1))
        t = 0.5 - 0.5 * jnp.cos(jnp.pi * t)
        band = (1 - t)[:, None] * image[-1:, :] + t[:, None] * image[:1, :]
        image = jnp.concatenate([image, band], axis=0)
    if pw:
        t = (jnp.arange(1, pw + 1, dtype=image.dtype) / (pw + 1))
        t = 0.5 - 0.5 * jnp.cos(jnp.pi * t)
        band = (1 - t)[None, :] * image[:, -1:] + t[None, :] * image[:, :1]
        image = jnp.concatenate([image, band], axis=1)
    return image


def _kernel_otf(kernel: jax.Array, canvas: tuple[int, int]) -> jax.Array:
    """rfft2 of ``kernel`` with its centre tap at the canvas origin (`deconv.kernel_spectrum`
    without the channel axis): a correlation is ``conj(K)·X``, its adjoint ``K·Y``."""
    return deconv.kernel_spectrum(kernel, canvas)[..., 0]


def dark_pixels(image: jax.Array, patch: int) -> jax.Array:
    """Where ``image`` holds the minimum of some ``patch × patch`` window (a dark-channel pixel).

    The dark channel ``D(x)(c) = min_{p ∈ N(c)} x(p)`` (Pan et al. 2016; gray images: no
    minimum over colours) and the pixels it reads are those where the morphological opening
    (a max filter of ``D``) equals the image: a pixel is some window's minimum exactly when
    the largest window minimum around it is its own value. Both filters are separable.
    """
    def filt(x, op, init):
        x = jax.lax.reduce_window(x, init, op, (patch, 1), (1, 1), "SAME")
        return jax.lax.reduce_window(x, init, op, (1, patch), (1, 1), "SAME")

    dark = filt(image, jax.lax.min, jnp.inf)
    opened = filt(dark, jax.lax.max, -jnp.inf)
    return opened >= image


def l0_latent(canvas: jax.Array, kernel: jax.Array, *, lam: jax.Array, beta_max: float,
              num_beta: jax.Array, dark_weight: jax.Array = 0.0, dark_patch: int = 1,
              dark_beta_init: jax.Array = 0.0, num_dark: jax.Array = 1) -> jax.Array:
    """The L0-gradient latent image of a smoothly periodic blurry canvas.

    Solves ``min_x ||k ⋆ x − y||² + λ ||∇x||₀`` by half-quadratic splitting: auxiliary
    gradients ``g`` with penalty ``β||∇x − g||²``; ``g = ∇x`` where ``|∇x|² ≥ λ/β`` and 0
    elsewhere; ``x`` in closed form in Fourier; β doubles from 2λ ``num_beta`` times (up to
    ``beta_max``).

    Args:
      canvas: ``(Hc, Wc)`` smoothly periodic blurry image.
      kernel: ``(k, k)`` kernel, cross-correlation convention.
      lam: λ (a traced scalar).
      beta_max: upper bound of β.
      num_beta: number of β steps (a traced integer).
      dark_weight: weight of the L0 dark-channel term ``||D(x)||₀`` (Pan et al. 2016); 0
        leaves the plain L0-gradient latent. Solved by a second splitting: an outer loop
        (``num_dark`` steps, penalty μ doubling from ``dark_beta_init``) sets the
        dark-channel pixels whose square is below ``dark_weight/μ`` to 0 in a target ``u``,
        and every β step adds ``μ||x − u||²`` (Pan's ``L0Restoration_dark``).
      dark_patch: side of the dark channel's window (static).
      dark_beta_init: first μ (a traced scalar).
      num_dark: number of μ steps (a traced integer; 1 with ``dark_weight = 0``).

    Returns:
      ``(Hc, Wc)`` latent image.
    """
    shape = canvas.shape
    otf = _kernel_otf(kernel, shape)
    grad_energy = deconv.gradient_spectrum(shape, canvas.dtype)[..., 0]
    data = jnp.fft.rfft2(canvas) * otf           # Kᵀ y (adjoint of a correlation)
    kernel_energy = jnp.abs(otf) ** 2
    dark_on = dark_weight > 0

    def outer(_, carry):
        x, mu = carry
        mu = jnp.where(dark_on, mu, 0.0)
        zero = dark_pixels(x, dark_patch) & (x ** 2 < dark_weight / jnp.maximum(mu, 1e-30))
        target = jnp.fft.rfft2(jnp.where(zero, 0.0, x)) * mu

        def step(_, inner):
            x, beta = inner
            gx, gy = deconv.circular_gradients(x)
            keep = (gx ** 2 + gy ** 2) >= lam / beta
            gx, gy = gx * keep, gy * keep
            numerator = (data + target
                         + beta * jnp.fft.rfft2(deconv.circular_gradients_adjoint(gx, gy)))
            x = jnp.fft.irfft2(numerator / (kernel_energy + beta * grad_energy + mu),
                               s=shape)
            return x, jnp.minimum(beta * 2, beta_max)

        # A traced step count: λ shrinks over the alternations and moves num_beta by one
        # now and then, which as a static count compiled every level twice.
        x, _ = jax.lax.fori_loop(0, num_beta, step, (x, 2 * lam))
        return x, mu * 2

    x, _ = jax.lax.fori_loop(0, jnp.where(dark_on, num_dark, 1), outer,
                             (canvas, jnp.asarray(dark_beta_init, canvas.dtype)))
    return x


def select_gradients(latent: jax.Array, size: int, *, fraction: jax.Array):
    """The latent's gradients where their magnitude is among the strongest (Cho & Lee).

    Keeps ``fraction · size · sqrt(N)`` pixels (N pixels, ``size`` the kernel width), the
    rule of Cho & Lee 2009 (r = 2 there): enough edges in every direction to constrain a
    kernel of that size, few enough that texture and noise stay out of the fit.
    """
    gx, gy = deconv.circular_gradients(latent)
    magnitude = jnp.sqrt(gx ** 2 + gy ** 2)
    n = magnitude.size
    count = jnp.clip(fraction * size * jnp.sqrt(jnp.float32(n)), 1, n - 1).astype(jnp.int32)
    threshold = jnp.sort(magnitude.ravel())[n - count]
    keep = magnitude >= threshold
    return gx * keep, gy * keep


def fit_kernel(gradients, canvas: jax.Array, size: int, *, reg: float,
               iterations: int, init: jax.Array, nonneg_iterations: int = 0) -> jax.Array:
    """Least-squares kernel on its ``size × size`` support, by conjugate gradients.

    ``k = argmin Σ_d ||k ⋆ ∂_d x − ∂_d y||² + γ ||k||²`` with ``∂_d x`` the selected latent
    gradients (`select_gradients`) and ``∂_d y`` the blurry canvas's, all circular on the
    canvas: the normal operator is ``crop(F⁻¹(Σ_d |X_d|² · F(pad(k)))) + γ k`` and the
    right-hand side ``crop(F⁻¹(Σ_d X_d · conj(Y_d)))`` (Pan et al. 2014 solve the same with
    20 CG steps). With ``nonneg_iterations`` > 0 the CG result, clipped at zero, starts that
    many steps of accelerated projected gradient (FISTA, step 1/L with L = max(gram) + γ,
    the operator's largest eigenvalue) on the same objective subject to ``k ≥ 0``: the
    constraint inside the fit, rather than clipping afterwards, keeps the taps the data
    needs and drops the halo the ridge spreads around a thin trajectory. Not normalised
    (`clean_kernel`).
    """
    shape = canvas.shape
    xs = [jnp.fft.rfft2(g) for g in gradients]
    ys = [jnp.fft.rfft2(g) for g in deconv.circular_gradients(canvas)]
    gram = sum(jnp.abs(f) ** 2 for f in xs)
    r = size // 2

    def crop(full_spectrum):
        full = jnp.fft.irfft2(full_spectrum, s=shape)
        return jnp.roll(full, (r, r), axis=(0, 1))[:size, :size]

    def normal(k):
        return crop(gram * _kernel_otf(k, shape)) + reg * k

    rhs = crop(sum(a * jnp.conj(b) for a, b in zip(xs, ys)))
    kernel, _ = jax.scipy.sparse.linalg.cg(normal, rhs, x0=init, maxiter=iterations)
    if nonneg_iterations:
        step = 1.0 / (jnp.max(gram) + reg)

        def projected(_, carry):
            k, z, t = carry
            k_next = jnp.maximum(z - step * (normal(z) - rhs), 0)
            t_next = (1 + jnp.sqrt(1 + 4 * t * t)) / 2
            z_next = k_next + ((t - 1) / t_next) * (k_next - k)
            return k_next, z_next, t_next

        start = jnp.maximum(kernel, 0)
        kernel, _, _ = jax.lax.fori_loop(0, nonneg_iterations, projected,
                                         (start, start, jnp.float32(1)))
    return kernel


def clean_kernel(kernel: np.ndarray, *, threshold: float, min_component: float) -> np.ndarray:
    """Non-negative, faint taps and small isolated pieces removed, sum 1 (host side)."""
    k = np.maximum(np.asarray(kernel, np.float64), 0)
    if k.max() <= 0:
        out = np.zeros_like(k)
        out[k.shape[0] // 2, k.shape[1] // 2] = 1
        return out.astype(np.float32)
    k[k < threshold * k.max()] = 0
    k /= k.sum()
    labels, n = _pieces(k)
    if n > 1:
        mass = ndimage.sum(k, labels, index=np.arange(1, n + 1))
        for index, m in enumerate(mass, start=1):
            if m < min_component:
                k[labels == index] = 0
    k /= k.sum()
    return centre_kernel(k).astype(np.float32)


def _pieces(kernel: np.ndarray):
    """(labels, count) of the connected pieces (8-neighbours) of the kernel's support."""
    return ndimage.label(np.asarray(kernel) > 0, structure=np.ones((3, 3)))


def kernel_pieces(kernel: np.ndarray) -> int:
    """Connected pieces (8-neighbours) of the kernel's support. A camera path is one
    piece; `clean_kernel` already removes pieces under ``min_component`` of the mass, so a
    second piece here holds a real share of it — two blurs, not one path. (Measured:
    every one of 64 candidate estimates on Lai and the stand-in with error ratio below 2.6
    is one piece; 10 of the 20 above it are several.)"""
    return int(_pieces(kernel)[1])


def kernel_spread(kernel: np.ndarray) -> float:
    """Non-zero taps per pixel of the kernel's side: a shake path of length L and width w
    in a window of side ~L gives ~w·(L/side), 3–6 for real kernels (Lai's four: 3.3, 3.6,
    4.4, 5.4 after `clean_kernel`); a failed estimate spreads over the window."""
    kernel = np.asarray(kernel)
    return float((kernel > 0).sum() / kernel.shape[0])


def estimate_spread(kernel: np.ndarray, settings: KernelEstimation) -> float:
    """`kernel_spread` of an estimate as cleaned during the estimation (taps below
    ``settings.threshold`` of its maximum removed, cropped by ``settings.energy``): the
    same whether or not the last fit kept fainter taps (``final_threshold``); cleaning is
    idempotent, so an estimate already cleaned at ``threshold`` is measured as it is."""
    cleaned = clean_kernel(kernel, threshold=settings.threshold,
                           min_component=settings.min_component)
    return kernel_spread(crop_kernel_by_energy(cleaned, settings.energy))


def centre_kernel(k: np.ndarray) -> np.ndarray:
    """Shifts the kernel (integer pixels) so its centre of mass is at the middle tap.

    Taps shifted past the window's edge are dropped, not wrapped to the opposite side (a
    wrapped tap is a second, far-away path; on Lai's 23 px kernel 3, whose mass sits off
    the window's centre, wrapping alone cost an error ratio of 1.34 with the true kernel).
    The result is renormalised to the input's sum.
    """
    k = np.asarray(k)
    rows, cols = np.indices(k.shape)
    total = k.sum()
    cy, cx = (k * rows).sum() / total, (k * cols).sum() / total
    dy, dx = int(round(k.shape[0] // 2 - cy)), int(round(k.shape[1] // 2 - cx))
    out = np.zeros_like(k)
    h, w = k.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        k[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out * (total / out.sum())


def resize_kernel(kernel: np.ndarray, size: int) -> np.ndarray:
    """Resamples a kernel to ``size × size`` (bilinear, centre to centre), sum 1."""
    k = np.asarray(kernel, np.float64)
    zoom = size / k.shape[0]
    out = ndimage.zoom(k, zoom, order=1, grid_mode=True, mode="grid-constant")
    if out.shape[0] != size:
        fixed = np.zeros((size, size))
        n = min(size, out.shape[0])
        o_in, o_out = (out.shape[0] - n) // 2, (size - n) // 2
        fixed[o_out:o_out + n, o_out:o_out + n] = out[o_in:o_in + n, o_in:o_in + n]
        out = fixed
    out = np.maximum(out, 0)
    if out.sum() <= 0:
        out = np.zeros((size, size))
        out[size // 2, size // 2] = 1
    return (out / out.sum()).astype(np.float32)


def crop_kernel_by_energy(kernel: np.ndarray, energy: float, margin: int = 1) -> np.ndarray:
    """The smallest centred odd square holding ``energy`` of the kernel's mass (+ margin)."""
    k = np.asarray(kernel, np.float64)
    c = k.shape[0] // 2
    total = k.sum()
    for r in range(c + 1):
        if k[c - r:c + r + 1, c - r:c + r + 1].sum() >= energy * total:
            break
    r = min(c, r + margin)
    out = k[c - r:c + r + 1, c - r:c + r + 1]
    return (out / out.sum()).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("beta_max", "reg", "pad", "cg_iterations",
                                             "nonneg_iterations", "dark_patch"))
def _alternation(blurry, kernel, lam, fraction, dark, *, num_beta, num_dark, dark_mu,
                 beta_max, reg, pad, cg_iterations, nonneg_iterations, dark_patch):
    canvas = periodic_extension(blurry, pad)
    latent = l0_latent(canvas, kernel, lam=lam, beta_max=beta_max, num_beta=num_beta,
                       dark_weight=dark, dark_patch=dark_patch, dark_beta_init=dark_mu,
                       num_dark=num_dark)
    size = kernel.shape[0]
    gradients = select_gradients(latent, size, fraction=fraction)
    kernel = fit_kernel(gradients, canvas, size, reg=reg, iterations=cg_iterations,
                        init=kernel, nonneg_iterations=nonneg_iterations)
    return kernel, latent[:blurry.shape[0], :blurry.shape[1]]


def _resize_image(image: np.ndarray, shape: tuple[int, int]) -> jax.Array:
    return jax.image.resize(jnp.asarray(image), shape, method="linear", antialias=True)


class KernelEstimate(NamedTuple):
    """What `estimate_kernel` returns."""
    kernel: np.ndarray          # (k, k), sum 1, cropped to the support by energy
    full_kernel: np.ndarray     # (max_kernel_size, max_kernel_size) before the crop
    latent: Optional[np.ndarray]  # (H, W) the last L0 latent image (edges only)
    levels: list                # [(shape, kernel_size)] coarsest first


def _num_beta(lam: float, beta_max: float) -> int:
    return max(1, int(math.ceil(math.log2(beta_max / (2 * lam)))))


def _num_steps(start: float, stop: float) -> int:
    """Doublings from ``start`` until ``stop`` is reached (1 when ``start`` is 0)."""
    return max(1, int(math.ceil(math.log2(stop / start)))) if start > 0 else 1


class EstimationState(NamedTuple):
    """Where `estimate_kernel` stands after an alternation: enough to go on from there.

    ``level``/``iteration`` are the next ones to run (``iteration = 0``: the level starts
    from ``kernel`` resampled to its size); ``lam``, ``fraction`` and ``dark`` are that
    iteration's weights. Saved by the command after every alternation so an interrupted run
    resumes where it stopped, with the result it would have had (`state_to_arrays`).
    """
    level: int
    iteration: int
    kernel: np.ndarray
    lam: float
    fraction: float
    dark: float


def state_to_arrays(state: EstimationState) -> dict:
    """``{name: array}`` of a state, for ``np.savez`` (floats kept exact as float64)."""
    return {"level": np.int64(state.level), "iteration": np.int64(state.iteration),
            "kernel": np.asarray(state.kernel, np.float32), "lam": np.float64(state.lam),
            "fraction": np.float64(state.fraction), "dark": np.float64(state.dark)}


def state_from_arrays(arrays) -> EstimationState:
    """The inverse of `state_to_arrays`."""
    return EstimationState(int(arrays["level"]), int(arrays["iteration"]),
                           np.asarray(arrays["kernel"], np.float32), float(arrays["lam"]),
                           float(arrays["fraction"]), float(arrays["dark"]))


def estimate_kernel(blurry: np.ndarray, settings: KernelEstimation, *,
                    progress: Optional[Callable[[int, int, Level, int], None]] = None,
                    resume: Optional[EstimationState] = None,
                    on_state: Optional[Callable[[EstimationState], None]] = None
                    ) -> KernelEstimate:
    """Blind estimate of a uniform blur kernel, coarse to fine.

    Args:
      blurry: ``(H, W)`` float gray image in [0, 1] (luminance of a colour photo).
      settings: `KernelEstimation`.
      progress: called as ``progress(level_index, num_levels, level, iteration)`` before
        each alternation.
      resume: a state saved by ``on_state`` from the same image and settings: the estimate
        goes on from there and ends as the uninterrupted one.
      on_state: called with the `EstimationState` after every alternation.

    Returns:
      `KernelEstimate`; ``kernel`` is in the library's cross-correlation convention
      (``blurry ≈ blur.conv(sharp, kernel)``). ``latent`` is None when ``resume`` was
      already past the last level.
    """
    blurry = np.asarray(blurry, np.float32)
    if blurry.ndim != 2:
        raise ValueError(f"estimate_kernel takes a (H, W) gray image, got {blurry.shape}")
    if not np.all(np.isfinite(blurry)):
        raise ValueError("the blurry image holds NaN or infinite values")
    if min(blurry.shape) < settings.max_kernel_size + 2:
        raise ValueError(f"image {blurry.shape} is smaller than the kernel size "
                         f"{settings.max_kernel_size}: lower max_kernel_size or use a "
                         "larger image")
    levels = pyramid(blurry.shape, settings)
    if resume is not None and not (
            0 <= resume.level <= len(levels) and 0 <= resume.iteration < settings.iterations
            and resume.kernel.ndim == 2 and np.all(np.isfinite(resume.kernel))):
        raise ValueError(f"the saved state (level {resume.level}, iteration "
                         f"{resume.iteration}) does not belong to this estimate; delete it "
                         "to start again")
    kernel = None if resume is None else resume.kernel
    latent = None
    for index, level in enumerate(levels):
        if resume is not None and index < resume.level:
            continue
        y = (jnp.asarray(blurry) if level.factor == 1 else
             _resize_image(blurry, level.shape))
        pad = (_fast(y.shape[0] + level.kernel_size) - y.shape[0],
               _fast(y.shape[1] + level.kernel_size) - y.shape[1])
        if resume is not None and index == resume.level and resume.iteration > 0:
            first, lam, fraction, dark = (resume.iteration, resume.lam, resume.fraction,
                                          resume.dark)
        else:
            first, lam, fraction = 0, settings.lambda_grad, settings.edge_fraction
            dark = settings.dark_weight
            if kernel is None:
                kernel = np.zeros((level.kernel_size,) * 2, np.float32)
                c = level.kernel_size // 2
                kernel[c - 1:c + 2, c - 1:c + 2] = 1 / 9
            else:
                kernel = resize_kernel(kernel, level.kernel_size)
        for iteration in range(first, settings.iterations):
            if progress is not None:
                progress(index, len(levels), level, iteration)
            mu = dark / settings.dark_start
            raw, latent = _alternation(
                y, jnp.asarray(kernel), jnp.float32(lam), jnp.float32(fraction),
                jnp.float32(dark),
                num_beta=jnp.int32(_num_beta(lam, settings.beta_max)),
                num_dark=jnp.int32(_num_steps(mu, settings.dark_beta_max)),
                dark_mu=jnp.float32(mu),
                beta_max=settings.beta_max,
                reg=settings.kernel_reg, pad=pad,
                cg_iterations=settings.kernel_cg_iterations,
                nonneg_iterations=settings.kernel_nonneg_iterations,
                dark_patch=settings.dark_patch)
            kernel = clean_kernel(np.asarray(raw), threshold=settings.threshold,
                                  min_component=settings.min_component)
            if (index == len(levels) - 1 and iteration == settings.iterations - 1
                    and settings.final_threshold < settings.threshold
                    and estimate_spread(kernel, settings) <= settings.final_max_spread):
                kernel = clean_kernel(np.asarray(raw), threshold=settings.final_threshold,
                                      min_component=settings.min_component)
            lam = max(lam / settings.lambda_decay, settings.lambda_min)
            dark = max(dark / settings.lambda_decay, settings.lambda_min) if dark else 0.0
            fraction *= settings.edge_decay
            if on_state is not None:
                last = iteration + 1 == settings.iterations
                on_state(EstimationState(index + 1 if last else index,
                                         0 if last else iteration + 1, kernel, lam, fraction,
                                         dark))
    return KernelEstimate(crop_kernel_by_energy(kernel, settings.energy), kernel,
                          None if latent is None else np.asarray(latent),
                          [(lv.shape, lv.kernel_size) for lv in levels])


def _polish_plan(settings: KernelEstimation) -> KernelEstimation:
    """The settings of `polish_kernel`'s alternations (the finest level of ``settings``)."""
    lam = settings.polish_lambda
    return dataclasses.replace(
        settings, iterations=settings.polish_iterations, lambda_grad=lam, lambda_min=lam,
        dark_weight=lam if settings.dark_weight else 0.0,        # held: the floor is λ
        threshold=settings.polish_threshold, final_threshold=settings.polish_threshold,
        edge_fraction=settings.edge_fraction * settings.edge_decay ** settings.iterations)


def polish_kernel(blurry: np.ndarray, kernel: np.ndarray, settings: KernelEstimation, *,
                  progress: Optional[Callable[[int, int], None]] = None) -> KernelEstimate:
    """``polish_iterations`` more alternations at full resolution from a finished estimate.

    The coarse-to-fine estimate ends at the L0 weight its schedule reached (~1e-3): a
    cartoon latent of ideal steps, against which the kernel fit explains the photo's own
    soft edges as blur, and a path comes out two or three taps thick. Measured from the
    true kernel (stand-in, noise 0.002): 15 finest-level alternations with the estimate's
    settings end 3.9 dB below it in restoration PSNR; with ``polish_lambda`` 1e-4 and
    ``polish_threshold`` 0.05 1.8 dB below. So the estimate, once its shape is found,
    goes on at the lighter weight, held fixed (the dark-channel term too), with every
    edge taking part (the edge fraction the schedule ended at, still growing).

    Args:
      blurry: ``(H, W)`` the gray image the estimate was made on.
      kernel: ``(max_kernel_size, max_kernel_size)`` the estimate before cropping
        (`KernelEstimate.full_kernel`).
      settings: the `KernelEstimation` the estimate was made with.
      progress: called as ``progress(iteration, polish_iterations)`` before each
        alternation.

    Returns:
      `KernelEstimate` of the polished kernel (``kernel`` unchanged when
      ``polish_iterations`` is 0).
    """
    kernel = np.asarray(kernel, np.float32)
    if kernel.shape != (settings.max_kernel_size,) * 2:
        raise ValueError(f"polish_kernel takes the full {settings.max_kernel_size}x"
                         f"{settings.max_kernel_size} estimate, got {kernel.shape}")
    if settings.polish_iterations == 0:
        return KernelEstimate(crop_kernel_by_energy(kernel, settings.energy), kernel, None,
                              [])
    plan = _polish_plan(settings)
    levels = pyramid(np.shape(blurry), plan)
    start = EstimationState(len(levels) - 1, 0, kernel, plan.lambda_grad, plan.edge_fraction,
                            plan.dark_weight)
    report = None if progress is None else (
        lambda index, count, level, iteration: progress(iteration, plan.iterations))
    return estimate_kernel(blurry, plan, progress=report, resume=start)


def informative_crop(gray: np.ndarray, size: int) -> tuple[slice, slice]:
    """The ``size × size`` window (or the whole image if smaller) richest in strong edges.

    Edge content is the sum of gradient magnitudes above their 90th percentile, found for
    every window position with an integral image; clipped (saturated) pixels count for
    nothing since they break the linear blur model.
    """
    h, w = gray.shape
    if h <= size and w <= size:
        return slice(0, h), slice(0, w)
    sh, sw = min(size, h), min(size, w)
    gy, gx = np.gradient(np.asarray(gray, np.float64))
    magnitude = np.hypot(gx, gy)
    saturated = ndimage.binary_dilation((gray > 0.98) | (gray < 0.02), iterations=2)
    magnitude[saturated] = 0
    magnitude[magnitude < np.quantile(magnitude, 0.9)] = 0
    integral = np.pad(magnitude.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = (integral[sh:, sw:] - integral[:-sh, sw:] - integral[sh:, :-sw]
            + integral[:-sh, :-sw])
    i, j = np.unravel_index(np.argmax(sums), sums.shape)
    return slice(int(i), int(i) + sh), slice(int(j), int(j) + sw)
