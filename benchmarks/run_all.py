"""Every benchmark row in one command, printed as one markdown table.

    python benchmarks/run_all.py --device cpu --quick   # small sizes, ~1 min (CI)
    python benchmarks/run_all.py --device gpu           # the full table on a GPU, <= ~8 min
    python benchmarks/run_all.py --device cpu           # the full table on the CPU (long)

Rows, each measured by the benchmark script it comes from (its functions in-process, or
the script itself in a subprocess):

* blur operators (``benchmarks/blur_ops.py``): per-pixel blur (k = 19) and filter-flow blur
  (48 kernels of 31×31), forward and forward+backward;
* the flow prior (the measurement of ``benchmarks/flow.py``): kernels per second through
  ``latent_to_kernel`` and ``log_prob``;
* UFPNet (``benchmarks/ufpnet_step.py``): a stage-III training step (the tiny config under
  ``--quick``, else the official one), and the official config's whole-image 720p
  inference in its row blocks (compiled memory always; time unless ``--quick``), beside
  the same inference with the whole image at once;
* Deep EM (``benchmarks/mcem.py`` in a subprocess): the E-step as ``lax.scan`` against
  unrolled steps, one M-step, and the whole-run time those imply (the script's
  estimate: iterations × the best seconds per EM iteration); on a GPU also a real whole
  run of `jaxdeblur.mcem.deblur` with the shipped config on a 256² RGB image, in a fresh
  process so that the device's peak memory is the run's own;
* the photo command (`jaxdeblur.photo.deblur_uniform` with the shipped ``photo`` config):
  a 255² gray photo (the held-out set's size) and a 1024×768 RGB photo, wall time with
  compilation (issue #15's GPU targets: 30 s and 2 min).

Columns: time (median or mean of the repeats after a warm-up, compilation excluded, except
for the real whole run: wall time of the call), memory (XLA's compiled memory analysis of
the jitted call unless the cell says otherwise), and a reference where one exists (the
PyTorch implementation of the official algorithm when torch is installed and the device is
the CPU, the papers' figures, or the same computation without jaxdeblur's optimisation).

``--device`` sets ``JAX_PLATFORMS`` (``cpu`` or ``cuda``) before JAX starts; ``--device
gpu`` exits with status 2 and a message when JAX sees no GPU. ``--quick`` shrinks every
size to a smoke test of the whole table (``tests/test_run_all.py`` runs it); its times
are not comparable with the full rows. The process exits with status 1 if any group of
rows failed (the table says which and why).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import re
import resource
import subprocess
import sys
import time
import traceback

BENCHMARKS = pathlib.Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
PLATFORMS = {"cpu": "cpu", "gpu": "cuda"}

# Sizes per mode. Full on the CPU follows benchmarks/README.md; full on a GPU is sized to
# finish in about 8 minutes on one accelerator (compilation included).
SETTINGS = {
    "quick": dict(blur_sizes=[(128, 128)], blur_repeat=2, flow_batch=4096, flow_repeats=2,
                  ufpnet_train=("tiny", 1, 32),
                  ufpnet_720p_run=False, ufpnet_720p_whole=False, ufpnet_repeats=1,
                  mcem_estep=["--size", "32", "--steps", "1", "--chunks", "1",
                              "--set", "image_net.features=(8,)*2",
                              "--set", "kernel_net.features=(8,)*2",
                              "--set", "grid=(1,1)", "--set", "kernel_size=5"],
                  mcem_run=None, photo=[(96, 96, 1, 9)]),
    "cpu": dict(blur_sizes=[(256, 256), (720, 1280)], blur_repeat=3, flow_batch=65536,
                flow_repeats=3, ufpnet_train=("official", 1, 256),
                ufpnet_720p_run=True, ufpnet_720p_whole=True, ufpnet_repeats=1,
                mcem_estep=["--size", "256", "--steps", "25", "--chunks", "1,5,25"],
                mcem_run=None, photo=[(255, 255, 1, 19), (768, 1024, 3, 31)]),
    "gpu": dict(blur_sizes=[(256, 256), (720, 1280)], blur_repeat=5, flow_batch=65536,
                flow_repeats=5, ufpnet_train=("official", 8, 256),
                ufpnet_720p_run=True, ufpnet_720p_whole=True, ufpnet_repeats=5,
                mcem_estep=["--size", "256", "--steps", "10", "--chunks", "1,5,10"],
                mcem_run=256, photo=[(255, 255, 1, 19), (768, 1024, 3, 31)]),
}
# benchmarks/README.md (XLA:CPU): official 720p whole-image inference without row blocks.
UFPNET_720P_WHOLE_GIB = 15.088
PAPER_DEEP_EM = "paper, RTX 3090, 256²: 226 s, 1.27 GB"
# Issue #15's targets for `jaxdeblur deblur --method mcem` on a GPU, by photo size.
PHOTO_TARGETS = {(255, 255): "target on a GPU ≤ 30 s", (768, 1024): "target on a GPU ≤ 2 min"}


def _load(name: str):
    """A benchmark script as a module (its own ``sys.path`` set-up included)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _size(hw) -> str:
    return f"{hw[1]}×{hw[0]}"


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def _torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def blur_rows(s: dict, device: str, quick: bool) -> list[dict]:
    blur_ops = _load("blur_ops")
    rows = []
    torch_ok = device == "cpu" and not quick and _torch_available()
    for hw in s["blur_sizes"]:
        for op, name, measure, torch_op in (
                ("per_pixel_blur k=19", "torch unfold", blur_ops.jax_per_pixel, "unfold"),
                ("filter_flow_blur 48×31² (auto)", "torch per-patch loop",
                 lambda size, repeat: blur_ops.jax_filter_flow(size, repeat, "auto"),
                 "eff_loop")):
            ours = measure(hw, s["blur_repeat"] if hw[0] <= 256 else 1)
            ref = {}
            if torch_ok:
                ref = blur_ops.torch_row(name, torch_op, hw, s["blur_repeat"] if hw[0] <= 256
                                         else 1)
            for mode in ("fwd", "fwd+bwd"):
                if f"{mode} ms" in ref:
                    reference = (f"{name}: {ref[f'{mode} ms']:,.1f} ms, "
                                 f"{ref[f'{mode} MB']:,.1f} MB RSS")
                elif f"{mode} note" in ref:
                    reference = f"{name}: {ref[f'{mode} note']}"
                else:
                    reference = (f"{name}: not run (" + ("--quick" if quick else
                                 "torch not installed" if device == "cpu" else "CPU only")
                                 + ")")
                rows.append({"row": f"blur {op} {mode}", "size": _size(hw),
                             "time": f"{ours[f'{mode} ms']:,.1f} ms",
                             "memory": f"{ours[f'{mode} MB']:,.1f} MB",
                             "reference": reference})
    return rows


