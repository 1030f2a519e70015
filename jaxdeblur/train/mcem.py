"""Deep EM (MCEM) runs on files and photos: checkpointed batches, and photos by cells.

`deblur_files` is ``train_scripts/mcem.py``: it deblurs image files (same-size images
together as one batch, sharded over the devices when the batch divides evenly) or, without
inputs, a synthetic example, and writes into ``workdir``: ``<name>_restored.png``,
``<name>_kernels.png`` (the per-cell kernels on the grid used, each scaled to its maximum),
``<name>_uncertainty.png`` (the posterior std, scaled to the largest std, which
``summary.json`` records), ``summary.json`` and ``metrics_<group>.jsonl``. Checkpoints go
to ``<workdir>/<group>/checkpoints`` every ``config.checkpoint_every`` EM iterations;
running again resumes. A NaN or infinite data fit stops the run with `mcem.DataFitError`;
the last good checkpoint is kept. Several processes (a multi-host run, `jaxdeblur.launch`)
split each batch between them and write one set of results (`deblur_group`).
With ``config.refine_iterations = N`` the cold refinement
phase follows the EM iterations; the progress bar and checkpoints count across both
phases, so a finished run re-run with a larger N continues its refinement. With
``config.levels`` the coarse levels run first, each with its own progress bar, and are not
checkpointed (a run stopped there starts them again; they cost a fraction of the
full-size iterations).

`TiledMCEM` is the ``jaxdeblur`` command's MCEM: one photo, whole or by overlapping cells,
with each cell's kernels placed at their centres in photo coordinates (`kernel_centres`).
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import skimage.data
import skimage.transform

from jax.experimental import multihost_utils

from jaxdeblur import io, kernels, mcem, metrics, tiling
from jaxdeblur.train import logging as logging_lib
from jaxdeblur.train import loop as loop_lib
from jaxdeblur.train import mesh as mesh_lib

#: Config fields that decide the shapes of an MCEM state (a checkpoint's fingerprint); a
#: resumed run may change iteration counts, step sizes or logging.
SHAPE_FIELDS = ("kernel_size", "grid", "image_net", "kernel_net", "sampler")


def kernel_grid_image(cell_kernels: np.ndarray, grid: tuple, zoom: int = 4) -> np.ndarray:
    """(G, k, k) kernels tiled row-major on the (gh, gw) grid, each scaled to its max."""
    gh, gw = grid
    k = cell_kernels.shape[-1]
    cell = k * zoom + 2
    canvas = np.ones((gh * cell, gw * cell), np.float32)
    for g, kernel in enumerate(cell_kernels):
        y, x = divmod(g, gw)
        tile = np.kron(kernel / max(float(kernel.max()), 1e-12), np.ones((zoom, zoom)))
        canvas[y * cell + 1:y * cell + 1 + k * zoom, x * cell + 1:x * cell + 1 + k * zoom] = tile
    return canvas


def kernel_centres(image_shape: tuple, config) -> np.ndarray:
    """Where MCEM's per-cell kernels sit in an image of ``image_shape``: (G, 2) (y, x).

    The filter-flow windows are centred on a canvas that pads the latent image, which is
    the observed image grown by ``(k - 1) / 2`` pixels on each side; centres outside the
    image are clipped to its border. Row-major over the grid, as `mcem.MCEMResult.kernels`.
    """
    model = mcem.build_model(image_shape, config)
    geometry = model.geometry
    shift_y = geometry.pad[0] + (model.latent_shape[0] - image_shape[0]) // 2
    shift_x = geometry.pad[2] + (model.latent_shape[1] - image_shape[1]) // 2
    ys = np.clip(np.asarray(geometry.y_patch_centers) - shift_y, 0, image_shape[0] - 1)
    xs = np.clip(np.asarray(geometry.x_patch_centers) - shift_x, 0, image_shape[1] - 1)
    return np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2).astype(np.float32)


def synthetic_example(config) -> tuple[dict, dict]:
    """``({name: blurry}, {name: sharp})``: skimage's camera at ``config.synthetic.size``,
    blurred by a rotating-camera `kernels.kernel_field` with noise."""
    syn = config.synthetic
    sharp = skimage.transform.resize(skimage.data.camera(), (syn.size, syn.size),
                                     anti_aliasing=True).astype(np.float32)[..., None]
    key_field, key_noise = jax.random.split(jax.random.key(syn.seed))
    field = kernels.kernel_field(key_field, sharp.shape, syn.kernel_size,
                                 max_angle_deg=syn.max_angle_deg)
    blurry = kernels.synthesize_blur(key_noise, jnp.asarray(sharp), field,
                                     noise_sigma=syn.noise_sigma)
    return {"synthetic_camera": np.asarray(blurry)}, {"synthetic_camera": sharp}


def read_inputs(paths: Sequence[str | pathlib.Path]) -> dict[str, np.ndarray]:
    """``{name: image}`` of image files and folders; a repeated stem gets ``_`` appended.

    Raises:
      FileNotFoundError: a path that does not exist, or no image found.
    """
    images = {}
    for path in paths:
        for file in io.list_images(path):
            name = file.stem
            while name in images:
                name += "_"
            images[name] = io.read_image(file)
    if not images:
        raise FileNotFoundError(f"no images found in {list(map(str, paths))}")
    return images


def _process_rows_sharding(total: int) -> jax.sharding.NamedSharding:
    """A batch of ``total`` rows split evenly over the processes, one device each.

    MCEM states of different images never meet, so each process runs its own rows on its
    own devices; this sharding only turns those rows into one global array, which every
    process then saves together as one checkpoint (and restores from it).
    """
    count = jax.process_count()
    if total % count:
        raise ValueError(f"{total} rows cannot be split evenly over {count} processes")
    devices = [min((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
               for p in range(count)]
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def _gather_rows(local: np.ndarray) -> np.ndarray:
    """Every process's rows of a batch array, in process order (a collective)."""
    if jax.process_count() == 1:
        return np.asarray(local)
    return np.asarray(multihost_utils.process_allgather(np.asarray(local), tiled=True))


