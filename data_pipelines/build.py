"""Builds a data set into `data_dir` atomically: all of it, or nothing.

    python -m data_pipelines.build gopro --manual_dir ~/GOPRO_Large --data_dir ~/tfds
    python -m data_pipelines.build synthetic_blur --data_dir ~/tfds            # embedded
    python -m data_pipelines.build synthetic_blur --config tiny --data_dir /tmp/tfds
    python -m data_pipelines.build kohler --config every_10th_frame --manual_dir ... --data_dir ...

Names: gopro, hide, realblur_j, realblur_r, kohler, lai, levin, paired_folder,
synthetic_blur. Read the result with `data_pipelines.pipeline.load_split`.

tfds already writes into an `incomplete.*` folder and renames it on success, but on failure
it leaves `downloads/` and empty `<name>/` folders in `data_dir`, and it would reuse a
half-finished tree after a crash. Here the builder writes into a fresh hidden staging folder
inside `data_dir` (same file system, so the final move is a rename), and only the finished
`<name>[/<config>]/<version>` folder is moved into place; the staging folder is removed
whatever happens.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import shutil
import tempfile

import tensorflow_datasets as tfds

BUILDERS = {
    "gopro": "data_pipelines.gopro:Gopro",
    "hide": "data_pipelines.hide:Hide",
    "realblur_j": "data_pipelines.realblur:RealblurJ",
    "realblur_r": "data_pipelines.realblur:RealblurR",
    "kohler": "data_pipelines.kohler:Kohler",
    "lai": "data_pipelines.lai:Lai",
    "levin": "data_pipelines.levin:Levin",
    "paired_folder": "data_pipelines.paired_folder:PairedFolder",
    "synthetic_blur": "data_pipelines.synthetic_blur:SyntheticBlur",
}


def builder_class(name: str) -> type:
    """The builder class registered under `name` (one of `BUILDERS`)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(BUILDERS)}")
    module, attribute = BUILDERS[name].split(":")
    return getattr(importlib.import_module(module), attribute)


def build_dataset(name: str, *, data_dir, manual_dir=None, config: str | None = None,
                  overwrite: bool = False, **builder_kwargs) -> pathlib.Path:
    """Prepares data set `name` as array_record files under `data_dir`.

    Args:
      name: a key of `BUILDERS`.
      data_dir: TFDS data directory; the result lands in `data_dir/name[/config]/version`.
      manual_dir: the extracted download (required by every builder except
        `synthetic_blur`).
      config: builder config name (`kohler`: all_frames | every_10th_frame;
        `synthetic_blur`: default | tiny), or None for the default.
      overwrite: replace an existing prepared version instead of raising.
      **builder_kwargs: extra builder arguments (`synthetic_blur`: `sharp_dir`).

    Returns:
      The prepared version folder.

    Raises:
      DatasetLayoutError: (a ValueError) bad or missing manual data; nothing is written.
      FileExistsError: the version is already prepared and `overwrite` is False.
    """
    cls = builder_class(name)
    data_dir = pathlib.Path(data_dir).expanduser().resolve()
    created = not data_dir.exists()
    data_dir.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.incomplete-", dir=data_dir))
    try:
        builder = cls(data_dir=os.fspath(staging), config=config, file_format="array_record",
                      **builder_kwargs)
        relative = pathlib.Path(os.fspath(builder.data_dir)).relative_to(staging)
        final = data_dir / relative
        if final.exists() and not overwrite:
            raise FileExistsError(f"{final} is already prepared; pass overwrite=True "
                                  "(--overwrite) to rebuild it")
        if hasattr(builder, "check_manual_dir"):
            builder.check_manual_dir(manual_dir)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=None if manual_dir is None else os.fspath(manual_dir)))
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging / relative, final)
        default_config = staging / name / ".config"
        if default_config.is_dir():
            shutil.copytree(default_config, data_dir / name / ".config", dirs_exist_ok=True)
    except BaseException:
        if created:
            shutil.rmtree(data_dir, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(BUILDERS))
    parser.add_argument("--data_dir", required=True, help="TFDS data directory to write into")
    parser.add_argument("--manual_dir", help="the extracted download (see the builder docs)")
    parser.add_argument("--config", help="builder config name")
    parser.add_argument("--sharp_dir", help="synthetic_blur: extra folder of sharp images")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    kwargs = {"sharp_dir": args.sharp_dir} if args.sharp_dir else {}
    path = build_dataset(args.name, data_dir=args.data_dir, manual_dir=args.manual_dir,
                         config=args.config, overwrite=args.overwrite, **kwargs)
    print(f"prepared {path}")


if __name__ == "__main__":
    main()