def flow_rows(s: dict, device: str, quick: bool) -> list[dict]:
    import jax
    from jaxdeblur import convert, flow
    bench_flow = _load("flow")
    module, variables = flow.load_pretrained("ours")
    batch = s["flow_batch"]
    z = jax.random.normal(jax.random.key(0), (batch, module.features))
    to_kernel = jax.jit(lambda v, z: module.apply(v, z, method="latent_to_kernel"))
    log_prob = jax.jit(lambda v, k: module.apply(v, k, method="log_prob"))
    kernels = jax.block_until_ready(to_kernel(variables, z))
    reference = {}
    if device == "cpu" and not quick and _torch_available():
        import numpy as np
        import torch
        torch.set_flush_denormal(True)  # as benchmarks/flow.py: XLA:CPU flushes them too
        state_dict = convert.flow_state_dict_from_variables(variables, alpha=module.alpha)
        prior = bench_flow.torch_kernel_prior(state_dict, module.n_blocks, module.hidden_size,
                                              module.n_hidden, module.kernel_size)
        z_t, k_t = torch.from_numpy(np.array(z)), torch.from_numpy(np.array(kernels))
        with torch.no_grad():
            reference["latent_to_kernel"] = bench_flow._time(
                lambda: prior.post_process(prior.inverse(z_t, log_det=True)[0]), s["flow_repeats"])
            reference["log_prob"] = bench_flow._time(
                lambda: prior.log_prob(prior.pre_process(k_t))[0], s["flow_repeats"])
    rows = []
    for name, fn, arg in (("latent_to_kernel", to_kernel, z), ("log_prob", log_prob, kernels)):
        seconds = bench_flow._time(lambda: jax.block_until_ready(fn(variables, arg)),
                                   s["flow_repeats"])
        compiled = fn.lower(variables, arg).compile().memory_analysis()
        memory = (compiled.temp_size_in_bytes + compiled.output_size_in_bytes) / 2**20
        ref = (f"PyTorch KernelPrior: {batch / reference[name]:,.0f} kernels/s"
               if name in reference else
               "PyTorch KernelPrior: not run (" + ("--quick" if quick else
               "torch not installed" if device == "cpu" else "CPU only") + ")")
        rows.append({"row": f"flow {name}", "size": f"batch {batch:,}",
                     "time": f"{_ms(seconds)} ({batch / seconds:,.0f} kernels/s)",
                     "memory": f"{memory:,.1f} MB", "reference": ref})
    return rows


