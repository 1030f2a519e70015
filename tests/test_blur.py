"""Tests for jaxdeblur.blur: parity with the official operators, properties, adjoints, grads."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal

from conftest import load_fixture
from jaxdeblur import blur

PADDED_BOUNDARIES = ("zeros", "reflect", "replicate", "circular")
NUMPY_PAD = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def _rand(seed, shape, dtype=np.float32):
    return np.random.default_rng(seed).random(shape).astype(dtype)


def _nchw_to_hwc(array):
    return np.transpose(array, (0, 2, 3, 1))


def _reference_correlation(image, kernel, boundary):
    """float64 numpy: pad by the boundary rule, then valid correlation channel by channel."""
    kh, kw = kernel.shape
    image = np.asarray(image, np.float64)
    if boundary != "valid":
        ph, pw = (kh - 1) // 2, (kw - 1) // 2
        image = np.pad(image, ((ph, ph), (pw, pw), (0, 0)), mode=NUMPY_PAD[boundary])
    return np.stack([scipy.signal.correlate2d(image[..., c], np.asarray(kernel, np.float64),
                                              mode="valid") for c in range(image.shape[-1])],
                    axis=-1)


def _reference_per_pixel(image, kernel_field, boundary="replicate"):
    """Slow jnp reference: the k² shifted copies, summed (differentiable by plain autodiff)."""
    h, w, kh, kw = kernel_field.shape
    padded = jnp.pad(image, (((kh - 1) // 2,) * 2, ((kw - 1) // 2,) * 2, (0, 0)),
                     mode=NUMPY_PAD[boundary])
    return sum(padded[i:i + h, j:j + w] * kernel_field[:, :, i, j, None]
               for i in range(kh) for j in range(kw))


def _dot(a, b):
    return float(np.vdot(np.asarray(a, np.float64), np.asarray(b, np.float64)))


# ---------------------------------------------------------------------------------------
# Parity with the official operators.
# ---------------------------------------------------------------------------------------


def test_per_pixel_blur_matches_official_batch1():
    data = load_fixture("sv_blur.npz")
    image = _nchw_to_hwc(data["in/x"])[0]
    kernel_field = data["in/kernel"][0].reshape(24, 32, 19, 19)
    out = jax.jit(blur.per_pixel_blur)(image, kernel_field)
    np.testing.assert_allclose(out, _nchw_to_hwc(data["out/y_f64"])[0], atol=1e-6, rtol=0)


def test_per_pixel_blur_vmapped_is_batch_correct():
    data = load_fixture("sv_blur.npz")
    images = _nchw_to_hwc(data["in/batch2/x"])
    fields = data["in/batch2/kernel"].reshape(2, 24, 32, 19, 19)
    out = jax.jit(jax.vmap(blur.per_pixel_blur))(images, fields)
    np.testing.assert_allclose(out, _nchw_to_hwc(data["out/batch2/y_f64"]), atol=1e-6, rtol=0)
    # The official B > 1 output mixes kernels across images; we must not reproduce it.
    assert np.abs(out - _nchw_to_hwc(data["out/official_batch2_buggy"])).max() > 1e-2


@pytest.mark.parametrize("case", ["a", "b", "gray"])
def test_eff_geometry_matches_official(case):
    data = load_fixture("eff.npz")
    meta = {k[len(f"meta/{case}/"):]: v for k, v in data.items()
            if k.startswith(f"meta/{case}/") and not k.endswith("constructor")}
    geometry = blur.eff_windows(tuple(meta["img_size"]), tuple(meta["grid_size_arg"]),
                                tuple(meta["blur_size"]))
    for key, value in meta.items():
        field = "image_size" if key == "img_size" else key
        assert tuple(getattr(geometry, field)) == tuple(value.tolist()), key
    np.testing.assert_allclose(geometry.window, data[f"out/{case}/W"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(geometry.window_sum, data[f"out/{case}/Wsum_f64"], atol=1e-6,
                               rtol=0)
    np.testing.assert_allclose(geometry.window_sum, data[f"out/{case}/Wsum"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["direct", "fft"])
@pytest.mark.parametrize("case", ["a", "b", "gray"])
def test_filter_flow_blur_matches_official(case, method):
    data = load_fixture("eff.npz")
    geometry = blur.eff_windows(tuple(data[f"meta/{case}/img_size"]),
                                tuple(data[f"meta/{case}/grid_size_arg"]),
                                tuple(data[f"meta/{case}/blur_size"]))
    image = _nchw_to_hwc(data[f"in/{case}/x"])[0]
    run = jax.jit(functools.partial(blur.filter_flow_blur, geometry=geometry, method=method))
    out = run(image, data[f"in/{case}/kernels"][0])
    np.testing.assert_allclose(out, _nchw_to_hwc(data[f"out/{case}/y_f64"])[0], atol=2e-6,
                               rtol=0)
    if f"in/{case}/uniform_kernel" in data:
        out = run(image, data[f"in/{case}/uniform_kernel"][0])
        np.testing.assert_allclose(out, _nchw_to_hwc(data[f"out/{case}/uniform_y_f64"])[0],
                                   atol=2e-6, rtol=0)


# ---------------------------------------------------------------------------------------
# Uniform blur.
# ---------------------------------------------------------------------------------------


def test_conv_is_correlation_and_flip_gives_convolution():
    image = jnp.zeros((9, 9, 1)).at[4, 4, 0].set(1.0)
    kernel = jnp.arange(15.0).reshape(3, 5)
    for method in ("direct", "fft"):
        corr = blur.conv(image, kernel, method=method)
        # Correlation: output at p reads x[p + (i-1, j-2)], so the impulse lands flipped.
        np.testing.assert_allclose(corr[3:6, 2:7, 0], blur.flip_kernel(kernel), atol=1e-5)
        conv = blur.conv(image, blur.flip_kernel(kernel), method=method)
        np.testing.assert_allclose(conv[3:6, 2:7, 0], kernel, atol=1e-5)
        assert float(jnp.abs(corr).sum() - jnp.abs(corr[3:6, 2:7]).sum()) < 1e-4


@pytest.mark.parametrize("method", ["direct", "fft", "auto"])
@pytest.mark.parametrize("boundary", blur.BOUNDARIES)
def test_conv_matches_numpy_reference(boundary, method):
    image = _rand(0, (13, 10, 2))
    kernel = _rand(1, (5, 3))
    out = jax.jit(functools.partial(blur.conv, boundary=boundary, method=method))(image, kernel)
    np.testing.assert_allclose(out, _reference_correlation(image, kernel, boundary), atol=2e-6)


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(h=st.integers(3, 12), w=st.integers(3, 12), c=st.integers(1, 3),
                  kh=st.sampled_from([1, 3, 5]), kw=st.sampled_from([1, 3, 5]),
                  boundary=st.sampled_from(blur.BOUNDARIES))
def test_conv_direct_and_fft_agree_on_random_shapes(h, w, c, kh, kw, boundary):
    hypothesis.assume(kh <= h and kw <= w)
    image = _rand(h * 100 + w, (h, w, c))
    kernel = _rand(kh * 10 + kw, (kh, kw))
    direct = blur.conv(image, kernel, boundary=boundary, method="direct")
    fft = blur.conv(image, kernel, boundary=boundary, method="fft")
    reference = _reference_correlation(image, kernel, boundary)
    # float32 sums of k² products: the error scales with the values compared, so the
    # tolerance does too (hypothesis once drew values near 8.5 that differed by 3.8e-6).
    atol = 2e-6 * max(1.0, float(np.max(np.abs(reference))))
    np.testing.assert_allclose(direct, fft, rtol=1e-5, atol=atol)
    np.testing.assert_allclose(direct, reference, rtol=1e-5, atol=atol)


def test_next_fast_len():
    assert [blur.next_fast_len(n) for n in (1, 11, 13, 17, 97, 121, 274, 1298)] == [
        1, 12, 14, 18, 98, 125, 280, 1323]
    for n in range(1, 300):
        m = blur.next_fast_len(n)
        assert m >= n
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        assert m == 1


def test_auto_rule():
    assert blur._prefer_fft((3, 3), "cpu") and not blur._prefer_fft((1, 1), "cpu")
    assert not blur._prefer_fft((13, 13), "gpu") and blur._prefer_fft((15, 13), "gpu")


# ---------------------------------------------------------------------------------------
# Per-pixel blur.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("boundary", PADDED_BOUNDARIES)
def test_constant_kernel_field_equals_conv(boundary):
    image = _rand(2, (11, 9, 3))
    kernel = _rand(3, (5, 3))
    kernel /= kernel.sum()
    field = np.broadcast_to(kernel, (11, 9, 5, 3))
    np.testing.assert_allclose(blur.per_pixel_blur(image, field, boundary=boundary),
                               blur.conv(image, kernel, boundary=boundary), atol=2e-6)


@pytest.mark.parametrize("boundary", PADDED_BOUNDARIES)
def test_per_pixel_blur_matches_shifted_copies_reference(boundary):
    image = _rand(4, (7, 8, 2))
    field = _rand(5, (7, 8, 3, 5))
    np.testing.assert_allclose(blur.per_pixel_blur(image, field, boundary=boundary),
                               _reference_per_pixel(image, field, boundary), atol=2e-6)


def test_per_pixel_blur_forward_memory_is_bounded():
    """256²×3, k=19: the compiled forward's temporaries stay far below the 95 MB field."""
    image = jax.ShapeDtypeStruct((256, 256, 3), jnp.float32)
    field = jax.ShapeDtypeStruct((256, 256, 19, 19), jnp.float32)
    forward = functools.partial(blur.per_pixel_blur, boundary="replicate")
    temp = jax.jit(forward).lower(image, field).compile().memory_analysis().temp_size_in_bytes
    assert temp < 16e6
    grads = jax.grad(lambda x, k: jnp.sum(forward(x, k) ** 2), argnums=(0, 1))
    temp = jax.jit(grads).lower(image, field).compile().memory_analysis().temp_size_in_bytes
    assert temp < 32e6


