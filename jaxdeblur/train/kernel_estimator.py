"""UFPNet stage II: trains the kernel-estimation network (KE-Net) by re-blurring.

Loss (ours; the authors' stage-II code is not public), per step on a global batch of
(blurry y, sharp x) crops: ``L_KE = mean |x ⊗ f_θ[G(y)] − y|₁ + kl_weight·KL(code, σ)``,
the sharp image re-blurred with the per-pixel kernels that the frozen flow f_θ makes from
the KE-Net's uncertain codes G(y) (ε drawn with ``fold_in(seed, step)``). Only the KE-Net
is trained (Adam); the flow's variables are passed as constants and get no update.

`train_and_evaluate` (``train_scripts/kernel_estimator.py``) writes to its work dir:
``metrics.jsonl`` (``l_ke``, ``kl``, ``reblur_psnr`` every ``log_every`` steps; held-out
``eval_reblur_psnr`` and, where the data have ground-truth kernel fields,
``eval_kernel_l1``, the mean per-pixel L1 distance between estimated and true kernels),
``checkpoints/`` (orbax: train state + data-iterator state; rerunning resumes exactly) and
``kernel_estimator.npz`` (the KE-Net parameters, flax names). With several processes
(`jaxdeblur.train.mesh.initialize_distributed`) each process reads its own share of the
global batch, all of them save the checkpoints together, and process 0 alone writes the
files.

This module also holds the set-up that stage III (`jaxdeblur.train.ufpnet`) reuses: flow,
model, initial variables and batches. Data come from the caller as a `Data` (the train
scripts pass `data_pipelines.training.ConfigData`), so the library imports no pipeline.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdeblur import convert, losses
from jaxdeblur import flow as flow_lib
from jaxdeblur.nets.ufpnet import UFPNet
from jaxdeblur.train import logging as logging_lib
from jaxdeblur.train import loop as loop_lib
from jaxdeblur.train import mesh as mesh_lib


# --- shared set-up (stage II and III) -------------------------------------------------------

class Data(Protocol):
    """What the UFPNet runners need from a data set (`data_pipelines.training.ConfigData`)."""

    def train_iterator(self, seed_offset: int = 0) -> Any:
        """A resumable iterator (``get_state``/``set_state``) of this process's share of
        the global batch: dicts with ``blurry`` and ``sharp`` (B, h, w, 3) float32."""

    def eval_batches(self, *, with_kernel_field: bool = False) -> list[dict]:
        """Held-out examples, one per batch; ``kernel_field`` where the data have it."""


def next_train_batch(it, mesh) -> Callable[[], dict]:
    """The next (blurry, sharp) batch of ``it``, split over the mesh's ``data`` axis."""
    def next_batch():
        raw = next(it)
        return mesh_lib.shard_batch({k: raw[k] for k in ("blurry", "sharp")}, mesh)

    return next_batch


def load_flow_variables(config) -> dict:
    """The frozen flow prior's variables (``params``, ``batch_stats``)."""
    module, variables = flow_lib.load_pretrained(config.flow_checkpoint)
    if module.kernel_size != config.model.kernel_size:
        raise ValueError(f"flow prior {config.flow_checkpoint!r} has kernel_size "
                         f"{module.kernel_size}, config.model.kernel_size is "
                         f"{config.model.kernel_size}")
    return jax.tree.map(jnp.asarray, variables)


def make_model(config, *, train_size=None, row_blocks: bool = False) -> UFPNet:
    """The UFPNet of ``config.model``; ``train_size`` turns on TLC (test-time local pooling
    from that training size); ``row_blocks`` runs the per-pixel flow and the kernel map's
    convolutions in the config's row blocks (``flow_chunk_pixels``,
    ``kernel_map_chunk_pixels``: whole-image inference in memory linear in the image, same
    outputs; they change no parameter, so checkpoints are shared)."""
    fields = config.model.to_dict()
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    model = UFPNet(**fields, train_size=None if train_size is None else tuple(train_size))
    if row_blocks:
        model = model.clone(flow_chunk_pixels=config.flow_chunk_pixels,
                            kernel_map_chunk_pixels=config.kernel_map_chunk_pixels)
    return model


