"""Figures for results: kernel fields, before/after comparisons, uncertainty, training curves.

Every function draws on a fresh `matplotlib.figure.Figure` rendered by the Agg backend
(no pyplot, so no global state and no display needed) and writes one PNG whose pixel
size is fixed by ``width_px`` and the layout, not by the content, so that figures for
README pages have predictable sizes. Images are ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or
``(H, W, 4)`` float arrays in [0, 1]; gray images are drawn with a gray colour map and an
alpha channel is dropped for display.
"""

import json
import math
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

_DPI = 100


def _display(image) -> tuple[np.ndarray, dict]:
    """Returns an array imshow accepts and the imshow keyword arguments for it."""
    image = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    if image.ndim == 3 and image.shape[-1] in (2, 4):
        image = image[..., :-1]
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        return image, {"cmap": "gray", "vmin": 0.0, "vmax": 1.0, "interpolation": "nearest"}
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"expected an image (H, W) or (H, W, C) with C in 1..4, got shape {image.shape}")
    return image, {"interpolation": "nearest"}


def _new_figure(width_px: int, height_px: int) -> Figure:
    return Figure(figsize=(width_px / _DPI, height_px / _DPI), dpi=_DPI)


def _save(fig: Figure, path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)
    return path


def _bare(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def grid_centres(image_shape, grid: tuple[int, int]) -> np.ndarray:
    """Pixel centres ``(rows * cols, 2)`` as ``(y, x)`` of a regular grid of cells."""
    height, width = image_shape[:2]
    rows, cols = grid
    ys = (np.arange(rows) + 0.5) * height / rows
    xs = (np.arange(cols) + 0.5) * width / cols
    return np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(-1, 2)


def sample_kernel_field(kernel_field, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Picks the kernels of a per-pixel field at the centres of a grid of cells.

    Args:
      kernel_field: ``(H, W, k, k)`` per-pixel kernels.
      grid: ``(rows, cols)``.

    Returns:
      ``(kernels (rows * cols, k, k), centres (rows * cols, 2))`` with centres as ``(y, x)``.
    """
    kernel_field = np.asarray(kernel_field)
    if kernel_field.ndim != 4 or kernel_field.shape[2] != kernel_field.shape[3]:
        raise ValueError(f"expected a kernel field (H, W, k, k), got shape {kernel_field.shape}")
    centres = grid_centres(kernel_field.shape, grid)
    index = np.floor(centres).astype(int)
    return kernel_field[index[:, 0], index[:, 1]], centres


def kernel_field_figure(image, kernels, centres, path, *, title: str | None = None,
                        width_px: int = 900, inset_fraction: float = 0.6) -> pathlib.Path:
    """Draws estimated blur kernels as small insets on the photo at the points they act.

    Each kernel is shown normalised to its own maximum (shape, not mass, is what the eye
    compares), magnified into a square inset of ``inset_fraction`` times the spacing of
    the centres (at most a quarter of the photo's short side), moved inward where it would
    cross the photo's border.

    Args:
      image: ``(H, W[, C])`` in [0, 1].
      kernels: ``(N, k, k)`` non-negative kernels.
      centres: ``(N, 2)`` pixel positions ``(y, x)`` of the kernels.
      path: PNG file to write.
      title: optional title.
      width_px: figure width in pixels; the height follows the image's aspect ratio.
      inset_fraction: inset side relative to the centre spacing.

    Returns:
      The path written.
    """
    shown, kwargs = _display(image)
    kernels = np.asarray(kernels, dtype=np.float32)
    centres = np.asarray(centres, dtype=np.float32).reshape(-1, 2)
    if kernels.ndim != 3 or kernels.shape[0] != centres.shape[0]:
        raise ValueError(
            f"expected kernels (N, k, k) and centres (N, 2) with the same N, got "
            f"{kernels.shape} and {centres.shape}")
    height, width = shown.shape[:2]
    title_px = 30 if title else 0
    fig = _new_figure(width_px, int(round(width_px * height / width)) + title_px)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0 - title_px / (fig.get_figheight() * _DPI)))
    ax.imshow(shown, **kwargs)
    _bare(ax)
    if title:
        fig.suptitle(title, fontsize=11, y=1.0 - 0.5 * title_px / (fig.get_figheight() * _DPI),
                     va="center")
    spacing = _min_spacing(centres, default=0.5 * min(height, width))
    # At most a quarter of the short side, so a coarse grid leaves the photo visible.
    side = max(min(inset_fraction * spacing, 0.25 * min(height, width)), 2.0)
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    # Insets are placed in axes fractions: the image's y axis points down.
    size_x, size_y = side / width, side / height
    for kernel, (cy, cx) in zip(kernels, centres):
        peak = kernel.max()
        fx, fy = (cx + 0.5) / width, 1.0 - (cy + 0.5) / height
        # Kernels at the border (filter-flow cells are centred on it) are moved inward
        # just enough for their inset to stay on the photo.
        x0 = float(np.clip(fx - size_x / 2, 0.0, max(1.0 - size_x, 0.0)))
        y0 = float(np.clip(fy - size_y / 2, 0.0, max(1.0 - size_y, 0.0)))
        inset = ax.inset_axes((x0, y0, size_x, size_y), transform=ax.transAxes)
        inset.imshow(kernel / peak if peak > 0 else kernel, cmap="magma", vmin=0.0, vmax=1.0,
                     interpolation="nearest")
        _bare(inset)
        for spine in inset.spines.values():
            spine.set_edgecolor("white")
            spine.set_linewidth(0.6)
    return _save(fig, path)


def _min_spacing(centres: np.ndarray, default: float) -> float:
    if len(centres) < 2:
        return float(default)
    diff = centres[:, None, :] - centres[None, :, :]
    dist = np.sqrt((diff ** 2).sum(-1))
    dist[np.diag_indices(len(centres))] = np.inf
    # Grid neighbours are axis-aligned: the spacing is the smallest pairwise distance.
    return float(dist.min())


def detail_crop(image, size: int) -> tuple[int, int, int, int]:
    """The ``(y, x, h, w)`` square crop of side ``size`` with the most gradient energy.

    Scans a coarse grid of candidate positions (stride ``size // 2``) and returns the one
    whose mean squared finite difference is largest, so that zoomed comparisons show
    edges rather than flat sky.
    """
    gray, _ = _display(image)
    if gray.ndim == 3:
        gray = gray.mean(-1)
    height, width = gray.shape
    size = max(1, min(size, height, width))
    energy = np.zeros_like(gray)
    energy[:, 1:] += np.diff(gray, axis=1) ** 2
    energy[1:, :] += np.diff(gray, axis=0) ** 2
    integral = np.pad(energy.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    stride = max(1, size // 2)
    best, best_pos = -1.0, (0, 0)
    for y in list(range(0, height - size + 1, stride)) + [height - size]:
        for x in list(range(0, width - size + 1, stride)) + [width - size]:
            total = (integral[y + size, x + size] - integral[y, x + size]
                     - integral[y + size, x] + integral[y, x])
            if total > best:
                best, best_pos = total, (y, x)
    return best_pos[0], best_pos[1], size, size


def comparison_figure(images: Sequence, titles: Sequence[str], path, *,
                      crop: tuple[int, int, int, int] | None = None,
                      crop_source: int = -1, width_px: int = 1200,
                      kernel=None, kernel_fraction: float = 0.28) -> pathlib.Path:
    """Before/after panels side by side, with a zoomed crop of each under it.

    Args:
      images: two or more images of the same ``(H, W)`` (e.g. blurry, restored, sharp).
      titles: one title per image (e.g. with PSNR figures).
      path: PNG file to write.
      crop: ``(y, x, h, w)`` of the zoomed region; default: the square of side
        ``min(H, W) // 4`` with the most detail in ``images[crop_source]``.
      crop_source: which image picks the default crop.
      width_px: figure width in pixels.
      kernel: an optional ``(k, k)`` blur kernel, drawn (normalised to its maximum, white
        on black) in the top-right corner of the last panel.
      kernel_fraction: the kernel inset's side as a fraction of a panel's width.

    Returns:
      The path written.
    """
    if len(images) != len(titles) or not images:
        raise ValueError(f"need one title per image, got {len(images)} images and "
                         f"{len(titles)} titles")
    shown = [_display(image) for image in images]
    shape = shown[0][0].shape[:2]
    for array, _ in shown:
        if array.shape[:2] != shape:
            raise ValueError(f"all images must have the same size, got {shape} and "
                             f"{array.shape[:2]}")
    if crop is None:
        crop = detail_crop(images[crop_source], max(1, min(shape) // 4))
    y, x, h, w = crop
    n = len(images)
    panel_w = width_px / n
    title_px = 28
    panel_h = panel_w * shape[0] / shape[1]
    crop_h = panel_w * h / w
    fig = _new_figure(width_px, int(round(title_px + panel_h + crop_h)))
    total_h = fig.get_figheight() * _DPI
    for i, ((array, kwargs), title) in enumerate(zip(shown, titles)):
        top = fig.add_axes((i / n, (crop_h) / total_h, 1 / n, panel_h / total_h))
        top.imshow(array, **kwargs)
        top.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor="yellow",
                                linewidth=1.2))
        top.set_title(title, fontsize=10)
        _bare(top)
        bottom = fig.add_axes((i / n, 0.0, 1 / n, crop_h / total_h))
        bottom.imshow(array[y:y + h, x:x + w], **kwargs)
        _bare(bottom)
    if kernel is not None:
        k = np.asarray(kernel, np.float32)
        if k.ndim != 2:
            raise ValueError(f"kernel must be (k, k), got shape {k.shape}")
        side = min(kernel_fraction * panel_w, 0.9 * panel_h)
        inset = fig.add_axes((1 - side / width_px, (crop_h + panel_h - side) / total_h,
                              side / width_px, side / total_h))
        inset.imshow(k / max(float(k.max()), 1e-12), cmap="gray", vmin=0, vmax=1,
                     interpolation="nearest")
        for spine in inset.spines.values():
            spine.set_edgecolor("yellow")
        _bare(inset)
    return _save(fig, path)


def uncertainty_figure(image, uncertainty, path, *, title: str = "uncertainty",
                       width_px: int = 1000) -> pathlib.Path:
    """The photo beside a heat map of a per-pixel uncertainty (e.g. MCEM's sample std).

    Args:
      image: ``(H, W[, C])`` in [0, 1].
      uncertainty: ``(H, W)`` or ``(H, W, C)`` non-negative; channels are averaged.
      path: PNG file to write.
      title: title of the heat map.
      width_px: figure width in pixels.

    Returns:
      The path written.
    """
    shown, kwargs = _display(image)
    uncertainty = np.asarray(uncertainty, dtype=np.float32)
    if uncertainty.ndim == 3:
        uncertainty = uncertainty.mean(-1)
    if uncertainty.shape != shown.shape[:2]:
        raise ValueError(f"uncertainty must be (H, W) = {shown.shape[:2]}, got "
                         f"{uncertainty.shape}")
    height, width = uncertainty.shape
    bar_px, title_px = 70, 28
    panel_w = (width_px - bar_px) / 2
    panel_h = panel_w * height / width
    fig = _new_figure(width_px, int(round(panel_h + title_px)))
    fig_h = fig.get_figheight() * _DPI
    left = fig.add_axes((0.0, 0.0, panel_w / width_px, panel_h / fig_h))
    left.imshow(shown, **kwargs)
    left.set_title("image", fontsize=10)
    _bare(left)
    right = fig.add_axes((panel_w / width_px, 0.0, panel_w / width_px, panel_h / fig_h))
    vmax = float(uncertainty.max()) if uncertainty.max() > 0 else 1.0
    heat = right.imshow(uncertainty, cmap="inferno", vmin=0.0, vmax=vmax,
                        interpolation="nearest")
    right.set_title(title, fontsize=10)
    _bare(right)
    bar = fig.add_axes((2 * panel_w / width_px + 0.01, 0.05, 0.02, 0.9 * panel_h / fig_h))
    fig.colorbar(heat, cax=bar)
    return _save(fig, path)


def read_metrics_jsonl(path) -> list[dict]:
    """Reads a JSON-lines metrics file (one object with "step" and metrics per line).

    Blank lines are skipped; a line that is not a JSON object raises ValueError naming
    the line number.
    """
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number} is not valid JSON ({err})") from err
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number} is not a JSON object")
            records.append(record)
    return records


def training_curves_figure(metrics: str | os.PathLike | Iterable[Mapping], path, *,
                           keys: Sequence[str] | None = None, log_scale: Sequence[str] = (),
                           width_px: int = 1000, panel_height_px: int = 260) -> pathlib.Path:
    """Training curves, one panel per metric, against "step".

    Args:
      metrics: a JSON-lines file or the records themselves; each record has "step" and
        any number of numeric metrics (records may hold different subsets, e.g. train and
        eval lines).
      path: PNG file to write.
      keys: metrics to draw; default all numeric keys except "step", in first-seen order.
      log_scale: metrics drawn on a log y axis.
      width_px: figure width; panels are laid out two per row.
      panel_height_px: height of one row of panels.

    Returns:
      The path written.

    Raises:
      ValueError: if no record has a "step" or no metric is found.
    """
    records = (read_metrics_jsonl(metrics) if isinstance(metrics, (str, os.PathLike))
               else list(metrics))
    records = [r for r in records if "step" in r]
    if not records:
        raise ValueError("no metric record has a 'step' key")
    if keys is None:
        keys = []
        for record in records:
            for name, value in record.items():
                if (name != "step" and name not in keys and isinstance(value, (int, float))
                        and not isinstance(value, bool)):
                    keys.append(name)
    if not keys:
        raise ValueError("no numeric metric found besides 'step'")
    cols = 1 if len(keys) == 1 else 2
    rows = math.ceil(len(keys) / cols)
    fig = _new_figure(width_px, rows * panel_height_px)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, name in zip(axes.ravel(), keys):
        points = sorted((r["step"], r[name]) for r in records
                        if isinstance(r.get(name), (int, float)))
        steps = [p[0] for p in points]
        values = [p[1] for p in points]
        ax.plot(steps, values, marker="." if len(points) < 30 else None, linewidth=1.2)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3)
        if name in log_scale and values and min(values) > 0:
            ax.set_yscale("log")
    for ax in axes.ravel()[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    return _save(fig, path)
