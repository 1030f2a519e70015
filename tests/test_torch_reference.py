"""The PyTorch references of benchmarks/ (torch_ufpnet.py, torch_mcem.py) compute what they
claim: the official UFPNet's golden outputs, and our Deep EM networks and steps.

The side-by-side timings (benchmarks/side_by_side.py) are only meaningful if both columns
compute the same thing; these tests check that on small inputs. torch runs on one thread:
the fixture README saw multi-threaded torch return inaccurate UFPNet values now and then.
"""

import functools
import pathlib
import sys

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="the PyTorch references in benchmarks/ need torch "
                    "(pip install -e '.[bench]'); the library itself never imports it")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from conftest import FIXTURES_DIR, load_fixture  # noqa: E402
from jaxdeblur import blur, configs, losses, mcem  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import torch_mcem  # noqa: E402
import torch_ufpnet  # noqa: E402

# Recommended float32 tolerances of shared/fixtures/README.md ("Tolerances").
KERNEL_ATOL = 2e-5
RESTORED_ATOL = 1e-5
AVGPOOL_ATOL = 2e-5

TINY_FIELDS = dict(img_channel=3, width=8, middle_blk_num=1, enc_blk_nums=(1, 1, 1, 2),
                   dec_blk_nums=(1, 1, 1, 1), kernel_size=19)


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fixture_model(train_size=None):
    fx = load_fixture("ufpnet_tiny.npz")
    model = torch_ufpnet.build(TINY_FIELDS, train_size=train_size)
    torch_ufpnet.load_npz_state_dict(model, FIXTURES_DIR / "ufpnet_tiny.npz")
    return model.eval(), fx


def _run(model, x, eps):
    """(kernels, restored, ending) of the torch model; ending by a forward hook."""
    captured = {}
    hook = model.ending.register_forward_hook(lambda m, i, o: captured.update(ending=o))
    with torch.no_grad():
        kernels, restored = model(torch.from_numpy(x), torch.from_numpy(eps))
    hook.remove()
    return kernels.numpy(), restored.numpy(), captured["ending"].numpy()


# --- flow prior ------------------------------------------------------------------------------

def test_torch_kernel_prior_reproduces_the_official_flow_fixture():
    """Both directions, log_prob and pre/post_process of `torch_ufpnet.KernelPrior` (also the
    PyTorch side of benchmarks/flow.py), float32 against the fixture's float64 chain."""
    fx = load_fixture("flow_motion.npz")
    model = torch_ufpnet.load_npz_state_dict(torch_ufpnet.KernelPrior(),
                                             FIXTURES_DIR / "flow_motion.npz").eval()
    with torch.no_grad():
        x = model.inverse(torch.from_numpy(fx["in/z"]))
        x_again, log_det_inverse = model.inverse(torch.from_numpy(fx["in/z"]), log_det=True)
        kernel = model.post_process(x)
        u, log_det = model(torch.from_numpy(fx["out/eval/x"]))
        log_prob, u_again = model.log_prob(torch.from_numpy(fx["out/eval/x"]))
        model.double()
        x_f64 = torch.from_numpy(fx["out/eval/x_f64"])
        logits = model.pre_process(model.post_process(x_f64))
    for got, key, atol in ((x, "x", 5e-5), (kernel, "kernel", 5e-6), (u, "u", 5e-5),
                           (log_det, "logdet_forward", 5e-4), (log_prob, "log_prob", 2e-3)):
        np.testing.assert_allclose(got.numpy(), fx[f"out/eval/{key}_f64"], rtol=0, atol=atol,
                                   err_msg=key)
    np.testing.assert_allclose(log_det_inverse.numpy(), fx["out/eval/logdet_inverse_f64"],
                               rtol=0, atol=5e-4)
    np.testing.assert_array_equal(x_again.numpy(), x.numpy())
    np.testing.assert_array_equal(u_again.numpy(), u.numpy())
    np.testing.assert_allclose(logits.numpy(), fx["out/eval/x_f64"], rtol=0, atol=1e-6)


