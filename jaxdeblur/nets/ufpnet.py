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

Whole-image inference (``UFPNet.flow_chunk_pixels``, ``kernel_map_chunk_pixels``; the
configs set both): steps 1–2 after the KE-Net's 64-channel features, and the layers of
step 3 that read the 361-channel map, run in blocks of image rows (`map_blocks`), so that
no 361-channel array but the returned kernel field is ever whole and memory grows linearly
with the image (official config at 1280×720: 3.66 GiB compiled instead of 15.09 GiB).
The noise ε is drawn per image row (`uncertainty_noise`), the same for any block size.

References:
    Fang, Wu, Wang, Zhao, Zhang, "Self-supervised Non-uniform Kernel Estimation with
    Flow-based Motion Prior for Blind Image Deblurring", CVPR 2023, Sec. 3.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

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
    def __call__(self, image: jax.Array, *, hidden_only: bool = False
                 ) -> tuple[jax.Array, jax.Array]:
        """Kernel codes and uncertainties of a batch of images.

        Args:
            image: (B, H, W, 3) float32 blurry images in [0, 1].
            hidden_only: stop before the two k²-channel head convs (``mean2``, ``var2``) and
                return their inputs, for `UFPNet`'s row-blocked kernel path.

        Returns:
            code: (B, H, W, k²), non-negative, summing to 1 over the last axis; entry
                ``19·i + j`` belongs to kernel row i, column j.
            sigma: (B, H, W) in (0, 1).
            With ``hidden_only``, instead ``(mean_hidden, var_hidden)``, each
            (B, H, W, widths[0]): the ReLU outputs that ``mean2`` and ``var2`` convolve.
        """
        w1, w2 = self.widths
        x, skip1 = KENetEncoder(w1, name="enc1")(image)
        x, skip2 = KENetEncoder(w2, name="enc2")(x)
        for i in range(self.n_mid):
            x = nn.relu(conv(2 * w2, 3, name=f"mid{i}")(x))
        x = KENetDecoder(w2, name="dec1")(x, skip2)
        x = KENetDecoder(w1, name="dec2")(x, skip1)
        mean_hidden = nn.relu(conv(w1, 3, name="mean1")(x))
        var_hidden = nn.relu(conv(w1, 3, name="var1")(x))
        if hidden_only:
            return mean_hidden, var_hidden
        k2 = self.kernel_size ** 2
        return code_and_sigma(conv(k2, 3, name="mean2")(mean_hidden),
                              conv(k2, 3, name="var2")(var_hidden))


