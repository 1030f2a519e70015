"""Overlapping-tile inference for images larger than a network (or memory) allows.

A 4000x3000 photo through an 80 M-parameter NAFNet needs tens of GB of activations; an
MCEM run scales its memory and time with the pixel count. `tiled_apply` cuts the image
into equal overlapping tiles, runs one compiled function per tile, and blends the tile
outputs with a smooth weight that is normalised by the summed weights:

    out[p] = sum_t w_t(p) * f(tile_t)[p - o_t] / sum_t w_t(p)

where ``o_t`` is the tile origin and ``w_t`` a separable window ``w_y(i) * w_x(j)``. On a
side where the tile touches the image border the window is 1; on an interior side it is 0
over a *guard margin* of ``margin`` pixels (where a convolutional network sees the tile's
artificial border instead of the neighbouring pixels), then rises as a half Hann
(``sin^2``) ramp over the rest of the overlap. Two neighbouring tiles' ramps are mirror
images, so within an overlap of exactly ``overlap`` pixels they sum to 1 (a partition of
unity); elsewhere the normalisation takes care of it.

Exactness: if every output pixel of ``fn`` depends only on inputs within ``r`` pixels
(its receptive-field radius) and ``r <= margin``, the tiled output equals whole-image
inference on the same padded canvas up to float rounding: every pixel with a non-zero
weight was computed with its full receptive field inside the tile. Networks with an
unbounded receptive field (global pooling; TLC's local pooling has a window of 384 px at
full resolution) differ at the seams by the part of the context the tile cannot see; the
ramp hides that as a smooth blend rather than a visible edge.

Memory: the tile function is compiled once (every tile has the same shape, the last tile
in each row/column is moved inward rather than shrunk) and the tiles are run from a
host-side Python loop in fixed-size batches of ``batch_size`` tiles (`jax.vmap` of the
tile function). Peak memory is therefore the compiled memory of one batch of tiles plus
two host accumulators the size of the padded image (weighted sum, weight sum) besides
the input, not the activations of the whole image: tiles are cut from the unpadded input
with reflected indices, so no padded copy is made. A host loop rather than `lax.map`
keeps the image buffers in host memory (numpy), so the accelerator only ever holds one
batch of tiles. Measured (``benchmarks/tiled_inference.py``, 4000x3000 RGB, 512-px
tiles): 412 MB of RSS growth for image + buffers + tile, against 2.8 GB of compiled
memory for whole-image inference of even a small conv net.

Strided networks: tiles start at multiples of ``multiple`` and have sizes that are
multiples of it, so every tile's downsampling grid is aligned with the whole image's.
"""

import math
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class TileGrid(NamedTuple):
    """Where the tiles of one image lie.

    Attributes:
      image_shape: ``(H, W)`` of the input.
      padded_shape: ``(Hp, Wp)``, the input padded up to multiples of ``multiple``.
      tile_shape: ``(th, tw)``, the size of every tile (multiples of ``multiple``).
      starts_y: row origins of the tiles, multiples of ``multiple``, last one ``Hp - th``.
      starts_x: column origins, likewise.
      overlap: the nominal overlap in pixels (a multiple of ``multiple``).
      margin: the guard margin (zero weight) at interior tile edges.
    """
    image_shape: tuple[int, int]
    padded_shape: tuple[int, int]
    tile_shape: tuple[int, int]
    starts_y: tuple[int, ...]
    starts_x: tuple[int, ...]
    overlap: int
    margin: int

    @property
    def origins(self) -> list[tuple[int, int]]:
        """Tile origins ``(y, x)`` in row-major order."""
        return [(y, x) for y in self.starts_y for x in self.starts_x]


# jit(vmap(fn)) per tile function, so that repeated calls (one per photo) reuse the
# compiled executable instead of tracing a fresh wrapper each time.
_BATCHED: "weakref.WeakKeyDictionary[Callable, Callable]" = weakref.WeakKeyDictionary()