# --- UFPNet ----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["", "pad/"])
def test_torch_ufpnet_reproduces_the_official_fixture(case):
    model, fx = _fixture_model()
    kernels, restored, ending = _run(model, fx[f"in/{case}x"], fx[f"in/{case}eps"])
    np.testing.assert_allclose(kernels, fx[f"out/{case}kernel"], rtol=0, atol=KERNEL_ATOL)
    np.testing.assert_allclose(restored, fx[f"out/{case}restored"], rtol=0, atol=RESTORED_ATOL)
    expected_ending = fx["out/inter/ending" if not case else "out/pad/ending"]
    np.testing.assert_allclose(ending, expected_ending, rtol=0, atol=RESTORED_ATOL)


@pytest.mark.parametrize("train", ["train16x16", "train16x32"])
def test_torch_ufpnet_local_variant_reproduces_the_fixture(train):
    local = load_fixture("ufpnet_tiny_local.npz")
    train_size = tuple(int(v) for v in local[f"meta/{train}/train_size"][-2:])
    model, fx = _fixture_model(train_size)
    prefix = f"meta/{train}/pool_kernel_size/"
    for key in (k for k in local if k.startswith(prefix)):
        pool = model.get_submodule(key[len(prefix):])
        assert pool.kernel_size == tuple(int(v) for v in local[key]), key
    _, restored, ending = _run(model, fx["in/x"], fx["in/eps"])
    np.testing.assert_allclose(restored, local[f"out/{train}/restored"], rtol=0,
                               atol=RESTORED_ATOL)
    np.testing.assert_allclose(ending, local[f"out/{train}/ending"], rtol=0, atol=RESTORED_ATOL)


def test_torch_avgpool_units():
    local = load_fixture("ufpnet_tiny_local.npz")
    x = torch.from_numpy(local["in/avgpool/x"])
    for case in ("k5x7", "k4x6", "k13x5", "k20x30", "k1x1"):
        pool = torch_ufpnet.AvgPool2d(local[f"meta/avgpool/{case}/kernel_size"])
        np.testing.assert_allclose(pool(x).numpy(), local[f"out/avgpool/{case}"], rtol=0,
                                   atol=AVGPOOL_ATOL, err_msg=case)


def test_torch_stage3_loss_is_ours_and_the_step_trains_the_backbone_only():
    model, fx = _fixture_model()
    step = torch_ufpnet.Stage3Step(model, configs.load("ufpnet_tiny").stage3)
    blurry = fx["in/x"]
    sharp = np.clip(blurry + 0.05 * np.sin(np.arange(blurry.size)).reshape(blurry.shape),
                    0.0, 1.0).astype(np.float32)
    loss = step.loss(torch.from_numpy(blurry), torch.from_numpy(sharp),
                     torch.from_numpy(fx["in/eps"]))
    # Ours on the fixture's (official) outputs, NHWC; the kernels of pixel y·W + x.
    nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
    _, _, h, w = blurry.shape
    field = jnp.asarray(fx["out/kernel"].reshape(1, h, w, 19, 19))
    ours = (losses.psnr_loss(nhwc(fx["out/restored"]), nhwc(sharp))
            + step.reblur_weight * losses.reblur_l1(nhwc(fx["out/restored"]), field,
                                                    nhwc(blurry)))
    np.testing.assert_allclose(float(loss), float(ours), rtol=1e-5)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    step(torch.from_numpy(blurry), torch.from_numpy(sharp), torch.from_numpy(fx["in/eps"]))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith(torch_ufpnet.FROZEN) for k in changed)
    assert "intro.weight" in changed and "encoders.0.0.kernel_atttion.conv_2.0.weight" in changed


# --- Deep EM ---------------------------------------------------------------------------------

# One pSGLD step moves a parameter by α·G·g + sqrt(2αTG)·w with G = 1/(λ + |g|) (λ =
# psgld_eps = 1). Gradients of this likelihood reach 1e5 (1/σ² = 1e4) and two float32
# implementations agree on them to ~5e-6 of their norm, i.e. to ~0.1 absolute; where
# |g| ≲ λ that moves G, and the update, by up to ~1e-3 (observed: 5.3e-4 on updates of up to
# 0.18, 3.9e-4 of the update's norm). With identical gradients the sampler agrees to float
# rounding (SAMPLER_ATOL).
GRAD_RTOL = 5e-5  # per tensor, ‖g_torch − g_ours‖ / ‖g_ours‖ (observed ≤ 1e-5)
SAMPLER_ATOL = 1e-6
STEP_ATOL = 2e-3
STEP_RTOL_NORM = 2e-3
NET_ATOL = 1e-5
M_STEP_ATOL = 1e-5


