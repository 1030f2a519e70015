"""Any folder of blurry/sharp pairs matched by file name (the user's own data)."""

import pathlib

from data_pipelines import paired


class PairedFolder(paired.PairedImageBuilder):
    """A user folder of `blurry/` + `sharp/` images paired by file name.

    `manual_dir` either holds `blurry/` and `sharp/` directly (one split, `train`) or one
    sub-folder per split, each with `blurry/` and `sharp/` (split names are the sub-folder
    names, e.g. `train/`, `test/`). A blurry file pairs with the sharp file of the same
    name, or failing that of the same stem with another image suffix (`a.jpg` with `a.png`).
    Build each folder into its own `data_dir` (the builder name is always `paired_folder`).
    """

    name = "paired_folder"
    DOWNLOAD_URL = "(your own data)"
    LAYOUT = """
  <manual_dir>/blurry/<name>.png  and  <manual_dir>/sharp/<name>.png      -> split "train"
  or  <manual_dir>/<split>/blurry/<name>.png  and  <manual_dir>/<split>/sharp/<name>.png
"""

    @staticmethod
    def _sharp_name(sharp_dir: pathlib.Path):
        by_stem = {p.stem: p.name for p in paired.list_image_files(sharp_dir)}
        return lambda blurry: (blurry.name if (sharp_dir / blurry.name).is_file()
                               else by_stem.get(blurry.stem, blurry.name))

    def _find_pairs(self, manual_dir: pathlib.Path) -> dict[str, list[paired.Pair]]:
        if (manual_dir / "blurry").is_dir():
            roots = {"train": manual_dir}
        else:
            roots = {p.name: p for p in sorted(manual_dir.iterdir())
                     if (p / "blurry").is_dir()}
        return {split: paired.match_by_name(
                    paired.list_image_files(root / "blurry"), root / "sharp", manual_dir,
                    sharp_name=self._sharp_name(root / "sharp"))
                for split, root in roots.items()}
