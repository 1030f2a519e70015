"""Trains the UFPNet / FKP motion-kernel flow prior on freshly synthesized kernels.

Every step draws ``batch_size`` new kernels from the config's generator
(`jaxdeblur.kernels.kernel_sampler`: ``motion_kernel`` by default, or a generator
calibrated to measured shake) inside the jitted step (the key is ``fold_in(root, step)``, so a resumed run sees exactly the
kernels an uninterrupted one would), dequantises them, maps them to logit space and takes
one Adam step on the mean negative log-likelihood (train-mode batch-norm, running
statistics updated). `train_and_evaluate` (``train_scripts/flow_prior.py``) writes to its
work dir:

* ``metrics.jsonl``: ``train_nll`` / ``lr`` every ``log_every`` steps, ``eval_nll`` (mean
  NLL in nats per kernel, eval mode, fixed held-out kernels) every ``eval_every`` steps;
* ``checkpoints/``: orbax checkpoints every ``checkpoint_every`` steps and on exit
  (Ctrl-C / SIGTERM included); rerunning the same command resumes;
* ``samples/step_<n>.png``: a grid of prior samples at every evaluation;
* ``flow_prior.npz`` / ``.json``: the latest evaluated variables in the format of
  `jaxdeblur.flow.load_flow` (copy them to ``jaxdeblur/assets/`` to ship them).
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.figure import Figure

from jaxdeblur import flow as flow_lib
from jaxdeblur import kernels as kernels_lib
from jaxdeblur.train import loop as loop_lib


class TrainState(NamedTuple):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def learning_rate_schedule(config) -> optax.Schedule:
    """Constant lr, multiplied by ``lr_decay_factor`` at epochs first, first+every, ..."""
    boundaries = {}
    epoch = config.lr_decay_first_epoch
    while epoch * config.steps_per_epoch < config.num_steps:
        boundaries[epoch * config.steps_per_epoch] = config.lr_decay_factor
        epoch += config.lr_decay_every_epochs
    return optax.piecewise_constant_schedule(config.learning_rate, boundaries)


def make_optimizer(config) -> optax.GradientTransformation:
    """torch.optim.Adam(lr, weight_decay): L2 added to the gradient before Adam's moments."""
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.scale_by_adam(b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps),
        optax.scale_by_learning_rate(learning_rate_schedule(config)),
    )


def synthesize_kernels(key: jax.Array, n: int, config) -> jax.Array:
    """``n`` kernels (n, k, k) from the config's generator (`kernels.kernel_sampler`)."""
    draw = kernels_lib.kernel_sampler(config.generator, config.kernels, config.model.kernel_size)
    return jax.vmap(draw)(jax.random.split(key, n))


def to_flow_space(module: flow_lib.KernelFlow, kernels: jax.Array, *, key: jax.Array,
                  scale: float) -> jax.Array:
    """Dequantise with ``U(0, 1) * scale`` and apply the logit pre-processing."""
    noisy = flow_lib.dequantize(kernels, key=key, scale=scale)
    return module.apply({}, noisy, method=flow_lib.KernelFlow.preprocess)


def make_train_step(module, optimizer, config, root_key):
    def train_step(state: TrainState):
        step_key = jax.random.fold_in(root_key, state.step)
        kernel_key, noise_key = jax.random.split(step_key)
        kernels = synthesize_kernels(kernel_key, config.batch_size, config)
        x = to_flow_space(module, kernels, key=noise_key, scale=config.dequantization_scale)

        def loss_fn(params):
            log_prob, updates = module.apply(
                {"params": params, "batch_stats": state.batch_stats}, x, True,
                method=flow_lib.KernelFlow.flow_log_prob, mutable=["batch_stats"])
            return -jnp.mean(log_prob), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, batch_stats, opt_state), loss

    return jax.jit(train_step, donate_argnums=0)


