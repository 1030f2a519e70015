"""Lai et al. (CVPR 2016) deblurring benchmark: synthetic uniform, non-uniform and real sets."""

import pathlib
import re

from data_pipelines import paired

_KERNEL_ID = re.compile(r"_(\d+)$")


class Lai(paired.PairedImageBuilder):
    """Lai benchmark: 25 sharp images x 4 blurs (uniform and non-uniform) + 100 real images.

    Download the synthetic and real data sets from the project page
    http://vllab.ucmerced.edu/wlai24/cvpr16_deblur_study/ and arrange them as `LAYOUT`
    shows (the synthetic archive already has `ground_truth/`, `kernel/`, `uniform/`,
    `nonuniform/`; put the real images in `real/`). A blurry image
    `<image>_<anything>_<kk>.png` is paired with `ground_truth/<image>.png` (the longest
    ground-truth name that prefixes it followed by `_`); in the uniform split its
    ground-truth kernel is `kernel/kernel_<kk>.png`, normalised to sum 1. Non-uniform blur
    comes from recorded camera rotations and has no single kernel, and the real images
    have no ground truth: those examples store `kernel` as `(0, 0)` and (real) `sharp` as
    `(0, 0, 3)`.

    Splits: `uniform` (100), `nonuniform` (100), `real` (100).

    References:
      Lai, Huang, Hu, Ahuja, Yang. A Comparative Study for Single Image Blind Deblurring.
      CVPR 2016.
    """

    name = "lai"
    DOWNLOAD_URL = "http://vllab.ucmerced.edu/wlai24/cvpr16_deblur_study/"
    LAYOUT = """
  <manual_dir>/
    ground_truth/<image>.png                 e.g. manmade_01.png
    kernel/kernel_<kk>.png                   uniform kernels, kk = 01..04
    uniform/<image>_kernel_<kk>.png          blurry, uniform blur with kernel kk
    nonuniform/<image>_kernel_<kk>.png       blurry, non-uniform blur
    real/<name>.png|.jpg                     real blurry images (no ground truth)
"""
    HAS_KERNEL = True
    SPLITS_WITHOUT_SHARP = frozenset({"real"})

    def _find_pairs(self, manual_dir: pathlib.Path) -> dict[str, list[paired.Pair]]:
        ground_truth = paired.list_image_files(manual_dir / "ground_truth")
        # Longest first, so that "text_1" never claims "text_10_kernel_01".
        by_length = sorted(ground_truth, key=lambda p: -len(p.stem))

        def pair(blurry: pathlib.Path, with_kernel: bool) -> paired.Pair:
            sharp = next((p for p in by_length if blurry.stem.startswith(p.stem + "_")), None)
            kernel = None
            match = _KERNEL_ID.search(blurry.stem)
            if with_kernel and match:
                candidates = sorted((manual_dir / "kernel").glob(f"kernel_{match.group(1)}.*"))
                kernel = candidates[0] if candidates else None
            return paired.Pair(key=blurry.relative_to(manual_dir).as_posix(), blurry=blurry,
                               sharp=sharp, kernel=kernel)

        splits = {split: [pair(p, split == "uniform")
                          for p in paired.list_image_files(manual_dir / split)]
                  for split in ("uniform", "nonuniform")}
        splits["real"] = [paired.Pair(key=p.relative_to(manual_dir).as_posix(), blurry=p,
                                      sharp=None)
                          for p in paired.list_image_files(manual_dir / "real")]
        missing = [str(p.blurry) for p in splits["uniform"] if p.kernel is None]
        if missing:
            raise paired.DatasetLayoutError(
                f"{len(missing)} uniform blurry image(s) have no kernel/kernel_<kk>.* file:\n"
                + paired.format_list(missing) + "\n" + self.manual_instructions())
        return splits