def code_and_sigma(mean_logits: jax.Array, var_logits: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
    """KE-Net tails after their last convs: ``code = softmax(mean_logits)`` over the k²
    channels, ``σ = mean(sigmoid(var_logits))`` over them.

    Args:
        mean_logits: (..., k²).
        var_logits: (..., k²).

    Returns:
        code (..., k²) and sigma (...).
    """
    return (jax.nn.softmax(mean_logits, axis=-1),
            jnp.mean(jax.nn.sigmoid(var_logits), axis=-1))


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


def uncertainty_noise_rows(key: jax.Array, image_index, rows: jax.Array, width: int,
                           features: int) -> jax.Array:
    """The ε ~ N(0, I) of some rows of one image of a batch.

    Row ``y`` of image ``b`` is ``normal(fold_in(fold_in(key, b), y), (width, features))``:
    every row has its own key, so a row-blocked pass draws exactly the noise of a
    whole-image pass, whatever the block size.

    Args:
        key: the batch's PRNG key.
        image_index: b, the image's index in the batch (int or int32 scalar).
        rows: (R,) int32 row indices.
        width: W, pixels per row.
        features: n, the latent size (k²).

    Returns:
        (R, W, n) float32.
    """
    image_key = jax.random.fold_in(key, image_index)
    return jax.vmap(lambda row: jax.random.normal(jax.random.fold_in(image_key, row),
                                                  (width, features), jnp.float32))(rows)


def uncertainty_noise(key: jax.Array, shape: Sequence[int]) -> jax.Array:
    """ε ~ N(0, I) of shape (B, H, W, n), drawn row by row (`uncertainty_noise_rows`)."""
    b, h, w, n = shape
    rows = jnp.arange(h, dtype=jnp.int32)
    return jax.vmap(lambda i: uncertainty_noise_rows(key, i, rows, w, n))(
        jnp.arange(b, dtype=jnp.int32))


def block_rows(height: int, width: int, chunk_pixels: int, multiple: int = 1) -> int:
    """Rows per block of a row-blocked pass over (height, width) maps.

    The largest divisor of ``height`` that is a multiple of ``multiple`` and whose blocks
    hold at most ``chunk_pixels`` pixels (``rows · width``); ``multiple`` when even a block
    of ``multiple`` rows is larger. Blocks tile the map exactly, so no row is computed
    twice and no padding is needed.

    Args:
        height: H, a multiple of ``multiple``.
        width: W.
        chunk_pixels: the largest block in pixels.
        multiple: rows per block must be a multiple of it (2^levels to keep stride-2
            grids aligned).

    Returns:
        The rows per block.

    >>> block_rows(720, 1280, 65536), block_rows(1088, 1920, 65536, multiple=8)
    (48, 32)
    """
    if height % multiple:
        raise ValueError(f"height {height} is not a multiple of {multiple}")
    if chunk_pixels < 1:
        raise ValueError(f"chunk_pixels must be >= 1, got {chunk_pixels}")
    best = multiple
    for rows in range(multiple, height + 1, multiple):
        if height % rows == 0 and rows * width <= chunk_pixels:
            best = rows
    return best


def map_blocks(block, n_blocks: int, *, after: jax.Array, buffers=()):
    """``jax.lax.map(block, arange(n_blocks))`` whose buffers exist only once ``after`` does.

    XLA orders a program by its data dependencies alone (XLA:CPU drops optimisation
    barriers before scheduling), and ``lax.map`` fills buffers that start as constants,
    which XLA may allocate at the start of the program: a whole-image kernel field would
    then sit beside the KE-Net's activations. Here every buffer starts as copies of the
    middle element of ``after`` (the pass's input; not a border element, which may be
    padding and fold to a constant, as XLA also folds ``a·0``), so it cannot be allocated
    before ``after`` exists. The loop overwrites every element of the stacked outputs, so
    their initial value never shows; ``block`` must overwrite the elements of ``buffers``
    that matter to the caller.

    Args:
        block: ``block(index, buffers) -> (outputs, buffers)``: index an int32 scalar,
            outputs a pytree of this block's arrays, buffers updated in place (e.g. a
            scatter of the block's rows); the shapes of ``buffers`` stay.
        n_blocks: the number of blocks.
        after: an array the buffers must not be allocated before.
        buffers: a pytree of ``jax.ShapeDtypeStruct``, the in-place buffers.

    Returns:
        ``(outputs, buffers)``: every output stacked on a new leading axis of n_blocks, and
        the final buffers.
    """
    seed = jax.lax.stop_gradient(after.ravel()[after.size // 2])

    def like(shape, dtype):
        return jnp.broadcast_to(seed.astype(dtype), shape)

    buffers = jax.tree.map(lambda b: like(b.shape, b.dtype), buffers)
    shapes, _ = jax.eval_shape(block, jnp.int32(0), buffers)
    outputs = jax.tree.map(lambda s: like((n_blocks,) + s.shape, s.dtype), shapes)

    def body(index, carry):
        outputs, buffers = carry
        new, buffers = block(index, buffers)
        return jax.tree.map(lambda out, value: jax.lax.dynamic_update_index_in_dim(
            out, value, index, axis=0), outputs, new), buffers

    return jax.lax.fori_loop(0, n_blocks, body, (outputs, buffers))


class SplitField(NamedTuple):
    """A padded kernel field (B, Hp, Wp, k, k) held as the image's kernels and the padding's.

    `UFPNet` pads its input to multiples of 2^levels and returns the kernels of the
    unpadded pixels; keeping those (``image``, the returned array) apart from the few
    padding rows and columns means the field is never held twice (padded, then cropped).

    Attributes:
        image: (B, H, W, k, k), the kernels of the image pixels.
        right: (B, H, Wp - W, k, k), the padding columns of the image rows.
        bottom: (B, Hp - H, Wp, k, k), the padding rows.
    """

    image: jax.Array
    right: jax.Array
    bottom: jax.Array

    @classmethod
    def split(cls, field: jax.Array, height: int, width: int) -> "SplitField":
        """Splits a padded (B, Hp, Wp, k, k) field at the image size (height, width)."""
        return cls(field[:, :height, :width], field[:, :height, width:], field[:, height:])

    def padded(self) -> jax.Array:
        """The whole (B, Hp, Wp, k, k) field (a copy unless there is no padding)."""
        if self.right.shape[2] == 0 and self.bottom.shape[1] == 0:
            return self.image
        top = jnp.concatenate([self.image, self.right], axis=2)
        return jnp.concatenate([top, self.bottom], axis=1)

    def rows(self, index: jax.Array, source: jax.Array) -> jax.Array:
        """Rows ``source`` (R,) of image ``index`` of the padded field, (R, Wp, k²)."""
        b, h = self.image.shape[:2]
        pad_h = self.bottom.shape[1]

        def take(part, n_rows, row):
            flat = part.reshape((b * n_rows,) + part.shape[2:3] + (-1,))
            return jnp.take(flat, index * n_rows + jnp.clip(row, 0, n_rows - 1), axis=0,
                            mode="clip")

        out = take(self.image, h, source)
        if self.right.shape[2]:
            out = jnp.concatenate([out, take(self.right, h, source)], axis=1)
        if pad_h:
            out = jnp.where((source >= h)[:, None, None], take(self.bottom, pad_h, source - h),
                            out)
        return out


class KernelAttention(nn.Module):
    """``h = a·sigmoid(conv([a, kf])) + x`` with ``a = GELU(conv(x))`` and
    ``kf = GELU(conv(GELU(conv_{k²→c}(kmap))))``, all convs 3×3.

    The inner ``GELU(conv_{k²→c}(kmap))`` (``conv_kernel1``, the only conv that reads the k²
    channels) may be computed elsewhere and passed as ``kernel_hidden``: `UFPNet` does so
    in row blocks to keep the k²-channel maps out of memory.

    Attributes:
        channels: c.
    """

    channels: int

    @nn.compact
    def __call__(self, x: jax.Array, kmap: Optional[jax.Array] = None, *,
                 kernel_hidden: Optional[jax.Array] = None) -> jax.Array:
        """x: (B, H, W, c); kmap (B, H, W, k²) or kernel_hidden (B, H, W, c) -> (B, H, W, c)."""
        c = self.channels
        a = gelu(conv(c, 3, name="conv_1")(x))
        if kernel_hidden is None:
            kernel_hidden = gelu(conv(c, 3, name="conv_kernel1")(kmap))
        kf = gelu(conv(c, 3, name="conv_kernel2")(kernel_hidden))
        att = jax.nn.sigmoid(conv(c, 3, name="conv_2")(jnp.concatenate([a, kf], axis=-1)))
        return a * att + x


class NAFBlockKernel(NAFBlock):
    """A NAFBlock whose first branch sees the kernel-attended features.

    ``h = KernelAttention(x, kmap)``, ``y = x + β·body(h)`` (the residual keeps the original
    x), ``out = y + γ·ffn(y)``.
    """

    @nn.compact
    def __call__(self, x: jax.Array, kmap: Optional[jax.Array] = None, *,
                 kernel_hidden: Optional[jax.Array] = None) -> jax.Array:
        """x: (B, H, W, C), kmap: (B, H, W, k²) or kernel_hidden: (B, H, W, C) (see
        `KernelAttention`) -> (B, H, W, C)."""
        kernel_input = kmap if kernel_hidden is None else kernel_hidden
        if x.shape[:3] != kernel_input.shape[:3]:
            raise ValueError(f"features {x.shape} and kernel map {kernel_input.shape} differ "
                             "in size")
        beta, gamma = self.layer_scales()
        h = KernelAttention(self.channels, name="kernel_atttion")(
            x, kmap, kernel_hidden=kernel_hidden)
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
        flow_chunk_pixels: None to compute the kernel field of ``__call__`` on the whole
            padded batch at once; else the most pixels per row block of that pass (the
            KE-Net's two k²-channel head convs, the uncertainty noise and the flow run one
            block at a time, `map_blocks`). Configs: ``config.flow_chunk_pixels``.
        kernel_map_chunk_pixels: likewise for the kernel map's path through the backbone
            (``conv_kernel1`` of every kernel-attention level and the stride-2
            ``kernel_down`` convs between them, the only layers that read k² channels);
            blocks are cut at multiples of 2^(kernel levels) rows. Configs:
            ``config.kernel_map_chunk_pixels``.

    With both chunk sizes set, whole-image inference never holds a k²-channel map besides
    the kernel field it returns, and its memory grows linearly with the pixel count
    (``benchmarks/ufpnet_step.py --memory-only``). Outputs do not depend on the chunk
    sizes (up to float rounding), and no parameter does: they are not ``config.model``
    fields, so checkpoints do not record them.
    """

    img_channel: int = 3
    width: int = 64
    enc_blk_nums: tuple[int, ...] = (1, 1, 1, 28)
    middle_blk_num: int = 1
    dec_blk_nums: tuple[int, ...] = (1, 1, 1, 1)
    kernel_size: int = 19
    train_size: Optional[tuple[int, int]] = None
    ke_widths: tuple[int, int] = (64, 128)
    flow_chunk_pixels: Optional[int] = None
    kernel_map_chunk_pixels: Optional[int] = None

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

    def _check_noise(self, shape, key, eps) -> None:
        if eps is not None:
            if eps.shape != shape:
                raise ValueError(f"eps must have shape {shape} (B, H, W, k²) for this input, "
                                 f"got {eps.shape}")
        elif key is None:
            raise ValueError("UFPNet draws the uncertainty noise at test time too: pass "
                             "key=<PRNG key> (or an explicit eps)")

    def _draw_eps(self, shape, key, eps):
        self._check_noise(shape, key, eps)
        return eps if eps is not None else uncertainty_noise(key, shape)

    def estimate_kernels(self, blurry: jax.Array, *, key: Optional[jax.Array] = None,
                         eps: Optional[jax.Array] = None):
        """Per-pixel kernels of a blurry batch, differentiable w.r.t. the KE-Net.

        Args:
            blurry: (B, H, W, 3) float32 in [0, 1].
            key: PRNG key for ε ~ N(0, I) (keyword-only), drawn row by row
                (`uncertainty_noise`); ignored when ``eps`` is given.
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

    def _in_blocks(self, chunk_pixels: Optional[int], shape: Sequence[int]) -> bool:
        """Whether a pass over (B, H, W, ...) maps runs in row blocks of ``chunk_pixels``.

        Never while initialising: the layers must be called whole once to create their
        variables, which the blocks then read.
        """
        b, h, w = shape[:3]
        return (chunk_pixels is not None and not self.is_initializing()
                and b * h * w > chunk_pixels)

    def _kernel_field_in_blocks(self, padded: jax.Array, size: tuple[int, int], *,
                                key: Optional[jax.Array], eps: Optional[jax.Array]
                                ) -> SplitField:
        """`estimate_kernels`'s kernel field, computed in row blocks of one image each.

        The KE-Net runs up to its heads on the whole batch (``widths[0]`` channels per
        pixel); each block of ``block_rows(Hp, Wp, flow_chunk_pixels)`` rows then applies
        the two 3×3 k²-channel head convs to its rows plus one row above and below (zero
        rows at the image border, the convs' own padding), draws its rows' noise
        (`uncertainty_noise_rows`), maps latents to kernels through the flow, and writes
        them into the parts of a `SplitField`. Only the kernel field itself is ever whole.

        Args:
            padded: (B, Hp, Wp, 3), sides multiples of ``2**len(enc_blk_nums)``.
            size: (H, W), the unpadded image size.
            key: as in `estimate_kernels`.
            eps: as in `estimate_kernels`.

        Returns:
            The (B, Hp, Wp, k, k) kernels as a `SplitField` at (H, W).
        """
        b, hp, wp, _ = padded.shape
        h, w = size
        k, k2 = self.kernel_size, self.kernel_size ** 2
        self._check_noise((b, hp, wp, k2), key, eps)
        rows = block_rows(hp, wp, self.flow_chunk_pixels)
        n_blocks = hp // rows
        mean_hidden, var_hidden = self.kernel_extra(padded, hidden_only=True)
        hidden = jnp.pad(jnp.concatenate([mean_hidden, var_hidden], axis=-1),
                         ((0, 0), (1, 1), (0, 0), (0, 0)))
        ke_params = self.kernel_extra.variables["params"]
        flow_variables = {c: self.flow.variables[c] for c in ("params", "batch_stats")}
        # Unbound copies, applied to explicit variables inside the loop body. The heads'
        # row padding is the halo; their columns keep the zero padding.
        flow = self.flow.clone(parent=None)
        head = nn.Conv(k2, (3, 3), padding=((0, 0), (1, 1)), parent=None)
        keep_code = self.is_mutable_collection("intermediates")
        parts = SplitField(*(jax.ShapeDtypeStruct(shape, jnp.float32) for shape in (
            (b, h, w, k, k), (b, h, wp - w, k, k), (b, hp - h, wp, k, k))))

        def block(index, parts):
            image, start = index // n_blocks, (index % n_blocks) * rows
            window = jax.lax.dynamic_slice(hidden, (image, start, 0, 0),
                                           (1, rows + 2, wp, hidden.shape[-1]))[0]
            mean_in, var_in = jnp.split(window, 2, axis=-1)
            code, sigma = code_and_sigma(
                head.apply({"params": ke_params["mean2"]}, mean_in),
                head.apply({"params": ke_params["var2"]}, var_in))
            if eps is None:
                noise = uncertainty_noise_rows(key, image, start + jnp.arange(rows), wp, k2)
            else:
                noise = jax.lax.dynamic_slice(eps, (image, start, 0, 0), (1, rows, wp, k2))[0]
            z = code_to_latent(code, sigma, noise)
            kernels = flow.apply(flow_variables, z.reshape(rows * wp, k2),
                                 method=KernelFlow.latent_to_kernel).reshape(rows, wp, k, k)
            # Rows outside a part get an index past its end, which the scatter drops.
            row = start + jnp.arange(rows)
            in_image = jnp.where(row < h, row, hp)
            in_bottom = jnp.where(row >= h, row - h, hp)
            parts = SplitField(
                parts.image.at[image, in_image].set(kernels[:, :w], mode="drop"),
                parts.right.at[image, in_image].set(kernels[:, w:], mode="drop"),
                parts.bottom.at[image, in_bottom].set(kernels, mode="drop"))
            return ((code, sigma) if keep_code else ()), parts

        extra, parts = map_blocks(block, b * n_blocks, after=hidden, buffers=parts)
        if keep_code:
            code, sigma = extra
            self.sow("intermediates", "ke_code", code.reshape(b, hp, wp, k2))
            self.sow("intermediates", "ke_sigma", sigma.reshape(b, hp, wp))
        return SplitField(*parts)

    def _kernel_levels(self) -> list[int]:
        return [level for level, kdown in enumerate(self.kernel_down) if kdown is not None]

    def _kernel_map_in_blocks(self, field: SplitField, blurry: jax.Array
                              ) -> tuple[list[jax.Array], jax.Array]:
        """``GELU(conv_kernel1(kmap_j))`` of every kernel-attention level j, in row blocks.

        ``kmap_0`` is the padded kernel field and ``kmap_{j+1} = kernel_down_j(kmap_j)``
        (2×2, stride 2). With n kernel levels, a block of R rows (a multiple of 2^n, from
        ``block_rows(Hp, Wp, kernel_map_chunk_pixels, 2^n)``) reads its rows plus a halo of
        2^(n-1) above and below — one row of ``kmap_{n-1}`` — so every level's 3×3 conv sees
        its neighbours, while the halo's start stays on the stride-2 grid of every level
        that is down-sampled. Halo rows outside the image are zeroed at each level, as the
        convs' own zero padding.

        The blocks also copy their rows of ``blurry``: the backbone reads the copy, so it
        cannot start before this pass ends (XLA orders by data dependencies only).

        Args:
            field: the (B, Hp, Wp, k, k) kernel field.
            blurry: (B, Hp, Wp, C), the backbone's input.

        Returns:
            ``(kernel_hidden, blurry)``: one (B, Hp/2^j, Wp/2^j, c_j) array per kernel
            level j, and the copy of ``blurry``.
        """
        b, h, w = blurry.shape[:3]
        levels = self._kernel_levels()
        n = len(levels)
        halo = 2 ** max(n - 1, 0)
        rows = block_rows(h, w, self.kernel_map_chunk_pixels, multiple=2 ** n)
        n_blocks = h // rows
        kernel1 = [self.encoders[level][0].variables["params"]["kernel_atttion"]
                   ["conv_kernel1"] for level in levels]
        conv1 = [nn.Conv(p["kernel"].shape[-1], (3, 3), padding=((0, 0), (1, 1)),
                         parent=None) for p in kernel1]
        kdown = [(self.kernel_down[level].clone(parent=None),
                  self.kernel_down[level].variables["params"]) for level in levels]
        keep_down = self.is_mutable_collection("intermediates")

        def block(index, buffers):
            image, start = index // n_blocks, (index % n_blocks) * rows
            top = start - halo
            window = field.rows(image, top + jnp.arange(rows + 2 * halo))
            copy = jax.lax.dynamic_slice_in_dim(blurry[image], start, rows)
            hidden, downs = [], []
            for j in range(n):
                scale = 2 ** j
                index_j = top // scale + jnp.arange(window.shape[0])
                inside = (index_j >= 0) & (index_j < h // scale)
                masked = jnp.where(inside[:, None, None], window, 0.0)
                first = halo // scale - 1
                conv_in = jax.lax.slice_in_dim(masked, first, first + rows // scale + 2)
                hidden.append(gelu(conv1[j].apply({"params": kernel1[j]}, conv_in)))
                module, params = kdown[j]
                if keep_down:
                    inner = jax.lax.slice_in_dim(window, first + 1, first + 1 + rows // scale)
                    downs.append(module.apply({"params": params}, inner))
                if j < n - 1:
                    window = module.apply({"params": params}, window)
            return (hidden, downs, copy), buffers

        (hidden, downs, copy), _ = map_blocks(block, b * n_blocks, after=field.image)
        for level, down in zip(levels, downs):
            self.sow("intermediates", f"kernel_down{level}",
                     down.reshape((b, -1) + down.shape[2:]))
        return [x.reshape((b, -1) + x.shape[2:]) for x in hidden], copy.reshape(blurry.shape)

    def restore(self, blurry: jax.Array, kernel_field: jax.Array) -> jax.Array:
        """The kernel-attention NAFNet given the kernel field (input already padded).

        The kernel map's convolutions run in row blocks when ``kernel_map_chunk_pixels`` is
        set (`_kernel_map_in_blocks`).

        Args:
            blurry: (B, Hp, Wp, C), sides multiples of ``2**len(enc_blk_nums)``.
            kernel_field: (B, Hp, Wp, k, k).

        Returns:
            (B, Hp, Wp, C) restored images clamped to [0, 1].
        """
        b, h, w = kernel_field.shape[:3]
        if self._in_blocks(self.kernel_map_chunk_pixels, kernel_field.shape):
            kernel_hidden, blurry = self._kernel_map_in_blocks(
                SplitField.split(kernel_field, h, w), blurry)
            return self._backbone(blurry, kernel_hidden=kernel_hidden)
        return self._backbone(blurry, kmap=kernel_field.reshape(b, h, w, -1))

    def _backbone(self, blurry: jax.Array, *, kmap: Optional[jax.Array] = None,
                  kernel_hidden: Optional[Sequence[jax.Array]] = None) -> jax.Array:
        """`restore` from the kernel map (B, Hp, Wp, k²), or from the kernel levels'
        ``kernel_hidden`` (`_kernel_map_in_blocks`)."""
        x = self.intro(blurry)
        self.sow("intermediates", "intro_out", x)
        skips = []
        kernel_level = 0
        for level, (blocks, down, kdown) in enumerate(
                zip(self.encoders, self.downs, self.kernel_down)):
            if kdown is not None and kernel_hidden is not None:
                x = blocks[0](x, kernel_hidden=kernel_hidden[kernel_level])
                kernel_level += 1
            elif kdown is not None:
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
        if self._in_blocks(self.flow_chunk_pixels, padded.shape):
            field = self._kernel_field_in_blocks(padded, (h, w), key=key, eps=eps)
        else:
            kernel_field, _, _ = self.estimate_kernels(padded, key=key, eps=eps)
            kernel_field = jax.lax.stop_gradient(kernel_field)
            if not self._in_blocks(self.kernel_map_chunk_pixels, padded.shape):
                restored = self.restore(padded, kernel_field)
                return kernel_field[:, :h, :w], restored[:, :h, :w]
            field = SplitField.split(kernel_field, h, w)
        field = jax.lax.stop_gradient(field)
        if self._in_blocks(self.kernel_map_chunk_pixels, padded.shape):
            kernel_hidden, padded = self._kernel_map_in_blocks(field, padded)
            restored = self._backbone(padded, kernel_hidden=kernel_hidden)
        else:
            restored = self.restore(padded, field.padded())
        return field.image, restored[:, :h, :w]

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