def held_out_set(module, config) -> jax.Array:
    """The fixed evaluation set in flow space (same kernels and noise on every run)."""
    kernel_key, noise_key = jax.random.split(jax.random.key(config.eval_seed))
    kernels = jax.jit(lambda key: synthesize_kernels(key, config.num_eval_kernels, config))(
        kernel_key)
    return to_flow_space(module, kernels, key=noise_key, scale=config.dequantization_scale)


def mean_nll(module, variables, x_eval: jax.Array) -> float:
    """Eval-mode mean negative log-likelihood (nats per kernel) of flow-space vectors."""
    log_prob = jax.jit(functools.partial(module.apply, method=flow_lib.KernelFlow.flow_log_prob))
    return float(-jnp.mean(log_prob(variables, x_eval)))


def plot_kernels(kernels: np.ndarray, path: pathlib.Path, title: str = "") -> None:
    """A square mosaic of kernels (n, k, k), each scaled to its own maximum, as a PNG."""
    n, k = len(kernels), kernels.shape[-1]
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    canvas = np.ones((rows * (k + 1) - 1, cols * (k + 1) - 1))
    for i, kernel in enumerate(kernels):
        r, c = divmod(i, cols)
        canvas[r * (k + 1):r * (k + 1) + k, c * (k + 1):c * (k + 1) + k] = (
            kernel / max(float(kernel.max()), 1e-8))
    # A Figure of its own, not pyplot: no global backend or figure registry to touch.
    fig = Figure(figsize=(6, 6.4))
    ax = fig.add_subplot()
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")


def train_and_evaluate(config, workdir) -> dict:
    """Runs (or resumes) training; returns the last evaluation metrics.

    Args:
      config: a flow-prior config (`jaxdeblur.configs`, ``flow_prior``).
      workdir: the run directory (created; resumed when it holds checkpoints).
    """
    workdir = pathlib.Path(workdir)
    module = flow_lib.KernelFlow(**config.model.to_dict())
    root_key = jax.random.key(config.seed)
    init_key, train_key = jax.random.split(root_key)
    size = config.model.kernel_size
    variables = module.init(init_key, jnp.full((2, size, size), 1.0 / size**2))
    optimizer = make_optimizer(config)
    state = TrainState(jnp.asarray(0, jnp.int32), variables["params"],
                       variables["batch_stats"], optimizer.init(variables["params"]))

    state, start, ckpt, writer = loop_lib.resume(state, workdir, model_config=config.model,
                                                 max_to_keep=config.max_checkpoints)

    train_step = make_train_step(module, optimizer, config, train_key)
    x_eval = held_out_set(module, config)
    sample = jax.jit(lambda v, key: module.apply(v, key, config.num_sample_kernels,
                                                 method=flow_lib.KernelFlow.sample))
    schedule = learning_rate_schedule(config)

    evaluations: list[dict] = []

    def evaluate(step: int, state: TrainState) -> None:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        metrics = {"eval_nll": mean_nll(module, variables, x_eval)}
        samples = np.asarray(sample(variables, jax.random.key(config.sample_seed)))
        plot_kernels(samples, workdir / "samples" / f"step_{step:07d}.png",
                     f"step {step}, held-out NLL {metrics['eval_nll']:.1f}")
        writer.write(step, metrics)
        flow_lib.save_flow(workdir / "flow_prior", module, variables, step=step,
                           eval_nll=metrics["eval_nll"],
                           num_eval_kernels=config.num_eval_kernels,
                           eval_seed=config.eval_seed)
        evaluations.append(metrics)

    loop_lib.train_loop(
        state, train_step, start=start, num_steps=config.num_steps, checkpoints=ckpt,
        writer=writer, log_every=config.log_every, eval_every=config.eval_every,
        checkpoint_every=config.checkpoint_every,
        on_log=lambda step, loss: {"train_nll": loss, "lr": schedule(step - 1)},
        evaluate=evaluate, name="flow prior")
    return evaluations[-1] if evaluations else {}
