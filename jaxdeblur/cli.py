"""The ``jaxdeblur`` command: deblur photos, draw their blur kernels, convert official
weights, evaluate on a benchmark.

Subcommands (``jaxdeblur <subcommand> --help`` shows a worked example for each):

* ``deblur``: UFPNet (a trained or converted checkpoint) or Deep EM (MCEM, no training)
  on files, folders or globs; large images are processed in overlapping tiles (UFPNet) or
  cells (MCEM) and blended (`jaxdeblur.tiling`).
* ``kernels``: estimate the blur-kernel field of a photo (UFPNet's KE-Net + flow, or MCEM's
  per-cell kernels) and draw it over the photo.
* ``convert``: an official UFPNet PyTorch checkpoint -> an orbax checkpoint directory.
* ``evaluate``: a TFDS split or a folder of (blurry, sharp) pairs -> a PSNR/SSIM table
  (SPEC section 5: uint8 RGB, whole image).

Colour handling (`jaxdeblur.color`): gray in -> gray out, alpha carried through unchanged,
16-bit in -> 16-bit out, EXIF orientation applied on reading (`jaxdeblur.io`), and with
``--linear`` kernels are estimated and the image deblurred in linear light.

Exit status: 0 on success, 1 for a reported error (unreadable file, empty folder, wrong
checkpoint, output that cannot be written, existing outputs without ``--overwrite``),
2 for a command-line usage error. Nothing is written before every input has been checked,
and no existing file is replaced without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import pathlib
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

import jax
import numpy as np
import tensorflow_datasets as tfds
from tqdm.auto import tqdm

from jaxdeblur import __version__, color, configs, convert, io, metrics, photo, viz
from jaxdeblur.io import IMAGE_EXTENSIONS as IMAGE_SUFFIXES
from jaxdeblur.train import checkpoint as checkpoint_lib
from jaxdeblur.train import mcem as mcem_runs
from jaxdeblur.train import ufpnet as ufpnet_runs

PROG = "jaxdeblur"


class CLIError(Exception):
    """An error reported to the user as one clear message, with exit status 1."""


# ------------------------------------------------------------------------------------------
# Inputs and outputs.
# ------------------------------------------------------------------------------------------


def _is_image_name(path: pathlib.Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def collect_inputs(patterns: Sequence[str]) -> list[pathlib.Path]:
    """Expands files, folders (their images, not recursive) and globs, in order, deduplicated.

    Raises:
      CLIError: a path that does not exist, a folder without images, a glob without matches.
    """
    found: list[pathlib.Path] = []
    for pattern in patterns:
        path = pathlib.Path(pattern)
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if p.is_file() and _is_image_name(p))
            if not images:
                raise CLIError(f"folder {path} contains no images (looked for "
                               f"{', '.join(IMAGE_SUFFIXES)})")
            found.extend(images)
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(pattern):
            matches = sorted(pathlib.Path(p) for p in glob.glob(pattern, recursive=True))
            images = [p for p in matches if p.is_file() and _is_image_name(p)]
            if not images:
                raise CLIError(f"pattern {pattern!r} matches no images")
            found.extend(images)
        else:
            raise CLIError(f"no such file or folder: {pattern}")
    unique, seen = [], set()
    for path in found:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def prepare_output_dir(directory: str | os.PathLike) -> pathlib.Path:
    """Creates the output folder and checks that a file can be written in it.

    Raises:
      CLIError: when it is a file, cannot be created, or is not writable.
    """
    directory = pathlib.Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CLIError(f"output {directory} exists and is not a folder")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # A real write: os.access says yes to root even on read-only mounts.
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".jaxdeblur-write-test"):
            pass
    except OSError as err:
        raise CLIError(f"cannot write to the output folder {directory}: "
                       f"{err.strerror or err}") from err
    return directory


def plan_outputs(inputs: Sequence[pathlib.Path], directory: pathlib.Path,
                 suffixes: Sequence[str], *, overwrite: bool) -> list[dict[str, pathlib.Path]]:
    """Output paths per input: ``suffixes`` maps a role to a name ending, "" for the image.

    The restored image keeps the input's name and extension; other roles are
    ``<stem><ending>``.

    Raises:
      CLIError: two inputs with the same name, or existing outputs without ``overwrite``.
    """
    plans, owners = [], {}
    for path in inputs:
        plan = {}
        for role, ending in suffixes.items():
            name = path.name if ending == "" else path.stem + ending
            target = directory / name
            if target in owners:
                raise CLIError(f"{owners[target]} and {path} would both write {target}; "
                               "process them into different --output folders")
            owners[target] = path
            plan[role] = target
        plans.append(plan)
    existing = [str(p) for plan in plans for p in plan.values() if p.exists()]
    if existing and not overwrite:
        shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more"
                                           if len(existing) > 5 else "")
        raise CLIError(f"{len(existing)} output file(s) already exist ({shown}); pass "
                       "--overwrite to replace them")
    return plans


def check_readable(inputs: Sequence[pathlib.Path]) -> None:
    """Reads every input's header before anything is written.

    Raises:
      CLIError: listing every file that cannot be read as an image.
    """
    bad = []
    for path in inputs:
        try:
            io.read_image_info(path)
        except (io.ImageReadError, OSError, ValueError) as err:
            bad.append(f"{path}: {err}")
    if bad:
        raise CLIError("cannot read " + ("these images" if len(bad) > 1 else "this image")
                       + ":\n  " + "\n  ".join(bad))


def read_photo(path: pathlib.Path):
    """Reads a photo with its alpha channel last, upright (EXIF orientation applied).

    Returns:
      ``(image, info)``: ``image`` ``(H, W, C)`` float32 in [0, 1] with C = 1 (gray),
      2 (gray + alpha), 3 (RGB) or 4 (RGBA); ``info`` the file's `jaxdeblur.io.ImageInfo`.

    Raises:
      CLIError: the file cannot be read as an image.
    """
    try:
        image, alpha = io.read_image(path, return_alpha=True)
        info = io.read_image_info(path)
    except (io.ImageReadError, OSError, ValueError) as err:
        raise CLIError(f"cannot read {path}: {err}") from err
    if alpha is not None:
        image = np.concatenate([image, np.asarray(alpha, np.float32)[..., None]], axis=-1)
    return image, info


def output_bit_depth(path: pathlib.Path, info) -> int:
    """16 for 16-bit (and 32-bit float) inputs written as PNG/TIFF, else 8."""
    if info.bit_depth >= 16 and path.suffix.lower() in (".png", ".tif", ".tiff"):
        return 16
    return 8


def write_photo(path: pathlib.Path, image: np.ndarray, info) -> None:
    """Writes ``image`` (alpha last) with the input's bit depth where the format allows."""
    try:
        io.write_image(path, image, bit_depth=output_bit_depth(path, info))
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot write {path}: {err}") from err


