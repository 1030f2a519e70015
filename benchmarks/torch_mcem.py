"""PyTorch reference of jaxdeblur's Deep EM (MCEM) networks and steps, for benchmarks only.

Written from ``jaxdeblur/nets/unet.py``, ``jaxdeblur/mcem.py`` and ``jaxdeblur/blur.py``
(the paper's method, ``shared/SPEC.md`` §4; the authors' demo scripts are not public, so
the reference follows *our* definitions): the same networks, likelihood, prior, sampler and
M-step loss, so that a timing compares frameworks on the same computation and a test can
check them number for number.

* `SkipNet`, `DIPImageNet`, `KernelNet`: the DIP "skip" U-Nets (GroupNorm, LeakyReLU 0.2,
  stride-2 3×3 convs with flax's 'SAME' padding, bilinear up-sampling to the skip's size,
  1×1 skips, a 1×1 head); `load_flax_params` copies a flax init into them.
* `filter_flow_blur`: the mask-first efficient filter flow ``y = Σ_g k_g ⋆ (w_g ⊙ x)``,
  the patches cut by ``F.unfold`` and overlap-added by ``F.fold`` (their regular grid is a
  strided sliding window), blurred by one grouped convolution (``"direct"``) or by real
  FFTs of the same sizes as ours (``"fft"``, what ``method="auto"`` picks on the CPU); or
  ``"loop"``, the official ``EFF.forward`` algorithm (`torch_reference.eff_loop_blur`).
* `PSGLD`: RMSprop-preconditioned Langevin dynamics with Adam's bias correction, as
  ``jaxdeblur.mcem.psgld`` (``sgld`` when the config says so).
* `DeepEM`: one image's state and steps: `DeepEM.e_step` (n pSGLD steps on the image
  network's parameters, post-burn-in images folded into Welford moments) and
  `DeepEM.m_step` (Adam on the kernel network, the Monte Carlo Q with the variance term
  and the centre-of-mass penalty); `DeepEM.from_jax` copies an ``MCEMState``.

Layouts are PyTorch's: images (1, C, H, W), kernels (G, k, k). torch is imported here and
in the benchmarks and tests that use this file, never by the library.
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

from jaxdeblur import blur as blur_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_reference import eff_loop_blur  # noqa: E402

GROUP_NORM_EPS = 1e-5  # flax.linen.GroupNorm's default, as jaxdeblur.nets.unet uses it
BLUR_METHODS = ("direct", "fft", "loop")


# --- networks ---------------------------------------------------------------------------------

def _same_pad_stride2(x: torch.Tensor, kernel: int = 3) -> torch.Tensor:
    """flax 'SAME' padding of a stride-2 conv: output ceil(n/2), the extra pixel at the end."""
    pads = []
    for n in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(n / 2) - 1) * 2 + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class SkipNet(nn.Module):
    """DIP skip encoder-decoder, as ``jaxdeblur.nets.unet.SkipNet`` (one example, NCHW).

    ``convs`` and ``norms`` hold the layers in flax's creation order (``Conv_i``,
    ``GroupNorm_i``): per level a 1×1 skip, a stride-2 3×3 and a 3×3 conv; per decoder level
    a 3×3 and a 1×1; then the 1×1 head. Normalised convs have no bias.
    """

    def __init__(self, in_channels: int, features: Sequence[int], skip_features: int,
                 out_channels: int, norm: str = "group", num_groups: int = 8,
                 negative_slope: float = 0.2):
        super().__init__()
        if norm not in ("group", "none"):
            raise ValueError(f"norm must be 'group' or 'none', got {norm!r}")
        self.levels = len(features)
        self.negative_slope = negative_slope
        bias = norm == "none"
        shapes = []
        c = in_channels
        for feat in features:
            shapes += [(c, skip_features, 1, 1), (c, feat, 3, 2), (feat, feat, 3, 1)]
            c = feat
        for feat in reversed(features):
            shapes += [(c + skip_features, feat, 3, 1), (feat, feat, 1, 1)]
            c = feat
        self.convs = nn.ModuleList(
            nn.Conv2d(cin, cout, k, stride=s, padding=1 if (k == 3 and s == 1) else 0, bias=bias)
            for cin, cout, k, s in shapes)
        self.convs.append(nn.Conv2d(c, out_channels, 1))
        self.norms = nn.ModuleList(
            nn.GroupNorm(math.gcd(num_groups, cout), cout, eps=GROUP_NORM_EPS)
            if norm == "group" else nn.Identity() for _, cout, _, _ in shapes)

    def _act(self, x: torch.Tensor, index: int) -> torch.Tensor:
        return F.leaky_relu(self.norms[index](x), self.negative_slope)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: (1, C_in, H, W) -> (1, out_channels, H, W) pre-activations."""
        x, skips, i = z, [], 0
        for _ in range(self.levels):
            skips.append(self._act(self.convs[i](x), i))
            x = self._act(self.convs[i + 1](_same_pad_stride2(x)), i + 1)
            x = self._act(self.convs[i + 2](x), i + 2)
            i += 3
        for skip in reversed(skips):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = self._act(self.convs[i](torch.cat([x, skip], dim=1)), i)
            x = self._act(self.convs[i + 1](x), i + 1)
            i += 2
        return self.convs[i](x)