def init_variables(model: UFPNet, seed: int, flow_variables: dict) -> dict:
    """Random backbone and KE-Net, the pretrained flow in place of a random one.

    Shapes come from ``jax.eval_shape`` (tracing only). Values are drawn with numpy:
    convolution kernels ``N(0, 1/fan_in)`` (LeCun normal, flax's default), biases and the
    layer scales ``beta``/``gamma`` zero, LayerNorm scales one, the ``ending`` conv zero (the
    model's own initialisers). Measured on the 2-core development CPU, ``model.init`` under
    ``jit`` took 50-150 s to compile for the smallest test model (threefry random bits for
    every parameter); this takes milliseconds.

    Args:
        model: the UFPNet.
        seed: numpy seed.
        flow_variables: ``{"params", "batch_stats"}`` of the pretrained flow.

    Returns:
        ``{"params": {..., "flow"}, "batch_stats": {"flow"}}``.
    """
    mult = 2 ** len(model.enc_blk_nums)
    x = jnp.zeros((1, mult, mult, model.img_channel))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x,
                                               method=UFPNet.init_trainable))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        names = [getattr(p, "key", str(p)) for p in path]
        if names[-1] == "kernel" and names[0] != "ending":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0.0, 1.0 / np.sqrt(fan_in), leaf.shape), jnp.float32)
        fill = 1.0 if names[-1] == "scale" else 0.0
        return jnp.full(leaf.shape, fill, jnp.float32)

    params = dict(jax.tree_util.tree_map_with_path(draw, shapes))
    params["flow"] = flow_variables["params"]
    return {"params": params, "batch_stats": {"flow": flow_variables["batch_stats"]}}


def ke_variables(ke_params, flow_variables) -> dict:
    """The variables `UFPNet.estimate_kernels` needs: KE-Net + frozen flow."""
    return {"params": {"kernel_extra": ke_params, "flow": flow_variables["params"]},
            "batch_stats": {"flow": flow_variables["batch_stats"]}}


def pad_kernel_field(field: jax.Array, size: int) -> jax.Array:
    """Zero-pads (..., k, k) kernels to (..., size, size), centred (k <= size, both odd)."""
    k = field.shape[-1]
    if k > size:
        raise ValueError(f"ground-truth kernels of size {k} exceed the estimated {size}")
    p = (size - k) // 2
    return jnp.pad(field, [(0, 0)] * (field.ndim - 2) + [(p, p), (p, p)])


# --- stage II ---------------------------------------------------------------------------------

class KETrainState(NamedTuple):
    step: jax.Array
    ke_params: Any
    opt_state: Any


def make_ke_optimizer(stage2) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(stage2.grad_clip),
                       optax.adamw(stage2.learning_rate, b1=stage2.b1, b2=stage2.b2,
                                   weight_decay=stage2.weight_decay))


def ke_loss(model: UFPNet, ke_params, flow_variables, batch, key, kl_weight: float):
    """``L_KE + kl_weight · KL``; returns (loss, metrics)."""
    kernel_field, code, sigma = model.apply(
        ke_variables(ke_params, jax.lax.stop_gradient(flow_variables)), batch["blurry"],
        key=key, method=UFPNet.estimate_kernels)
    l_ke = losses.kernel_estimation_l1(batch["sharp"], kernel_field, batch["blurry"])
    kl = losses.code_kl(code, sigma)
    metrics = {"l_ke": l_ke, "kl": kl, "sigma": jnp.mean(sigma),
               "reblur_psnr": losses.reblur_psnr(batch["sharp"], kernel_field,
                                                 batch["blurry"])}
    return l_ke + kl_weight * kl, metrics


