"""UFPNet: training-step time and memory at 256² crops, whole-image inference with TLC.

    python benchmarks/ufpnet_step.py                          # tiny and official, CPU-sized
    python benchmarks/ufpnet_step.py --configs official --batch 8 --repeats 5   # accelerator
    python benchmarks/ufpnet_step.py --configs official --memory-only   # compile only, ~1 min

For each configuration it reports:
* stage-III training step (PSNR loss + 0.01 reblur L1, AdamW, KE-Net and flow frozen) on a
  batch of ``--crop``² crops: compile time, mean step time over ``--repeats`` runs after a
  warm-up, and XLA's compiled memory analysis (arguments + outputs + temporaries - aliased,
  i.e. the peak the executable needs; parameters and optimiser state included);
* whole-image inference (kernel field + restored image) on one ``--inference`` image with
  TLC windows from a 256² training size, the model built as the config says
  (``flow_chunk_pixels``, ``kernel_map_chunk_pixels``: the per-pixel flow and the kernel
  map's convolutions in row blocks): compile time, time (skipped with
  ``--no-run-inference`` when the CPU would take minutes) and compiled memory.

``--memory-only`` compiles whole-image inference at 720p and 1080p from abstract shapes
(no weights, nothing run, no training step), with the config's row blocks and without them
(the whole image at once, as before the blocks existed), and ends with the line
``whole-image inference GiB: 720p=X 1080p=Y`` (the config's model; one line per config).

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
SIZES = {"720p": (720, 1280), "1080p": (1080, 1920)}
TLC_TRAIN_SIZE = (256, 256)


def load_config(name: str, flow: str = "ours"):
    config = configs.load(CONFIGS[name])
    config.flow_checkpoint = flow
    return config


def compiled_gib(compiled) -> float:
    """Peak bytes the executable needs (GiB), from XLA's memory analysis."""
    m = compiled.memory_analysis()
    if m is None:
        return float("nan")
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    return total / 2**30


def mean_time(fn, *args, repeats: int) -> float:
    """Mean seconds of ``repeats`` calls after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.mean(times))


def inference_model(config, *, blocks: bool = True):
    """The evaluation UFPNet of a config (TLC from 256²), in the config's row blocks or not."""
    return ke_lib.make_model(config, train_size=TLC_TRAIN_SIZE, row_blocks=blocks)


def _infer_fn(model):
    return jax.jit(lambda v, x, key: model.apply(v, x, key=key))


def inference_memory(name: str, size: tuple[int, int], *, blocks: bool = True
                     ) -> tuple[float, float]:
    """(compiled GiB, compile seconds) of whole-image inference, from abstract shapes."""
    model = inference_model(load_config(name), blocks=blocks)
    mult = 2 ** len(model.enc_blk_nums)
    variables = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, mult, mult, 3)), key=jax.random.key(1)))
    image = jax.ShapeDtypeStruct((1,) + tuple(size) + (3,), jnp.float32)
    t = time.perf_counter()
    compiled = _infer_fn(model).lower(variables, image, jax.random.key(2)).compile()
    return compiled_gib(compiled), time.perf_counter() - t


def train_step_row(name: str, *, batch: int, crop: int, repeats: int,
                   flow: str = "ours") -> dict:
    """One stage-III training step: compile s, mean step s (nan if repeats is 0), GiB."""
    config = load_config(name, flow)
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
    data = {k: jnp.asarray(rng.random((batch, crop, crop, 3), np.float32))
            for k in ("blurry", "sharp")}
    t = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - t
    step_s = float("nan")
    if repeats > 0:
        # The step donates its state: keep a fresh copy for every call.
        times = []
        for _ in range(repeats + 1):
            fresh = jax.tree.map(jnp.copy, state)
            t = time.perf_counter()
            jax.block_until_ready(compiled(fresh, data))
            times.append(time.perf_counter() - t)
        step_s = float(np.mean(times[1:]))
    return {"config": name, "what": f"train step B={batch} {crop}²",
            "params_M": n_params / 1e6, "compile_s": compile_s, "time_s": step_s,
            "mem_GiB": compiled_gib(compiled)}


def inference_row(name: str, *, size: tuple[int, int], repeats: int, run: bool = True,
                  flow: str = "ours") -> dict:
    """Whole-image inference of one (H, W) image: compile s, mean s (nan unless run), GiB."""
    config = load_config(name, flow)
    model = inference_model(config)
    variables = ke_lib.init_variables(model, 0, ke_lib.load_flow_variables(config))
    n_params = sum(x.size for x in jax.tree.leaves(variables["params"]))
    h, w = size
    x = jnp.asarray(np.random.default_rng(0).random((1, h, w, 3), np.float32))
    t = time.perf_counter()
    compiled = _infer_fn(model).lower(variables, x, jax.random.key(2)).compile()
    compile_s = time.perf_counter() - t
    infer_s = (mean_time(compiled, variables, x, jax.random.key(2), repeats=max(repeats, 1))
               if run else float("nan"))
    return {"config": name, "what": f"inference {h}x{w} TLC(256)", "params_M": n_params / 1e6,
            "compile_s": compile_s, "time_s": infer_s, "mem_GiB": compiled_gib(compiled)}


def memory_only(names: list[str]) -> None:
    header = (f"{'config':9s} {'image':10s} {'row blocks (config)':>20s} "
              f"{'whole image at once':>20s} {'compile (s)':>11s}")
    print(header)
    print("-" * len(header))
    lines = []
    for name in names:
        figures = {}
        for label, size in SIZES.items():
            gib, compile_s = inference_memory(name, size)
            whole, _ = inference_memory(name, size, blocks=False)
            figures[label] = gib
            print(f"{name:9s} {label:10s} {gib:16.3f} GiB {whole:16.3f} GiB {compile_s:11.1f}",
                  flush=True)
        print(f"{name}: 1080p / 720p = {figures['1080p'] / figures['720p']:.2f} "
              f"for {1920 * 1080 / (1280 * 720):.2f}x the pixels")
        tag = "" if len(names) == 1 else f" [{name}]"
        lines.append(f"whole-image inference GiB{tag}: 720p={figures['720p']:.3f} "
                     f"1080p={figures['1080p']:.3f}")
    for line in lines:
        print(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,official")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--inference", type=int, nargs=2, default=(720, 1280))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--run-inference", action=argparse.BooleanOptionalAction,
                        default=True)
    parser.add_argument("--memory-only", action="store_true",
                        help="compile whole-image inference at 720p and 1080p, run nothing")
    parser.add_argument("--flow", default="ours",
                        help="flow checkpoint: 'ours' or a path (e.g. flow_motion.npz)")
    args = parser.parse_args()
    print(f"backend: {jax.default_backend()}, devices: {jax.devices()}")
    names = args.configs.split(",")
    if args.memory_only:
        memory_only(names)
        return
    rows = []
    for name in names:
        rows.append(train_step_row(name, batch=args.batch, crop=args.crop,
                                   repeats=args.repeats, flow=args.flow))
        rows.append(inference_row(name, size=tuple(args.inference), repeats=args.repeats,
                                  run=args.run_inference, flow=args.flow))
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
