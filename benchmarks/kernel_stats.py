"""Statistics and speed of `jaxdeblur.kernels.motion_kernel` with its default parameters.

Prints, for kernel sizes 19 and 31, the mean and quantiles of
  * support: the number of pixels above 1% of the kernel's maximum,
  * extent: the larger side of the bounding box of those pixels,
  * length: the exposed trajectory length in kernel pixels,
  * spread: the root-mean-square distance of the kernel mass from its centre of mass,
and the drawing speed of ``jax.jit(jax.vmap(motion_kernel))`` for a batch of 1000 19×19
kernels (best of several timed calls after compilation). There is no reference
implementation to compare against: neither paper publishes its kernel generator.

    python benchmarks/kernel_stats.py [--n 4000] [--seed 0]
"""

import argparse
import functools
import time

import jax
import numpy as np

from jaxdeblur import kernels

_QUANTILES = (0.1, 0.5, 0.9)


def _statistics(size: int, n: int, seed: int) -> dict[str, np.ndarray]:
    @jax.jit
    @jax.vmap
    def draw(key):
        points, weights = kernels.motion_path(key, size)
        kernel = kernels.tent_splat(points, weights, size)
        steps = jax.numpy.linalg.norm(points[1:] - points[:-1], axis=-1)
        return kernel / kernel.sum(), (steps * weights[1:]).sum()

    batch, lengths = [], []
    for chunk in jax.random.split(jax.random.key(seed), n // 1000):
        k, length = draw(jax.random.split(chunk, 1000))
        batch.append(np.asarray(k, np.float64))
        lengths.append(np.asarray(length, np.float64))
    batch, lengths = np.concatenate(batch), np.concatenate(lengths)
    above = batch > 0.01 * batch.max(axis=(1, 2), keepdims=True)
    rows, cols = above.any(axis=2), above.any(axis=1)
    grid = np.arange(size)

    def side(mask):
        first = np.where(mask, grid, size).min(axis=1)
        last = np.where(mask, grid, -1).max(axis=1)
        return last - first + 1

    mass_rows, mass_cols = batch.sum(axis=2), batch.sum(axis=1)
    com_r, com_c = mass_rows @ grid, mass_cols @ grid
    var = mass_rows @ grid**2 - com_r**2 + mass_cols @ grid**2 - com_c**2
    return {
        "support px": above.sum(axis=(1, 2)).astype(np.float64),
        "extent px": np.maximum(side(rows), side(cols)).astype(np.float64),
        "length px": lengths,
        "spread px": np.sqrt(np.maximum(var, 0.0)),
        "|com - centre| px": np.hypot(com_r - (size - 1) / 2, com_c - (size - 1) / 2),
    }


def _speed(size: int = 19, batch: int = 1000, repeats: int = 5) -> float:
    draw = jax.jit(jax.vmap(functools.partial(kernels.motion_kernel, size=size)))
    jax.block_until_ready(draw(jax.random.split(jax.random.key(0), batch)))
    best = np.inf
    for i in range(repeats):
        keys = jax.random.split(jax.random.key(i + 1), batch)
        start = time.perf_counter()
        jax.block_until_ready(draw(keys))
        best = min(best, time.perf_counter() - start)
    return batch / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="kernels per size (x1000)")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    header = f"{'size':>4}  {'quantity':<18}{'mean':>7}" + "".join(
        f"{'q' + str(int(q * 100)):>7}" for q in _QUANTILES) + f"{'max':>7}"
    print(f"motion_kernel defaults, {args.n} kernels per size, seed {args.seed}")
    print(header)
    by_exposure = []
    for size in (19, 31):
        stats = _statistics(size, args.n, args.seed)
        for name, values in stats.items():
            quantiles = "".join(f"{np.quantile(values, q):7.2f}" for q in _QUANTILES)
            print(f"{size:>4}  {name:<18}{values.mean():7.2f}{quantiles}{values.max():7.2f}")
        full_length = 60.0 * size / 64
        for exposure in kernels.DEFAULT_EXPOSURES:
            chosen = np.isclose(stats["length px"], exposure * full_length, rtol=0.01)
            by_exposure.append((size, exposure, chosen.mean(), stats["extent px"][chosen],
                                stats["spread px"][chosen]))
    print("\nby exposure fraction (share of kernels; extent and spread median / q90)")
    print(f"{'size':>4}  {'exposure':>8}{'share':>7}{'extent q50':>12}{'q90':>6}"
          f"{'spread q50':>12}{'q90':>6}")
    for size, exposure, share, extent, spread in by_exposure:
        print(f"{size:>4}  {exposure:>8.2f}{share:>7.2f}{np.median(extent):>12.1f}"
              f"{np.quantile(extent, 0.9):>6.1f}{np.median(spread):>12.2f}"
              f"{np.quantile(spread, 0.9):>6.2f}")
    if args.no_speed:
        return
    print(f"speed: {_speed():.0f} kernels/s (19x19, vmap batch 1000, "
          f"{jax.devices()[0].platform}, best of 5)")


if __name__ == "__main__":
    main()
