"""MCEM speed and memory on the current backend: E-step as lax.scan vs unrolled, by chunk.

For a chain of ``--steps`` Langevin steps on a ``--size``² RGB image with the configured
networks (default: the paper's 5x64 image net, [32, 32, 64, 64] kernel net, 31x31 kernels on
a 6x8 filter-flow grid), each chunk length c runs ``steps / c`` jitted calls of c steps,
either as a ``lax.scan`` (c = steps: the whole chain as one scan) or traced one after
another (``unroll=True``, chunks up to 5: compile time grows with c). Also timed: one
M-step (Adam on the kernel net), and the seconds per EM iteration that the config's
(e_step_steps, m_step_steps) imply. Memory: XLA's compiled memory analysis of each chunk
(arguments + outputs + temporaries) and the process's peak RSS.

    python benchmarks/mcem.py                       # 256², 25 steps, chunks 1,5,25
    python benchmarks/mcem.py --size 128 --steps 10 --chunks 1,10
    python benchmarks/mcem.py --recovery uniform --size 128 --iterations 600
    python benchmarks/mcem.py --recovery field --size 256 --iterations 300
    python benchmarks/mcem.py --recovery uniform --size 128 --iterations 900 --known-kernel
    python benchmarks/mcem.py --recovery uniform --size 128 --iterations 1500 \
        --set refine_iterations=1200   # + the cold refinement phase (configs/mcem.py)

``--recovery uniform`` blurs a camera crop with a known 15x15 line kernel (length 11 px, 34
degrees; uniform model, 1x1 grid, for every iteration) and prints the aligned PSNR
before/after, the kernel's cosine similarity to the truth after centring, and the CPU time;
``--recovery field`` does the same with a `kernels.kernel_field` blur and the filter-flow
model. ``--known-kernel`` runs the same with the true kernel(s) given (non-blind mode,
``mcem.deblur(known_kernels=...)``): the image the sampler reaches when the kernel is exact,
the ceiling of the blind run.

Reference (paper, Li et al. 2023): 226 s and 1.27 GB for a 256² image, 31x31 kernel, on an
RTX 3090 (whole run; iteration counts not published).
"""

import argparse
import functools
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxdeblur import configs, mcem, metrics  # noqa: E402


def load_config(name_or_path):
    return configs.load(name_or_path)


def compiled_bytes(compiled):
    m = compiled.memory_analysis()
    if m is None:
        return float("nan")
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)


def aligned_psnr(x, ref, max_shift=3):
    """PSNR of (H, W) images after the best integer shift within +-max_shift (border cropped)."""
    return float(metrics.shift_searched_psnr(jnp.asarray(x)[..., None], jnp.asarray(ref)[..., None],
                                             crop=max_shift, max_shift=max_shift, step=1.0))


