"""Tests for jaxdeblur.color: sRGB transfer functions and channel layouts."""

import jax
import numpy as np
import pytest

from jaxdeblur import color


def test_srgb_round_trip_jit():
    values = np.linspace(0.0, 1.0, 1001, dtype=np.float32)
    linear = jax.jit(color.srgb_to_linear)(values)
    back = jax.jit(color.linear_to_srgb)(linear)
    np.testing.assert_allclose(np.asarray(back), values, atol=2e-6)


def test_srgb_known_values():
    # Mid-gray 0.5 sRGB is 0.2140 linear; the endpoints are fixed; the curve is monotone.
    np.testing.assert_allclose(float(color.srgb_to_linear(0.5)), 0.21404, atol=1e-5)
    np.testing.assert_allclose(float(color.srgb_to_linear(0.0)), 0.0, atol=0)
    np.testing.assert_allclose(float(color.srgb_to_linear(1.0)), 1.0, atol=1e-6)
    np.testing.assert_allclose(float(color.srgb_to_linear(0.04)), 0.04 / 12.92, atol=1e-7)
    linear = np.asarray(color.srgb_to_linear(np.linspace(0, 1, 257)))
    assert np.all(np.diff(linear) > 0)


def test_linear_to_srgb_gradient_is_finite_at_zero():
    grad = jax.grad(lambda x: color.linear_to_srgb(x).sum())(np.zeros(3, np.float32))
    assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (5, 7, 2), (5, 7, 3), (5, 7, 4)])
def test_layout_round_trip(shape):
    # A gray image is replicated, so the mean of the three replicas is exactly the input.
    rng = np.random.default_rng(0)
    image = rng.uniform(size=shape).astype(np.float32)
    rgb, layout = color.to_network_rgb(image)
    assert rgb.shape == (5, 7, 3) and rgb.dtype == np.float32
    back = color.from_network_rgb(rgb, layout)
    expected = image[..., None] if image.ndim == 2 else image
    assert back.shape == expected.shape
    np.testing.assert_allclose(back, expected, atol=1e-6)


def test_alpha_is_carried_unchanged_and_gray_is_averaged():
    rng = np.random.default_rng(1)
    image = rng.uniform(size=(4, 6, 2)).astype(np.float32)
    rgb, layout = color.to_network_rgb(image, linear=True)
    np.testing.assert_array_equal(layout.alpha, image[..., 1])
    restored = np.stack([rgb[..., 0] * 0.9, rgb[..., 1], rgb[..., 2] * 1.1], axis=-1)
    out = color.from_network_rgb(np.clip(restored, 0, 1), layout)
    np.testing.assert_array_equal(out[..., 1], image[..., 1])
    assert out.shape == (4, 6, 2)


def test_linear_layout_round_trip():
    rng = np.random.default_rng(2)
    image = rng.uniform(size=(3, 3, 4)).astype(np.float32)
    rgb, layout = color.to_network_rgb(image, linear=True)
    assert np.all(rgb <= image[..., :3] + 1e-6)  # decoding darkens mid-tones
    np.testing.assert_allclose(color.from_network_rgb(rgb, layout), image, atol=2e-6)


@pytest.mark.parametrize("shape", [(4,), (4, 4, 5), (2, 4, 4, 3)])
def test_bad_shapes_raise(shape):
    with pytest.raises(ValueError, match="shape"):
        color.to_network_rgb(np.zeros(shape, np.float32))
    with pytest.raises(ValueError, match="shape"):
        color.from_network_rgb(np.zeros(shape, np.float32),
                               color.ChannelLayout(n_color=3, alpha=None, linear=False))