def make_ke_train_step(model: UFPNet, optimizer, stage2, root_key, mesh):
    """A jitted data-parallel step: state replicated, batch split over ``data``, donated."""
    repl = mesh_lib.replicated_sharding(mesh)

    def step_fn(state: KETrainState, flow_variables, batch):
        key = jax.random.fold_in(root_key, state.step)
        grad_fn = jax.grad(functools.partial(ke_loss, model, kl_weight=stage2.kl_weight),
                           has_aux=True)
        grads, metrics = grad_fn(state.ke_params, flow_variables, batch, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.ke_params)
        params = optax.apply_updates(state.ke_params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return KETrainState(state.step + 1, params, opt_state), metrics

    return jax.jit(step_fn, out_shardings=(repl, repl), donate_argnums=(0,))


def make_ke_eval_fn(model: UFPNet):
    """A jitted ``(ke_params, flow_variables, batch, key) -> metrics`` for one eval batch."""
    @jax.jit
    def one(ke_params, flow_variables, batch, key):
        kernel_field, _, _ = model.apply(ke_variables(ke_params, flow_variables),
                                         batch["blurry"], key=key,
                                         method=UFPNet.estimate_kernels)
        out = {"eval_reblur_psnr": losses.reblur_psnr(batch["sharp"], kernel_field,
                                                      batch["blurry"])}
        if "kernel_field" in batch:
            truth = pad_kernel_field(batch["kernel_field"], kernel_field.shape[-1])
            out["eval_kernel_l1"] = jnp.mean(jnp.sum(jnp.abs(kernel_field - truth), (-2, -1)))
        return out

    return one


def evaluate_kernel_estimator(eval_fn, ke_params, flow_variables, batches, seed: int) -> dict:
    """Held-out reblur PSNR and, with ground truth, the mean per-pixel kernel L1 error."""
    results = [eval_fn(ke_params, flow_variables,
                       {k: jnp.asarray(v) for k, v in b.items()
                        if k in ("blurry", "sharp", "kernel_field")},
                       jax.random.fold_in(jax.random.key(seed), i))
               for i, b in enumerate(batches)]
    return {k: float(np.mean([r[k] for r in results])) for k in results[0]}


def train_kernel_estimator(config, workdir, *, mesh, flow_variables, data: Data) -> Any:
    """Runs (or resumes) stage II; returns the trained KE-Net parameters."""
    workdir = pathlib.Path(workdir)
    stage2 = config.stage2
    mesh_lib.check_global_batch(config.batch_size, mesh)
    model = make_model(config)
    train_key = jax.random.fold_in(jax.random.key(config.seed), 2)
    variables = init_variables(model, config.seed, flow_variables)
    ke_params = variables["params"]["kernel_extra"]
    optimizer = make_ke_optimizer(stage2)
    state = KETrainState(jnp.asarray(0, jnp.int32), ke_params, optimizer.init(ke_params))

    it = data.train_iterator()
    state, start, ckpt, writer = loop_lib.resume(
        state, workdir, model_config=config.model, iterator=it,
        max_to_keep=config.max_checkpoints, async_save=config.async_checkpoint)
    state = mesh_lib.replicate(state, mesh)
    flow_variables = mesh_lib.replicate(flow_variables, mesh)
    step_fn = make_ke_train_step(model, optimizer, stage2, train_key, mesh)
    eval_set = data.eval_batches(with_kernel_field=True)
    eval_fn = make_ke_eval_fn(model)

    def evaluate(step, state):
        if not eval_set:
            return {}
        metrics = evaluate_kernel_estimator(eval_fn, state.ke_params, flow_variables,
                                            eval_set, config.seed + 1)
        writer.write(step, metrics)
        print(f"stage II step {step}: {logging_lib.format_metrics(metrics)}", flush=True)
        return metrics

    if start == 0:
        evaluate(0, state)
    state = loop_lib.train_loop(
        state, lambda state, batch: step_fn(state, flow_variables, batch),
        start=start, num_steps=stage2.num_steps, checkpoints=ckpt, writer=writer,
        log_every=stage2.log_every, eval_every=stage2.eval_every,
        checkpoint_every=stage2.checkpoint_every, next_batch=next_train_batch(it, mesh),
        data_state=it.get_state, evaluate=evaluate, sync_checkpoints=True, name="stage II")
    ke_params = jax.device_get(state.ke_params)
    if mesh_lib.is_primary():
        np.savez(workdir / "kernel_estimator.npz",
                 **convert.flatten_variables({"kernel_extra": ke_params}))
    return ke_params


def train_and_evaluate(config, workdir, *, data: Data, mesh=None) -> Any:
    """Stage II alone into ``workdir`` with the flow ``config.flow_checkpoint``; returns the
    KE-Net parameters.

    Args:
      config: a UFPNet config (`jaxdeblur.configs`, ``ufpnet_tiny`` / ``ufpnet_gopro``).
      workdir: the run directory (created; resumed when it holds checkpoints).
      data: the training and held-out batches.
      mesh: the ``data`` mesh (default: every device).
    """
    return train_kernel_estimator(config, workdir, mesh=mesh or mesh_lib.make_mesh(),
                                  flow_variables=load_flow_variables(config), data=data)
