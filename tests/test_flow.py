"""Tests for jaxdeblur.flow: parity with the official prior, bijector properties, bad input."""

import functools

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES_DIR, load_fixture

from jaxdeblur import configs, convert, flow, kernels
from jaxdeblur.train import flow_prior as flow_training

# Tolerances of shared/fixtures/README.md (float32 port vs the float64 official run).
ATOL_X, ATOL_LOGDET, ATOL_LOGPROB, ATOL_KERNEL = 5e-5, 5e-4, 2e-3, 5e-6


@pytest.fixture(scope="module")
def official():
    data = load_fixture("flow_motion.npz")
    state_dict = {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}
    variables = convert.flow_variables_from_state_dict(state_dict)
    module = flow.KernelFlow(alpha=convert.flow_alpha(state_dict))
    return module, variables, data


def _random_flow(kernel_size=5, n_blocks=3, seed=0, scale=0.3):
    """A small flow with non-trivial (non-identity) random parameters and statistics."""
    module = flow.KernelFlow(kernel_size=kernel_size, n_blocks=n_blocks, hidden_size=8)
    variables = module.init(jax.random.key(seed),
                            jnp.full((2, kernel_size, kernel_size), 0.04))
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [leaf + scale * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
    variables = jax.tree.unflatten(tree, leaves)
    # Variances must stay positive and away from 0 (a tiny variance amplifies rounding).
    for stats in variables["batch_stats"].values():
        stats["var"] = 0.5 + jnp.abs(stats["var"] - 1)
    return module, variables


def _apply(module, method, **kwargs):
    return jax.jit(functools.partial(module.apply, method=method, **kwargs))


# --- parity with the official KernelPrior -------------------------------------------------

def test_eval_parity_latent_to_data(official):
    module, variables, data = official
    z = jnp.asarray(data["in/z"])
    x, log_det = _apply(module, "latent_to_flow")(variables, z)
    np.testing.assert_allclose(x, data["out/eval/x_f64"], rtol=0, atol=ATOL_X)
    np.testing.assert_allclose(log_det, data["out/eval/logdet_inverse_f64"], rtol=0,
                               atol=ATOL_LOGDET)
    kernels = _apply(module, "latent_to_kernel")(variables, z)
    assert kernels.shape == (16, 19, 19)
    np.testing.assert_allclose(kernels, data["out/eval/kernel_f64"][:, 0], rtol=0,
                               atol=ATOL_KERNEL)


def test_eval_parity_data_to_latent(official):
    module, variables, data = official
    x = jnp.asarray(data["out/eval/x_f64"], jnp.float32)
    u, log_det = _apply(module, "flow_to_latent")(variables, x)
    np.testing.assert_allclose(u, data["out/eval/u_f64"], rtol=0, atol=ATOL_X)
    np.testing.assert_allclose(log_det, data["out/eval/logdet_forward_f64"], rtol=0,
                               atol=ATOL_LOGDET)
    log_prob = _apply(module, "flow_log_prob")(variables, x)
    np.testing.assert_allclose(log_prob, data["out/eval/log_prob_f64"], rtol=0,
                               atol=ATOL_LOGPROB)


def test_train_parity(official):
    module, variables, data = official
    x = jnp.asarray(data["in/train/x"])
    step = jax.jit(lambda v, x: module.apply(v, x, True, method="flow_to_latent",
                                             mutable=["batch_stats", "intermediates"]))
    (u, log_det), updated = step(variables, x)
    np.testing.assert_allclose(u, data["out/train/u_f64"], rtol=0, atol=ATOL_X)
    np.testing.assert_allclose(log_det, data["out/train/logdet_forward_f64"], rtol=0,
                               atol=ATOL_LOGDET)
    for i in range(5):
        name, inter = f"net.{2 * i + 1}", updated["intermediates"][f"batch_norm_{i}"]
        stats = updated["batch_stats"][f"batch_norm_{i}"]
        pairs = {"batch_mean": inter["batch_mean"][0], "batch_var": inter["batch_var"][0],
                 "running_mean": stats["mean"], "running_var": stats["var"]}
        for key, ours in pairs.items():
            np.testing.assert_allclose(ours, data[f"out/train/{name}.{key}_f64"], rtol=1e-5,
                                       atol=1e-5, err_msg=f"{name}.{key}")


def test_train_mode_without_mutable_leaves_stats_alone(official):
    module, variables, data = official
    x = jnp.asarray(data["in/train/x"])
    log_prob = jax.jit(lambda v, x: module.apply(v, x, True, method="flow_log_prob"))(
        variables, x)
    assert log_prob.shape == (64,) and bool(jnp.all(jnp.isfinite(log_prob)))


def test_official_prior_samples_are_kernels(official):
    module, variables, _ = official
    kernels = jax.jit(lambda v, key: module.apply(v, key, 64, method="sample"))(
        variables, jax.random.key(0))
    assert kernels.shape == (64, 19, 19) and kernels.dtype == jnp.float32
    assert float(kernels.min()) >= 0.0 and float(kernels.max()) <= 1.0
    # Not renormalised: the official prior's samples sum to 1.24 +- 0.64 (SPEC section 3).
    assert 0.5 < float(kernels.sum((1, 2)).mean()) < 2.5


# --- bijector properties --------------------------------------------------------------------

def test_round_trip_and_opposite_log_dets():
    module, variables = _random_flow()
    z = jax.random.normal(jax.random.key(3), (32, 25))
    x, ld_fwd = _apply(module, "latent_to_flow")(variables, z)
    u, ld_inv = _apply(module, "flow_to_latent")(variables, x)
    np.testing.assert_allclose(u, z, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ld_fwd, -ld_inv, rtol=0, atol=1e-5)
    assert float(jnp.std(ld_fwd)) > 1e-2  # the couplings are really non-trivial


def test_kernel_round_trip():
    module, variables = _random_flow()
    z = 0.5 * jax.random.normal(jax.random.key(4), (16, 25))
    kernels = _apply(module, "latent_to_kernel")(variables, z)
    assert kernels.shape == (16, 5, 5)
    z_back = _apply(module, "kernel_to_latent")(variables, kernels)
    np.testing.assert_allclose(z_back, z, rtol=0, atol=1e-3)


def _brute_log_det(fn, v):
    return jnp.linalg.slogdet(jax.jacfwd(fn)(v))[1]


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_chain_log_det_matches_jacobian(direction):
    module, variables = _random_flow(kernel_size=5, n_blocks=2)
    samples = jax.random.normal(jax.random.key(5), (3, 25))
    method = "latent_to_flow" if direction == "forward" else "flow_to_latent"

    def single(v):
        return module.apply(variables, v[None], method=method)[0][0]

    ours = _apply(module, method)(variables, samples)[1]
    brute = jax.jit(jax.vmap(lambda v: _brute_log_det(single, v)))(samples)
    np.testing.assert_allclose(ours, brute, rtol=1e-4, atol=1e-4)


def test_single_bijectors_log_det_matches_jacobian():
    d = 9
    keys = jax.random.split(jax.random.key(6), 6)
    w = jax.random.normal(keys[0], (d, d)) * 0.3

    def conditioner(a):
        return jnp.tanh(a @ w), a @ w.T

    bijectors = {
        "coupling": flow.AffineCoupling(flow.checkerboard_mask(d, 1), conditioner),
        "batch_norm": flow.FlowBatchNorm(jax.random.normal(keys[1], (d,)) * 0.3,
                                         jax.random.normal(keys[2], (d,)),
                                         jax.random.normal(keys[3], (d,)),
                                         jax.random.uniform(keys[4], (d,), minval=0.5,
                                                            maxval=2.0)),
        "sigmoid": flow.KernelSigmoid(1e-6),
    }
    v = jax.random.normal(keys[5], (d,))
    for name, bij in bijectors.items():
        y, ld = bij.forward_and_log_det(v)
        np.testing.assert_allclose(ld, _brute_log_det(bij.forward, v), rtol=1e-4, atol=1e-4,
                                   err_msg=name)
        x, ld_inv = bij.inverse_and_log_det(y)
        np.testing.assert_allclose(x, v, rtol=0, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(ld_inv, -ld, rtol=0, atol=1e-4, err_msg=name)
        assert isinstance(bij, distrax.Bijector)


def test_fresh_flow_is_identity():
    module = flow.KernelFlow(kernel_size=5, n_blocks=3, hidden_size=8)
    variables = module.init(jax.random.key(0), jnp.full((2, 5, 5), 0.04))
    assert all(float(jnp.abs(v).max()) == 0 for v in jax.tree.leaves(variables["params"])
               if v.shape[-1] == 25 and v.ndim == 2)
    x = jax.random.normal(jax.random.key(1), (8, 25))
    u, log_det = _apply(module, "flow_to_latent")(variables, x)
    # Only the batch-norms' eps remains: each divides by sqrt(1 + 1e-5).
    scale = (1 + flow.BATCH_NORM_EPS) ** (-0.5 * 3)
    np.testing.assert_allclose(u, x * scale, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(log_det, 25 * np.log(scale), rtol=1e-6, atol=1e-6)


def test_init_and_train_update_of_running_stats():
    module = flow.KernelFlow(kernel_size=5, n_blocks=2, hidden_size=8)
    kernels = jax.random.uniform(jax.random.key(2), (10, 5, 5)) / 10
    variables = module.init(jax.random.key(0), kernels)
    stats0 = variables["batch_stats"]["batch_norm_0"]
    np.testing.assert_array_equal(stats0["mean"], 0.0)
    np.testing.assert_array_equal(stats0["var"], 1.0)
    _, updated = jax.jit(lambda v, k: module.apply(v, k, True, mutable=["batch_stats"]))(
        variables, kernels)
    x = module.apply(variables, kernels, method="preprocess")
    np.testing.assert_allclose(updated["batch_stats"]["batch_norm_0"]["mean"],
                               0.1 * x.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(updated["batch_stats"]["batch_norm_0"]["var"],
                               0.9 + 0.1 * x.var(0, ddof=1), rtol=1e-5, atol=1e-5)


def test_functional_forms_match_module():
    module, variables = _random_flow()
    z = jax.random.normal(jax.random.key(7), (4, 25))
    kernels = _apply(module, "latent_to_kernel")(variables, z)
    np.testing.assert_array_equal(jax.jit(flow.latent_to_kernel_fn)(variables, z), kernels)
    np.testing.assert_allclose(jax.jit(flow.kernel_to_latent_fn)(variables, kernels),
                               _apply(module, "kernel_to_latent")(variables, kernels),
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(jax.jit(flow.log_prob_fn)(variables, kernels),
                               _apply(module, "log_prob")(variables, kernels), rtol=0,
                               atol=1e-4)
    samples = jax.jit(flow.sample_fn, static_argnums=2)(variables, jax.random.key(0), 3)
    assert samples.shape == (3, 5, 5)
    assert flow.flow_from_variables(variables) == flow.KernelFlow(5, 3, 8, 1)


def test_kernel_space_log_prob_adds_logit_jacobian():
    module, variables = _random_flow()
    kernels = jax.random.uniform(jax.random.key(8), (4, 5, 5), minval=0.01, maxval=0.5)
    lp = module.apply(variables, kernels, method="log_prob")
    lp_k = module.apply(variables, kernels, method="log_prob_kernel_space")
    p = 1e-6 + (1 - 2e-6) * kernels.reshape(4, 25)
    expected = jnp.sum(-jnp.log(p) - jnp.log1p(-p), -1) + 25 * np.log1p(-2e-6)
    np.testing.assert_allclose(lp_k - lp, expected, rtol=1e-5)


def test_dequantize_stays_in_unit_interval():
    kernels = jnp.zeros((3, 5, 5)).at[:, 2, 2].set(1.0)
    noisy = flow.dequantize(kernels, key=jax.random.key(0))
    assert float(noisy.min()) >= 0 and float(noisy.max()) <= 1
    assert 0 < float((noisy - kernels).max()) <= flow.DEQUANTIZATION_SCALE
    module, variables = _random_flow()
    lp = module.apply(variables, kernels, key=jax.random.key(1), method="log_prob")
    assert bool(jnp.all(jnp.isfinite(lp)))


# --- bad input ------------------------------------------------------------------------------

def test_wrong_kernel_size_raises():
    module, variables = _random_flow(kernel_size=5)
    with pytest.raises(ValueError, match=r"\(N, 5, 5\).*got \(2, 7, 7\)"):
        module.apply(variables, jnp.full((2, 7, 7), 0.02), method="log_prob")
    with pytest.raises(ValueError, match=r"\(N, 25\)"):
        module.apply(variables, jnp.zeros((2, 24)), method="latent_to_kernel")
    with pytest.raises(ValueError, match=r"\(N, 5, 5\)"):
        module.apply(variables, jnp.full((5, 5), 0.04), method="log_prob")


def test_negative_kernel_raises_when_concrete_and_is_nan_under_jit():
    module, variables = _random_flow()
    kernels = jnp.full((2, 5, 5), 0.04).at[0, 0, 0].set(-0.01)
    with pytest.raises(ValueError, match="must lie in \\[0, 1\\]"):
        module.apply(variables, kernels, method="log_prob")
    # Documented: under jit the values cannot be checked and the log-prob is NaN.
    lp = _apply(module, "log_prob")(variables, kernels)
    assert bool(jnp.isnan(lp[0])) and bool(jnp.isfinite(lp[1]))


def test_train_mode_needs_a_batch():
    module, variables = _random_flow()
    with pytest.raises(ValueError, match="N >= 2"):
        module.apply(variables, jnp.full((1, 5, 5), 0.04), True, method="log_prob")


def test_load_official_checkpoint_of_another_config(official, tmp_path):
    _, _, data = official
    params = {k: v for k, v in data.items() if k.startswith("param/")}
    np.savez(tmp_path / "official.npz", **params)
    module, variables = flow.load_pretrained(str(tmp_path / "official.npz"))
    assert module.kernel_size == 19 and module.n_blocks == 5
    del params["param/net.9.running_var"]
    np.savez(tmp_path / "broken.npz", **params)
    with pytest.raises(ValueError, match="another config"):
        flow.load_pretrained(str(tmp_path / "broken.npz"))


def test_shipped_prior_loads_and_round_trips(tmp_path):
    module, variables = flow.load_pretrained()
    assert module == flow.KernelFlow()
    kernels = jax.jit(lambda v, key: module.apply(v, key, 16, method="sample"))(
        variables, jax.random.key(0))
    assert kernels.shape == (16, 19, 19) and float(kernels.min()) >= 0
    log_prob = _apply(module, "log_prob")(variables, jnp.clip(kernels, 1e-4, 1))
    assert bool(jnp.all(jnp.isfinite(log_prob)))
    flow.save_flow(tmp_path / "copy", module, variables, note="test")
    module2, variables2 = flow.load_flow(tmp_path / "copy")
    assert module2 == module
    jax.tree.map(np.testing.assert_array_equal, variables2, variables)
    other = flow.KernelFlow(kernel_size=5, n_blocks=2, hidden_size=8)
    flow.save_flow(tmp_path / "small", other, other.init(jax.random.key(0),
                                                         jnp.full((2, 5, 5), 0.04)))
    (tmp_path / "small.json").write_text((tmp_path / "copy.json").read_text())
    with pytest.raises(ValueError, match="another config"):
        flow.load_flow(tmp_path / "small")


def test_shipped_prior_beats_the_official_one_on_measured_camera_shake(official):
    """Lai et al.'s 4 measured kernels (31-75 px; shared/data/lai/kernel_npy), fitted into
    19x19 as `benchmarks/flow.py --real` fits them, in their 8 rotations/flips, one
    dequantisation draw: the shipped prior (trained on the generators calibrated to real
    shake) gives them a mean NLL at least 20 nats below the official prior's. Measured with
    8 draws: see benchmarks/README.md."""
    folder = FIXTURES_DIR.parent / "data" / "lai" / "kernel_npy"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent (Lai's measured kernels, ../shared/data)")
    config = configs.load("flow_prior")
    fit = config.real_kernels
    measured = [np.load(folder / f"kernel_0{i}.npy").astype(np.float32) for i in range(1, 5)]
    variants = np.concatenate([np.asarray(kernels.kernel_variants(
        kernels.fit_kernel(k, 19, fit_size=fit.fit_size, threshold=fit.threshold)))
        for k in measured])
    assert variants.shape == (32, 19, 19)

    def nll(module, variables):
        x = flow_training.to_flow_space(module, jnp.asarray(variants),
                                        key=jax.random.key(config.eval_seed),
                                        scale=config.dequantization_scale)
        return -float(jnp.mean(_apply(module, "flow_log_prob")(variables, x)))

    shipped = nll(*flow.load_pretrained())
    official_nll = nll(official[0], official[1])
    print(f"mean NLL on Lai's kernels: shipped {shipped:.1f}, official {official_nll:.1f}")
    assert shipped <= official_nll - 20
