"""Blind deblurring measured on real benchmark data and on a held-out-like stand-in.

    python benchmarks/real_data.py --lai ../shared/data/lai          # Lai et al. uniform set
    python benchmarks/real_data.py --standin                         # Levin-like stand-in
    python benchmarks/real_data.py --standin --noise 0.01            # ... noisier
    python benchmarks/real_data.py --lai ../shared/data/lai --set estimation.kernel_reg=50

Both run `jaxdeblur.photo.deblur_uniform` with the shipped `photo` config (what
`jaxdeblur deblur --method mcem` runs) and print, per image: PSNR of the blurry input and of
the result by the SelfDeblur/Lai protocol (`metrics.shift_searched_psnr`: 15 px crop,
shifts ±10 px in 0.25 px steps; Y channel for Lai), the error ratio of Levin et al. 2009
(aligned SSD of the result over that of the same restoration with the true kernel), the
kernel's cosine similarity to the true kernel (best shift), the kernel size found, and the
wall time. Lai's saturated scene does not follow the linear blur model; it is reported
apart. The stand-in (no data needed): 255² gray crops of four skimage photos blurred by
Lai's four real kernels rescaled to 13–27 px (the sizes of Levin's set), noise 0.005,
quantised to 8 bits.
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

from jaxdeblur import blind, blur, configs, io, metrics, photo  # noqa: E402


def _psnr(estimate: np.ndarray, truth: np.ndarray) -> float:
    return float(metrics.shift_searched_psnr(jnp.asarray(estimate)[..., None],
                                             jnp.asarray(truth)[..., None]))


def kernel_similarity(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Cosine similarity after zero-padding both to one size and the best shift (±5 px)."""
    n = max(estimate.shape[0], truth.shape[0])
    pad = lambda k: np.pad(k, (n - k.shape[0]) // 2)  # noqa: E731
    return metrics.kernel_cosine_similarity(pad(estimate), pad(truth), max_shift=5)


def evaluate(name, blurry, sharp, true_kernel, settings) -> dict:
    """One image: blind result, true-kernel result, the protocol's figures."""
    start = time.perf_counter()
    result = photo.deblur_uniform(blurry[..., None], settings)
    seconds = time.perf_counter() - start
    with_truth, _ = photo.restore(blurry[..., None], true_kernel, settings)
    psnr_blurry = _psnr(blurry, sharp)
    psnr_result = _psnr(result.restored[..., 0], sharp)
    psnr_truth = _psnr(with_truth[..., 0], sharp)
    row = dict(name=name, blurry=psnr_blurry, result=psnr_result, truth=psnr_truth,
               error_ratio=10 ** ((psnr_truth - psnr_result) / 10),
               kernel_cos=kernel_similarity(result.kernel, true_kernel),
               size=result.kernel.shape[0], true_size=true_kernel.shape[0],
               seconds=seconds, chosen=result.chosen, estimates=len(result.scores))
    print(f"{name:28s} {psnr_blurry:6.2f} {psnr_result:6.2f} {psnr_truth:6.2f} "
          f"{row['error_ratio']:6.2f} {row['kernel_cos']:6.3f} {row['size']:4d}/"
          f"{row['true_size']:<4d} {seconds:6.1f} {result.chosen + 1:3d}/"
          f"{len(result.scores)}", flush=True)
    return row


HEADER = (f"{'image':28s} {'blurry':>6s} {'result':>6s} {'truth':>6s} {'ER':>6s} "
          f"{'k-cos':>6s} {'size':>9s} {'sec':>6s} {'kept':>5s}")


def lai_images(root: pathlib.Path):
    """(name, scene, blurry Y, ground-truth Y, true kernel) of Lai's uniform subset."""
    folder = root / "uniform_ycbcr"
    if not folder.is_dir():
        raise SystemExit(f"{folder} is absent: pass --lai DIR with Lai's uniform_ycbcr/, "
                         "ground_truth/ and kernel_npy/ (../shared/data/lai)")
    for path in sorted(folder.glob("*.png")):
        scene, kernel_name = path.stem.rsplit("_kernel_", 1)
        blurry = io.read_image(path)[..., 0]
        # full-range BT.601 luma, as the blurry files were made (data README)
        truth = photo.luminance(io.read_image(root / "ground_truth" / f"{scene}.png",
                                              channels=3))
        kernel = np.load(root / "kernel_npy" / f"kernel_{kernel_name}.npy").astype(np.float32)
        yield path.stem, scene, np.asarray(blurry, np.float32), truth, kernel


def standin_images(root: pathlib.Path, size: int = 255, noise: float = 0.005):
    """The Levin-like stand-in (see the module docstring)."""
    import skimage.color
    import skimage.data

    photos = {"camera": skimage.data.camera() / 255.0,
              "astronaut": skimage.color.rgb2gray(skimage.data.astronaut()),
              "coffee": skimage.color.rgb2gray(skimage.data.coffee()),
              "chelsea": skimage.color.rgb2gray(skimage.data.chelsea())}
    kernels = {}
    for j, k in zip((1, 2, 3, 4), (13, 19, 23, 27)):
        raw = np.load(root / "kernel_npy" / f"kernel_0{j}.npy")
        kernels[f"k{j}_{k}px"] = blind.resize_kernel(raw, k)
    rng = np.random.default_rng(0)
    for image_name, image in photos.items():
        for kernel_name, kernel in kernels.items():
            k = kernel.shape[0]
            n = size + k - 1
            top, left = (image.shape[0] - n) // 2, (image.shape[1] - n) // 2
            scene = np.asarray(image[top:top + n, left:left + n], np.float32)
            blurry = np.asarray(blur.conv(jnp.asarray(scene)[..., None], jnp.asarray(kernel),
                                          boundary="valid"))[..., 0]
            blurry = np.round(np.clip(blurry + noise * rng.standard_normal(blurry.shape),
                                      0, 1) * 255) / 255
            r = k // 2
            yield f"{image_name}_{kernel_name}", image_name, blurry.astype(np.float32), \
                scene[r:r + size, r:r + size], kernel


def summarise(rows, apart=("saturated",)):
    kept = [r for r in rows if not any(r["name"].startswith(a) for a in apart)]
    print(f"\n{len(kept)} images (excluding {', '.join(apart) or 'none'}): "
          f"error ratio <= 2 on {sum(r['error_ratio'] <= 2 for r in kept)}, <= 3 on "
          f"{sum(r['error_ratio'] <= 3 for r in kept)}; mean PSNR blurry "
          f"{np.mean([r['blurry'] for r in kept]):.2f} -> {np.mean([r['result'] for r in kept]):.2f}"
          f" dB (true kernel {np.mean([r['truth'] for r in kept]):.2f}); mean kernel cosine "
          f"{np.mean([r['kernel_cos'] for r in kept]):.3f}; max time "
          f"{max(r['seconds'] for r in kept):.1f} s")
    scenes = sorted({r["scene"] for r in rows})
    print("per scene (mean dB blurry -> result):")
    for scene in scenes:
        sel = [r for r in rows if r["scene"] == scene]
        print(f"  {scene:14s} {np.mean([r['blurry'] for r in sel]):6.2f} -> "
              f"{np.mean([r['result'] for r in sel]):6.2f}  (error ratios "
              + ", ".join(f"{r['error_ratio']:.2f}" for r in sel) + ")")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lai", default=None, metavar="DIR",
                        help="Lai's data (uniform_ycbcr/, ground_truth/, kernel_npy/)")
    parser.add_argument("--standin", action="store_true",
                        help="the Levin-like stand-in (kernels read from --kernels DIR)")
    parser.add_argument("--kernels", default=str(REPO.parent / "shared" / "data" / "lai"),
                        help="folder with kernel_npy/ for the stand-in")
    parser.add_argument("--noise", type=float, default=0.005,
                        help="the stand-in's Gaussian noise std (before 8-bit quantisation)")
    parser.add_argument("--only", default=None, help="a substring of the image names")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the photo config")
    args = parser.parse_args()
    settings = photo.settings_from_config(configs.load("photo", args.set))
    if args.lai:
        images = lai_images(pathlib.Path(args.lai))
        rows = []
    elif args.standin:
        images = standin_images(pathlib.Path(args.kernels), noise=args.noise)
        rows = []
    else:
        parser.error("pass --lai DIR or --standin")
    print(HEADER)
    for name, scene, blurry, sharp, kernel in images:
        if args.only and args.only not in name:
            continue
        row = evaluate(name, blurry, sharp, kernel, settings)
        row["scene"] = scene
        rows.append(row)
    summarise(rows, apart=("saturated",) if args.lai else ())


if __name__ == "__main__":
    main()
