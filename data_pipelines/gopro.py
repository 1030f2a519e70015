"""GoPro (Nah, Kim & Lee, CVPR 2017): 3,214 blurry/sharp pairs at 1280x720 from GoPro video."""

import pathlib

from data_pipelines import paired


class Gopro(paired.PairedImageBuilder):
    """GoPro_Large: 2,103 training and 1,111 test pairs (averaged high-speed frames).

    Download `GOPRO_Large.zip` from https://seungjunnah.github.io/Datasets/gopro.html and
    extract it; `manual_dir` is the `GOPRO_Large` folder. Blurry frames are paired with the
    sharp frame of the same file name in the same sequence. `blur_gamma/` (the
    gamma-corrected variant) is ignored; the standard benchmark uses `blur/`.

    Splits: `train` (2,103), `test` (1,111).

    References:
      Nah, Kim, Lee. Deep Multi-scale Convolutional Neural Network for Dynamic Scene
      Deblurring. CVPR 2017.
    """

    name = "gopro"
    DOWNLOAD_URL = "https://seungjunnah.github.io/Datasets/gopro.html"
    LAYOUT = """
  GOPRO_Large/                      <- manual_dir
    train/<sequence>/blur/<frame>.png
    train/<sequence>/sharp/<frame>.png   (same file names as blur/)
    test/<sequence>/blur/<frame>.png
    test/<sequence>/sharp/<frame>.png
"""

    def _find_pairs(self, manual_dir: pathlib.Path) -> dict[str, list[paired.Pair]]:
        splits = {}
        for split in ("train", "test"):
            pairs = []
            for sequence in sorted(p for p in (manual_dir / split).glob("*") if p.is_dir()):
                pairs += paired.match_by_name(paired.list_image_files(sequence / "blur"),
                                              sequence / "sharp", manual_dir)
            splits[split] = pairs
        return splits