class DIPImageNet(nn.Module):
    """Image network ``x = sigmoid(SkipNet(z))``; parameters under ``trunk``."""

    def __init__(self, in_channels: int, features: Sequence[int], skip_features: int,
                 out_channels: int, norm: str = "group", num_groups: int = 8):
        super().__init__()
        self.trunk = SkipNet(in_channels, features, skip_features, out_channels, norm,
                             num_groups)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.trunk(z))


class KernelNet(nn.Module):
    """Multi-head kernel network: head g of the trunk, softmax over its k·k entries.

    ``tie_heads``: the logits averaged over the heads, one (1, k, k) kernel (the warm-up).
    """

    def __init__(self, num_kernels: int, in_channels: int, features: Sequence[int],
                 skip_features: int, norm: str = "group", num_groups: int = 8):
        super().__init__()
        self.trunk = SkipNet(in_channels, features, skip_features, num_kernels, norm,
                             num_groups)

    def forward(self, z: torch.Tensor, tie_heads: bool = False) -> torch.Tensor:
        """z: (1, C_in, k, k) -> (G, k, k) kernels (or (1, k, k) with tie_heads)."""
        logits = self.trunk(z)[0]
        if tie_heads:
            logits = logits.mean(dim=0, keepdim=True)
        g, kh, kw = logits.shape
        return torch.softmax(logits.reshape(g, kh * kw), dim=-1).reshape(g, kh, kw)


def torch_state_from_flax(tree: Mapping) -> dict[str, np.ndarray]:
    """A flax SkipNet-based tree (params, or any tree shaped like them: noise, moments) as
    torch state-dict arrays: ``Conv_i`` -> ``trunk.convs.i`` (HWIO -> OIHW),
    ``GroupNorm_i`` -> ``trunk.norms.i`` (scale -> weight)."""
    tree = tree.get("params", tree)
    (trunk,) = tree.values()
    state = {}
    for layer, leaves in trunk.items():
        kind, index = layer.rsplit("_", 1)
        for leaf, value in leaves.items():
            # A copy: np.asarray of a CPU jax.Array may share its buffer, and torch updates
            # parameters in place.
            value = np.array(value, copy=True)
            if kind == "Conv":
                name = f"trunk.convs.{index}.{'weight' if leaf == 'kernel' else 'bias'}"
                state[name] = value.transpose(3, 2, 0, 1) if leaf == "kernel" else value
            elif kind == "GroupNorm":
                state[f"trunk.norms.{index}.{'weight' if leaf == 'scale' else 'bias'}"] = value
            else:
                raise ValueError(f"unexpected flax layer {layer!r} in a SkipNet tree")
    return state