def ufpnet_rows(s: dict, device: str, quick: bool) -> list[dict]:
    step = _load("ufpnet_step")
    rows = []
    name, batch, crop = s["ufpnet_train"]
    r = step.train_step_row(name, batch=batch, crop=crop, repeats=s["ufpnet_repeats"])
    rows.append({"row": f"UFPNet {name} train step (stage III)",
                 "size": f"B={batch}, {crop}²", "time": _ms(r["time_s"]),
                 "memory": f"{r['mem_GiB']:.3f} GiB",
                 "reference": f"{r['params_M']:.2f} M parameters"
                              + (" (official: 80.34 M incl. unused kernel_down.3)"
                                 if name == "official" else "")})
    hw = step.SIZES["720p"]
    if s["ufpnet_720p_run"]:
        r = step.inference_row("official", size=hw, repeats=s["ufpnet_repeats"])
        seconds, gib = _ms(r["time_s"]), r["mem_GiB"]
    else:
        gib, _ = step.inference_memory("official", hw)
        seconds = "not run (--quick)"
    if s["ufpnet_720p_whole"]:
        whole, _ = step.inference_memory("official", hw, blocks=False)
        reference = f"whole image at once: {whole:.3f} GiB"
    else:
        reference = (f"whole image at once: {UFPNET_720P_WHOLE_GIB:.3f} GiB "
                     "(benchmarks/README.md; not compiled under --quick)")
    rows.append({"row": "UFPNet official inference (TLC, row blocks)", "size": _size(hw),
                 "time": seconds, "memory": f"{gib:.3f} GiB", "reference": reference})
    return rows


_MCEM_ROW = re.compile(r"^(E-step .*?/call|M-step \(1 Adam step\))\s+(\S+)\s+(\S+)\s+(\S+)"
                       r"\s+(\S+)\s*$")
_MCEM_ESTIMATE = re.compile(r"seconds per EM iteration .*?: (?P<per_iteration>[\d.]+)\s*\n"
                            r"x (?P<iterations>\d+) iterations \+ final E-step: "
                            r"(?P<minutes>[\d.]+) min")
_MCEM_RSS = re.compile(r"peak RSS: (?P<megabytes>[\d.]+) MB")


