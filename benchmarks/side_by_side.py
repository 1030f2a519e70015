"""jaxdeblur against the PyTorch references, step by step, in one run and one table.

    python benchmarks/side_by_side.py                    # every row, sized for a 2-core CPU
    python benchmarks/side_by_side.py --quick            # smoke test: small sizes, 1 repeat
    python benchmarks/side_by_side.py --skip-720p --rows ufpnet-tiny,mcem-e-step
    python benchmarks/side_by_side.py --crop 256 --repeats 3 --mcem-set grid=(1,1)

Each row runs the same computation on both sides, on the same machine and the same data
sizes, in this one process:

* ``ufpnet-tiny``, ``ufpnet-official`` — one UFPNet stage-III training step (forward
  through the frozen KE-Net and flow, PSNR loss + reblur L1, backward through the
  backbone, clip, AdamW) on a ``--batch`` of ``--crop``² crops. Ours:
  ``benchmarks/ufpnet_step.train_step_row`` (the jitted data-parallel step of
  ``jaxdeblur.train.ufpnet``); PyTorch: `torch_ufpnet.Stage3Step` (the official
  architecture and its algorithms: the whole-image per-pixel flow, the unfold reblur).
  The architecture is the config's (``ufpnet_tiny``: width 8 with a narrow KE-Net;
  ``ufpnet_gopro``: the official 80 M parameters).
* ``ufpnet-720p`` — whole-image inference (kernel field + restored image) of the official
  config with TLC from a 256² training size on one ``--inference`` image (default
  1280×720). Ours: the config's model in row blocks (``ufpnet_step.inference_model``);
  PyTorch: the official ``UFPNet_code_uncertainty_Local`` algorithm (`torch_ufpnet.to_local`),
  the whole image at once. ``--warmup-720p`` (default 0) and ``--repeats-720p`` (default
  1) calls: a call takes minutes on 2 cores.
* ``mcem-e-step`` — one Deep EM E-step: ``e_step_steps`` pSGLD steps of the image network
  for fixed kernels, post-burn-in images into the moments (``jaxdeblur.mcem.e_step``, in
  calls of ``e_step_chunk`` steps, traced as the config's ``loop`` resolves on this
  backend: unrolled on the CPU); PyTorch: `torch_mcem.DeepEM.e_step`, the same networks
  with our flax initial parameters, and the filter flow by ``--torch-blur`` (default
  ``auto``: the FFT, as ours on the CPU; ``loop`` = the official per-patch EFF loop).
* ``mcem-m-step`` — one M-step: ``m_step_steps`` Adam steps of the kernel network on the
  Monte Carlo Q (``jaxdeblur.mcem.m_step``; `torch_mcem.DeepEM.m_step`).

Deep EM rows use ``configs/mcem.py`` (the paper's networks: image net 5×64, kernel net
[32, 32, 64, 64], 31×31 kernels on a 6×8 grid) on a ``--mcem-size``² RGB image, with
``--mcem-set KEY=VALUE`` overrides.

Measured: the mean wall time of ``--repeats`` calls after one warm-up call (JAX:
``block_until_ready``; its compilation, ``lower().compile()``, is reported apart in the
last column and never in the time). Threads: PyTorch gets ``torch.set_num_threads
(--threads)`` (default: the cores this process may use); XLA:CPU keeps its default intra-op
pool, one thread per core, so both sides use the same cores. Denormals are flushed in
PyTorch, as XLA:CPU does (benchmarks/flow.py: the flow is ~10× slower in PyTorch
otherwise). Weights are random on both sides (the step's cost does not depend on them) and
the flow is our shipped prior in both. Progress goes to stderr, the table to stdout.

Run it on a quiet machine: with other processes on the cores, PyTorch's OpenMP threads wait
at every parallel region and its times grow 10-100× (XLA's pool suffers much less); the
script prints the load average and warns when it exceeds half the core count.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_mcem  # noqa: E402
import torch_ufpnet  # noqa: E402
import ufpnet_step  # noqa: E402
from jaxdeblur import configs, convert, flow, mcem  # noqa: E402
from jaxdeblur.train import kernel_estimator as ke_lib  # noqa: E402

# Load average per core above which the PyTorch column is not trusted (a warning).
BUSY_LOAD = 0.5
ROWS = ("ufpnet-tiny", "ufpnet-official", "ufpnet-720p", "mcem-e-step", "mcem-m-step")
# Sizes and repeats: the full run (sized for ~10 min on an idle 2-core CPU, an estimate from
# benchmarks/README.md's idle rows) and --quick.
DEFAULTS = {
    "full": dict(batch=1, crop=128, inference=(720, 1280), repeats=2, mcem_size=256,
                 mcem_set=()),
    "quick": dict(batch=1, crop=32, inference=(64, 96), repeats=1, mcem_size=32,
                  mcem_set=("image_net.features=(16,16,16)", "kernel_net.features=(8,8)",
                            "kernel_size=9", "grid=(2,2)")),
}


def log(message: str) -> None:
    print(f"[side_by_side {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr,
          flush=True)


def mean_seconds(fn, *, warmup: int, repeats: int) -> float:
    """Mean wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.mean(times))


