"""Shared base of the paired (blurry, sharp) TFDS builders: layout checks, pairing, encoding.

Every real-data builder in `data_pipelines/` is a thin subclass of `PairedImageBuilder`: it
names where to download the data, the tree it expects under `manual_dir`, and a
`_find_pairs(manual_dir)` that turns that tree into `Pair`s per split. Everything else --
the missing-directory message, the list of blurry images without a sharp partner, the size
check, decoding, the feature spec -- lives here once.

TFDS without TensorFlow (measured with tensorflow-datasets 4.9.10, no TF installed):

- `GeneratorBasedBuilder.download_and_prepare(file_format="array_record")` works: no Beam,
  no TF. `tfds.data_source(...)` / `builder.as_data_source()` read the result with random
  access, and `grain.MapDataset.source` consumes that directly.
- `tfds.features.Image` does NOT work: encoding a PNG calls `tf.image.encode_png`
  ("No module named 'tensorflow'"). `tfds.features.Tensor(shape=(None, None, C),
  dtype=np.uint8, encoding="zlib")` works (a tensor with more than one unknown dimension
  must set `encoding="zlib"` or `"bytes"`), so images are stored as zlib-compressed uint8
  arrays and come back as numpy arrays without any decoding step of ours.
- `tfds.features.Text` and scalar/fixed-shape `Tensor`s work; text comes back as `bytes`.
- `self.dataset_info_from_configs(...)` fails for builders that live in a package which is
  not a TFDS dataset folder (it looks for metadata files next to the module), so `_info`
  builds `tfds.core.DatasetInfo(builder=self, ...)` directly.
- `DatasetBuilder.code_path` (read while preparing, to find a checksums file) touches
  `importlib_resources`, which tfds 4.9.10 uses but does not install, for any builder
  defined in a package: `PairedImageBuilder.code_path` returns the module file directly
  (what tfds itself falls back to).
- `tfds.list_builders()` needs TF (it refreshes the community index) -- never call it.
- tfds writes into `<data_dir>/<name>/<version>.incomplete...` and renames on success, but it
  leaves `<data_dir>/downloads/` and empty parent folders behind on failure, so
  `data_pipelines.build.build_dataset` builds into a private temporary directory and moves
  the finished version folder into place (see there).

Storage conventions for every builder: `blurry` and `sharp` are `(H, W, C)` uint8; an
example without a sharp image (Lai's real split) stores `sharp` as a `(0, 0, C)` array;
builders with ground-truth kernels add `kernel: (k, k) float32` summing to 1 (`(0, 0)` where
the split has none). Images are read through `jaxdeblur.io.read_image` and quantised with
`round(255 x)`, which is exact for 8-bit files (16-bit files are rounded to 8 bits: every
benchmark here is distributed as 8-bit PNG/JPEG).
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import pathlib
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import numpy as np
from etils import epath
import tensorflow_datasets as tfds
from PIL import Image

from jaxdeblur import io as jaxdeblur_io

IMAGE_SUFFIXES = jaxdeblur_io.IMAGE_EXTENSIONS
_MAX_LISTED = 20


class DatasetLayoutError(ValueError):
    """The manual directory is missing, laid out differently, or holds bad files."""


@dataclasses.dataclass(frozen=True)
class Pair:
    """One example to write.

    Attributes:
      key: unique, stable example key (the blurry file's path relative to `manual_dir`).
      blurry: path of the blurry image.
      sharp: path of the sharp image, or None where the split has no ground truth.
      kernel: path of the ground-truth kernel (image, .npy or .mat), or None.
      extra: builder-specific fields, read by the builder's `_extra_example`.
    """

    key: str
    blurry: pathlib.Path
    sharp: pathlib.Path | None
    kernel: pathlib.Path | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def list_image_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """Image files directly inside `directory`, sorted by name (empty if it is absent)."""
    directory = pathlib.Path(directory)
    return jaxdeblur_io.list_images(directory) if directory.is_dir() else []


def match_by_name(blurry_files: Sequence[pathlib.Path], sharp_dir: pathlib.Path,
                  root: pathlib.Path, *, sharp_name=lambda p: p.name) -> list[Pair]:
    """Pairs each blurry file with `sharp_dir / sharp_name(blurry)`; missing partners -> None."""
    pairs = []
    for blurry in blurry_files:
        sharp = pathlib.Path(sharp_dir) / sharp_name(blurry)
        pairs.append(Pair(key=blurry.relative_to(root).as_posix(), blurry=blurry,
                          sharp=sharp if sharp.is_file() else None))
    return pairs


def format_list(items: Sequence[str]) -> str:
    """Indented listing of at most 20 items, then a count of the rest (for error messages)."""
    shown = "\n".join(f"  {item}" for item in items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f"\n  ... and {more} more" if more > 0 else "")


def read_image_uint8(path: pathlib.Path, channels: int) -> np.ndarray:
    """Reads an image file as `(H, W, channels)` uint8 through `jaxdeblur.io.read_image`.

    `round(255 x)` of the float image: exact for 8-bit files; grayscale is repeated to 3
    channels when `channels == 3`, colour becomes BT.601 luma when `channels == 1`, alpha
    is dropped (all as `read_image` documents).

    Raises:
      DatasetLayoutError: the file is missing, truncated or not an image; names the path.
    """
    try:
        image = jaxdeblur_io.read_image(path, channels=channels)
    except jaxdeblur_io.ImageReadError as error:
        raise DatasetLayoutError(f"cannot read image {path}: {error}") from error
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def read_kernel(path: pathlib.Path) -> np.ndarray:
    """Reads a ground-truth kernel (image, .npy, or .mat with one 2-D array) normalised to sum 1.

    Returns:
      `(k, k)` float32, non-negative, summing to 1.
    """
    path = pathlib.Path(path)
    try:
        if path.suffix == ".npy":
            kernel = np.load(path)
        elif path.suffix == ".mat":
            import scipy.io
            arrays = [v for k, v in scipy.io.loadmat(path).items()
                      if not k.startswith("__") and np.ndim(v) == 2]
            if len(arrays) != 1:
                raise ValueError(f"expected one 2-D array in the .mat file, found {len(arrays)}")
            kernel = arrays[0]
        else:
            kernel = jaxdeblur_io.read_image(path, channels=1)[..., 0]
    except (OSError, ValueError) as error:  # ImageReadError is both.
        raise DatasetLayoutError(f"cannot read kernel {path}: {error}") from error
    kernel = np.clip(np.asarray(kernel, np.float64), 0.0, None)
    if kernel.ndim != 2 or kernel.sum() <= 0:
        raise DatasetLayoutError(f"kernel {path} has shape {kernel.shape} and sum {kernel.sum()}; "
                                 "expected a non-zero 2-D array")
    return (kernel / kernel.sum()).astype(np.float32)


def image_size(path: pathlib.Path) -> tuple[int, int]:
    """`(H, W)` from the file header (no decoding, EXIF orientation not applied; the decoded
    shapes are compared again while writing)."""
    try:
        with Image.open(path) as handle:
            width, height = handle.size
    except OSError as error:
        raise DatasetLayoutError(f"cannot read image {path}: {error}") from error
    return height, width


class ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A `GeneratorBasedBuilder` that prepares without TensorFlow (see the module docstring)."""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """The module file (tfds' own lookup needs the uninstalled `importlib_resources`)."""
        return epath.Path(inspect.getfile(cls))


class PairedImageBuilder(ArrayRecordBuilder, skip_registration=True):
    """Base of the (blurry, sharp[, kernel]) builders that read a manually downloaded tree.

    Subclasses set `name`, `DOWNLOAD_URL`, `LAYOUT` (the tree expected under `manual_dir`,
    shown verbatim in errors) and implement `_find_pairs`. The first line of `LAYOUT`'s
    error text and the builder docstring are the documentation users see.

    Class attributes:
      DOWNLOAD_URL: official project page.
      LAYOUT: the expected tree.
      CHANNELS: 3 (RGB) or 1 (grayscale data sets).
      HAS_KERNEL: add a `kernel` feature.
      SPLITS_WITHOUT_SHARP: splits whose examples legitimately have no sharp image.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    DOWNLOAD_URL: ClassVar[str] = ""
    LAYOUT: ClassVar[str] = ""
    CHANNELS: ClassVar[int] = 3
    HAS_KERNEL: ClassVar[bool] = False
    SPLITS_WITHOUT_SHARP: ClassVar[frozenset] = frozenset()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.MANUAL_DOWNLOAD_INSTRUCTIONS = cls.manual_instructions()


    @classmethod
    def manual_instructions(cls) -> str:
        """Where to download the data and how `manual_dir` must look."""
        return (f"Download {cls.name} from {cls.DOWNLOAD_URL} and extract it so that "
                f"manual_dir looks like:\n{cls.LAYOUT.strip(chr(10))}")

    @abc.abstractmethod
    def _find_pairs(self, manual_dir: pathlib.Path) -> dict[str, list[Pair]]:
        """Maps split name -> pairs found under `manual_dir` (sharp None where missing)."""

    def _extra_features(self) -> dict[str, tfds.features.FeatureConnector]:
        return {}

    def _extra_example(self, pair: Pair) -> dict[str, Any]:
        del pair
        return {}

    def _info(self) -> tfds.core.DatasetInfo:
        channels = self.CHANNELS
        features = {
            "blurry": tfds.features.Tensor(shape=(None, None, channels), dtype=np.uint8,
                                           encoding="zlib"),
            "sharp": tfds.features.Tensor(shape=(None, None, channels), dtype=np.uint8,
                                          encoding="zlib"),
            "name": tfds.features.Text(),
        }
        if self.HAS_KERNEL:
            features["kernel"] = tfds.features.Tensor(shape=(None, None), dtype=np.float32,
                                                      encoding="zlib")
        features.update(self._extra_features())
        return tfds.core.DatasetInfo(
            builder=self, description=(type(self).__doc__ or "").strip(),
            features=tfds.features.FeaturesDict(features), homepage=self.DOWNLOAD_URL)

    def check_manual_dir(self, manual_dir) -> pathlib.Path:
        """Raises `DatasetLayoutError` with download instructions if `manual_dir` is unusable."""
        if manual_dir is None:
            raise DatasetLayoutError(f"{self.name} needs manual_dir (the extracted download). "
                                     + self.manual_instructions())
        manual_dir = pathlib.Path(manual_dir)
        if not manual_dir.is_dir() or not any(manual_dir.iterdir()):
            raise DatasetLayoutError(f"manual_dir {manual_dir} does not exist or is empty. "
                                     + self.manual_instructions())
        return manual_dir

    def collect(self, manual_dir) -> dict[str, list[Pair]]:
        """Finds and validates every pair before anything is written.

        Checks: `manual_dir` exists; every split has examples; every blurry image has a sharp
        partner (except in `SPLITS_WITHOUT_SHARP`); blurry and sharp sizes agree (read from
        the file headers). Decoding errors surface later, while writing, naming the file.

        Raises:
          DatasetLayoutError: with the list of offending files and the expected layout.
        """
        manual_dir = self.check_manual_dir(manual_dir)
        splits = self._find_pairs(manual_dir)
        empty = [split for split, pairs in splits.items() if not pairs]
        if not splits or empty:
            raise DatasetLayoutError(
                f"no blurry images found under {manual_dir} for split(s) {empty or 'any'}. "
                + self.manual_instructions())
        orphans = [f"{split}: {pair.blurry}" for split, pairs in splits.items()
                   if split not in self.SPLITS_WITHOUT_SHARP
                   for pair in pairs if pair.sharp is None]
        if orphans:
            raise DatasetLayoutError(
                f"{len(orphans)} blurry image(s) under {manual_dir} have no sharp partner:\n"
                f"{format_list(orphans)}\n" + self.manual_instructions())
        mismatched = []
        for pairs in splits.values():
            for pair in pairs:
                sizes = self._pair_sizes(pair)
                if sizes is not None and sizes[0] != sizes[1]:
                    mismatched.append(f"{pair.blurry} {sizes[0]} vs {pair.sharp} {sizes[1]}")
        if mismatched:
            raise DatasetLayoutError(
                f"{len(mismatched)} blurry/sharp pair(s) differ in size (H, W):\n"
                f"{format_list(mismatched)}")
        return splits

    def _pair_sizes(self, pair: Pair) -> tuple[tuple[int, int], tuple[int, int]] | None:
        if pair.sharp is None:
            return None
        return image_size(pair.blurry), image_size(pair.sharp)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        try:
            manual_dir = dl_manager.manual_dir
        except AssertionError as error:  # tfds signals a missing manual_dir this way.
            raise DatasetLayoutError(str(error)) from error
        splits = self.collect(manual_dir)
        return {split: self._generate_examples(pairs) for split, pairs in splits.items()}

    def _generate_examples(self, pairs: Sequence[Pair]) -> Iterator[tuple[str, dict]]:
        for pair in pairs:
            yield pair.key, self._example(pair)

    def _example(self, pair: Pair) -> dict[str, Any]:
        blurry = read_image_uint8(pair.blurry, self.CHANNELS)
        if pair.sharp is None:
            sharp = np.zeros((0, 0, self.CHANNELS), np.uint8)
        else:
            sharp = read_image_uint8(pair.sharp, self.CHANNELS)
            if sharp.shape != blurry.shape:
                raise DatasetLayoutError(f"{pair.blurry} {blurry.shape} and {pair.sharp} "
                                         f"{sharp.shape} differ in size")
        example = {"blurry": blurry, "sharp": sharp, "name": pair.key}
        if self.HAS_KERNEL:
            example["kernel"] = (read_kernel(pair.kernel) if pair.kernel is not None
                                 else np.zeros((0, 0), np.float32))
        example.update(self._extra_example(pair))
        return example