def load_flax_params(net: nn.Module, flax_params: Mapping) -> nn.Module:
    """Copies flax ``DIPImageNet`` / ``KernelNet`` parameters into ``net`` (strict)."""
    state = {k: torch.from_numpy(np.ascontiguousarray(v))
             for k, v in torch_state_from_flax(flax_params).items()}
    net.load_state_dict(state, strict=True)
    return net


def image_to_torch(image) -> torch.Tensor:
    """(H, W, C) array -> (1, C, H, W) float32 tensor (a copy)."""
    return torch.from_numpy(np.array(np.asarray(image, np.float32).transpose(2, 0, 1)))[None]


def image_from_torch(image: torch.Tensor) -> np.ndarray:
    """(1, C, H, W) tensor -> (H, W, C) array."""
    return image.detach()[0].permute(1, 2, 0).numpy()


# --- filter flow ------------------------------------------------------------------------------

def _valid_correlation(padded: torch.Tensor, kernels: torch.Tensor, method: str):
    """padded (C, G, Hp, Wp), kernels (G, kh, kw) -> (C, G, Hp − kh + 1, Wp − kw + 1)."""
    g, kh, kw = kernels.shape
    if method == "direct":
        return F.conv2d(padded, kernels[:, None], groups=g)
    hp, wp = padded.shape[-2:]
    n1, n2 = blur_lib.next_fast_len(hp), blur_lib.next_fast_len(wp)
    spectrum = torch.fft.rfft2(padded, s=(n1, n2))
    kernel_spectrum = torch.fft.rfft2(kernels, s=(n1, n2))
    full = torch.fft.irfft2(spectrum * kernel_spectrum.conj(), s=(n1, n2))
    return full[..., :hp - kh + 1, :wp - kw + 1]


def filter_flow_blur(image: torch.Tensor, kernels: torch.Tensor, geometry,
                     method: str = "fft") -> torch.Tensor:
    """Mask-first efficient filter flow ``y = crop(Σ_g k_g ⋆ (w_g ⊙ x_canvas))``.

    Args:
      image: (1, C, H, W).
      kernels: (G, kh, kw) in row-major grid order, or (1, kh, kw) for every cell.
      geometry: a ``jaxdeblur.blur.EFFGeometry`` for (H, W).
      method: "direct" (grouped conv), "fft" (the FFT sizes of ``jaxdeblur.blur``) or
        "loop" (the official per-patch loop, `torch_reference.eff_loop_blur`).

    Returns:
      (1, C, H, W).
    """
    if method not in BLUR_METHODS:
        raise ValueError(f"method must be one of {BLUR_METHODS}, got {method!r}")
    g = geometry.num_patches
    kernels = kernels.expand(g, *kernels.shape[1:])
    if method == "loop":
        return eff_loop_blur(image, kernels, geometry)
    _, c, h, w = image.shape
    top, bottom, left, right = geometry.pad
    (h_in, w_in), (h_p, w_p) = geometry.patch_inner_size, geometry.patch_size
    size, stride = (2 * h_p, 2 * w_p), (h_in, w_in)
    canvas = F.pad(image, (left, right, top, bottom))
    patches = F.unfold(canvas, size, stride=stride).reshape(c, *size, g).permute(0, 3, 1, 2)
    window = torch.as_tensor(np.asarray(geometry.window, np.float32))
    rh, rw = (kernels.shape[1] - 1) // 2, (kernels.shape[2] - 1) // 2
    masked = F.pad(patches * window, (rw, rw, rh, rh))
    blurred = _valid_correlation(masked, kernels, method)
    columns = blurred.permute(0, 2, 3, 1).reshape(1, c * size[0] * size[1], g)
    out = F.fold(columns, geometry.padded_size, size, stride=stride)
    return out[:, :, top:top + h, left:left + w]