# ---------------------------------------------------------------------------------------
# Filter flow.
# ---------------------------------------------------------------------------------------


def _window_sum_on_image(geometry):
    top, _, left, _ = geometry.pad
    h, w = geometry.image_size
    return geometry.window_sum[top:top + h, left:left + w, None]


@pytest.mark.parametrize("method", ["direct", "fft"])
def test_filter_flow_repeated_kernel_is_uniform_blur(method):
    geometry = blur.eff_windows((30, 21), (3, 2), 5)
    image = _rand(6, (30, 21, 2))
    kernel = _rand(7, (5, 5))
    kernel /= kernel.sum()
    wsum = _window_sum_on_image(geometry)
    repeated = np.broadcast_to(kernel, (geometry.num_patches, 5, 5))
    for kernels in (repeated, kernel[None]):
        first = blur.filter_flow_blur(image, kernels, geometry, method=method)
        np.testing.assert_allclose(first, blur.conv(image * wsum, kernel), atol=2e-6)
        after = blur.filter_flow_blur(image, kernels, geometry, order="mask_after",
                                      method=method)
        np.testing.assert_allclose(after, blur.conv(image, kernel) * wsum, atol=2e-6)
    # The windows nearly sum to one over the image.
    assert 0.9 < wsum.min() <= wsum.max() < 1.0 + 1e-6