def batch_nhwc(batch: int, crop: int) -> dict[str, np.ndarray]:
    """The random (blurry, sharp) batch of ``ufpnet_step.train_step_row`` (same draws)."""
    rng = np.random.default_rng(0)
    return {k: rng.random((batch, crop, crop, 3), np.float32) for k in ("blurry", "sharp")}


def to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def torch_ufpnet_model(config, *, train_size=None) -> torch_ufpnet.UFPNet:
    """The config's architecture in PyTorch with our shipped flow prior."""
    model = torch_ufpnet.build(configs.plain(config.model), train_size=train_size)
    module, variables = flow.load_pretrained(config.flow_checkpoint)
    state = convert.flow_state_dict_from_variables(variables, alpha=module.alpha)
    model.flow.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                               strict=True)
    return model


# --- rows -------------------------------------------------------------------------------------

def ufpnet_train(name: str, args) -> dict:
    config = ufpnet_step.load_config(name)
    size = f"B={args.batch}, {args.crop}²"
    log(f"UFPNet {name} train step, {size}: jaxdeblur (compiling)")
    ours = ufpnet_step.train_step_row(name, batch=args.batch, crop=args.crop,
                                      repeats=args.repeats)
    log(f"  jaxdeblur {ours['time_s']:.3f} s/step, compile {ours['compile_s']:.1f} s; PyTorch")
    data = batch_nhwc(args.batch, args.crop)
    blurry, sharp = to_nchw(data["blurry"]), to_nchw(data["sharp"])
    step = torch_ufpnet.Stage3Step(torch_ufpnet_model(config), config.stage3)
    theirs = mean_seconds(lambda: step(blurry, sharp), warmup=1, repeats=args.repeats)
    log(f"  PyTorch {theirs:.3f} s/step")
    return {"step": f"UFPNet {name} stage-III train step", "size": size,
            "jax_s": ours["time_s"], "torch_s": theirs, "compile_s": ours["compile_s"]}


def _jax_inference(config, image: np.ndarray, args) -> tuple[float, float]:
    """(mean seconds, compile seconds) of our whole-image inference; frees its buffers."""
    model = ufpnet_step.inference_model(config)
    variables = ke_lib.init_variables(model, config.seed, ke_lib.load_flow_variables(config))
    x, key = jnp.asarray(image), jax.random.key(2)
    start = time.perf_counter()
    compiled = jax.jit(lambda v, x, key: model.apply(v, x, key=key)).lower(
        variables, x, key).compile()
    compile_s = time.perf_counter() - start
    seconds = mean_seconds(lambda: jax.block_until_ready(compiled(variables, x, key)),
                           warmup=args.warmup_720p, repeats=args.repeats_720p)
    return seconds, compile_s


def ufpnet_inference(args) -> dict:
    h, w = args.inference
    config = ufpnet_step.load_config("official")
    size = f"{w}×{h}, TLC({config.eval_tlc_train_size[0]})"
    log(f"UFPNet official inference {size}: jaxdeblur (compiling)")
    image = np.random.default_rng(0).random((1, h, w, 3), np.float32)
    ours, compile_s = _jax_inference(config, image, args)
    gc.collect()
    log(f"  jaxdeblur {ours:.2f} s, compile {compile_s:.1f} s; PyTorch (whole image at once)")
    reference = torch_ufpnet_model(config, train_size=config.eval_tlc_train_size).eval()
    x_t = to_nchw(image)

    def run():
        with torch.no_grad():
            reference(x_t)

    theirs = mean_seconds(run, warmup=args.warmup_720p, repeats=args.repeats_720p)
    log(f"  PyTorch {theirs:.2f} s")
    return {"step": "UFPNet official whole-image inference", "size": size, "jax_s": ours,
            "torch_s": theirs, "compile_s": compile_s}


