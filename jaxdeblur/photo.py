"""Blind deblurring of a whole photo: where to look, how large a kernel, and full resolution.

The kernel is estimated on the luminance of the most informative crop of the photo
(`blind.informative_crop`: strong, unsaturated edges; SelfDeblur's author advises a crop of
about 500×500 for large photos), coarse to fine (`blind.estimate_kernel`), with a kernel
size chosen from the image unless given, and polished at full resolution with a light
prior (`blind.polish_kernel`); then every channel of the full-resolution photo is
restored with that kernel by a fast non-blind solver (`deconv.uniform`, hyper-Laplacian
prior, masked 'valid' data term so the borders do not ring), or by Deep EM's DIP posterior
mean with the kernel fixed (`restorer = "dip"`, `mcem.deblur(known_kernels=...)`), which
also gives the posterior standard deviation.

Settings come from `jaxdeblur/configs/photo.py`, fixed once in a frozen `PhotoSettings`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import pathlib
import time
import zipfile
from typing import Any, Callable, NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

from jaxdeblur import blind, blur, configs, deconv, mcem

__all__ = ["Restoration", "PhotoSettings", "settings_from_config", "luminance",
           "kernel_size_for", "PhotoResult", "deblur_uniform", "restore", "fingerprint",
           "save_state", "load_state", "PhotoDeblurrer", "kernel_spread", "estimate_spread",
           "kernel_pieces", "estimate_field", "restore_field", "cell_centres", "PhotoState",
           "normalized_sparsity", "restoration_weight"]


@dataclasses.dataclass(frozen=True)
class Restoration:
    """Settings of the non-blind solver (`deconv.uniform`; see its docstring).

    ``pnp_iterations > 0``: the final uniform restoration is then refined by
    `deconv.pnp_refine` (plug-and-play with the DCT denoiser, ``pnp_*`` its settings).

    ``weight`` is the prior weight of the choice among candidate kernels; the final
    restoration's is `restoration_weight`: ``max(min_weight, noise_weight · σ)`` with σ
    the photo's noise (`deconv.estimate_noise`), or ``weight`` when ``noise_weight`` is 0;
    ``lossy_min_weight`` replaces ``min_weight`` for lossily compressed photos (JPEG).
    """
    weight: float
    noise_weight: float
    min_weight: float
    lossy_min_weight: float
    alpha: float
    beta_init: float
    beta_max: float
    beta_rate: float
    inner_iterations: int
    cg_iterations: int
    newton_iterations: int
    margin: int
    pnp_iterations: int
    pnp_sigma_start: float
    pnp_lambda: float
    pnp_patch: int
    pnp_threshold: float


@dataclasses.dataclass(frozen=True)
class PhotoSettings:
    """Everything `deblur_uniform` reads.

    Attributes:
      working_size: side of the crop the kernel is estimated on (the whole photo if
        smaller).
      kernel_size: odd kernel size to search, or 0 to choose it from the crop
        (`kernel_size_for`).
      candidates: the kernel estimates made, each ``(kernel_fraction,
        kernel_nonneg_iterations)``: with ``kernel_size = 0`` the searched size is
        ``kernel_fraction`` of the crop's shorter side ..., and the kernel fit is
        constrained non-negative for that many steps (`blind.fit_kernel`). Estimates that
        come out identical in settings are made once. Of those that are not diffuse, the
        one whose restoration of the crop is sparsest in gradients (`normalized_sparsity`)
        is kept.
      min_kernel_size, max_kernel_size: ... clipped to these bounds (odd).
      estimation: `blind.KernelEstimation` (its ``max_kernel_size`` and
        ``kernel_nonneg_iterations`` are replaced by each candidate's).
      restoration: `Restoration`.
      restorer: ``"hyper_laplacian"`` (fast, default) or ``"dip"`` (Deep EM's posterior
        mean with the kernel fixed).
      field_grid: ``(rows, columns)`` of the kernel field for spatially varying blur
        (Deep EM's filter-flow cells); ``(1, 1)``: one kernel for the photo.
      field_crop: side of the crop around each cell's centre its kernel is refined on.
      field_levels: the finest pyramid levels re-run for each cell, starting from the
        photo's kernel.
      max_kernel_pieces: an estimate in more connected pieces than this (`kernel_pieces`)
        is not one camera path and is not used either.
      max_kernel_spread: an estimate with more non-zero taps than this many per pixel of
        its side is not a camera-shake path but a diffuse cloud (`estimate_spread`): the
        photo is then returned unchanged, with a warning, rather than made worse.
    """
    working_size: int
    kernel_size: int
    candidates: tuple
    min_kernel_size: int
    max_kernel_size: int
    estimation: blind.KernelEstimation
    restoration: Restoration
    restorer: str
    field_grid: tuple
    field_crop: int
    field_levels: int
    max_kernel_spread: float
    max_kernel_pieces: int

    def __post_init__(self):
        if (len(self.field_grid) != 2 or min(self.field_grid) < 1
                or not all(isinstance(g, int) for g in self.field_grid)):
            raise ValueError(f"field_grid must be two positive integers (rows, columns), "
                             f"got {self.field_grid!r}")
        if self.field_levels < 1 or self.field_crop < 32:
            raise ValueError(f"field_levels must be >= 1 and field_crop >= 32, got "
                             f"{self.field_levels}, {self.field_crop}")
        if self.restorer not in ("hyper_laplacian", "dip"):
            raise ValueError(f"restorer must be 'hyper_laplacian' or 'dip', got "
                             f"{self.restorer!r}")
        if self.kernel_size and (self.kernel_size < 3 or self.kernel_size % 2 == 0):
            raise ValueError(f"kernel_size must be 0 (automatic) or odd and >= 3, got "
                             f"{self.kernel_size}")
        if self.working_size < 32:
            raise ValueError(f"working_size must be at least 32, got {self.working_size}")
        if self.max_kernel_pieces < 1:
            raise ValueError(f"max_kernel_pieces must be at least 1, got "
                             f"{self.max_kernel_pieces}")
        if not self.candidates or not all(
                len(c) == 2 and 0 < c[0] <= 0.5 and isinstance(c[1], int) and c[1] >= 0
                for c in self.candidates):
            raise ValueError("candidates must be a non-empty tuple of (kernel_fraction in "
                             "(0, 0.5], kernel_nonneg_iterations >= 0) pairs, got "
                             f"{self.candidates!r}")


def settings_from_config(config: Any) -> PhotoSettings:
    """Frozen `PhotoSettings` from the photo config; a missing or unknown field is an error
    that names it."""
    return configs.as_dataclass(PhotoSettings, config, source="jaxdeblur/configs/photo.py")


def luminance(image: np.ndarray) -> np.ndarray:
    """``(H, W)`` luma of an ``(H, W, C)`` image: BT.601 for 3 channels, the channel for 1."""
    image = np.asarray(image, np.float32)
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected an (H, W, 1) or (H, W, 3) image, got {image.shape}")
    if image.shape[-1] == 1:
        return image[..., 0]
    return image @ np.asarray([0.299, 0.587, 0.114], np.float32)


def _odd_at_most(n: float) -> int:
    n = int(math.floor(n))
    return n if n % 2 else n - 1


def kernel_size_for(crop_hw: tuple[int, int], settings: PhotoSettings,
                    fraction: Optional[float] = None) -> int:
    """The kernel size searched on a crop: the configured one, or a fraction of the crop
    (``fraction``, by default the first candidate's).

    The search is generous on purpose: the estimate is cropped to the support its energy
    occupies afterwards (`blind.crop_kernel_by_energy`), so a kernel smaller than the
    window costs little, while one larger than the window cannot be found.
    """
    limit = _odd_at_most(min(crop_hw) - 2)
    if fraction is None:
        fraction = settings.candidates[0][0]
    if settings.kernel_size:
        size = settings.kernel_size
    else:
        size = _odd_at_most(fraction * min(crop_hw))
        size = min(max(size, settings.min_kernel_size), settings.max_kernel_size)
    if size > limit:
        raise ValueError(f"a {size}x{size} kernel does not fit the {crop_hw[0]}x{crop_hw[1]} "
                         "image: the image must be larger than the kernel (set a smaller "
                         "kernel_size)")
    return size


# Progress accounting (not a method setting): the restoration's cost in pixel-iterations of
# the kernel estimate, per pixel of the photo (about 30 FFT solves against a level's ~10).
_RESTORATION_WORK = 3


kernel_spread = blind.kernel_spread
kernel_pieces = blind.kernel_pieces


def estimate_spread(kernel: np.ndarray, settings: PhotoSettings) -> float:
    """`blind.estimate_spread` with the photo's estimation settings: the diffuse check."""
    return blind.estimate_spread(kernel, settings.estimation)


def normalized_sparsity(image: np.ndarray) -> float:
    """``‖∇x‖₁ / ‖∇x‖₂`` of an ``(H, W)`` image (Krishnan et al. 2011): low for sharp
    edges on flat regions, higher for a blurry image (many small gradients) and for the
    ringing a wrong kernel leaves after deconvolution; scale-invariant."""
    x = np.asarray(image, np.float64)
    gh, gv = np.diff(x, axis=1), np.diff(x, axis=0)
    l2 = math.sqrt(float((gh ** 2).sum() + (gv ** 2).sum()))
    return float(np.abs(gh).sum() + np.abs(gv).sum()) / max(l2, 1e-12)


class PhotoState(NamedTuple):
    """Where `deblur_uniform` stands: enough to go on from there after an interruption.

    ``candidate``: the estimate in progress (index into the distinct candidates);
    ``done``: the full kernels (before the crop by energy) of the finished ones;
    ``estimate``: the state of the one in progress (None: it starts afresh).
    """
    candidate: int
    done: tuple
    estimate: Optional[blind.EstimationState]


class PhotoResult(NamedTuple):
    restored: np.ndarray        # (H, W, C) float32 in [0, 1]
    kernel: np.ndarray          # (k, k), sum 1, cross-correlation convention
    crop: tuple                 # (row slice, column slice) the kernel was estimated on
    searched_size: int          # the kernel size searched
    uncertainty: Optional[np.ndarray]  # (H, W, C) posterior std with restorer "dip"
    kernels: Optional[np.ndarray] = None   # (G, k, k) the field with field_grid > (1, 1)
    centres: Optional[np.ndarray] = None   # (G, 2) their (y, x) in the photo
    warning: Optional[str] = None          # set when the photo was returned unchanged
    chosen: int = 0                        # the candidate kept (index among the distinct)
    scores: tuple = ()                     # normalized_sparsity per distinct candidate
    #                                        (None: diffuse or not compared)
    noise: Optional[float] = None          # the photo's noise σ (`restoration_weight`)
    weight: Optional[float] = None         # the final restoration's prior weight


def restoration_weight(blurry: np.ndarray, settings: PhotoSettings, *,
                       lossy: bool = False) -> tuple[float, float]:
    """The final restoration's prior weight for ``blurry`` (H, W, C), and its noise σ.

    ``max(min_weight, noise_weight · σ)``, σ the mean over channels of
    `deconv.estimate_noise`: a noisier photo needs a stronger prior, a clean one keeps
    more detail; the floor holds back the ringing an estimated kernel's errors bring
    (measured in `jaxdeblur/configs/photo.py`). ``lossy``: the photo was lossily
    compressed (JPEG), whose block and ringing errors the white-noise estimate does not
    see and a light prior amplifies; the floor is then ``lossy_min_weight``.
    ``noise_weight = 0``: ``weight``.
    """
    r = settings.restoration
    sigma = float(np.mean(np.asarray(deconv.estimate_noise(jnp.asarray(blurry, jnp.float32)))))
    if r.noise_weight == 0:
        return float(r.weight), sigma
    floor = r.lossy_min_weight if lossy else r.min_weight
    return max(float(floor), float(r.noise_weight) * sigma), sigma


def restore(blurry: np.ndarray, kernel: np.ndarray, settings: PhotoSettings,
            *, mcem_config: Any = None, lossy: bool = False,
            weight: Optional[float] = None,
            noise: Optional[float] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Non-blind restoration of every channel of ``blurry`` ``(H, W, C)`` with ``kernel``
    (the hyper-Laplacian one with ``weight``, by default the one `restoration_weight`
    chooses, refined by `deconv.pnp_refine` when ``restoration.pnp_iterations > 0``;
    ``lossy``: the photo was JPEG-compressed; ``noise``: the photo's σ from
    `restoration_weight`, when the caller has it already)."""
    if settings.restorer == "dip":
        if mcem_config is None:
            raise ValueError("restorer 'dip' needs the MCEM config (mcem_config)")
        config = mcem_config.copy_and_resolve_references()
        config.kernel_size = int(kernel.shape[0])
        config.grid = (1, 1)
        result = mcem.deblur(jnp.asarray(blurry), config, known_kernels=np.asarray(kernel))
        return (np.clip(np.asarray(result.image), 0, 1),
                np.asarray(result.uncertainty))
    sigma = noise
    if weight is None:
        weight, sigma = restoration_weight(blurry, settings, lossy=lossy)
    restored = _restore_sparse(blurry, kernel, settings, weight)
    r = settings.restoration
    if r.pnp_iterations:
        if sigma is None:
            _, sigma = restoration_weight(blurry, settings, lossy=lossy)
        restored = np.clip(np.asarray(deconv.pnp_refine(
            jnp.asarray(blurry, jnp.float32), jnp.asarray(kernel, jnp.float32),
            jnp.asarray(restored), noise=sigma, sigma_start=max(r.pnp_sigma_start, sigma),
            lam=r.pnp_lambda, iterations=r.pnp_iterations, patch=r.pnp_patch,
            threshold=r.pnp_threshold, cg_iterations=r.cg_iterations, margin=r.margin)), 0, 1)
    return restored, None


def _restore_sparse(blurry: np.ndarray, kernel: np.ndarray, settings: PhotoSettings,
                    weight: float) -> np.ndarray:
    """The hyper-Laplacian restoration (`deconv.uniform`) of every channel, in [0, 1]."""
    r = settings.restoration
    restored = deconv.uniform(
        jnp.asarray(blurry, jnp.float32), jnp.asarray(kernel, jnp.float32),
        weight=weight, alpha=r.alpha, beta_init=r.beta_init, beta_max=r.beta_max,
        beta_rate=r.beta_rate, inner_iterations=r.inner_iterations,
        cg_iterations=r.cg_iterations, newton_iterations=r.newton_iterations,
        margin=r.margin)
    return np.clip(np.asarray(restored), 0, 1)


def _is_path(spread: float, pieces: int, settings: PhotoSettings) -> bool:
    """An estimate the restoration may use: not a diffuse cloud (`estimate_spread`) and in
    one camera path's number of pieces (`kernel_pieces`)."""
    return spread <= settings.max_kernel_spread and pieces <= settings.max_kernel_pieces


def deblur_uniform(image: np.ndarray, settings: PhotoSettings, *,
                   progress: Optional[Callable[[str, float, bool], None]] = None,
                   mcem_config: Any = None,
                   resume: Optional[PhotoState] = None,
                   on_state: Optional[Callable[[PhotoState], None]] = None,
                   lossy: bool = False) -> PhotoResult:
    """Blind deblurring of a photo blurred by one (uniform) kernel.

    Args:
      image: ``(H, W, C)`` float in [0, 1], C = 1 or 3.
      settings: `PhotoSettings`.
      progress: called as ``progress(line, fraction_done, milestone)`` before each
        alternation of the kernel estimate and before the restoration; the fraction counts
        work in pixels; ``milestone`` is True at the start of a level, of the kernel's
        polish and of the restoration (the lines worth printing in any case).
      mcem_config: the MCEM config, needed only by ``restorer = "dip"``.
      resume: a `PhotoState` saved by ``on_state`` for the same photo and settings: the
        run goes on from there and ends as the uninterrupted one.
      on_state: called with the `PhotoState` after every alternation of every estimate.
      lossy: the photo was lossily compressed (JPEG): the restoration's prior weight
        keeps the higher floor (`restoration_weight`).

    Returns:
      `PhotoResult`.
    """
    image = np.asarray(image, np.float32)
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected an (H, W, 1) or (H, W, 3) image, got {image.shape}")
    if not np.all(np.isfinite(image)):
        raise ValueError("the image holds NaN or infinite values")
    gray = luminance(image)
    crop = blind.informative_crop(gray, settings.working_size)
    patch = gray[crop]
    plans = []
    for fraction, nonneg in settings.candidates:
        plan = dataclasses.replace(
            settings.estimation, max_kernel_size=kernel_size_for(patch.shape, settings,
                                                                 fraction),
            kernel_nonneg_iterations=nonneg)
        if plan not in plans:
            plans.append(plan)
    if resume is not None and not (0 <= resume.candidate <= len(plans)
                                   and len(resume.done) == resume.candidate):
        raise ValueError(f"the saved state (estimate {resume.candidate + 1}) does not belong "
                         "to this run; delete it to start again")

    plan_levels = [blind.pyramid(patch.shape, plan) for plan in plans]
    level_work = [[lv.shape[0] * lv.shape[1] * plan.iterations for lv in levels]
                  for plan, levels in zip(plans, plan_levels)]
    estimate_work = [sum(work) for work in level_work]
    choose_work = _RESTORATION_WORK * patch.size * len(plans) if len(plans) > 1 else 0
    cells = int(np.prod(settings.field_grid))
    if cells > 1:
        cell_shape = (min(settings.field_crop, gray.shape[0]),
                      min(settings.field_crop, gray.shape[1]))
        cell_work = max(sum(lv.shape[0] * lv.shape[1] * plan.iterations for lv in
                            blind.pyramid(cell_shape, plan)[-settings.field_levels:])
                        for plan in plans)
    else:
        cell_work = 0
    before_field = sum(estimate_work) + choose_work
    # The chosen estimate is polished when the photo gets one kernel. Not the cells': on
    # 128 px cells (tests/test_blind.py's two-stroke field) polishing them loses 2.8 dB.
    polish_work = patch.size * settings.estimation.polish_iterations if cells == 1 else 0
    total = before_field + cells * cell_work + polish_work + \
        _RESTORATION_WORK * image.shape[0] * image.shape[1]

    done = list(resume.done) if resume is not None else []
    for index in range(len(done), len(plans)):
        plan = plans[index]
        name = f"estimate {index + 1}/{len(plans)}, " if len(plans) > 1 else ""

        def level_progress(level_index, count, level, iteration, index=index, name=name,
                           plan=plan):
            if progress is not None:
                work = level_work[index]
                finished = (sum(estimate_work[:index]) + sum(work[:level_index])
                            + work[level_index] * iteration / plan.iterations)
                progress(f"{name}kernel level {level_index + 1}/{count}: {level.shape[0]}x"
                         f"{level.shape[1]} px, kernel {level.kernel_size}x"
                         f"{level.kernel_size}, iteration {iteration + 1}/{plan.iterations}",
                         finished / total, iteration == 0)

        start = resume.estimate if resume is not None and index == resume.candidate else None
        report = None if on_state is None else (
            lambda state, index=index: on_state(PhotoState(index, tuple(done), state)))
        estimate = blind.estimate_kernel(patch, plan, progress=level_progress, resume=start,
                                         on_state=report)
        done.append(np.asarray(estimate.full_kernel, np.float32))
        if on_state is not None:
            on_state(PhotoState(index + 1, tuple(done), None))

    estimates = [blind.crop_kernel_by_energy(full, settings.estimation.energy)
                 for full in done]
    spreads = [estimate_spread(full, settings) for full in done]
    pieces = [kernel_pieces(k) for k in estimates]
    usable = [i for i in range(len(done)) if _is_path(spreads[i], pieces[i], settings)]
    weight, sigma = restoration_weight(image, settings, lossy=lossy)
    if not usable:
        k = estimates[0].shape[0]
        why = (f"a diffuse cloud ({spreads[0]:.1f} taps per pixel of its side, more than "
               f"max_kernel_spread = {settings.max_kernel_spread})"
               if spreads[0] > settings.max_kernel_spread else
               f"{pieces[0]} separate pieces, not one camera path (max_kernel_pieces = "
               f"{settings.max_kernel_pieces})")
        return PhotoResult(np.clip(image, 0, 1), estimates[0], crop, plans[0].max_kernel_size,
                           None,
                           warning=f"no reliable kernel found: the {k}x{k} estimate is {why}"
                           "; the photo is returned unchanged. A blur this large or this "
                           "complex may need --set kernel_size=... (odd, the blur's extent "
                           "in pixels) or a spatially varying estimate (--set "
                           "'field_grid=(2,3)')",
                           noise=sigma)
    chosen, scores = usable[0], [None] * len(plans)
    if len(usable) > 1:
        if progress is not None:
            progress(f"choosing among {len(usable)} kernel estimates (sharpest restoration "
                     "of the crop)", sum(estimate_work) / total, True)
        for i in usable:
            scores[i] = normalized_sparsity(_restore_sparse(
                patch[..., None], estimates[i], settings, settings.restoration.weight)[..., 0])
        chosen = min(usable, key=lambda i: scores[i])
    kernel, plan = estimates[chosen], plans[chosen]
    size = plan.max_kernel_size
    if tuple(settings.field_grid) != (1, 1):
        def cell_progress(index, count):
            if progress is not None:
                progress(f"kernel field: cell {index + 1}/{count}",
                         (before_field + index * cell_work) / total, True)

        kernels, geometry = estimate_field(gray, done[chosen], settings, plan,
                                           progress=cell_progress)
        if progress is not None:
            progress(f"restoring {image.shape[0]}x{image.shape[1]}x{image.shape[2]} with "
                     f"{len(kernels)} kernels of {kernels.shape[1]}x{kernels.shape[1]}",
                     (before_field + cells * cell_work) / total, True)
        restored = restore_field(image, kernels, geometry, settings, weight=weight)
        return PhotoResult(restored, kernel, crop, size, None, kernels,
                           cell_centres(geometry), chosen=chosen, scores=tuple(scores),
                           noise=sigma, weight=weight)
    if plan.polish_iterations:
        def polish_progress(iteration, count):
            if progress is not None:
                progress(f"polishing the kernel at full resolution: iteration "
                         f"{iteration + 1}/{count}",
                         (before_field + polish_work * iteration / count) / total,
                         iteration == 0)

        polished = blind.polish_kernel(patch, done[chosen], plan, progress=polish_progress)
        # kept while it is still one camera path (the check every estimate passed above)
        if _is_path(estimate_spread(polished.full_kernel, settings),
                    kernel_pieces(polished.kernel), settings):
            kernel = polished.kernel
    if progress is not None:
        progress(f"restoring {image.shape[0]}x{image.shape[1]}x{image.shape[2]} with a "
                 f"{kernel.shape[0]}x{kernel.shape[0]} kernel "
                 f"({settings.restorer})", (before_field + polish_work) / total, True)
    restored, uncertainty = restore(image, kernel, settings, mcem_config=mcem_config,
                                    weight=weight, noise=sigma)
    return PhotoResult(restored, kernel, crop, size, uncertainty, chosen=chosen,
                       scores=tuple(scores), noise=sigma,
                       weight=weight if settings.restorer == "hyper_laplacian" else None)


def cell_centres(geometry) -> np.ndarray:
    """``(G, 2)`` photo coordinates ``(y, x)`` of the filter-flow cells, row-major."""
    top, _, left, _ = geometry.pad
    ys = np.asarray(geometry.y_patch_centers) - top
    xs = np.asarray(geometry.x_patch_centers) - left
    return np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2).astype(np.float32)


def estimate_field(gray: np.ndarray, kernel: np.ndarray, settings: PhotoSettings,
                   estimation: blind.KernelEstimation, *,
                   progress: Optional[Callable[[int, int], None]] = None):
    """Per-cell kernels of a spatially varying blur, each refined from the photo's kernel.

    Around every cell centre of the filter-flow grid (``settings.field_grid``) a crop of
    ``field_crop`` pixels (moved inside the photo) re-runs the ``field_levels`` finest
    levels of the coarse-to-fine estimate, starting from ``kernel`` (the photo's
    ``(K, K)`` estimate before its crop by energy): the uniform estimate fixes the kernel's
    scale and gross shape, the cells only bend it.

    Returns:
      ``(kernels (G, k, k), geometry)``: one odd size ``k`` holding ``estimation.energy``
      of every kernel's mass, and the `blur.EFFGeometry` they act on.
    """
    h, w = gray.shape
    size = kernel.shape[0]
    geometry = blur.eff_windows((h, w), tuple(settings.field_grid), size)
    centres = cell_centres(geometry)
    side_h, side_w = min(settings.field_crop, h), min(settings.field_crop, w)
    kernels = []
    for index, (cy, cx) in enumerate(centres):
        if progress is not None:
            progress(index, len(centres))
        top = int(np.clip(round(cy) - side_h // 2, 0, h - side_h))
        left = int(np.clip(round(cx) - side_w // 2, 0, w - side_w))
        patch = gray[top:top + side_h, left:left + side_w]
        levels = blind.pyramid(patch.shape, estimation)
        start = blind.EstimationState(max(0, len(levels) - settings.field_levels), 0,
                                      kernel, 0.0, 0.0, 0.0)
        kernels.append(blind.estimate_kernel(patch, estimation, resume=start).full_kernel)
    kernels = np.stack(kernels)
    radius = max(blind.crop_kernel_by_energy(k, estimation.energy).shape[0]
                 for k in kernels) // 2
    c = size // 2
    kernels = kernels[:, c - radius:c + radius + 1, c - radius:c + radius + 1]
    kernels = kernels / kernels.sum(axis=(1, 2), keepdims=True)
    geometry = blur.eff_windows((h, w), tuple(settings.field_grid), 2 * radius + 1)
    return kernels.astype(np.float32), geometry


def restore_field(blurry: np.ndarray, kernels: np.ndarray, geometry,
                  settings: PhotoSettings, *, lossy: bool = False,
                  weight: Optional[float] = None) -> np.ndarray:
    """Non-blind restoration of every channel with a kernel field (`deconv.filter_flow`,
    the same hyper-Laplacian prior and weight as `restore`)."""
    r = settings.restoration
    if weight is None:
        weight, _ = restoration_weight(blurry, settings, lossy=lossy)
    restored = deconv.filter_flow(
        jnp.asarray(blurry, jnp.float32), jnp.asarray(kernels, jnp.float32), geometry,
        weight=weight, alpha=r.alpha, beta_init=r.beta_init, beta_max=r.beta_max,
        beta_rate=r.beta_rate, inner_iterations=r.inner_iterations,
        cg_iterations=r.cg_iterations, newton_iterations=r.newton_iterations)
    return np.clip(np.asarray(restored), 0, 1)


def fingerprint(image: np.ndarray, settings: PhotoSettings) -> str:
    """A digest of the photo's pixels and the settings: a saved state resumes only the run
    it came from."""
    digest = hashlib.sha256(np.ascontiguousarray(image, np.float32).tobytes())
    digest.update(repr(image.shape).encode())
    digest.update(repr(settings).encode())
    return digest.hexdigest()


def save_state(path: pathlib.Path, state: PhotoState, key: str) -> None:
    """Writes a state atomically (a temporary file renamed over the old one)."""
    arrays = {"candidate": np.int64(state.candidate), "num_done": np.int64(len(state.done))}
    arrays.update({f"done_{i}": np.asarray(k, np.float32) for i, k in enumerate(state.done)})
    if state.estimate is not None:
        arrays.update({f"estimate_{name}": value for name, value in
                       blind.state_to_arrays(state.estimate).items()})
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, fingerprint=np.asarray(key), **arrays)
    os.replace(tmp, path)


def _state_from_arrays(arrays) -> PhotoState:
    done = tuple(np.asarray(arrays[f"done_{i}"], np.float32)
                 for i in range(int(arrays["num_done"])))
    names = [n[len("estimate_"):] for n in arrays.files if n.startswith("estimate_")]
    estimate = (blind.state_from_arrays({n: arrays[f"estimate_{n}"] for n in names})
                if names else None)
    return PhotoState(int(arrays["candidate"]), done, estimate)


def load_state(path: pathlib.Path, key: str) -> Optional[PhotoState]:
    """The state saved at ``path`` for the run ``key``, or None (absent, another photo or
    other settings). A file that cannot be read is an error naming it."""
    if not path.exists():
        return None
    try:
        with np.load(path) as arrays:
            if str(arrays["fingerprint"]) != key:
                return None
            return _state_from_arrays(arrays)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise ValueError(f"the saved state {path} is damaged ({err}); delete it to start "
                         "this photo again") from err


class PhotoDeblurrer:
    """`deblur_uniform` behind the interface of the command's runners.

    ``deblur(image, key=..., state_file=..., lossy=...)`` returns ``{"image", "kernels" (1, k, k),
    "centres" (1, 2), "metrics", ["uncertainty"]}``; ``progress(line)`` receives a line at
    every pyramid level (and every ``progress_every`` seconds within one) with the elapsed
    time and an estimate of the time left (work counted in pixels per level). With a
    ``state_file`` the kernel estimate is saved after every alternation and a later call on
    the same photo with the same settings goes on from it. ``stop_requested()``, asked
    before every iteration, stops the run there with ``KeyboardInterrupt`` when it says
    so: a caller whose signal handlers only set a flag gets a stop between two jitted
    steps (a ``KeyboardInterrupt`` raised by a handler inside JAX's C++ code would arrive
    as some other error).
    """

    def __init__(self, settings: PhotoSettings, *, mcem_config: Any = None,
                 progress: Optional[Callable[[str], None]] = None,
                 progress_every: float = 10.0,
                 stop_requested: Optional[Callable[[], bool]] = None):
        self.settings, self.mcem_config, self.progress = settings, mcem_config, progress
        self.progress_every = progress_every
        self.stop_requested = stop_requested

    def deblur(self, image: np.ndarray, *, key=None,
               state_file: Optional[pathlib.Path] = None, lossy: bool = False) -> dict:
        del key  # the estimate is deterministic
        start = time.perf_counter()
        last = [-math.inf]

        def report(line: str, fraction: float, milestone: bool):
            if self.stop_requested is not None and self.stop_requested():
                raise KeyboardInterrupt
            if self.progress is None:
                return
            now = time.perf_counter()
            if not milestone and now - last[0] < self.progress_every:
                return
            last[0] = now
            elapsed = now - start
            eta = (f", about {elapsed * (1 - fraction) / fraction:.0f} s left"
                   if fraction > 0 else "")
            self.progress(f"{line} ({elapsed:.1f} s elapsed{eta})")

        resume, on_state = None, None
        if state_file is not None:
            state_file = pathlib.Path(state_file)
            run_key = fingerprint(image, self.settings)
            resume = load_state(state_file, run_key)
            if resume is not None and self.progress is not None:
                where = (f"level {resume.estimate.level + 1}, iteration "
                         f"{resume.estimate.iteration + 1}" if resume.estimate is not None
                         else "its start")
                self.progress(f"resuming from {state_file} (estimate {resume.candidate + 1} "
                              f"at {where})")
            on_state = lambda state: save_state(state_file, state, run_key)  # noqa: E731

        result = deblur_uniform(image, self.settings, progress=report,
                                mcem_config=self.mcem_config, resume=resume,
                                on_state=on_state, lossy=lossy)
        k = result.kernel.shape[0]
        rows, cols = result.crop
        out = {"image": result.restored, "kernels": result.kernel[None],
               "centres": np.asarray([[(rows.start + rows.stop) / 2,
                                       (cols.start + cols.stop) / 2]], np.float32),
               "metrics": [], "kernel_size": k}
        if result.kernels is not None:
            out["kernels"], out["centres"] = result.kernels, result.centres
        if result.warning is not None and self.progress is not None:
            self.progress(f"warning: {result.warning}")
        if result.uncertainty is not None:
            out["uncertainty"] = result.uncertainty.mean(-1)
        if self.progress is not None:
            prior = ("" if result.weight is None else
                     f", noise {result.noise:.4f}, prior weight {result.weight:.1e}")
            self.progress(f"done: {k}x{k} kernel (searched {result.searched_size}{prior}) in "
                          f"{time.perf_counter() - start:.1f} s")
        return out

    def kernels(self, image: np.ndarray, grid, *, key=None):
        """``(kernels (1, k, k), centres (1, 2))``: one kernel for the photo (``grid`` is
        ignored: the estimate is uniform)."""
        del grid
        out = self.deblur(image, key=key)
        return out["kernels"], out["centres"]
