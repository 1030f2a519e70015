"""One convolution layer, XLA:CPU against PyTorch (oneDNN): forward, and forward + both
gradients, at the shapes UFPNet and Deep EM use — the profile behind the rows of
`side_by_side.py` where we are slower.

    python benchmarks/conv_grads.py [--threads 2] [--repeats 5]

Prints one line per shape: mean milliseconds after one warm-up call (JAX jit-compiled,
``block_until_ready``; PyTorch with ``--threads`` threads and denormals flushed). Layouts
are each framework's own (NHWC / NCHW); the loss is ``Σ y²``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

# (image side, in channels, out channels, kernel side, where it occurs)
SHAPES = ((256, 64, 64, 3, "Deep EM image net"),
          (128, 128, 128, 3, "NAFNet level 1"),
          (32, 1024, 1024, 3, "official NAFNet bottom"),
          (128, 361, 361, 2, "kernel map (kernel_down)"),
          (64, 512, 512, 1, "NAFNet 1x1"))


def _mean_ms(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="PyTorch threads")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    rng = np.random.default_rng(0)
    print("| conv | size | XLA:CPU fwd | oneDNN fwd | XLA:CPU fwd+bwd | oneDNN fwd+bwd |")
    print("|---|---|---|---|---|---|")
    for side, c_in, c_out, k, where in SHAPES:
        x = rng.random((1, side, side, c_in), np.float32)
        w = (rng.random((k, k, c_in, c_out)) * 0.01).astype(np.float32)
        padding = "SAME" if k % 2 else "VALID"

        def conv(x, w, padding=padding):
            return jax.lax.conv_general_dilated(x, w, (1, 1), padding,
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))

        forward = jax.jit(conv)
        gradients = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))
        xj, wj = jnp.asarray(x), jnp.asarray(w)
        jax_fwd = _mean_ms(lambda: forward(xj, wj).block_until_ready(), args.repeats)
        jax_both = _mean_ms(lambda: jax.block_until_ready(gradients(xj, wj)), args.repeats)

        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
        wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).requires_grad_(True)
        pad = k // 2 if k % 2 else 0

        def torch_forward():
            with torch.no_grad():
                torch.nn.functional.conv2d(xt, wt, padding=pad)

        def torch_both():
            y = torch.nn.functional.conv2d(xt, wt, padding=pad)
            (y * y).sum().backward()

        torch_fwd = _mean_ms(torch_forward, args.repeats)
        torch_all = _mean_ms(torch_both, args.repeats)
        print(f"| {k}×{k}, {c_in}→{c_out} ({where}) | {side}² | {jax_fwd:.1f} ms | "
              f"{torch_fwd:.1f} ms | {jax_both:.1f} ms | {torch_all:.1f} ms |", flush=True)


if __name__ == "__main__":
    main()