def _deep_em(overrides, size=37):
    config = configs.load("mcem", overrides)
    blurry = jax.random.uniform(jax.random.key(0), (size, size, 3))
    model = mcem.build_model(blurry.shape, config)
    # Jitted: eagerly, every initialiser op compiles on its own (11 s against 8 s here).
    state = jax.jit(lambda key: mcem.init_state(model, key=key))(jax.random.key(1))
    # The kernel head starts at zero (flat, identical kernels); random heads test more.
    params = jax.tree.map(lambda x: x, state.kernel_params)
    trunk = params["params"]["SkipNet_0"]
    head = trunk[f"Conv_{max(int(n[5:]) for n in trunk if n.startswith('Conv_'))}"]
    head["kernel"] = 0.3 * jax.random.normal(jax.random.key(2), head["kernel"].shape)
    state = state._replace(kernel_params=params, adam=model.adam.init(params))
    return model, state, blurry


def test_torch_deep_em_networks_match_ours_with_the_paper_networks():
    # The paper's networks (5×64 image net, [32, 32, 64, 64] kernel net) at odd sizes
    # (latent 45², kernels 9×9), so that 'SAME' stride-2 padding and bilinear resizes to
    # odd skip sizes are exercised.
    model, state, _ = _deep_em(["kernel_size=9", "grid=(2,2)"])
    em = torch_mcem.DeepEM.from_jax(model, state)
    with torch.no_grad():
        image = torch_mcem.image_from_torch(em.image_net(em.z_image))
        kernels = em.kernels().numpy()
        tied = em.kernels(uniform=True).numpy()
    np.testing.assert_allclose(image, model.image_net.apply(state.chain.params, state.z_image),
                               rtol=0, atol=NET_ATOL)
    np.testing.assert_allclose(kernels, model.kernel_net.apply(state.kernel_params,
                                                               state.z_kernel),
                               rtol=0, atol=NET_ATOL)
    np.testing.assert_allclose(tied, model.kernel_net.apply(state.kernel_params, state.z_kernel,
                                                            tie_heads=True),
                               rtol=0, atol=NET_ATOL)


@pytest.mark.parametrize("method", ["direct", "fft", "loop"])
def test_torch_filter_flow_matches_ours(method):
    geometry = blur.eff_windows((45, 52), (2, 3), 9)
    image = jax.random.uniform(jax.random.key(3), (45, 52, 3))
    logits = jax.random.normal(jax.random.key(4), (geometry.num_patches, 81))
    kernels = jax.nn.softmax(logits, axis=-1).reshape(-1, 9, 9)
    ours = blur.filter_flow_blur(image, kernels, geometry)
    theirs = torch_mcem.filter_flow_blur(torch_mcem.image_to_torch(image),
                                         torch.from_numpy(np.asarray(kernels)), geometry, method)
    np.testing.assert_allclose(torch_mcem.image_from_torch(theirs), ours, rtol=0, atol=2e-6)


