"""PyTorch reference of the official UFPNet, for benchmarks and parity tests only.

Written from ``shared/fixtures/README.md`` ("ufpnet_tiny.npz", "ufpnet_tiny_local.npz") and
``shared/SPEC.md`` §3; no code was copied from the authors' repositories. Module and
parameter names are those of the official ``UFPNet_code_uncertainty`` state dict (typos
included: ``kernel_atttion``), so ``load_state_dict(..., strict=True)`` accepts an official
checkpoint or the fixture's ``param/`` arrays. The modules reproduce the official
*algorithms*, and therefore their time and memory:

* `KENet` (official ``code_extra_mean_var``, attribute ``kernel_extra``): the full-resolution
  U-Net whose mean tail gives a 361-channel softmax code and whose uncertainty tail gives σ;
* `KernelPrior` (``flow``): the RealNVP prior, eval mode, both directions (UFPNet uses
  latent -> kernel; ``benchmarks/flow.py`` also times ``log_prob``);
* `UFPNet`: the uncertainty sampling on the whole padded image at once (the official code
  holds every per-pixel 361-vector, its standardisation and the flow's intermediates at
  full resolution), the kernel map, and the NAFNet backbone whose one-block encoder levels
  are `NAFBlockKernel`; ``kernel_down`` has one 2×2 stride-2 conv per level, as the
  official state dict (the last is unused by the official forward when that level has
  several blocks, but it is a parameter);
* `to_local`: the TLC variant (``UFPNet_code_uncertainty_Local``): every block's
  ``sca.0`` global pool becomes the official local `AvgPool2d` (cumulative sums, auto-pad);
* `Stage3Step`: one stage-III training step as ``jaxdeblur.train.ufpnet`` defines it (PSNR
  loss + ``reblur_weight`` · reblur L1 with the detached kernels through the official
  unfold per-pixel blur, global-norm clip, AdamW with cosine decay, KE-Net and flow frozen).

Layouts are PyTorch's (NCHW). torch is imported here and in the benchmarks and tests that
use this file, never by the library.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jaxdeblur import configs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_reference import unfold_per_pixel_blur  # noqa: E402

LAYER_NORM_EPS = 1e-6
FLOW_BN_EPS = 1e-5
PSNR_LOSS_EPS = 1e-8
# Official ``KernelPrior`` as UFPNet builds it (SPEC §3, stage I).
FLOW_BLOCKS = 5
FLOW_HIDDEN = 25
FLOW_N_HIDDEN = 1
FLOW_ALPHA = 1e-6


# --- NAFNet parts ---------------------------------------------------------------------------

class LayerNorm2d(nn.Module):
    """Per-pixel layer norm over channels: biased variance, eps 1e-6, per-channel affine."""

    def __init__(self, channels: int, eps: float = LAYER_NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        y = (x - mu) / torch.sqrt(var + self.eps)
        return self.weight.view(1, -1, 1, 1) * y + self.bias.view(1, -1, 1, 1)


class SimpleGate(nn.Module):
    """First half of the channels times the second half."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return x1 * x2


