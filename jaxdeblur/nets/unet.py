"""Deep-image-prior networks of Deep EM: the image network T_f and the kernel network T_K.

Both are encoder-decoder "skip" networks in the style of Ulyanov et al.'s deep image prior
(DIP) as used by SelfDeblur and Deep EM: every level is a stride-2 convolution followed by a
3x3 convolution (each followed by normalisation and LeakyReLU), the decoder upsamples
bilinearly, concatenates a narrow 1x1 "skip" branch of the same level and applies a 3x3 and a
1x1 convolution. Both networks map a *fixed* noise input to their output, so their
parameters re-parametrise the unknown image and kernels.

Normalisation is GroupNorm rather than the BatchNorm of the DIP code. DIP runs BatchNorm in
training mode on a batch of one image, i.e. it normalises with the statistics of that one
image; GroupNorm computes the same kind of per-example statistics, has no running
averages to carry (nothing to hide in a mutable collection), and stays per-example under
``jax.vmap`` over a batch of images, which batch statistics would not.

References:
    Ulyanov, Vedaldi, Lempitsky, "Deep Image Prior", CVPR 2018 (the skip architecture).
    Ren et al., "Neural Blind Deconvolution Using Deep Priors", CVPR 2020 (SelfDeblur).
    Li, Wang, Nan, Ji, "Self-Supervised Blind Motion Deblurring With Deep Expectation
    Maximization", CVPR 2023, Sec. 4 (image net 5 levels x 64, kernel net [32, 32, 64, 64]).
"""

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["SkipNet", "DIPImageNet", "KernelNet", "per_kernel_softmax", "fixed_noise"]


def per_kernel_softmax(logits: jax.Array) -> jax.Array:
    """Softmax over the ``kh*kw`` entries of each kernel map (Deep EM's ``Mysoftmax``).

    ``k_g[i, j] = exp(l_g[i, j]) / sum_{i', j'} exp(l_g[i', j'])``: every kernel is
    non-negative and sums to one.

    Args:
        logits: (G, kh, kw) float, one logit map per kernel.

    Returns:
        (G, kh, kw) kernels, each >= 0 and summing to 1.

    Raises:
        ValueError: if ``logits`` is not rank 3.
    """
    if logits.ndim != 3:
        raise ValueError(f"per_kernel_softmax expects logits of shape (G, kh, kw), got "
                         f"{logits.shape}; add a leading axis for a single kernel")
    g, kh, kw = logits.shape
    return jax.nn.softmax(logits.reshape(g, kh * kw), axis=-1).reshape(g, kh, kw)


def fixed_noise(key: jax.Array, shape: Sequence[int], *, scale: float = 0.1) -> jax.Array:
    """The fixed DIP input ``z ~ scale * U(0, 1)`` of the given (H, W, C) shape.

    Args:
        key: PRNG key.
        shape: (H, W, C) of the noise map.
        scale: amplitude (DIP uses 0.1).

    Returns:
        (H, W, C) float32 noise, drawn once and kept fixed during the optimisation.
    """
    return scale * jax.random.uniform(key, tuple(shape), jnp.float32)


def _norm_act(x: jax.Array, norm: str, num_groups: int, slope: float) -> jax.Array:
    if norm == "group":
        x = nn.GroupNorm(num_groups=math.gcd(num_groups, x.shape[-1]), epsilon=1e-5)(x)
    elif norm != "none":
        raise ValueError(f"norm must be 'group' or 'none', got {norm!r}")
    return nn.leaky_relu(x, negative_slope=slope)