def resolve_blur_method(method: str, kernel_size: int) -> str:
    """``"auto"`` -> the method ``jaxdeblur.blur`` picks on the CPU for this kernel size."""
    if method != "auto":
        return method
    return "fft" if blur_lib._prefer_fft((kernel_size, kernel_size), "cpu") else "direct"


def kernel_centroid(kernels: torch.Tensor) -> torch.Tensor:
    """(G, k, k) -> (G, 2) centre of mass (row, column) relative to the centre pixel."""
    kh, kw = kernels.shape[-2:]
    rows = torch.arange(kh, dtype=kernels.dtype) - (kh - 1) / 2
    cols = torch.arange(kw, dtype=kernels.dtype) - (kw - 1) / 2
    mass = kernels.sum(dim=(-2, -1))
    cy = (kernels * rows[:, None]).sum(dim=(-2, -1)) / mass
    cx = (kernels * cols[None, :]).sum(dim=(-2, -1)) / mass
    return torch.stack([cy, cx], dim=-1)


# --- sampler and moments ----------------------------------------------------------------------

class PSGLD:
    """pSGLD as ``jaxdeblur.mcem.psgld`` (``preconditioned=False``: plain SGLD).

    ``V <- decay V + ((1 − decay) g) g``, ``G = 1/(eps + sqrt(V / (1 − decay^t)))``,
    ``θ <- θ + α G g + sqrt(2 α T G) w``, g the gradient of the log posterior, w ~ N(0, I).
    """

    def __init__(self, named_params: Sequence[tuple[str, torch.Tensor]], *, step_size: float,
                 decay: float, eps: float, temperature: float, preconditioned: bool = True,
                 seed: int = 0):
        self.named_params = list(named_params)
        self.step_size, self.decay, self.eps = step_size, decay, eps
        self.temperature, self.preconditioned = temperature, preconditioned
        self.nu = {n: torch.zeros_like(p) for n, p in self.named_params}
        self.count = 0
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor],
             noise: Optional[Mapping[str, torch.Tensor]] = None) -> None:
        """Updates the parameters in place; ``noise`` (name -> w) replaces the draws."""
        self.count += 1
        alpha, temp = self.step_size, self.temperature
        # float32 as ours: jnp computes 1 - decay ** count in float32.
        scale = 1.0 - torch.tensor(self.decay, dtype=torch.float32) ** self.count
        for (name, p), g in zip(self.named_params, grads):
            w = (noise[name] if noise is not None
                 else torch.randn(p.shape, generator=self.generator, dtype=p.dtype))
            if self.preconditioned:
                v = self.nu[name]
                v.mul_(self.decay).add_(((1.0 - self.decay) * g) * g)
                precond = 1.0 / (self.eps + torch.sqrt(v / scale))
                p.add_(alpha * precond * g + torch.sqrt(2.0 * alpha * temp * precond) * w)
            else:
                p.add_(alpha * g + math.sqrt(2.0 * alpha * temp) * w)


class Welford:
    """Running mean and squared deviations; a sample of weight 0 leaves them unchanged."""

    def __init__(self, like: torch.Tensor):
        self.count = torch.zeros((), dtype=torch.float32)
        self.mean = torch.zeros_like(like)
        self.m2 = torch.zeros_like(like)

    @torch.no_grad()
    def update(self, sample: torch.Tensor, weight: float) -> None:
        weight = torch.tensor(weight, dtype=torch.float32)
        self.count = self.count + weight
        delta = sample - self.mean
        self.mean = self.mean + weight * delta / torch.clamp(self.count, min=1.0)
        self.m2 = self.m2 + weight * delta * (sample - self.mean)

    def variance(self) -> torch.Tensor:
        return self.m2 / torch.clamp(self.count, min=1.0)


# --- one image's MCEM -------------------------------------------------------------------------

