"""MCEM speed and memory on the current backend: E-step as one scan vs a host loop of chunks.

For a chain of ``--steps`` Langevin steps on a ``--size``² RGB image with the configured
networks (default: the paper's 5x64 image net, [32, 32, 64, 64] kernel net, 31x31 kernels on
a 6x8 filter-flow grid), each chunk length c runs ``steps / c`` jitted calls of a
``lax.scan`` of c steps (c = 1 is a host loop of a jitted single step, c = steps is the
whole chain as one scan). Also timed: one M-step (Adam on the kernel net), and the seconds
per EM iteration that the config's (e_step_steps, m_step_steps) imply. Memory: XLA's
compiled memory analysis of each chunk (arguments + outputs + temporaries) and the
process's peak RSS.

    python benchmarks/mcem.py                       # 256², 25 steps, chunks 1,5,25
    python benchmarks/mcem.py --size 128 --steps 10 --chunks 1,10

Reference (paper, Li et al. 2023): 226 s and 1.27 GB for a 256² image, 31x31 kernel, on an
RTX 3090 (whole run; iteration counts not published).
"""

import argparse
import functools
import importlib.util
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxdeblur import mcem  # noqa: E402


def load_config(path):
    spec = importlib.util.spec_from_file_location("mcem_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def compiled_bytes(compiled):
    m = compiled.memory_analysis()
    if m is None:
        return float("nan")
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_scripts",
        "configs", "mcem.py"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--chunks", default="1,5,25")
    args = parser.parse_args()
    config = load_config(args.config)
    chunks = [int(c) for c in args.chunks.split(",")]
    if any(args.steps % c for c in chunks):
        parser.error(f"every chunk must divide --steps={args.steps}")

    blurry = jax.random.uniform(jax.random.key(0), (args.size, args.size, 3))
    model = mcem.build_model(blurry.shape, config)
    state = mcem.init_state(model, key=jax.random.key(1))
    rows = []
    for chunk in chunks:
        fn = jax.jit(functools.partial(mcem.e_step, model, length=chunk, uniform=False))
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
        rows.append((f"E-step chunk {chunk}" + (" (one scan)" if chunk == args.steps else
                                                " (host loop)" if chunk == 1 else ""),
                     per_step, compile_s, compiled_bytes(compiled)))
        print(f"chunk {chunk}: {per_step:.3f} s/step", flush=True)

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