def _batched(fn: Callable) -> Callable:
    try:
        return _BATCHED[fn]
    except (KeyError, TypeError):
        pass
    batched = jax.jit(jax.vmap(fn))
    try:
        _BATCHED[fn] = batched
    except TypeError:  # not weak-referenceable (e.g. some callables of C extensions)
        pass
    return batched


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _starts(size: int, tile: int, stride: int) -> tuple[int, ...]:
    if tile >= size:
        return (0,)
    n = math.ceil((size - tile) / stride) + 1
    starts = [i * stride for i in range(n - 1)] + [size - tile]
    return tuple(sorted(set(starts)))


def plan_tiles(image_shape, *, tile, overlap: int, multiple: int = 16,
               margin: int | None = None) -> TileGrid:
    """Plans the tiles of an image.

    Args:
      image_shape: ``(H, W)`` or ``(H, W, C)``.
      tile: tile size, an int (square) or ``(th, tw)``; rounded up to ``multiple`` and
        clipped to the padded image.
      overlap: overlap between neighbouring tiles in pixels; rounded up to ``multiple``.
      multiple: tile sizes and origins are multiples of it (16 for a 4-level U-Net).
      margin: zero-weight guard at interior tile edges; default ``overlap // 4``. Set it to
        at least the receptive-field radius of the tile function for exact agreement with
        whole-image inference.

    Returns:
      A `TileGrid`.

    Raises:
      ValueError: if the tile is not larger than the overlap, or the margin leaves no ramp.
    """
    if len(image_shape) not in (2, 3):
        raise ValueError(f"expected an image shape (H, W) or (H, W, C), got {image_shape}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    height, width = int(image_shape[0]), int(image_shape[1])
    tile_h, tile_w = (tile, tile) if isinstance(tile, int) else tuple(tile)
    overlap = _round_up(max(int(overlap), 0), multiple)
    margin = overlap // 4 if margin is None else int(margin)
    if overlap > 0 and not 0 <= 2 * margin < overlap:
        raise ValueError(
            f"margin={margin} leaves no blending ramp in an overlap of {overlap} px: use "
            f"0 <= 2 * margin < overlap")
    padded = (_round_up(height, multiple), _round_up(width, multiple))
    tile_shape = (min(_round_up(tile_h, multiple), padded[0]),
                  min(_round_up(tile_w, multiple), padded[1]))
    for size, tile_size, name in zip(padded, tile_shape, ("height", "width")):
        if tile_size < size and tile_size <= overlap:
            raise ValueError(
                f"tile {name} {tile_size} must exceed the overlap {overlap} (after rounding to "
                f"multiples of {multiple}); use a larger tile or a smaller overlap")
    starts_y = _starts(padded[0], tile_shape[0], tile_shape[0] - overlap)
    starts_x = _starts(padded[1], tile_shape[1], tile_shape[1] - overlap)
    return TileGrid((height, width), padded, tile_shape, starts_y, starts_x, overlap, margin)


def _ramp(overlap: int, margin: int) -> np.ndarray:
    """Rising edge of the window: 0 over the guard margin, then a half Hann up to 1."""
    ramp = np.zeros(overlap, np.float64)
    length = overlap - 2 * margin
    i = np.arange(length) + 0.5
    ramp[margin:overlap - margin] = np.sin(0.5 * np.pi * i / length) ** 2
    ramp[overlap - margin:] = 1.0
    return ramp


def blend_window_1d(length: int, *, rise: bool, fall: bool, overlap: int,
                    margin: int) -> np.ndarray:
    """One axis of the blending window of a tile.

    Args:
      length: tile length along the axis.
      rise: whether the tile's leading side is interior (ramp up from 0).
      fall: whether the trailing side is interior (ramp down to 0).
      overlap: overlap in pixels.
      margin: guard margin in pixels (zero weight), ``2 * margin < overlap``.

    Returns:
      ``(length,)`` float32 weights in [0, 1].
    """
    window = np.ones(length, np.float64)
    if overlap > 0:
        ramp = _ramp(overlap, margin)
        if rise:
            window[:overlap] *= ramp
        if fall:
            window[length - overlap:] *= ramp[::-1]
    return window.astype(np.float32)


def tile_weights(grid: TileGrid, origin: tuple[int, int]) -> np.ndarray:
    """The separable ``(th, tw)`` blending window of the tile at ``origin``."""
    (y, x), (th, tw), (hp, wp) = origin, grid.tile_shape, grid.padded_shape
    wy = blend_window_1d(th, rise=y > 0, fall=y + th < hp, overlap=grid.overlap,
                         margin=grid.margin)
    wx = blend_window_1d(tw, rise=x > 0, fall=x + tw < wp, overlap=grid.overlap,
                         margin=grid.margin)
    return np.outer(wy, wx)


def pad_to_multiple(image, multiple: int, *, mode: str = "reflect") -> np.ndarray:
    """Pads ``(H, W, ...)`` at the bottom/right up to multiples of ``multiple``.

    `tiled_apply` pads this way; whole-image inference to compare against must too.
    ``mode`` is a `numpy.pad` mode; "reflect" falls back to "symmetric" for images too
    small to reflect.
    """
    image = np.asarray(image)
    pad_h = _round_up(image.shape[0], multiple) - image.shape[0]
    pad_w = _round_up(image.shape[1], multiple) - image.shape[1]
    if pad_h == 0 and pad_w == 0:
        return image
    if mode == "reflect" and (pad_h >= image.shape[0] or pad_w >= image.shape[1]):
        mode = "symmetric"
    widths = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (image.ndim - 2)
    return np.pad(image, widths, mode=mode)


def _padded_indices(start: int, length: int, size: int, mode: str) -> np.ndarray:
    """Source indices of canvas positions ``start .. start + length`` for a bottom/right
    padding of an axis of ``size`` samples (numpy's "reflect", "symmetric" or "edge")."""
    index = np.arange(start, start + length)
    beyond = index >= size
    if mode == "reflect":
        index = np.where(beyond, 2 * (size - 1) - index, index)
    elif mode == "symmetric":
        index = np.where(beyond, 2 * size - 1 - index, index)
    return np.clip(index, 0, size - 1)


def _tile_reader(image: np.ndarray, grid: TileGrid, pad_mode: str):
    """``read(y, x) -> (th, tw, C)`` tile of the padded canvas, without building the canvas
    for the index-based modes (a padded copy would add one image-sized buffer)."""
    (th, tw), (height, width) = grid.tile_shape, image.shape[:2]
    pad_h, pad_w = grid.padded_shape[0] - height, grid.padded_shape[1] - width
    if pad_mode == "reflect" and (pad_h >= height or pad_w >= width):
        pad_mode = "symmetric"  # as `pad_to_multiple`
    if pad_mode not in ("reflect", "symmetric", "edge"):
        canvas = np.pad(image, [(0, pad_h), (0, pad_w), (0, 0)], mode=pad_mode)
        return lambda y, x: canvas[y:y + th, x:x + tw]

    def read(y: int, x: int) -> np.ndarray:
        if y + th <= height and x + tw <= width:
            return image[y:y + th, x:x + tw]
        rows = _padded_indices(y, th, height, pad_mode)
        cols = _padded_indices(x, tw, width, pad_mode)
        return image[np.ix_(rows, cols)]

    return read


def tiled_apply(fn: Callable[..., Any], image, *, tile, overlap: int, multiple: int = 16,
                margin: int | None = None, batch_size: int = 1, pad_mode: str = "reflect",
                key: jax.Array | None = None, compile_fn: bool = True,
                progress: bool = False):
    """Applies an image-to-image function tile by tile and blends the seams.

    Args:
      fn: ``fn(tile)`` or, when ``key`` is given, ``fn(tile, key)``; ``tile`` is
        ``(th, tw, C)`` float32 and the result a pytree of arrays whose leading two axes are
        ``(th, tw)`` (e.g. a restored image ``(th, tw, 3)`` and a map ``(th, tw)``).
      image: ``(H, W, C)`` float array.
      tile: tile size (int or ``(th, tw)``), rounded up to ``multiple``. Peak memory grows
        with ``batch_size * th * tw``.
      overlap: overlap between tiles in pixels, rounded up to ``multiple``.
      multiple: size/origin granularity (16 for a network that downsamples 4 times).
      margin: zero-weight guard at interior tile edges (default ``overlap // 4``); see the
        module docstring for when the result is exact.
      batch_size: tiles per call of the compiled function (`jax.vmap`); the last batch is
        filled up with repeats so that the function compiles once.
      pad_mode: `numpy.pad` mode used to pad the image to multiples of ``multiple``.
      key: optional PRNG key; tile ``t`` (row-major) gets ``jax.random.fold_in(key, t)``.
      compile_fn: jit (and vmap) ``fn``. Set False for a function that drives its own host
        loop (MCEM); it is then called exactly once per tile, in row-major order of
        `TileGrid.origins`, and ``batch_size`` must be 1.
      progress: show a tqdm bar over tile batches.

    Returns:
      The blended outputs, a pytree like ``fn``'s with numpy float32 leaves of leading shape
      ``(H, W)``.

    Raises:
      ValueError: for an image that is not ``(H, W, C)``, a bad batch size, or an ``fn``
        whose outputs do not have the tile's spatial size.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"expected an image (H, W, C), got shape {image.shape}")
    if batch_size < 1 or (not compile_fn and batch_size != 1):
        raise ValueError(
            f"batch_size must be >= 1 (and 1 when compile_fn=False), got {batch_size}")
    grid = plan_tiles(image.shape, tile=tile, overlap=overlap, multiple=multiple,
                      margin=margin)
    read_tile = _tile_reader(image, grid, pad_mode)
    (th, tw), origins = grid.tile_shape, grid.origins
    keys = None if key is None else [jax.random.fold_in(key, t) for t in range(len(origins))]

    batched = _batched(fn) if compile_fn else fn
    # Buffers are allocated from the first outputs: with compile_fn=False the function may
    # drive its own host loop, which cannot be traced by `jax.eval_shape`.
    sums = None
    weight_sum = np.zeros(grid.padded_shape, np.float32)

    batches = [list(range(i, min(i + batch_size, len(origins))))
               for i in range(0, len(origins), batch_size)]
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="tiles", unit="batch", leave=False)
    for indices in batches:
        if compile_fn:
            filled = indices + [indices[-1]] * (batch_size - len(indices))
            tiles = np.stack([read_tile(*origins[t]) for t in filled])
            args = (tiles,) if key is None else (tiles, jnp.stack([keys[t] for t in filled]))
            outputs = jax.tree.map(np.asarray, batched(*args))
        else:
            y, x = origins[indices[0]]
            args = (read_tile(y, x),)
            args += () if key is None else (keys[indices[0]],)
            outputs = jax.tree.map(lambda a: np.asarray(a)[None], batched(*args))
        if sums is None:
            for leaf in jax.tree.leaves(outputs):
                if leaf.shape[1:3] != (th, tw):
                    raise ValueError(
                        f"fn must return arrays whose leading axes are the tile size "
                        f"{(th, tw)}, got an output of shape {leaf.shape[1:]}")
            sums = jax.tree.map(
                lambda a: np.zeros(grid.padded_shape + a.shape[3:], np.float32), outputs)
        for slot, t in enumerate(indices):
            y, x = origins[t]
            weights = tile_weights(grid, (y, x))

            def accumulate(total, out, weights=weights, slot=slot, y=y, x=x):
                w = weights.reshape(weights.shape + (1,) * (out.ndim - 3))
                total[y:y + th, x:x + tw] += w * out[slot].astype(np.float32)

            jax.tree.map(accumulate, sums, outputs)
            weight_sum[y:y + th, x:x + tw] += weights

    height, width = grid.image_shape

    def normalise(total):
        # In place: a second image-sized buffer would raise the peak memory by a third.
        w = weight_sum.reshape(weight_sum.shape + (1,) * (total.ndim - 2))
        np.divide(total, w, out=total)
        return total[:height, :width]

    return jax.tree.map(normalise, sums)
