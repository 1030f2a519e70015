"""Blind deblurring of a whole photo: where to look, how large a kernel, and full resolution.

The kernel is estimated on the luminance of the most informative crop of the photo
(`blind.informative_crop`: strong, unsaturated edges; SelfDeblur's author advises a crop of
about 500×500 for large photos), coarse to fine (`blind.estimate_kernel`), with a kernel
size chosen from the image unless given; then every channel of the full-resolution photo is
restored with that kernel by a fast non-blind solver (`deconv.uniform`, hyper-Laplacian
prior, masked 'valid' data term so the borders do not ring), or by Deep EM's DIP posterior
mean with the kernel fixed (`restorer = "dip"`, `mcem.deblur(known_kernels=...)`), which
also gives the posterior standard deviation.

Settings come from `jaxdeblur/configs/photo.py`, fixed once in a frozen `PhotoSettings`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

from jaxdeblur import blind, configs, deconv, mcem

__all__ = ["Restoration", "PhotoSettings", "settings_from_config", "luminance",
           "kernel_size_for", "PhotoResult", "deblur_uniform", "restore"]


@dataclasses.dataclass(frozen=True)
class Restoration:
    """Settings of the non-blind solver (`deconv.uniform`; see its docstring)."""
    weight: float
    alpha: float
    beta_init: float
    beta_max: float
    beta_rate: float
    inner_iterations: int
    cg_iterations: int
    newton_iterations: int
    margin: int


@dataclasses.dataclass(frozen=True)
class PhotoSettings:
    """Everything `deblur_uniform` reads.

    Attributes:
      working_size: side of the crop the kernel is estimated on (the whole photo if
        smaller).
      kernel_size: odd kernel size to search, or 0 to choose it from the crop
        (`kernel_size_for`).
      kernel_fraction: with ``kernel_size = 0``: the searched size is this fraction of the
        crop's shorter side ...
      min_kernel_size, max_kernel_size: ... clipped to these bounds (odd).
      estimation: `blind.KernelEstimation` (its ``max_kernel_size`` is replaced by the
        size chosen here).
      restoration: `Restoration`.
      restorer: ``"hyper_laplacian"`` (fast, default) or ``"dip"`` (Deep EM's posterior
        mean with the kernel fixed).
    """
    working_size: int
    kernel_size: int
    kernel_fraction: float
    min_kernel_size: int
    max_kernel_size: int
    estimation: blind.KernelEstimation
    restoration: Restoration
    restorer: str

    def __post_init__(self):
        if self.restorer not in ("hyper_laplacian", "dip"):
            raise ValueError(f"restorer must be 'hyper_laplacian' or 'dip', got "
                             f"{self.restorer!r}")
        if self.kernel_size and (self.kernel_size < 3 or self.kernel_size % 2 == 0):
            raise ValueError(f"kernel_size must be 0 (automatic) or odd and >= 3, got "
                             f"{self.kernel_size}")
        if self.working_size < 32:
            raise ValueError(f"working_size must be at least 32, got {self.working_size}")


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


def kernel_size_for(crop_hw: tuple[int, int], settings: PhotoSettings) -> int:
    """The kernel size searched on a crop: the configured one, or a fraction of the crop.

    The search is generous on purpose: the estimate is cropped to the support its energy
    occupies afterwards (`blind.crop_kernel_by_energy`), so a kernel smaller than the
    window costs little, while one larger than the window cannot be found.
    """
    limit = _odd_at_most(min(crop_hw) - 2)
    if settings.kernel_size:
        size = settings.kernel_size
    else:
        size = _odd_at_most(settings.kernel_fraction * min(crop_hw))
        size = min(max(size, settings.min_kernel_size), settings.max_kernel_size)
    if size > limit:
        raise ValueError(f"a {size}x{size} kernel does not fit the {crop_hw[0]}x{crop_hw[1]} "
                         "image: the image must be larger than the kernel (set a smaller "
                         "kernel_size)")
    return size


# Progress accounting (not a method setting): the restoration's cost in pixel-iterations of
# the kernel estimate, per pixel of the photo (about 30 FFT solves against a level's ~10).
_RESTORATION_WORK = 3


class PhotoResult(NamedTuple):
    restored: np.ndarray        # (H, W, C) float32 in [0, 1]
    kernel: np.ndarray          # (k, k), sum 1, cross-correlation convention
    crop: tuple                 # (row slice, column slice) the kernel was estimated on
    searched_size: int          # the kernel size searched
    uncertainty: Optional[np.ndarray]  # (H, W, C) posterior std with restorer "dip"


def restore(blurry: np.ndarray, kernel: np.ndarray, settings: PhotoSettings,
            *, mcem_config: Any = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Non-blind restoration of every channel of ``blurry`` ``(H, W, C)`` with ``kernel``."""
    if settings.restorer == "dip":
        if mcem_config is None:
            raise ValueError("restorer 'dip' needs the MCEM config (mcem_config)")
        config = mcem_config.copy_and_resolve_references()
        config.kernel_size = int(kernel.shape[0])
        config.grid = (1, 1)
        result = mcem.deblur(jnp.asarray(blurry), config, known_kernels=np.asarray(kernel))
        return (np.clip(np.asarray(result.image), 0, 1),
                np.asarray(result.uncertainty))
    r = settings.restoration
    restored = deconv.uniform(
        jnp.asarray(blurry, jnp.float32), jnp.asarray(kernel, jnp.float32),
        weight=r.weight, alpha=r.alpha, beta_init=r.beta_init, beta_max=r.beta_max,
        beta_rate=r.beta_rate, inner_iterations=r.inner_iterations,
        cg_iterations=r.cg_iterations, newton_iterations=r.newton_iterations,
        margin=r.margin)
    return np.clip(np.asarray(restored), 0, 1), None


