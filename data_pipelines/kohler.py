"""Köhler et al. (ECCV 2012): real camera shake recorded with a robot, 4 images x 12 shakes."""

import dataclasses
import pathlib
import re

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import paired

_BLURRY = re.compile(r"Blurry(\d+)_(\d+)$")
_FRAME = re.compile(r"GroundTruth(\d+)_(\d+)_(\d+)$")


@dataclasses.dataclass
class KohlerConfig(tfds.core.BuilderConfig):
    """Which ground-truth frames to store.

    Attributes:
      frame_stride: keep every `frame_stride`-th frame of the recorded trajectory (the first
        frame is always kept). All ~199 frames of 48 examples at 800x800 are ~18 GB raw.
    """

    frame_stride: int = 1


class Kohler(paired.PairedImageBuilder):
    """Köhler benchmark: 48 blurry images, each with the sharp frames along its camera path.

    Download the "Benchmark dataset" (blurry images and ground-truth frames) from
    https://webdav.tuebingen.mpg.de/pixel/benchmark4camerashake/ and extract everything into
    `manual_dir` (sub-folders are searched recursively, so the archives' own folder names
    do not matter). The evaluation (SPEC §5) scores a restored image against every frame and
    keeps the best, so each example stores all kept frames in `sharp_frames`
    `(N, H, W, 3)` uint8 (in frame order) and, for code that expects one target, the middle
    kept frame in `sharp`.

    Configs: `all_frames` (every frame), `every_10th_frame` (about 20 frames per image).
    Splits: `test` (48).

    References:
      Köhler, Hirsch, Mohler, Schölkopf, Harmeling. Recording and Playback of Camera
      Shake: Benchmarking Blind Deconvolution with a Real-World Database. ECCV 2012.
    """

    name = "kohler"
    DOWNLOAD_URL = "https://webdav.tuebingen.mpg.de/pixel/benchmark4camerashake/"
    LAYOUT = """
  <manual_dir>/  (any sub-folders)
    Blurry<image>_<shake>.png                 image 1-4, shake 1-12
    GroundTruth<image>_<shake>_<frame>.png    frame 1..~199 along that shake
"""
    BUILDER_CONFIGS = [KohlerConfig(name="all_frames", frame_stride=1),
                       KohlerConfig(name="every_10th_frame", frame_stride=10)]

    def _extra_features(self):
        return {"sharp_frames": tfds.features.Tensor(shape=(None, None, None, 3),
                                                     dtype=np.uint8, encoding="zlib")}

    def _find_pairs(self, manual_dir: pathlib.Path) -> dict[str, list[paired.Pair]]:
        frames = {}
        for path in manual_dir.rglob("GroundTruth*"):
            match = _FRAME.match(path.stem)
            if match and path.suffix.lower() in paired.IMAGE_SUFFIXES:
                image, shake, frame = map(int, match.groups())
                frames.setdefault((image, shake), []).append((frame, path))
        pairs = []
        for path in sorted(manual_dir.rglob("Blurry*")):
            match = _BLURRY.match(path.stem)
            if not match or path.suffix.lower() not in paired.IMAGE_SUFFIXES:
                continue
            kept = [p for _, p in sorted(frames.get(tuple(map(int, match.groups())), []))]
            kept = kept[::self.builder_config.frame_stride]
            pairs.append(paired.Pair(
                key=path.relative_to(manual_dir).as_posix(), blurry=path,
                sharp=kept[len(kept) // 2] if kept else None, extra={"frames": kept}))
        return {"test": pairs}

    def _extra_example(self, pair: paired.Pair):
        frames = [paired.read_image_uint8(path, self.CHANNELS) for path in pair.extra["frames"]]
        shapes = {frame.shape for frame in frames}
        if len(shapes) != 1:
            raise paired.DatasetLayoutError(
                f"ground-truth frames of {pair.blurry} differ in size: {sorted(shapes)}")
        return {"sharp_frames": np.stack(frames)}