def mcem_rows(s: dict, device: str, quick: bool) -> list[dict]:
    """``benchmarks/mcem.py``'s E-step table, and its whole-run estimate (iterations × the
    best seconds per EM iteration)."""
    command = [sys.executable, str(BENCHMARKS / "mcem.py")] + s["mcem_estep"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[1:])} failed: {done.stderr.strip()[-300:]}")
    size = int(s["mcem_estep"][s["mcem_estep"].index("--size") + 1])
    rows = []
    for line in done.stdout.splitlines():
        match = _MCEM_ROW.match(line)
        if match:
            name, seconds, ratio, compile_s, megabytes = match.groups()
            rows.append({"row": f"Deep EM {name}", "size": f"{size}²×3",
                         "time": f"{float(seconds) * 1e3:,.1f} ms/step"
                                 + ("" if name.startswith("M-step") else f" ({ratio}× best)"),
                         "memory": f"{float(megabytes):,.1f} MB",
                         "reference": "" if compile_s == "nan" else f"compile {compile_s} s"})
    estimate = _MCEM_ESTIMATE.search(done.stdout)
    rss = _MCEM_RSS.search(done.stdout)
    if not rows or estimate is None or rss is None:
        raise RuntimeError(f"unexpected output of {' '.join(command[1:])}:\n"
                           f"{done.stdout[-500:]}")
    rows.append({"row": f"Deep EM whole run, estimate ({estimate['iterations']} iterations × "
                        f"{estimate['per_iteration']} s)", "size": f"{size}²×3",
                 "time": f"{float(estimate['minutes']) * 60:,.0f} s",
                 "memory": f"{float(rss['megabytes']):,.0f} MB peak RSS (benchmark process)",
                 "reference": PAPER_DEEP_EM if size == 256 else ""})
    return rows


def whole_run(size: int) -> dict:
    """A whole run of `jaxdeblur.mcem.deblur` (the shipped config) on a size² RGB image:
    wall seconds from the call (compilation included), iterations, peak memory."""
    import jax
    from jaxdeblur import configs, mcem
    config = configs.load("mcem")
    blurry = jax.random.uniform(jax.random.key(0), (size, size, 3))
    start = time.perf_counter()
    result = mcem.deblur(blurry, config, key=jax.random.key(config.seed))
    jax.block_until_ready(result.image)
    seconds = time.perf_counter() - start
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        memory = f"{stats['peak_bytes_in_use'] / 2**30:.2f} GiB device peak"
    else:
        memory = (f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB "
                  "process peak RSS")
    return {"seconds": seconds, "iterations": mcem.total_iterations(config), "memory": memory}


def mcem_run_rows(s: dict, device: str, quick: bool) -> list[dict]:
    """`whole_run` in a fresh process, so that its peak memory is its own."""
    if s["mcem_run"] is None:
        return []
    size = s["mcem_run"]
    command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--device", device,
               "--whole-run", str(size)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"the whole run failed: {done.stderr.strip()[-300:]}")
    run = json.loads(done.stdout.strip().splitlines()[-1])
    return [{"row": f"Deep EM whole run ({run['iterations']} iterations)",
             "size": f"{size}²×3", "time": f"{run['seconds']:,.1f} s (compilation included)",
             "memory": run["memory"], "reference": PAPER_DEEP_EM if size == 256 else ""}]


