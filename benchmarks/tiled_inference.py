"""Memory of tiled inference on a large photo (default 4000x3000) against whole-image inference.

Run (about a minute on a 2-core CPU; add --ufpnet to also compile one full-size UFPNet
tile, a few more minutes):

    PYTHONPATH=. python benchmarks/tiled_inference.py [--height 3000 --width 4000]
        [--tile 512 --overlap 64 --batch-size 1] [--ufpnet]

What it measures, in one process:

1. ``tiled_apply`` of a small two-level conv net (`_ConvNet`, 3 -> 16 -> 3 channels, the
   same structure as the tiling tests) on a random ``H x W x 3`` image: the process's peak
   resident memory (``ru_maxrss``) before and after, wall time, and XLA's compiled memory
   of one batch of tiles (``memory_analysis()``: arguments + outputs + temporaries);
2. for comparison, the compiled memory XLA would need to run the same net on the whole
   image at once (compiled, not run);
3. with ``--ufpnet``: the compiled memory of one tile of the full GoPro UFPNet
   (width 64, encoder [1, 1, 1, 28], TLC windows for 256-px training crops), built from
   abstract shapes (no weights are allocated) -- the per-tile figure to add to the image
   buffers for the real model.

The bound stated in the README: peak memory = the input image + two host accumulators of
the padded size (weighted sum, weight sum: ``4 B x Hp x Wp x (C_out + 1)``) + the compiled
memory of one batch of tiles + the weights; nothing else grows with the photo size.
`tests/test_tiling.py` checks the 4000x3000 case against 500 MB of RSS growth.
"""

import argparse
import resource
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdeblur import tiling

MB = 2 ** 20


class _ConvNet(nn.Module):
    """A small fully-convolutional two-level net (receptive-field radius 8)."""

    @nn.compact
    def __call__(self, image):
        feat = nn.gelu(nn.Conv(16, (3, 3))(image))
        down = nn.gelu(nn.Conv(16, (3, 3))(nn.avg_pool(feat, (2, 2), strides=(2, 2))))
        up = jnp.repeat(jnp.repeat(down, 2, axis=-3), 2, axis=-2)
        return image + nn.Conv(image.shape[-1], (3, 3))(jnp.concatenate([feat, up], -1))


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _compiled_mb(fn, *args) -> dict:
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    if analysis is None:
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
    sizes = {f.split("_size")[0]: getattr(analysis, f, 0) / MB for f in fields}
    sizes["total"] = sum(sizes.values())
    return sizes


def _ufpnet_tile_memory(tile: int, batch_size: int) -> dict:
    from jaxdeblur.nets.ufpnet import UFPNet

    module = UFPNet(width=64, enc_blk_nums=(1, 1, 1, 28), middle_blk_num=1,
                    dec_blk_nums=(1, 1, 1, 1), kernel_size=19, train_size=(256, 256))
    tiles = jax.ShapeDtypeStruct((batch_size, tile, tile, 3), jnp.float32)
    key = jax.random.key(0)
    variables = jax.eval_shape(lambda: module.init(
        {"params": key}, jnp.zeros((1, 32, 32, 3)), key=key))
    n_params = sum(np.prod(x.shape) for x in jax.tree.leaves(variables["params"]))

    def restore(variables, tiles, key):
        return module.apply(variables, tiles, key=key)[1]

    sizes = _compiled_mb(restore, variables, tiles, key)
    sizes["parameters"] = int(n_params)
    return sizes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--ufpnet", action="store_true",
                        help="also compile one full-size UFPNet tile (slow to compile)")
    args = parser.parse_args(argv)

    shape = (args.height, args.width, 3)
    module = _ConvNet()
    variables = module.init(jax.random.key(0), jnp.zeros((16, 16, 3)))

    def net(tile):
        return module.apply(variables, tile)

    rss_start = _peak_rss_mb()
    image = np.random.default_rng(0).uniform(size=shape).astype(np.float32)
    grid = tiling.plan_tiles(shape, tile=args.tile, overlap=args.overlap, multiple=16)
    (hp, wp), (th, tw) = grid.padded_shape, grid.tile_shape
    buffers_mb = 4 * hp * wp * (3 + 1) / MB
    tile_mb = _compiled_mb(jax.vmap(net), jax.ShapeDtypeStruct(
        (args.batch_size, th, tw, 3), jnp.float32))
    rss_before = _peak_rss_mb()
    start = time.perf_counter()
    out = tiling.tiled_apply(net, image, tile=args.tile, overlap=args.overlap, multiple=16,
                             batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    rss_after = _peak_rss_mb()
    assert out.shape == shape and np.all(np.isfinite(out))
    whole_mb = _compiled_mb(net, jax.ShapeDtypeStruct((hp, wp, 3), jnp.float32))

    print(f"tiled inference of a {args.width}x{args.height} RGB image, tile {th}x{tw}, "
          f"overlap {grid.overlap} (margin {grid.margin}), {len(grid.origins)} tiles, "
          f"batch {args.batch_size}, {jax.devices()[0].platform}")
    print(f"{'quantity':<58} {'measured':>12}")
    rows = [
        ("input image (float32)", image.nbytes / MB),
        ("host accumulators of tiled_apply (weighted sum + weights)", buffers_mb),
        ("compiled memory of one tile batch, conv net", tile_mb.get("total", float("nan"))),
        ("  of which temporaries", tile_mb.get("temp", float("nan"))),
        ("compiled memory of the WHOLE image, conv net (not run)",
         whole_mb.get("total", float("nan"))),
        ("peak RSS before the image was allocated", rss_start),
        ("peak RSS after tiled inference", rss_after),
        ("peak RSS growth during tiled inference", rss_after - rss_before),
    ]
    for name, value in rows:
        print(f"{name:<58} {value:>9.1f} MB")
    print(f"{'wall time of tiled inference':<58} {seconds:>10.1f} s")
    if args.ufpnet:
        sizes = _ufpnet_tile_memory(th, args.batch_size)
        print(f"{'UFPNet GoPro (' + format(sizes['parameters'], ',') + ' params): one tile':<58}"
              f" {sizes.get('total', float('nan')):>9.1f} MB")
        for part in ("argument", "output", "temp"):
            print(f"{'  ' + part:<58} {sizes.get(part, float('nan')):>9.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