class DeepEMSetup:
    """Our MCEM model and initial state, and the PyTorch copy, built once for both rows."""

    def __init__(self, args):
        self.config = configs.load(args.mcem_config, args.mcem_set)
        size = args.mcem_size
        self.blurry = jax.random.uniform(jax.random.key(0), (size, size, 3))
        self.model = mcem.build_model(self.blurry.shape, self.config)
        log(f"Deep EM {size}²: initialising our networks")
        self.state = mcem.init_state(self.model, key=jax.random.key(1))
        self.torch_em = torch_mcem.DeepEM.from_jax(self.model, self.state,
                                                   blur_method=args.torch_blur)
        self.blurry_t = torch_mcem.image_to_torch(self.blurry)
        self.unroll = mcem.resolve_unroll(self.config.loop)
        method = self.model.method
        self.nets = (f"image net {tuple(method.image_net.features)}, kernel net "
                     f"{tuple(method.kernel_net.features)}, {method.kernel_size}² kernels, "
                     f"grid {tuple(self.model.geometry.grid_size)}")
        self.size = f"{size}²×3; {self.nets}"


def mcem_e_step(setup: DeepEMSetup, args) -> dict:
    method = setup.model.method
    n = method.e_step_steps
    chunk = mcem.resolve_chunk(method.e_step_chunk, n, setup.unroll)
    form = "unrolled" if setup.unroll else "lax.scan"
    log(f"Deep EM E-step ({n} pSGLD steps, {chunk}/call {form}): jaxdeblur (compiling)")
    fn = jax.jit(functools.partial(mcem.e_step, setup.model, length=chunk, uniform=False,
                                   unroll=setup.unroll))
    start = time.perf_counter()
    compiled = fn.lower(setup.state, setup.blurry).compile()
    compile_s = time.perf_counter() - start

    def ours_e_step():
        state = setup.state
        for _ in range(n // chunk):
            state = compiled(state, setup.blurry)
        return jax.block_until_ready(state)

    ours = mean_seconds(ours_e_step, warmup=1, repeats=args.repeats)
    setup.after_e_step = ours_e_step()
    log(f"  jaxdeblur {ours:.3f} s, compile {compile_s:.1f} s; PyTorch "
        f"(filter flow: {setup.torch_em.blur_method})")
    theirs = mean_seconds(lambda: setup.torch_em.e_step(setup.blurry_t, n), warmup=1,
                          repeats=args.repeats)
    log(f"  PyTorch {theirs:.3f} s")
    return {"step": f"Deep EM E-step ({n} pSGLD steps, ours {chunk}/call {form})",
            "size": setup.size, "jax_s": ours, "torch_s": theirs, "compile_s": compile_s}


def mcem_m_step(setup: DeepEMSetup, args) -> dict:
    method = setup.model.method
    n = method.m_step_steps
    state = getattr(setup, "after_e_step", setup.state)
    log(f"Deep EM M-step ({n} Adam step(s)): jaxdeblur (compiling)")
    fn = jax.jit(functools.partial(mcem.m_step, setup.model, length=n, uniform=False,
                                   unroll=setup.unroll))
    start = time.perf_counter()
    compiled = fn.lower(state, setup.blurry).compile()
    compile_s = time.perf_counter() - start
    ours = mean_seconds(lambda: jax.block_until_ready(compiled(state, setup.blurry)),
                        warmup=1, repeats=args.repeats)
    log(f"  jaxdeblur {ours:.3f} s, compile {compile_s:.1f} s; PyTorch")
    theirs = mean_seconds(lambda: setup.torch_em.m_step(setup.blurry_t, n), warmup=1,
                          repeats=args.repeats)
    log(f"  PyTorch {theirs:.3f} s")
    return {"step": f"Deep EM M-step ({n} Adam step{'s' if n > 1 else ''})",
            "size": setup.size, "jax_s": ours, "torch_s": theirs, "compile_s": compile_s}


# --- table ------------------------------------------------------------------------------------

def _ms(seconds: float) -> str:
    return "–" if seconds is None or not np.isfinite(seconds) else f"{1e3 * seconds:,.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| step | size | jaxdeblur (ms) | PyTorch reference (ms) | ratio (torch/jax, >1 "
             "means we are faster) | JAX compile (s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['step']} | {r.get('size', '')} | failed: {r['error']} | | | |")
            continue
        ratio = r["torch_s"] / r["jax_s"]
        lines.append(f"| {r['step']} | {r['size']} | {_ms(r['jax_s'])} | {_ms(r['torch_s'])} "
                     f"| {ratio:.2f} | {r['compile_s']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and 1 repeat: a smoke test of every row "
                             f"({DEFAULTS['quick']})")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated of {ROWS}")
    parser.add_argument("--skip-720p", action="store_true", help="drop the ufpnet-720p row")
    parser.add_argument("--batch", type=int, default=None, help="UFPNet train batch")
    parser.add_argument("--crop", type=int, default=None, help="UFPNet train crop side")
    parser.add_argument("--inference", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="the whole-image inference size")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per row after one warm-up (not the 720p row)")
    parser.add_argument("--warmup-720p", type=int, default=0)
    parser.add_argument("--repeats-720p", type=int, default=1)
    parser.add_argument("--mcem-config", default="mcem",
                        help="a shipped config name or a get_config() file")
    parser.add_argument("--mcem-size", type=int, default=None, help="Deep EM image side")
    parser.add_argument("--mcem-set", action="append", default=None, metavar="KEY=VALUE",
                        help="Deep EM config override (repeatable, after --quick's own), "
                             "e.g. grid=(1,1)")
    parser.add_argument("--torch-blur", default="auto", choices=("auto",) + torch_mcem.BLUR_METHODS,
                        help="the PyTorch filter flow: auto (= ours on the CPU: FFT), direct "
                             "(grouped conv), fft, loop (the official per-patch EFF loop)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch.set_num_threads (default: the cores this process may use)")
    args = parser.parse_args()
    defaults = DEFAULTS["quick" if args.quick else "full"]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
        elif name == "mcem_set":  # the user's overrides after the mode's own
            args.mcem_set = list(value) + args.mcem_set
    args.mcem_set = list(args.mcem_set)
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; rows are {ROWS}")
    if args.skip_720p:
        rows = [r for r in rows if r != "ufpnet-720p"]

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    cores = len(os.sched_getaffinity(0))
    load_start = os.getloadavg()[0]
    log(f"{cores} cores, load average {load_start:.2f}; PyTorch {torch.__version__} on "
        f"{torch.get_num_threads()} threads; JAX {jax.__version__} on "
        f"{jax.default_backend()} (XLA:CPU default pool, one thread per core)")
    if load_start > BUSY_LOAD * cores:
        log(f"WARNING: load average {load_start:.2f} on {cores} cores: other processes hold "
            "the cores, and PyTorch's OpenMP threads then wait at every parallel region "
            "(measured here: a tiny-UFPNet step at 32², 0.07 s on 1 thread, 1.5-7 s on 2 "
            "threads under load 5). The PyTorch column is meaningless until the CPU is quiet.")

    results = []
    setup = None
    for row in rows:
        try:
            if row in ("ufpnet-tiny", "ufpnet-official"):
                results.append(ufpnet_train(row.split("-")[1], args))
            elif row == "ufpnet-720p":
                results.append(ufpnet_inference(args))
            else:
                setup = setup or DeepEMSetup(args)
                results.append((mcem_e_step if row == "mcem-e-step" else mcem_m_step)(
                    setup, args))
        except Exception as err:  # noqa: BLE001 - one failed row must not lose the others
            traceback.print_exc(file=sys.stderr)
            results.append({"step": row, "error": f"{type(err).__name__}: {err}"[:200]})
        gc.collect()

    load_end = os.getloadavg()[0]
    print(f"\nSide by side on {cores} CPU cores (load average {load_start:.2f} at the start, "
          f"{load_end:.2f} at the end): PyTorch {torch.__version__} with "
          f"{torch.get_num_threads()} threads (denormals flushed), JAX {jax.__version__} "
          f"({jax.default_backend()}, XLA's default pool: one thread per core). Mean of "
          f"{args.repeats} calls after one warm-up (720p row: {args.repeats_720p} after "
          f"{args.warmup_720p}); compilation apart."
          + (" --quick: sizes are a smoke test, not comparable with the full rows."
             if args.quick else "") + "\n")
    print(table(results))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