def deblur_uniform(image: np.ndarray, settings: PhotoSettings, *,
                   progress: Optional[Callable[[str, float], None]] = None,
                   mcem_config: Any = None) -> PhotoResult:
    """Blind deblurring of a photo blurred by one (uniform) kernel.

    Args:
      image: ``(H, W, C)`` float in [0, 1], C = 1 or 3.
      settings: `PhotoSettings`.
      progress: called as ``progress(line, fraction_done)`` before each pyramid level and
        before the restoration; the fraction counts work in pixels (`_work`).
      mcem_config: the MCEM config, needed only by ``restorer = "dip"``.

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
    size = kernel_size_for(patch.shape, settings)
    estimation = dataclasses.replace(settings.estimation, max_kernel_size=size)

    levels = blind.pyramid(patch.shape, estimation)
    level_work = [lv.shape[0] * lv.shape[1] * estimation.iterations for lv in levels]
    total = sum(level_work) + _RESTORATION_WORK * image.shape[0] * image.shape[1]

    def level_progress(index, count, level):
        if progress is not None:
            progress(f"kernel level {index + 1}/{count}: {level.shape[0]}x{level.shape[1]} "
                     f"px, kernel {level.kernel_size}x{level.kernel_size}",
                     sum(level_work[:index]) / total)

    estimate = blind.estimate_kernel(patch, estimation, progress=level_progress)
    if progress is not None:
        progress(f"restoring {image.shape[0]}x{image.shape[1]}x{image.shape[2]} with a "
                 f"{estimate.kernel.shape[0]}x{estimate.kernel.shape[0]} kernel "
                 f"({settings.restorer})", sum(level_work) / total)
    restored, uncertainty = restore(image, estimate.kernel, settings,
                                    mcem_config=mcem_config)
    return PhotoResult(restored, estimate.kernel, crop, size, uncertainty)


class PhotoDeblurrer:
    """`deblur_uniform` behind the interface of the command's runners.

    ``deblur(image, key=...)`` returns ``{"image", "kernels" (1, k, k), "centres" (1, 2),
    "metrics", ["uncertainty"]}``; ``progress(line)`` receives a line per stage with the
    elapsed time and an estimate of the time left (work counted in pixels per level).
    """

    def __init__(self, settings: PhotoSettings, *, mcem_config: Any = None,
                 progress: Optional[Callable[[str], None]] = None):
        self.settings, self.mcem_config, self.progress = settings, mcem_config, progress

    def deblur(self, image: np.ndarray, *, key=None) -> dict:
        del key  # the estimate is deterministic
        start = time.perf_counter()

        def report(line: str, fraction: float):
            if self.progress is None:
                return
            elapsed = time.perf_counter() - start
            eta = (f", about {elapsed * (1 - fraction) / fraction:.0f} s left"
                   if fraction > 0 else "")
            self.progress(f"{line} ({elapsed:.1f} s elapsed{eta})")

        result = deblur_uniform(image, self.settings, progress=report,
                                mcem_config=self.mcem_config)
        k = result.kernel.shape[0]
        rows, cols = result.crop
        out = {"image": result.restored, "kernels": result.kernel[None],
               "centres": np.asarray([[(rows.start + rows.stop) / 2,
                                       (cols.start + cols.stop) / 2]], np.float32),
               "metrics": [], "kernel_size": k}
        if result.uncertainty is not None:
            out["uncertainty"] = result.uncertainty.mean(-1)
        if self.progress is not None:
            self.progress(f"done: {k}x{k} kernel (searched {result.searched_size}) in "
                          f"{time.perf_counter() - start:.1f} s")
        return out

    def kernels(self, image: np.ndarray, grid, *, key=None):
        """``(kernels (1, k, k), centres (1, 2))``: one kernel for the photo (``grid`` is
        ignored: the estimate is uniform)."""
        del grid
        out = self.deblur(image, key=key)
        return out["kernels"], out["centres"]