class SkipNet(nn.Module):
    """DIP "skip" encoder-decoder on one example (no batch axis).

    Level l (0-based) of the encoder: ``d_l = NA(Conv3x3(NA(Conv3x3_s2(d_{l-1}))))`` and
    skip ``s_l = NA(Conv1x1(d_{l-1}))`` (NA = normalisation then LeakyReLU). Decoder, from the
    deepest level up: ``u = NA(Conv1x1(NA(Conv3x3(concat(up(u), s_l)))))`` with ``up`` a
    bilinear resize to the skip's size (any input size works, odd ones included). The head
    is a 1x1 convolution to ``out_channels``, with no activation: the caller chooses it.

    Attributes:
        features: channels per level, e.g. (64,) * 5; its length is the number of levels.
        skip_features: channels of each 1x1 skip branch (>= 1; the decoder takes each
            level's size from it).
        out_channels: channels of the output.
        norm: "group" (GroupNorm, per-example statistics) or "none".
        num_groups: GroupNorm groups (reduced to a divisor of the channel count).
        negative_slope: LeakyReLU slope (DIP: 0.2).
        zero_init_head: zero-initialise the head, so a fresh network outputs 0 everywhere
            (the kernel net then starts from flat kernels, identical for every head).
    """

    features: Sequence[int] = (64, 64, 64, 64, 64)
    skip_features: int = 4
    out_channels: int = 3
    norm: str = "group"
    num_groups: int = 8
    negative_slope: float = 0.2
    zero_init_head: bool = False

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        """Maps the fixed noise input z: (H, W, C_in) to (H, W, out_channels) pre-activations."""
        if z.ndim != 3:
            raise ValueError(f"{type(self).__name__} takes one example of shape (H, W, C), got "
                             f"{z.shape}; batch with jax.vmap")
        if self.skip_features < 1 or not self.features:
            raise ValueError(f"SkipNet needs skip_features >= 1 and at least one level, got "
                             f"skip_features={self.skip_features}, features={self.features}")
        act = lambda x: _norm_act(x, self.norm, self.num_groups, self.negative_slope)
        # A bias before a normalisation only shifts what the normalisation removes: its
        # gradient is ~0, and a Langevin sampler preconditioned by 1/sqrt(E[g^2]) would
        # inject unbounded noise into it. Normalised convolutions therefore have no bias.
        bias = self.norm == "none"
        conv = functools.partial(nn.Conv, use_bias=bias)
        x = z[None]  # GroupNorm reduces over all but the leading axis: keep a unit batch.
        skips = []
        for feat in self.features:
            skips.append(act(conv(self.skip_features, (1, 1))(x)))
            x = act(conv(feat, (3, 3), strides=(2, 2), padding="SAME")(x))
            x = act(conv(feat, (3, 3), padding="SAME")(x))
        for feat, skip in zip(reversed(self.features), reversed(skips)):
            x = jax.image.resize(x, skip.shape[:3] + (x.shape[-1],), method="bilinear")
            x = jnp.concatenate([x, skip], axis=-1)
            x = act(conv(feat, (3, 3), padding="SAME")(x))
            x = act(conv(feat, (1, 1))(x))
        init = nn.initializers.zeros if self.zero_init_head else nn.linear.default_kernel_init
        x = nn.Conv(self.out_channels, (1, 1), kernel_init=init)(x)
        return x[0]


class DIPImageNet(nn.Module):
    """Image network ``x = sigmoid(SkipNet(z))`` of Deep EM / SelfDeblur.

    Attributes:
        features: channels per level (paper: 5 levels of 64).
        skip_features: channels of the skip branches (DIP: 4; we default to 16).
        out_channels: image channels (1 or 3).
        norm, num_groups, negative_slope: see `SkipNet`.
    """

    features: Sequence[int] = (64, 64, 64, 64, 64)
    skip_features: int = 16
    out_channels: int = 3
    norm: str = "group"
    num_groups: int = 8
    negative_slope: float = 0.2

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        """Maps z: (H, W, C_in) to the image (H, W, out_channels) float32 in (0, 1)."""
        logits = SkipNet(self.features, self.skip_features, self.out_channels, self.norm,
                         self.num_groups, self.negative_slope)(z)
        return jax.nn.sigmoid(logits)


class KernelNet(nn.Module):
    """Multi-head kernel network: one kernel per filter-flow cell, each through its own softmax.

    A shared SkipNet trunk maps a fixed noise map (k, k, C_in) to (k, k, G) logits; head g is
    output channel g, turned into kernel g by a softmax over its k*k entries
    (`per_kernel_softmax`). With ``tie_heads=True`` the logits are averaged over the heads
    first and one kernel (1, k, k) is returned: the uniform model used for the warm-up. The
    head is zero-initialised, so a fresh network gives G identical flat kernels; since tied
    heads receive identical gradients they stay identical through the warm-up, which is how
    "initialise the kernel network with uniform deblurring" is realised.

    Attributes:
        num_kernels: G, the number of filter-flow cells.
        features: channels per level (paper: [32, 32, 64, 64]).
        skip_features: channels of the skip branches.
        norm, num_groups, negative_slope: see `SkipNet`.
    """

    num_kernels: int
    features: Sequence[int] = (32, 32, 64, 64)
    skip_features: int = 16
    norm: str = "group"
    num_groups: int = 8
    negative_slope: float = 0.2

    @nn.compact
    def __call__(self, z: jax.Array, tie_heads: bool = False) -> jax.Array:
        """Maps z: (k, k, C_in) to kernels (G, k, k) (or (1, k, k) with tie_heads), >= 0, sum 1."""
        logits = SkipNet(self.features, self.skip_features, self.num_kernels, self.norm,
                         self.num_groups, self.negative_slope, zero_init_head=True)(z)
        logits = jnp.moveaxis(logits, -1, 0)
        if tie_heads:
            logits = logits.mean(axis=0, keepdims=True)
        return per_kernel_softmax(logits)
