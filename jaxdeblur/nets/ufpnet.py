"""UFPNet: kernel estimation (KE-Net) through a flow prior, and a kernel-attention NAFNet.

Structure (official ``UFPNet_code_uncertainty_arch.py`` and ``my_module.py`` of UFPDeblur,
NHWC here):

1. ``KENet`` (official ``code_extra_mean_var``) maps the blurry image y to, at every pixel,
   a 361-vector ``code`` (softmax over channels) and an uncertainty ``σ ∈ (0, 1)`` (the mean
   of 361 sigmoids).
2. ``code_to_latent``: ``z = standardise(code)·sqrt(1 − σ²) + ε·σ``, ε ~ N(0, I),
   standardised with the unbiased std; the frozen flow maps z to a 19×19 kernel per pixel
   (``KernelFlow.latent_to_kernel``, sigmoid post-process, not renormalised).
3. The NAFNet backbone: every encoder level with exactly one block uses
   ``NAFBlockKernel``, whose kernel attention mixes the 361-channel kernel map into the
   features; the map is halved between such levels by a learned 2×2 stride-2 conv.
   Global residual, clamp to [0, 1].

References:
    Fang, Wu, Wang, Zhao, Zhang, "Self-supervised Non-uniform Kernel Estimation with
    Flow-based Motion Prior for Blind Image Deblurring", CVPR 2023, Sec. 3.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxdeblur.flow import KernelFlow
from jaxdeblur.nets.nafnet import NAFBlock, conv, gelu, pixel_shuffle, tlc_window


class ConvTranspose2d(nn.Module):
    """PyTorch ``ConvTranspose2d(in, out, k, stride, padding)`` with the output size given.

    ``out[y] = Σ_{iy, ky: y = iy·s − p + ky} in[iy] · W[ky]`` (per axis, summed over input
    channels), computed as a correlation of the s-dilated input, padded by
    ``(k − 1 − p, k − 1 − p + output_padding)``, with the spatially flipped kernel.
    ``output_padding`` is chosen so that the output has the requested size, as the official
    ``Conv_t(x, output_size=skip.shape)`` does.

    Attributes:
        features: output channels.
        kernel_size: k.
        stride: s.
        padding: p.
    """

    features: int
    kernel_size: int = 3
    stride: int = 2
    padding: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, output_size: Sequence[int]) -> jax.Array:
        """x: (B, h, w, C_in); output_size: (H, W) -> (B, H, W, features)."""
        k, s, p = self.kernel_size, self.stride, self.padding
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (k, k, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        pads = []
        for n_in, n_out in zip(x.shape[1:3], output_size):
            extra = n_out - ((n_in - 1) * s - 2 * p + k)
            if not 0 <= extra < s:
                raise ValueError(f"ConvTranspose2d cannot map size {n_in} to {n_out} with "
                                 f"kernel {k}, stride {s}, padding {p}")
            pads.append((k - 1 - p, k - 1 - p + extra))
        y = jax.lax.conv_general_dilated(
            x, jnp.flip(kernel, axis=(0, 1)), window_strides=(1, 1), padding=pads,
            lhs_dilation=(s, s), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias


class ResBlock(nn.Module):
    """Pre-activation residual block: ``x + conv(relu(conv(relu(x))))``, 3×3 convs."""

    channels: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = conv(self.channels, 3, name="conv1")(nn.relu(x))
        h = conv(self.channels, 3, name="conv2")(nn.relu(h))
        return x + h


class KENetEncoder(nn.Module):
    """Conv3×3 head, two ResBlocks, ReLU (the skip), stride-2 Conv3×3 (padding 1)."""

    channels: int

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: (B, H, W, C_in) -> (down (B, ⌈H/2⌉, ⌈W/2⌉, c), skip (B, H, W, c))."""
        h = conv(self.channels, 3, name="conv_head")(x)
        h = ResBlock(self.channels, name="res1")(h)
        h = ResBlock(self.channels, name="res2")(h)
        skip = nn.relu(h)
        return conv(self.channels, 3, stride=2, padding=1, name="downsample")(skip), skip


class KENetDecoder(nn.Module):
    """Transposed conv to the skip size, concat [up, skip], Conv3×3, two ResBlocks, ReLU."""

    channels: int

    @nn.compact
    def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
        """x: (B, h, w, C_in), skip: (B, H, W, c) -> (B, H, W, c)."""
        up = ConvTranspose2d(self.channels, name="conv_t")(x, skip.shape[1:3])
        h = conv(self.channels, 3, name="conv_head")(jnp.concatenate([up, skip], axis=-1))
        h = ResBlock(self.channels, name="res1")(h)
        h = ResBlock(self.channels, name="res2")(h)
        return nn.relu(h)


