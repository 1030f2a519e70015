"""NAFNet building blocks (NHWC), with NAFNet's test-time local pooling (TLC).

The blocks follow the official PyTorch NAFNet (megvii-research/NAFNet, ``NAFNet_arch.py``
and ``arch_util.py``) as vendored by UFPDeblur, translated to the channels-last layout:

* ``LayerNorm2d`` normalises over the channels of each pixel (biased variance, eps 1e-6);
* ``SimpleGate`` splits the channels in two halves and multiplies them;
* simplified channel attention (SCA) multiplies by a 1x1 conv of the average-pooled
  features: a global average during training, a local box average of a fixed window at test
  time when the block is given ``pool_window`` (TLC, ``local_arch.py``);
* the two residual branches are scaled by the learned per-channel ``beta`` and ``gamma``,
  initialised to zero so that a fresh block is the identity.

References:
    Chen, Chu, Zhang, Sun, "Simple Baselines for Image Restoration", ECCV 2022.
    Chu, Chen, Sun, "Improving Image Restoration by Revisiting Global Information
    Aggregation" (TLC), ECCV 2022.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

LAYER_NORM_EPS = 1e-6


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, PyTorch's default; ``jax.nn.gelu`` defaults to the tanh form."""
    return jax.nn.gelu(x, approximate=False)


def conv(features: int, kernel: int, *, stride: int = 1, padding: Optional[int] = None,
         groups: int = 1, use_bias: bool = True, name: Optional[str] = None,
         kernel_init=nn.initializers.lecun_normal()) -> nn.Conv:
    """A PyTorch-style ``Conv2d`` with a square kernel and symmetric zero padding.

    ``padding`` defaults to ``kernel // 2`` for stride 1 ('same') and to 0 for strided
    convolutions (NAFNet's 2x2 stride-2 down-sampling, ``nn.Conv2d(c, 2c, 2, 2)``).
    """
    pad = padding if padding is not None else (kernel // 2 if stride == 1 else 0)
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), feature_group_count=groups,
                   use_bias=use_bias, name=name, kernel_init=kernel_init)