# ------------------------------------------------------------------------------------------
# Methods.
# ------------------------------------------------------------------------------------------


def load_mcem_config(path: str | None, overrides: Sequence[str]):
    """An MCEM config: the shipped ``jaxdeblur/configs/mcem.py`` or a ``get_config()`` /
    JSON file, with ``KEY=VALUE`` overrides (`jaxdeblur.configs.load`).
    """
    try:
        return configs.load("mcem" if path is None else pathlib.Path(path), overrides)
    except ValueError as err:
        raise CLIError(str(err)) from err


def make_runner(args):
    """The method runner for ``args.method``; CLIError for missing or wrong checkpoints."""
    if args.method == "ufpnet":
        if not args.checkpoint:
            raise CLIError("--method ufpnet needs --checkpoint PATH (an official .pth/.npz or "
                           "a directory from 'jaxdeblur convert' or from training)")
        if args.set:
            raise CLIError("--set overrides apply to --method mcem only")
        train_size = None if args.train_size == 0 else (args.train_size, args.train_size)
        try:
            loaded = ufpnet_runs.load_checkpoint(args.checkpoint, train_size=train_size)
        except (checkpoint_lib.CheckpointError, ImportError) as err:
            raise CLIError(str(err)) from err
        print(f"{PROG}: UFPNet from {loaded.description}", file=sys.stderr)
        return ufpnet_runs.TiledUFPNet(loaded.module, loaded.variables,
                                       tile=args.tile or 512, overlap=args.overlap,
                                       batch_size=args.batch_size)
    if args.checkpoint:
        raise CLIError(f"--method {args.method} needs no checkpoint (it fits each photo on "
                       "its own); pass --config/--set to change it")
    if args.method == "mcem-paper":
        config = load_mcem_config(args.config, args.set)
        return mcem_runs.TiledMCEM(config, tile=args.tile, overlap=args.overlap)
    try:
        config = configs.load("photo" if args.config is None else pathlib.Path(args.config),
                              args.set)
        settings = photo.settings_from_config(config)
    except ValueError as err:
        raise CLIError(str(err)) from err
    mcem_config = configs.load("mcem") if settings.restorer == "dip" else None
    return photo.PhotoDeblurrer(settings, mcem_config=mcem_config,
                                progress=lambda line: print(f"{PROG}: {line}",
                                                            file=sys.stderr, flush=True),
                                stop_requested=_STOP.requested)


