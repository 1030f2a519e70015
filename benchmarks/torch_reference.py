"""PyTorch re-implementations of the official blur algorithms, for benchmarks only.

Written from the formulas in `shared/fixtures/README.md` (no code was copied from the
authors' repositories). They reproduce the *algorithms* (and therefore the time and memory
costs) of the official operators:

* `unfold_per_pixel_blur`: UFPNet's `BatchBlur_SV` strategy — replicate-pad, `F.unfold`
  the whole image into its k² shifted copies (C·B·H·W·k² values), multiply by the per-pixel
  kernels and sum. Unlike the official op it pairs every image with its own kernels
  (the official op mixes kernels across images when B > 1); the cost is the same.
* `eff_loop_blur`: Deep EM's `EFF.forward` strategy — a Python loop over the G patches of
  the zero-padded canvas: window, valid `F.conv2d` with the patch's kernel, add back into
  the canvas at offset (k-1)/2, crop.

torch is imported here, never by the library.
"""

import numpy as np
import torch
import torch.nn.functional as F


def unfold_per_pixel_blur(image: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Per-pixel blur by unfolding: y[b,c,p] = Σ_{i,j} xpad[b,c,p+(i,j)] · K[b,p,i,j].

    Args:
      image: (B, C, H, W).
      kernels: (B, H·W, k, k), pixel p = r·W + q, odd k.

    Returns:
      (B, C, H, W).
    """
    b, c, h, w = image.shape
    k = kernels.shape[-1]
    r = (k - 1) // 2
    padded = F.pad(image, (r, r, r, r), mode="replicate")
    # (B, C·k², H·W): the k² shifted copies of every channel, the official op's big tensor.
    columns = F.unfold(padded, k).view(b, c, k * k, h * w)
    weights = kernels.reshape(b, 1, h * w, k * k).transpose(2, 3)
    return (columns * weights).sum(dim=2).view(b, c, h, w)


def eff_loop_blur(image: torch.Tensor, kernels: torch.Tensor, geometry) -> torch.Tensor:
    """Mask-first efficient filter flow by a loop over patches (Deep EM's algorithm).

    Args:
      image: (1, C, H, W).
      kernels: (G, kh, kw), one per patch in row-major grid order.
      geometry: a `jaxdeblur.blur.EFFGeometry` (pure Python / numpy, no JAX arrays).

    Returns:
      (1, C, H, W).
    """
    top, bottom, left, right = geometry.pad
    canvas = F.pad(image, (left, right, top, bottom))
    window = torch.from_numpy(np.asarray(geometry.window, np.float32))
    kh, kw = kernels.shape[1:]
    rh, rw = (kh - 1) // 2, (kw - 1) // 2
    out = torch.zeros_like(canvas)
    g = 0
    for t, b in zip(geometry.t_patch, geometry.b_patch):
        for lft, r in zip(geometry.l_patch, geometry.r_patch):
            patch = canvas[:, :, t:b, lft:r] * window
            # Channels as the conv batch: every channel uses the patch's kernel.
            blurred = F.conv2d(patch.transpose(0, 1), kernels[g][None, None])
            out[:, :, t + rh:b - rh, lft + rw:r - rw] += blurred.transpose(0, 1)
            g += 1
    h, w = geometry.image_size
    return out[:, :, top:top + h, left:left + w]
