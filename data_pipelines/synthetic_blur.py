"""The embedded default data set: scikit-image's sharp photos blurred by known kernel fields.

Sharp tiles are random rescales + crops of the photographs that ship inside scikit-image
(no download), optionally plus a folder of the user's sharp images. Each tile is blurred by
a non-uniform kernel field from `jaxdeblur.kernels.kernel_field` (a random camera rotation,
exact per pixel) and Gaussian noise via `jaxdeblur.kernels.synthesize_blur`.

Storage decision (measured): a 256² tile with 19² kernels as float32 is 256·256·361·4 B =
94.6 MB per example (23.7 MB at 128²), ~100x the two images. Instead every example stores
its `seed`; `kernel_field(key_field, ...)` and the noise draw are deterministic functions of
it, so `rebuild_kernel_field(example)` regenerates the field exactly (same jitted function
and float32 arithmetic, bit for bit on the same backend) in ~0.1-0.4 s per 128²-256² tile
on one CPU core. The stored parameters (`kernel_size`, `noise_sigma`, the kernel-field
options as JSON) make an example self-describing. `sharp` is quantised to uint8 *before*
blurring, so the stored sharp image is exactly the one that was blurred; the stored blurry
image is `round(255 · synthesize_blur(key_noise, sharp / 255, field, noise_sigma))`, i.e.
the re-synthesis matches it to within uint8 quantisation (|Δ| <= 0.5/255), and
`per_pixel_blur(sharp, field)` matches it to within the noise (σ) plus quantisation.

Train and test tiles come from disjoint source photographs (`SyntheticBlurConfig.
train_sources` / `test_sources`). Build time, default config (82 tiles of 256²): 30 s of
CPU time (25 s user + 5 s system; 2 min 22 s wall on the shared 2-core development machine
at load average 24); `tiny`: ~15 s wall, mostly jit compilation. On disk: 21 MB (default).

    python -m data_pipelines.build synthetic_blur --data_dir ~/tfds
    python -m data_pipelines.build synthetic_blur --config tiny --data_dir /tmp/tfds
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any, Mapping

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines import paired

# Photographs bundled with scikit-image (files inside the wheel, no pooch download), by the
# name of their `skimage.data` loader. Excluded on purpose: `clock` (motion-blurred
# already), `logo`/`colorwheel`/`checkerboard`/`horse` (graphics), `page`/`text`/
# `microaneurysms` (smaller than a 256² tile), the right stereo view (same scene as the
# left one, which would leak across splits).
BUNDLED_SOURCES = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry",
                   "retina", "motorcycle", "brick", "grass", "gravel", "cell", "coins",
                   "chelsea", "coffee", "camera", "moon")


def load_bundled_image(name: str) -> np.ndarray:
    """A photograph bundled with scikit-image as `(H, W, 3)` uint8 (grayscale repeated)."""
    import skimage.data
    if name == "motorcycle":
        image = skimage.data.stereo_motorcycle()[0]
    elif name in BUNDLED_SOURCES:
        image = getattr(skimage.data, name)()
    else:
        raise ValueError(f"unknown bundled image {name!r}; choose from {BUNDLED_SOURCES}")
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


@dataclasses.dataclass
class SyntheticBlurConfig(tfds.core.BuilderConfig):
    """Every number of the synthetic data set.

    Attributes:
      tile_size: side of the square tiles (pixels).
      kernel_size: side of the per-pixel kernels (odd; the flow prior's is 19).
      train_sources / test_sources: disjoint `BUNDLED_SOURCES` names.
      tiles_per_train_source / tiles_per_test_source: tiles cut from each source image.
      min_scale / max_scale: the source is rescaled by a uniform factor in this range
        (raised where needed so the tile fits) before a uniform random crop.
      noise_sigma: Gaussian noise std added after blurring (images in [0, 1]).
      max_angle_deg: peak camera rotation per axis (`kernel_field`, rotation mode).
      n_samples: exposure samples of the rotation.
      user_test_fraction: share of the images from `sharp_dir` (sorted by name, taken from
        the end, at least one if there are two or more) that go to the test split.
      seed: root seed of crops, kernel fields and noise.
    """

    tile_size: int = 256
    kernel_size: int = 19
    train_sources: tuple = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry",
                            "retina", "motorcycle", "brick", "grass", "gravel", "cell",
                            "coins")
    test_sources: tuple = ("chelsea", "coffee", "camera", "moon")
    tiles_per_train_source: int = 6
    tiles_per_test_source: int = 4
    min_scale: float = 0.5
    max_scale: float = 1.0
    noise_sigma: float = 0.01
    max_angle_deg: float = 1.0
    n_samples: int = 64
    user_test_fraction: float = 0.2
    seed: int = 0

    def kernel_field_options(self) -> dict[str, Any]:
        """Keyword arguments of `jaxdeblur.kernels.kernel_field` besides key, shape, size."""
        return {"mode": "rotation", "max_angle_deg": self.max_angle_deg,
                "n_samples": self.n_samples}


@functools.lru_cache(maxsize=8)
def _field_and_blur_fns(shape: tuple[int, int], size: int, options_json: str):
    """Jitted (kernel field, blur) for one tile shape; shared by building and rebuilding."""
    import jax

    from jaxdeblur import kernels
    options = json.loads(options_json)
    field_fn = jax.jit(lambda key: kernels.kernel_field(key, shape, size, **options))
    blur_fn = jax.jit(lambda key, sharp, field, sigma: kernels.synthesize_blur(
        key, sharp, field, noise_sigma=sigma))
    return field_fn, blur_fn


def _keys(seed: int):
    import jax
    field_key, noise_key = jax.random.split(jax.random.key(int(seed)))
    return field_key, noise_key


def _field(example: Mapping[str, Any]):
    shape = tuple(int(n) for n in np.shape(example["sharp"])[:2])
    options = example["kernel_field_options"]
    options = options.decode() if isinstance(options, bytes) else str(options)
    field_fn, blur_fn = _field_and_blur_fns(shape, int(example["kernel_size"]), options)
    return field_fn(_keys(example["seed"])[0]), blur_fn


def rebuild_kernel_field(example: Mapping[str, Any]) -> np.ndarray:
    """The exact ground-truth kernel field of a stored `synthetic_blur` example.

    Args:
      example: a record of the data set (needs `sharp`, `seed`, `kernel_size`,
        `kernel_field_options`).

    Returns:
      `(H, W, k, k)` float32, every kernel non-negative with sum 1, cross-correlation
      convention (`jaxdeblur.blur.per_pixel_blur`).
    """
    return np.asarray(_field(example)[0])


def resynthesize_blurry(example: Mapping[str, Any]) -> np.ndarray:
    """The unquantised blurry image of an example: `synthesize_blur` with its stored seeds.

    Returns:
      `(H, W, 3)` float32 in [0, 1]; `example["blurry"]` is `round(255 ·)` of it.
    """
    field, blur_fn = _field(example)
    sharp = np.asarray(example["sharp"], np.float32) / 255.0
    return np.asarray(blur_fn(_keys(example["seed"])[1], sharp, field,
                              np.float32(example["noise_sigma"])))


class SyntheticBlur(paired.ArrayRecordBuilder):
    """Sharp scikit-image photographs blurred by known non-uniform kernel fields.

    Features: `blurry`, `sharp` `(T, T, 3)` uint8; `name` (`<source>/<tile>`); `seed`,
    `kernel_size`, `noise_sigma`, `kernel_field_options` (JSON) -- enough to rebuild the
    ground-truth kernel field with `rebuild_kernel_field(example)`.

    Configs: `default` (256² tiles, 19² kernels, 66 train / 16 test tiles, ~1 min),
    `tiny` (32² tiles, 7² kernels, 4 train / 2 test tiles; for tests and CI).
    Splits: `train`, `test` (no source image in common).

    Args (constructor, besides the tfds ones):
      sharp_dir: optional folder of the user's sharp images, added to the sources (see
        `SyntheticBlurConfig.user_test_fraction`).
    """

    name = "synthetic_blur"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        SyntheticBlurConfig(name="default", description="256² tiles, 19² kernels"),
        SyntheticBlurConfig(name="tiny", description="32² tiles for tests", tile_size=32,
                            kernel_size=7, train_sources=("astronaut", "rocket"),
                            test_sources=("chelsea",), tiles_per_train_source=2,
                            tiles_per_test_source=2, max_angle_deg=2.0, n_samples=16),
    ]

    def __init__(self, *, sharp_dir=None, **kwargs):
        self._sharp_dir = None if sharp_dir is None else pathlib.Path(sharp_dir)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        tile = self.builder_config.tile_size
        return tfds.core.DatasetInfo(
            builder=self, description=(type(self).__doc__ or "").strip(),
            features=tfds.features.FeaturesDict({
                "blurry": tfds.features.Tensor(shape=(tile, tile, 3), dtype=np.uint8,
                                               encoding="zlib"),
                "sharp": tfds.features.Tensor(shape=(tile, tile, 3), dtype=np.uint8,
                                              encoding="zlib"),
                "name": tfds.features.Text(),
                "seed": tfds.features.Scalar(dtype=np.int64),
                "kernel_size": tfds.features.Scalar(dtype=np.int32),
                "noise_sigma": tfds.features.Scalar(dtype=np.float32),
                "kernel_field_options": tfds.features.Text(),
            }))

    def _sources(self) -> dict[str, list[tuple[str, Any]]]:
        config = self.builder_config
        overlap = set(config.train_sources) & set(config.test_sources)
        if overlap:
            raise ValueError(f"train_sources and test_sources share {sorted(overlap)}; "
                             "the splits must not share a source image")
        splits = {"train": [(name, name) for name in config.train_sources],
                  "test": [(name, name) for name in config.test_sources]}
        if self._sharp_dir is not None:
            files = paired.list_image_files(self._sharp_dir)
            if not files:
                raise paired.DatasetLayoutError(
                    f"sharp_dir {self._sharp_dir} holds no images ({paired.IMAGE_SUFFIXES})")
            n_test = int(round(config.user_test_fraction * len(files)))
            n_test = max(n_test, 1) if len(files) >= 2 else 0
            cut = len(files) - n_test
            splits["train"] += [(f"user/{p.name}", p) for p in files[:cut]]
            splits["test"] += [(f"user/{p.name}", p) for p in files[cut:]]
        return splits

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split, sources)
                for split, sources in self._sources().items()}

    def _tile(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        config = self.builder_config
        height, width = image.shape[:2]
        smallest = config.tile_size / min(height, width)
        scale = max(rng.uniform(config.min_scale, config.max_scale), smallest)
        size = (max(config.tile_size, round(width * scale)),
                max(config.tile_size, round(height * scale)))
        resized = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
        top = rng.integers(0, resized.shape[0] - config.tile_size + 1)
        left = rng.integers(0, resized.shape[1] - config.tile_size + 1)
        return resized[top:top + config.tile_size, left:left + config.tile_size]

    def _generate_examples(self, split: str, sources):
        config = self.builder_config
        per_source = (config.tiles_per_train_source if split == "train"
                      else config.tiles_per_test_source)
        options = json.dumps(config.kernel_field_options(), sort_keys=True)
        split_id = {"train": 0, "test": 1}[split]
        for source_index, (label, source) in enumerate(sources):
            image = (load_bundled_image(source) if isinstance(source, str)
                     else paired.read_image_uint8(source, 3))
            for tile_index in range(per_source):
                entropy = [config.seed, split_id, source_index, tile_index]
                rng = np.random.default_rng(entropy)
                seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])
                example = {"sharp": self._tile(image, rng), "seed": seed,
                           "kernel_size": config.kernel_size,
                           "noise_sigma": np.float32(config.noise_sigma),
                           "kernel_field_options": options,
                           "name": f"{label}/{tile_index:03d}"}
                blurry = resynthesize_blurry(example)
                example["blurry"] = np.round(np.clip(blurry, 0.0, 1.0) * 255).astype(np.uint8)
                yield example["name"], example
