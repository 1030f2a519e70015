"""Levin et al. (CVPR 2009): 4 grayscale images x 8 recorded kernels, with ground truth."""

import pathlib
import re

import numpy as np

from data_pipelines import paired

_NAME = re.compile(r"im(\d+)_(?:flit|ker|kernel)(\d+)$")


class Levin(paired.PairedImageBuilder):
    """Levin benchmark: 32 grayscale 255x255 blurry images with sharp images and kernels.

    Download `LevinEtalCVPR09Data` from https://webee.technion.ac.il/people/anat.levin/
    (paper "Understanding and evaluating blind deconvolution algorithms", data link) and
    extract the `.mat` files into `manual_dir`. Each `im<i>_flit<j>.mat` holds `x` (sharp),
    `y` (blurry) and `f` (the kernel, sizes 19, 17, 15, 27, 13, 21, 23, 23 for j = 1..8), as
    float arrays in [0, 1]; `im<i>_ker<j>.mat` names (as some re-distributions use) are
    accepted too. Images are stored as `(255, 255, 1)` uint8 (`round(255 x)`, clipped), the
    kernel as float32 normalised to sum 1.

    Splits: `test` (32).

    References:
      Levin, Weiss, Durand, Freeman. Understanding and Evaluating Blind Deconvolution
      Algorithms. CVPR 2009.
    """

    name = "levin"
    DOWNLOAD_URL = "https://webee.technion.ac.il/people/anat.levin/"
    LAYOUT = """
  <manual_dir>/
    im<i>_flit<j>.mat    i = 05..08 (or 1..4), j = 01..08; variables x (sharp), y (blurry),
                         f (kernel), 2-D float arrays
"""
    CHANNELS = 1
    HAS_KERNEL = True

    def _find_pairs(self, manual_dir: pathlib.Path) -> dict[str, list[paired.Pair]]:
        files = sorted(p for p in manual_dir.glob("*.mat") if _NAME.match(p.stem))
        return {"test": [paired.Pair(key=p.name, blurry=p, sharp=p, kernel=p) for p in files]}

    def _load(self, path: pathlib.Path) -> dict[str, np.ndarray]:
        import scipy.io
        try:
            arrays = scipy.io.loadmat(path)
        except (OSError, ValueError) as error:
            raise paired.DatasetLayoutError(f"cannot read {path}: {error}") from error
        missing = [name for name in ("x", "y", "f") if name not in arrays]
        if missing:
            raise paired.DatasetLayoutError(f"{path} lacks variable(s) {missing}; expected x "
                                            "(sharp), y (blurry), f (kernel)")
        return arrays

    def _pair_sizes(self, pair):
        arrays = self._load(pair.blurry)
        return np.shape(arrays["y"])[:2], np.shape(arrays["x"])[:2]

    def _example(self, pair):
        arrays = self._load(pair.blurry)

        def to_uint8(image):
            image = np.asarray(image, np.float64)
            image = image[..., None] if image.ndim == 2 else image[..., :1]
            return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)

        kernel = np.clip(np.asarray(arrays["f"], np.float64), 0.0, None)
        return {"blurry": to_uint8(arrays["y"]), "sharp": to_uint8(arrays["x"]),
                "kernel": (kernel / kernel.sum()).astype(np.float32), "name": pair.key}