def deblur_group(batch: np.ndarray, config, workdir: str | pathlib.Path, key: jax.Array, *,
                 shard: bool = True) -> mcem.MCEMResult:
    """MCEM on a batch of same-size images (B, H, W, C), checkpointed under
    ``workdir/<H>x<W>x<C>``; resumes from the newest checkpoint there.

    Several processes (`jaxdeblur.train.mesh.initialize_distributed`): every process calls
    it with the whole batch and deblurs its own contiguous share of the images (image b
    keeps key b, so the results are those of one process) on its own devices; the
    batch is padded with copies of its last image to a multiple of the process count.
    The checkpoints hold the whole batch's state as one orbax checkpoint that all
    processes save together, data fits and results are gathered, and process 0 writes the
    metric log.

    Args:
      batch: the blurry images.
      config: an MCEM config (`jaxdeblur.configs`, ``mcem``).
      workdir: the run directory.
      key: the group's key (split once per image).
      shard: split the batch (this process's share) over this process's devices when it
        divides evenly.

    Returns:
      The `mcem.MCEMResult` of the whole batch, on every process.

    Raises:
      mcem.DataFitError: the data fit became NaN or infinite; the message names the last
        good checkpoint.
    """
    workdir = pathlib.Path(workdir)
    group = "x".join(str(n) for n in batch.shape[1:])
    model = mcem.build_model(batch.shape[1:], config)
    size, count, index = len(batch), jax.process_count(), jax.process_index()
    keys = jax.random.split(key, size)
    padded = -(-size // count) * count
    if padded > size:
        batch = np.concatenate([batch, np.repeat(batch[-1:], padded - size, axis=0)])
        keys = jnp.concatenate([keys, jnp.repeat(keys[-1:], padded - size, axis=0)])
    share = padded // count
    mine = slice(index * share, (index + 1) * share)
    batch, keys = batch[mine], keys[mine]
    target = jax.tree.map(lambda *xs: jnp.stack(xs),
                          *[mcem.init_state(model, key=k) for k in keys])
    shapes = {k: config[k].to_dict() if hasattr(config[k], "to_dict") else config[k]
              for k in SHAPE_FIELDS}
    if padded > size:
        shapes["padded_batch"] = padded
    if count == 1:
        to_saved = jax.device_get
    else:
        rows = _process_rows_sharding(padded)

        def to_saved(local):
            return jax.tree.map(
                lambda x: jax.make_array_from_process_local_data(rows, np.asarray(x)),
                jax.device_get(local))

    state, start, ckpt, writer = loop_lib.resume(
        target if count == 1 else to_saved(target), workdir / group, model_config=shapes,
        max_to_keep=2,
        metrics_path=workdir / f"metrics_{group}.jsonl")
    if count > 1:
        state = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state)
    if start:
        print(f"[{group}] resuming from EM iteration {start}")
    mesh = None
    local = jax.local_devices()
    if shard and len(local) > 1 and share % len(local) == 0:
        mesh = jax.sharding.Mesh(np.asarray(local), ("data",),
                                 axis_types=(jax.sharding.AxisType.Auto,))
    total = mcem.total_iterations(config)
    bar = logging_lib.progress(total=total, initial=start, desc=f"MCEM {group}",
                               disable=not mesh_lib.is_primary())
    history = []

    def callback(it, st, fit):
        fit = _gather_rows(fit)[:size]
        history.append((it, fit.tolist()))
        bar.update(it - bar.n)
        bar.set_postfix_str(f"data_fit={float(np.mean(fit)):.3e}")
        writer.write(it, {"data_fit": fit})
        if it % config.checkpoint_every == 0 or it == total:
            ckpt.save(it, to_saved(st))  # host copy first: the next step donates st

    level_bars = {}

    def level_callback(level, levels, it, iterations):
        # Coarse levels (config.levels) run before the checkpointed full-size iterations.
        if level not in level_bars:
            level_bars[level] = logging_lib.progress(
                total=iterations, desc=f"MCEM {group} level {level + 1}/{levels + 1} "
                f"(scale {config.levels[level][0]})", disable=not mesh_lib.is_primary())
        level_bars[level].update(it - level_bars[level].n)
        if it == iterations:
            level_bars[level].close()

    try:
        result = mcem.deblur(batch, config, key=keys, mesh=mesh, state=state,
                             callback=callback, level_callback=level_callback)
    except mcem.DataFitError as err:
        ckpt.close()
        raise mcem.DataFitError(
            f"[{group}] stopped: {err}\nThe last good checkpoint is EM iteration "
            f"{ckpt.latest_step} under {workdir / group / 'checkpoints'}.") from err
    finally:
        bar.close()
        writer.close()
        ckpt.close()
    return result._replace(
        image=_gather_rows(result.image)[:size], kernels=_gather_rows(result.kernels)[:size],
        uncertainty=_gather_rows(result.uncertainty)[:size],
        data_fit=_gather_rows(result.data_fit)[:size], history=history)


