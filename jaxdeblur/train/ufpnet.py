"""UFPNet stage III (the kernel-attention NAFNet), the two-stage run, and inference.

`train_and_evaluate` trains stage II (`jaxdeblur.train.kernel_estimator`) into
``<workdir>/stage2`` and stage III into ``<workdir>/stage3``, evaluates on the held-out
split and writes ``summary.json``; rerunning resumes both stages exactly (orbax checkpoints
hold the train state and the data-iterator state). ``train_scripts/ufpnet.py`` is its
command line.

Stage III (official recipe): loss ``PSNRLoss(x̂, x) + reblur_weight · |K̂ ⊗ x̂ − y|₁`` with
the kernels detached; AdamW with cosine decay, betas and weight decay from the config and a
global-norm gradient clip (``grad_clip``, official 0.01). The KE-Net and the flow are frozen
for real: their gradients are stopped in the model and in the loss, and the optimiser maps
their updates to zero (``optax.multi_transform`` + ``set_to_zero``), so weight decay does
not shrink them either.

Data parallelism: ``jax.jit`` over a one-axis ``data`` mesh; the global batch is split over
all devices, parameters and optimiser state are replicated, the state is donated. Several
processes (a TPU pod slice, `jaxdeblur.launch`): each reads its own share of the global
batch (``data.train_iterator``), every process takes part in every step and checkpoint,
and process 0 alone writes the files below.

Writes: ``stage{2,3}/metrics.jsonl`` (JSON lines), ``stage{2,3}/checkpoints/``,
``stage3/samples/step_<n>_<i>.png`` (blurry | restored | sharp), ``stage3/ufpnet.npz``
(all variables, flax names) and ``summary.json``.

Inference: `load_checkpoint` reads UFPNet from an official ``.pth``/``.npz``, a converted
folder or a training directory; `TiledUFPNet` runs it on whole photos by tiles.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from jaxdeblur import convert, losses, tiling, viz
from jaxdeblur import metrics as metrics_lib
from jaxdeblur.nets.ufpnet import UFPNet
from jaxdeblur.train import checkpoint as checkpoint_lib
from jaxdeblur.train import kernel_estimator
from jaxdeblur.train import logging as logging_lib
from jaxdeblur.train import loop as loop_lib
from jaxdeblur.train import mesh as mesh_lib

FROZEN = ("kernel_extra", "flow")


class TrainState(NamedTuple):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def param_labels(params) -> dict:
    """``"frozen"`` for the KE-Net and flow subtrees, ``"train"`` for the backbone."""
    return {name: jax.tree.map(lambda _, n=name: "frozen" if n in FROZEN else "train", sub)
            for name, sub in params.items()}


def learning_rate(stage3) -> optax.Schedule:
    """Cosine decay from ``learning_rate`` to ``min_learning_rate`` over ``num_steps``."""
    return optax.cosine_decay_schedule(stage3.learning_rate, stage3.num_steps,
                                       alpha=stage3.min_learning_rate / stage3.learning_rate)


def make_optimizer(stage3) -> optax.GradientTransformation:
    train = optax.chain(
        optax.clip_by_global_norm(stage3.grad_clip),
        optax.adamw(learning_rate(stage3), b1=stage3.b1, b2=stage3.b2,
                    weight_decay=stage3.weight_decay))
    return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()},
                                 param_labels)


def stage3_loss(model, params, batch_stats, batch, key, reblur_weight: float):
    """PSNR loss + reblur_weight · reblur L1; returns (loss, metrics)."""
    params = {k: jax.lax.stop_gradient(v) if k in FROZEN else v for k, v in params.items()}
    kernel_field, restored = model.apply({"params": params, "batch_stats": batch_stats},
                                         batch["blurry"], key=key)
    l_psnr = losses.psnr_loss(restored, batch["sharp"])
    l_reblur = losses.reblur_l1(restored, kernel_field, batch["blurry"])
    loss = l_psnr + reblur_weight * l_reblur
    return loss, {"loss": loss, "psnr_loss": l_psnr, "reblur_l1": l_reblur}


def make_train_step(model, optimizer, stage3, root_key, mesh):
    """A jitted data-parallel step ``(state, batch) -> (state, metrics)``, state donated."""
    repl = mesh_lib.replicated_sharding(mesh)

    def step_fn(state: TrainState, batch):
        key = jax.random.fold_in(root_key, state.step)
        grad_fn = jax.grad(functools.partial(stage3_loss, model,
                                             reblur_weight=stage3.reblur_weight), has_aux=True)
        grads, metrics = grad_fn(state.params, state.batch_stats, batch, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(
            {k: v for k, v in grads.items() if k not in FROZEN})
        metrics["lr"] = learning_rate(stage3)(state.step)
        return TrainState(state.step + 1, params, state.batch_stats, opt_state), metrics

    return jax.jit(step_fn, out_shardings=(repl, repl), donate_argnums=(0,))


def init_state(config, model, flow_variables, ke_params, optimizer) -> TrainState:
    variables = kernel_estimator.init_variables(model, config.seed + 1, flow_variables)
    params = dict(variables["params"])
    params["kernel_extra"] = ke_params
    return TrainState(jnp.asarray(0, jnp.int32), params, variables["batch_stats"],
                      optimizer.init(params))


def _to_uint8(image) -> np.ndarray:
    return np.asarray(np.clip(np.round(np.asarray(image) * 255.0), 0, 255), np.uint8)


def make_restore_fn(config):
    """Jitted ``(variables, blurry, key) -> restored`` of the evaluation model (TLC if set)."""
    model = kernel_estimator.make_model(config, train_size=config.eval_tlc_train_size,
                                        row_blocks=True)
    return jax.jit(lambda v, x, key: model.apply(v, x, key=key)[1])


def evaluate(config, restore, state: TrainState, batches, workdir: pathlib.Path,
             step: int) -> dict:
    """Held-out PSNR/SSIM (uint8 RGB, whole crop) of the blurry input and of the output."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    scores = {"psnr_blurry": [], "psnr": [], "ssim_blurry": [], "ssim": []}
    for i, batch in enumerate(batches):
        blurry, sharp = batch["blurry"][0], batch["sharp"][0]
        key = jax.random.fold_in(jax.random.key(config.seed + 2), i)
        restored = np.asarray(restore(variables, jnp.asarray(batch["blurry"]), key)[0])
        scores["psnr_blurry"].append(float(metrics_lib.psnr_uint8(blurry, sharp)))
        scores["psnr"].append(float(metrics_lib.psnr_uint8(restored, sharp)))
        scores["ssim_blurry"].append(float(metrics_lib.ssim_uint8(blurry, sharp)))
        scores["ssim"].append(float(metrics_lib.ssim_uint8(restored, sharp)))
        if i < config.num_sample_images and mesh_lib.is_primary():
            path = workdir / "samples" / f"step_{step:07d}_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.concatenate([_to_uint8(a) for a in (blurry, restored, sharp)],
                                           axis=1)).save(path)
    return {f"eval_{k}": float(np.mean(v)) for k, v in scores.items()}


