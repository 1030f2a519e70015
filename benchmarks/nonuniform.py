"""Lai's non-uniform image: the command's result and what a kernel field fitted from the
ground truth reaches, with the kernels centred (as a blind estimate knows them) or not.

    python benchmarks/nonuniform.py                         # oracle field, 6x8 cells
    python benchmarks/nonuniform.py --grid 3,3 --blind      # + the command's defaults

Per cell of the filter-flow grid, a kernel is fitted by least squares (non-negative,
`blind.fit_kernel`) from the ground truth's gradients to the blurry luminance on a crop
around the cell centre, and faint taps are removed as the estimates' are. The photo is then
restored with `photo.restore_field` twice: with every kernel kept where the fit put it
(its offset from the cell centre is part of the blur: a camera rotation displaces each
region by a different amount) and with every kernel centred on its centre of mass (the
most a blind estimate can know: a local kernel and its latent are defined up to a common
translation). PSNR by the Lai protocol (Y channel, `metrics.shift_searched_psnr`: one
translation searched for the whole photo). Prints the per-cell offsets and writes the
kernel-field figure (``--figure``).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxdeblur import blind, blur, configs, deconv, io, metrics, photo, viz  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "lai"
IMAGE = "natural_05_gyro_01"


def _psnr(estimate: np.ndarray, truth: np.ndarray) -> float:
    return float(metrics.shift_searched_psnr(jnp.asarray(photo.luminance(estimate))[..., None],
                                             jnp.asarray(photo.luminance(truth))[..., None]))


def fitted_field(blurry_y: np.ndarray, sharp_y: np.ndarray, geometry, *, crop: int,
                 size: int, threshold: float) -> np.ndarray:
    """(G, size, size) kernels fitted from the ground truth, offsets kept, sum 1."""
    h, w = blurry_y.shape
    kernels = []
    for cy, cx in photo.cell_centres(geometry):
        top = int(np.clip(round(cy) - crop // 2, 0, h - crop))
        left = int(np.clip(round(cx) - crop // 2, 0, w - crop))
        b = jnp.asarray(blurry_y[top:top + crop, left:left + crop])
        s = jnp.asarray(sharp_y[top:top + crop, left:left + crop])
        k = np.asarray(blind.fit_kernel(deconv.circular_gradients(s), b, size, reg=1e-3,
                                        iterations=200, init=jnp.zeros((size, size)),
                                        nonneg_iterations=300), np.float64)
        k = np.maximum(k, 0)
        k[k < threshold * k.max()] = 0
        kernels.append(k / k.sum())
    return np.stack(kernels).astype(np.float32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lai", default=str(DATA), help="Lai's data folder")
    parser.add_argument("--grid", default="6,8", help="filter-flow cells, rows,cols")
    parser.add_argument("--crop", type=int, default=160, help="crop each kernel is fitted on")
    parser.add_argument("--size", type=int, default=61, help="kernel window fitted")
    parser.add_argument("--blind", action="store_true",
                        help="also run the command's defaults (photo.deblur_uniform)")
    parser.add_argument("--figure", default=None, help="write the fitted kernel field here")
    args = parser.parse_args()
    root = pathlib.Path(args.lai)
    blurry_path = root / "nonuniform" / f"{IMAGE}.png"
    sharp_path = root / "ground_truth" / f"{IMAGE.split('_gyro')[0]}.png"
    for path in (blurry_path, sharp_path):
        if not path.is_file():
            raise SystemExit(f"{path} is absent: pass --lai with Lai's nonuniform/ and "
                             "ground_truth/ folders (../shared/data/lai)")
    grid = tuple(int(v) for v in args.grid.split(","))
    settings = photo.settings_from_config(configs.load("photo", []))
    blurry = io.read_image(blurry_path, channels=3)
    sharp = io.read_image(sharp_path, channels=3)
    print(f"{IMAGE}: blurry {_psnr(blurry, sharp):.2f} dB (Y, Lai protocol)", flush=True)
    if args.blind:
        start = time.perf_counter()
        result = photo.deblur_uniform(blurry, settings)
        print(f"command's defaults: {_psnr(result.restored, sharp):.2f} dB, kernel "
              f"{result.kernel.shape[0]}, {time.perf_counter() - start:.0f} s", flush=True)
    blurry_y, sharp_y = photo.luminance(blurry), photo.luminance(sharp)
    geometry = blur.eff_windows(blurry_y.shape, grid, args.size)
    kernels = fitted_field(blurry_y, sharp_y, geometry, crop=args.crop, size=args.size,
                           threshold=settings.estimation.threshold)
    rows, cols = np.indices(kernels.shape[1:])
    c = args.size // 2
    dy = (kernels * rows).sum((1, 2)) - c
    dx = (kernels * cols).sum((1, 2)) - c
    centred = np.stack([blind.centre_kernel(k) for k in kernels]).astype(np.float32)
    for name, field in (("offsets kept", kernels), ("each centred", centred)):
        start = time.perf_counter()
        restored = photo.restore_field(blurry, field, geometry, settings)
        print(f"ground-truth field {grid[0]}x{grid[1]}, {name}: "
              f"{_psnr(restored, sharp):.2f} dB ({time.perf_counter() - start:.0f} s)",
              flush=True)
    with np.printoptions(precision=1, suppress=True, linewidth=150):
        print("kernel offsets from the cell centres, rows (px):\n", dy.reshape(grid))
        print("columns (px):\n", dx.reshape(grid))
    if args.figure:
        viz.kernel_field_figure(blurry, kernels, photo.cell_centres(geometry), args.figure,
                                title=f"{IMAGE}: kernels fitted from the ground truth")
        print("wrote", args.figure)


if __name__ == "__main__":
    main()