class LayerNorm2d(nn.Module):
    """Per-pixel layer norm over channels: ``y = w·(x − μ_c)/sqrt(var_c + eps) + b``.

    ``var_c`` is the biased variance over the C channels of each pixel (official
    ``LayerNormFunction``), eps = 1e-6.

    Attributes:
        eps: added to the variance.
    """

    eps: float = LAYER_NORM_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (..., C) -> (..., C)."""
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        mu = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
        return (x - mu) / jnp.sqrt(var + self.eps) * scale + bias


def simple_gate(x: jax.Array) -> jax.Array:
    """SimpleGate: ``x[..., :C/2] · x[..., C/2:]`` (official ``x.chunk(2, dim=1)``)."""
    if x.shape[-1] % 2:
        raise ValueError(f"simple_gate needs an even channel count, got shape {x.shape}")
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x1 * x2


def _box_sum(x: jax.Array, window: int, axis: int) -> jax.Array:
    """Sums of ``window`` consecutive entries along ``axis`` ('valid' positions only).

    Cumulative sums make the cost independent of the window (TLC windows reach 384 px);
    doing one axis at a time keeps the partial sums, and so their float32 rounding, small.
    """
    csum = jnp.cumsum(x, axis=axis)
    zero = jnp.zeros_like(jax.lax.slice_in_dim(csum, 0, 1, axis=axis))
    csum = jnp.concatenate([zero, csum], axis=axis)
    n = x.shape[axis]
    upper = jax.lax.slice_in_dim(csum, window, n + 1, axis=axis)
    lower = jax.lax.slice_in_dim(csum, 0, n + 1 - window, axis=axis)
    return upper - lower


def local_avg_pool(x: jax.Array, window: Sequence[int]) -> jax.Array:
    """TLC average pool of one feature map (official ``local_arch.AvgPool2d``, auto_pad).

    With features of size h×w and window (kh, kw):
    * if ``kh >= h`` and ``kw >= w``: the global mean, shape (1, 1, C);
    * else the mean over each valid k1×k2 box, ``k1 = min(h, kh)``, ``k2 = min(w, kw)``
      (size (h−k1+1)×(w−k2+1)), replicate-padded back to h×w with
      ``(h−_h)//2`` rows on top and ``(h−_h+1)//2`` at the bottom (likewise columns).

    The per-channel mean is subtracted before the cumulative sums and added back, which
    keeps float32 partial sums small on large images.

    Args:
        x: (h, w, C) features of one image.
        window: (kh, kw) pooling window in pixels, each >= 1.

    Returns:
        (h, w, C) local means, or (1, 1, C) when the window covers the whole map.
    """
    if x.ndim != 3:
        raise ValueError(f"local_avg_pool expects one (h, w, C) feature map, got shape {x.shape}")
    kh, kw = (int(v) for v in window)
    if kh < 1 or kw < 1:
        raise ValueError(f"pooling window must be >= 1 in both directions, got {window}")
    h, w, _ = x.shape
    if kh >= h and kw >= w:
        return jnp.mean(x, axis=(0, 1), keepdims=True)
    k1, k2 = min(h, kh), min(w, kw)
    offset = jnp.mean(x, axis=(0, 1), keepdims=True)
    centred = x - offset
    pooled = _box_sum(_box_sum(centred, k1, axis=0), k2, axis=1) / (k1 * k2) + offset
    out_h, out_w = h - k1 + 1, w - k2 + 1
    pad = (((h - out_h) // 2, (h - out_h + 1) // 2), ((w - out_w) // 2, (w - out_w + 1) // 2),
           (0, 0))
    return jnp.pad(pooled, pad, mode="edge")


def tlc_window(feature_size: Sequence[int], train_size: Sequence[int]) -> tuple[int, int]:
    """The TLC pooling window of a pool that sees ``feature_size`` at the training size.

    Official ``Local_Base.convert``: ``base = (int(1.5·T_H), int(1.5·T_W))`` and the window
    is ``(h_T·base_H // T_H, w_T·base_W // T_W)``, where ``h_T×w_T`` is the feature size at the
    training input size T. For T = 256² this gives 384, 192, 96, 48, 24 from full resolution
    down.

    Args:
        feature_size: (h_T, w_T), the feature size this pool sees for a training-size input.
        train_size: (T_H, T_W), the training crop size.

    Returns:
        (kh, kw) the window.
    """
    (h_t, w_t), (t_h, t_w) = feature_size, train_size
    return (h_t * int(1.5 * t_h) // t_h, w_t * int(1.5 * t_w) // t_w)


class NAFBlock(nn.Module):
    """NAFNet block: ``y = x + β·body(x)``, ``out = y + γ·ffn(y)``.

    ``body = conv3 ∘ SCA ∘ SimpleGate ∘ dwconv3x3 ∘ conv1 ∘ LayerNorm2d`` and
    ``ffn = conv5 ∘ SimpleGate ∘ conv4 ∘ LayerNorm2d``; ``SCA(u) = u · conv1x1(pool(u))``
    with pool the global mean, or the TLC local mean when ``pool_window`` is set.

    Attributes:
        channels: C, the block's input and output channels.
        dw_expand: channel expansion of the depthwise branch (official 2).
        ffn_expand: channel expansion of the feed-forward branch (official 2).
        pool_window: None for global average pooling (training), or (kh, kw) for TLC.
    """

    channels: int
    dw_expand: int = 2
    ffn_expand: int = 2
    pool_window: Optional[tuple[int, int]] = None

    def pool(self, u: jax.Array) -> jax.Array:
        """(B, h, w, C) -> (B, 1, 1, C) global mean, or (B, h, w, C) local TLC mean."""
        if self.pool_window is None:
            return jnp.mean(u, axis=(1, 2), keepdims=True)
        return jax.vmap(lambda f: local_avg_pool(f, self.pool_window))(u)

    def body_branch(self, h: jax.Array) -> jax.Array:
        """The first residual branch on h (B, H, W, C), before the ``β`` scale."""
        c = self.channels
        dw = c * self.dw_expand
        u = LayerNorm2d(name="norm1")(h)
        u = conv(dw, 1, name="conv1")(u)
        u = conv(dw, 3, groups=dw, name="conv2")(u)
        u = simple_gate(u)
        u = u * conv(dw // 2, 1, name="sca")(self.pool(u))
        return conv(c, 1, name="conv3")(u)

    def ffn_branch(self, y: jax.Array) -> jax.Array:
        """The feed-forward branch on y (B, H, W, C), before the ``γ`` scale."""
        c = self.channels
        u = conv(c * self.ffn_expand, 1, name="conv4")(LayerNorm2d(name="norm2")(y))
        return conv(c, 1, name="conv5")(simple_gate(u))

    def layer_scales(self) -> tuple[jax.Array, jax.Array]:
        """(beta, gamma), each (C,), zero-initialised."""
        beta = self.param("beta", nn.initializers.zeros, (self.channels,))
        gamma = self.param("gamma", nn.initializers.zeros, (self.channels,))
        return beta, gamma

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        if x.ndim != 4 or x.shape[-1] != self.channels:
            raise ValueError(f"NAFBlock({self.channels}) expects (B, H, W, {self.channels}), "
                             f"got shape {x.shape}")
        beta, gamma = self.layer_scales()
        y = x + self.body_branch(x) * beta
        return y + self.ffn_branch(y) * gamma


def pixel_shuffle(x: jax.Array, factor: int = 2) -> jax.Array:
    """PyTorch ``PixelShuffle`` in NHWC: ``out[2y+i, 2x+j, c] = in[y, x, 4c + 2i + j]``.

    Args:
        x: (B, h, w, C·r²) features.
        factor: r.

    Returns:
        (B, r·h, r·w, C).
    """
    b, h, w, cr2 = x.shape
    r = factor
    if cr2 % (r * r):
        raise ValueError(f"pixel_shuffle({r}) needs channels divisible by {r * r}, got {x.shape}")
    c = cr2 // (r * r)
    x = x.reshape(b, h, w, c, r, r).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * r, w * r, c)