def deblur_files(config, workdir: str | pathlib.Path,
                 inputs: Sequence[str | pathlib.Path] = (), *, shard: bool = True) -> dict:
    """Deblurs image files and folders (or, without ``inputs``, `synthetic_example`).

    Same-size images form one batch (`deblur_group`). Writes the images, ``summary.json``
    and metric logs described in the module docstring into ``workdir``. With several
    processes, every process reads the inputs and deblurs its share of each batch; the
    results are gathered and process 0 writes the files.

    Args:
      config: an MCEM config (`jaxdeblur.configs`, ``mcem``).
      workdir: the output and checkpoint folder (created).
      inputs: image files and folders; none for the synthetic example, whose summary
        entries add PSNR before and after.
      shard: split each batch over every device when it divides evenly.

    Returns:
      The summary written to ``summary.json``.
    """
    workdir = pathlib.Path(workdir)
    primary = mesh_lib.is_primary()
    workdir.mkdir(parents=True, exist_ok=True)
    if inputs:
        images, sharp = read_inputs(inputs), {}
    else:
        images, sharp = synthetic_example(config)
    groups: dict[tuple, list[str]] = {}
    for name, image in images.items():
        groups.setdefault(image.shape, []).append(name)
    key = jax.random.key(config.seed)
    summary = {"config": config.to_dict(), "images": {}}
    for shape, names in groups.items():
        key, group_key = jax.random.split(key)
        batch = np.stack([images[n] for n in names])
        t0 = time.time()
        result = deblur_group(batch, config, workdir, group_key, shard=shard)
        seconds = time.time() - t0
        for i, name in enumerate(names):
            restored, std = result.image[i], result.uncertainty[i]
            std_max = float(std.max())
            if primary:
                io.write_image(workdir / f"{name}_restored.png", restored)
                io.write_image(workdir / f"{name}_kernels.png",
                               kernel_grid_image(result.kernels[i], result.grid))
                io.write_image(workdir / f"{name}_uncertainty.png",
                               std.mean(-1) / max(std_max, 1e-12))
            entry = {"shape": list(shape), "grid": list(result.grid),
                     "data_fit": float(result.data_fit[i]), "uncertainty_max": std_max,
                     "uncertainty_mean": float(std.mean()), "seconds_for_batch": seconds,
                     "batch_size": len(names)}
            if name in sharp:
                entry["psnr_blurry"] = float(metrics.psnr(images[name], sharp[name]))
                entry["psnr_restored"] = float(metrics.psnr(restored, sharp[name]))
                if primary:
                    print(f"{name}: PSNR blurry {entry['psnr_blurry']:.2f} dB -> restored "
                          f"{entry['psnr_restored']:.2f} dB ({seconds:.0f} s)")
            summary["images"][name] = entry
    if primary:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(f"wrote {workdir / 'summary.json'}")
    return summary


