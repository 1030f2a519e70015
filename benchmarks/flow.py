"""Throughput of the kernel flow prior: jaxdeblur (jit) vs the official PyTorch KernelPrior.

Measures kernels per second through ``latent_to_kernel`` (latent -> kernel, eval mode, the
direction UFPNet uses for every pixel) and ``log_prob`` (kernel -> log-density, eval mode)
at one batch size, on the CPU, with the official pretrained weights loaded into both. The
PyTorch side is the official architecture (``Flow_arch.KernelPrior``) as rebuilt from its
formulas (shared/fixtures/README.md) in ``benchmarks/torch_ufpnet.py`` and loaded strictly
with the same state dict. The first call of each function (JAX compilation, PyTorch warm-up)
is excluded.

Usage::

  python benchmarks/flow.py [--batch 65536] [--repeats 3] [--weights PATH|ours]

PATH defaults to ``../shared/fixtures/flow_motion.npz`` (the official checkpoint).

With ``--compare`` it instead compares the quality of two priors (ours, shipped in
``jaxdeblur/assets``, and the official one given by ``--weights``): the mean eval-mode
negative log-likelihood (nats per kernel, logit space, the training objective) on the
held-out kernels of ``jaxdeblur/configs/flow_prior.py`` (same kernels, same
dequantisation noise for both), the sums of their samples, and a side-by-side PNG of
samples from the same latents::

  python benchmarks/flow.py --compare [--png docs/flow_samples.png]

With ``--real DIR`` it scores both priors on measured kernels instead: every ``*.npy`` /
``*.png`` kernel of DIR (any size; a file that repeats another's kernel rotated or flipped
is skipped) is fitted into the 19×19 window by `jaxdeblur.kernels.fit_kernel` (the
``real_kernels`` settings of ``jaxdeblur/configs/flow_prior.py``), taken in all 8
rotations/flips (`jaxdeblur.kernels.kernel_variants`), and its NLL — computed as
``--compare`` does (dequantisation ``U(0, 1)/720``, logit space, eval mode, nats per
kernel) — is averaged over the 8 variants and over 8 dequantisation draws, the same
draws for both priors. ``--cross-family`` scores both priors on ``--n`` samples of each
kernel generator of ``benchmarks/kernel_stats.py --families`` the same way, and
``--family-prior FAMILY=PREFIX`` (repeatable) adds priors trained on one generator each to
both tables, with the shipped prior's distance to the best of them per family::

  python benchmarks/flow.py --real ../shared/data/lai/kernel_npy [--cross-family]
      [--family-prior spline=runs/flow_prior_spline/flow_prior ...]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import kernel_stats  # noqa: E402
from jaxdeblur import configs, convert, flow  # noqa: E402
from jaxdeblur import kernels as kernels_lib  # noqa: E402
from jaxdeblur.train import flow_prior as flow_training  # noqa: E402

_DEFAULT_WEIGHTS = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures"
                    / "flow_motion.npz")


def torch_kernel_prior(state_dict: dict, n_blocks: int, hidden_size: int, n_hidden: int,
                       kernel_size: int):
    """The official ``KernelPrior`` (RealNVP, FKP) in PyTorch, loaded strictly, eval mode.

    `torch_ufpnet.KernelPrior` (the flow of the PyTorch UFPNet reference); torch is imported
    here, not at module level, so the JAX-only modes run without it.
    """
    import torch
    import torch_ufpnet

    model = torch_ufpnet.KernelPrior(n_blocks, hidden_size, n_hidden, kernel_size)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
                          strict=True)
    return model.eval()


def _time(fn, repeats: int) -> float:
    fn()  # warm-up / compilation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare_priors(official_weights: str, ours: str, png: str, n_samples: int = 36) -> None:
    """Held-out NLL and samples of our prior vs the official one (see module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = configs.load("flow_prior")
    priors = {"ours": flow.load_pretrained() if ours == "ours" else flow.load_flow(ours),
              "official": flow.load_pretrained(official_weights)}
    x_eval = flow_training.held_out_set(priors["ours"][0], config)
    z = jax.random.normal(jax.random.key(config.sample_seed), (n_samples, x_eval.shape[1]))
    print(f"# held-out NLL: {config.num_eval_kernels} kernels of the config's generator "
          f"{config.generator!r} (eval_seed {config.eval_seed}), dequantised, logit space, "
          "eval mode; nats per kernel (lower is better)")
    print(f"{'prior':<10} {'mean NLL':>10} {'median':>10} {'sample sum mean +- std':>24}")
    fig, axes = plt.subplots(1, 2, figsize=(12, 6.4))
    for ax, (name, (module, variables)) in zip(axes, priors.items()):
        lp = jax.jit(lambda v, x, m=module: m.apply(v, x, method="flow_log_prob"))(
            variables, x_eval)
        samples = np.asarray(jax.jit(lambda v, z, m=module: m.apply(
            v, z, method="latent_to_kernel"))(variables, z))
        sums = samples.sum((1, 2))
        print(f"{name:<10} {float(-lp.mean()):>10.2f} {float(-jnp.median(lp)):>10.2f} "
              f"{sums.mean():>15.2f} +- {sums.std():.2f}")
        cols = int(np.ceil(np.sqrt(n_samples)))
        k = module.kernel_size
        canvas = np.ones((cols * (k + 1) - 1, cols * (k + 1) - 1))
        for i, kernel in enumerate(samples):
            r, c = divmod(i, cols)
            canvas[r * (k + 1):r * (k + 1) + k, c * (k + 1):c * (k + 1) + k] = \
                kernel / max(kernel.max(), 1e-8)
        ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{name}: held-out NLL {float(-lp.mean()):.1f}")
        ax.axis("off")
    fig.suptitle("Samples from the same latents z ~ N(0, I) (each kernel scaled to its max)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    print(f"wrote {png}")


def dequantized_nll(module, variables, kernels: np.ndarray, *, key: jax.Array, scale: float,
                    draws: int, batch: int = 4096) -> np.ndarray:
    """Eval-mode NLL (nats per kernel) of each kernel ``(N, k, k)``, averaged over ``draws``
    dequantisation draws (draw ``d`` uses ``fold_in(key, d)``), as ``--compare`` computes it
    for one draw: `jaxdeblur.train.flow_prior.to_flow_space`, then ``flow_log_prob``."""
    log_prob = jax.jit(lambda v, x: module.apply(v, x, method="flow_log_prob"))
    to_flow = jax.jit(lambda k, key: flow_training.to_flow_space(module, k, key=key,
                                                                 scale=scale))
    total = np.zeros(len(kernels))
    for draw in range(draws):
        draw_key = jax.random.fold_in(key, draw)
        for start in range(0, len(kernels), batch):
            chunk = jnp.asarray(kernels[start:start + batch], jnp.float32)
            x = to_flow(chunk, jax.random.fold_in(draw_key, start))
            total[start:start + batch] -= np.asarray(log_prob(variables, x), np.float64)
    return total / draws


def real_kernel_nll(directory: str, official_weights: str, ours: str, cross_family: bool,
                    n: int, draws: int = 8, family_priors: tuple = ()) -> None:
    """``--real`` / ``--cross-family``: see the module docstring.

    ``family_priors``: ``("family=path_prefix", ...)`` priors trained on one generator each
    (`jaxdeblur.flow.load_flow` prefixes, e.g. ``runs/flow_prior_spline/flow_prior``); they
    join both tables, and the cross-family table then gives, for each of their families,
    how far the shipped prior's NLL lies above the best of them (the "one prior for every
    family" check).
    """
    config = configs.load("flow_prior")
    priors = {"shipped": flow.load_pretrained() if ours == "ours" else flow.load_flow(ours),
              "official": flow.load_pretrained(official_weights)}
    singles = []
    for item in family_priors:
        family, sep, prefix = item.partition("=")
        if not sep or family not in kernel_stats.FAMILY_NAMES:
            raise SystemExit(f"--family-prior takes FAMILY=PREFIX with FAMILY one of "
                             f"{kernel_stats.FAMILY_NAMES}, got {item!r}")
        priors[family] = flow.load_flow(prefix)
        singles.append(family)
    size = priors["shipped"][0].kernel_size
    key = jax.random.key(config.eval_seed)
    scale = config.dequantization_scale
    settings = config.real_kernels
    real = kernel_stats.real_kernels(pathlib.Path(directory), settings.fit_size,
                                     settings.threshold, size)
    print(f"# NLL of measured kernels ({directory}), fitted by fit_kernel(fit_size="
          f"{settings.fit_size}, threshold={settings.threshold}) into {size}x{size}, mean over "
          f"the 8 rotations/flips and {draws} dequantisation draws (scale {scale:.6g}); "
          "eval mode, logit space, nats per kernel (lower is better)")
    print(f"\n| kernel | {' | '.join(f'{name} prior' for name in priors)} |")
    print("|---" * (1 + len(priors)) + "|")
    per_prior = {name: [] for name in priors}
    for name, kernel in real.items():
        variants = np.asarray(kernels_lib.kernel_variants(kernel))
        cells = []
        for prior, (module, variables) in priors.items():
            nll = dequantized_nll(module, variables, variants, key=key, scale=scale,
                                  draws=draws)
            per_prior[prior].append(nll)
            cells.append(f"{nll.mean():.1f}")
        print(f"| {name} | {' | '.join(cells)} |")
    means = [f"**{np.mean(per_prior[p]):.1f}**" for p in priors]
    print(f"| mean ({len(real)} kernels x 8 variants) | {' | '.join(means)} |")
    if not cross_family:
        return
    print(f"\n# NLL of {n} samples of each generator (seed {config.eval_seed}), "
          f"{draws} dequantisation draws, same conventions")
    extra = " | shipped vs best single-family |" if singles else " |"
    print(f"\n| generator | {' | '.join(f'{name} prior' for name in priors)}{extra}")
    print("|---" * (1 + len(priors) + bool(singles)) + "|")
    for family in kernel_stats.FAMILY_NAMES:
        samples = kernel_stats.family_samples(family, n, config.eval_seed, size)["kernel"]
        nll = {p: dequantized_nll(m, v, samples, key=key, scale=scale, draws=draws).mean()
               for p, (m, v) in priors.items()}
        cells = [f"{value:.1f}" for value in nll.values()]
        if singles and family in singles:
            best = min(nll[p] for p in singles)
            cells.append(f"{100 * (nll['shipped'] - best) / abs(best):+.1f}%")
        elif singles:
            cells.append("–")
        print(f"| {family} | {' | '.join(cells)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--weights", default=str(_DEFAULT_WEIGHTS),
                        help="official checkpoint (.npz/.pt) or 'ours'")
    parser.add_argument("--compare", action="store_true",
                        help="compare the held-out NLL and samples of two priors instead")
    parser.add_argument("--ours", default="ours",
                        help="with --compare: 'ours' (shipped) or a save_flow path prefix")
    parser.add_argument("--png", default="docs/flow_samples.png")
    parser.add_argument("--real", metavar="DIR",
                        help="NLL of both priors on the measured kernels (*.npy, *.png) in DIR")
    parser.add_argument("--cross-family", action="store_true",
                        help="with --real: also the NLL on samples of each kernel generator")
    parser.add_argument("--family-prior", action="append", default=[], metavar="FAMILY=PREFIX",
                        help="with --real: a prior trained on one generator family "
                             "(load_flow prefix); repeatable")
    parser.add_argument("--n", type=int, default=1000,
                        help="with --cross-family: samples per generator")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for both frameworks (1 gives stable figures on a "
                             "shared machine; 0 leaves both at their defaults)")
    parser.add_argument("--torch-denormals", action="store_true",
                        help="leave PyTorch's denormal handling on (slow; see the code)")
    args = parser.parse_args()
    if args.threads:
        # Read when the JAX backend starts (the first computation), not at import.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_"
                                   f"eigen={'true' if args.threads > 1 else 'false'} "
                                   f"intra_op_parallelism_threads={args.threads}")
    if args.compare:
        compare_priors(args.weights, args.ours, args.png)
        return
    if args.real:
        real_kernel_nll(args.real, args.weights, args.ours, args.cross_family, args.n,
                        family_priors=tuple(args.family_prior))
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    # XLA:CPU flushes denormals to zero; without the same mode the PyTorch flow (whose
    # near-zero kernel logits produce denormal intermediates) runs about 10x slower.
    torch.set_flush_denormal(not args.torch_denormals)
    module, variables = flow.load_pretrained(args.weights)
    state_dict = convert.flow_state_dict_from_variables(variables, alpha=module.alpha)
    reference = torch_kernel_prior(state_dict, module.n_blocks, module.hidden_size,
                                   module.n_hidden, module.kernel_size)

    z = jax.random.normal(jax.random.key(0), (args.batch, module.features))
    to_kernel = jax.jit(lambda v, z: module.apply(v, z, method="latent_to_kernel"))
    log_prob = jax.jit(lambda v, k: module.apply(v, k, method="log_prob"))
    kernels = to_kernel(variables, z).block_until_ready()
    z_t = torch.from_numpy(np.array(z))
    k_t = torch.from_numpy(np.array(kernels))

    with torch.no_grad():
        def torch_to_kernel():
            return reference.post_process(reference.inverse(z_t, log_det=True)[0])

        def torch_log_prob():
            return reference.log_prob(reference.pre_process(k_t))[0]

        diff_k = float(np.abs(torch_to_kernel().numpy()[:, 0] - np.asarray(kernels)).max())
        lp_jax = np.asarray(log_prob(variables, kernels))
        lp_torch = torch_log_prob().numpy()
        finite = np.isfinite(lp_jax) & np.isfinite(lp_torch)
        diff_lp = float(np.abs(lp_jax[finite] - lp_torch[finite]).max())

        rows = []
        for name, jax_fn, torch_fn, diff in (
                ("latent_to_kernel", lambda: to_kernel(variables, z).block_until_ready(),
                 torch_to_kernel, diff_k),
                ("log_prob", lambda: log_prob(variables, kernels).block_until_ready(),
                 torch_log_prob, diff_lp)):
            t_jax, t_torch = _time(jax_fn, args.repeats), _time(torch_fn, args.repeats)
            rows.append((name, args.batch / t_jax, args.batch / t_torch, t_torch / t_jax, diff))

    print(f"# flow prior throughput, batch {args.batch}, CPU ({os.cpu_count()} cores visible, "
          f"jax {jax.__version__} / torch {torch.__version__}, {torch.get_num_threads()} torch "
          f"threads, denormals {'kept' if args.torch_denormals else 'flushed'}), median of "
          f"{args.repeats} after warm-up, weights: {args.weights}")
    print(f"{'function':<18} {'jaxdeblur kern/s':>17} {'PyTorch kern/s':>15} {'speed-up':>9} "
          f"{'max |jax - torch|':>18}")
    for name, ours, theirs, speedup, diff in rows:
        print(f"{name:<18} {ours:>17,.0f} {theirs:>15,.0f} {speedup:>8.2f}x {diff:>18.2e}")


if __name__ == "__main__":
    main()
