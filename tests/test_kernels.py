"""Tests for jaxdeblur.kernels: motion kernels, kernel fields and synthetic blur."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from jaxdeblur import blur, kernels

SIZE = 19


def _centre_of_mass(kernel):
    kernel = np.asarray(kernel, np.float64)
    grid = np.arange(kernel.shape[-1])
    rows = (kernel.sum(-1) * grid).sum(-1) / kernel.sum((-2, -1))
    cols = (kernel.sum(-2) * grid).sum(-1) / kernel.sum((-2, -1))
    return np.stack([rows, cols], axis=-1)


def _spread(kernel):
    """Root-mean-square distance of the kernel mass from its centre of mass, in pixels."""
    kernel = np.asarray(kernel, np.float64)
    grid = np.arange(kernel.shape[-1])
    com = _centre_of_mass(kernel)
    d2 = ((grid[:, None] - com[..., 0, None, None]) ** 2
          + (grid[None, :] - com[..., 1, None, None]) ** 2)
    return np.sqrt((kernel * d2).sum((-2, -1)))


@functools.partial(jax.jit, static_argnames=("size", "n_steps"))
def _draw(keys, exposure, max_length, *, size=SIZE, n_steps=400):
    # exposure and max_length are traced, so the tests share one compilation per size.
    return jax.vmap(lambda k: kernels.motion_kernel(
        k, size, n_steps=n_steps, exposure=exposure, max_length=max_length))(keys)


def _batch(size=SIZE, seed=0, exposure=1.0, max_length=60.0):
    # A fixed batch size keeps to one compilation.
    keys = jax.random.split(jax.random.key(seed), 48)
    return np.asarray(_draw(keys, exposure, max_length, size=size))


def test_motion_kernel_batch_is_a_centred_distribution():
    draw = jax.jit(jax.vmap(lambda k: kernels.motion_kernel(k, SIZE)))
    batch = np.asarray(draw(jax.random.split(jax.random.key(0), 64)))
    assert batch.shape == (64, SIZE, SIZE) and batch.dtype == np.float32
    assert batch.min() >= 0.0
    np.testing.assert_allclose(batch.sum((1, 2)), 1.0, atol=1e-5)
    # Centring is exact in continuous space, so far inside the 0.5 px requirement.
    np.testing.assert_allclose(_centre_of_mass(batch), (SIZE - 1) / 2, atol=1e-3)


def test_long_kernels_stay_inside_the_support():
    # A clipped trajectory would move the centre of mass; the scale choice prevents that.
    for size in (19, 31):
        batch = _batch(size=size, seed=3)
        np.testing.assert_allclose(_centre_of_mass(batch), (size - 1) / 2, atol=1e-3)
        assert _spread(batch).mean() > 0.5


def test_motion_kernel_is_deterministic_per_key_and_differs_across_keys():
    a = _batch(seed=7)
    np.testing.assert_array_equal(a, _batch(seed=7))
    assert np.abs(a[0] - a[1]).sum() > 1e-3
    assert np.abs(a - _batch(seed=8)).sum((1, 2)).min() > 1e-3


def test_length_statistics_follow_max_length():
    def exposed_length(max_length):
        points, weights = jax.vmap(lambda k: kernels.motion_path(
            k, SIZE, n_steps=400, max_length=max_length))(jax.random.split(jax.random.key(1), 48))
        steps = np.linalg.norm(np.diff(np.asarray(points, np.float64), axis=1), axis=-1)
        return (steps * np.asarray(weights)[:, 1:]).sum(-1)

    # Exposed length = exposure * max_length * size / canvas, exactly.
    np.testing.assert_allclose(np.unique(exposed_length(60.0).round(2)),
                               np.array([0.01, 0.1, 0.5, 1.0]) * 60.0 * SIZE / 64, rtol=0.02)
    short = _spread(_batch(seed=1, max_length=20.0)).mean()
    long = _spread(_batch(seed=1, max_length=60.0)).mean()
    # Not proportional: the centripetal pull acts on positions, which scale with the length.
    assert long > 1.3 * short > 0.3


def test_shake_trajectory_has_the_requested_length():
    path = jax.jit(functools.partial(kernels.shake_trajectory, n_steps=500,
                                     max_length=33.0))(jax.random.key(2))
    assert path.shape == (500, 2)
    np.testing.assert_array_equal(path[0], 0.0)
    length = np.linalg.norm(np.diff(np.asarray(path, np.float64), axis=0), axis=1).sum()
    np.testing.assert_allclose(length, 33.0, rtol=1e-4)


def test_short_exposure_gives_a_near_delta_kernel():
    assert _batch(seed=4, exposure=0.01).max((1, 2)).min() > 0.5


def test_tent_splat_methods_match_a_loop_reference():
    rng = np.random.default_rng(0)
    points = rng.uniform(0.0, 6.0, (40, 2)).astype(np.float32)
    points[0] = (6.0, 6.0)  # exactly on the last pixel
    weights = rng.uniform(0.0, 1.0, 40).astype(np.float32)
    reference = np.zeros((7, 7))
    for (y, x), w in zip(points.astype(np.float64), weights.astype(np.float64)):
        for i in range(7):
            for j in range(7):
                reference[i, j] += w * max(0.0, 1 - abs(y - i)) * max(0.0, 1 - abs(x - j))
    for method in ("scatter", "matmul"):
        splat = jax.jit(functools.partial(kernels.tent_splat, size=7, method=method))
        np.testing.assert_allclose(splat(points, weights), reference, atol=1e-5)


def test_motion_kernel_splat_methods_agree():
    draw = jax.jit(lambda k, method: kernels.motion_kernel(
        k, SIZE, n_steps=400, splat_method=method), static_argnums=1)
    key = jax.random.key(5)
    np.testing.assert_allclose(draw(key, "scatter"), draw(key, "matmul"), atol=1e-6)


@pytest.mark.parametrize("size", [18, 0, 19.0])
def test_motion_kernel_rejects_bad_sizes(size):
    with pytest.raises(ValueError, match="odd"):
        kernels.motion_kernel(jax.random.key(0), size)


def test_rotation_field_is_normalised_and_smooth():
    field = jax.jit(lambda k: kernels.kernel_field(k, (48, 64), 15))(jax.random.key(0))
    field = np.asarray(field)
    assert field.shape == (48, 64, 15, 15) and field.dtype == np.float32
    assert field.min() >= 0.0
    np.testing.assert_allclose(field.sum((2, 3)), 1.0, atol=1e-5)
    # Neighbouring pixels see nearly the same trajectory.
    assert np.abs(np.diff(field, axis=0)).sum((2, 3)).max() < 0.2
    assert np.abs(np.diff(field, axis=1)).sum((2, 3)).max() < 0.2
    # The support fit keeps every path inside the kernel.
    com = _centre_of_mass(field)
    assert np.all((com > 0.5) & (com < 13.5))


def test_pure_roll_fixes_the_centre_and_moves_the_corners():
    roll = jnp.zeros((64, 3)).at[:, 0].set(jnp.linspace(-0.03, 0.03, 64))
    field = np.asarray(jax.jit(functools.partial(
        kernels.rotation_kernel_field, image_shape=(129, 129), size=19))(roll))
    assert field[64, 64].max() > 0.99
    corner = field[0, 0]
    # The corner, 90.5 px from the centre, travels 0.06 * 90.5 = 5.4 px.
    assert corner.max() < 0.4
    assert (corner > 0.01 * corner.max()).sum() > 8
    assert _spread(corner) > 1.2 > 0.05 > _spread(field[64, 64])


def test_yaw_moves_the_centre_pixel_to_the_right():
    # Positive yaw turns the camera right: the scene seen by a pixel moves to +x, i.e. the
    # kernel mass sits in the centre row, right of the centre (cross-correlation).
    yaw = jnp.zeros((32, 3)).at[:, 2].set(jnp.linspace(0.0, 0.02, 32))
    field = np.asarray(kernels.rotation_kernel_field(yaw, (33, 33), 15))
    centre = field[16, 16]
    assert centre[7].sum() > 0.99
    assert centre[7, 7:].sum() > 0.99 and _centre_of_mass(centre)[1] > 7.0


def test_interpolated_field_reproduces_the_node_kernels():
    key = jax.random.key(9)
    motion = {"n_steps": 400, "exposure": 1.0}
    field = np.asarray(jax.jit(lambda k: kernels.kernel_field(
        k, (21, 31), SIZE, mode="interpolate", grid=(2, 3), motion_kwargs=motion))(key))
    nodes = jax.jit(jax.vmap(lambda k: kernels.motion_kernel(k, SIZE, **motion)))(
        jax.random.split(key, 6))
    nodes = np.asarray(nodes).reshape(2, 3, SIZE, SIZE)
    np.testing.assert_allclose(field[0, 0], nodes[0, 0], atol=1e-6)
    np.testing.assert_allclose(field[20, 15], nodes[1, 1], atol=1e-6)
    np.testing.assert_allclose(field[20, 30], nodes[1, 2], atol=1e-6)
    np.testing.assert_allclose(field[10, 15], 0.5 * (nodes[0, 1] + nodes[1, 1]), atol=1e-6)
    np.testing.assert_allclose(field.sum((2, 3)), 1.0, atol=1e-5)
    np.testing.assert_allclose(_centre_of_mass(field), (SIZE - 1) / 2, atol=1e-3)


def test_kernel_field_from_kernel_repeats_the_kernel():
    kernel = np.random.default_rng(0).uniform(size=(7, 7)).astype(np.float32)
    field = kernels.kernel_field_from_kernel(kernel, (5, 6, 3))
    assert field.shape == (5, 6, 7, 7)
    np.testing.assert_array_equal(field[4, 5], kernel)


def test_kernel_field_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        kernels.kernel_field(jax.random.key(0), (8, 8), 5, mode="spline")
    with pytest.raises(ValueError, match="image_shape"):
        kernels.kernel_field(jax.random.key(0), (8,), 5)
    with pytest.raises(ValueError, match="angles"):
        kernels.rotation_kernel_field(jnp.zeros((4, 2)), (8, 8), 5)


def test_synthesize_blur_adds_exactly_the_documented_noise():
    sharp = jax.random.uniform(jax.random.key(0), (24, 20, 3))
    field = jax.jit(lambda k: kernels.kernel_field(k, (24, 20), 7, n_samples=16))(
        jax.random.key(1))
    key = jax.random.key(2)
    blurry = jax.jit(functools.partial(kernels.synthesize_blur, noise_sigma=0.05,
                                       clip=False))(key, sharp, field)
    noise = 0.05 * jax.random.normal(key, sharp.shape)
    clean = jax.jit(blur.per_pixel_blur)(sharp, field)
    np.testing.assert_allclose(blurry - clean, noise, atol=1e-6)
    clipped = jax.jit(functools.partial(kernels.synthesize_blur, noise_sigma=0.05))(
        key, sharp, field)
    np.testing.assert_allclose(clipped, np.clip(blurry, 0.0, 1.0), atol=1e-6)


def test_synthesize_blur_with_a_delta_field_and_no_noise_is_the_identity():
    sharp = jax.random.uniform(jax.random.key(0), (9, 11, 1))
    delta = jnp.zeros((5, 5)).at[2, 2].set(1.0)
    field = kernels.kernel_field_from_kernel(delta, sharp.shape)
    out = jax.jit(functools.partial(kernels.synthesize_blur, noise_sigma=0.0))(
        jax.random.key(1), sharp, field)
    np.testing.assert_allclose(out, sharp, atol=1e-6)


def test_synthesize_blur_rejects_mismatched_fields():
    with pytest.raises(ValueError, match="kernel_field"):
        kernels.synthesize_blur(jax.random.key(0), jnp.zeros((8, 8, 3)),
                                jnp.zeros((8, 9, 5, 5)))


def test_line_kernel_is_a_centred_normalised_line():
    k = np.asarray(kernels.line_kernel(15, 12, 0.0))
    assert k.shape == (15, 15) and k.dtype == np.float32
    np.testing.assert_allclose(k.sum(), 1.0, rtol=1e-6)
    assert np.all(k[:7] == 0) and np.all(k[8:] == 0)  # horizontal: the centre row only
    np.testing.assert_allclose(k[7], k[7, ::-1], atol=1e-7)  # symmetric about the centre
    with pytest.raises(ValueError, match="length"):
        kernels.line_kernel(9, 9, 0.0)


# --- Generators calibrated to measured camera shake, and fitting measured kernels ----------

FAMILY_NAMES = kernels.FAMILIES + ("mixture",)


def _family_config(name):
    from jaxdeblur.configs import flow_prior
    return kernels.generator_config(name, flow_prior.generator_settings(name))


@functools.lru_cache(maxsize=None)
def _family_sampler(name):
    config = _family_config(name)
    return jax.jit(jax.vmap(lambda key: kernels.draw_kernel(config, SIZE, key=key)))


@functools.lru_cache(maxsize=None)
def _family_draws(name, seed=0):
    # 200 draws: one compilation per family, shared by the tests below.
    keys = jax.random.split(jax.random.key(seed), 200)
    return jax.tree.map(np.asarray, _family_sampler(name)(keys))


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_generated_kernels_are_normalised_centred_and_fitted(name):
    draws = _family_draws(name)
    batch = draws.kernel
    assert batch.shape == (200, SIZE, SIZE) and batch.dtype == np.float32
    assert batch.min() >= 0.0
    np.testing.assert_allclose(batch.sum((1, 2)), 1.0, atol=1e-5)
    np.testing.assert_allclose(_centre_of_mass(batch), (SIZE - 1) / 2, atol=1e-3)
    # The window fit (fit_size 17): the one-pixel border stays empty, and a path that was
    # shrunk reaches the fit's edge.
    assert batch[:, [0, -1], :].max() < 1e-6 and batch[:, :, [0, -1]].max() < 1e-6
    assert np.all((draws.fit_scale > 0) & (draws.fit_scale <= 1))
    shrunk = batch[draws.fit_scale < 0.999]
    assert len(shrunk) > 20
    edges = np.maximum(shrunk[:, [1, -2], :].max((1, 2)), shrunk[:, :, [1, -2]].max((1, 2)))
    assert edges.min() > 0
    # Trajectories that fill the window, not the compact scribbles of motion_kernel.
    assert np.median(_spread(batch)) > 3.0


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_generated_kernels_are_reproducible_per_key(name):
    first = _family_draws(name).kernel
    again = _family_sampler(name)(jax.random.split(jax.random.key(0), 200))
    np.testing.assert_array_equal(first, np.asarray(again.kernel))
    other = _family_draws(name, seed=1).kernel
    assert np.abs(first - other).sum((1, 2)).min() > 1e-3
    assert np.abs(first[0] - first[1]).sum() > 1e-3


def _truncated_log_normal_cdf(law):
    mu, s = np.log(law.median), law.log_sigma
    a, b = (np.log(law.minimum) - mu) / s, (np.log(law.maximum) - mu) / s
    return lambda length: scipy.stats.truncnorm.cdf(np.log(length), a, b, loc=mu, scale=s)


@pytest.mark.parametrize("name", kernels.FAMILIES)
def test_drawn_lengths_follow_the_configured_law(name):
    law = _family_config(name).length
    lengths = _family_draws(name).length
    assert scipy.stats.kstest(lengths, _truncated_log_normal_cdf(law)).pvalue > 0.01
    # A law with a biting truncation, straight from the sampler.
    narrow = kernels.LengthLaw(median=20.0, log_sigma=0.5, minimum=15.0, maximum=22.0)
    samples = np.asarray(jax.jit(jax.vmap(lambda k: kernels.sample_length(narrow, key=k)))(
        jax.random.split(jax.random.key(1), 2000)))
    assert samples.min() >= 15.0 and samples.max() <= 22.0
    assert scipy.stats.kstest(samples, _truncated_log_normal_cdf(narrow)).pvalue > 0.01


def test_boracchi_foi_exposure_follows_the_configured_law():
    config = _family_config("boracchi_foi")
    exposure = _family_draws("boracchi_foi").exposure
    uniform = scipy.stats.uniform(config.exposure_min, config.exposure_max - config.exposure_min)
    assert scipy.stats.kstest(exposure, uniform.cdf).pvalue > 0.01


def test_rasterised_length_is_the_drawn_length_times_the_fit():
    # An unexposed tail (weight 0) must not count; a straight path is measured exactly.
    points = jnp.stack([jnp.zeros(301), jnp.linspace(0.0, 3.0, 301)], axis=-1)
    weights = jnp.where(jnp.arange(301) <= 200, 1.0, 0.0)
    for length, fit in ((10.0, 1.0), (32.0, 16.0 / 32.0)):
        trajectory = kernels.Trajectory(points, weights, jnp.float32(length), jnp.float32(1))
        kernel, fit_scale = jax.jit(functools.partial(
            kernels.rasterise_trajectory, size=SIZE, fit_size=17))(trajectory)
        np.testing.assert_allclose(fit_scale, fit, rtol=1e-5)
        row = np.asarray(kernel)[9]
        np.testing.assert_allclose(row.sum(), 1.0, atol=1e-5)
        support = np.flatnonzero(row > 1e-6)
        np.testing.assert_allclose(support[-1] - support[0], length * fit, atol=2.0)


def test_mixture_draws_families_in_the_configured_proportions():
    config = _family_config("mixture")
    counts = np.bincount(_family_draws("mixture").family, minlength=3)
    expected = 200 * np.asarray(config.weights) / np.sum(config.weights)
    assert scipy.stats.chisquare(counts, expected).pvalue > 0.01


def test_kernel_sampler_serves_the_flow_prior_configs():
    from jaxdeblur.configs import flow_prior
    for generator, size in (("motion", 7), ("spline", SIZE)):
        config = flow_prior.get_config(generator)
        if generator == "motion":
            config.kernels.n_steps = 100  # a quicker compilation; the path is the same
        draw = kernels.kernel_sampler(config.generator, config.kernels, size)
        batch = jax.jit(jax.vmap(draw))(jax.random.split(jax.random.key(0), 4))
        assert batch.shape == (4, size, size)
        np.testing.assert_allclose(batch.sum((1, 2)), 1.0, atol=1e-5)
    assert flow_prior.get_config("mixture").kernels.weights == (0.4, 0.3, 0.3)
    with pytest.raises(ValueError, match="unknown kernel generator"):
        kernels.kernel_sampler("levin", {}, 19)
    with pytest.raises(ValueError, match="missing"):
        kernels.generator_config("spline", {"n_control": 4})


def test_fit_kernel_fits_a_long_line_into_the_window():
    line = np.zeros((41, 41))
    line[20] = 3.0
    fitted = kernels.fit_kernel(line, SIZE, fit_size=17, threshold=0.02)
    assert fitted.shape == (SIZE, SIZE) and fitted.dtype == np.float32
    np.testing.assert_allclose(fitted.sum(), 1.0, atol=1e-6)
    np.testing.assert_allclose(_centre_of_mass(fitted), 9.0, atol=1e-5)
    # 41 px -> 17 px by area: every output pixel holds 41/17 input pixels, so nothing is
    # lost at the ends and the energy is spread evenly.
    assert np.abs(np.delete(fitted, 9, axis=0)).max() < 1e-6
    np.testing.assert_allclose(fitted[9, 1:18], 1.0 / 17.0, atol=1e-6)
    assert fitted[9, [0, 18]].max() < 1e-6


def test_fit_kernel_centres_a_lopsided_kernel_without_clipping_its_tail():
    # A 60-px diagonal with most of its mass at one end: measured from the box centre it
    # would fit, measured from its centre of mass it must shrink further.
    kernel = np.zeros((60, 60))
    kernel[np.arange(60), np.arange(60)] = 1.0
    kernel[55:60, 55:60] += 4.0
    fitted = kernels.fit_kernel(kernel, SIZE, fit_size=17, threshold=0.0)
    np.testing.assert_allclose(fitted.sum(), 1.0, atol=1e-6)
    np.testing.assert_allclose(_centre_of_mass(fitted), 9.0, atol=1e-5)
    # The faint far end is inside the window (one pixel of sub-pixel spill at most) and
    # the bright end near the centre.
    assert fitted[:2, :2].sum() > 0.002
    assert np.unravel_index(np.argmax(fitted), fitted.shape) >= (9, 9)


def test_fit_kernel_keeps_a_small_centred_kernel_unchanged():
    small = np.random.default_rng(0).uniform(size=(7, 7))
    small = small + small[::-1, ::-1]  # centre of mass at the centre
    fitted = kernels.fit_kernel(small, SIZE, fit_size=17, threshold=0.0)
    np.testing.assert_allclose(fitted[6:13, 6:13], small / small.sum(), atol=1e-6)
    # Entries below the threshold are the measurement floor: dropped.
    floor = small.copy()
    floor[0, 0] = 1e-3 * small.max()
    small[0, 0] = 0.0
    np.testing.assert_array_equal(kernels.fit_kernel(floor, SIZE, fit_size=17, threshold=0.01),
                                  kernels.fit_kernel(small, SIZE, fit_size=17, threshold=0.0))


@pytest.mark.parametrize("bad, match", [
    (np.ones((3, 3, 3)), "2-D"), (np.ones(5), "2-D"), (np.zeros((5, 5)), "all zero"),
    (np.full((5, 5), np.nan), "NaN"), (-np.eye(5), "negative")])
def test_fit_kernel_rejects_bad_kernels(bad, match):
    with pytest.raises(ValueError, match=match):
        kernels.fit_kernel(bad, SIZE, fit_size=17, threshold=0.02)


def test_kernel_variants_are_the_eight_rotations_and_flips():
    kernel = kernels.fit_kernel(np.random.default_rng(1).uniform(size=(9, 5)), SIZE,
                                fit_size=17, threshold=0.0)
    variants = np.asarray(kernels.kernel_variants(kernel))
    assert variants.shape == (8, SIZE, SIZE)
    np.testing.assert_array_equal(variants[0], kernel)
    flat = variants.reshape(8, -1)
    assert np.abs(flat[:, None] - flat[None]).sum(-1)[np.triu_indices(8, 1)].min() > 1e-3
    np.testing.assert_allclose(_centre_of_mass(variants), 9.0, atol=1e-5)
    np.testing.assert_allclose(variants.sum((1, 2)), 1.0, atol=1e-6)
