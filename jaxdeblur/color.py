"""Colour handling around the networks: sRGB <-> linear light, grayscale and alpha.

The networks and the MCEM forward model see one layout only: an RGB image ``(H, W, 3)``
float32 in [0, 1]. Photos come in other layouts; this module maps them in and back out
without losing anything the deblurring does not touch:

* grayscale ``(H, W, 1)`` is replicated to three channels for the network, and the three
  restored channels are averaged back to one (a network trained on colour photos may
  return slightly different channels for a gray input; their mean is the least-squares
  gray image);
* an alpha channel (``(H, W, 2)`` gray + alpha or ``(H, W, 4)`` RGBA) is split off before
  deblurring and put back unchanged afterwards. Blur acts on the scene radiance, not on
  the matte: re-estimating a matte from a deblurred image is a different problem, so we
  carry it through bit for bit;
* gamma: photo files store sRGB-encoded values, while blur is a linear operation on light
  (a motion blur averages photons, not encoded values). With ``linear=True`` the image is
  decoded to linear light before the kernels are estimated and the image deblurred, and
  encoded back afterwards. Networks trained on sRGB data (the official UFPNet weights were
  trained on GoPro sRGB frames) should be run with ``linear=False``.

References:
  IEC 61966-2-1:1999, the sRGB transfer function.
"""

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

# IEC 61966-2-1 constants of the piecewise sRGB transfer function.
_SRGB_LINEAR_THRESHOLD = 0.0031308
_SRGB_ENCODED_THRESHOLD = 0.04045
_SRGB_SLOPE = 12.92
_SRGB_OFFSET = 0.055
_SRGB_GAMMA = 2.4


def srgb_to_linear(image):
    """Decodes sRGB values to linear light.

    ``c <= 0.04045 -> c / 12.92``, otherwise ``((c + 0.055) / 1.055) ** 2.4``.

    Args:
      image: any shape, float in [0, 1], sRGB-encoded. Values are clipped to [0, 1] first.

    Returns:
      The same shape and float dtype, linear light in [0, 1].
    """
    image = jnp.clip(jnp.asarray(image), 0.0, 1.0)
    low = image / _SRGB_SLOPE
    high = ((image + _SRGB_OFFSET) / (1.0 + _SRGB_OFFSET)) ** _SRGB_GAMMA
    return jnp.where(image <= _SRGB_ENCODED_THRESHOLD, low, high)


def linear_to_srgb(image):
    """Encodes linear light as sRGB values; the inverse of `srgb_to_linear`.

    ``l <= 0.0031308 -> 12.92 l``, otherwise ``1.055 l ** (1/2.4) - 0.055``.

    Args:
      image: any shape, float in [0, 1], linear light. Values are clipped to [0, 1] first
        (a deblurred image can overshoot slightly, and the power is undefined below 0).

    Returns:
      The same shape and float dtype, sRGB-encoded in [0, 1].
    """
    image = jnp.clip(jnp.asarray(image), 0.0, 1.0)
    low = image * _SRGB_SLOPE
    # The maximum keeps the unused branch of `where` finite (and its gradient defined).
    safe = jnp.maximum(image, _SRGB_LINEAR_THRESHOLD)
    high = (1.0 + _SRGB_OFFSET) * safe ** (1.0 / _SRGB_GAMMA) - _SRGB_OFFSET
    return jnp.where(image <= _SRGB_LINEAR_THRESHOLD, low, high)


class ChannelLayout(NamedTuple):
    """How a photo's channels map to the network's RGB image and back.

    Attributes:
      n_color: 1 for grayscale, 3 for RGB.
      alpha: ``(H, W)`` float32 alpha channel carried through unchanged, or None.
      linear: whether `to_network_rgb` decoded sRGB to linear light.
    """
    n_color: int
    alpha: np.ndarray | None
    linear: bool


def to_network_rgb(image, *, linear: bool = False):
    """Maps a photo to the network's ``(H, W, 3)`` RGB layout.

    Args:
      image: ``(H, W)``, ``(H, W, 1)`` gray, ``(H, W, 2)`` gray + alpha, ``(H, W, 3)`` RGB or
        ``(H, W, 4)`` RGBA; float in [0, 1].
      linear: decode the colour channels from sRGB to linear light.

    Returns:
      ``(rgb, layout)``: ``rgb`` is ``(H, W, 3)`` float32 numpy, ``layout`` a
      `ChannelLayout` that `from_network_rgb` uses to restore the photo's layout.

    Raises:
      ValueError: for another rank or channel count.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(
            f"expected an image of shape (H, W) or (H, W, C) with C in 1..4 (gray, gray+alpha, "
            f"RGB, RGBA), got shape {image.shape}")
    n_channels = image.shape[-1]
    has_alpha = n_channels in (2, 4)
    alpha = image[..., -1].copy() if has_alpha else None
    color = image[..., :-1] if has_alpha else image
    if linear:
        color = np.asarray(srgb_to_linear(color), dtype=np.float32)
    if color.shape[-1] == 1:
        color = np.repeat(color, 3, axis=-1)
    layout = ChannelLayout(n_color=1 if n_channels in (1, 2) else 3, alpha=alpha, linear=linear)
    return np.ascontiguousarray(color, dtype=np.float32), layout


def from_network_rgb(rgb, layout: ChannelLayout) -> np.ndarray:
    """Maps the network's ``(H, W, 3)`` output back to the photo's layout.

    Args:
      rgb: ``(H, W, 3)`` float in [0, 1] (values outside are clipped).
      layout: the `ChannelLayout` returned by `to_network_rgb` for the input photo.

    Returns:
      ``(H, W, C)`` float32 numpy with the input's channel count: colour channels
      (re-encoded to sRGB when the layout is linear; averaged to one for gray) followed by
      the untouched alpha channel when there was one.

    Raises:
      ValueError: when ``rgb`` is not ``(H, W, 3)`` or its size differs from the alpha's.
    """
    rgb = np.asarray(rgb, dtype=np.float32)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected the network output (H, W, 3), got shape {rgb.shape}")
    if layout.alpha is not None and layout.alpha.shape != rgb.shape[:2]:
        raise ValueError(
            f"the network output is {rgb.shape[:2]} but the alpha channel is "
            f"{layout.alpha.shape}; run the network at the input's size")
    color = np.clip(rgb, 0.0, 1.0)
    if layout.linear:
        color = np.asarray(linear_to_srgb(color), dtype=np.float32)
    if layout.n_color == 1:
        color = color.mean(axis=-1, keepdims=True)
    if layout.alpha is not None:
        color = np.concatenate([color, layout.alpha[..., None]], axis=-1)
    return np.ascontiguousarray(color, dtype=np.float32)