def train_ufpnet(config, workdir, *, mesh, flow_variables, ke_params,
                 data: kernel_estimator.Data) -> dict:
    """Runs (or resumes) stage III; returns the final evaluation and loss figures."""
    workdir = pathlib.Path(workdir)
    stage3 = config.stage3
    mesh_lib.check_global_batch(config.batch_size, mesh)
    model = kernel_estimator.make_model(config)
    optimizer = make_optimizer(stage3)
    state = init_state(config, model, flow_variables, ke_params, optimizer)
    train_key = jax.random.fold_in(jax.random.key(config.seed), 3)

    it = data.train_iterator(seed_offset=1)
    state, start, ckpt, writer = loop_lib.resume(
        state, workdir, model_config=config.model, iterator=it,
        max_to_keep=config.max_checkpoints, async_save=config.async_checkpoint)
    state = mesh_lib.replicate(state, mesh)
    step_fn = make_train_step(model, optimizer, stage3, train_key, mesh)
    eval_set = data.eval_batches()
    restore = make_restore_fn(config)
    summary: dict = {}
    logged: list = []

    def run_eval(step, state):
        if not eval_set:
            return
        metrics = evaluate(config, restore, state, eval_set, workdir, step)
        writer.write(step, metrics)
        print(f"stage III step {step}: {logging_lib.format_metrics(metrics)}", flush=True)
        summary.setdefault("eval_first", {"step": step, **metrics})
        summary["eval_last"] = {"step": step, **metrics}

    def record_loss(step, metrics):
        loss = float(metrics["loss"])
        summary.setdefault("loss_first", {"step": step, "loss": loss})
        summary["loss_last"] = {"step": step, "loss": loss}
        logged.append((step, loss))
        return metrics

    if start == 0:
        run_eval(0, state)
    state = loop_lib.train_loop(
        state, step_fn, start=start, num_steps=stage3.num_steps, checkpoints=ckpt,
        writer=writer, log_every=stage3.log_every, eval_every=stage3.eval_every,
        checkpoint_every=stage3.checkpoint_every, next_batch=kernel_estimator.next_train_batch(it, mesh),
        data_state=it.get_state, on_log=record_loss, log_first_step=True, evaluate=run_eval,
        sync_checkpoints=True, name="stage III")
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    if mesh_lib.is_primary():
        np.savez(workdir / "ufpnet.npz", **convert.flatten_variables(variables))
    if len(logged) >= 4:
        # Single-batch losses vary with the crop; compare the means of the first and last
        # quarter of the logged steps of this run.
        quarter = len(logged) // 4
        summary["loss_mean_first_quarter"] = float(np.mean([v for _, v in logged[:quarter]]))
        summary["loss_mean_last_quarter"] = float(np.mean([v for _, v in logged[-quarter:]]))
    return summary