# ------------------------------------------------------------------------------------------
# Subcommands.
# ------------------------------------------------------------------------------------------


def _progress(items, desc: str):
    return tqdm(items, desc=desc, unit="image", file=sys.stderr,
                disable=len(items) <= 1 and not sys.stderr.isatty())


def _run_photo(runner, image: np.ndarray, *, linear: bool, key, **options):
    """Deblurs one photo in the network layout and maps the result back to its layout
    (``options`` go to the runner's ``deblur``)."""
    rgb, layout = color.to_network_rgb(image, linear=linear)
    network_input = rgb[..., :1] if isinstance(
        runner, (mcem_runs.TiledMCEM, photo.PhotoDeblurrer)) and layout.n_color == 1 else rgb
    result = _reported(runner.deblur, network_input, key=key, **options)
    restored = np.asarray(result["image"], np.float32)
    if restored.shape[-1] == 1:
        restored = np.repeat(restored, 3, axis=-1)
    result["photo"] = color.from_network_rgb(restored, layout)
    result["input_rgb"] = rgb
    return result


def _reported(run, *args, **kwargs):
    """``run(*args, **kwargs)``, a ValueError (a config that does not fit the photo)
    reported as a CLIError (or, once a stop was asked for, as the interruption it is)."""
    try:
        return run(*args, **kwargs)
    except ValueError as err:
        if _STOP.requested():
            raise KeyboardInterrupt from err
        raise CLIError(str(err)) from err


# Resumable runs (--method mcem): per photo, the kernel estimate's state after every
# alternation, and a marker once the photo's outputs are written.
STATE_DIR = ".jaxdeblur-state"


