"""Statistics of the kernel generators, against measured camera shake, and their speed.

``--families`` (issue #16): for every generator — ``motion`` (`motion_kernel` defaults, the
shipped prior's data), the calibrated ``boracchi_foi``, ``gaussian_process``, ``spline`` and
their ``mixture`` (`jaxdeblur/configs/flow_prior.py`) — the median and q10–q90 of the
measures below over ``--n`` 19×19 kernels, in a markdown table next to the same measures of
Lai's 4 measured kernels fitted into the window (`jaxdeblur.kernels.fit_kernel`, the
config's ``real_kernels`` settings); and a figure of samples of each family beside the real
kernels (``--png``, default ``docs/kernel_samples_vs_real.png``)::

    python benchmarks/kernel_stats.py --families [--n 1000] [--real DIR] [--png PATH]

Measures (`kernel_measures`, one definition for generated and measured kernels):
  * support: pixels above 5% of the kernel's maximum;
  * extent: the diagonal of the support's bounding box, between pixel centres;
  * length: the support's geodesic diameter — the longest of the shortest paths between
    two support pixels that step only between support pixels at most 2 px apart (so a
    one-pixel gap in a faint stretch does not cut the path), each step as long as the
    distance it covers. For a thin curve it is the curve's length; a path that doubles back
    on itself counts once;
  * tortuosity (the curvature measure): length / the distance between the two ends of
    that geodesic; 1 for a straight kernel, π/2 for a half circle;
  * thickness: support / (length + 1); 1 for a one-pixel-wide curve, large for a
    compact scribble whose turns fill its bounding box;
  * centroid offset: distance of the centre of mass from the window centre;
  * peak: the largest entry (kernels sum to 1), high where the camera dwelt.

Without ``--families``: the legacy `motion_kernel` statistics below.

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
import pathlib
import sys
import time

import jax
import numpy as np
from scipy.sparse import csgraph

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from jaxdeblur import kernels  # noqa: E402
from jaxdeblur.configs import flow_prior as flow_prior_config  # noqa: E402

_REAL = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "lai" / "kernel_npy"
FAMILY_NAMES = ("motion",) + kernels.FAMILIES + ("mixture",)
_SUPPORT_THRESHOLD = 0.05
_MEASURES = ("support px", "extent px", "length px", "tortuosity", "thickness px",
             "centroid offset px", "peak")

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


def kernel_measures(kernel: np.ndarray) -> dict[str, float]:
    """The measures of the module docstring for one kernel ``(k, k)``."""
    kernel = np.asarray(kernel, np.float64)
    support = kernel > _SUPPORT_THRESHOLD * kernel.max()
    pixels = np.argwhere(support)
    distance = np.hypot(*(pixels[:, None] - pixels[None]).transpose(2, 0, 1))
    # Dense weighted adjacency (0 = no edge): the graph has at most k² nodes.
    adjacency = np.where(distance <= 2.0 + 1e-9, distance, 0.0)
    geodesic = csgraph.shortest_path(adjacency, method="D", directed=False)
    geodesic[~np.isfinite(geodesic)] = -1.0  # support pieces more than 2 px apart
    first, last = np.unravel_index(np.argmax(geodesic), geodesic.shape)
    length, chord = geodesic[first, last], distance[first, last]
    grid = np.arange(kernel.shape[0])
    total = kernel.sum()
    centre = (kernel.shape[0] - 1) / 2
    com = (kernel.sum(1) @ grid / total - centre, kernel.sum(0) @ grid / total - centre)
    return {
        "support px": float(support.sum()),
        "extent px": float(np.hypot(np.ptp(pixels[:, 0]), np.ptp(pixels[:, 1]))),
        "length px": float(length),
        "tortuosity": float(length / chord) if chord > 0 else 1.0,
        "thickness px": float(support.sum() / (length + 1.0)),
        "centroid offset px": float(np.hypot(*com)),
        "peak": float(kernel.max() / total),
    }


def load_kernel(path: pathlib.Path) -> np.ndarray:
    """A measured kernel from ``.npy`` or an image (``.png``; RGB averaged), any scale."""
    if path.suffix == ".npy":
        return np.load(path)
    from PIL import Image

    image = np.asarray(Image.open(path), np.float64)
    return image.mean(-1) if image.ndim == 3 else image


def real_kernels(directory: pathlib.Path, fit_size: int, threshold: float,
                 size: int = 19) -> dict[str, np.ndarray]:
    """The measured kernels ``*.npy`` / ``*.png`` of a directory fitted into the window.

    A file that holds one of the 8 rotations/flips of an earlier file's kernel (Lai's
    ``*_conv.npy`` are the 180° rotations of the others) is left out.
    """
    def same_up_to_rotation(a: np.ndarray, b: np.ndarray) -> bool:
        variants = [np.rot90(m, r) for m in (a, a.T) for r in range(4)]
        return any(v.shape == b.shape and np.allclose(v / v.sum(), b / b.sum())
                   for v in variants)

    fitted: dict[str, np.ndarray] = {}
    raw: list[np.ndarray] = []
    for path in sorted(directory.glob("*.npy")) + sorted(directory.glob("*.png")):
        kernel = load_kernel(path)
        if any(same_up_to_rotation(known, kernel) for known in raw):
            continue
        raw.append(kernel)
        fitted[path.name] = kernels.fit_kernel(kernel, size, fit_size=fit_size,
                                               threshold=threshold)
    if not fitted:
        raise SystemExit(f"no *.npy or *.png kernels in {directory}")
    return fitted


def family_samples(name: str, n: int, seed: int, size: int = 19) -> dict[str, np.ndarray]:
    """``n`` kernels of a generator and the quantities it drew (length, exposure, fit)."""
    keys = jax.random.split(jax.random.key(seed), n)
    if name == "motion":
        draw = jax.jit(jax.vmap(functools.partial(kernels.motion_kernel, size=size)))
        return {"kernel": np.asarray(draw(keys))}
    config = kernels.generator_config(name, flow_prior_config.generator_settings(name))
    draw = jax.jit(jax.vmap(lambda key: kernels.draw_kernel(config, size, key=key)))
    return {k: np.asarray(v) for k, v in draw(keys)._asdict().items()}


def _figure(samples: dict[str, np.ndarray], real: dict[str, np.ndarray], path: str,
            per_row: int = 8) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.25 * (per_row + 5), 1.3 * len(samples)))
    grid = fig.add_gridspec(len(samples), per_row + 5, wspace=0.08, hspace=0.25)
    real_items = list(real.items())
    for row, (name, batch) in enumerate(samples.items()):
        for col in range(per_row):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(batch[col], cmap="gray", vmin=0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name, fontsize=8)
        if row < len(real_items):
            ax = fig.add_subplot(grid[row, per_row + 1:per_row + 2])
            label, kernel = real_items[row]
            ax.imshow(kernel, cmap="gray", vmin=0, interpolation="nearest")
            ax.set_title(f"Lai {label}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("19×19 samples of each generator (left, each scaled to its max) beside "
                 "Lai's measured kernels fitted into the window (right)", fontsize=9)
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def families_table(n: int, seed: int, real_dir: pathlib.Path, png: str | None) -> None:
    """The ``--families`` report (see the module docstring)."""
    settings = flow_prior_config.get_config().real_kernels
    real = real_kernels(real_dir, settings.fit_size, settings.threshold)
    real_measures = {name: kernel_measures(k) for name, k in real.items()}
    samples, summaries = {}, {}
    for name in FAMILY_NAMES:
        start = time.perf_counter()
        drawn = family_samples(name, n, seed)
        samples[name] = drawn["kernel"]
        measures = [kernel_measures(k) for k in drawn["kernel"]]
        summaries[name] = {m: np.array([x[m] for x in measures]) for m in _MEASURES}
        print(f"# {name}: {n} kernels drawn and measured in {time.perf_counter() - start:.1f} s",
              file=sys.stderr)
    labels = [name.removesuffix(".npy").removesuffix(".png").replace("kernel_", "Lai ")
              for name in real]
    print(f"Measures of {n} 19x19 kernels per generator (seed {seed}): median (q10-q90); "
          f"Lai's kernels from {real_dir} fitted by fit_kernel(fit_size={settings.fit_size}, "
          f"threshold={settings.threshold}).\n")
    print("| measure | " + " | ".join(labels) + " | " + " | ".join(FAMILY_NAMES) + " |")
    print("|---" * (1 + len(labels) + len(FAMILY_NAMES)) + "|")
    for measure in _MEASURES:
        digits = 3 if measure == "peak" else (0 if measure == "support px" else 1)
        cells = [f"{real_measures[name][measure]:.{digits}f}" for name in real]
        for name in FAMILY_NAMES:
            values = summaries[name][measure]
            q10, q50, q90 = np.quantile(values, (0.1, 0.5, 0.9))
            cells.append(f"{q50:.{digits}f} ({q10:.{digits}f}–{q90:.{digits}f})")
        print(f"| {measure} | " + " | ".join(cells) + " |")
    if png:
        _figure(samples, real, png)
        print(f"\nwrote {png}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None,
                        help="kernels per size (x1000; default 4000), or per family with "
                             "--families (default 1000)")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", action="store_true",
                        help="compare the generator families with measured kernels")
    parser.add_argument("--real", type=pathlib.Path, default=_REAL,
                        help="with --families: directory of measured kernels (*.npy, *.png)")
    parser.add_argument("--png", default="docs/kernel_samples_vs_real.png",
                        help="with --families: the sample figure ('' for none)")
    args = parser.parse_args()
    if args.families:
        families_table(args.n or 1000, args.seed, args.real, args.png)
        return
    args.n = args.n or 4000
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
