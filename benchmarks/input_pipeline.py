"""Input-pipeline throughput: batches/s and images/s at 256² crops, batch 8.

    python benchmarks/input_pipeline.py                      # GoPro-sized fake pairs
    python benchmarks/input_pipeline.py --workers 0 2 --batches 30
    python benchmarks/input_pipeline.py --data_dir ~/tfds --name gopro --split train

By default it writes `--pairs` GoPro-sized (1280x720) blurry/sharp PNG pairs made from
scikit-image photographs into a temporary folder, builds them with the `paired_folder`
builder (array_record, zlib-compressed uint8), and times `make_pipeline` (record decode,
paired random crop/flip/rotation, float conversion, batching) with 0 and 2 worker
processes. The reference row feeds the same pipeline from the PNG files through PIL, as
the official PyTorch code reads its training pairs (one PNG decode per image per step).
The first batch (worker start-up) is excluded from the timing.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

import numpy as np
from PIL import Image

from data_pipelines import build, paired, pipeline, synthetic_blur


class PngPairs:
    """Random-access (blurry, sharp) records decoded from PNG files on every access."""

    def __init__(self, root: pathlib.Path):
        self.blurry = paired.list_image_files(root / "blurry")
        self.sharp_dir = root / "sharp"

    def __len__(self):
        return len(self.blurry)

    def __getitem__(self, index):
        path = self.blurry[index]
        return {"blurry": np.asarray(Image.open(path).convert("RGB")),
                "sharp": np.asarray(Image.open(self.sharp_dir / path.name).convert("RGB")),
                "name": path.name.encode()}


def write_gopro_like_pairs(root: pathlib.Path, count: int) -> None:
    """`count` 1280x720 pairs: a photograph (sharp) and a box-blurred copy (blurry)."""
    rng = np.random.default_rng(0)
    sources = synthetic_blur.BUNDLED_SOURCES
    for folder in ("blurry", "sharp"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.fromarray(synthetic_blur.load_bundled_image(sources[i % len(sources)]))
        sharp = np.asarray(image.resize((1280, 720), Image.Resampling.BICUBIC))
        shift = int(rng.integers(3, 9))
        blurry = np.mean([np.roll(sharp, s, axis=1) for s in range(shift)], axis=0)
        Image.fromarray(sharp).save(root / "sharp" / f"{i:04d}.png")
        Image.fromarray(blurry.astype(np.uint8)).save(root / "blurry" / f"{i:04d}.png")


def _megabytes(folder: pathlib.Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def measure(source, *, batch_size: int, crop_size: int, workers: int,
            batches: int) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) per batch, after the first batch.

    The CPU time excludes worker processes; with 0 workers it is the whole cost of a batch
    and, unlike the wall time, does not depend on how loaded the machine is.
    """
    iterator = pipeline.make_pipeline(source, batch_size=batch_size, crop_size=crop_size,
                                      seed=0, num_workers=workers, shard_index=0,
                                      shard_count=1)
    next(iterator)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(batches):
        batch = next(iterator)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    assert batch["blurry"].shape == (batch_size, crop_size, crop_size, 3)
    if hasattr(iterator, "close"):
        iterator.close()
    return elapsed / batches, cpu / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--crop_size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--data_dir", help="use an already prepared data set instead")
    parser.add_argument("--name", default="gopro")
    parser.add_argument("--split", default="train")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.data_dir:
            source, label = pipeline.load_split(args.name, args.split, args.data_dir), args.name
            png = None
        else:
            root = pathlib.Path(tmp) / "pairs"
            write_gopro_like_pairs(root, args.pairs)
            build.build_dataset("paired_folder", data_dir=pathlib.Path(tmp) / "tfds",
                                manual_dir=root)
            source = pipeline.load_split("paired_folder", "train", pathlib.Path(tmp) / "tfds")
            label, png = f"{args.pairs} GoPro-sized pairs", PngPairs(root)
            sizes = {"PNG files": _megabytes(root),
                     "array_record (zlib uint8)": _megabytes(pathlib.Path(tmp) / "tfds")}
            print("on disk: " + ", ".join(f"{k} {v:.1f} MB" for k, v in sizes.items()))
        for workers in args.workers:
            seconds = measure(source, batch_size=args.batch_size, crop_size=args.crop_size,
                              workers=workers, batches=args.batches)
            rows.append((f"array_record ({label})", workers, *seconds))
        if png is not None:
            seconds = measure(png, batch_size=args.batch_size, crop_size=args.crop_size,
                              workers=0, batches=args.batches)
            rows.append(("reference: PNG + PIL per step", 0, *seconds))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nbatch {args.batch_size}, crop {args.crop_size}², {args.batches} timed batches, "
          f"{os.cpu_count()} CPUs, load average {load:.1f}")
    print(f"{'source':<40} {'workers':>7} {'batches/s':>10} {'images/s':>9} {'ms/batch':>9} "
          f"{'main-process CPU ms/batch':>26}")
    for name, workers, seconds, cpu in rows:
        print(f"{name:<40} {workers:>7} {1 / seconds:>10.2f} {args.batch_size / seconds:>9.1f} "
              f"{1000 * seconds:>9.1f} {1000 * cpu:>26.1f}")


if __name__ == "__main__":
    main()
