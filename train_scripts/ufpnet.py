"""UFPNet stages II and III: KE-Net by re-blurring, then the kernel-attention NAFNet.

Usage::

  python train_scripts/ufpnet.py                      # tiny default run, a few CPU minutes
  python train_scripts/ufpnet.py --config train_scripts/configs/ufpnet_gopro.py \
      --workdir runs/ufpnet_gopro --tpu                # official configuration, all devices

With no flags it loads the pretrained flow shipped with the package, builds the embedded
``synthetic_blur`` data set if needed, trains stage II (``kernel_estimator.py``) into
``<workdir>/stage2`` and stage III into ``<workdir>/stage3``, evaluates on the held-out
split and prints the work dir and a summary. Rerunning the same command resumes both stages
exactly (orbax checkpoints hold the train state and the data-iterator state).

Stage III (official recipe): loss ``PSNRLoss(x̂, x) + reblur_weight · |K̂ ⊗ x̂ − y|₁`` with
the kernels detached; AdamW with cosine decay, betas and weight decay from the config and a
global-norm gradient clip (``grad_clip``, official 0.01). The KE-Net and the flow are frozen
for real: their gradients are stopped in the model and in the loss, and the optimiser maps
their updates to zero (``optax.multi_transform`` + ``set_to_zero``), so weight decay does
not shrink them either.

Data parallelism: ``jax.jit`` over a one-axis ``data`` mesh; the global batch is split over
all devices, parameters and optimiser state are replicated, the state is donated. ``--tpu``
runs ``jax.distributed.initialize()`` first (every host runs the same command).

Writes: ``stage{2,3}/metrics.jsonl`` (JSON lines), ``stage{2,3}/checkpoints/``,
``stage3/samples/step_<n>_<i>.png`` (blurry | restored | sharp), ``stage3/ufpnet.npz``
(all variables, flax names) and ``summary.json``.
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import kernel_estimator as ke_lib  # noqa: E402  (sibling script, shared set-up)

from jaxdeblur import convert, losses  # noqa: E402
from jaxdeblur.train import checkpoint as checkpoint_lib  # noqa: E402
from jaxdeblur.train import logging as logging_lib  # noqa: E402
from jaxdeblur.train import loop as loop_lib  # noqa: E402
from jaxdeblur.train import mesh as mesh_lib  # noqa: E402

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
    variables = ke_lib.init_variables(model, config.seed + 1, flow_variables)
    params = dict(variables["params"])
    params["kernel_extra"] = ke_params
    return TrainState(jnp.asarray(0, jnp.int32), params, variables["batch_stats"],
                      optimizer.init(params))


def _to_uint8(image) -> np.ndarray:
    return np.asarray(np.clip(np.round(np.asarray(image) * 255.0), 0, 255), np.uint8)


def make_restore_fn(config):
    """Jitted ``(variables, blurry, key) -> restored`` of the evaluation model (TLC if set)."""
    model = ke_lib.make_model(config, train_size=config.eval_tlc_train_size)
    return jax.jit(lambda v, x, key: model.apply(v, x, key=key)[1])


def evaluate(config, restore, state: TrainState, batches, workdir: pathlib.Path,
             step: int) -> dict:
    """Held-out PSNR/SSIM (uint8 RGB, whole crop) of the blurry input and of the output."""
    from jaxdeblur import metrics as metrics_lib

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
        if i < config.num_sample_images:
            path = workdir / "samples" / f"step_{step:07d}_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.concatenate([_to_uint8(a) for a in (blurry, restored, sharp)],
                                           axis=1)).save(path)
    return {f"eval_{k}": float(np.mean(v)) for k, v in scores.items()}


def train_ufpnet(config, workdir, *, mesh, flow_variables, ke_params) -> dict:
    """Runs (or resumes) stage III; returns the final evaluation and loss figures."""
    workdir = pathlib.Path(workdir)
    stage3 = config.stage3
    mesh_lib.check_global_batch(config.batch_size, mesh)
    model = ke_lib.make_model(config)
    optimizer = make_optimizer(stage3)
    state = init_state(config, model, flow_variables, ke_params, optimizer)
    train_key = jax.random.fold_in(jax.random.key(config.seed), 3)

    it = ke_lib.train_iterator(config, seed_offset=1)
    ckpt = checkpoint_lib.CheckpointManager(
        workdir, model_config=config.model, max_to_keep=config.max_checkpoints,
        async_save=config.async_checkpoint)
    restored = ckpt.restore(state)
    if restored is not None:
        state = restored.state
        if restored.data_state is not None:
            it.set_state(restored.data_state)
    start = int(state.step)
    state = mesh_lib.replicate(state, mesh)
    writer = logging_lib.MetricWriter(workdir / "metrics.jsonl",
                                      resume_step=start if restored is not None else None)
    step_fn = make_train_step(model, optimizer, stage3, train_key, mesh)
    eval_set = ke_lib.eval_batches(config)
    restore = make_restore_fn(config)
    summary: dict = {}
    losses: list = []

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
        losses.append((step, loss))
        return metrics

    if start == 0:
        run_eval(0, state)
    state = loop_lib.train_loop(
        state, step_fn, start=start, num_steps=stage3.num_steps, checkpoints=ckpt,
        writer=writer, log_every=stage3.log_every, eval_every=stage3.eval_every,
        checkpoint_every=stage3.checkpoint_every, next_batch=ke_lib.next_train_batch(it, mesh),
        data_state=it.get_state, on_log=record_loss, log_first_step=True, evaluate=run_eval,
        sync_checkpoints=True, name="stage III")
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    np.savez(workdir / "ufpnet.npz", **convert.flatten_variables(variables))
    if len(losses) >= 4:
        # Single-batch losses vary with the crop; compare the means of the first and last
        # quarter of the logged steps of this run.
        quarter = len(losses) // 4
        summary["loss_mean_first_quarter"] = float(np.mean([v for _, v in losses[:quarter]]))
        summary["loss_mean_last_quarter"] = float(np.mean([v for _, v in losses[-quarter:]]))
    return summary


def run(config, workdir: pathlib.Path, *, mesh) -> dict:
    """Stage II then stage III under ``workdir``; writes and returns the summary."""
    flow_variables = ke_lib.load_flow_variables(config)
    ke_params = ke_lib.train_kernel_estimator(config, workdir / "stage2", mesh=mesh,
                                              flow_variables=flow_variables)
    stage2 = [line for line in logging_lib.read_metrics(workdir / "stage2" / "metrics.jsonl")
              if "eval_reblur_psnr" in line]
    summary = {"workdir": str(workdir),
               "stage2_eval_first": stage2[0] if stage2 else None,
               "stage2_eval_last": stage2[-1] if stage2 else None}
    summary.update(train_ufpnet(config, workdir / "stage3", mesh=mesh,
                                flow_variables=flow_variables, ke_params=ke_params))
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv):
    logging_lib.quiet_library_logs()
    del argv
    info = mesh_lib.initialize_distributed(flags.FLAGS.tpu)
    print(f"devices: {info}", flush=True)
    workdir = pathlib.Path(flags.FLAGS.workdir).expanduser().resolve()
    print(f"work dir: {workdir}", flush=True)
    summary = run(flags.FLAGS.config, workdir, mesh=mesh_lib.make_mesh())
    print(json.dumps(summary, indent=2))
    print(f"work dir: {workdir}", flush=True)


if __name__ == "__main__":
    config_flags.DEFINE_config_file(
        "config", str(pathlib.Path(__file__).parent / "configs" / "ufpnet_tiny.py"),
        "UFPNet config file.", lock_config=True)
    flags.DEFINE_string("workdir", "runs/ufpnet", "Run directory (created; resumed if "
                        "present).")
    flags.DEFINE_bool("tpu", False, "Multi-host set-up: jax.distributed.initialize(), then "
                      "every device of every host.")
    app.run(main)