def photo_input(height: int, width: int, channels: int, kernel_px: int):
    """A blurry photo of the given size (skimage's astronaut, resized, blurred by a
    ``kernel_px`` motion path, noise 0.005, 8-bit) and its sharp original."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import skimage.data
    import skimage.transform
    from jaxdeblur import blur, kernels
    sharp = skimage.transform.resize(skimage.data.astronaut() / 255.0, (height, width),
                                     anti_aliasing=True).astype(np.float32)
    if channels == 1:
        sharp = sharp @ np.asarray([0.299, 0.587, 0.114], np.float32)
        sharp = sharp[..., None]
    kernel = kernels.line_kernel(kernel_px, 0.8 * kernel_px, 0.5)
    blurry = blur.conv(jnp.asarray(sharp), kernel, boundary="replicate")
    blurry = blurry + 0.005 * jax.random.normal(jax.random.key(0), blurry.shape)
    return np.round(np.clip(np.asarray(blurry), 0, 1) * 255) / 255, sharp


def photo_rows(s: dict, device: str, quick: bool) -> list[dict]:
    """`jaxdeblur.photo.deblur_uniform`, what ``jaxdeblur deblur --method mcem`` runs, with
    the shipped ``photo`` config (``--quick``: one kernel estimate of a fixed size): wall
    time of the whole call as a user sees it, compilation included."""
    import numpy as np
    from jaxdeblur import configs, photo
    overrides = ["candidates=((0.15, 0),)", "kernel_size=9"] if quick else []
    settings = photo.settings_from_config(configs.load("photo", overrides))
    rows = []
    for height, width, channels, kernel_px in s["photo"]:
        blurry, sharp = photo_input(height, width, channels, kernel_px)
        start = time.perf_counter()
        result = photo.deblur_uniform(blurry.astype(np.float32), settings)
        seconds = time.perf_counter() - start
        gain = (10 * np.log10(np.mean((blurry - sharp) ** 2)
                              / np.mean((result.restored - sharp) ** 2)))
        rows.append({"row": f"photo deblur (Deep EM command, {kernel_px} px blur, "
                            f"{len(result.scores) or 1} estimate(s); {gain:+.1f} dB unaligned)",
                     "size": f"{width}×{height}×{channels}",
                     "time": f"{seconds:,.1f} s (compilation included)",
                     "memory": f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f}"
                               " GiB process peak RSS",
                     "reference": PHOTO_TARGETS.get((height, width), "")})
    return rows


GROUPS = (("blur operators", blur_rows), ("flow prior", flow_rows), ("UFPNet", ufpnet_rows),
          ("Deep EM E-step", mcem_rows), ("Deep EM whole run", mcem_run_rows),
          ("photo deblur", photo_rows))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=sorted(PLATFORMS), required=True)
    parser.add_argument("--quick", action="store_true", help="small sizes (CI)")
    parser.add_argument("--whole-run", type=int, metavar="SIZE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ["JAX_PLATFORMS"] = PLATFORMS[args.device]
    import jax
    try:
        backend = jax.default_backend()
    except Exception as error:  # noqa: BLE001 - RuntimeError or jax's own AssertionError
        print(f"run_all --device {args.device}: JAX found no {args.device.upper()} "
              f"(JAX_PLATFORMS={PLATFORMS[args.device]}: {type(error).__name__}"
              f"{': ' if str(error) else ''}{error}); "
              "run it on a machine with one, with jax's CUDA plugin installed "
              "(pip install 'jax[cuda12]')", file=sys.stderr)
        return 2
    if args.device == "gpu" and backend != "gpu":
        print(f"run_all --device gpu: JAX's backend is {backend!r}, not a GPU",
              file=sys.stderr)
        return 2
    if args.whole_run:
        print(json.dumps(whole_run(args.whole_run)))
        return 0
    settings = SETTINGS["quick" if args.quick else args.device]
    print(f"jax {jax.__version__}, backend {backend}, devices {jax.devices()}, "
          f"{'quick' if args.quick else 'full'} sizes", flush=True)
    rows, failed, start = [], 0, time.perf_counter()
    for title, group in GROUPS:
        t = time.perf_counter()
        try:
            rows += group(settings, args.device, args.quick)
        except Exception as error:  # noqa: BLE001 - report the row, keep the table going
            failed += 1
            traceback.print_exc()
            rows.append({"row": title, "size": "", "time": "failed", "memory": "",
                         "reference": f"{type(error).__name__}: {error}"[:200]})
        print(f"[{title}: {time.perf_counter() - t:.0f} s]", file=sys.stderr, flush=True)
    print()
    print("| row | size | time | memory | reference |")
    print("|---|---|---|---|---|")
    for r in rows:
        cells = (r[k].replace("|", "/").replace("\n", " ")
                 for k in ("row", "size", "time", "memory", "reference"))
        print("| " + " | ".join(cells) + " |")
    print("\nMemory: blur and flow rows, compiled temporaries + outputs (arguments excluded, as "
          "blur_ops.py); UFPNet and Deep EM steps, arguments + outputs + temporaries "
          "(ufpnet_step.py, mcem.py); the whole-run rows say what they report.")
    print(f"{len(rows)} rows in {time.perf_counter() - start:.0f} s"
          + (f", {failed} group(s) failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
