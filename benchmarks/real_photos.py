"""Real camera-shake photos (no ground truth) deblurred with the command's defaults.

    python benchmarks/real_photos.py                      # Lai's 6 real photos and Köhler's 6
    python benchmarks/real_photos.py --only roma --out /tmp/figures

Runs what `jaxdeblur deblur PHOTO --method mcem` runs (the shipped `photo` config, colour
handled as the command does: kernel on the luminance, every channel restored), and writes per
photo ``docs/real/<name>.jpg``: the input and the result side by side with a zoomed crop of
each (the most detailed square) and the estimated kernel in the corner. Prints a markdown
table: photo, size, kernel size, the no-reference checks (`photo.estimate_spread` and
`photo.kernel_pieces` of the estimate, re-blur residual RMS of the result), the photo's
noise and the restoration's prior weight (`photo.restoration_weight`) and the wall
time (compilation included for the first photo, as a user sees it).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax.numpy as jnp
import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxdeblur import blur, configs, io, photo, viz  # noqa: E402

DATA = REPO.parent / "shared" / "data"


def photos(root: pathlib.Path):
    """(name, path) of Lai's real photos and the Köhler images under ``root``."""
    found = sorted((root / "lai" / "real").glob("*.jpg")) + sorted(
        (root / "kohler").glob("*.png"))
    if not found:
        raise SystemExit(f"no photos under {root}/lai/real or {root}/kohler: pass --data "
                         "with the shared data folder")
    for path in found:
        prefix = "lai" if path.parent.name == "real" else "kohler"
        yield f"{prefix}_{path.stem}", path


def reblur_residual(blurry: np.ndarray, restored: np.ndarray, kernel: np.ndarray) -> float:
    """RMS of ``blurry − k ⋆ restored`` inside the valid region (luminance)."""
    y, x = photo.luminance(blurry), photo.luminance(restored)
    k = kernel.shape[0]
    r = k // 2
    reblurred = np.asarray(blur.conv(jnp.asarray(x)[..., None], jnp.asarray(kernel),
                                     boundary="valid"))[..., 0]
    return float(np.sqrt(np.mean((y[r:r + reblurred.shape[0], r:r + reblurred.shape[1]]
                                  - reblurred) ** 2)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA), help="the shared data folder")
    parser.add_argument("--out", default=str(REPO / "docs" / "real"))
    parser.add_argument("--only", default=None, help="a substring of the photo names")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the photo config")
    args = parser.parse_args()
    settings = photo.settings_from_config(configs.load("photo", args.set))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("| photo | size | kernel | kernel spread | pieces | noise σ / prior weight | "
          "re-blur RMS | time (s) | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, path in photos(pathlib.Path(args.data)):
        if args.only and args.only not in name:
            continue
        image = io.read_image(path, channels=3)
        lossy = io.read_image_info(path).format in io.LOSSY_FORMATS   # as the command does
        start = time.perf_counter()
        result = photo.deblur_uniform(image, settings, lossy=lossy)
        seconds = time.perf_counter() - start
        k = result.kernel
        viz.comparison_figure([image, result.restored],
                              ["input", f"jaxdeblur ({seconds:.0f} s, kernel "
                                        f"{k.shape[0]}x{k.shape[0]})"],
                              out / f"{name}.png", kernel=k, width_px=1100)
        # PNG of two photos is large; the docs keep a JPEG.
        with Image.open(out / f"{name}.png") as im:
            im.convert("RGB").save(out / f"{name}.jpg", quality=85)
        (out / f"{name}.png").unlink()
        weight = "-" if result.weight is None else f"{result.weight:.1e}"
        note = ("returned unchanged (" + ("diffuse estimate" if "diffuse" in result.warning
                                          else "estimate in pieces") + ")"
                if result.warning else "")
        print(f"| {name} | {image.shape[1]}x{image.shape[0]} | {k.shape[0]} | "
              f"{photo.estimate_spread(k, settings):.1f} | {photo.kernel_pieces(k)} | "
              f"{result.noise:.4f} / {weight} | "
              f"{reblur_residual(image, result.restored, k):.4f} | {seconds:.1f} | {note} |",
              flush=True)


if __name__ == "__main__":
    main()