def recovery(args, config):
    import numpy as np
    import skimage.data
    import skimage.transform
    from jaxdeblur import blur, kernels
    size = args.size
    sharp = skimage.transform.resize(skimage.data.camera(), (2 * size, 2 * size),
                                     anti_aliasing=True)[size // 2:size // 2 + size,
                                                         size // 2:size // 2 + size]
    sharp = jnp.asarray(sharp, jnp.float32)[..., None]
    noise = 0.01 * jax.random.normal(jax.random.key(4), sharp.shape)
    if args.recovery == "uniform":
        # 96 points from -5.5 to 5.5 px: the kernel the recovery table was measured with.
        true = np.asarray(kernels.line_kernel(15, 11, np.deg2rad(34.0), samples=96))
        # A larger model kernel (e.g. 19, the flow prior's) sees the same blur, zero-padded.
        true = np.pad(true, (args.kernel_size - 15) // 2)
        blurry = blur.conv(sharp, jnp.asarray(true), boundary="replicate")
        config.kernel_size = args.kernel_size
        config.grid = (1, 1)
        config.warmup_iterations = args.iterations
    else:
        field = kernels.kernel_field(jax.random.key(1), sharp.shape, 15)
        blurry = blur.per_pixel_blur(sharp, field)
        config.kernel_size = 15
        config.warmup_iterations = args.iterations // 4
    blurry = jnp.clip(blurry + noise, 0.0, 1.0)
    config.em_iterations = args.iterations
    config.log_every = max(1, mcem.total_iterations(config) // 20)
    t0 = time.perf_counter()
    c0 = time.process_time()

    def callback(it, state, fit):
        print(f"  iteration {it}: data fit {float(fit[0]):.3e} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

    def level_callback(level, levels, it, iterations):
        if it % config.log_every == 0 or it == iterations:
            print(f"  level {level + 1}/{levels} (scale {config.levels[level][0]}): "
                  f"iteration {it}/{iterations} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)

    known = true if args.known_kernel else None
    result = mcem.deblur(blurry, config, key=jax.random.key(config.seed), callback=callback,
                         known_kernels=known, level_callback=level_callback)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    sharp_np, blurry_np = np.asarray(sharp)[..., 0], np.asarray(blurry)[..., 0]
    refine = config.refine_iterations
    phases = f" + {refine} refinement (temperature {config.refine_temperature})" if refine else ""
    levels = (f", after coarse levels (scale, iterations) {tuple(config.levels)}"
              if config.levels else "")
    print(f"\nrecovery {args.recovery} {size}x{size}, {args.iterations} EM iterations{phases}, "
          f"kernel {config.kernel_size}, grid {result.grid}{levels}")
    print(f"aligned PSNR blurry   {aligned_psnr(blurry_np, sharp_np):.2f} dB")
    print(f"aligned PSNR restored {aligned_psnr(result.image[..., 0], sharp_np):.2f} dB")
    if args.recovery == "uniform":
        print(f"kernel cosine similarity after centring: "
              f"{metrics.kernel_cosine_similarity(result.kernels[0], true):.3f} (flat kernel: "
              f"{metrics.kernel_cosine_similarity(np.full_like(true, 1 / true.size), true):.3f})")
    print(f"wall {wall:.0f} s, process CPU {cpu:.0f} s, mean posterior std "
          f"{float(result.uncertainty.mean()):.4f}")
    if args.figures:
        figures(args.figures, sharp_np, blurry_np, result, true if args.recovery == "uniform"
                else None)


def figures(folder, sharp, blurry, result, true_kernel):
    """Before/after panels, the estimated (and true) kernel, the posterior std, as PNGs."""
    import pathlib

    import numpy as np
    from jaxdeblur import io, viz
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    restored = np.clip(result.image[..., 0], 0.0, 1.0)
    viz.comparison_figure(
        [blurry, restored, sharp],
        [f"blurry {aligned_psnr(blurry, sharp):.2f} dB",
         f"Deep EM {aligned_psnr(restored, sharp):.2f} dB", "sharp"],
        folder / "recovery_compare.png")
    shown = [result.kernels[0]] + ([true_kernel] if true_kernel is not None else [])
    gap = np.ones((shown[0].shape[0], 1))
    row = np.concatenate(sum(([k / k.max(), gap] for k in shown), [])[:-1], axis=1)
    io.write_image(folder / "recovery_kernels.png", np.kron(row, np.ones((12, 12))))
    viz.uncertainty_figure(restored, result.uncertainty[..., 0],
                           folder / "recovery_uncertainty.png", title="posterior std")
    print(f"figures in {folder}: recovery_compare.png, recovery_kernels.png (estimated"
          f"{' | true' if true_kernel is not None else ''}), recovery_uncertainty.png")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mcem",
                        help="a shipped config name or a get_config() file")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--chunks", default="1,5,25")
    parser.add_argument("--recovery", choices=("uniform", "field"), default=None)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--kernel-size", type=int, default=15,
                        help="with --recovery uniform: the model's kernel size (odd, >= 15; "
                        "19 for --set kernel_prior_weight=...)")
    parser.add_argument("--known-kernel", action="store_true",
                        help="with --recovery uniform: non-blind run with the true kernel")
    parser.add_argument("--figures", default=None, metavar="DIR",
                        help="with --recovery: write before/after, kernel and std PNGs here")
    parser.add_argument("--set", action="append", default=[],
                        help="config override NAME=PYTHON_VALUE, e.g. image_net.features=(32,)*4")
    args = parser.parse_args()
    config = load_config(args.config)
    for item in args.set:
        name, value = item.split("=", 1)
        target = config
        *path, leaf = name.split(".")
        for part in path:
            target = target[part]
        target[leaf] = value if isinstance(target[leaf], str) else eval(value)  # noqa: S307
    if args.known_kernel and args.recovery != "uniform":
        parser.error("--known-kernel needs --recovery uniform (a kernel_field has a kernel per "
                     "pixel, not one per filter-flow cell)")
    if args.kernel_size < 15 or args.kernel_size % 2 == 0:
        parser.error(f"--kernel-size must be odd and >= 15 (the 15x15 blur), got "
                     f"{args.kernel_size}")
    if args.recovery:
        return recovery(args, config)
    chunks = [int(c) for c in args.chunks.split(",")]
    if any(args.steps % c for c in chunks):
        parser.error(f"every chunk must divide --steps={args.steps}")

    blurry = jax.random.uniform(jax.random.key(0), (args.size, args.size, 3))
    model = mcem.build_model(blurry.shape, config)
    state = mcem.init_state(model, key=jax.random.key(1))
    rows = []
    variants = [(c, False) for c in chunks] + [(c, True) for c in chunks if c <= 5]
    for chunk, unroll in variants:
        fn = jax.jit(functools.partial(mcem.e_step, model, length=chunk, uniform=False,
                                       unroll=unroll))
        t0 = time.perf_counter()
        compiled = fn.lower(state, blurry).compile()
        compile_s = time.perf_counter() - t0
        s = compiled(state, blurry)  # warm-up call
        jax.block_until_ready(s)
        t0 = time.perf_counter()
        s = state
        for _ in range(args.steps // chunk):
            s = compiled(s, blurry)
        jax.block_until_ready(s)
        per_step = (time.perf_counter() - t0) / args.steps
        form = "unrolled" if unroll else "lax.scan"
        rows.append((f"E-step {form}, {chunk}/call", per_step, compile_s,
                     compiled_bytes(compiled)))
        print(f"{form} chunk {chunk}: {per_step:.3f} s/step", flush=True)

    m_fn = jax.jit(functools.partial(mcem.m_step, model, length=1, uniform=False))
    compiled = m_fn.lower(state, blurry).compile()
    jax.block_until_ready(compiled(state, blurry))
    t0 = time.perf_counter()
    s = state
    for _ in range(3):
        s = compiled(s, blurry)
    jax.block_until_ready(s)
    m_step = (time.perf_counter() - t0) / 3
    rows.append(("M-step (1 Adam step)", m_step, float("nan"), compiled_bytes(compiled)))

    best = min(r[1] for r in rows[:-1])
    per_iteration = config.e_step_steps * best + config.m_step_steps * m_step
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nbackend {jax.default_backend()}, {args.size}x{args.size}x3, kernel "
          f"{config.kernel_size}, grid {tuple(config.grid)}, image net "
          f"{tuple(config.image_net.features)}, kernel net {tuple(config.kernel_net.features)}")
    print(f"{'variant':<30}{'s/step':>10}{'vs best':>9}{'compile s':>11}{'compiled MB':>13}")
    for name, sec, comp, nbytes in rows:
        print(f"{name:<30}{sec:>10.3f}{sec / best:>9.2f}{comp:>11.1f}{nbytes / 2**20:>13.1f}")
    print(f"\nseconds per EM iteration ({config.e_step_steps} E + {config.m_step_steps} M "
          f"steps, best chunk): {per_iteration:.2f}")
    print(f"x {config.em_iterations} iterations + final E-step: "
          f"{(config.em_iterations + 1) * per_iteration / 60:.1f} min")
    print(f"peak RSS: {rss:.0f} MB")
    print("reference (paper, RTX 3090): 226 s, 1.27 GB for a 256² image, 31x31 kernel")


if __name__ == "__main__":
    main()