class KENet(nn.Module):
    """Kernel-estimation network (official ``code_extra_mean_var``), full resolution.

    Encoder 3→64→128 (each: Conv, 2 ResBlocks, stride-2 conv), middle 5×(Conv3×3 + ReLU)
    at 256 channels, decoder back to 64 channels at full resolution with skip
    concatenation. Tails:
    * mean: Conv(64→64)–ReLU–Conv(64→k²)–softmax over the k² channels -> ``code``;
    * uncertainty: Conv(64→64)–ReLU–Conv(64→k²)–sigmoid, averaged over the k² channels
      -> one ``σ`` per pixel.

    Attributes:
        kernel_size: k (19 for the official flow).
        widths: encoder channel widths (official (64, 128)); the middle uses twice the last.
        n_mid: number of Conv+ReLU layers in the middle (official 5).
    """

    kernel_size: int = 19
    widths: tuple[int, int] = (64, 128)
    n_mid: int = 5

    @nn.compact
    def __call__(self, image: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Kernel codes and uncertainties of a batch of images.

        Args:
            image: (B, H, W, 3) float32 blurry images in [0, 1].

        Returns:
            code: (B, H, W, k²), non-negative, summing to 1 over the last axis; entry
                ``19·i + j`` belongs to kernel row i, column j.
            sigma: (B, H, W) in (0, 1).
        """
        w1, w2 = self.widths
        x, skip1 = KENetEncoder(w1, name="enc1")(image)
        x, skip2 = KENetEncoder(w2, name="enc2")(x)
        for i in range(self.n_mid):
            x = nn.relu(conv(2 * w2, 3, name=f"mid{i}")(x))
        x = KENetDecoder(w2, name="dec1")(x, skip2)
        x = KENetDecoder(w1, name="dec2")(x, skip1)
        k2 = self.kernel_size ** 2
        mean = conv(k2, 3, name="mean2")(nn.relu(conv(w1, 3, name="mean1")(x)))
        var = conv(k2, 3, name="var2")(nn.relu(conv(w1, 3, name="var1")(x)))
        code = jax.nn.softmax(mean, axis=-1)
        sigma = jnp.mean(jax.nn.sigmoid(var), axis=-1)
        return code, sigma


CODE_STD_FLOOR = 1e-4  # relative to the code's mean


def code_to_latent(code: jax.Array, sigma: jax.Array, eps: jax.Array) -> jax.Array:
    """Uncertainty sampling of the flow latent from a kernel code (one pixel or many).

    ``ĉ = (code − mean(code))/std(code)`` over the last axis with the unbiased std
    (divisor n − 1), then ``z = ĉ·sqrt(1 − σ²) + ε·σ``.

    Args:
        code: (..., n) kernel codes.
        sigma: (...) uncertainties in [0, 1).
        eps: (..., n) standard normal draws (drawn at test time too, as officially).

    Returns:
        (..., n) latents.
    """
    if code.shape != eps.shape or code.shape[:-1] != sigma.shape:
        raise ValueError(f"code_to_latent needs code (..., n), sigma (...), eps (..., n); got "
                         f"{code.shape}, {sigma.shape}, {eps.shape}")
    mean = jnp.mean(code, axis=-1, keepdims=True)
    # A constant code (e.g. a pixel whose mean-branch ReLUs are all off at initialisation)
    # has std 0 and the official 0/0 gives NaN; the floor, relative to the mean, turns it
    # into a (nearly) zero code. Real codes have std/mean of 0.03 to 0.4, far above it.
    floor = CODE_STD_FLOOR * jnp.abs(mean) + jnp.finfo(code.dtype).tiny
    std = jnp.maximum(jnp.std(code, axis=-1, keepdims=True, ddof=1), floor)
    s = sigma[..., None]
    return (code - mean) / std * jnp.sqrt(1.0 - jnp.square(s)) + eps * s


def kl_to_standard_normal(code: jax.Array, sigma: jax.Array) -> jax.Array:
    """KL(N(ĉ·sqrt(1−σ²), σ²) ‖ N(0, 1)) per pixel, summed over the n latent dimensions.

    ``½ Σ_d (μ_d² + σ² − 1 − log σ²)`` with ``μ = ĉ·sqrt(1 − σ²)``, ĉ the standardised code.

    Args:
        code: (..., n) kernel codes.
        sigma: (...) uncertainties in (0, 1).

    Returns:
        (...) KL divergences.
    """
    mu = code_to_latent(code, sigma, jnp.zeros_like(code))
    var = jnp.square(sigma)[..., None]
    return 0.5 * jnp.sum(jnp.square(mu) + var - 1.0 - jnp.log(var), axis=-1)


class KernelAttention(nn.Module):
    """``h = a·sigmoid(conv([a, kf])) + x`` with ``a = GELU(conv(x))`` and
    ``kf = GELU(conv(GELU(conv_{k²→c}(kmap))))``, all convs 3×3.

    Attributes:
        channels: c.
    """

    channels: int

    @nn.compact
    def __call__(self, x: jax.Array, kmap: jax.Array) -> jax.Array:
        """x: (B, H, W, c), kmap: (B, H, W, k²) -> (B, H, W, c)."""
        c = self.channels
        a = gelu(conv(c, 3, name="conv_1")(x))
        kf = gelu(conv(c, 3, name="conv_kernel1")(kmap))
        kf = gelu(conv(c, 3, name="conv_kernel2")(kf))
        att = jax.nn.sigmoid(conv(c, 3, name="conv_2")(jnp.concatenate([a, kf], axis=-1)))
        return a * att + x


class NAFBlockKernel(NAFBlock):
    """A NAFBlock whose first branch sees the kernel-attended features.

    ``h = KernelAttention(x, kmap)``, ``y = x + β·body(h)`` (the residual keeps the original
    x), ``out = y + γ·ffn(y)``.
    """

    @nn.compact
    def __call__(self, x: jax.Array, kmap: jax.Array) -> jax.Array:
        """x: (B, H, W, C), kmap: (B, H, W, k²) -> (B, H, W, C)."""
        if x.shape[:3] != kmap.shape[:3]:
            raise ValueError(f"features {x.shape} and kernel map {kmap.shape} differ in size")
        beta, gamma = self.layer_scales()
        h = KernelAttention(self.channels, name="kernel_atttion")(x, kmap)
        self.sow("intermediates", "katt", h)
        y = x + self.body_branch(h) * beta
        return y + self.ffn_branch(y) * gamma


def tlc_windows(train_size: Sequence[int], n_levels: int) -> list[tuple[int, int]]:
    """TLC windows per level (0 = full resolution, ``n_levels`` = the middle).

    The training input is first padded to a multiple of ``2**n_levels`` as at run time; the
    level-l features are then ``ceil16(T)/2**l``.

    Args:
        train_size: (T_H, T_W) training crop size.
        n_levels: number of encoder levels.

    Returns:
        n_levels + 1 windows (kh, kw).
    """
    mult = 2 ** n_levels
    padded = [math.ceil(t / mult) * mult for t in train_size]
    return [tlc_window((padded[0] >> l, padded[1] >> l), train_size)
            for l in range(n_levels + 1)]


class UFPNet(nn.Module):
    """UFPNet (official ``UFPNet_code_uncertainty`` / ``..._Local``), NHWC.

    Call it with a blurry batch; it returns the per-pixel kernel field (no gradient, like
    the official ``torch.no_grad`` block: the KE-Net and flow are trained in stage II) and
    the restored images. ``estimate_kernels`` is the differentiable stage-II path.

    Variables: ``{"params": {"kernel_extra", "flow", backbone...}, "batch_stats": {"flow"}}``.

    Attributes:
        img_channel: image channels (3; the KE-Net is RGB only).
        width: channels at full resolution.
        enc_blk_nums: blocks per encoder level; a level with exactly one block is a
            kernel-attention level.
        middle_blk_num: blocks at the lowest resolution.
        dec_blk_nums: blocks per decoder level.
        kernel_size: k, the motion-kernel size (19 for the pretrained flow).
        train_size: None for global channel attention (training); (T_H, T_W) for TLC local
            pooling at test time, windows from ``tlc_windows``.
        ke_widths: KE-Net encoder widths; official (64, 128). Smaller values give a fast
            KE-Net for CPU demos and tests (not loadable from official checkpoints).
    """

    img_channel: int = 3
    width: int = 64
    enc_blk_nums: tuple[int, ...] = (1, 1, 1, 28)
    middle_blk_num: int = 1
    dec_blk_nums: tuple[int, ...] = (1, 1, 1, 1)
    kernel_size: int = 19
    train_size: Optional[tuple[int, int]] = None
    ke_widths: tuple[int, int] = (64, 128)

    def setup(self):
        if len(self.enc_blk_nums) != len(self.dec_blk_nums):
            raise ValueError(f"enc_blk_nums {self.enc_blk_nums} and dec_blk_nums "
                             f"{self.dec_blk_nums} must have the same length")
        self.kernel_extra = KENet(kernel_size=self.kernel_size, widths=tuple(self.ke_widths))
        self.flow = KernelFlow(kernel_size=self.kernel_size)
        n_levels = len(self.enc_blk_nums)
        windows = (tlc_windows(self.train_size, n_levels) if self.train_size is not None
                   else [None] * (n_levels + 1))
        k2 = self.kernel_size ** 2
        self.intro = conv(self.width, 3)
        # (ours) Zero-initialised so that a fresh network is the identity (restored =
        # blurry, as the zero layer scales make every block one); the official code keeps
        # PyTorch's default init, whose random residual starts near 10 dB PSNR.
        self.ending = conv(self.img_channel, 3, kernel_init=nn.initializers.zeros)
        encoders, downs, kernel_down, ups, decoders = [], [], [], [], []
        chan = self.width
        for level, num in enumerate(self.enc_blk_nums):
            if num == 1:
                encoders.append([NAFBlockKernel(chan, pool_window=windows[level])])
                kernel_down.append(conv(k2, 2, stride=2))
            else:
                encoders.append([NAFBlock(chan, pool_window=windows[level])
                                 for _ in range(num)])
                kernel_down.append(None)
            downs.append(conv(2 * chan, 2, stride=2))
            chan *= 2
        self.middle_blks = [NAFBlock(chan, pool_window=windows[n_levels])
                            for _ in range(self.middle_blk_num)]
        for i, num in enumerate(self.dec_blk_nums):
            ups.append(conv(2 * chan, 1, use_bias=False))
            chan //= 2
            decoders.append([NAFBlock(chan, pool_window=windows[n_levels - 1 - i])
                             for _ in range(num)])
        self.encoders, self.downs, self.kernel_down = encoders, downs, kernel_down
        self.ups, self.decoders = ups, decoders

    def _draw_eps(self, shape, key, eps):
        if eps is not None:
            if eps.shape != shape:
                raise ValueError(f"eps must have shape {shape} (B, H, W, k²) for this input, "
                                 f"got {eps.shape}")
            return eps
        if key is None:
            raise ValueError("UFPNet draws the uncertainty noise at test time too: pass "
                             "key=<PRNG key> (or an explicit eps)")
        return jax.random.normal(key, shape, jnp.float32)

    def estimate_kernels(self, blurry: jax.Array, *, key: Optional[jax.Array] = None,
                         eps: Optional[jax.Array] = None):
        """Per-pixel kernels of a blurry batch, differentiable w.r.t. the KE-Net.

        Args:
            blurry: (B, H, W, 3) float32 in [0, 1].
            key: PRNG key for ε ~ N(0, I) (keyword-only); ignored when ``eps`` is given.
            eps: optional explicit (B, H, W, k²) noise.

        Returns:
            kernel_field: (B, H, W, k, k), the flow's kernels (not renormalised).
            code: (B, H, W, k²), the KE-Net softmax code.
            sigma: (B, H, W), the uncertainty.
        """
        self._check_input(blurry)
        code, sigma = self.kernel_extra(blurry)
        self.sow("intermediates", "ke_code", code)
        self.sow("intermediates", "ke_sigma", sigma)
        eps = self._draw_eps(code.shape, key, eps)
        z = code_to_latent(code, sigma, eps)
        b, h, w, k2 = z.shape
        kernels = self.flow.latent_to_kernel(z.reshape(b * h * w, k2))
        k = self.kernel_size
        return kernels.reshape(b, h, w, k, k), code, sigma

    def restore(self, blurry: jax.Array, kernel_field: jax.Array) -> jax.Array:
        """The kernel-attention NAFNet given the kernel field (input already padded).

        Args:
            blurry: (B, Hp, Wp, C), sides multiples of ``2**len(enc_blk_nums)``.
            kernel_field: (B, Hp, Wp, k, k).

        Returns:
            (B, Hp, Wp, C) restored images clamped to [0, 1].
        """
        b, h, w, _ = kernel_field.shape[:4]
        kmap = kernel_field.reshape(b, h, w, self.kernel_size ** 2)
        x = self.intro(blurry)
        self.sow("intermediates", "intro_out", x)
        skips = []
        for level, (blocks, down, kdown) in enumerate(
                zip(self.encoders, self.downs, self.kernel_down)):
            if kdown is not None:
                x = blocks[0](x, kmap)
                kmap = kdown(kmap)
                self.sow("intermediates", f"kernel_down{level}", kmap)
            else:
                for block in blocks:
                    x = block(x)
            self.sow("intermediates", f"enc{level}", x)
            skips.append(x)
            x = down(x)
        for block in self.middle_blks:
            x = block(x)
        self.sow("intermediates", "middle", x)
        for level, (up, blocks, skip) in enumerate(zip(self.ups, self.decoders, skips[::-1])):
            x = pixel_shuffle(up(x), 2) + skip
            for block in blocks:
                x = block(x)
            self.sow("intermediates", f"dec{level}", x)
        x = self.ending(x)
        self.sow("intermediates", "ending_out", x)
        return jnp.clip(x + blurry, 0.0, 1.0)

    def __call__(self, blurry: jax.Array, *, key: Optional[jax.Array] = None,
                 eps: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
        """Kernel field and restored images of a blurry batch.

        The input is reflect-padded at the bottom and right to a multiple of
        ``2**len(enc_blk_nums)`` (16 for four levels), restored, and cropped back, as the
        official ``check_image_size``. The kernel field is computed on the padded image and
        carries no gradient (stage II trains it through ``estimate_kernels``).

        Args:
            blurry: (B, H, W, 3) float32 in [0, 1].
            key: PRNG key for the uncertainty noise (keyword-only).
            eps: optional explicit noise of the padded size (B, Hp, Wp, k²).

        Returns:
            kernel_field: (B, H, W, k, k), the kernels of the (cropped) input pixels.
            restored: (B, H, W, 3) in [0, 1].
        """
        self._check_input(blurry)
        _, h, w, _ = blurry.shape
        padded = pad_to_multiple(blurry, 2 ** len(self.enc_blk_nums))
        kernel_field, _, _ = self.estimate_kernels(padded, key=key, eps=eps)
        kernel_field = jax.lax.stop_gradient(kernel_field)
        restored = self.restore(padded, kernel_field)
        return kernel_field[:, :h, :w], restored[:, :h, :w]

    def init_trainable(self, blurry: jax.Array) -> jax.Array:
        """Touches the KE-Net and the backbone but not the flow (for ``init``).

        Training replaces the flow with a pretrained one anyway, and initialising a fresh
        flow through the uncertainty path costs minutes of XLA:CPU compile time. Use
        ``model.init(key, blurry, method=UFPNet.init_trainable)`` and add the flow's
        variables under ``params/flow`` and ``batch_stats/flow``.

        Args:
            blurry: (B, H, W, C) with sides multiples of ``2**len(enc_blk_nums)``.

        Returns:
            (B, H, W, C) the restored images for a zero kernel field.
        """
        self._check_input(blurry)
        self.kernel_extra(blurry)
        b, h, w, _ = blurry.shape
        k = self.kernel_size
        return self.restore(blurry, jnp.zeros((b, h, w, k, k), blurry.dtype))

    def _check_input(self, blurry: jax.Array) -> None:
        if blurry.ndim != 4:
            raise ValueError(f"UFPNet expects a (B, H, W, C) batch, got shape {blurry.shape}")
        if blurry.shape[-1] != self.img_channel:
            raise ValueError(
                f"UFPNet(img_channel={self.img_channel}) got {blurry.shape[-1]} channel(s) "
                f"(shape {blurry.shape}); the KE-Net is RGB only: replicate a grayscale image "
                "with jnp.repeat(x, 3, axis=-1)")
        if not jnp.issubdtype(blurry.dtype, jnp.floating):
            raise ValueError(f"UFPNet expects float images in [0, 1], got dtype {blurry.dtype}")


def pad_to_multiple(images: jax.Array, multiple: int) -> jax.Array:
    """Reflect-pads (B, H, W, C) at the bottom and right to sides divisible by ``multiple``.

    Reflect mirrors without repeating the edge pixel (torch ``mode='reflect'``).
    """
    _, h, w, _ = images.shape
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return images
    if ph >= h or pw >= w:
        raise ValueError(f"image {images.shape} is too small to reflect-pad to a multiple of "
                         f"{multiple}; use sides of at least {multiple // 2 + 1}")
    return jnp.pad(images, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="reflect")
