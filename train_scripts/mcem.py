"""Deep EM (MCEM) blind deblurring of image files, or of a synthetic example.

    # a synthetic example (skimage camera, smoothly varying kernel field); prints PSNR
    python train_scripts/mcem.py --config train_scripts/configs/mcem.py --workdir runs/mcem

    # files and/or folders; same-size images are deblurred together as one batch
    python train_scripts/mcem.py --workdir runs/mcem_real photo1.png blurry_folder/

    # config overrides, e.g. a smaller problem
    python train_scripts/mcem.py --config.kernel_size=15 --config.grid="(2,3)" ...

Writes into ``--workdir``: ``<name>_restored.png``, ``<name>_kernels.png`` (the per-cell
kernels on the grid used, each scaled to its maximum), ``<name>_uncertainty.png`` (the
posterior std, scaled to the largest std, which ``summary.json`` records), ``summary.json``
and ``metrics.jsonl``. Checkpoints go to ``<workdir>/<group>/checkpoints`` every
``config.checkpoint_every`` EM iterations; re-running the same command resumes. A NaN or
infinite data fit stops the run with a message; the last good checkpoint is kept.
``--config.refine_iterations=N`` adds the cold refinement phase after the EM iterations
(configs/mcem.py); the progress bar and checkpoints count across both phases, so a finished
run re-run with a larger N continues its refinement.
"""

import json
import pathlib
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from jaxdeblur import io, kernels, mcem, metrics
from jaxdeblur.train import checkpoint, logging as train_logging

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(pathlib.Path(__file__).parent / "configs" / "mcem.py"), "MCEM config file.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/mcem", "Output and checkpoint folder.")
_SHARD = flags.DEFINE_bool("shard", True, "Shard each batch over all devices (data axis) "
                           "when the batch size is a multiple of the device count.")


def _kernel_grid_image(kernels_: np.ndarray, grid: tuple, zoom: int = 4) -> np.ndarray:
    """(G, k, k) kernels tiled row-major on the (gh, gw) grid, each scaled to its max."""
    gh, gw = grid
    k = kernels_.shape[-1]
    cell = k * zoom + 2
    canvas = np.ones((gh * cell, gw * cell), np.float32)
    for g, kern in enumerate(kernels_):
        y, x = divmod(g, gw)
        tile = np.kron(kern / max(float(kern.max()), 1e-12), np.ones((zoom, zoom)))
        canvas[y * cell + 1:y * cell + 1 + k * zoom, x * cell + 1:x * cell + 1 + k * zoom] = tile
    return canvas


def _synthetic_example(config):
    import skimage.data
    import skimage.transform
    syn = config.synthetic
    sharp = skimage.transform.resize(skimage.data.camera(), (syn.size, syn.size),
                                     anti_aliasing=True).astype(np.float32)[..., None]
    key_field, key_noise = jax.random.split(jax.random.key(syn.seed))
    field = kernels.kernel_field(key_field, sharp.shape, syn.kernel_size,
                                 max_angle_deg=syn.max_angle_deg)
    blurry = kernels.synthesize_blur(key_noise, jnp.asarray(sharp), field,
                                     noise_sigma=syn.noise_sigma)
    return {"synthetic_camera": np.asarray(blurry)}, {"synthetic_camera": sharp}


def _read_inputs(paths):
    images = {}
    for p in paths:
        for f in io.list_images(p):
            name = f.stem
            while name in images:
                name += "_"
            images[name] = io.read_image(f)
    if not images:
        raise app.UsageError(f"no images found in {list(paths)}")
    return images, {}