def train_and_evaluate(config, workdir, *, data: kernel_estimator.Data, mesh=None) -> dict:
    """Stage II then stage III under ``workdir``; writes and returns the summary.

    Args:
      config: a UFPNet config (`jaxdeblur.configs`: ``ufpnet_tiny``, ``ufpnet_gopro``).
      workdir: the run directory: ``stage2/``, ``stage3/`` and ``summary.json`` (created;
        a rerun resumes both stages exactly).
      data: the training and held-out batches (`data_pipelines.training.ConfigData`).
      mesh: the ``data`` mesh (default: every device).

    Returns:
      The summary: held-out figures of both stages, first and last losses.
    """
    workdir = pathlib.Path(workdir)
    mesh = mesh or mesh_lib.make_mesh()
    flow_variables = kernel_estimator.load_flow_variables(config)
    ke_params = kernel_estimator.train_kernel_estimator(
        config, workdir / "stage2", mesh=mesh, flow_variables=flow_variables, data=data)
    stage2_metrics = workdir / "stage2" / "metrics.jsonl"
    # Process 0 writes the metric logs; the other processes of a run may not see them.
    stage2 = [line for line in logging_lib.read_metrics(stage2_metrics)
              if "eval_reblur_psnr" in line] if stage2_metrics.exists() else []
    summary = {"workdir": str(workdir),
               "stage2_eval_first": stage2[0] if stage2 else None,
               "stage2_eval_last": stage2[-1] if stage2 else None}
    summary.update(train_ufpnet(config, workdir / "stage3", mesh=mesh,
                                flow_variables=flow_variables, ke_params=ke_params, data=data))
    if mesh_lib.is_primary():
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# --- inference ------------------------------------------------------------------------------

class Loaded(NamedTuple):
    """What `load_checkpoint` returns."""

    module: UFPNet
    variables: dict
    description: str


_FIELDS = ("img_channel", "width", "enc_blk_nums", "middle_blk_num", "dec_blk_nums",
           "kernel_size")


