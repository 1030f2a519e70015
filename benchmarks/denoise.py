"""The DCT denoiser and the plug-and-play refinement: time on the current backend.

    python benchmarks/denoise.py

Rows (once compiled, the mean of 3 calls):

* the sliding-window DCT's synthesis (the adjoint of the analysis, called twice per
  denoise): ours, separable (`denoise._synthesis`), against the direct form it replaced,
  one convolution of the 64 coefficient channels with the flipped 8×8 basis images;
* `denoise.dct_denoise` of one gray channel;
* `deconv.pnp_refine` with the refinement's shipped settings (`configs/photo.py`,
  ``restoration.pnp_*``, 12 iterations) on a 255² gray image blurred by a 15 px line.

Measured on the 2-core CPU (2026-12-01, nothing else running): synthesis 5 ms against
432 ms at 255², 140 ms against 4,938 ms at 1024×768; `dct_denoise` 64 ms and 699 ms; the
refinement 0.83 s, where the same call with the direct synthesis took 13.0 s.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from jaxdeblur import blur, configs, deconv, denoise, kernels  # noqa: E402
from ufpnet_step import mean_time  # noqa: E402

REPEATS = 3

SIZES = ((255, 255), (768, 1024))


def direct_synthesis(coefficients, filters, patch):
    """The reference: the adjoint of `denoise._analysis` as one convolution with the
    flipped basis images (patch² channels in, one out)."""
    padded = jnp.pad(coefficients, ((patch - 1, 0), (patch - 1, 0), (0, 0)), mode="wrap")
    flipped = jnp.flip(filters, (0, 1)).transpose(0, 1, 3, 2)
    return jax.lax.conv_general_dilated(padded[None], flipped, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))[0, :, :, 0]


def main() -> None:
    settings = configs.load("photo").restoration
    patch = settings.pnp_patch
    filters = jnp.asarray(denoise.dct_filters(patch))
    ours = jax.jit(lambda c: denoise._synthesis(c, patch))
    reference = jax.jit(lambda c: direct_synthesis(c, filters, patch))
    print(f"backend: {jax.default_backend()}")
    print("| row | size | jaxdeblur | reference (direct convolution) |")
    print("|---|---|---|---|")
    for h, w in SIZES:
        coefficients = jax.random.normal(jax.random.key(0), (h, w, patch * patch))
        np.testing.assert_allclose(ours(coefficients), reference(coefficients), atol=1e-3)
        print(f"| DCT synthesis | {w}×{h} | {mean_time(ours, coefficients, repeats=REPEATS) * 1e3:.0f} ms | "
              f"{mean_time(reference, coefficients, repeats=REPEATS) * 1e3:.0f} ms |", flush=True)
    for h, w in SIZES:
        image = jax.random.uniform(jax.random.key(1), (h, w, 1))
        seconds = mean_time(lambda x: denoise.dct_denoise(
            x, 0.02, patch=patch, threshold=settings.pnp_threshold), image, repeats=REPEATS)
        print(f"| dct_denoise, 1 channel | {w}×{h} | {seconds * 1e3:.0f} ms | |", flush=True)

    import skimage.data
    import skimage.transform
    sharp = skimage.transform.resize(skimage.data.camera().astype(np.float32) / 255,
                                     (255 + 18, 255 + 18)).astype(np.float32)[..., None]
    kernel = jnp.asarray(kernels.line_kernel(19, 15, 0.4))
    blurry = np.asarray(blur.conv(jnp.asarray(sharp), kernel, boundary="valid"))
    blurry = np.clip(blurry + 0.005 * np.random.default_rng(0).normal(size=blurry.shape),
                     0, 1).astype(np.float32)
    init = deconv.uniform(jnp.asarray(blurry), kernel, weight=settings.min_weight,
                          alpha=settings.alpha)

    def refine(y):
        return deconv.pnp_refine(y, kernel, init, noise=0.005,
                                 sigma_start=settings.pnp_sigma_start,
                                 lam=settings.pnp_lambda, iterations=12, patch=patch,
                                 threshold=settings.pnp_threshold)

    seconds = mean_time(refine, jnp.asarray(blurry), repeats=REPEATS)
    print(f"| pnp_refine, 12 iterations | 255×255 | {seconds:.2f} s | 13.0 s (before the "
          "separable synthesis, same machine) |")


if __name__ == "__main__":
    main()
