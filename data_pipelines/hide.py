"""HIDE (Shen et al., ICCV 2019): human-aware motion deblurring pairs from GoPro video."""

import pathlib

from data_pipelines import paired


class Hide(paired.PairedImageBuilder):
    """HIDE: 6,397 training pairs and 2,025 test pairs (close-ups and long shots).

    Download `HIDE_dataset.zip` from https://github.com/joanshen0508/HA_deblur (project page
    of "Human-Aware Motion Deblurring", ICCV 2019) and extract it; `manual_dir` is the
    `HIDE_dataset` folder. Every blurry image is paired with `GT/<same file name>`.

    Splits: `train`, `test_close_ups` (`test/test-close-ups`), `test_long_shot`
    (`test/test-long-shot`); load both test splits as `"test_close_ups+test_long_shot"`.

    References:
      Shen, Wang, Lu, Shen, Ling, Xu, Shao. Human-Aware Motion Deblurring. ICCV 2019.
    """

    name = "hide"
    DOWNLOAD_URL = "https://github.com/joanshen0508/HA_deblur"
    LAYOUT = """
  HIDE_dataset/                     <- manual_dir
    GT/<name>.png                   sharp images for every split
    train/<name>.png                blurry training images
    test/test-close-ups/<name>.png  blurry test images
    test/test-long-shot/<name>.png  blurry test images
"""
    _SPLIT_DIRS = {"train": "train", "test_close_ups": "test/test-close-ups",
                   "test_long_shot": "test/test-long-shot"}

    def _find_pairs(self, manual_dir: pathlib.Path) -> dict[str, list[paired.Pair]]:
        return {split: paired.match_by_name(paired.list_image_files(manual_dir / folder),
                                            manual_dir / "GT", manual_dir)
                for split, folder in self._SPLIT_DIRS.items()}
