"""Blur forward models and their adjoints: uniform, per-pixel and filter-flow blur.

Every operator acts on ONE image `(H, W, C)` and is a cross-correlation (no kernel flip),
like `lax.conv_general_dilated` and the authors' PyTorch code: kernel entry `(i, j)` of a
`(kh, kw)` kernel multiplies the pixel displaced by `(i - rh, j - rw)` from the output
pixel, `rh = (kh - 1) / 2`. Use `flip_kernel` for a true convolution. Batch with
`jax.vmap` at the call site.

| operator | formula | official counterpart |
|---|---|---|
| `conv` | `y = k ⋆ x` | `F.conv2d` |
| `per_pixel_blur` | `y[p] = Σ_{i,j} x_pad[p + (i, j)] · k_p[i, j]` | UFPNet `BatchBlur_SV` |
| `filter_flow_blur(order="mask_first")` | `y = Σ_r k_r ⋆ (w_r ⊙ x)` | Deep EM `EFF.forward` |
| `filter_flow_blur(order="mask_after")` | `y = Σ_r w_r ⊙ (k_r ⋆ x)` | O'Leary / Denis et al. |

Input checking. Ranks, sizes and dtypes are checked at trace time and raise `ValueError`.
Values (NaN / Inf) can only be checked on concrete arrays: the public functions check them
when called eagerly and skip the check silently when traced (under `jax.jit`, `jax.vmap`,
`jax.grad`), because a traced value cannot raise. Callers that jit their own step should
call `check_finite` on their inputs outside the jitted function (it costs one reduction and
a host sync), or wrap the step with `jax.experimental.checkify` if they need the check on
the device.

References:
  Fang et al., "Self-supervised Non-uniform Kernel Estimation with Flow-based Motion Prior
  for Blind Image Deblurring", CVPR 2023 (UFPNet), Sec. 3.2 (re-blurring).
  Li, Wang, Nan, Ji, "Self-Supervised Blind Motion Deblurring with Deep Expectation
  Maximization", CVPR 2023 (Deep EM), Sec. 3.1 (EFF blur model).
  Hirsch, Sra, Schölkopf, Harmeling, "Efficient Filter Flow for Space-Variant Multiframe
  Blind Deconvolution", CVPR 2010.
  Denis, Thiébaut, Soulez, Becker, Mourya, "Fast Approximations of Shift-Variant Blur",
  IJCV 2015 (mask-first vs mask-after product-convolution).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.signal
from jax import lax

BOUNDARIES = ("valid", "zeros", "reflect", "replicate", "circular")
METHODS = ("direct", "fft", "auto")
ORDERS = ("mask_first", "mask_after")

# jnp.pad modes of the padded boundaries. "reflect" mirrors without repeating the edge
# pixel (PyTorch's "reflect"); "replicate" repeats the edge pixel (PyTorch's "replicate").
_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge",
              "circular": "wrap"}

# method="auto" (see `_prefer_fft`). On XLA:CPU the FFT path beat lax.conv at every shape
# measured (64² to 1280×720, 3 channels, kernels 3×3 to 31×31; benchmarks/blur_ops.py
# --auto): e.g. 0.17 vs 0.57 ms at 64²/3×3, 11 vs 33 ms at 256²/3×3, 2.5 vs 272 ms at
# 256²/31×31, 168 vs 3578 ms at 720p/31×31, because XLA:CPU has no fast path for
# single-feature convolutions. On GPU/TPU direct convolutions are fast for small kernels;
# the crossover below is the usual cuDNN one and was NOT measured in this project (no
# accelerator was available): re-measure with the benchmark before relying on it.
_ACCELERATOR_DIRECT_MAX_TAPS = 13 * 13


# --------------------------------------------------------------------------------------
# Input checks.
# --------------------------------------------------------------------------------------


def check_finite(name: str, array) -> None:
    """Raises `ValueError` if a concrete array holds NaN or Inf; does nothing when traced.

    Under `jax.jit` / `vmap` / `grad` values are unknown at trace time, so a traced array
    passes silently. Call this on inputs outside the jitted function to keep the check.

    Args:
      name: the argument name used in the error message.
      array: any array-like.

    Raises:
      ValueError: if the array is concrete and not finite everywhere.
    """
    if isinstance(array, jax.core.Tracer):
        return
    values = np.asarray(array)
    if not np.issubdtype(values.dtype, np.inexact):
        return
    finite = np.isfinite(values)
    if not finite.all():
        n_nan = int(np.isnan(values).sum())
        n_inf = int(values.size - finite.sum() - n_nan)
        raise ValueError(
            f"{name} contains {n_nan} NaN and {n_inf} infinite values (shape "
            f"{values.shape}); clean or mask the input before blurring.")


def _check_float(name: str, array) -> None:
    if not jnp.issubdtype(jnp.asarray(array).dtype, jnp.floating):
        raise ValueError(f"{name} must have a floating dtype; got {jnp.asarray(array).dtype}. "
                         f"Convert it, e.g. `{name}.astype(jnp.float32)`.")


def _check_image(image, name: str = "image") -> None:
    if jnp.ndim(image) != 3:
        raise ValueError(
            f"{name} must have shape (H, W, C); got shape {jnp.shape(image)}. "
            "Operators act on one image: batch them with jax.vmap.")
    _check_float(name, image)
    check_finite(name, image)


def _check_kernel(kernel, image_hw: tuple[int, int], name: str = "kernel") -> None:
    if jnp.ndim(kernel) != 2:
        raise ValueError(f"{name} must have shape (kh, kw); got shape {jnp.shape(kernel)}.")
    _check_odd_and_fits(jnp.shape(kernel), image_hw, name)
    _check_float(name, kernel)
    check_finite(name, kernel)


def _check_odd_and_fits(kernel_hw, image_hw, name: str) -> None:
    kh, kw = kernel_hw
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"{name} sizes must be odd so that the kernel has a centre; got "
                         f"{kh}x{kw}. Pad it with a zero row/column.")
    if kh > image_hw[0] or kw > image_hw[1]:
        raise ValueError(f"{name} of size {kh}x{kw} is larger than the image "
                         f"{image_hw[0]}x{image_hw[1]}; crop the kernel or pad the image.")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}.")


def flip_kernel(kernel: jax.Array) -> jax.Array:
    """Rotates a kernel by 180 degrees, turning a correlation into a convolution.

    `conv(x, flip_kernel(k))` is the true convolution `k * x`.

    Args:
      kernel: (..., kh, kw).

    Returns:
      (..., kh, kw), `kernel[..., ::-1, ::-1]`.
    """
    return jnp.flip(kernel, axis=(-2, -1))


# --------------------------------------------------------------------------------------
# Valid correlation primitives on already padded arrays.
# --------------------------------------------------------------------------------------


def next_fast_len(n: int) -> int:
    """Smallest integer >= n whose prime factors are all in {2, 3, 5, 7} (fast FFT sizes)."""
    best = 2 * n if n > 1 else 1
    power7 = 1
    while power7 < best:
        power5 = power7
        while power5 < best:
            power3 = power5
            while power3 < best:
                m = power3
                while m < n:
                    m *= 2
                best = min(best, m)
                power3 *= 3
            power5 *= 5
        power7 *= 7
    return best


def _prefer_fft(kernel_hw, backend: str | None = None) -> bool:
    """The `method="auto"` rule: FFT or direct for a kernel size on a backend.

    CPU: FFT for every kernel larger than 1×1 (measured faster at every shape tried, see
    `_ACCELERATOR_DIRECT_MAX_TAPS`'s comment). GPU/TPU: direct up to 13×13 taps, FFT above
    (not measured here).
    """
    taps = kernel_hw[0] * kernel_hw[1]
    if (backend or jax.default_backend()) == "cpu":
        return taps > 1
    return taps > _ACCELERATOR_DIRECT_MAX_TAPS


def _valid_correlation_direct(padded, kernels):
    """Valid cross-correlation of G stacks with G kernels by `lax.conv_general_dilated`.

    Args:
      padded: (G, Hp, Wp, C).
      kernels: (G, kh, kw).

    Returns:
      (G, Hp - kh + 1, Wp - kw + 1, C).
    """
    g = kernels.shape[0]
    # The image channels act as the conv batch and the G patches as depthwise feature
    # groups, so one grouped convolution covers every patch with its own kernel.
    rhs = jnp.transpose(kernels, (1, 2, 0))[:, :, None, :]
    return lax.conv_general_dilated(
        padded, rhs, window_strides=(1, 1), padding="VALID",
        dimension_numbers=("CHWN", "HWIO", "CHWN"), feature_group_count=g,
        precision=lax.Precision.HIGHEST)


def _valid_correlation_fft(padded, kernels):
    """Valid cross-correlation of G stacks with G kernels by real FFTs (same contract).

    Circular correlation of length n >= Hp equals linear correlation on the valid part,
    because the valid outputs never read past index Hp - 1. The lengths are rounded up to
    2-3-5-7-smooth sizes where pocketfft / cuFFT are fast.
    """
    _, hp, wp, _ = padded.shape
    kh, kw = kernels.shape[1:]
    n1, n2 = next_fast_len(hp), next_fast_len(wp)
    spectrum = jnp.fft.rfft2(padded, s=(n1, n2), axes=(1, 2))
    kernel_spectrum = jnp.fft.rfft2(kernels, s=(n1, n2), axes=(1, 2))
    full = jnp.fft.irfft2(spectrum * jnp.conj(kernel_spectrum)[..., None], s=(n1, n2),
                          axes=(1, 2))
    return full[:, :hp - kh + 1, :wp - kw + 1].astype(padded.dtype)


def _valid_correlation(padded, kernels, method: str):
    """Dispatches a batched valid correlation: padded (G, Hp, Wp, C), kernels (G, kh, kw)."""
    if method == "auto":
        method = "fft" if _prefer_fft(kernels.shape[1:]) else "direct"
    if method == "fft":
        return _valid_correlation_fft(padded, kernels)
    return _valid_correlation_direct(padded, kernels)


def _pad_image(image, pad_hw, boundary: str):
    """Pads (H, W, C) by pad_hw = (ph, pw) on both sides with the boundary's rule."""
    if boundary == "valid":
        return image
    ph, pw = pad_hw
    return jnp.pad(image, ((ph, ph), (pw, pw), (0, 0)), mode=_PAD_MODES[boundary])


# --------------------------------------------------------------------------------------
# Uniform blur.
# --------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("boundary", "method"))
def _conv(image, kernel, boundary: str, method: str):
    dtype = jnp.result_type(image, kernel)
    kh, kw = kernel.shape
    padded = _pad_image(image.astype(dtype), ((kh - 1) // 2, (kw - 1) // 2), boundary)
    return _valid_correlation(padded[None], kernel.astype(dtype)[None], method)[0]


def conv(image: jax.Array, kernel: jax.Array, *, boundary: str = "zeros",
         method: str = "auto") -> jax.Array:
    """Uniform blur: cross-correlation of every channel with one kernel.

    y[p, c] = Σ_{i,j} x_b[p + (i - rh, j - rw), c] · k[i, j]

    where `x_b` extends the image beyond its border by the boundary rule.

    Args:
      image: (H, W, C) float.
      kernel: (kh, kw) float, odd sizes, kh <= H and kw <= W.
      boundary: "valid" (no padding, output (H-kh+1, W-kw+1, C)), "zeros", "reflect"
        (mirror without repeating the edge), "replicate" (repeat the edge pixel) or
        "circular" (periodic); all but "valid" return (H, W, C).
      method: "direct" (`lax.conv_general_dilated`, channels as batch), "fft" (real FFTs of
        2-3-5-7-smooth length) or "auto": on the CPU always "fft" (faster at every
        measured shape, 64²..720p, kernels 3..31), on GPU/TPU "direct" up to 13×13 and
        "fft" above (see `_prefer_fft`).

    Returns:
      (H, W, C), or (H-kh+1, W-kw+1, C) for boundary="valid", in the promoted dtype.

    Raises:
      ValueError: bad ranks, even or oversized kernels, non-float dtypes, NaN/Inf in
        concrete inputs, unknown boundary or method.

    Example:
      >>> x = jnp.zeros((8, 8, 3)).at[4, 4].set(1.0)
      >>> k = jnp.arange(9.0).reshape(3, 3)
      >>> round(float(conv(x, k)[3, 3, 0]), 4)  # correlation: x[p + (1, 1)] meets k[2, 2]
      8.0
    """
    _check_choice("boundary", boundary, BOUNDARIES)
    _check_choice("method", method, METHODS)
    _check_image(image)
    _check_kernel(kernel, jnp.shape(image)[:2])
    return _conv(image, kernel, boundary, method)


def _conv_input_shape(output_shape, kernel_shape, boundary):
    h, w, c = output_shape
    if boundary == "valid":
        return (h + kernel_shape[0] - 1, w + kernel_shape[1] - 1, c)
    return (h, w, c)


def conv_adjoint(image: jax.Array, kernel: jax.Array, *, boundary: str = "zeros",
                 method: str = "auto") -> jax.Array:
    """Adjoint (transpose) of `conv` in its image argument.

    Satisfies `<conv(x, k), y> = <x, conv_adjoint(y, k)>` for every x, y. For
    boundary="zeros" it is the zero-padded correlation with `flip_kernel(k)`; for the other
    boundaries it also folds the padded border back onto the image (`jax.linear_transpose`
    of the forward, which is exact for every boundary).

    Args:
      image: (H, W, C) in the output space of `conv` ((H-kh+1, W-kw+1, C) for "valid").
      kernel: (kh, kw).
      boundary, method: as in `conv`.

    Returns:
      Array in the input space of `conv`: (H, W, C) or (H+kh-1, W+kw-1, C) for "valid".
    """
    _check_choice("boundary", boundary, BOUNDARIES)
    _check_choice("method", method, METHODS)
    _check_image(image)
    in_shape = _conv_input_shape(jnp.shape(image), jnp.shape(kernel), boundary)
    _check_kernel(kernel, in_shape[:2])
    return _conv_adjoint(image, kernel, boundary, method)


@functools.partial(jax.jit, static_argnames=("boundary", "method"))
def _conv_adjoint(image, kernel, boundary: str, method: str):
    dtype = jnp.result_type(image, kernel)
    in_shape = _conv_input_shape(image.shape, kernel.shape, boundary)
    forward = lambda x: _conv(x, kernel.astype(dtype), boundary, method)
    (adjoint,) = jax.linear_transpose(forward, jax.ShapeDtypeStruct(in_shape, dtype))(
        image.astype(dtype))
    return adjoint


# --------------------------------------------------------------------------------------
# Per-pixel blur (UFPNet).
# --------------------------------------------------------------------------------------

_PER_PIXEL_BOUNDARIES = ("zeros", "reflect", "replicate", "circular")


def _kernel_tap(kernel_field, i, j):
    """(H, W, 1) slice kernel_field[:, :, i, j] (i traced); a slice XLA fuses, not a copy."""
    h, w = kernel_field.shape[:2]
    return lax.dynamic_slice(kernel_field, (0, 0, i, j), (h, w, 1, 1))[..., 0]


def _gather_rows(padded, kernel_field):
    """Σ_{i,j} padded[p + (i, j)] · k_p[i, j] without materialising the k² shifts.

    A `fori_loop` over kernel rows i; inside, the kw column shifts are unrolled static
    slices that XLA fuses into one multiply-add pass. The live memory is the accumulator,
    one row slab of the padded image and one (H, W, kw) row of the kernel field.

    Args:
      padded: (H + kh - 1, W + kw - 1, C).
      kernel_field: (H, W, kh, kw).

    Returns:
      (H, W, C).
    """
    h, w, kh, kw = kernel_field.shape

    def add_row(i, acc):
        slab = lax.dynamic_slice_in_dim(padded, i, h, axis=0)
        for j in range(kw):
            acc = acc + slab[:, j:j + w, :] * _kernel_tap(kernel_field, i, j)
        return acc

    return lax.fori_loop(0, kh, add_row, jnp.zeros((h, w, padded.shape[-1]), padded.dtype))


def _scatter_rows(kernel_field, cotangent):
    """Adjoint of `_gather_rows` in `padded`: x̄[p + (i, j)] += k_p[i, j] · ȳ[p].

    Args:
      kernel_field: (H, W, kh, kw).
      cotangent: (H, W, C).

    Returns:
      (H + kh - 1, W + kw - 1, C).
    """
    h, w, kh, kw = kernel_field.shape
    c = cotangent.shape[-1]

    def add_row(i, acc):
        # One (H, W, kw) kernel row is cut per step (linear in the image size); per channel
        # the kw statically padded column terms fuse into one pass over a row slab. Planar
        # per-channel sums measured ~4x faster on XLA:CPU than one interleaved (H, W, C) sum.
        k_row = lax.dynamic_index_in_dim(kernel_field, i, axis=2, keepdims=False)
        slab = jnp.stack([sum(jnp.pad(k_row[:, :, j] * cotangent[:, :, ch],
                                      ((0, 0), (j, kw - 1 - j)))
                              for j in range(kw))
                          for ch in range(c)], axis=-1)
        old = lax.dynamic_slice_in_dim(acc, i, h, axis=0)
        return lax.dynamic_update_slice_in_dim(acc, old + slab, i, axis=0)

    return lax.fori_loop(0, kh, add_row,
                         jnp.zeros((h + kh - 1, w + kw - 1, c), cotangent.dtype))


def _kernel_field_gradient(padded, cotangent, kernel_hw):
    """Gradient in K of `<_gather_rows(padded, K), ȳ>`.

    K̄_p[i, j] = Σ_c x_pad[p + (i, j), c] · ȳ[p, c]

    Args:
      padded: (H + kh - 1, W + kw - 1, C).
      cotangent: (H, W, C).
      kernel_hw: (kh, kw).

    Returns:
      (H, W, kh, kw).
    """
    h, w, channels = cotangent.shape
    kh, kw = kernel_hw

    def fill_row(i, grad):
        slab = lax.dynamic_slice_in_dim(padded, i, h, axis=0)
        # An explicit sum over the few channels keeps the row one elementwise fusion (a
        # reduce would make XLA:CPU materialise every shifted slab), and writing a whole
        # (H, W, kw) row at once keeps the stores contiguous.
        row = jnp.stack([sum(slab[:, j:j + w, c] * cotangent[:, :, c] for c in range(channels))
                         for j in range(kw)], axis=-1)
        return lax.dynamic_update_index_in_dim(grad, row, i, axis=2)

    return lax.fori_loop(0, kh, fill_row, jnp.zeros((h, w, kh, kw), cotangent.dtype))


def _pad_transpose(padded_cotangent, image_shape, pad_hw, boundary):
    """Adjoint of `_pad_image`: folds the border of a padded array back onto the image."""
    pad = lambda x: _pad_image(x, pad_hw, boundary)
    (folded,) = jax.linear_transpose(
        pad, jax.ShapeDtypeStruct(image_shape, padded_cotangent.dtype))(padded_cotangent)
    return folded


def _radius(kernel_field):
    return ((kernel_field.shape[2] - 1) // 2, (kernel_field.shape[3] - 1) // 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _per_pixel_blur_core(image, kernel_field, boundary):
    return _gather_rows(_pad_image(image, _radius(kernel_field), boundary), kernel_field)


def _per_pixel_blur_fwd(image, kernel_field, boundary):
    # The residuals are the inputs themselves: no per-iteration slabs are saved, which is
    # what reverse-mode of the fori_loop would otherwise store (a full kernel-field copy).
    return _per_pixel_blur_core(image, kernel_field, boundary), (image, kernel_field)


def _per_pixel_blur_bwd(boundary, residuals, cotangent):
    image, kernel_field = residuals
    pad_hw = _radius(kernel_field)
    image_bar = _pad_transpose(_scatter_rows(kernel_field, cotangent), image.shape, pad_hw,
                               boundary)
    padded = _pad_image(image, pad_hw, boundary)
    kernel_bar = _kernel_field_gradient(padded, cotangent, kernel_field.shape[2:])
    return image_bar, kernel_bar


_per_pixel_blur_core.defvjp(_per_pixel_blur_fwd, _per_pixel_blur_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _per_pixel_adjoint_core(image, kernel_field, boundary):
    pad_hw = _radius(kernel_field)
    return _pad_transpose(_scatter_rows(kernel_field, image), image.shape, pad_hw, boundary)


def _per_pixel_adjoint_fwd(image, kernel_field, boundary):
    return _per_pixel_adjoint_core(image, kernel_field, boundary), (image, kernel_field)


def _per_pixel_adjoint_bwd(boundary, residuals, cotangent):
    # B(y, K) = P^T S(K) y with S(K) = G(K)^T, so B's transpose in y is G(K) P (the forward)
    # and <c, B(y, K)> = <G(K) P c, y> gives the kernel-field gradient.
    image, kernel_field = residuals
    padded = _pad_image(cotangent, _radius(kernel_field), boundary)
    image_bar = _gather_rows(padded, kernel_field)
    kernel_bar = _kernel_field_gradient(padded, image, kernel_field.shape[2:])
    return image_bar, kernel_bar


_per_pixel_adjoint_core.defvjp(_per_pixel_adjoint_fwd, _per_pixel_adjoint_bwd)


@functools.partial(jax.jit, static_argnames=("boundary",))
def _per_pixel_blur(image, kernel_field, boundary):
    dtype = jnp.result_type(image, kernel_field)
    return _per_pixel_blur_core(image.astype(dtype), kernel_field.astype(dtype), boundary)


@functools.partial(jax.jit, static_argnames=("boundary",))
def _per_pixel_blur_adjoint(image, kernel_field, boundary):
    dtype = jnp.result_type(image, kernel_field)
    return _per_pixel_adjoint_core(image.astype(dtype), kernel_field.astype(dtype), boundary)


def _check_per_pixel(image, kernel_field, boundary):
    _check_choice("boundary", boundary, _PER_PIXEL_BOUNDARIES)
    _check_image(image)
    if jnp.ndim(kernel_field) != 4:
        raise ValueError(f"kernel_field must have shape (H, W, kh, kw); got shape "
                         f"{jnp.shape(kernel_field)}. Reshape UFPNet's (H*W, k, k) kernels "
                         "row-major to (H, W, k, k).")
    if jnp.shape(kernel_field)[:2] != jnp.shape(image)[:2]:
        raise ValueError(f"kernel_field shape {jnp.shape(kernel_field)} does not match image "
                         f"shape {jnp.shape(image)}: it needs one kernel per pixel, "
                         f"(H, W) = {jnp.shape(image)[:2]}.")
    _check_odd_and_fits(jnp.shape(kernel_field)[2:], jnp.shape(image)[:2], "kernel_field kernel")
    _check_float("kernel_field", kernel_field)
    check_finite("kernel_field", kernel_field)


def per_pixel_blur(image: jax.Array, kernel_field: jax.Array, *,
                   boundary: str = "replicate") -> jax.Array:
    """Spatially varying (per-pixel) blur, UFPNet's re-blurring operator.

    y[p, c] = Σ_{i,j} x_pad[p + (i, j), c] · k_p[i, j]

    with `x_pad` the image padded by `(kh-1)/2, (kw-1)/2` on every side. Every channel uses
    the pixel's kernel; kernels are not renormalised. With the default "replicate" padding
    this is the official `BatchBlur_SV(l=k, padmode="replication")` at batch 1.

    Differences from the official op: it acts on one image and is batched with `jax.vmap`,
    so every image uses its own kernels (the official op pairs channel c of image b with the
    kernels of image (3b + c) mod B when B > 1); any channel count works; and it never
    materialises the k²-fold unfolded image (the official op holds C·B·H·W·k² values). The
    forward accumulates over kernel rows in a `lax.fori_loop`; the gradient is an explicit
    custom VJP (the adjoint scatter for the image, a row-by-row correlation for the kernel
    field), so the backward's working memory is also linear in the image size. The kernel
    field gradient itself is (H, W, kh, kw), the size of the input kernel field.

    Args:
      image: (H, W, C) float.
      kernel_field: (H, W, kh, kw) float, odd kh, kw; pixel p = (r, q) uses
        kernel_field[r, q], i.e. UFPNet's (H·W, k, k) kernels reshaped row-major.
      boundary: "replicate" (official), "zeros", "reflect" or "circular".

    Returns:
      (H, W, C) in the promoted dtype.

    Raises:
      ValueError: bad ranks, a kernel field not matching the image, even or oversized
        kernels, non-float dtypes, NaN/Inf in concrete inputs, unknown boundary.
    """
    _check_per_pixel(image, kernel_field, boundary)
    return _per_pixel_blur(image, kernel_field, boundary)


def per_pixel_blur_adjoint(image: jax.Array, kernel_field: jax.Array, *,
                           boundary: str = "replicate") -> jax.Array:
    """Adjoint of `per_pixel_blur` in its image argument.

    x̄ = P^T x̄_pad,  x̄_pad[p + (i, j), c] = Σ k_p[i, j] · y[p, c]

    where P^T folds the padded border back (replicate padding adds the border onto the edge
    pixels). Satisfies `<per_pixel_blur(x, K), y> = <x, per_pixel_blur_adjoint(y, K)>`. It
    is differentiable in both arguments with an explicit VJP.

    Args:
      image: (H, W, C), a cotangent / residual in the output space.
      kernel_field: (H, W, kh, kw).
      boundary: as in `per_pixel_blur`.

    Returns:
      (H, W, C).
    """
    _check_per_pixel(image, kernel_field, boundary)
    return _per_pixel_blur_adjoint(image, kernel_field, boundary)


# --------------------------------------------------------------------------------------
# Efficient filter flow (Deep EM).
# --------------------------------------------------------------------------------------


class EFFGeometry(NamedTuple):
    """Static geometry of a Bartlett–Hann window grid (Deep EM's `EFF.makeEFF`).

    All fields are Python ints / tuples, so the geometry is hashable and can be a static
    argument of `jax.jit` (or closed over). Field names follow the official attributes.

    Attributes:
      image_size: (H, W).
      blur_size: (bh, bw), the largest kernel size the patches make room for.
      grid_size_arg: the (gh, gw) grid asked for.
      grid_size: the grid used; reversed when it disagrees with the image orientation.
      patch_inner_size: (h_in, w_in), window half-widths: ceil(H/(gh-1)) rounded down to
        even (H when gh = 1).
      patch_size: (h_p, w_p) = (h_in + bh, w_in + bw); a patch is 2h_p × 2w_p.
      padded_size: (H_pad, W_pad) = (y_c[-1] + h_p, x_c[-1] + w_p), the canvas size.
      pad: (top, bottom, left, right) zero padding that centres the image on the canvas.
      y_patch_centers, x_patch_centers: canvas centres g·h_in + h_p and g·w_in + w_p.
      t_patch, b_patch, l_patch, r_patch: canvas extents [t, b) × [l, r) of the patches.
    """

    image_size: tuple[int, int]
    blur_size: tuple[int, int]
    grid_size_arg: tuple[int, int]
    grid_size: tuple[int, int]
    patch_inner_size: tuple[int, int]
    patch_size: tuple[int, int]
    padded_size: tuple[int, int]
    pad: tuple[int, int, int, int]
    y_patch_centers: tuple[int, ...]
    x_patch_centers: tuple[int, ...]
    t_patch: tuple[int, ...]
    b_patch: tuple[int, ...]
    l_patch: tuple[int, ...]
    r_patch: tuple[int, ...]

    @property
    def num_patches(self) -> int:
        """G = gh · gw; patch g = gy · gw + gx (row-major over the grid used)."""
        return self.grid_size[0] * self.grid_size[1]

    @property
    def window(self) -> np.ndarray:
        """(2h_p, 2w_p) float64 window shared by all patches, peak 1 at (h_p, w_p)."""
        return _barthann_window(self.patch_inner_size, self.blur_size, self.grid_size).copy()

    @property
    def window_sum(self) -> np.ndarray:
        """(H_pad, W_pad) float64 sum of the placed windows (not used by the forward)."""
        total = np.zeros(self.padded_size, np.float64)
        window = self.window
        for t, b in zip(self.t_patch, self.b_patch):
            for left, r in zip(self.l_patch, self.r_patch):
                total[t:b, left:r] += window
        return total


@functools.lru_cache(maxsize=64)
def _barthann_window(inner, blur, grid) -> np.ndarray:
    h_in, w_in = inner
    bh, bw = blur

    def axis(half, cells):
        # One cell along an axis: a flat window. The official makeEFF uses barthann(2H + 1)
        # there too, whose centre half covers the image with weights 0.5..1..0.5, so its
        # "uniform" blur darkens the image towards the borders (corner weight 0.34 for a
        # 1x1 grid); a single cell must be a plain convolution.
        if cells == 1:
            return np.ones(2 * half + 1)
        return scipy.signal.windows.barthann(2 * half + 1)

    window = np.outer(axis(h_in, grid[0]), axis(w_in, grid[1]))[:-1, :-1]
    window = np.pad(window, ((bh, bh), (bw, bw)))
    window.setflags(write=False)
    return window


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if np.ndim(value) == 0 else tuple(value)
    if len(pair) != 2 or any(int(v) != v or v < 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints; "
                         f"got {value!r}.")
    return int(pair[0]), int(pair[1])


def eff_windows(image_shape, grid, kernel_size) -> EFFGeometry:
    """Geometry of Deep EM's efficient filter flow: a grid of Bartlett–Hann windows.

    Follows the official `EFF.makeEFF`: the grid is reversed when
    `(H - W)·(gh - gw) < 0` (more patches along the longer side); `h_in = ceil(H/(gh-1))`
    rounded down to even (H if gh = 1); `h_p = h_in + bh`; centres `g·h_in + h_p`; canvas
    `centre[-1] + h_p` with the image centred (top = floor, bottom = ceil of the margin);
    window `outer(barthann(2h_in+1), barthann(2w_in+1))[:-1, :-1]` zero-padded by (bh, bw)
    to 2h_p × 2w_p. The windows sum to ~1 over the image but are not renormalised. Along an
    axis with one cell the window is flat (1): the official barthann window there does not
    sum to 1 over the image (a fix, see `_barthann_window`).

    Args:
      image_shape: (H, W) or (H, W, C).
      grid: (gh, gw) grid asked for (official default (6, 8), 48 kernels).
      kernel_size: int or (bh, bw), the blur size the patches make room for.

    Returns:
      The `EFFGeometry`.

    Raises:
      ValueError: bad sizes, or a grid too fine for the image (h_in < 2).

    Example:
      >>> g = eff_windows((48, 64), (2, 3), 7)
      >>> g.padded_size, g.pad
      ((158, 142), (55, 55, 39, 39))
    """
    if len(image_shape) not in (2, 3):
        raise ValueError(f"image_shape must be (H, W) or (H, W, C); got {image_shape!r}.")
    height, width = _pair(tuple(image_shape[:2]), "image_shape")
    grid_arg = _pair(grid, "grid")
    blur = _pair(kernel_size, "kernel_size")
    gh, gw = grid_arg
    if (height - width) * (gh - gw) < 0:
        gh, gw = gw, gh

    def inner(size, cells):
        if cells == 1:
            return size
        half = math.ceil(size / (cells - 1))
        return half - half % 2

    h_in, w_in = inner(height, gh), inner(width, gw)
    if h_in < 2 or w_in < 2:
        raise ValueError(f"grid {(gh, gw)} is too fine for a {height}x{width} image (window "
                         f"half-width {h_in}x{w_in}); use fewer cells.")
    h_p, w_p = h_in + blur[0], w_in + blur[1]
    y_c = tuple(g * h_in + h_p for g in range(gh))
    x_c = tuple(g * w_in + w_p for g in range(gw))
    h_pad, w_pad = y_c[-1] + h_p, x_c[-1] + w_p
    top, left = (h_pad - height) // 2, (w_pad - width) // 2
    return EFFGeometry(
        image_size=(height, width), blur_size=blur, grid_size_arg=grid_arg,
        grid_size=(gh, gw), patch_inner_size=(h_in, w_in), patch_size=(h_p, w_p),
        padded_size=(h_pad, w_pad),
        pad=(top, h_pad - height - top, left, w_pad - width - left),
        y_patch_centers=y_c, x_patch_centers=x_c,
        t_patch=tuple(c - h_p for c in y_c), b_patch=tuple(c + h_p for c in y_c),
        l_patch=tuple(c - w_p for c in x_c), r_patch=tuple(c + w_p for c in x_c))


def _extract_patches(image, geometry: EFFGeometry, halo_hw):
    """All G canvas patches (plus a zero halo) as one array, without building the canvas.

    Patch g covers canvas rows [t_g - halo_h, b_g + halo_h); the canvas is the zero-padded
    image, so each patch is a `lax.pad` of the image with (possibly negative) padding.
    Rows and columns are cut separately: gh + gw static ops instead of G.

    Returns:
      (G, 2h_p + 2 halo_h, 2w_p + 2 halo_w, C).
    """
    height, width, _ = image.shape
    top, _, left, _ = geometry.pad
    hh, hw = halo_hw
    rows = []
    for t, b in zip(geometry.t_patch, geometry.b_patch):
        lo, hi = top - (t - hh), (b + hh) - top - height
        rows.append(lax.pad(image, jnp.zeros((), image.dtype), ((lo, hi, 0), (0, 0, 0), (0, 0, 0))))
    rows = jnp.stack(rows)
    patches = []
    for lft, r in zip(geometry.l_patch, geometry.r_patch):
        lo, hi = left - (lft - hw), (r + hw) - left - width
        patches.append(lax.pad(rows, jnp.zeros((), image.dtype),
                               ((0, 0, 0), (0, 0, 0), (lo, hi, 0), (0, 0, 0))))
    patches = jnp.stack(patches, axis=1)
    return patches.reshape((-1,) + patches.shape[2:])


def _overlap_add(patches, geometry: EFFGeometry):
    """Sums the G patches (G, 2h_p, 2w_p, C) at their canvas places and crops the image."""
    height, width = geometry.image_size
    top, _, left, _ = geometry.pad
    gh, gw = geometry.grid_size
    patches = patches.reshape((gh, gw) + patches.shape[1:])
    zero = jnp.zeros((), patches.dtype)
    # Negative lax.pad amounts crop, so each patch lands directly in image coordinates.
    rows = sum(lax.pad(patches[:, gx], zero,
                       ((0, 0, 0), (0, 0, 0), (lft - left, left + width - r, 0), (0, 0, 0)))
               for gx, (lft, r) in enumerate(zip(geometry.l_patch, geometry.r_patch)))
    return sum(lax.pad(rows[gy], zero,
                       ((t - top, top + height - b, 0), (0, 0, 0), (0, 0, 0)))
               for gy, (t, b) in enumerate(zip(geometry.t_patch, geometry.b_patch)))


@functools.partial(jax.jit, static_argnames=("geometry", "order", "method"))
def _filter_flow_blur(image, kernels, geometry: EFFGeometry, order: str, method: str):
    dtype = jnp.result_type(image, kernels)
    image, kernels = image.astype(dtype), kernels.astype(dtype)
    kernels = jnp.broadcast_to(kernels, (geometry.num_patches,) + kernels.shape[1:])
    window = jnp.asarray(_barthann_window(geometry.patch_inner_size, geometry.blur_size,
                                          geometry.grid_size),
                         dtype)[None, :, :, None]
    rh, rw = (kernels.shape[1] - 1) // 2, (kernels.shape[2] - 1) // 2
    if order == "mask_first":
        # The official forward writes the valid correlation of each windowed patch at
        # offset (rh, rw) of a zero patch; the window's zero border of width >= the kernel
        # size makes that equal to this zero-padded "same" correlation.
        masked = _extract_patches(image, geometry, (0, 0)) * window
        masked = jnp.pad(masked, ((0, 0), (rh, rh), (rw, rw), (0, 0)))
        blurred = _valid_correlation(masked, kernels, method)
    else:
        blurred = _valid_correlation(_extract_patches(image, geometry, (rh, rw)), kernels,
                                     method) * window
    return _overlap_add(blurred, geometry)


def _check_filter_flow(image, kernels, geometry, order, method):
    _check_choice("order", order, ORDERS)
    _check_choice("method", method, METHODS)
    if not isinstance(geometry, EFFGeometry):
        raise ValueError(f"geometry must be an EFFGeometry from eff_windows; got "
                         f"{type(geometry).__name__}.")
    _check_image(image)
    if tuple(jnp.shape(image)[:2]) != tuple(geometry.image_size):
        raise ValueError(f"image shape {jnp.shape(image)} does not match the geometry's "
                         f"image_size {geometry.image_size}; rebuild it with eff_windows.")
    if jnp.ndim(kernels) != 3 or jnp.shape(kernels)[0] not in (1, geometry.num_patches):
        raise ValueError(f"kernels must have shape (G, kh, kw) with G = "
                         f"{geometry.num_patches} (grid {geometry.grid_size}) or G = 1; got "
                         f"shape {jnp.shape(kernels)}.")
    kh, kw = jnp.shape(kernels)[1:]
    _check_odd_and_fits((kh, kw), jnp.shape(image)[:2], "kernels")
    if kh > geometry.blur_size[0] or kw > geometry.blur_size[1]:
        raise ValueError(f"kernels of size {kh}x{kw} exceed the geometry's blur_size "
                         f"{geometry.blur_size}; the patches would clip them. Rebuild the "
                         "geometry with eff_windows(..., kernel_size=(kh, kw)).")
    _check_float("kernels", kernels)
    check_finite("kernels", kernels)


def filter_flow_blur(image: jax.Array, kernels: jax.Array, geometry: EFFGeometry, *,
                     order: str = "mask_first", method: str = "auto") -> jax.Array:
    """Efficient filter flow: a sum of windowed, locally uniform blurs.

    mask_first (Deep EM's EFF):  y = crop( Σ_g k_g ⋆ (w_g ⊙ x_canvas) )
    mask_after (O'Leary):        y = crop( Σ_g w_g ⊙ (k_g ⋆ x_canvas) )

    `x_canvas` is the image zero-padded to the geometry's canvas, `w_g` the window placed at
    patch g, and `⋆` the zero-padded cross-correlation. With the default arguments this is
    the official `EFF.forward(padimg(x, pad), kernels)`, any channel count, one image (vmap
    for batches; the official op returns zeros for a second image). All patches are cut
    as one (G, 2h_p, 2w_p, C) array, blurred by one grouped convolution or one batched FFT,
    and overlap-added, so jit / vmap / grad (in the image and the kernels) all apply.

    With one kernel repeated over all cells, mask_first gives `conv(x · Wsum, k)` and
    mask_after gives `conv(x, k) · Wsum` (Wsum = placed window sum, ~1 inside the image).

    Args:
      image: (H, W, C) float, (H, W) == geometry.image_size.
      kernels: (G, kh, kw) float, one kernel per patch in row-major grid order, or
        (1, kh, kw) for the uniform model; odd sizes, at most geometry.blur_size.
      geometry: from `eff_windows` (static: close over it or pass it as a static arg).
      order: "mask_first" or "mask_after".
      method: "direct", "fft" or "auto", as in `conv`, applied to the patches.

    Returns:
      (H, W, C) in the promoted dtype.

    Raises:
      ValueError: bad ranks, kernel count or size, dtypes, NaN/Inf in concrete inputs, a
        geometry for another image size.
    """
    _check_filter_flow(image, kernels, geometry, order, method)
    return _filter_flow_blur(image, kernels, geometry, order, method)


def filter_flow_blur_adjoint(image: jax.Array, kernels: jax.Array, geometry: EFFGeometry, *,
                             order: str = "mask_first", method: str = "auto") -> jax.Array:
    """Adjoint of `filter_flow_blur` in its image argument.

    mask_first: x̄ = crop( Σ_g w_g ⊙ (flip(k_g) ⋆ y_canvas) ) — a mask-after model with
    flipped kernels; mask_after: x̄ = crop( Σ_g flip(k_g) ⋆ (w_g ⊙ y_canvas) ). Computed as
    the exact `jax.linear_transpose` of the forward.

    Args:
      image: (H, W, C) in the output space.
      kernels, geometry, order, method: as in `filter_flow_blur`.

    Returns:
      (H, W, C).
    """
    _check_filter_flow(image, kernels, geometry, order, method)
    return _filter_flow_blur_adjoint(image, kernels, geometry, order, method)


@functools.partial(jax.jit, static_argnames=("geometry", "order", "method"))
def _filter_flow_blur_adjoint(image, kernels, geometry, order, method):
    dtype = jnp.result_type(image, kernels)
    forward = lambda x: _filter_flow_blur(x, kernels.astype(dtype), geometry, order, method)
    (adjoint,) = jax.linear_transpose(forward, jax.ShapeDtypeStruct(image.shape, dtype))(
        image.astype(dtype))
    return adjoint