class DeepEM:
    """One image's Deep EM state and steps in PyTorch, as ``jaxdeblur.mcem``.

    Args:
      image_net, kernel_net: `DIPImageNet` and `KernelNet`.
      z_image: (1, C_in, H + k − 1, W + k − 1) fixed noise input of the image network.
      z_kernel: (1, C_in, k, k) fixed noise input of the kernel network.
      geometry: ``jaxdeblur.blur.EFFGeometry`` of the latent (H + k − 1, W + k − 1).
      method: ``jaxdeblur.mcem.MethodHParams`` (every hyperparameter).
      blur_method: `filter_flow_blur`'s method ("auto": as ours on the CPU).
      seed: the sampler's noise stream.
    """

    def __init__(self, image_net: DIPImageNet, kernel_net: KernelNet, z_image: torch.Tensor,
                 z_kernel: torch.Tensor, geometry, method, *, blur_method: str = "auto",
                 seed: int = 0):
        self.image_net, self.kernel_net = image_net, kernel_net
        self.z_image, self.z_kernel = z_image, z_kernel
        self.geometry, self.method = geometry, method
        self.blur_method = resolve_blur_method(blur_method, method.kernel_size)
        self.sampler = PSGLD(list(image_net.named_parameters()), step_size=method.step_size,
                             decay=method.psgld_decay, eps=method.psgld_eps,
                             temperature=method.temperature,
                             preconditioned=method.sampler == "psgld", seed=seed)
        channels = image_net.trunk.convs[-1].out_channels
        self.stats = Welford(torch.zeros(1, channels, *z_image.shape[-2:]))
        self.chain_step = 0
        self.adam = torch.optim.Adam(kernel_net.parameters(), lr=method.m_step_lr)

    def reblur(self, latent: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        """Filter flow on the latent, cropped by (k − 1)/2 to the observation's size."""
        r = (self.method.kernel_size - 1) // 2
        out = filter_flow_blur(latent, kernels, self.geometry, self.blur_method)
        return out[:, :, r:out.shape[2] - r, r:out.shape[3] - r]

    def kernels(self, uniform: bool = False) -> torch.Tensor:
        return self.kernel_net(self.z_kernel, tie_heads=uniform)

    def log_posterior(self, kernels: torch.Tensor, blurry: torch.Tensor) -> torch.Tensor:
        """``−‖g − B x‖²/(2σ²) − (weight_decay/2)‖θ_f‖²``."""
        residual = blurry - self.reblur(self.image_net(self.z_image), kernels)
        log_likelihood = -(residual * residual).sum() / (2.0 * self.method.noise_sigma ** 2)
        prior = sum((p * p).sum() for p in self.image_net.parameters())
        return log_likelihood - 0.5 * self.method.weight_decay * prior

    def reset_chain(self) -> None:
        """A new E-step: burn-in restarts, earlier moments weighted by ``moment_decay``."""
        rho = torch.tensor(self.method.moment_decay, dtype=torch.float32)
        self.stats.count, self.stats.m2 = self.stats.count * rho, self.stats.m2 * rho
        self.chain_step = 0

    def e_step(self, blurry: torch.Tensor, length: int, *, uniform: bool = False,
               noise: Optional[Sequence[Mapping[str, torch.Tensor]]] = None) -> None:
        """``length`` Langevin steps on the image network for the current kernels.

        As ours, every step observes the image after its update and adds it to the moments
        with weight ``step >= burn_in`` (the observation is computed in the burn-in too).
        ``noise``: one name -> w mapping per step, instead of the sampler's draws.
        """
        with torch.no_grad():
            kernels = self.kernels(uniform)
        params = list(self.image_net.parameters())
        for i in range(length):
            grads = torch.autograd.grad(self.log_posterior(kernels, blurry), params)
            self.sampler.step(grads, None if noise is None else noise[i])
            with torch.no_grad():
                image = self.image_net(self.z_image)
            self.stats.update(image, float(self.chain_step >= self.method.e_step_burn_in))
            self.chain_step += 1

    def q_loss(self, blurry: torch.Tensor, uniform: bool = False) -> torch.Tensor:
        """Negative Monte Carlo Q per pixel, + variance term, + centre-of-mass penalty."""
        kernels = self.kernels(uniform)
        residual = blurry - self.reblur(self.stats.mean, kernels)
        loss = (residual * residual).mean()
        if self.method.m_step_variance_term:
            loss = loss + self.reblur(self.stats.variance(), kernels * kernels).mean()
        if self.method.kernel_centre_weight:
            loss = loss + self.method.kernel_centre_weight * (
                kernel_centroid(kernels) ** 2).sum(dim=-1).mean()
        return loss

    def m_step(self, blurry: torch.Tensor, length: int, *, uniform: bool = False) -> None:
        """``length`` Adam steps on the kernel network."""
        for _ in range(length):
            self.adam.zero_grad(set_to_none=True)
            self.q_loss(blurry, uniform).backward()
            self.adam.step()

    @classmethod
    def from_jax(cls, model, state, *, blur_method: str = "auto", seed: int = 0) -> "DeepEM":
        """The torch copy of a ``jaxdeblur.mcem`` (``MCEMModel``, one image's ``MCEMState``):
        networks, noise inputs, sampler moments and step count, Welford moments, Adam."""
        method = model.method
        c = model.image_shape[-1]
        image_net = DIPImageNet(method.image_net.input_channels, method.image_net.features,
                                method.image_net.skip_features, c, method.image_net.norm,
                                method.image_net.num_groups)
        kernel_net = KernelNet(model.num_kernels, method.kernel_net.input_channels,
                               method.kernel_net.features, method.kernel_net.skip_features,
                               method.kernel_net.norm, method.kernel_net.num_groups)
        load_flax_params(image_net, state.chain.params)
        load_flax_params(kernel_net, state.kernel_params)
        em = cls(image_net, kernel_net, image_to_torch(state.z_image),
                 image_to_torch(state.z_kernel), model.geometry, method,
                 blur_method=blur_method, seed=seed)
        sampler = state.chain.sampler
        em.sampler.count = int(sampler.count)
        if hasattr(sampler, "nu"):
            em.sampler.nu = {k: torch.from_numpy(np.ascontiguousarray(v))
                             for k, v in torch_state_from_flax(sampler.nu).items()}
        stats = state.chain.stats
        em.stats.count = torch.tensor(float(stats.count), dtype=torch.float32)
        em.stats.mean, em.stats.m2 = image_to_torch(stats.mean), image_to_torch(stats.m2)
        em.chain_step = int(state.chain.step)
        adam = state.adam[0]
        if int(adam.count) > 0:
            mu, nu = torch_state_from_flax(adam.mu), torch_state_from_flax(adam.nu)
            for name, p in kernel_net.named_parameters():
                em.adam.state[p] = {
                    "step": torch.tensor(float(adam.count)),
                    "exp_avg": torch.from_numpy(np.ascontiguousarray(mu[name])),
                    "exp_avg_sq": torch.from_numpy(np.ascontiguousarray(nu[name]))}
        return em


def named_tree(tree: Mapping) -> dict[str, torch.Tensor]:
    """A flax tree shaped like the image network's parameters (e.g. the pSGLD noise) as
    torch-named tensors, for `PSGLD.step`'s ``noise``."""
    return {k: torch.from_numpy(np.ascontiguousarray(v))
            for k, v in torch_state_from_flax(tree).items()}


def image_net_state(em: DeepEM) -> dict[str, np.ndarray]:
    """The image network's parameters as torch-named arrays (to compare with
    `torch_state_from_flax` of ours)."""
    return {k: v.detach().numpy().copy() for k, v in em.image_net.state_dict().items()}


__all__ = ["SkipNet", "DIPImageNet", "KernelNet", "torch_state_from_flax", "load_flax_params",
           "image_to_torch", "image_from_torch", "filter_flow_blur", "resolve_blur_method",
           "kernel_centroid", "PSGLD", "Welford", "DeepEM", "named_tree", "image_net_state"]
