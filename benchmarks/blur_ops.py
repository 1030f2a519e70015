"""Time and memory of the blur operators, side by side with the official algorithms.

    python benchmarks/blur_ops.py                 # the whole table (256² and 720p)
    python benchmarks/blur_ops.py --sizes 256     # 256² only
    python benchmarks/blur_ops.py --auto          # the conv direct-vs-FFT measurement

Rows: `per_pixel_blur` (3 channels, 19×19 kernel per pixel) and `filter_flow_blur`
(mask first, official default grid 6×8 = 48 kernels of 31×31), each at 256×256 and
1280×720, forward and forward+backward (gradient w.r.t. the image and the kernels of
`sum(y²)`), against PyTorch re-implementations of the official algorithms
(`benchmarks/torch_reference.py`: unfold for per-pixel blur, a Python loop of per-patch
convolutions for EFF). deepinv's `SpaceVaryingBlur` (the mask-first model) would be a
third column, but deepinv imports torchvision, which this CPU machine lacks: the script
prints why.

Measurement:
* Time: median wall time of `--repeat` calls (one call at 720p) after one warm-up call
  (compilation for JAX excluded), `block_until_ready` for JAX. Both frameworks run on the
  same CPU cores with their default thread pools.
* JAX memory: `jax.jit(f).lower(...).compile().memory_analysis()`, temp + output bytes
  (what the call allocates beyond its arguments; arguments listed separately).
* torch memory: the peak resident-set growth of a fresh subprocess per measurement,
  `ru_maxrss` after the calls minus the RSS just before them (inputs already allocated).
  `tracemalloc` does not see torch's allocator, so it is not used.
Each torch measurement runs in its own subprocess with a time limit (300 s), and is
skipped with a note when the machine's available memory is below 1.5× its estimated peak
or when the same measurement timed out at a smaller size.
`method="direct"` filter flow is not in the table: XLA:CPU's lax.conv is 10-100× slower
than the FFT here (see `--auto`), so `auto` picks the FFT on the CPU.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)
sys.path.insert(0, os.path.join(_REPO, "benchmarks"))

SIZES = {"256": (256, 256), "720p": (720, 1280)}
CHANNELS = 3
PER_PIXEL_KERNEL = 19
EFF_KERNEL = 31
EFF_GRID = (6, 8)
TORCH_TIME_LIMIT_S = 300


def _median_time(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --------------------------------------------------------------------------------------
# JAX.
# --------------------------------------------------------------------------------------


def _jax_row(name, forward, args, repeat):
    import jax
    import jax.numpy as jnp

    def loss(*a):
        return jnp.sum(forward(*a) ** 2)

    row = {"impl": name}
    for mode, fn in (("fwd", forward), ("fwd+bwd", jax.grad(loss, argnums=(0, 1)))):
        jitted = jax.jit(fn)
        memory = jitted.lower(*args).compile().memory_analysis()
        row[f"{mode} MB"] = (memory.temp_size_in_bytes + memory.output_size_in_bytes) / 2**20
        row[f"{mode} temp MB"] = memory.temp_size_in_bytes / 2**20
        row["args MB"] = memory.argument_size_in_bytes / 2**20
        row[f"{mode} ms"] = 1e3 * _median_time(
            lambda: jax.block_until_ready(jitted(*args)), repeat)
    return row


def jax_per_pixel(size, repeat):
    import jax
    from jaxdeblur import blur
    h, w = size
    k = PER_PIXEL_KERNEL
    key_x, key_k = jax.random.split(jax.random.key(0))
    image = jax.random.uniform(key_x, (h, w, CHANNELS))
    field = jax.random.uniform(key_k, (h, w, k, k)) / (k * k)
    return _jax_row("jaxdeblur per_pixel_blur",
                    lambda x, kf: blur.per_pixel_blur(x, kf), (image, field), repeat)


def jax_filter_flow(size, repeat, method):
    import jax
    from jaxdeblur import blur
    h, w = size
    geometry = blur.eff_windows((h, w), EFF_GRID, EFF_KERNEL)
    key_x, key_k = jax.random.split(jax.random.key(1))
    image = jax.random.uniform(key_x, (h, w, CHANNELS))
    kernels = jax.nn.softmax(jax.random.normal(
        key_k, (geometry.num_patches, EFF_KERNEL * EFF_KERNEL))).reshape(-1, EFF_KERNEL,
                                                                         EFF_KERNEL)
    return _jax_row(f"jaxdeblur filter_flow_blur ({method})",
                    lambda x, kr: blur.filter_flow_blur(x, kr, geometry, method=method),
                    (image, kernels), repeat)


# --------------------------------------------------------------------------------------
# torch (one subprocess per measurement).
# --------------------------------------------------------------------------------------


def _rss_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def torch_child(spec):
    """Runs one torch measurement and prints a JSON line {"ms": ..., "MB": ...}."""
    import torch
    import torch_reference
    from jaxdeblur import blur
    torch.manual_seed(0)
    h, w = spec["size"]
    backward = spec["mode"] == "fwd+bwd"
    if spec["op"] == "unfold":
        k = PER_PIXEL_KERNEL
        image = torch.rand(1, CHANNELS, h, w)
        kernels = torch.rand(1, h * w, k, k) / (k * k)
        forward = lambda x, kr: torch_reference.unfold_per_pixel_blur(x, kr)
    else:
        geometry = blur.eff_windows((h, w), EFF_GRID, EFF_KERNEL)
        image = torch.rand(1, CHANNELS, h, w)
        kernels = torch.softmax(torch.randn(geometry.num_patches, EFF_KERNEL ** 2),
                                -1).view(-1, EFF_KERNEL, EFF_KERNEL)
        forward = lambda x, kr: torch_reference.eff_loop_blur(x, kr, geometry)
    image.requires_grad_(backward)
    kernels.requires_grad_(backward)

    def call():
        if backward:
            image.grad = kernels.grad = None
            (forward(image, kernels) ** 2).sum().backward()
        else:
            with torch.no_grad():
                forward(image, kernels)

    baseline = _rss_bytes()
    seconds = _median_time(call, spec["repeat"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"ms": 1e3 * seconds, "MB": (peak - baseline) / 2**20}))


def deepinv_status():
    """Returns None if deepinv imports, else the reason it cannot be used."""
    try:
        import deepinv  # noqa: F401
    except Exception as error:  # ImportError, or torchvision's own import errors
        return (f"deepinv not usable here ({type(error).__name__}: {error}). deepinv 0.5.0 "
                "declares Requires-Dist torchvision, torchmetrics, einops, h5py, natsort and "
                "imports torchvision in deepinv/__init__.py; this machine has no CPU "
                "torchvision and the PyPI torchvision wheel pulls CUDA torch, so its "
                "SpaceVaryingBlur (same model as mask-first EFF with the placed windows as "
                "multipliers) is not benchmarked.")
    return ("deepinv imports, but its SpaceVaryingBlur row is not implemented: its filters "
            "are true convolutions and its padding modes differ from EFF's zero canvas.")


def _estimated_peak_bytes(op, size, mode):
    h, w = size
    if op == "unfold":
        columns = CHANNELS * h * w * PER_PIXEL_KERNEL ** 2 * 4
        return columns * (2 if mode == "fwd" else 4)
    return 48 * CHANNELS * h * w * 4 * (2 if mode == "fwd" else 6)


def torch_row(name, op, size, repeat, skip=None):
    import psutil
    row = {"impl": name}
    for mode in ("fwd", "fwd+bwd"):
        if skip and mode in skip:
            row[f"{mode} note"] = skip[mode]
            continue
        need = _estimated_peak_bytes(op, size, mode)
        available = psutil.virtual_memory().available
        if available < 1.5 * need:
            row[f"{mode} note"] = (f"skipped: needs ~{need / 2**30:.1f} GiB, "
                                   f"{available / 2**30:.1f} GiB available")
            continue
        spec = {"op": op, "size": size, "mode": mode, "repeat": repeat}
        try:
            done = subprocess.run([sys.executable, __file__, "--torch-child", json.dumps(spec)],
                                  capture_output=True, text=True, timeout=TORCH_TIME_LIMIT_S)
        except subprocess.TimeoutExpired:
            row[f"{mode} note"] = f"timed out after {TORCH_TIME_LIMIT_S} s"
            continue
        if done.returncode != 0:
            row[f"{mode} note"] = "failed: " + done.stderr.strip().splitlines()[-1][:120]
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        row[f"{mode} ms"], row[f"{mode} MB"] = result["ms"], result["MB"]
    return row


# --------------------------------------------------------------------------------------
# Agreement check and the auto-rule measurement.
# --------------------------------------------------------------------------------------


def agreement():
    """Max |jax - torch| of both operators on a small image (same inputs)."""
    import jax.numpy as jnp
    import torch
    import torch_reference
    from jaxdeblur import blur
    rng = np.random.default_rng(0)
    h, w = 40, 56
    image = rng.random((h, w, CHANNELS), np.float32)
    field = rng.random((h, w, 19, 19), np.float32) / 361
    ours = np.asarray(blur.per_pixel_blur(image, field))
    theirs = torch_reference.unfold_per_pixel_blur(
        torch.from_numpy(image.transpose(2, 0, 1)[None].copy()),
        torch.from_numpy(field.reshape(1, h * w, 19, 19)))[0].numpy().transpose(1, 2, 0)
    per_pixel = np.abs(ours - theirs).max()
    geometry = blur.eff_windows((h, w), (2, 3), 7)
    kernels = rng.random((6, 7, 7), np.float32) / 49
    ours = np.asarray(blur.filter_flow_blur(jnp.asarray(image), kernels, geometry))
    theirs = torch_reference.eff_loop_blur(
        torch.from_numpy(image.transpose(2, 0, 1)[None].copy()), torch.from_numpy(kernels),
        geometry)[0].numpy().transpose(1, 2, 0)
    return per_pixel, np.abs(ours - theirs).max()


def auto_rule_table(repeat):
    """Times conv direct vs fft (zeros boundary, 3 channels) for the `auto` rule."""
    import jax
    import jax.numpy as jnp
    from jaxdeblur import blur
    print(f"conv(boundary='zeros'), {CHANNELS} channels, backend {jax.default_backend()}, "
          f"median of {repeat} after warm-up")
    print("| image | kernel | direct ms | fft ms | auto picks |")
    print("|---|---|---|---|---|")
    for h, w in ((64, 64), (256, 256), (720, 1280)):
        image = jnp.ones((h, w, CHANNELS))
        for k in (3, 5, 9, 15, 31):
            kernel = jnp.ones((k, k)) / k ** 2
            times = {}
            for method in ("direct", "fft"):
                fn = jax.jit(lambda x, kr, m=method: blur.conv(x, kr, method=m))
                times[method] = 1e3 * _median_time(
                    lambda: jax.block_until_ready(fn(image, kernel)), repeat)
            pick = "fft" if blur._prefer_fft((k, k)) else "direct"
            print(f"| {h}x{w} | {k}x{k} | {times['direct']:.2f} | {times['fft']:.2f} | "
                  f"{pick} |", flush=True)


# --------------------------------------------------------------------------------------


def _fmt(row, mode):
    if f"{mode} note" in row:
        return row[f"{mode} note"], "-"
    return f"{row[f'{mode} ms']:.1f}", f"{row[f'{mode} MB']:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--auto", action="store_true", help="only the direct-vs-FFT table")
    parser.add_argument("--torch-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_child:
        torch_child(json.loads(args.torch_child))
        return
    if args.auto:
        auto_rule_table(args.repeat)
        return
    import jax
    print(f"jax {jax.__version__} on {jax.default_backend()} ({os.cpu_count()} CPUs); "
          f"repeat {args.repeat}")
    per_pixel_diff, eff_diff = agreement()
    print(f"agreement on 40x56x3: per-pixel max|jax-torch| = {per_pixel_diff:.2e}, "
          f"EFF max|jax-torch| = {eff_diff:.2e}")
    note = deepinv_status()
    rows = []
    skip_loop_backward = {}
    for size_name in args.sizes:
        size = SIZES[size_name]
        label = f"{size[1]}x{size[0]}"
        # One timed call at 720p: the torch references take tens of seconds per call there.
        repeat = args.repeat if size_name == "256" else 1
        rows.append(("per_pixel_blur k=19", label, jax_per_pixel(size, repeat)))
        rows.append(("per_pixel_blur k=19", label,
                     torch_row("torch unfold (official algorithm)", "unfold", size, repeat)))
        rows.append(("filter_flow_blur 48x31²", label,
                     jax_filter_flow(size, repeat, "auto")))
        loop = torch_row("torch per-patch loop (official algorithm)", "eff_loop", size,
                         repeat, skip=skip_loop_backward)
        rows.append(("filter_flow_blur 48x31²", label, loop))
        if "timed out" in loop.get("fwd+bwd note", ""):
            skip_loop_backward = {"fwd+bwd": "skipped: timed out at a smaller size"}
    print()
    print("Memory: JAX = compiled memory_analysis() temp + output (arguments excluded); "
          "torch = peak RSS growth of a fresh subprocess (inputs excluded).")
    print("| operator | image (WxH) | implementation | fwd ms | fwd+bwd ms | fwd MB | "
          "fwd+bwd MB |")
    print("|---|---|---|---|---|---|---|")
    for op, label, row in rows:
        fwd_ms, fwd_mb = _fmt(row, "fwd")
        bwd_ms, bwd_mb = _fmt(row, "fwd+bwd")
        print(f"| {op} | {label} | {row['impl']} | {fwd_ms} | {bwd_ms} | {fwd_mb} | "
              f"{bwd_mb} |")
    print()
    for op, label, row in rows:
        if "fwd temp MB" in row:
            print(f"{op} {label} {row['impl']}: temp fwd {row['fwd temp MB']:.1f} MB, temp "
                  f"fwd+bwd {row['fwd+bwd temp MB']:.1f} MB, arguments {row['args MB']:.1f} MB")
    if note:
        print(note)


if __name__ == "__main__":
    main()