def test_torch_psgld_e_step_and_m_step_match_ours():
    overrides = ["kernel_size=7", "grid=(2,2)", "image_net.features=(8,8)",
                 "image_net.skip_features=4", "kernel_net.features=(8,)",
                 "kernel_net.skip_features=4", "e_step_burn_in=0"]
    model, state, blurry = _deep_em(overrides, size=23)
    method = model.method
    em = torch_mcem.DeepEM.from_jax(model, state, blur_method="auto")
    blurry_t = torch_mcem.image_to_torch(blurry)

    # The log posterior and its gradient (ours restated from jaxdeblur.mcem.e_step).
    kernels = model.kernel_net.apply(state.kernel_params, state.z_kernel)
    r = (method.kernel_size - 1) // 2

    def log_posterior(params):
        latent = model.image_net.apply(params, state.z_image)
        reblurred = blur.filter_flow_blur(latent, kernels, model.geometry)[r:-r, r:-r]
        prior = sum(jnp.sum(p * p) for p in jax.tree.leaves(params))
        return (-jnp.sum((blurry - reblurred) ** 2) / (2 * method.noise_sigma ** 2)
                - 0.5 * method.weight_decay * prior)

    sampler = mcem.psgld(method.step_size, key=0, decay=method.psgld_decay,
                         eps=method.psgld_eps, temperature=method.temperature)

    @jax.jit
    def ours_step(params, sampler_state):
        """Log posterior, its gradient, the step's noise (as psgld draws it), new params."""
        value, grads = jax.value_and_grad(log_posterior)(params)
        _, noise_key = jax.random.split(sampler_state.key)
        noise = optax.tree.random_like(noise_key, params)
        updates, _ = sampler.update(grads, sampler_state)
        return value, grads, noise, optax.apply_updates(params, updates)

    value, grads, noise, stepped = ours_step(state.chain.params, state.chain.sampler)
    with torch.no_grad():
        kernels_t = em.kernels()
    value_t = em.log_posterior(kernels_t, blurry_t)
    grads_t = torch.autograd.grad(value_t, list(em.image_net.parameters()))
    np.testing.assert_allclose(float(value_t), float(value), rtol=1e-5)
    ours_grads = torch_mcem.torch_state_from_flax(grads)
    for (name, _), g in zip(em.image_net.named_parameters(), grads_t):
        error = np.linalg.norm(g.numpy() - ours_grads[name]) / np.linalg.norm(ours_grads[name])
        assert error < GRAD_RTOL, (name, error)

    # The sampler alone: same gradients, same noise -> same parameters.
    expected = torch_mcem.torch_state_from_flax(stepped)
    alone = torch_mcem.DeepEM.from_jax(model, state)
    alone.sampler.step([torch.from_numpy(ours_grads[n]) for n, _ in
                        alone.image_net.named_parameters()], torch_mcem.named_tree(noise))
    for name, value in torch_mcem.image_net_state(alone).items():
        np.testing.assert_allclose(value, expected[name], rtol=0, atol=SAMPLER_ATOL,
                                   err_msg=name)

    # One whole E-step step (gradient, pSGLD, Welford) from the same state and noise.
    e_step = jax.jit(functools.partial(mcem.e_step, model, length=1, uniform=False,
                                       unroll=True))
    new = e_step(state, blurry)
    em.e_step(blurry_t, 1, noise=[torch_mcem.named_tree(noise)])
    ours_new = torch_mcem.torch_state_from_flax(new.chain.params)
    ours_old = torch_mcem.torch_state_from_flax(state.chain.params)
    theirs = torch_mcem.image_net_state(em)
    diff = sum(np.sum((theirs[k] - ours_new[k]) ** 2) for k in ours_new)
    moved = sum(np.sum((ours_new[k] - ours_old[k]) ** 2) for k in ours_new)
    assert np.sqrt(diff / moved) < STEP_RTOL_NORM
    for name in ours_new:
        np.testing.assert_allclose(theirs[name], ours_new[name], rtol=0, atol=STEP_ATOL,
                                   err_msg=name)
    # The moments hold the one sample, the image of each side's new parameters.
    np.testing.assert_allclose(torch_mcem.image_from_torch(em.stats.mean),
                               new.chain.stats.mean, rtol=0, atol=STEP_ATOL)

    # One M-step (Adam on the kernel network) from ours' post-E-step state, both sides.
    m_step = jax.jit(functools.partial(mcem.m_step, model, length=1, uniform=False,
                                       unroll=True))
    after = m_step(new, blurry)
    em_m = torch_mcem.DeepEM.from_jax(model, new)
    em_m.m_step(blurry_t, 1)
    ours_k = torch_mcem.torch_state_from_flax(after.kernel_params)
    ours_k0 = torch_mcem.torch_state_from_flax(new.kernel_params)
    assert max(np.abs(ours_k[k] - ours_k0[k]).max() for k in ours_k) > 0.5 * method.m_step_lr
    head_bias = f"trunk.convs.{len(em_m.kernel_net.trunk.convs) - 1}.bias"
    for name, value in em_m.kernel_net.state_dict().items():
        # Adam's first step is lr·g/(|g| + 1e-8): equal to rounding unless g ~ 0. The head
        # bias shifts all logits of one kernel, which its softmax ignores: its gradient is
        # rounding noise (~1e-9) on both sides, so its step is anything within ±lr.
        atol = method.m_step_lr * (1 + 1e-3) if name == head_bias else M_STEP_ATOL
        np.testing.assert_allclose(value.numpy(), ours_k[name], rtol=0, atol=atol,
                                   err_msg=name)
