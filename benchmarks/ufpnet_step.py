"""UFPNet: training-step time and memory at 256² crops, inference at 720p with TLC.

    python benchmarks/ufpnet_step.py                          # tiny and official, CPU-sized
    python benchmarks/ufpnet_step.py --configs official --batch 8 --repeats 5   # accelerator

For each configuration it reports:
* stage-III training step (PSNR loss + 0.01 reblur L1, AdamW, KE-Net and flow frozen) on a
  batch of ``--crop``² crops: compile time, mean step time over ``--repeats`` runs after a
  warm-up, and XLA's compiled memory analysis (arguments + outputs + temporaries - aliased,
  i.e. the peak the executable needs; parameters and optimiser state included);
* inference (kernels + restored) on one ``--inference`` image with TLC windows from a 256²
  training size: compile time, step time (skipped with ``--no-run-inference`` when the CPU
  would take minutes) and compiled memory.

Reference (official PyTorch, paper / SPEC): 80.34 M parameters; the official per-pixel blur
materialises C·B·H·W·k² values (1.3 GB for one 720p 361-channel map), which ours avoids.
Random weights; the figures do not depend on their values.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdeblur import configs
from jaxdeblur.train import kernel_estimator as ke_lib
from jaxdeblur.train import ufpnet as train_lib

CONFIGS = {
    "tiny": "ufpnet_tiny",
    "official": "ufpnet_gopro",
}


def _config(name):
    return configs.load(CONFIGS[name])


def _memory(compiled) -> float:
    """Peak bytes the executable needs (GiB), from XLA's memory analysis."""
    m = compiled.memory_analysis()
    if m is None:
        return float("nan")
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    return total / 2**30


def _time(fn, *args, repeats: int):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    return float(np.mean(times)), float(np.std(times))


def bench(name: str, args) -> list[dict]:
    config = _config(name)
    config.flow_checkpoint = args.flow
    rows = []
    model = ke_lib.make_model(config)
    flow_variables = ke_lib.load_flow_variables(config)
    variables = ke_lib.init_variables(model, 0, flow_variables)
    n_params = sum(x.size for x in jax.tree.leaves(variables["params"]))
    optimizer = train_lib.make_optimizer(config.stage3)
    state = train_lib.init_state(config, model, flow_variables,
                                 variables["params"]["kernel_extra"], optimizer)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    step = train_lib.make_train_step(model, optimizer, config.stage3, jax.random.key(1), mesh)
    rng = np.random.default_rng(0)
    batch = {k: jnp.asarray(rng.random((args.batch, args.crop, args.crop, 3), np.float32))
             for k in ("blurry", "sharp")}
    t = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    mem = _memory(compiled)
    step_s = float("nan")
    if args.repeats > 0:
        # The step donates its state: keep a fresh copy for every call.
        times = []
        for _ in range(args.repeats + 1):
            fresh = jax.tree.map(jnp.copy, state)
            t = time.perf_counter()
            jax.block_until_ready(compiled(fresh, batch))
            times.append(time.perf_counter() - t)
        step_s = float(np.mean(times[1:]))
    rows.append({"config": name, "what": f"train step B={args.batch} {args.crop}²",
                 "params_M": n_params / 1e6, "compile_s": compile_s, "time_s": step_s,
                 "mem_GiB": mem})

    h, w = args.inference
    eval_model = ke_lib.make_model(config, train_size=(256, 256))
    infer = jax.jit(lambda v, x, key: eval_model.apply(v, x, key=key))
    x = jnp.asarray(rng.random((1, h, w, 3), np.float32))
    full = {"params": state.params, "batch_stats": state.batch_stats}
    t = time.perf_counter()
    compiled = infer.lower(full, x, jax.random.key(2)).compile()
    compile_s = time.perf_counter() - t
    mem = _memory(compiled)
    infer_s = float("nan")
    if args.run_inference:
        infer_s = _time(compiled, full, x, jax.random.key(2), repeats=max(args.repeats, 1))[0]
    rows.append({"config": name, "what": f"inference {h}x{w} TLC(256)",
                 "params_M": n_params / 1e6, "compile_s": compile_s, "time_s": infer_s,
                 "mem_GiB": mem})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,official")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--inference", type=int, nargs=2, default=(720, 1280))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--run-inference", action=argparse.BooleanOptionalAction,
                        default=True)
    parser.add_argument("--flow", default="ours",
                        help="flow checkpoint: 'ours' or a path (e.g. flow_motion.npz)")
    args = parser.parse_args()
    print(f"backend: {jax.default_backend()}, devices: {jax.devices()}")
    rows = []
    for name in args.configs.split(","):
        rows += bench(name, args)
    header = f"{'config':9s} {'what':28s} {'params (M)':>10s} {'compile (s)':>11s} " \
             f"{'time (s)':>9s} {'memory (GiB)':>12s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['config']:9s} {r['what']:28s} {r['params_M']:10.3f} {r['compile_s']:11.1f} "
              f"{r['time_s']:9.3f} {r['mem_GiB']:12.3f}")
    print("reference: official UFPNet 80.34 M parameters (incl. the unused kernel_down.3, "
          "0.52 M); official per-pixel blur of one 720p image materialises 1.3 GB.")


if __name__ == "__main__":
    main()