def _deblur_group(names, batch, config, workdir, key, shard=True):
    group = f"{batch.shape[1]}x{batch.shape[2]}x{batch.shape[3]}"
    model = mcem.build_model(batch.shape[1:], config)
    keys = jax.random.split(key, len(names))
    target = jax.tree.map(lambda *xs: jnp.stack(xs),
                          *[mcem.init_state(model, key=k) for k in keys])
    # Only the fields that decide the state's shapes: a resumed run may change iteration
    # counts, step sizes or logging.
    shapes = {k: config[k].to_dict() if hasattr(config[k], "to_dict") else config[k]
              for k in ("kernel_size", "grid", "image_net", "kernel_net", "sampler")}
    ckpt = checkpoint.CheckpointManager(workdir / group, model_config=shapes, max_to_keep=2)
    restored = ckpt.restore(target)
    state = restored.state if restored else target
    start = restored.step if restored else 0
    if restored:
        print(f"[{group}] resuming from EM iteration {start}")
    mesh = None
    if shard and jax.device_count() > 1 and len(names) % jax.device_count() == 0:
        mesh = jax.make_mesh((jax.device_count(),), ("data",),
                             axis_types=(jax.sharding.AxisType.Auto,))
    writer = train_logging.MetricWriter(workdir / f"metrics_{group}.jsonl",
                                        resume_step=start if restored else None)
    total = mcem.total_iterations(config)
    bar = train_logging.progress(total=total, initial=start,
                                 desc=f"MCEM {group}", disable=False)

    def callback(it, st, fit):
        bar.update(it - bar.n)
        bar.set_postfix_str(f"data_fit={float(np.mean(fit)):.3e}")
        writer.write(it, {"data_fit": fit})
        if it % config.checkpoint_every == 0 or it == total:
            ckpt.save(it, jax.device_get(st))  # host copy: the next step donates st

    try:
        result = mcem.deblur(batch, config, key=keys, mesh=mesh, state=state,
                             callback=callback)
    except mcem.DataFitError as err:
        ckpt.close()
        last = ckpt.latest_step
        sys.exit(f"[{group}] stopped: {err}\nThe last good checkpoint is EM iteration {last} "
                 f"under {workdir / group / 'checkpoints'}.")
    finally:
        bar.close()
        writer.close()
    ckpt.close()
    return result


def main(argv):
    train_logging.quiet_library_logs()
    config = _CONFIG.value
    workdir = pathlib.Path(_WORKDIR.value)
    workdir.mkdir(parents=True, exist_ok=True)
    if len(argv) > 1:
        images, sharp = _read_inputs(argv[1:])
    else:
        images, sharp = _synthetic_example(config)
    groups = {}
    for name, image in images.items():
        groups.setdefault(image.shape, []).append(name)
    key = jax.random.key(config.seed)
    summary = {"config": config.to_dict(), "images": {}}
    for shape, names in groups.items():
        key, group_key = jax.random.split(key)
        batch = np.stack([images[n] for n in names])
        t0 = time.time()
        result = _deblur_group(names, batch, config, workdir, group_key, _SHARD.value)
        seconds = time.time() - t0
        for i, name in enumerate(names):
            restored, std = result.image[i], result.uncertainty[i]
            io.write_image(workdir / f"{name}_restored.png", restored)
            io.write_image(workdir / f"{name}_kernels.png",
                           _kernel_grid_image(result.kernels[i], result.grid))
            std_max = float(std.max())
            io.write_image(workdir / f"{name}_uncertainty.png",
                           std.mean(-1) / max(std_max, 1e-12))
            entry = {"shape": list(shape), "grid": list(result.grid),
                     "data_fit": float(result.data_fit[i]), "uncertainty_max": std_max,
                     "uncertainty_mean": float(std.mean()), "seconds_for_batch": seconds,
                     "batch_size": len(names)}
            if name in sharp:
                entry["psnr_blurry"] = float(metrics.psnr(images[name], sharp[name]))
                entry["psnr_restored"] = float(metrics.psnr(restored, sharp[name]))
                print(f"{name}: PSNR blurry {entry['psnr_blurry']:.2f} dB -> restored "
                      f"{entry['psnr_restored']:.2f} dB ({seconds:.0f} s)")
            summary["images"][name] = entry
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"wrote {workdir / 'summary.json'}")


if __name__ == "__main__":
    app.run(main)