class AvgPool2d(nn.Module):
    """NAFNet's test-time local average pool (TLC, official ``local_arch.AvgPool2d``).

    On features of size h×w with window (kh, kw): the global mean if ``kh >= h`` and
    ``kw >= w``; else the mean over every valid k1×k2 box (``k1 = min(h, kh)``,
    ``k2 = min(w, kw)``) from float cumulative sums, replicate-padded back to h×w with
    ``(h − _h)//2`` rows on top and ``(h − _h + 1)//2`` at the bottom (likewise columns).
    """

    def __init__(self, kernel_size: Sequence[int]):
        super().__init__()
        self.kernel_size = tuple(int(k) for k in kernel_size)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        kh, kw = self.kernel_size
        if kh >= h and kw >= w:
            return F.adaptive_avg_pool2d(x, 1)
        k1, k2 = min(h, kh), min(w, kw)
        s = F.pad(x.cumsum(dim=-1).cumsum(dim=-2), (1, 0, 1, 0))
        s1, s2 = s[..., :-k1, :-k2], s[..., :-k1, k2:]
        s3, s4 = s[..., k1:, :-k2], s[..., k1:, k2:]
        out = (s4 + s1 - s2 - s3) / (k1 * k2)
        out_h, out_w = out.shape[-2:]
        pad = ((w - out_w) // 2, (w - out_w + 1) // 2, (h - out_h) // 2, (h - out_h + 1) // 2)
        return F.pad(out, pad, mode="replicate")


class NAFBlock(nn.Module):
    """``y = inp + β·conv3(SCA(SG(dw(conv1(LN(inp))))))``, ``out = y + γ·conv5(SG(conv4(LN(y))))``."""

    def __init__(self, c: int, dw_expand: int = 2, ffn_expand: int = 2):
        super().__init__()
        dw = c * dw_expand
        self.conv1 = nn.Conv2d(c, dw, 1)
        self.conv2 = nn.Conv2d(dw, dw, 3, padding=1, groups=dw)
        self.conv3 = nn.Conv2d(dw // 2, c, 1)
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dw // 2, dw // 2, 1))
        self.sg = SimpleGate()
        ffn = c * ffn_expand
        self.conv4 = nn.Conv2d(c, ffn, 1)
        self.conv5 = nn.Conv2d(ffn // 2, c, 1)
        self.norm1 = LayerNorm2d(c)
        self.norm2 = LayerNorm2d(c)
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def body(self, h: torch.Tensor) -> torch.Tensor:
        x = self.sg(self.conv2(self.conv1(self.norm1(h))))
        return self.conv3(x * self.sca(x))

    def ffn(self, y: torch.Tensor) -> torch.Tensor:
        return self.conv5(self.sg(self.conv4(self.norm2(y))))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        y = inp + self.body(inp) * self.beta
        return y + self.ffn(y) * self.gamma


class KernelAttention(nn.Module):
    """``a = GELU(conv(x))``, ``kf = GELU(conv(GELU(conv_{k²→c}(kmap))))``,
    ``h = a·sigmoid(conv([a, kf])) + x``; all convs 3×3, GELU the exact (erf) form."""

    def __init__(self, c: int, kernel_channels: int):
        super().__init__()
        self.conv_1 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.GELU())
        self.conv_kernel = nn.Sequential(nn.Conv2d(kernel_channels, c, 3, padding=1), nn.GELU(),
                                         nn.Conv2d(c, c, 3, padding=1), nn.GELU())
        self.conv_2 = nn.Sequential(nn.Conv2d(2 * c, c, 3, padding=1), nn.Sigmoid())

    def forward(self, x: torch.Tensor, kmap: torch.Tensor) -> torch.Tensor:
        a = self.conv_1(x)
        att = self.conv_2(torch.cat([a, self.conv_kernel(kmap)], dim=1))
        return a * att + x


class NAFBlockKernel(NAFBlock):
    """A NAFBlock whose first branch reads the kernel-attended features; the residual
    keeps the block input."""

    def __init__(self, c: int, kernel_channels: int, dw_expand: int = 2, ffn_expand: int = 2):
        super().__init__(c, dw_expand, ffn_expand)
        self.kernel_atttion = KernelAttention(c, kernel_channels)

    def forward(self, inp: torch.Tensor, kmap: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = inp + self.body(self.kernel_atttion(inp, kmap)) * self.beta
        return y + self.ffn(y) * self.gamma


# --- KE-Net -----------------------------------------------------------------------------------

def _conv3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


class ResBlock(nn.Module):
    """Pre-activation residual block ``x + conv(relu(conv(relu(x))))``."""

    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), _conv3(c, c), nn.ReLU(), _conv3(c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class EncodingBlock(nn.Module):
    """Conv head, two ResBlocks, ReLU (the skip), stride-2 3×3 conv."""

    def __init__(self, cin: int, c: int):
        super().__init__()
        self.Conv_head = _conv3(cin, c)
        self.ResBlock1 = ResBlock(c)
        self.ResBlock2 = ResBlock(c)
        self.downsample = _conv3(c, c, stride=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = F.relu(self.ResBlock2(self.ResBlock1(self.Conv_head(x))))
        return self.downsample(skip), skip


class DecodingBlock(nn.Module):
    """Transposed conv to the skip's size, concat [up, skip], conv, two ResBlocks, ReLU."""

    def __init__(self, cin: int, c: int):
        super().__init__()
        self.Conv_t = nn.ConvTranspose2d(cin, c, 3, stride=2, padding=1)
        self.Conv_head = _conv3(2 * c, c)
        self.ResBlock1 = ResBlock(c)
        self.ResBlock2 = ResBlock(c)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.Conv_t(x, output_size=skip.shape[-2:])
        h = self.Conv_head(torch.cat([up, skip], dim=1))
        return F.relu(self.ResBlock2(self.ResBlock1(h)))


class ConvMid(nn.Module):
    def __init__(self, cin: int, c: int, n_mid: int):
        super().__init__()
        layers = []
        for i in range(n_mid):
            layers += [_conv3(cin if i == 0 else c, c), nn.ReLU()]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ConvTail(nn.Module):
    """mean: conv–ReLU–conv–softmax over the k² channels; var: conv–ReLU–conv–sigmoid."""

    def __init__(self, c: int, k2: int):
        super().__init__()
        self.mean = nn.Sequential(_conv3(c, c), nn.ReLU(), _conv3(c, k2), nn.Softmax(dim=1))
        self.var = nn.Sequential(_conv3(c, c), nn.ReLU(), _conv3(c, k2), nn.Sigmoid())


class KENet(nn.Module):
    """Kernel-estimation network (official ``code_extra_mean_var``) at full resolution.

    Returns ``code`` (B, H·W, k, k) with ``code[b, y·W + x, i, j]`` the softmax output of
    channel ``k·i + j`` at pixel (y, x), and ``var`` of the same shape: the mean of the k²
    sigmoids of each pixel repeated over (i, j) (an expanded view; arithmetic on it makes
    full-size tensors, as the official repeated tensor does).
    """

    def __init__(self, kernel_size: int = 19, widths: Sequence[int] = (64, 128), n_mid: int = 5,
                 in_channels: int = 3):
        super().__init__()
        w1, w2 = widths
        self.kernel_size = kernel_size
        k2 = kernel_size ** 2
        self.Encoding_Block1 = EncodingBlock(in_channels, w1)
        self.Encoding_Block2 = EncodingBlock(w1, w2)
        self.Conv_mid = ConvMid(w2, 2 * w2, n_mid)
        self.Decoding_Block1 = DecodingBlock(2 * w2, w2)
        self.Decoding_Block2 = DecodingBlock(w2, w1)
        self.Conv_tail = ConvTail(w1, k2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = x.shape
        k = self.kernel_size
        x, skip1 = self.Encoding_Block1(x)
        x, skip2 = self.Encoding_Block2(x)
        x = self.Decoding_Block1(self.Conv_mid(x), skip2)
        x = self.Decoding_Block2(x, skip1)
        code = self.Conv_tail.mean(x).permute(0, 2, 3, 1).reshape(b, h * w, k, k)
        sigma = self.Conv_tail.var(x).mean(dim=1).reshape(b, h * w, 1, 1)
        return code, sigma.expand(b, h * w, k, k)


# --- flow prior -------------------------------------------------------------------------------

def _mlp(d: int, hidden: int, n_hidden: int, act) -> nn.Sequential:
    layers = [nn.Linear(d, hidden)]
    for _ in range(n_hidden):
        layers += [act(), nn.Linear(hidden, hidden)]
    return nn.Sequential(*layers, act(), nn.Linear(hidden, d))


class LinearMaskedCoupling(nn.Module):
    """Affine coupling with mask ``m`` (1 = pass-through), ``s``/``t`` of the masked input.

    * ``forward`` (data -> latent): ``u = m·x + (1 − m)·(x − t(m·x))·exp(−s(m·x))``, with the
      per-feature log-det ``−(1 − m)·s``;
    * ``inverse`` (latent -> data): ``x = m·u + (1 − m)·(u·exp(s(m·u)) + t(m·u))``, and with
      ``log_det`` also its per-feature log-det ``(1 − m)·s``.
    """

    def __init__(self, d: int, hidden: int, n_hidden: int, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)
        self.s_net = _mlp(d, hidden, n_hidden, nn.Tanh)
        self.t_net = _mlp(d, hidden, n_hidden, nn.ReLU)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mx = x * self.mask
        s, t = self.s_net(mx), self.t_net(mx)
        return mx + (1 - self.mask) * (x - t) * torch.exp(-s), -(1 - self.mask) * s

    def inverse(self, u: torch.Tensor, log_det: bool = False):
        mu = u * self.mask
        s = self.s_net(mu)
        x = mu + (1 - self.mask) * (u * torch.exp(s) + self.t_net(mu))
        return (x, (1 - self.mask) * s) if log_det else x


class FlowBatchNorm(nn.Module):
    """Flow batch-norm with the running statistics (eval mode), whatever the module's mode.

    ``forward`` (data -> latent): ``y = exp(log_gamma)·(x − mean)/sqrt(var + eps) + beta``,
    with the per-feature log-det ``log_gamma − ½·log(var + eps)``; ``inverse`` undoes it (with
    ``log_det``, also returning the negated log-det).
    """

    def __init__(self, d: int, eps: float = FLOW_BN_EPS):
        super().__init__()
        self.eps = eps
        self.log_gamma = nn.Parameter(torch.zeros(d))
        self.beta = nn.Parameter(torch.zeros(d))
        self.register_buffer("running_mean", torch.zeros(d))
        self.register_buffer("running_var", torch.ones(d))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_hat = (x - self.running_mean) / torch.sqrt(self.running_var + self.eps)
        log_det = self.log_gamma - 0.5 * torch.log(self.running_var + self.eps)
        return torch.exp(self.log_gamma) * x_hat + self.beta, log_det.expand_as(x)

    def inverse(self, y: torch.Tensor, log_det: bool = False):
        x_hat = (y - self.beta) * torch.exp(-self.log_gamma)
        x = x_hat * torch.sqrt(self.running_var + self.eps) + self.running_mean
        if not log_det:
            return x
        return x, (0.5 * torch.log(self.running_var + self.eps) - self.log_gamma).expand_as(x)


class KernelPrior(nn.Module):
    """RealNVP kernel prior (official ``KernelPrior``), eval mode (running statistics).

    ``net`` alternates couplings (even indices; mask ``arange(d) % 2``, flipped after each)
    and flow batch-norms (odd indices). Methods, in the official conventions
    (``shared/fixtures/README.md``, "flow_motion.npz"):

    * ``forward(x)`` (data -> latent, ``net.0`` first): ``(u, log|det du/dx|)``, the log-det
      of shape (N,);
    * ``inverse(z)`` (latent -> data, ``net.9`` first): ``x`` only, what UFPNet uses (the
      official one always also computes ``log|det dx/dz|`` and UFPNet discards it);
      ``inverse(z, log_det=True)``: the official ``(x, log|det dx/dz|)``, log-det (N,);
    * ``log_prob(x)``: ``(log_prob, u)``, log-prob first, with
      ``log_prob = Σ_d log Normal(u_d; base_dist_mean_d, scale=base_dist_var_d) + log-det``;
    * ``pre_process(k)``: kernels (N, ...) -> flow space ``logit(α + (1 − 2α)·k/normalization)``,
      (N, k²);
    * ``post_process(x)``: ``k = (sigmoid(x) − α)/(1 − 2α)·normalization``, (N, 1, k, k), not
      renormalised.
    """

    def __init__(self, n_blocks: int = FLOW_BLOCKS, hidden_size: int = FLOW_HIDDEN,
                 n_hidden: int = FLOW_N_HIDDEN, kernel_size: int = 19):
        super().__init__()
        d = kernel_size ** 2
        self.register_buffer("kernel_size", torch.tensor([float(kernel_size)]))
        self.register_buffer("alpha", torch.tensor([FLOW_ALPHA]))
        self.register_buffer("normalization", torch.tensor([1.0]))
        self.register_buffer("base_dist_mean", torch.zeros(d))
        self.register_buffer("base_dist_var", torch.ones(d))
        mask = torch.arange(d).float() % 2
        layers = []
        for _ in range(n_blocks):
            layers += [LinearMaskedCoupling(d, hidden_size, n_hidden, mask), FlowBatchNorm(d)]
            mask = 1 - mask
        self.net = nn.Sequential(*layers)
        self.k = kernel_size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = 0
        for layer in self.net:
            x, layer_log_det = layer(x)
            log_det = log_det + layer_log_det
        return x, log_det.sum(1)

    def inverse(self, z: torch.Tensor, log_det: bool = False):
        if not log_det:
            for layer in reversed(self.net):
                z = layer.inverse(z)
            return z
        total = 0
        for layer in reversed(self.net):
            z, layer_log_det = layer.inverse(z, log_det=True)
            total = total + layer_log_det
        return z, total.sum(1)

    def log_prob(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, log_det = self.forward(x)
        base = torch.distributions.Normal(self.base_dist_mean, self.base_dist_var)
        return base.log_prob(u).sum(1) + log_det, u

    def pre_process(self, k: torch.Tensor) -> torch.Tensor:
        k = self.alpha + (1 - 2 * self.alpha) * (k.reshape(k.shape[0], -1) / self.normalization)
        return torch.log(k) - torch.log1p(-k)

    def post_process(self, x: torch.Tensor) -> torch.Tensor:
        k = x.view(-1, 1, self.k, self.k)
        return (torch.sigmoid(k) - self.alpha) / (1 - 2 * self.alpha) * self.normalization


# --- UFPNet -----------------------------------------------------------------------------------

class UFPNet(nn.Module):
    """Official ``UFPNet_code_uncertainty``: KE-Net, flow, kernel-attention NAFNet (NCHW).

    ``forward(x, eps=None)`` returns ``(kernels, restored)``: ``kernels`` (B, Hp·Wp, k, k) of
    the input reflect-padded at the bottom/right to a multiple of ``2**len(enc_blk_nums)``
    (preds[0], not renormalised) and ``restored`` (B, C, H, W) in [0, 1] (preds[-1]). The
    kernels are computed under ``torch.no_grad`` (the KE-Net and the flow are frozen in
    stage III) with ``eps ~ N(0, I)`` drawn by ``torch.randn_like`` unless given, laid out
    like the kernels.

    Args:
      img_channel, width, middle_blk_num, enc_blk_nums, dec_blk_nums, kernel_size: the
        official constructor's arguments.
      ke_widths: KE-Net widths (official (64, 128); ``jaxdeblur``'s tiny config narrows it).
    """

    def __init__(self, img_channel: int = 3, width: int = 64, middle_blk_num: int = 1,
                 enc_blk_nums: Sequence[int] = (1, 1, 1, 28),
                 dec_blk_nums: Sequence[int] = (1, 1, 1, 1), kernel_size: int = 19,
                 ke_widths: Sequence[int] = (64, 128)):
        super().__init__()
        k2 = kernel_size ** 2
        self.kernel_size = kernel_size
        self.kernel_extra = KENet(kernel_size, tuple(ke_widths), in_channels=img_channel)
        self.flow = KernelPrior(kernel_size=kernel_size)
        self.intro = nn.Conv2d(img_channel, width, 3, padding=1)
        self.ending = nn.Conv2d(width, img_channel, 3, padding=1)
        self.encoders, self.decoders = nn.ModuleList(), nn.ModuleList()
        self.middle_blks, self.ups = nn.ModuleList(), nn.ModuleList()
        self.downs, self.kernel_down = nn.ModuleList(), nn.ModuleList()
        chan = width
        for num in enc_blk_nums:
            if num == 1:
                self.encoders.append(nn.ModuleList([NAFBlockKernel(chan, k2)]))
            else:
                self.encoders.append(nn.ModuleList([NAFBlock(chan) for _ in range(num)]))
            self.kernel_down.append(nn.Conv2d(k2, k2, 2, stride=2))
            self.downs.append(nn.Conv2d(chan, 2 * chan, 2, stride=2))
            chan *= 2
        self.middle_blks.extend(NAFBlock(chan) for _ in range(middle_blk_num))
        for num in dec_blk_nums:
            self.ups.append(nn.Sequential(nn.Conv2d(chan, 2 * chan, 1, bias=False),
                                          nn.PixelShuffle(2)))
            chan //= 2
            self.decoders.append(nn.ModuleList([NAFBlock(chan) for _ in range(num)]))
        self.padder_size = 2 ** len(enc_blk_nums)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Reflect-pads (bottom, right) to a multiple of ``padder_size``."""
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.padder_size, (-w) % self.padder_size
        return F.pad(x, (0, pw, 0, ph), mode="reflect") if ph or pw else x

    def estimate_kernels(self, padded: torch.Tensor, eps: Optional[torch.Tensor] = None
                         ) -> torch.Tensor:
        """Uncertain kernel codes through the flow: (B, Hp·Wp, k, k) kernels."""
        code, var = self.kernel_extra(padded)
        if eps is None:
            eps = torch.randn_like(code)
        mean = code.mean(dim=(2, 3), keepdim=True)
        std = code.std(dim=(2, 3), keepdim=True)  # unbiased (divisor n − 1), as officially
        z = (code - mean) / std * torch.sqrt(1 - var ** 2) + eps * var
        b, n, k, _ = code.shape
        x = self.flow.inverse(z.reshape(b * n, k * k))
        return self.flow.post_process(x).reshape(b, n, k, k)

    def restore(self, padded: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        """The kernel-attention NAFNet on the padded input; (B, C, Hp, Wp) in [0, 1]."""
        b, _, hp, wp = padded.shape
        kmap = kernels.reshape(b, hp, wp, -1).permute(0, 3, 1, 2)
        x = self.intro(padded)
        skips = []
        for blocks, down, kdown in zip(self.encoders, self.downs, self.kernel_down):
            if len(blocks) == 1:
                x = blocks[0](x, kmap)
                kmap = kdown(kmap)
            else:
                for block in blocks:
                    x = block(x)
            skips.append(x)
            x = down(x)
        for block in self.middle_blks:
            x = block(x)
        for up, blocks, skip in zip(self.ups, self.decoders, skips[::-1]):
            x = up(x) + skip
            for block in blocks:
                x = block(x)
        return torch.clamp(self.ending(x) + padded, 0.0, 1.0)

    def forward(self, x: torch.Tensor, eps: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = x.shape[-2:]
        padded = self.pad(x)
        self.flow.eval()
        with torch.no_grad():
            kernels = self.estimate_kernels(padded, eps)
        return kernels, self.restore(padded, kernels)[..., :h, :w]


def tlc_windows(train_size: Sequence[int], n_levels: int) -> list[tuple[int, int]]:
    """Local-pool windows per level (0 = full resolution, ``n_levels`` = the middle).

    The official ``Local_Base.convert`` runs one forward on a ``train_size`` input (padded
    to a multiple of ``2**n_levels`` like any input) and each pool fixes its window to
    ``(h_T·base_H // T_H, w_T·base_W // T_W)`` with ``base = (int(1.5·T_H), int(1.5·T_W))``
    and h_T×w_T the features it sees; here the feature sizes are computed, not run.
    """
    t_h, t_w = train_size
    mult = 2 ** n_levels
    p_h, p_w = math.ceil(t_h / mult) * mult, math.ceil(t_w / mult) * mult
    base_h, base_w = int(1.5 * t_h), int(1.5 * t_w)
    return [((p_h >> level) * base_h // t_h, (p_w >> level) * base_w // t_w)
            for level in range(n_levels + 1)]


def to_local(model: UFPNet, train_size: Sequence[int]) -> UFPNet:
    """Turns ``model`` into the TLC variant in place: every ``sca.0`` becomes `AvgPool2d`."""
    n_levels = len(model.encoders)
    windows = tlc_windows(train_size, n_levels)
    levels = ([(blocks, windows[level]) for level, blocks in enumerate(model.encoders)]
              + [(model.middle_blks, windows[n_levels])]
              + [(blocks, windows[n_levels - 1 - i]) for i, blocks in enumerate(model.decoders)])
    for blocks, window in levels:
        for block in blocks:
            block.sca[0] = AvgPool2d(window)
    return model


def build(fields: Mapping, *, train_size: Optional[Sequence[int]] = None) -> UFPNet:
    """A UFPNet from ``jaxdeblur`` model fields (``config.model``), TLC when ``train_size``.

    Args:
      fields: ``img_channel``, ``width``, ``enc_blk_nums``, ``middle_blk_num``,
        ``dec_blk_nums``, ``kernel_size`` and optionally ``ke_widths`` (default official).
      train_size: (T_H, T_W) for the Local (TLC) variant, or None.
    """
    model = UFPNet(img_channel=fields["img_channel"], width=fields["width"],
                   middle_blk_num=fields["middle_blk_num"],
                   enc_blk_nums=tuple(fields["enc_blk_nums"]),
                   dec_blk_nums=tuple(fields["dec_blk_nums"]),
                   kernel_size=fields["kernel_size"],
                   ke_widths=tuple(fields.get("ke_widths", (64, 128))))
    return to_local(model, train_size) if train_size is not None else model


def config_fields(name: str) -> dict:
    """The model fields of a shipped ``jaxdeblur`` UFPNet config (``ufpnet_tiny``,
    ``ufpnet_gopro``), the architecture our side of a benchmark uses."""
    return configs.plain(configs.load(name).model)


def load_npz_state_dict(model: nn.Module, path, prefix: str = "param/") -> nn.Module:
    """Loads the ``<prefix><torch key>`` arrays of an npz strictly into ``model``."""
    with np.load(path) as data:
        state = {k[len(prefix):]: torch.from_numpy(np.array(data[k])) for k in data.files
                 if k.startswith(prefix)}
    model.load_state_dict(state, strict=True)
    return model


# --- stage III --------------------------------------------------------------------------------

FROZEN = ("kernel_extra.", "flow.")


def psnr_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """NAFNet's PSNR loss ``10/ln10 · mean_b log(mean(pred − target)² + 1e-8)``."""
    mse = (pred - target).pow(2).mean(dim=(1, 2, 3))
    return 10.0 / math.log(10.0) * torch.log(mse + PSNR_LOSS_EPS).mean()


def crop_kernels(kernels: torch.Tensor, padded_hw: Sequence[int], hw: Sequence[int]):
    """(B, Hp·Wp, k, k) kernels of the padded image -> (B, H·W, k, k) of the image."""
    b, _, k, _ = kernels.shape
    (hp, wp), (h, w) = padded_hw, hw
    if (hp, wp) == (h, w):
        return kernels
    return kernels.reshape(b, hp, wp, k, k)[:, :h, :w].reshape(b, h * w, k, k)


class Stage3Step:
    """One stage-III training step of ``jaxdeblur.train.ufpnet``, in PyTorch.

    Loss ``psnr_loss(x̂, x) + reblur_weight · mean|K̂ ⊗ x̂ − y|`` with the kernels detached and
    the reblur by the official unfold algorithm (`torch_reference.unfold_per_pixel_blur`);
    gradients clipped to global norm ``grad_clip``; ``torch.optim.AdamW`` (lr, betas, weight
    decay of the config) with ``CosineAnnealingLR`` from ``learning_rate`` to
    ``min_learning_rate`` over ``num_steps``. The KE-Net and the flow get no gradient and
    are not in the optimiser (frozen for real, as ours: no weight decay reaches them).

    Args:
      model: a `UFPNet` (global pooling: training uses no TLC).
      stage3: the config's ``stage3`` section (``learning_rate``, ``min_learning_rate``,
        ``b1``, ``b2``, ``weight_decay``, ``grad_clip``, ``reblur_weight``, ``num_steps``).
    """

    def __init__(self, model: UFPNet, stage3: Mapping):
        self.model = model.train()
        self.reblur_weight = float(stage3["reblur_weight"])
        self.grad_clip = float(stage3["grad_clip"])
        self.params = []
        for name, p in model.named_parameters():
            frozen = name.startswith(FROZEN)
            p.requires_grad_(not frozen)
            if not frozen:
                self.params.append(p)
        self.optimizer = torch.optim.AdamW(
            self.params, lr=float(stage3["learning_rate"]),
            betas=(float(stage3["b1"]), float(stage3["b2"])),
            weight_decay=float(stage3["weight_decay"]))
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=int(stage3["num_steps"]),
            eta_min=float(stage3["min_learning_rate"]))

    def loss(self, blurry: torch.Tensor, sharp: torch.Tensor,
             eps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The stage-III loss of a (B, C, H, W) batch (``eps``: the model's noise)."""
        kernels, restored = self.model(blurry, eps)
        h, w = blurry.shape[-2:]
        m = self.model.padder_size
        kernels = crop_kernels(kernels.detach(), (-(-h // m) * m, -(-w // m) * m), (h, w))
        reblur = (unfold_per_pixel_blur(restored, kernels) - blurry).abs().mean()
        return psnr_loss(restored, sharp) + self.reblur_weight * reblur

    def __call__(self, blurry: torch.Tensor, sharp: torch.Tensor,
                 eps: Optional[torch.Tensor] = None) -> float:
        """One step on a (B, C, H, W) batch; returns the loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(blurry, sharp, eps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach())