def test_filter_flow_blur_matches_explicit_sum_over_windows():
    geometry = blur.eff_windows((20, 26), (2, 3), 3)
    image = _rand(8, (20, 26, 1))
    kernels = _rand(9, (6, 3, 3)) / 4.5
    top, _, left, _ = geometry.pad
    first = np.zeros((20, 26, 1))
    after = np.zeros((20, 26, 1))
    g = 0
    for t, b in zip(geometry.t_patch, geometry.b_patch):
        for lft, r in zip(geometry.l_patch, geometry.r_patch):
            placed = np.zeros(geometry.padded_size)
            placed[t:b, lft:r] = geometry.window
            window = placed[top:top + 20, left:left + 26, None]
            first += _reference_correlation(image * window, kernels[g], "zeros")
            after += window * _reference_correlation(image, kernels[g], "zeros")
            g += 1
    for order, expected in (("mask_first", first), ("mask_after", after)):
        out = blur.filter_flow_blur(image, kernels, geometry, order=order)
        np.testing.assert_allclose(out, expected, atol=2e-6)


# ---------------------------------------------------------------------------------------
# Adjoints: <A x, y> = <x, A^T y>.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["direct", "fft"])
@pytest.mark.parametrize("boundary", blur.BOUNDARIES)
def test_conv_adjoint_dot_product(boundary, method):
    x = _rand(10, (9, 12, 2))
    kernel = _rand(11, (3, 5))
    ax = blur.conv(x, kernel, boundary=boundary, method=method)
    y = _rand(12, ax.shape)
    aty = blur.conv_adjoint(y, kernel, boundary=boundary, method=method)
    assert aty.shape == x.shape
    np.testing.assert_allclose(_dot(ax, y), _dot(x, aty), rtol=1e-5)