def _state_paths(output: pathlib.Path, path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    folder = output / STATE_DIR
    return folder / f"{path.name}.npz", folder / f"{path.name}.done"


def _finished_earlier(output: pathlib.Path, path: pathlib.Path, plan: dict) -> bool:
    """Whether an earlier (interrupted) run of the command already wrote this photo."""
    done = _state_paths(output, path)[1]
    return done.exists() and all(p.exists() for p in plan.values())


def cmd_deblur(args) -> int:
    inputs = collect_inputs(args.inputs)
    resumable = args.method == "mcem"
    roles = {"image": ""}
    if args.figures:
        roles.update({"compare": "_compare.png", "kernels": "_kernels.png",
                      "kernel_array": "_kernels.npz"})
        if args.method == "mcem-paper":
            roles.update({"uncertainty": "_uncertainty.png", "metrics": "_metrics.jsonl",
                          "curves": "_curves.png"})
    output = prepare_output_dir(args.output)
    skipped = set()
    if resumable and not args.overwrite:
        probe = plan_outputs(inputs, output, roles, overwrite=True)
        skipped = {i for i, (path, plan) in enumerate(zip(inputs, probe))
                   if _finished_earlier(output, path, plan)}
    plans = plan_outputs([p for i, p in enumerate(inputs) if i not in skipped], output, roles,
                         overwrite=args.overwrite)
    for i in sorted(skipped):
        print(f"{PROG}: {inputs[i]} was finished by an earlier run; skipped", file=sys.stderr)
    inputs = [p for i, p in enumerate(inputs) if i not in skipped]
    check_readable(inputs)
    runner = make_runner(args)
    root = jax.random.key(args.seed)
    for index, (path, plan) in enumerate(zip(inputs, _progress(plans, "deblur"))):
        image, info = read_photo(path)
        key = jax.random.fold_in(root, index)
        start = time.perf_counter()
        state_file, done_file = _state_paths(output, path)
        if resumable:
            state_file.parent.mkdir(exist_ok=True)
            done_file.unlink(missing_ok=True)
            # The white-noise estimate does not see JPEG's errors: a higher prior floor.
            lossy = ({"lossy": info.format in io.LOSSY_FORMATS}
                     if isinstance(runner, photo.PhotoDeblurrer) else {})
            try:
                with _STOP.deferred():
                    result = _run_photo(runner, image, linear=args.linear, key=key,
                                        state_file=state_file, **lossy)
            except KeyboardInterrupt:
                if state_file.exists():
                    print(f"{PROG}: interrupted; {path}'s progress is saved in {state_file}: "
                          "run the same command again to go on from there", file=sys.stderr)
                raise
        else:
            result = _run_photo(runner, image, linear=args.linear, key=key)
        write_photo(plan["image"], result["photo"], info)
        if args.figures:
            viz.comparison_figure([image, result["photo"]], ["input", f"{args.method}"],
                                  plan["compare"])
            kernels, centres = (result["kernels"], result["centres"]) if "kernels" in result \
                else _reported(runner.kernels, result["input_rgb"], tuple(args.grid), key=key)
            np.savez_compressed(plan["kernel_array"], kernels=np.asarray(kernels, np.float32),
                                centres=np.asarray(centres, np.float32))
            viz.kernel_field_figure(image, kernels, centres, plan["kernels"],
                                    title=f"{args.method} kernels")
            if "uncertainty" in plan:
                viz.uncertainty_figure(result["photo"], result["uncertainty"],
                                       plan["uncertainty"], title="posterior std")
            if "metrics" in plan:
                plan["metrics"].write_text("".join(json.dumps(row) + "\n"
                                                   for row in result["metrics"]))
                if result["metrics"]:
                    viz.training_curves_figure(plan["metrics"], plan["curves"],
                                               log_scale={k for row in result["metrics"]
                                                          for k in row if k != "step"})
        if resumable:
            done_file.write_text(f"{path}\n")
            state_file.unlink(missing_ok=True)
        print(f"{path} -> {plan['image']} ({time.perf_counter() - start:.1f} s)",
              file=sys.stderr)
        if _STOP.requested():
            raise KeyboardInterrupt
    return 0


def cmd_kernels(args) -> int:
    inputs = collect_inputs(args.inputs)
    output = prepare_output_dir(args.output)
    plans = plan_outputs(inputs, output, {"figure": "_kernels.png", "array": "_kernels.npz"},
                         overwrite=args.overwrite)
    check_readable(inputs)
    runner = make_runner(args)
    root = jax.random.key(args.seed)
    for index, (path, plan) in enumerate(zip(inputs, _progress(plans, "kernels"))):
        image, _ = read_photo(path)
        rgb, layout = color.to_network_rgb(image, linear=args.linear)
        if isinstance(runner, (mcem_runs.TiledMCEM, photo.PhotoDeblurrer)) and \
                layout.n_color == 1:
            rgb = rgb[..., :1]
        kernels, centres = _reported(runner.kernels, rgb, tuple(args.grid),
                                     key=jax.random.fold_in(root, index))
        np.savez_compressed(plan["array"], kernels=np.asarray(kernels, np.float32),
                            centres=np.asarray(centres, np.float32))
        viz.kernel_field_figure(image, kernels, centres, plan["figure"],
                                title=f"{args.method} kernels of {path.name}")
        print(f"{path} -> {plan['figure']}, {plan['array']}", file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    source = pathlib.Path(args.source)
    if not source.is_file():
        raise CLIError(f"no checkpoint file at {source}")
    target = pathlib.Path(args.output)
    occupied = any(target.iterdir()) if target.is_dir() else target.exists()
    if occupied and not args.overwrite:
        raise CLIError(f"{target} already exists; pass --overwrite to replace it")
    try:
        state_dict = convert.load_state_dict(source)
        fields = convert.ufpnet_config_from_state_dict(state_dict)
        variables = convert.ufpnet_variables_from_state_dict(state_dict)
    except ImportError as err:
        raise CLIError(str(err)) from err
    except ValueError as err:
        raise CLIError(f"{source} is not an official UFPNet checkpoint: {err}") from err
    if target.exists() and not target.is_dir():
        raise CLIError(f"output {target} exists and is not a folder")
    prepare_output_dir(target)
    checkpoint_lib.save_converted(target, variables, {
        "method": "ufpnet", "model_config": fields, "source": str(source.resolve())})
    n_params = sum(np.size(a) for a in jax.tree.leaves(variables["params"]))
    print(f"{source} -> {target} (UFPNet {fields}, {n_params:,} parameters)", file=sys.stderr)
    return 0


def _paired_examples(blurry_dir: str, sharp_dir: str):
    blurry_dir, sharp_dir = pathlib.Path(blurry_dir), pathlib.Path(sharp_dir)
    blurry = collect_inputs([str(blurry_dir)])
    if not sharp_dir.is_dir():
        raise CLIError(f"sharp folder {sharp_dir} does not exist")
    sharp_by_stem = {p.stem: p for p in sharp_dir.iterdir() if _is_image_name(p)}
    missing = [p.name for p in blurry if p.stem not in sharp_by_stem]
    if missing:
        raise CLIError(f"{len(missing)} blurry image(s) have no sharp image of the same name "
                       f"in {sharp_dir}: {', '.join(missing[:5])}")
    check_readable(blurry + [sharp_by_stem[p.stem] for p in blurry])
    for path in blurry:
        yield path.name, lambda p=path: (read_photo(p)[0], read_photo(sharp_by_stem[p.stem])[0])


def _tfds_examples(spec: str, data_dir: str | None):
    if ":" not in spec:
        raise CLIError(f"--tfds expects NAME:SPLIT (e.g. gopro:test), got {spec!r}")
    name, split = spec.split(":", 1)
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as err:  # noqa: BLE001 - tfds raises many types for missing data
        raise CLIError(f"cannot open the TFDS split {spec} (data_dir={data_dir}): "
                       f"{type(err).__name__}: {err}. Build it first with "
                       "'python -m data_pipelines.build'") from err
    for index in range(len(source)):
        def load(index=index):
            example = source[index]
            return (np.asarray(example["blurry"], np.float32) / 255.0,
                    np.asarray(example["sharp"], np.float32) / 255.0)
        yield f"{name}/{split}/{index}", load


def cmd_evaluate(args) -> int:
    if bool(args.pairs) == bool(args.tfds):
        raise CLIError("give exactly one of --pairs BLURRY_DIR SHARP_DIR or --tfds NAME:SPLIT")
    examples = list(_paired_examples(*args.pairs) if args.pairs
                    else _tfds_examples(args.tfds, args.data_dir))
    if not examples:
        raise CLIError("the evaluation set is empty")
    if args.limit:
        examples = examples[:args.limit]
    if args.output:
        out = pathlib.Path(args.output)
        if out.exists() and not args.overwrite:
            raise CLIError(f"{out} already exists; pass --overwrite to replace it")
        prepare_output_dir(out.parent)
    runner = None if args.method == "none" else make_runner(args)
    root = jax.random.key(args.seed)
    measure = metrics.protocol_metric(args.protocol)
    rows = []
    for index, (name, load) in enumerate(_progress(examples, "evaluate")):
        blurry, sharp = load()
        if blurry.shape != sharp.shape:
            raise CLIError(f"{name}: blurry {blurry.shape} and sharp {sharp.shape} differ")
        if runner is None:
            restored = blurry
        else:
            rgb, layout = color.to_network_rgb(blurry, linear=args.linear)
            result = _reported(runner.deblur, rgb, key=jax.random.fold_in(root, index))
            restored = color.from_network_rgb(result["image"], layout)
        value_psnr, value_ssim = measure(np.clip(restored, 0.0, 1.0), sharp)
        rows.append({"name": name, "psnr": value_psnr, "ssim": value_ssim})
    has_ssim = rows[0]["ssim"] is not None
    mean = {"name": "mean", "psnr": float(np.mean([r["psnr"] for r in rows])),
            "ssim": float(np.mean([r["ssim"] for r in rows])) if has_ssim else None}
    width = max(len(r["name"]) for r in rows + [mean])
    print(f"{'image':<{width}}  {'PSNR':>7}  {'SSIM':>6}")
    for row in rows + [mean]:
        ssim_text = f"{row['ssim']:6.4f}" if has_ssim else f"{'-':>6}"
        print(f"{row['name']:<{width}}  {row['psnr']:7.2f}  {ssim_text}")
    if args.output:
        table = {"method": args.method, "protocol": metrics.PROTOCOLS[args.protocol],
                 "images": rows, "mean": mean}
        pathlib.Path(args.output).write_text(json.dumps(table, indent=2) + "\n")
    return 0


# ------------------------------------------------------------------------------------------
# Parser.
# ------------------------------------------------------------------------------------------

_DEBLUR_EXAMPLE = """\
examples:
  # Blind deblurring with no training, with figures next to the result:
  jaxdeblur deblur photo.jpg --method mcem --output out/ --figures

  # A known kernel size instead of the automatic one (every config field can be set):
  jaxdeblur deblur photo.png --method mcem --set kernel_size=31 -o out/

  # The paper's Deep EM on the whole photo (slow; MCEM config fields):
  jaxdeblur deblur photo.png --method mcem-paper --set em_iterations=100 --set 'grid=(2,2)' -o out/

  # UFPNet with converted official weights on a folder, 768-px tiles, on the GPU:
  jaxdeblur convert UFPNet-GoPro.pth weights/ufpnet-gopro
  jaxdeblur deblur photos/ 'more/*.png' --method ufpnet \\
      --checkpoint weights/ufpnet-gopro --tile 768 --device gpu -o out/

Gray photos stay gray, RGBA keeps its alpha unchanged, 16-bit PNG/TIFF stays 16-bit.
Existing outputs are never replaced without --overwrite.
"""

_KERNELS_EXAMPLE = """\
examples:
  # The KE-Net's kernels on a 4x6 grid over the photo (PNG + .npz of kernels/centres):
  jaxdeblur kernels photo.jpg --method ufpnet --checkpoint weights/ufpnet-gopro \\
      --grid 4 6 -o kernels/

  # The blind estimate's kernel, and the paper's MCEM per-cell kernels (config.grid):
  jaxdeblur kernels photo.jpg --method mcem -o kernels/
  jaxdeblur kernels photo.jpg --method mcem-paper --set 'grid=(3,4)' -o kernels/
"""

_CONVERT_EXAMPLE = """\
examples:
  # An official UFPNet checkpoint (needs torch for .pth; .npz works without) to orbax:
  jaxdeblur convert UFPNet-GoPro.pth weights/ufpnet-gopro
  jaxdeblur deblur blurry.png --method ufpnet --checkpoint weights/ufpnet-gopro -o out/
"""

_EVALUATE_EXAMPLE = """\
examples:
  # A folder of pairs (same file names in both folders), UFPNet:
  jaxdeblur evaluate --pairs data/blurry data/sharp --method ufpnet \\
      --checkpoint weights/ufpnet-gopro --output results/gopro.json

  # A TFDS split built by data_pipelines, the blurry inputs as a baseline:
  jaxdeblur evaluate --tfds gopro:test --data-dir ~/tensorflow_datasets --method none

Protocols (SPEC section 5): --protocol uint8 (GoPro/HIDE, the default), realblur
(ECC-aligned, masked), shift (Levin/Lai sub-pixel shift search, PSNR only).

  jaxdeblur evaluate --tfds realblur_j:test --protocol realblur --method ufpnet \\
      --checkpoint weights/ufpnet-realblur
"""


def _grid(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_method_arguments(parser, *, methods=("ufpnet", "mcem", "mcem-paper")) -> None:
    group = parser.add_argument_group("method")
    group.add_argument("--method", choices=methods, required=True,
                       help="ufpnet: a trained network (needs --checkpoint); mcem: blind "
                            "deblurring of each photo with no training (kernel coarse to "
                            "fine, full-resolution restoration; config jaxdeblur/configs/"
                            "photo.py); mcem-paper: the paper's Deep EM on the whole photo "
                            "(slow; config jaxdeblur/configs/mcem.py)")
    group.add_argument("--checkpoint", metavar="PATH",
                       help="UFPNet weights: official .pth/.npz, a 'jaxdeblur convert' folder "
                            "or a training work directory")
    group.add_argument("--train-size", type=int, default=256, metavar="N",
                       help="UFPNet test-time local pooling (TLC) for N x N training crops; "
                            "0 = global pooling (default: %(default)s, as the official test)")
    group.add_argument("--config", metavar="FILE",
                       help="config (.py with get_config() or .json); default "
                            "jaxdeblur/configs/photo.py (mcem) or mcem.py (mcem-paper)")
    group.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set kernel_size=31 (mcem) or "
                            "--set em_iterations=100 (mcem-paper); repeatable")
    tiles = parser.add_argument_group("large images")
    tiles.add_argument("--tile", type=int, default=0, metavar="PX",
                       help="tile (UFPNet, default 512) or MCEM cell size in pixels; MCEM "
                            "runs on the whole photo when 0 (default)")
    tiles.add_argument("--overlap", type=int, default=64, metavar="PX",
                       help="overlap of neighbouring tiles/cells (default: %(default)s)")
    tiles.add_argument("--batch-size", type=int, default=1, metavar="N",
                       help="UFPNet tiles per compiled call (default: %(default)s)")
    common = parser.add_argument_group("common")
    common.add_argument("--linear", action="store_true",
                        help="work in linear light (sRGB decoded before, encoded after)")
    common.add_argument("--device", choices=("cpu", "gpu", "tpu"),
                        help="JAX platform to run on (default: JAX's choice)")
    common.add_argument("--seed", type=int, default=0, help="PRNG seed (default: 0)")


def build_parser() -> argparse.ArgumentParser:
    """The ``jaxdeblur`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Self-supervised blind motion deblurring (UFPNet and Deep EM) in JAX.",
        epilog="run 'jaxdeblur <command> --help' for a worked example of each command")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    deblur = sub.add_parser("deblur", help="deblur photos (files, folders or globs)",
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            description="Deblur photos with UFPNet or Deep EM (MCEM).",
                            epilog=_DEBLUR_EXAMPLE)
    deblur.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    deblur.add_argument("-o", "--output", required=True, metavar="DIR",
                        help="folder for the results (created if needed)")
    deblur.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    deblur.add_argument("--figures", action="store_true",
                        help="also write <name>_compare.png, <name>_kernels.png/.npz (and "
                             "for MCEM <name>_uncertainty.png, _metrics.jsonl, _curves.png)")
    deblur.add_argument("--grid", type=_grid, nargs=2, default=(3, 4), metavar=("ROWS", "COLS"),
                        help="UFPNet kernel-figure grid (default: 3 4)")
    _add_method_arguments(deblur)
    deblur.set_defaults(run=cmd_deblur)

    kernels = sub.add_parser("kernels", help="estimate and draw the blur-kernel field",
                             formatter_class=argparse.RawDescriptionHelpFormatter,
                             description="Estimate the kernel field of blurry photos and draw "
                                         "it over them (<name>_kernels.png, .npz).",
                             epilog=_KERNELS_EXAMPLE)
    kernels.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    kernels.add_argument("-o", "--output", required=True, metavar="DIR")
    kernels.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    kernels.add_argument("--grid", type=_grid, nargs=2, default=(3, 4),
                         metavar=("ROWS", "COLS"),
                         help="UFPNet: kernels drawn on this grid (default: 3 4)")
    _add_method_arguments(kernels)
    kernels.set_defaults(run=cmd_kernels)

    convert = sub.add_parser("convert", help="official UFPNet weights -> orbax checkpoint",
                             formatter_class=argparse.RawDescriptionHelpFormatter,
                             description="Convert an official UFPNet PyTorch checkpoint to an "
                                         "orbax checkpoint folder.",
                             epilog=_CONVERT_EXAMPLE)
    convert.add_argument("source", help="official .pth/.pt (needs torch) or .npz state dict")
    convert.add_argument("output", help="folder to write")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    convert.set_defaults(run=cmd_convert, method=None, device=None)

    evaluate = sub.add_parser("evaluate", help="PSNR/SSIM on a TFDS split or paired folders",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              description="Evaluate a method on (blurry, sharp) pairs.",
                              epilog=_EVALUATE_EXAMPLE)
    source = evaluate.add_argument_group("data (one of)")
    source.add_argument("--pairs", nargs=2, metavar=("BLURRY_DIR", "SHARP_DIR"))
    source.add_argument("--tfds", metavar="NAME:SPLIT")
    source.add_argument("--data-dir", metavar="DIR", help="TFDS data directory")
    evaluate.add_argument("--limit", type=int, default=0, metavar="N",
                          help="evaluate the first N examples only")
    evaluate.add_argument("--protocol", choices=sorted(metrics.PROTOCOLS), default="uint8",
                          help="; ".join(f"{k}: {v}" for k, v in metrics.PROTOCOLS.items())
                          + " (default: %(default)s)")
    evaluate.add_argument("--output", metavar="FILE.json", help="also write the table as JSON")
    evaluate.add_argument("--overwrite", action="store_true")
    _add_method_arguments(evaluate, methods=("ufpnet", "mcem", "mcem-paper", "none"))
    evaluate.set_defaults(run=cmd_evaluate)
    return parser


def select_device(device: str | None) -> None:
    """Restricts JAX to one platform before any computation (``--device``)."""
    if device is None:
        return
    jax.config.update("jax_platforms", "cuda,rocm" if device == "gpu" else device)
    try:
        jax.devices()
    except RuntimeError as err:
        raise CLIError(f"--device {device} is not available here: {err}") from err


class _StopSignals:
    """Ctrl-C and SIGTERM: ``KeyboardInterrupt`` at once, except within `deferred`.

    A handler's exception surfaces wherever the interpreter is, and inside JAX's C++
    code (a pytree comparison, a dispatch) it arrives wrapped as some other error. So while
    a resumable run is `deferred` the first signal only sets a flag, which the run asks
    for before each iteration (`requested`) and then stops there with its state saved; a
    second signal stops at once. A run that ends before it asks again is finished and
    written, and the command stops before the next photo. Either way the flag stays set,
    so that an error that a signal caused is reported as the interruption it is.
    """

    def __init__(self):
        self._deferring = False
        self._flag = False

    def requested(self) -> bool:
        return self._flag

    def handle(self, signum, frame):
        del frame
        first, self._flag = not self._flag, True
        if self._deferring and first:
            print(f"\n{PROG}: {signal.Signals(signum).name}: stopping after this iteration "
                  "(its progress is saved); send it again to stop at once",
                  file=sys.stderr, flush=True)
            return
        raise KeyboardInterrupt

    def reset(self) -> None:
        self._deferring = self._flag = False

    @contextlib.contextmanager
    def deferred(self):
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False


_STOP = _StopSignals()


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = {}
    _STOP.reset()
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, _STOP.handle)
                    for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        select_device(args.device)
        if args.method == "none" and args.checkpoint:
            raise CLIError("--method none takes no checkpoint")
        return args.run(args)
    except CLIError as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