def load_checkpoint(path, *, train_size=None, config=None) -> Loaded:
    """UFPNet module and variables from an official file, a converted folder or a run.

    Accepted: an official ``.pth``/``.pt``/``.npz`` state dict (converted on the fly by
    `jaxdeblur.convert`; official ``.pth`` files wrap it under ``params``); a folder written
    by ``jaxdeblur convert`` (`jaxdeblur.train.checkpoint.save_converted`); a training work
    directory (or its ``checkpoints/`` folder) written by
    `jaxdeblur.train.checkpoint.CheckpointManager`, whose newest step is used.

    Args:
      path: the checkpoint.
      train_size: ``(T_H, T_W)`` for TLC local pooling at test time, or None.
      config: the expected architecture fields (``width``, ``enc_blk_nums``, ...) of an
        official file; one of another configuration raises naming both. Inferred when None.

    Returns:
      ``Loaded(module, variables, description)``.

    Raises:
      checkpoint.CheckpointError: a missing path, or a checkpoint of another method or of
        an unknown layout.
      ImportError: a ``.pth`` file without torch installed.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise checkpoint_lib.CheckpointError(f"checkpoint {path} does not exist")
    extra = {} if train_size is None else {"train_size": tuple(train_size)}
    if path.is_file():
        if path.suffix.lower() not in (".pth", ".pt", ".npz"):
            raise checkpoint_lib.CheckpointError(
                f"checkpoint {path}: expected an official .pth/.pt/.npz file or an orbax "
                "directory")
        try:
            state_dict = convert.load_state_dict(path)
            fields = convert.ufpnet_config_from_state_dict(state_dict)
            variables = convert.ufpnet_variables_from_state_dict(state_dict, config=config)
        except ValueError as err:
            raise checkpoint_lib.CheckpointError(
                f"checkpoint {path} is not a UFPNet checkpoint: {err}") from err
        return Loaded(UFPNet(**fields, **extra), variables, f"official weights {path.name}")

    converted = checkpoint_lib.read_converted(path, method="ufpnet")
    if converted is not None:
        model_config, variables = converted
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in model_config.items()}
        return Loaded(UFPNet(**fields, **extra), variables,
                      f"converted checkpoint {path.name}")

    newest = checkpoint_lib.restore_newest_step(path)
    variables = checkpoint_lib.find_variables(newest.state, ("kernel_extra", "intro"))
    if variables is None:
        raise checkpoint_lib.CheckpointError(
            f"checkpoint {newest.directory} holds no UFPNet parameters (its state has "
            f"{checkpoint_lib.describe_tree(newest.state)}); it was written for another "
            "method")
    fields = fields_from_variables(variables, newest.model_config)
    return Loaded(UFPNet(**fields, **extra), variables,
                  f"training checkpoint {newest.directory}")


def fields_from_variables(variables: dict, model_config: dict) -> dict:
    """UFPNet fields from a training run's model config, else from the parameter shapes."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in model_config.items()
              if k in _FIELDS}
    if len(fields) == len(_FIELDS):
        return fields
    params = variables["params"]
    intro = np.shape(params["intro"]["kernel"])
    enc = [k for k in params if k.startswith("encoders_")]
    dec = [k for k in params if k.startswith("decoders_")]
    levels = 1 + max(int(k.split("_")[1]) for k in enc)

    def count(keys, level):
        return sum(1 for k in keys if int(k.split("_")[1]) == level)

    k2 = np.shape(params["kernel_extra"]["mean2"]["kernel"])[-1]
    inferred = {"img_channel": int(intro[2]), "width": int(intro[3]),
                "enc_blk_nums": tuple(count(enc, i) for i in range(levels)),
                "middle_blk_num": sum(1 for k in params if k.startswith("middle_blks_")),
                "dec_blk_nums": tuple(count(dec, i) for i in range(levels)),
                "kernel_size": int(round(math.sqrt(k2)))}
    inferred.update(fields)
    return inferred


class TiledUFPNet:
    """UFPNet inference on whole photos by overlapping tiles (`jaxdeblur.tiling`).

    Each tile gets its own key for the KE-Net's uncertainty noise (`jax.random.fold_in`
    of the photo's key with the tile index), so tiles are independent draws.

    Args:
      module, variables: the network (`load_checkpoint`).
      tile, overlap: tile side and overlap in pixels.
      batch_size: tiles per compiled call.
    """

    def __init__(self, module: UFPNet, variables, *, tile: int, overlap: int,
                 batch_size: int):
        self.module, self.variables = module, variables
        self.tile, self.overlap, self.batch_size = tile, overlap, batch_size
        self.multiple = 2 ** len(module.enc_blk_nums)

        def restore(tile, key):
            _, restored = module.apply(variables, tile[None], key=key)
            return restored[0]

        def estimate(crop, key):
            kernels, _, _ = module.apply(variables, crop[None], key=key,
                                         method=UFPNet.estimate_kernels)
            return kernels[0]

        self._restore = restore
        self._estimate = jax.jit(estimate)

    def deblur(self, rgb: np.ndarray, *, key) -> dict:
        """``{"image": restored}`` of an (H, W, 3) photo in [0, 1]."""
        restored = tiling.tiled_apply(self._restore, rgb, tile=self.tile, overlap=self.overlap,
                                      multiple=self.multiple, batch_size=self.batch_size,
                                      key=key)
        return {"image": restored}

    def kernels(self, rgb: np.ndarray, grid: tuple[int, int], *, key, crop: int = 128):
        """Kernels ``(G, k, k)`` at the centres ``(G, 2)`` of a ``grid`` of cells, each
        estimated from a ``crop``-pixel window around its centre."""
        centres = viz.grid_centres(rgb.shape, grid)
        canvas = tiling.pad_to_multiple(rgb, self.multiple)
        side = -(-crop // self.multiple) * self.multiple
        size = (min(side, canvas.shape[0]), min(side, canvas.shape[1]))
        kernels = []
        for index, (cy, cx) in enumerate(centres):
            y0 = int(np.clip(round(cy) - size[0] // 2, 0, canvas.shape[0] - size[0]))
            x0 = int(np.clip(round(cx) - size[1] // 2, 0, canvas.shape[1] - size[1]))
            field = self._estimate(canvas[y0:y0 + size[0], x0:x0 + size[1]],
                                   jax.random.fold_in(key, index))
            kernels.append(np.asarray(field[int(cy) - y0, int(cx) - x0]))
        return np.stack(kernels), centres