def test_conv_adjoint_zeros_is_flipped_correlation():
    y = _rand(13, (10, 10, 1))
    kernel = _rand(14, (5, 3))
    np.testing.assert_allclose(blur.conv_adjoint(y, kernel),
                               blur.conv(y, blur.flip_kernel(kernel)), atol=2e-6)


@pytest.mark.parametrize("boundary", PADDED_BOUNDARIES)
def test_per_pixel_blur_adjoint_dot_product(boundary):
    x = _rand(15, (8, 9, 3))
    field = _rand(16, (8, 9, 5, 3))
    y = _rand(17, (8, 9, 3))
    ax = blur.per_pixel_blur(x, field, boundary=boundary)
    aty = blur.per_pixel_blur_adjoint(y, field, boundary=boundary)
    np.testing.assert_allclose(_dot(ax, y), _dot(x, aty), rtol=1e-5)


@pytest.mark.parametrize("order", blur.ORDERS)
@pytest.mark.parametrize("method", ["direct", "fft"])
def test_filter_flow_blur_adjoint_dot_product(order, method):
    geometry = blur.eff_windows((24, 17), (2, 3), 5)
    assert geometry.grid_size == (3, 2)
    x = _rand(18, (24, 17, 2))
    kernels = _rand(19, (6, 5, 3))
    y = _rand(20, (24, 17, 2))
    ax = blur.filter_flow_blur(x, kernels, geometry, order=order, method=method)
    aty = blur.filter_flow_blur_adjoint(y, kernels, geometry, order=order, method=method)
    np.testing.assert_allclose(_dot(ax, y), _dot(x, aty), rtol=1e-5)


def test_filter_flow_mask_first_adjoint_is_mask_after_with_flipped_kernels():
    geometry = blur.eff_windows((16, 20), (2, 2), 3)
    y = _rand(21, (16, 20, 1))
    kernels = _rand(22, (4, 3, 3))
    np.testing.assert_allclose(
        blur.filter_flow_blur_adjoint(y, kernels, geometry),
        blur.filter_flow_blur(y, blur.flip_kernel(kernels), geometry, order="mask_after"),
        atol=2e-6)


# ---------------------------------------------------------------------------------------
# Gradients.
# ---------------------------------------------------------------------------------------


def _central_difference(loss, args, argnum, direction, eps):
    plus = list(args)
    minus = list(args)
    plus[argnum] = args[argnum] + eps * direction
    minus[argnum] = args[argnum] - eps * direction
    return (loss(*plus) - loss(*minus)) / (2 * eps)


def _check_grads_float64(loss, args, seed):
    """Directional derivatives of both arguments against float64 central differences."""
    with jax.enable_x64(True):
        args = [jnp.asarray(a, jnp.float64) for a in args]
        grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)
        loss = jax.jit(loss)
        for argnum, grad in enumerate(grads):
            assert grad.dtype == jnp.float64
            direction = jnp.asarray(np.random.default_rng(seed + argnum).normal(
                size=args[argnum].shape))
            expected = _central_difference(loss, args, argnum, direction, 1e-4)
            np.testing.assert_allclose(float(jnp.vdot(grad, direction)), float(expected),
                                       rtol=1e-6)