class TiledMCEM:
    """Deep EM on a whole photo, or by overlapping cells for a large one.

    By cells: the photo is split into equal overlapping regions (`jaxdeblur.tiling` with
    ``compile_fn=False``); MCEM runs on each with its own key and its own filter-flow grid,
    and the restored regions and uncertainty maps are blended with the tiling window. Each
    region's kernels are kept with their centres in photo coordinates. Cells cost MCEM's
    time per pixel once, and bound its memory by the cell size.

    Args:
      config: an MCEM config.
      tile: the cell side in pixels; 0 runs on the whole photo.
      overlap: the overlap of neighbouring cells.
    """

    def __init__(self, config, *, tile: int, overlap: int):
        self.config, self.tile, self.overlap = config, tile, overlap
        self.history: list[list[tuple[int, float]]] = []

    def _run(self, image, key):
        try:
            result = mcem.deblur(image, self.config, key=key)
        except ValueError as err:
            raise ValueError(f"MCEM cannot run on a {image.shape[0]}x{image.shape[1]} image "
                             f"with this config: {err}") from err
        uncertainty = np.asarray(result.uncertainty).mean(-1)
        self.history.append([(int(step), float(np.mean(fit))) for step, fit in result.history])
        return (np.asarray(result.image), uncertainty, np.asarray(result.kernels),
                kernel_centres(image.shape, self.config))

    def _metrics(self) -> list[dict]:
        """Data-fit records (JSON-lines rows) of the last photo, one key per cell."""
        single = len(self.history) == 1
        rows: dict[int, dict] = {}
        for cell, history in enumerate(self.history):
            name = "data_fit" if single else f"data_fit_cell{cell}"
            for step, fit in history:
                rows.setdefault(step, {"step": step})[name] = fit
        return [rows[step] for step in sorted(rows)]

    def deblur(self, image: np.ndarray, *, key) -> dict:
        """``{"image", "uncertainty" (H, W), "kernels" (G, k, k), "centres" (G, 2),
        "metrics"}`` of an (H, W, C) photo in [0, 1].

        Raises:
          ValueError: the config does not fit the photo (or a cell).
        """
        height, width = image.shape[:2]
        self.history = []
        if not self.tile or (height <= self.tile and width <= self.tile):
            restored, uncertainty, cell_kernels, centres = self._run(image, key)
            return {"image": restored, "uncertainty": uncertainty, "kernels": cell_kernels,
                    "centres": centres, "metrics": self._metrics()}
        all_kernels, all_centres = [], []
        grid = tiling.plan_tiles(image.shape, tile=self.tile, overlap=self.overlap,
                                 multiple=16)
        origins = iter(grid.origins)

        def cell(region, cell_key):
            restored, uncertainty, cell_kernels, centres = self._run(np.asarray(region),
                                                                     cell_key)
            y0, x0 = next(origins)
            all_kernels.append(cell_kernels)
            all_centres.append(centres + np.array([y0, x0], np.float32))
            return {"image": restored, "uncertainty": uncertainty}

        blended = tiling.tiled_apply(cell, image, tile=self.tile, overlap=self.overlap,
                                     multiple=16, key=key, compile_fn=False)
        centres = np.concatenate(all_centres)
        inside = (centres[:, 0] < height) & (centres[:, 1] < width)
        return {"image": blended["image"], "uncertainty": blended["uncertainty"],
                "kernels": np.concatenate(all_kernels)[inside], "centres": centres[inside],
                "metrics": self._metrics()}

    def kernels(self, image: np.ndarray, grid, *, key):
        """``(kernels, centres)`` of `deblur`: MCEM's kernels sit on its own filter-flow
        grid (``config.grid``), not on ``grid``."""
        del grid
        result = self.deblur(image, key=key)
        return result["kernels"], result["centres"]
