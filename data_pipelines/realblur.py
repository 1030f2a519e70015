"""RealBlur (Rim et al., ECCV 2020): real blurry/sharp pairs from a two-camera rig."""

import pathlib

from data_pipelines import paired


class _RealBlur(paired.PairedImageBuilder, skip_registration=True):
    """Shared reader of the RealBlur list files; subclasses set the camera variant."""

    VARIANT = ""
    DOWNLOAD_URL = "https://cg.postech.ac.kr/research/realblur/"

    _LAYOUT_TEMPLATE = """
  <manual_dir>/
    RealBlur_{v}_train_list.txt   one pair per line: "<gt path> <blur path>"
    RealBlur_{v}_test_list.txt    paths relative to manual_dir
    RealBlur-{v}_ECC_IMCORR_centroid_itensity_ref/<scene>/gt/gt_<i>.png
    RealBlur-{v}_ECC_IMCORR_centroid_itensity_ref/<scene>/blur/blur_<i>.png
"""

    def __init_subclass__(cls, **kwargs):
        cls.LAYOUT = cls._LAYOUT_TEMPLATE.format(v=cls.VARIANT)
        super().__init_subclass__(**kwargs)

    def _find_pairs(self, manual_dir: pathlib.Path) -> dict[str, list[paired.Pair]]:
        splits, unlisted = {}, []
        for split in ("train", "test"):
            listing = manual_dir / f"RealBlur_{self.VARIANT}_{split}_list.txt"
            if not listing.is_file():
                raise paired.DatasetLayoutError(f"missing list file {listing}. "
                                                + self.manual_instructions())
            pairs = []
            for number, line in enumerate(listing.read_text().splitlines(), 1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) < 2:
                    raise paired.DatasetLayoutError(
                        f"{listing}:{number}: expected '<gt path> <blur path>', got {line!r}")
                sharp, blurry = manual_dir / fields[0], manual_dir / fields[1]
                if not blurry.is_file():
                    unlisted.append(str(blurry))
                    continue
                pairs.append(paired.Pair(key=fields[1], blurry=blurry,
                                         sharp=sharp if sharp.is_file() else None))
            splits[split] = pairs
        if unlisted:
            raise paired.DatasetLayoutError(
                f"{len(unlisted)} blurry image(s) named in the list files are missing:\n"
                + paired.format_list(unlisted))
        return splits


class RealblurJ(_RealBlur):
    """RealBlur-J (JPEG, camera-processed): 3,758 training and 980 test pairs.

    Download `RealBlur.tar.gz` (or the RealBlur-J part) from
    https://cg.postech.ac.kr/research/realblur/ and extract it; `manual_dir` is the folder
    holding `RealBlur_J_train_list.txt`. Pairs are read from the official list files, whose
    lines name `<gt path> <blur path>` relative to that folder.

    Splits: `train` (3,758), `test` (980).

    References:
      Rim, Lee, Won, Cho. Real-World Blur Dataset for Learning and Benchmarking Deblurring
      Algorithms. ECCV 2020.
    """

    name = "realblur_j"
    VARIANT = "J"


class RealblurR(_RealBlur):
    """RealBlur-R (raw, linear): 3,758 training and 980 test pairs.

    Download `RealBlur.tar.gz` (or the RealBlur-R part) from
    https://cg.postech.ac.kr/research/realblur/ and extract it; `manual_dir` is the folder
    holding `RealBlur_R_train_list.txt`. Pairs are read from the official list files.

    Splits: `train` (3,758), `test` (980).

    References:
      Rim, Lee, Won, Cho. Real-World Blur Dataset for Learning and Benchmarking Deblurring
      Algorithms. ECCV 2020.
    """

    name = "realblur_r"
    VARIANT = "R"