@pytest.mark.parametrize("boundary", ["replicate", "reflect"])
def test_per_pixel_blur_gradients_match_autodiff_of_reference(boundary):
    x = _rand(23, (6, 7, 2))
    field = _rand(24, (6, 7, 3, 5))
    target = _rand(25, (6, 7, 2))
    loss = lambda op: (lambda x, k: jnp.sum(jnp.sin(op(x, k) - target)))
    ours = jax.grad(loss(functools.partial(blur.per_pixel_blur, boundary=boundary)), (0, 1))
    ref = jax.grad(loss(functools.partial(_reference_per_pixel, boundary=boundary)), (0, 1))
    for a, b in zip(ours(x, field), ref(x, field)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    _check_grads_float64(loss(functools.partial(blur.per_pixel_blur, boundary=boundary)),
                         (x, field), seed=0)


def test_per_pixel_blur_adjoint_gradients():
    y = _rand(26, (6, 5, 2))
    field = _rand(27, (6, 5, 3, 3))
    target = _rand(28, (6, 5, 2))
    loss = lambda y, k: jnp.sum(jnp.sin(blur.per_pixel_blur_adjoint(y, k) - target))
    reference = lambda y, k: jnp.sum(jnp.sin(jax.linear_transpose(
        lambda x: _reference_per_pixel(x, k), y)(y)[0] - target))
    for a, b in zip(jax.grad(loss, (0, 1))(y, field), jax.grad(reference, (0, 1))(y, field)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    _check_grads_float64(loss, (y, field), seed=1)


@pytest.mark.parametrize("order", blur.ORDERS)
def test_filter_flow_blur_gradients_match_finite_differences(order):
    geometry = blur.eff_windows((14, 18), (2, 3), 3)
    x = _rand(29, (14, 18, 2))
    kernels = _rand(30, (6, 3, 3))
    target = _rand(31, (14, 18, 2))
    loss = lambda x, k: jnp.sum(jnp.sin(
        blur.filter_flow_blur(x, k, geometry, order=order, method="direct") - target))
    _check_grads_float64(loss, (x, kernels), seed=2)
    fft_loss = lambda x, k: jnp.sum(jnp.sin(
        blur.filter_flow_blur(x, k, geometry, order=order, method="fft") - target))
    for a, b in zip(jax.grad(loss, (0, 1))(x, kernels), jax.grad(fft_loss, (0, 1))(x, kernels)):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("method", ["direct", "fft"])
def test_conv_gradients_match_finite_differences(method):
    x = _rand(32, (9, 8, 2))
    kernel = _rand(33, (3, 5))
    loss = lambda x, k: jnp.sum(jnp.sin(blur.conv(x, k, boundary="reflect", method=method)))
    _check_grads_float64(loss, (x, kernel), seed=3)


# ---------------------------------------------------------------------------------------
# jit / vmap.
# ---------------------------------------------------------------------------------------


def test_all_operators_vmap_and_jit_like_a_loop():
    images = _rand(34, (3, 12, 10, 2))
    kernels = _rand(35, (3, 3, 3))
    fields = _rand(36, (3, 12, 10, 3, 3))
    geometry = blur.eff_windows((12, 10), (2, 2), 3)
    cells = _rand(37, (3, 4, 3, 3))
    ops = {
        "conv": (lambda x, k: blur.conv(x, k, boundary="circular"), kernels),
        "conv_adjoint": (lambda x, k: blur.conv_adjoint(x, k, boundary="circular"), kernels),
        "per_pixel_blur": (blur.per_pixel_blur, fields),
        "per_pixel_blur_adjoint": (blur.per_pixel_blur_adjoint, fields),
        "filter_flow_blur": (lambda x, k: blur.filter_flow_blur(x, k, geometry), cells),
        "filter_flow_blur_adjoint": (
            lambda x, k: blur.filter_flow_blur_adjoint(x, k, geometry), cells),
    }
    for name, (op, params) in ops.items():
        batched = jax.jit(jax.vmap(op))(images, params)
        looped = np.stack([op(images[b], params[b]) for b in range(3)])
        np.testing.assert_allclose(batched, looped, atol=1e-6, err_msg=name)
    # The geometry is static: it may also go through vmap with in_axes=None.
    batched = jax.vmap(blur.filter_flow_blur, in_axes=(0, 0, None))(images, cells, geometry)
    np.testing.assert_allclose(batched, jax.vmap(ops["filter_flow_blur"][0])(images, cells),
                               atol=1e-6)


# ---------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------

_IMAGE = np.zeros((8, 8, 3), np.float32)
_KERNEL = np.ones((3, 3), np.float32) / 9
_GEOMETRY = blur.eff_windows((8, 8), (2, 2), 3)


@pytest.mark.parametrize("call, match", [
    (lambda: blur.conv(_IMAGE[0], _KERNEL), r"shape \(H, W, C\)"),
    (lambda: blur.conv(_IMAGE[None], _KERNEL), "jax.vmap"),
    (lambda: blur.conv(_IMAGE, _KERNEL[None]), r"shape \(kh, kw\)"),
    (lambda: blur.conv(_IMAGE, np.ones((4, 3), np.float32)), "odd"),
    (lambda: blur.conv(_IMAGE, np.ones((9, 3), np.float32)), "larger than the image"),
    (lambda: blur.conv(_IMAGE.astype(np.int32), _KERNEL), "floating dtype"),
    (lambda: blur.conv(_IMAGE, _KERNEL.astype(np.int32)), "floating dtype"),
    (lambda: blur.conv(np.full_like(_IMAGE, np.nan), _KERNEL), "192 NaN"),
    (lambda: blur.conv(_IMAGE, _KERNEL, boundary="mirror"), "boundary must be one of"),
    (lambda: blur.conv(_IMAGE, _KERNEL, method="winograd"), "method must be one of"),
    (lambda: blur.per_pixel_blur(_IMAGE, np.ones((8, 7, 3, 3), np.float32)),
     "does not match image"),
    (lambda: blur.per_pixel_blur(_IMAGE, np.ones((64, 3, 3), np.float32)), r"\(H, W, kh, kw\)"),
    (lambda: blur.per_pixel_blur(_IMAGE, np.ones((8, 8, 2, 3), np.float32)), "odd"),
    (lambda: blur.per_pixel_blur(_IMAGE, np.full((8, 8, 3, 3), np.inf, np.float32)),
     "576 infinite"),
    (lambda: blur.per_pixel_blur(_IMAGE, np.ones((8, 8, 3, 3), np.float32), boundary="valid"),
     "boundary must be one of"),
    (lambda: blur.filter_flow_blur(_IMAGE, np.ones((3, 3, 3), np.float32), _GEOMETRY),
     r"G = 4"),
    (lambda: blur.filter_flow_blur(_IMAGE, np.ones((4, 5, 5), np.float32), _GEOMETRY),
     "blur_size"),
    (lambda: blur.filter_flow_blur(_IMAGE[:7], np.ones((4, 3, 3), np.float32), _GEOMETRY),
     "image_size"),
    (lambda: blur.filter_flow_blur(_IMAGE, np.ones((4, 3, 3), np.float32), _GEOMETRY,
                                   order="mask_last"), "order must be one of"),
    (lambda: blur.eff_windows((8, 8), (9, 9), 3), "too fine"),
    (lambda: blur.eff_windows((8, 8), (2, 0), 3), "grid"),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_nan_check_is_skipped_under_jit_and_available_as_helper():
    image = np.full((8, 8, 3), np.nan, np.float32)
    out = jax.jit(blur.conv)(image, _KERNEL)
    assert np.isnan(out).all()
    with pytest.raises(ValueError, match="192 NaN and 0 infinite"):
        blur.check_finite("image", image)
    blur.check_finite("image", _IMAGE)


def test_batched_gradients_under_vmap_match_a_loop():
    images = _rand(38, (2, 7, 6, 3))
    fields = _rand(39, (2, 7, 6, 3, 3))
    grad = jax.grad(lambda x, k: jnp.sum(blur.per_pixel_blur(x, k) ** 2), argnums=(0, 1))
    batched = jax.jit(jax.vmap(grad))(images, fields)
    for b in range(2):
        for got, want in zip(batched, grad(images[b], fields[b])):
            np.testing.assert_allclose(got[b], want, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("grid", [(1, 1), (1, 3), (3, 1)])
def test_filter_flow_with_one_cell_along_an_axis_is_a_plain_blur(grid):
    """One cell along an axis: the window is flat there, so a constant image stays constant.

    (The official makeEFF uses a barthann window there too, which does not sum to 1: a 1x1
    grid would darken the image to 0.34 at its corners.)
    """
    geometry = blur.eff_windows((40, 36), grid, 5)
    ones = jnp.ones((40, 36, 2))
    kernels = jnp.full((geometry.num_patches, 5, 5), 1.0 / 25)
    out = np.asarray(blur.filter_flow_blur(ones, kernels, geometry))
    np.testing.assert_allclose(out[2:-2, 2:-2], 1.0, atol=1e-5)
    image = jax.random.uniform(jax.random.key(0), (40, 36, 2))
    kernel = jax.random.uniform(jax.random.key(1), (5, 5))
    kernel = kernel / kernel.sum()
    same = blur.filter_flow_blur(image, jnp.broadcast_to(kernel, kernels.shape), geometry)
    np.testing.assert_allclose(same, blur.conv(image, kernel, boundary="zeros"), atol=1e-5)
