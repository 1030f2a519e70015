"""grain input pipelines over the prepared data sets: paired crops/flips/rotations, batching.

    source = load_split("gopro", "train", "~/tfds")
    batches = make_pipeline(source, batch_size=8, crop_size=256, seed=0)
    batch = next(batches)            # {"blurry": (8, 256, 256, 3) float32 in [0, 1], ...}
    state = batches.get_state()      # JSON-serialisable; save it with the checkpoint
    batches.set_state(state)         # ... and a resumed run sees exactly the same batches

Order of operations (all deterministic functions of `seed` and the record index):
shard the records (`records[shard_index::shard_count]`, before anything random, so the
shards are disjoint and together complete) -> shuffle with a new permutation every epoch ->
repeat -> paired augmentation with a per-element generator (grain `random_map`, seeded by
`seed` and the element's position, so worker count and resumption do not change it) ->
batch -> optional worker processes (`mp_prefetch`).

Paired augmentation draws once and applies the same crop, flips and quarter turns to
`blurry`, `sharp`, a per-pixel `kernel_field` `(H, W, k, k)` and a uniform `kernel` `(k, k)`.
Why kernels flip with the image, in the cross-correlation convention
`y[p] = Σ_d x[p + d] k_p[d]`: for a horizontal flip `x'[i, j] = x[i, W-1-j]`,

    y'[i, j] = y[i, W-1-j] = Σ_d x[i + d_i, W-1-j + d_j] k_(i, W-1-j)[d]
             = Σ_d x'[i + d_i, j - d_j] k_(i, W-1-j)[d_i, d_j],

so `k'_(i, j)[d_i, d_j] = k_(i, W-1-j)[d_i, -d_j]`: the field's pixel grid flips AND every
kernel flips the same way (`field[:, ::-1, :, ::-1]`). The same argument with the linear map
of a quarter turn gives `rot90` on the grid axes and on the kernel axes, same direction.
Cropping moves only the grid. `tests/test_data_pipeline.py` checks this by re-blurring.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re
from typing import Any, Iterator, Mapping

import grain
import numpy as np

_IMAGE_KEYS = ("blurry", "sharp")
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def _versions(folder: pathlib.Path) -> list[pathlib.Path]:
    found = [p for p in folder.iterdir() if p.is_dir() and _VERSION.match(p.name)]
    return sorted(found, key=lambda p: tuple(int(n) for n in p.name.split(".")))


def dataset_dir(name: str, data_dir, *, config: str | None = None,
                version: str | None = None) -> pathlib.Path:
    """The prepared folder `data_dir/name[/config]/version` (newest version by default).

    Raises:
      FileNotFoundError: nothing prepared there; says how to build it.
    """
    root = pathlib.Path(data_dir).expanduser() / name
    hint = (f"build it with `python -m data_pipelines.build {name} --data_dir {data_dir}"
            f"{' --config ' + config if config else ''} [--manual_dir ...]`")
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist; {hint}")
    if config is None and not _versions(root):
        configs = sorted(p.name for p in root.iterdir()
                         if p.is_dir() and not p.name.startswith(".") and _versions(p))
        if len(configs) != 1:
            raise FileNotFoundError(
                f"{root} holds configs {configs}; pass config= to choose one" if configs
                else f"{root} holds no prepared version; {hint}")
        config = configs[0]
    folder = root / config if config else root
    versions = _versions(folder) if folder.is_dir() else []
    if version is not None:
        versions = [p for p in versions if p.name == version]
    if not versions:
        raise FileNotFoundError(f"no prepared version{' ' + version if version else ''} "
                                f"under {folder}; {hint}")
    return versions[-1]


def load_split(name: str, split: str, data_dir, *, config: str | None = None,
               version: str | None = None):
    """A random-access source (`len`, `__getitem__`) of one prepared split.

    Args:
      name: data set name (`data_pipelines.build.BUILDERS`).
      split: split name; TFDS split arithmetic works (`"test_close_ups+test_long_shot"`,
        `"train[:10%]"`).
      data_dir: the TFDS data directory the data set was built into.
      config: builder config (`synthetic_blur`: default | tiny; `kohler`: ...); may be
        omitted when only one is prepared.
      version: e.g. "1.0.0"; the newest prepared one by default.

    Returns:
      A `tfds` `ArrayRecordDataSource`; records are dicts of numpy arrays (`blurry`,
      `sharp` uint8, ...), `name` as bytes. No TensorFlow, no builder code needed.
    """
    import tensorflow_datasets as tfds
    folder = dataset_dir(name, data_dir, config=config, version=version)
    return tfds.builder_from_directory(str(folder)).as_data_source(split=split)


def _crop(array: np.ndarray, top: int, left: int, size: int | None) -> np.ndarray:
    if size is None or array.size == 0:
        return array
    return array[top:top + size, left:left + size]


def transform_example(example: Mapping[str, Any], *, top: int = 0, left: int = 0,
                      crop_size: int | None = None, flip_vertical: bool = False,
                      flip_horizontal: bool = False, quarter_turns: int = 0) -> dict:
    """Applies one geometric transform to every spatial field of an example, consistently.

    Order: crop `[top:top+crop_size, left:left+crop_size]`, vertical flip, horizontal flip,
    `np.rot90(·, quarter_turns)` (counter-clockwise). Images `(H, W, C)` and the kernel
    field's grid move; kernel axes (of `kernel_field` `(H, W, k, k)` and `kernel` `(k, k)`)
    flip and turn with the image (see the module docstring). Other fields pass through.

    Args:
      example: dict with `blurry`, `sharp` (`(0, 0, C)` allowed: no ground truth) and
        optionally `kernel_field`, `kernel` (`(0, 0)` allowed), `sharp_frames`
        `(N, H, W, C)`.
      top, left, crop_size: the crop (None = whole image).
      flip_vertical, flip_horizontal, quarter_turns: the rigid transform.

    Returns:
      A new dict with the transformed arrays.
    """
    def image_like(array, kernel_axes):
        array = _crop(array, top, left, crop_size)
        if array.size == 0:
            return array
        if flip_vertical:
            array = np.flip(array, (0,) + kernel_axes[:1])
        if flip_horizontal:
            array = np.flip(array, (1,) + kernel_axes[1:])
        array = np.rot90(array, quarter_turns, axes=(0, 1))
        if kernel_axes:
            array = np.rot90(array, quarter_turns, axes=kernel_axes)
        return array

    def kernel_only(array):
        if array.size == 0:
            return array
        if flip_vertical:
            array = np.flip(array, 0)
        if flip_horizontal:
            array = np.flip(array, 1)
        return np.rot90(array, quarter_turns, axes=(0, 1))

    out = dict(example)
    for key in _IMAGE_KEYS:
        out[key] = image_like(np.asarray(example[key]), ())
    if "kernel_field" in example:
        out["kernel_field"] = image_like(np.asarray(example["kernel_field"]), (2, 3))
    if "sharp_frames" in example:  # Köhler: (N, H, W, C), every frame moves like `sharp`.
        frames = np.asarray(example["sharp_frames"])
        out["sharp_frames"] = np.stack([image_like(frame, ()) for frame in frames]) \
            if len(frames) else frames
    if "kernel" in example:
        out["kernel"] = kernel_only(np.asarray(example["kernel"]))
    return out


def _check_example(example: Mapping[str, Any], crop_size: int | None) -> tuple[int, int]:
    height, width = np.shape(example["blurry"])[:2]
    sharp_shape = np.shape(example["sharp"])
    name = example.get("name", b"?")
    if sharp_shape[0] and sharp_shape[:2] != (height, width):
        raise ValueError(f"record {name!r}: blurry {(height, width)} and sharp "
                         f"{sharp_shape[:2]} differ in size")
    if crop_size is not None and (height < crop_size or width < crop_size):
        raise ValueError(f"record {name!r} is {(height, width)}, smaller than crop_size "
                         f"{crop_size}; choose a smaller crop_size")
    return height, width


def random_augment(example: Mapping[str, Any], rng: np.random.Generator, *,
                   crop_size: int | None, flips: bool = True, rotations: bool = True) -> dict:
    """Random paired crop, flips and quarter turns, drawn once from `rng` for all fields."""
    height, width = _check_example(example, crop_size)
    top = int(rng.integers(0, height - crop_size + 1)) if crop_size else 0
    left = int(rng.integers(0, width - crop_size + 1)) if crop_size else 0
    flip_vertical, flip_horizontal = (bool(b) for b in rng.integers(0, 2, size=2))
    quarter_turns = int(rng.integers(0, 4))
    if crop_size is None and quarter_turns % 2 and height != width:
        quarter_turns -= 1  # A batch of uncropped images must keep one orientation.
    return transform_example(example, top=top, left=left, crop_size=crop_size,
                             flip_vertical=flips and flip_vertical,
                             flip_horizontal=flips and flip_horizontal,
                             quarter_turns=quarter_turns if rotations else 0)


def center_crop(example: Mapping[str, Any], *, crop_size: int | None) -> dict:
    """The deterministic evaluation crop (the whole image when `crop_size` is None)."""
    height, width = _check_example(example, crop_size)
    if crop_size is None:
        return dict(example)
    return transform_example(example, top=(height - crop_size) // 2,
                             left=(width - crop_size) // 2, crop_size=crop_size)


def _with_kernel_field(example: Mapping[str, Any]) -> dict:
    from data_pipelines.synthetic_blur import rebuild_kernel_field
    if "kernel_field_options" not in example:
        raise ValueError("with_kernel_field=True needs synthetic_blur records (they store "
                         "the seed of their kernel field); this record has keys "
                         f"{sorted(example)}")
    return {**example, "kernel_field": rebuild_kernel_field(example)}


_OUTPUT_KEYS = ("blurry", "sharp", "kernel_field", "kernel", "sharp_frames", "name", "index")


def _finish(example: Mapping[str, Any]) -> dict:
    """uint8 images -> float32 in [0, 1]; keeps only the fields a model step uses."""
    out = {key: example[key] for key in _OUTPUT_KEYS if key in example}
    for key in ("blurry", "sharp", "sharp_frames"):
        if key in out:
            out[key] = np.asarray(out[key], np.float32) / np.float32(255.0)
    for key in ("kernel_field", "kernel"):
        if key in out:
            out[key] = np.ascontiguousarray(out[key], np.float32)
    return out


class _Augment(grain.transforms.RandomMap):
    """Picklable random map (worker processes receive the pipeline by pickling)."""

    def __init__(self, crop_size, flips, rotations):
        self.crop_size, self.flips, self.rotations = crop_size, flips, rotations

    def random_map(self, element, rng):
        return _finish(random_augment(element, rng, crop_size=self.crop_size,
                                      flips=self.flips, rotations=self.rotations))


class _Evaluate(grain.transforms.Map):
    """Picklable deterministic evaluation map (centre crop, float conversion)."""

    def __init__(self, crop_size):
        self.crop_size = crop_size

    def map(self, element):
        return _finish(center_crop(element, crop_size=self.crop_size))


def _add_index(num_records: int, index: int, example: Mapping[str, Any]) -> dict:
    # Past the first epoch grain hands `index + epoch * len` through to the source.
    return {**example, "index": np.int64(index % num_records)}


def make_pipeline(source, *, batch_size: int, crop_size: int | None, seed: int,
                  train: bool = True, num_epochs: int | None = None, num_workers: int = 0,
                  shard_index: int | None = None, shard_count: int | None = None,
                  with_kernel_field: bool = False, flips: bool = True,
                  rotations: bool = True, drop_remainder: bool | None = None):
    """A deterministic, resumable iterator of batches.

    Args:
      source: random-access records (`load_split(...)`, or any sequence of dicts with
        `blurry`, `sharp` uint8 `(H, W, C)`).
      batch_size: examples per batch on this process.
      crop_size: square crop side; None keeps whole images (then every image in a batch
        must have one size; evaluation on full images usually uses batch_size 1).
      seed: seeds the per-epoch shuffles and the augmentations.
      train: shuffle + random crops/flips/turns and repeat; False = source order, centre
        crop, one pass.
      num_epochs: passes over the data when training (None = forever).
      num_workers: worker processes (0 = decode and augment in this process).
      shard_index, shard_count: this process's share of the records
        (`records[shard_index::shard_count]`); default `jax.process_index()` /
        `jax.process_count()`. Shard sizes differ by at most one record, so a finite
        (evaluation) pass can give processes different batch counts: gather the metrics
        per process rather than stepping the processes in lock-step.
      with_kernel_field: add each record's ground-truth `kernel_field` (synthetic_blur
        only; rebuilt from its seed, `(crop, crop, k, k)` float32 per example).
      flips, rotations: enable those augmentations (training only).
      drop_remainder: drop a last partial batch (default: True when training).

    Returns:
      A grain `DatasetIterator` yielding dicts of numpy arrays: `blurry`, `sharp`
      `(B, h, w, C)` float32 in [0, 1], `index` `(B,)` record indices in `source`, `name`
      `(B,)` bytes when the records have names, and `kernel_field` / `kernel` /
      `sharp_frames` when present. `get_state()` returns a JSON-serialisable dict and
      `set_state(state)` resumes exactly, on an iterator built with the same arguments
      (the state layout depends on `num_workers`: resume with the same worker count).
    """
    if shard_index is None or shard_count is None:
        import jax
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, shard_count={shard_count}), "
                         f"got {shard_index}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if crop_size is not None and crop_size < 1:
        raise ValueError(f"crop_size must be >= 1 or None, got {crop_size}")
    if len(source) < shard_count:
        raise ValueError(f"{len(source)} records cannot be split into {shard_count} shards")
    dataset = grain.MapDataset.source(source).map_with_index(
        functools.partial(_add_index, len(source)))
    dataset = dataset[shard_index::shard_count]
    if with_kernel_field:
        dataset = dataset.map(_with_kernel_field)
    if train:
        dataset = dataset.shuffle(seed=seed).repeat(num_epochs)
        dataset = dataset.random_map(_Augment(crop_size, flips, rotations), seed=seed)
    else:
        dataset = dataset.map(_Evaluate(crop_size))
    dataset = dataset.batch(batch_size, drop_remainder=train if drop_remainder is None
                            else drop_remainder)
    iterable = dataset.to_iter_dataset()
    if num_workers > 0:
        from absl import flags
        if not flags.FLAGS.is_parsed():
            # grain's worker start-up reads its absl flags; outside an absl.app entry point
            # (tests, notebooks) they are unparsed and reading them raises. Their defaults
            # are what we want.
            flags.FLAGS.mark_as_parsed()
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(iterable)


def state_to_json(iterator) -> str:
    """The iterator's state as a JSON string (for the checkpoint's data-iterator entry)."""
    return json.dumps(iterator.get_state())


def restore_json_state(iterator, state: str) -> Iterator:
    """Sets an iterator (built with the same arguments) to a `state_to_json` state."""
    iterator.set_state(json.loads(state))
    return iterator
