"""Deep EM: Monte Carlo EM blind deblurring with Langevin E-steps (Li et al., CVPR 2023).

Unknowns are re-parametrised by two deep-image-prior networks with fixed noise inputs:
the image ``x = T_f(theta_f, z)`` (`jaxdeblur.nets.unet.DIPImageNet`) and the per-cell
kernels ``K = T_K(theta_K, z~)`` (`jaxdeblur.nets.unet.KernelNet`). The blur is the
mask-first efficient filter flow ``y = sum_r k_r * (w_r . x)`` (`jaxdeblur.blur`).

* Likelihood: ``log p(g | theta_f; theta_K) = -||g - crop(B_K x)||^2 / (2 sigma^2)``; the
  latent image is ``k - 1`` pixels larger than ``g`` and the reblurred image is cropped to
  its centre (as SelfDeblur does), so the zero canvas of the filter flow never meets the
  observation's border.
* Prior on the image network: ``log p(theta_f) = -(weight_decay / 2) ||theta_f||^2``.
* E-step: samples ``theta_f^i ~ p(theta_f | g; theta_K)`` by (preconditioned) stochastic
  gradient Langevin dynamics; the chain continues from one EM iteration to the next, and
  after ``burn_in`` steps the image samples are folded into a running mean and variance
  (Welford) instead of being stored.
* M-step: Adam on ``theta_K`` maximising ``Q = (1/n) sum_i log p(g | theta_f^i; theta_K)``.
  Because the blur is linear, ``(1/n) sum_i ||g - B x_i||^2 = ||g - B xbar||^2 +
  (1/n) sum_i ||B (x_i - xbar)||^2``; the second term is evaluated under a per-pixel
  (diagonal) covariance as ``sum_p (B_{K^2} var)(p)`` — exact for the uniform model when
  the samples' pixels are uncorrelated, an approximation otherwise
  (``config.m_step_variance_term``).
* Warm-up: the first ``warmup_iterations`` use one kernel for every cell (the kernel
  network's heads are tied, see `KernelNet`), i.e. uniform deblurring initialises T_K.
* Refinement (ours, off by default): ``refine_iterations`` more iterations with the E-step
  at ``refine_temperature`` (0: RMSprop, no noise) and the M-step still on; the sampling
  phase finds the kernel, the cold phase sharpens image and kernel (`refine_method`).

Speed on the CPU: XLA:CPU runs gradients of convolutions inside a while loop (``lax.scan``)
8-12x slower than the same computation in straight-line code, so ``config.loop = "auto"``
traces the chains step by step on the CPU and as ``lax.scan`` on GPU/TPU (`loop`). One EM
iteration (E-step chain, M-step) is one jitted call; ``config.e_step_chunk`` splits long
chains into several calls. The host loop never reads device values between iterations.

Hyperparameters: `hparams_from_config` reads the config once, when a run starts, into frozen
`MCEMHParams` (a missing or unknown field is an error naming it): `MethodHParams`, every field
traced code reads, is the static argument of the compiled steps, so jax's jit cache reuses
them exactly when it is equal; `RunHParams` (iteration counts, logging, seed) only steers the
host loop and never recompiles anything.

References:
    Li, Wang, Nan, Ji, "Self-Supervised Blind Motion Deblurring With Deep Expectation
    Maximization", CVPR 2023.
    Welling, Teh, "Bayesian Learning via Stochastic Gradient Langevin Dynamics", ICML 2011.
    Li, Chen, Carlson, Carin, "Preconditioned Stochastic Gradient Langevin Dynamics for
    Deep Neural Networks", AAAI 2016.
    Welford, "Note on a method for calculating corrected sums of squares and products",
    Technometrics 1962.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdeblur import blur, configs, flow
from jaxdeblur.nets import unet

__all__ = [
    "NetHParams", "MethodHParams", "SyntheticHParams", "RunHParams", "MCEMHParams",
    "hparams_from_config", "refine_method", "SGLDState", "PSGLDState", "sgld", "psgld",
    "Welford", "welford_init", "welford_update",
    "welford_variance", "ChainState", "langevin_chain", "MCEMState", "MCEMResult", "MCEMModel",
    "build_model", "init_state", "e_step", "m_step", "em_iteration", "result", "deblur",
    "resolve_chunk", "resolve_unroll", "loop", "kernel_centroid", "DataFitError",
    "snapshot_uncertainty", "total_iterations", "iteration_phase",
]


class DataFitError(FloatingPointError):
    """The data fit became NaN or infinite during MCEM."""


# --------------------------------------------------------------------------------------
# Hyperparameters, read from the config once when a run starts.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NetHParams:
    """One deep-image-prior U-Net (`jaxdeblur.nets.unet`) and its fixed noise input.

    ``config.image_net`` and ``config.kernel_net``; ``input_channels`` and ``noise_scale``
    shape and scale the noise input ``z``.
    """

    features: tuple[int, ...]
    skip_features: int
    input_channels: int
    noise_scale: float
    norm: str
    num_groups: int


@dataclasses.dataclass(frozen=True)
class MethodHParams:
    """Every hyperparameter that traced MCEM code reads (the config fields of these names).

    Frozen and hashable: the static argument of every compiled step, so a change here
    recompiles and nothing else does. ``step_size`` and ``temperature`` are those of the
    phase being run: the refinement phase substitutes its own (`refine_method`).
    ``e_step_chunk``/``m_step_chunk`` (`resolve_chunk`) and ``loop`` (`resolve_unroll`) are
    here because they decide the traced code's form.
    """

    kernel_size: int
    grid: tuple[int, int]
    blur_method: str
    image_net: NetHParams
    kernel_net: NetHParams
    noise_sigma: float
    weight_decay: float
    sampler: str
    step_size: float
    psgld_decay: float
    psgld_eps: float
    temperature: float
    e_step_steps: int
    e_step_burn_in: int
    e_step_chunk: Union[int, str]
    loop: Union[bool, str]
    m_step_lr: float
    m_step_steps: int
    m_step_chunk: Union[int, str]
    m_step_variance_term: bool
    moment_decay: float
    kernel_centre_weight: float
    kernel_prior: str
    kernel_prior_weight: float

    def __post_init__(self):
        if self.sampler not in ("psgld", "sgld"):
            raise ValueError(f"config.sampler must be 'psgld' or 'sgld', got {self.sampler!r}")
        if not self.temperature >= 0:
            raise ValueError("config.temperature must be >= 0 (1 samples the posterior, 0 is "
                             f"RMSprop without noise), got {self.temperature}")
        _make_sampler(self, key=0)  # checks step_size, psgld_decay and psgld_eps
        if not self.kernel_prior_weight >= 0:
            raise ValueError("config.kernel_prior_weight must be >= 0 (0: no flow prior in "
                             f"the M-step), got {self.kernel_prior_weight}")


@dataclasses.dataclass(frozen=True)
class SyntheticHParams:
    """The synthetic example ``train_scripts/mcem.py`` deblurs when given no images."""

    size: int
    kernel_size: int
    max_angle_deg: float
    noise_sigma: float
    seed: int


@dataclasses.dataclass(frozen=True)
class RunHParams:
    """The hyperparameters only the host loop reads; changing them never recompiles.

    Iteration counts and phases (``em_iterations``, ``warmup_iterations``,
    ``refine_iterations``), logging and checkpoints, the seed, the synthetic input. The
    refinement phase's ``refine_step_size`` and ``refine_temperature`` are here too: the host
    loop turns them into that phase's `MethodHParams` (`refine_method`), so they key the
    refinement phase's compiled steps and no others.
    """

    seed: int
    em_iterations: int
    warmup_iterations: int
    refine_iterations: int
    refine_temperature: float
    refine_step_size: float
    log_every: int
    checkpoint_every: int
    synthetic: SyntheticHParams
    levels: tuple
    level_refit_steps: int
    level_refit_lr: float

    def __post_init__(self):
        for name, least in (("em_iterations", 1), ("warmup_iterations", 0),
                            ("refine_iterations", 0), ("log_every", 1),
                            ("checkpoint_every", 1), ("level_refit_steps", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"config.{name} must be an integer >= {least}, got {value!r}")
        if not self.refine_temperature >= 0:
            raise ValueError("config.refine_temperature must be >= 0 (0 is RMSprop without "
                             f"noise), got {self.refine_temperature}")
        if not self.refine_step_size > 0:
            raise ValueError(f"config.refine_step_size must be > 0, got {self.refine_step_size}")
        if not self.level_refit_lr > 0:
            raise ValueError(f"config.level_refit_lr must be > 0, got {self.level_refit_lr}")
        scales = []
        for level in self.levels:
            ok = (isinstance(level, (tuple, list)) and len(level) == 2
                  and isinstance(level[1], int) and not isinstance(level[1], bool)
                  and level[1] >= 1 and 0 < float(level[0]) < 1)
            if not ok:
                raise ValueError("config.levels holds (scale, em_iterations) pairs, coarsest "
                                 "first, each scale in (0, 1) and em_iterations >= 1, got "
                                 f"{self.levels!r}; () runs at full resolution only")
            scales.append(float(level[0]))
        if scales != sorted(scales) or len(set(scales)) != len(scales):
            raise ValueError(f"config.levels must go from the coarsest scale up, got "
                             f"{self.levels!r}")


@dataclasses.dataclass(frozen=True)
class MCEMHParams:
    """An MCEM config as frozen hyperparameters: ``method`` (traced code), ``run`` (host loop)."""

    method: MethodHParams
    run: RunHParams


def hparams_from_config(config: Any) -> MCEMHParams:
    """The hyperparameters of an MCEM config, read and checked once when a run starts.

    The config must have exactly the fields of `jaxdeblur/configs/mcem.py`: a missing field
    fails here instead of running on a default the shipped config does not share, and so
    does an unknown (misspelt) one. Fields that traced code reads go to ``method``, the rest
    to ``run``; lists (a JSON config) become tuples.

    Args:
        config: an `ml_collections.ConfigDict` or nested mapping, or `MCEMHParams`
            (returned as it is).

    Returns:
        `MCEMHParams`.

    Raises:
        ValueError: a missing or unknown field, or a bad value; the message names the field
            by its dotted path (``image_net.norm``).
    """
    if isinstance(config, MCEMHParams):
        return config
    values = configs.plain(config)
    if not isinstance(values, dict):
        raise ValueError(f"an MCEM config is a ConfigDict or mapping, got {type(config)}")
    parts = {}
    for part in (MethodHParams, RunHParams):
        names = {f.name for f in dataclasses.fields(part)}
        parts[part] = {k: v for k, v in values.items() if k in names}
    unknown = sorted(set(values) - set(parts[MethodHParams]) - set(parts[RunHParams]))
    if unknown:
        raise ValueError(f"unknown MCEM config field(s) {', '.join(unknown)}; "
                         "jaxdeblur/configs/mcem.py lists the fields")
    source = "jaxdeblur/configs/mcem.py"
    return MCEMHParams(method=configs.as_dataclass(MethodHParams, parts[MethodHParams],
                                                   source=source),
                       run=configs.as_dataclass(RunHParams, parts[RunHParams], source=source))


def _method(config: Any) -> MethodHParams:
    """The `MethodHParams` of a config, `MCEMHParams` or `MethodHParams`."""
    if isinstance(config, MethodHParams):
        return config
    return hparams_from_config(config).method


def refine_method(hparams: MCEMHParams) -> MethodHParams:
    """The method of the refinement phase: ``step_size``, ``temperature`` from its ``refine_*``.

    After ``em_iterations`` of MCEM, ``refine_iterations`` more iterations run the E-step
    chain at ``refine_temperature`` (0: RMSprop on the image network, no noise) with step
    ``refine_step_size``, the M-step still fitting the kernels: the sampling phase finds the
    kernel and a posterior mean, the cold phase sharpens both (see the config for the
    measurement). The uncertainty map stays the sampling phase's (`snapshot_uncertainty`).
    """
    return dataclasses.replace(hparams.method, step_size=hparams.run.refine_step_size,
                               temperature=hparams.run.refine_temperature)


# --------------------------------------------------------------------------------------
# Langevin samplers (optax (init, update) shape).
# --------------------------------------------------------------------------------------


class SGLDState(NamedTuple):
    """State of `sgld`: the step count and the PRNG key for the injected noise."""

    count: jax.Array
    key: jax.Array


class PSGLDState(NamedTuple):
    """State of `psgld`: step count, PRNG key and the RMSprop second moment ``V``."""

    count: jax.Array
    key: jax.Array
    nu: Any


def _raw_key(key: jax.Array) -> jax.Array:
    # Raw uint32 keys checkpoint with orbax and stack under vmap like any array.
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def _state_key(key: Union[jax.Array, int]) -> jax.Array:
    # A seed as optax.add_noise takes it, or a key (typed or raw), stored raw.
    if isinstance(key, (int, np.integer)):
        key = jax.random.key(int(key))
    return _raw_key(key)


def sgld(step_size: float, *, key: Union[jax.Array, int],
         temperature: float = 1.0) -> optax.GradientTransformation:
    """Stochastic gradient Langevin dynamics as an optax transformation.

    ``theta <- theta + alpha * grad log p(theta) + sqrt(2 alpha T) * w``, ``w ~ N(0, I)``; at
    temperature ``T = 1`` its stationary law is ``p`` as ``alpha -> 0`` (``p^(1/T)`` in
    general). The gradients passed to ``update`` are those of the log posterior (ascent), and
    the returned updates are *added* to the parameters (`optax.apply_updates`). Composes with
    other transformations, e.g. ``optax.chain(optax.clip_by_global_norm(1.0), sgld(...))``.

    Args:
        step_size: alpha > 0.
        key: PRNG key or integer seed (keyword-only) of the noise; ``init`` puts it in the
            state, and each ``update`` splits the state's key (one chain per key).
        temperature: T >= 0 (0: gradient ascent without noise).

    Returns:
        ``optax.GradientTransformation(init, update)``; ``init(params)`` gives an
        `SGLDState`, ``update(grads, state, params=None) -> (updates, state)``.

    References:
        Welling & Teh, ICML 2011.
    """
    if not step_size > 0:
        raise ValueError(f"sgld step_size must be > 0, got {step_size}")
    if not temperature >= 0:
        raise ValueError(f"sgld temperature must be >= 0, got {temperature}")

    def init(params: Any) -> SGLDState:
        del params
        return SGLDState(count=jnp.zeros((), jnp.int32), key=_state_key(key))

    def update(grads: Any, state: SGLDState, params: Any = None) -> tuple[Any, SGLDState]:
        del params
        next_key, noise_key = jax.random.split(state.key)
        noise = optax.tree.random_like(noise_key, grads)
        scale = float(np.sqrt(2.0 * step_size * temperature))
        updates = optax.tree.add_scale(optax.tree.scale(step_size, grads), scale, noise)
        return updates, SGLDState(count=state.count + 1, key=next_key)

    return optax.GradientTransformation(init, update)


def psgld(step_size: float, *, key: Union[jax.Array, int], decay: float = 0.99,
          eps: float = 1e-5, bias_correction: bool = True,
          temperature: float = 1.0) -> optax.GradientTransformation:
    """RMSprop-preconditioned SGLD (pSGLD), with the Gamma correction term dropped.

    ``V <- decay V + (1 - decay) g . g``, ``G = 1 / (eps + sqrt(V / (1 - decay^t)))``,
    ``theta <- theta + alpha G . g + sqrt(2 alpha T G) . w``, ``w ~ N(0, I)``, with g the
    gradient of the log posterior. The exact sampler also adds ``alpha Gamma(theta)``,
    ``Gamma_i = sum_j dG_ij / dtheta_j``; like Li et al. (and the Deep EM demo's pSGLD) we
    drop it: it is O((1 - decay)) for a slowly varying V and costs a second-order
    derivative. The division by ``1 - decay^t`` (Adam's bias correction; Li et al. start
    from V = 0 without it) keeps the first steps from being ``1 / sqrt(1 - decay)`` times
    too large: without it the first step moves every parameter by ~10 alpha.

    Args:
        step_size: alpha > 0 (the paper's "lr 0.01 for T_f").
        key: PRNG key or integer seed (keyword-only) of the noise, as in `sgld`.
        decay: RMSprop decay of the second moment, in [0, 1).
        eps: lambda, keeps G bounded where gradients vanish.
        bias_correction: divide V by ``1 - decay^t``.
        temperature: T >= 0 (0: RMSprop without noise).

    Returns:
        ``optax.GradientTransformation(init, update)``; ``init(params)`` gives a
        `PSGLDState`, ``update(grads, state, params=None) -> (updates, state)``.

    References:
        Li, Chen, Carlson, Carin, AAAI 2016, Algorithm 1.
    """
    if not step_size > 0:
        raise ValueError(f"psgld step_size must be > 0, got {step_size}")
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"psgld decay must be in [0, 1), got {decay}")
    if not eps > 0:
        raise ValueError(f"psgld eps must be > 0, got {eps}")
    if not temperature >= 0:
        raise ValueError(f"psgld temperature must be >= 0, got {temperature}")

    def init(params: Any) -> PSGLDState:
        return PSGLDState(count=jnp.zeros((), jnp.int32), key=_state_key(key),
                          nu=optax.tree.zeros_like(params))

    def update(grads: Any, state: PSGLDState, params: Any = None) -> tuple[Any, PSGLDState]:
        del params
        next_key, noise_key = jax.random.split(state.key)
        noise = optax.tree.random_like(noise_key, grads)
        # Not optax.tree.update_moment_per_elem_norm: it rounds (1 - decay) * g**2, this
        # ((1 - decay) * g) * g, and the chains of earlier runs are kept bit for bit.
        nu = jax.tree.map(lambda v, g: decay * v + (1.0 - decay) * g * g, state.nu, grads)
        count = state.count + 1
        scale = (1.0 - decay ** count.astype(jnp.float32)) if bias_correction else 1.0

        def one(g, v, w):
            precond = 1.0 / (eps + jnp.sqrt(v / scale))
            return (step_size * precond * g
                    + jnp.sqrt(2.0 * step_size * temperature * precond) * w)

        updates = jax.tree.map(one, grads, nu, noise)
        return updates, PSGLDState(count=count, key=next_key, nu=nu)

    return optax.GradientTransformation(init, update)


def _make_sampler(method: MethodHParams, *, key: jax.Array) -> optax.GradientTransformation:
    """The E-step sampler of ``method`` (step size and temperature of its phase)."""
    if method.sampler == "psgld":
        return psgld(method.step_size, key=key, decay=method.psgld_decay, eps=method.psgld_eps,
                     temperature=method.temperature)
    return sgld(method.step_size, key=key, temperature=method.temperature)


# --------------------------------------------------------------------------------------
# Running moments and the Langevin chain.
# --------------------------------------------------------------------------------------


class Welford(NamedTuple):
    """Running mean and sum of squared deviations of the samples seen so far."""

    count: jax.Array
    mean: jax.Array
    m2: jax.Array


def welford_init(like: jax.Array) -> Welford:
    """Empty running moments for samples shaped like ``like``."""
    return Welford(jnp.zeros((), jnp.float32), jnp.zeros_like(like), jnp.zeros_like(like))


def welford_update(stats: Welford, sample: jax.Array, weight: jax.Array = 1.0) -> Welford:
    """Adds ``sample`` when ``weight`` is 1 and leaves the moments unchanged when it is 0.

    ``n <- n + 1``, ``d = x - mean``, ``mean <- mean + d / n``, ``m2 <- m2 + d (x - mean)``.
    """
    weight = jnp.asarray(weight, jnp.float32)
    count = stats.count + weight
    delta = sample - stats.mean
    mean = stats.mean + weight * delta / jnp.maximum(count, 1.0)
    m2 = stats.m2 + weight * delta * (sample - mean)
    return Welford(count, mean, m2)


def welford_variance(stats: Welford) -> jax.Array:
    """Population variance ``m2 / n`` of the samples (0 before any sample)."""
    return stats.m2 / jnp.maximum(stats.count, 1.0)


class ChainState(NamedTuple):
    """One Langevin chain: parameters, sampler state, running moments, step within the E-step."""

    params: Any
    sampler: Any
    stats: Welford
    step: jax.Array


def langevin_chain(
    state: ChainState,
    grad_log_posterior: Callable[[Any], Any],
    observe: Callable[[Any], jax.Array],
    sampler: optax.GradientTransformation,
    *,
    length: int,
    burn_in: int,
    unroll: bool = False,
) -> ChainState:
    """``length`` Langevin steps as one ``lax.scan``, folding post-burn-in samples into moments.

    Step t (counted by ``state.step`` from the start of the E-step) moves the parameters by
    the sampler and, when ``t >= burn_in``, adds ``observe(params)`` to the Welford moments.
    Called once with the whole chain, or repeatedly with chunks: the result is the same.
    With ``unroll=True`` the steps are traced one after another instead (straight-line code,
    the fast form on XLA:CPU; see `loop`).

    Args:
        state: the chain's `ChainState`.
        grad_log_posterior: params -> gradient of the log posterior (same pytree).
        observe: params -> the quantity whose moments are tracked (the image).
        sampler: `sgld` or `psgld`.
        length: number of steps in this call (static).
        burn_in: steps of the E-step whose samples are discarded.
        unroll: trace the steps one by one instead of a ``lax.scan`` (static).

    Returns:
        The `ChainState` after ``length`` steps (same shapes and dtypes).
    """

    def step(carry: ChainState, _):
        grads = grad_log_posterior(carry.params)
        updates, sampler_state = sampler.update(grads, carry.sampler, carry.params)
        params = optax.apply_updates(carry.params, updates)
        keep = (carry.step >= burn_in).astype(jnp.float32)
        stats = welford_update(carry.stats, observe(params), keep)
        return ChainState(params, sampler_state, stats, carry.step + 1), None

    return loop(step, state, length, unroll)


def loop(step: Callable[[Any, None], tuple[Any, None]], carry: Any, length: int,
         unroll: bool) -> Any:
    """``length`` applications of a scan body, as ``lax.scan`` or traced one after another.

    XLA:CPU runs convolution gradients inside a while loop (what ``lax.scan`` lowers to)
    8-12x slower than the same computation in straight-line code (64² image network step:
    178 ms in a scan, also at length 1, vs 18 ms unrolled; DEVELOPERS.md). GPUs and TPUs
    keep the scan: one compiled body, compile time independent of ``length``.

    Args:
        step: ``(carry, None) -> (carry, None)``, a ``lax.scan`` body.
        carry: initial carry.
        length: number of steps (static).
        unroll: trace ``length`` copies of ``step`` instead of a scan (static).

    Returns:
        The final carry.
    """
    if unroll:
        for _ in range(length):
            carry, _ = step(carry, None)
        return carry
    carry, _ = jax.lax.scan(step, carry, None, length=length)
    return carry


# --------------------------------------------------------------------------------------
# MCEM on one image.
# --------------------------------------------------------------------------------------


class MCEMState(NamedTuple):
    """Everything an MCEM run carries between iterations (one image; vmap adds a batch axis)."""

    chain: ChainState
    kernel_params: Any
    adam: Any
    z_image: jax.Array
    z_kernel: jax.Array
    iteration: jax.Array
    # Per-pixel posterior variance of the latent image as the sampling (EM) phase left it,
    # kept for the uncertainty map through a refinement phase (`deblur`); zeros before.
    posterior_var: jax.Array


class MCEMResult(NamedTuple):
    """Output of `deblur`.

    Attributes:
        image: (H, W, C) posterior mean of the sharp image (batch axis first for a batch).
        kernels: (G, k, k) per-cell kernels, row-major over the grid actually used.
        uncertainty: (H, W, C) posterior standard deviation across the samples.
        grid: (gh, gw) the filter-flow grid actually used (portrait images flip it).
        data_fit: final mean squared residual ``mean (g - B xbar)^2``.
        history: list of (iteration, data fit) pairs at the logged iterations.
    """

    image: np.ndarray
    kernels: np.ndarray
    uncertainty: np.ndarray
    grid: tuple
    data_fit: np.ndarray
    history: list


@dataclasses.dataclass(frozen=True)
class MCEMModel:
    """The static parts of an MCEM run for one image size: networks, geometry, optimisers."""

    image_shape: tuple
    latent_shape: tuple
    geometry: Any
    image_net: unet.DIPImageNet
    kernel_net: unet.KernelNet
    adam: optax.GradientTransformation
    method: MethodHParams
    # (G, k, k) kernels of a non-blind run (`build_model(known_kernels=...)`), else None.
    known_kernels: Optional[np.ndarray] = dataclasses.field(default=None, compare=False)
    # log p(k) of the M-step's kernel prior, (N, k, k) -> (N,), with kernel_prior_weight > 0.
    kernel_log_prob: Optional[Callable] = dataclasses.field(default=None, compare=False)

    @property
    def num_kernels(self) -> int:
        return self.kernel_net.num_kernels

    def sampler(self, key: jax.Array) -> optax.GradientTransformation:
        """The E-step sampler (`psgld` or `sgld`), its noise stream seeded by ``key``.

        Only ``init`` reads ``key``; ``update`` draws from the key in the sampler state.
        """
        return _make_sampler(self.method, key=key)


def _check_image(blurry_shape: tuple, method: MethodHParams) -> None:
    k = method.kernel_size
    if not isinstance(k, int) or k < 3 or k % 2 == 0:
        raise ValueError(f"config.kernel_size must be an odd integer >= 3, got {k!r}; the "
                         "filter flow centres kernels on a pixel (use e.g. 31, not 30)")
    if len(blurry_shape) != 3 or blurry_shape[-1] not in (1, 3):
        raise ValueError(f"blurry image must have shape (H, W, C) with C in {{1, 3}}, got "
                         f"{blurry_shape}; batch as (B, H, W, C) with per-image keys")
    h, w, _ = blurry_shape
    if h < k or w < k:
        raise ValueError(f"image {h}x{w} is smaller than the {k}x{k} kernel; use a smaller "
                         "config.kernel_size or a larger image")
    gh, gw = method.grid
    if gh < 1 or gw < 1 or max(gh, gw) > max(h, w) or min(gh, gw) > min(h, w):
        raise ValueError(f"grid {tuple(method.grid)} has more cells than the {h}x{w} image "
                         "has pixels along a side; use a coarser config.grid")


def _check_known_kernels(kernels: Any, num_kernels: int, k: int) -> np.ndarray:
    kernels = np.asarray(kernels, np.float32)
    if kernels.shape == (k, k):
        kernels = np.broadcast_to(kernels, (num_kernels, k, k))
    if kernels.shape != (num_kernels, k, k):
        raise ValueError(f"known kernels must have shape ({k}, {k}) (one for every cell) or "
                         f"({num_kernels}, {k}, {k}) (one per filter-flow cell, row-major), "
                         f"got {kernels.shape}; config.kernel_size and config.grid set k and "
                         "the cells")
    sums = kernels.sum(axis=(1, 2))
    if not np.all(np.isfinite(kernels)) or np.any(kernels < 0) or np.any(np.abs(sums - 1) > 1e-3):
        raise ValueError("known kernels must be finite, non-negative and sum to 1 each "
                         f"(sums: {np.round(sums, 4).tolist()[:8]}); divide each by its sum")
    return np.ascontiguousarray(kernels)


def build_model(blurry_shape: tuple, config: Any, known_kernels: Any = None) -> MCEMModel:
    """Networks, filter-flow geometry and optimisers for images of ``blurry_shape``.

    Args:
        blurry_shape: (H, W, C) of one observed image.
        config: an MCEM config (`jaxdeblur/configs/mcem.py`), its `MCEMHParams` or
            `MethodHParams` (the only part used).
        known_kernels: optional kernels for a non-blind run, (k, k) for every cell or
            (G, k, k) per cell: the E-step then samples the image posterior for them, the
            M-step is skipped and the kernel network is unused.

    Returns:
        An `MCEMModel`.

    Raises:
        ValueError: for a config with missing or unknown fields, even or too large kernels,
            bad image shapes, too fine grids, or known kernels of the wrong shape or not
            normalised.
    """
    method = _method(config)
    blurry_shape = tuple(int(s) for s in blurry_shape)
    _check_image(blurry_shape, method)
    h, w, c = blurry_shape
    k = method.kernel_size
    latent_shape = (h + k - 1, w + k - 1, c)
    geometry = blur.eff_windows(latent_shape[:2], tuple(method.grid), k)
    gh, gw = (int(g) for g in geometry.grid_size)
    image_net = unet.DIPImageNet(
        features=tuple(method.image_net.features), skip_features=method.image_net.skip_features,
        out_channels=c, norm=method.image_net.norm, num_groups=method.image_net.num_groups)
    kernel_net = unet.KernelNet(
        num_kernels=gh * gw, features=tuple(method.kernel_net.features),
        skip_features=method.kernel_net.skip_features, norm=method.kernel_net.norm,
        num_groups=method.kernel_net.num_groups)
    if known_kernels is not None:
        known_kernels = _check_known_kernels(known_kernels, gh * gw, k)
    log_prob = None
    if method.kernel_prior_weight > 0 and known_kernels is None:
        log_prob = kernel_prior_log_prob(method.kernel_prior, k)
    return MCEMModel(blurry_shape, latent_shape, geometry, image_net, kernel_net,
                     optax.adam(method.m_step_lr), method, known_kernels, log_prob)


@functools.lru_cache(maxsize=4)
def _load_kernel_prior(which: str):
    return flow.load_pretrained(which)


def kernel_prior_log_prob(which: str, kernel_size: int) -> Callable:
    """``log p(k)`` of a UFPNet flow prior over motion kernels, ``(N, k, k) -> (N,)``.

    ``which``: ``"ours"`` (the shipped prior) or an official checkpoint path
    (`flow.load_pretrained`). The flow's variables are loaded once per process and enter
    compiled code as constants. Raises ValueError when the flow's kernels are not
    ``kernel_size`` wide (the shipped prior is over 19x19 kernels).
    """
    try:
        module, variables = _load_kernel_prior(which)
    except (OSError, ValueError) as error:
        raise ValueError(f"config.kernel_prior {which!r} could not be loaded: {error}") from None
    if module.kernel_size != kernel_size:
        raise ValueError(f"the kernel prior {which!r} is over {module.kernel_size}x"
                         f"{module.kernel_size} kernels, the run's are {kernel_size}x"
                         f"{kernel_size}: set config.kernel_size = {module.kernel_size} or "
                         "config.kernel_prior_weight = 0")
    return functools.partial(module.apply, variables, method=type(module).log_prob)


def _crop(latent: jax.Array, k: int) -> jax.Array:
    r = (k - 1) // 2
    return latent[r:latent.shape[0] - r, r:latent.shape[1] - r]


def _reblur(model: MCEMModel, latent: jax.Array, kernels: jax.Array) -> jax.Array:
    out = blur.filter_flow_blur(latent, kernels, model.geometry, method=model.method.blur_method)
    return _crop(out, model.method.kernel_size)


def _kernels(model: MCEMModel, kernel_params: Any, z_kernel: jax.Array, uniform: bool):
    if model.known_kernels is not None:
        return jnp.asarray(model.known_kernels)
    return model.kernel_net.apply(kernel_params, z_kernel, tie_heads=uniform)


def init_state(model: MCEMModel, *, key: jax.Array) -> MCEMState:
    """Initial networks, noise inputs, sampler and Adam states for one image.

    Args:
        model: from `build_model`.
        key: PRNG key (keyword-only); split into noise inputs, two network inits and the
            sampler's noise stream.

    Returns:
        An `MCEMState` at iteration 0.
    """
    cfg = model.method
    keys = jax.random.split(_raw_key(key), 5)
    h, w, _ = model.latent_shape
    k = cfg.kernel_size
    z_image = unet.fixed_noise(keys[0], (h, w, cfg.image_net.input_channels),
                               scale=cfg.image_net.noise_scale)
    z_kernel = unet.fixed_noise(keys[1], (k, k, cfg.kernel_net.input_channels),
                                scale=cfg.kernel_net.noise_scale)
    image_params = model.image_net.init(keys[2], z_image)
    kernel_params = model.kernel_net.init(keys[3], z_kernel)
    chain = ChainState(image_params, model.sampler(keys[4]).init(image_params),
                       welford_init(jnp.zeros(model.latent_shape, jnp.float32)),
                       jnp.zeros((), jnp.int32))
    return MCEMState(chain, kernel_params, model.adam.init(kernel_params), z_image, z_kernel,
                     jnp.zeros((), jnp.int32), jnp.zeros(model.latent_shape, jnp.float32))


def _log_likelihood(model: MCEMModel, latent, kernels, blurry):
    residual = blurry - _reblur(model, latent, kernels)
    return -jnp.sum(residual * residual) / (2.0 * model.method.noise_sigma ** 2)


def _reset_chain(model: MCEMModel, state: MCEMState) -> MCEMState:
    """Starts a new E-step: restarts the burn-in and discounts the moments of earlier ones.

    With ``config.moment_decay = rho`` the sample count and squared deviations are multiplied
    by ``rho``, so the moments become exponentially weighted over EM iterations (weight
    ``rho^j`` for samples of the E-step ``j`` iterations back); ``rho = 0`` keeps only the
    current E-step's samples (plain MCEM).
    """
    rho = jnp.float32(model.method.moment_decay)
    stats = state.chain.stats
    stats = Welford(stats.count * rho, stats.mean, stats.m2 * rho)
    chain = state.chain._replace(stats=stats, step=jnp.zeros((), jnp.int32))
    return state._replace(chain=chain)


def e_step(model: MCEMModel, state: MCEMState, blurry: jax.Array, *, length: int,
           uniform: bool, unroll: bool = False) -> MCEMState:
    """``length`` steps of the E-step chain for fixed kernels (one chunk of the chain).

    ``theta_f <- sampler(theta_f, grad [log p(g | theta_f; theta_K) + log p(theta_f)])``;
    post-burn-in images ``T_f(theta_f, z)`` enter the running moments.

    Args:
        model: from `build_model`.
        state: current `MCEMState` (reset the moments with a new E-step, see `em_iteration`).
        blurry: (H, W, C) observation.
        length: steps in this chunk (static).
        uniform: warm-up mode (one kernel for every cell), static.
        unroll: straight-line steps instead of a ``lax.scan`` (static; see `loop`).

    Returns:
        The updated `MCEMState`.
    """
    cfg = model.method
    kernels = jax.lax.stop_gradient(
        _kernels(model, state.kernel_params, state.z_kernel, uniform))

    def log_posterior(params):
        latent = model.image_net.apply(params, state.z_image)
        prior = sum(jnp.sum(p * p) for p in jax.tree.leaves(params))
        return _log_likelihood(model, latent, kernels, blurry) - 0.5 * cfg.weight_decay * prior

    # The chain's own key seeds the transformation; update draws from the state's key.
    sampler = model.sampler(state.chain.sampler.key)
    chain = langevin_chain(state.chain, jax.grad(log_posterior),
                           lambda p: model.image_net.apply(p, state.z_image), sampler,
                           length=length, burn_in=cfg.e_step_burn_in, unroll=unroll)
    return state._replace(chain=chain)


def kernel_centroid(kernels: jax.Array) -> jax.Array:
    """Centre of mass of each kernel relative to its centre pixel, in pixels.

    Args:
        kernels: (..., k, k) non-negative kernels summing to 1.

    Returns:
        (..., 2) offsets (row, column); zero for a kernel centred on its middle pixel.
    """
    kh, kw = kernels.shape[-2:]
    rows = jnp.arange(kh, dtype=kernels.dtype) - (kh - 1) / 2
    cols = jnp.arange(kw, dtype=kernels.dtype) - (kw - 1) / 2
    mass = jnp.sum(kernels, axis=(-2, -1))
    cy = jnp.sum(kernels * rows[:, None], axis=(-2, -1)) / mass
    cx = jnp.sum(kernels * cols[None, :], axis=(-2, -1)) / mass
    return jnp.stack([cy, cx], axis=-1)


def _q_loss(model: MCEMModel, kernel_params, state: MCEMState, blurry, uniform: bool):
    """Negative Monte Carlo Q divided by the pixel count (a mean squared residual)."""
    kernels = _kernels(model, kernel_params, state.z_kernel, uniform)
    residual = blurry - _reblur(model, state.chain.stats.mean, kernels)
    loss = jnp.mean(residual * residual)
    if model.method.m_step_variance_term:
        var = welford_variance(state.chain.stats)
        loss = loss + jnp.mean(_reblur(model, var, kernels * kernels))
    weight = model.method.kernel_centre_weight
    if weight:
        loss = loss + weight * jnp.mean(jnp.sum(kernel_centroid(kernels) ** 2, axis=-1))
    if model.kernel_log_prob is not None:
        # -log p(K) in the units of the loss: Q's likelihood is sum(residual²) / (2 σ²), the
        # loss its mean over the pixels, so the prior enters scaled by 2 σ² / pixels
        # (kernel_prior_weight = 1: the M-step maximises Q + log p(K), a MAP-EM).
        scale = 2.0 * model.method.noise_sigma ** 2 / blurry.size
        nll = -jnp.sum(model.kernel_log_prob(kernels))
        loss = loss + model.method.kernel_prior_weight * scale * nll
    return loss


def m_step(model: MCEMModel, state: MCEMState, blurry: jax.Array, *, length: int,
           uniform: bool, unroll: bool = False) -> MCEMState:
    """``length`` Adam steps on theta_K maximising the Monte Carlo Q (one chunk).

    Args:
        model: from `build_model`.
        state: `MCEMState` whose moments hold the E-step's samples.
        blurry: (H, W, C) observation.
        length: Adam steps in this chunk (static).
        uniform: warm-up mode (tied kernel heads), static.
        unroll: straight-line steps instead of a ``lax.scan`` (static; see `loop`).

    Returns:
        The updated `MCEMState` (``state`` itself in a non-blind run: the kernels are given).
    """
    if model.known_kernels is not None:
        return state

    def step(carry, _):
        params, opt_state = carry
        grads = jax.grad(lambda p: _q_loss(model, p, state, blurry, uniform))(params)
        updates, opt_state = model.adam.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    params, adam_state = loop(step, (state.kernel_params, state.adam), length, unroll)
    return state._replace(kernel_params=params, adam=adam_state)


def data_fit(model: MCEMModel, state: MCEMState, blurry: jax.Array, *, uniform: bool):
    """Mean squared residual ``mean (g - B_K xbar)^2`` of the current posterior mean."""
    kernels = _kernels(model, state.kernel_params, state.z_kernel, uniform)
    residual = blurry - _reblur(model, state.chain.stats.mean, kernels)
    return jnp.mean(residual * residual)


def em_iteration(model: MCEMModel, state: MCEMState, blurry: jax.Array, *,
                 uniform: bool, unroll: bool = False) -> MCEMState:
    """One MCEM iteration as a single traced function: reset, E-step chain, M-step, count.

    `deblur` jits this (vmapped over the batch) as one call per iteration when the chunk
    sizes are the whole E- and M-steps (the default), else drives `e_step` and `m_step` in
    chunks.

    Args:
        model: from `build_model`.
        state: current `MCEMState`.
        blurry: (H, W, C) observation.
        uniform: warm-up mode (one kernel for every cell), static.
        unroll: straight-line steps instead of ``lax.scan`` (static; see `loop`).

    Returns:
        The `MCEMState` after the iteration.
    """
    cfg = model.method
    state = e_step(model, _reset_chain(model, state), blurry, length=cfg.e_step_steps,
                   uniform=uniform, unroll=unroll)
    state = m_step(model, state, blurry, length=cfg.m_step_steps, uniform=uniform,
                   unroll=unroll)
    return state._replace(iteration=state.iteration + 1)


def resolve_chunk(value: Any, length: int, unroll: bool = False) -> int:
    """Steps per jitted call for a chain of ``length`` steps.

    ``"auto"``: the whole chain in one call as a ``lax.scan``; unrolled (the CPU), the
    largest divisor of ``length`` up to 5, since unrolled compile time grows with the steps
    traced (64²: 5 steps 42 s, 20 steps 160 s). An integer (or a string of digits) must
    divide ``length``.
    """
    if isinstance(value, str) and value.isdigit():
        value = int(value)  # command-line overrides of the string-typed config field
    if value == "auto":
        if not unroll:
            return length
        return max(d for d in range(1, min(length, 5) + 1) if length % d == 0)
    if not isinstance(value, int) or value < 1 or length % value:
        raise ValueError(f"chunk must be 'auto' or a positive divisor of {length}, got {value!r}")
    return value


def resolve_unroll(value: Any, backend: Optional[str] = None) -> bool:
    """Whether the chains are traced step by step (``True``) or as ``lax.scan`` (``False``).

    ``"auto"``: unrolled on the CPU, scanned on GPU and TPU (see `loop`). Also accepts
    ``"unroll"``/``"scan"`` and booleans.
    """
    backend = backend or jax.default_backend()
    if value == "auto":
        return backend == "cpu"
    if value in (True, "unroll", "true", "True"):
        return True
    if value in (False, "scan", "false", "False"):
        return False
    raise ValueError(f"config.loop must be 'auto', 'unroll' or 'scan', got {value!r}")


def snapshot_uncertainty(state: MCEMState) -> MCEMState:
    """Stores the chain's current per-pixel variance as the posterior variance of the result.

    Called when the sampling phase ends; a cold refinement afterwards would otherwise shrink
    the variance to the spread of nearly deterministic iterates.
    """
    return state._replace(posterior_var=welford_variance(state.chain.stats))


def result(model: MCEMModel, state: MCEMState, blurry: jax.Array, *, uniform: bool = False,
           refined: bool = False):
    """Posterior mean image, kernels, per-pixel std and data fit of one image (traceable).

    With ``refined`` (static) the std is that of the sampling phase (``state.posterior_var``).
    """
    k = model.method.kernel_size
    image = _crop(state.chain.stats.mean, k)
    var = state.posterior_var if refined else welford_variance(state.chain.stats)
    std = jnp.sqrt(_crop(var, k))
    kernels = _kernels(model, state.kernel_params, state.z_kernel, uniform)
    if uniform:
        kernels = jnp.broadcast_to(kernels, (model.num_kernels,) + kernels.shape[1:])
    return image, kernels, std, data_fit(model, state, blurry, uniform=uniform)


class _StaticArray:
    """A NumPy array as a static argument of `jax.jit`: hashed and compared by its bytes."""

    def __init__(self, array: np.ndarray):
        self.array = np.ascontiguousarray(array)
        self._id = (self.array.shape, self.array.dtype.str,
                    hashlib.sha1(self.array.tobytes()).hexdigest())

    def __hash__(self) -> int:
        return hash(self._id)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _StaticArray) and self._id == other._id


def _count_iteration(model: MCEMModel, state: MCEMState) -> MCEMState:
    del model
    return state._replace(iteration=state.iteration + 1)


def _snapshot(model: MCEMModel, state: MCEMState) -> MCEMState:
    del model
    return snapshot_uncertainty(state)


def _batched(state: MCEMState, *args, fn: Callable, image_shape: tuple, method: MethodHParams,
             known: Optional[_StaticArray], mesh: Any, options: tuple) -> Any:
    """``fn(model, state, *args, **options)`` over a batch: vmapped, shard_mapped on a mesh.

    Jitted as `_update` and `_evaluate` with every argument after ``args`` static. The model
    is built here from them, so compiled code depends on the hyperparameters only through
    ``method``: jax's jit cache compiles a step once per ``(fn, image_shape, method, known,
    mesh, options)`` and input shapes, and nothing of `RunHParams` can reach it.
    """
    model = build_model(image_shape, method, None if known is None else known.array)
    batched = jax.vmap(functools.partial(fn, model, **dict(options)))
    if mesh is not None:
        # Each device runs the vmapped step on its own slice of the batch. Leaving the
        # split to XLA's SPMD partitioner failed on the filter flow's grouped
        # convolution ("output feature dimension (4) not divisible by
        # feature_group_count (8)"); per-device code has nothing to partition.
        spec = jax.sharding.PartitionSpec("data")
        batched = jax.shard_map(batched, mesh=mesh, in_specs=spec, out_specs=spec)
    return batched(state, *args)


_STATIC_ARGNAMES = ("fn", "image_shape", "method", "known", "mesh", "options")
# Steps that replace the state (donated, argument 0) and steps that only read it.
_update = jax.jit(_batched, static_argnames=_STATIC_ARGNAMES, donate_argnums=0)
_evaluate = jax.jit(_batched, static_argnames=_STATIC_ARGNAMES)


class _Steps:
    """The compiled MCEM steps of one run: image size, hyperparameters, known kernels, mesh.

    Holds no compiled code itself: every step is `_update` or `_evaluate`, so a step is
    compiled once per phase it meets and reused by later runs with an equal `MethodHParams`.
    Phases are ``(uniform, refine)``: the warm-up ties the kernel heads, the refinement
    phase's E-step runs `refine_method`; steps without a sampler use the EM method in
    both phases, so they compile once.
    """

    def __init__(self, image_shape: tuple, hparams: MCEMHParams, known_kernels: Any,
                 mesh: Any):
        method = hparams.method
        self.methods = {False: method, True: refine_method(hparams)}
        self.static = {"image_shape": tuple(image_shape), "mesh": mesh,
                       "known": None if known_kernels is None else _StaticArray(known_kernels)}
        self.unroll = resolve_unroll(method.loop)
        self.e_chunk = resolve_chunk(method.e_step_chunk, method.e_step_steps, self.unroll)
        self.m_chunk = resolve_chunk(method.m_step_chunk, method.m_step_steps, self.unroll)
        self.e_calls = method.e_step_steps // self.e_chunk
        self.m_calls = method.m_step_steps // self.m_chunk

    def _call(self, fn: Callable, state: MCEMState, *args, refine: bool = False,
              donate: bool = True, **options) -> Any:
        step = _update if donate else _evaluate
        return step(state, *args, fn=fn, method=self.methods[refine],
                    options=tuple(sorted(options.items())), **self.static)

    def iteration(self, state: MCEMState, blurry: jax.Array, phase: tuple) -> MCEMState:
        """One EM iteration of ``phase = (uniform, refine)``: one call, or one per chunk."""
        uniform, refine = phase
        if self.e_calls == 1 and self.m_calls == 1:
            return self._call(em_iteration, state, blurry, refine=refine, uniform=uniform,
                              unroll=self.unroll)
        state = self.e_step(state, blurry, phase)
        for _ in range(self.m_calls):
            state = self._call(m_step, state, blurry, uniform=uniform, length=self.m_chunk,
                               unroll=self.unroll)
        return self._call(_count_iteration, state)

    def e_step(self, state: MCEMState, blurry: jax.Array, phase: tuple) -> MCEMState:
        """One whole E-step (new burn-in, then every chunk of the chain)."""
        uniform, refine = phase
        state = self._call(_reset_chain, state)
        for _ in range(self.e_calls):
            state = self._call(e_step, state, blurry, refine=refine, uniform=uniform,
                               length=self.e_chunk, unroll=self.unroll)
        return state

    def snapshot(self, state: MCEMState) -> MCEMState:
        return self._call(_snapshot, state)

    def data_fit(self, state: MCEMState, blurry: jax.Array, phase: tuple) -> jax.Array:
        return self._call(data_fit, state, blurry, donate=False, uniform=phase[0])

    def result(self, state: MCEMState, blurry: jax.Array, phase: tuple) -> tuple:
        return self._call(result, state, blurry, donate=False, uniform=phase[0],
                          refined=phase[1])


def _run(config: Any) -> RunHParams:
    """The `RunHParams` of a config, `MCEMHParams` or `RunHParams`."""
    if isinstance(config, RunHParams):
        return config
    return hparams_from_config(config).run


def total_iterations(config: Any) -> int:
    """EM iterations of a run (config, `MCEMHParams` or `RunHParams`): both phases."""
    run = _run(config)
    return run.em_iterations + run.refine_iterations


def iteration_phase(config: Any, iteration: int) -> tuple[bool, bool]:
    """``(uniform, refine)`` of the 0-based EM iteration ``iteration``.

    ``iteration = total_iterations(config)`` is the final E-step. Warm-up iterations tie the
    kernel heads; the refinement phase keeps the kernel mode the sampling phase ended in.
    ``config``: a config, `MCEMHParams` or `RunHParams`.
    """
    run = _run(config)
    refine = iteration >= run.em_iterations and run.refine_iterations > 0
    uniform = min(iteration, run.em_iterations - 1) < run.warmup_iterations
    return uniform, refine


def _iterate(steps: _Steps, run: RunHParams, blurry: jax.Array, state: MCEMState,
             callback: Optional[Callable[[int, MCEMState, Any], None]]
             ) -> tuple[MCEMState, list]:
    """The EM iterations of ``run`` from ``state.iteration`` on: (state, data-fit history)."""
    history = []
    start = int(np.asarray(state.iteration).reshape(-1)[0])
    total = total_iterations(run)
    for it in range(start, total):
        phase = iteration_phase(run, it)
        if phase[1] and it == run.em_iterations:
            state = steps.snapshot(state)
        state = steps.iteration(state, blurry, phase)
        last = it + 1 == total
        if (it + 1) % run.log_every == 0 or last:
            fit = np.asarray(steps.data_fit(state, blurry, phase))
            if not np.all(np.isfinite(fit)):
                raise DataFitError(
                    f"data fit is {fit.tolist()} at EM iteration {it + 1}: the chain diverged. "
                    "Lower config.step_size or raise config.noise_sigma, and resume from the "
                    "last checkpoint")
            history.append((it + 1, fit.tolist()))
            if callback is not None:
                callback(it + 1, state, fit)
    return state, history


# --------------------------------------------------------------------------------------
# Coarse to fine.
# --------------------------------------------------------------------------------------


def level_kernel_size(kernel_size: int, scale: float) -> int:
    """The odd kernel size (at least 3) of a ``kernel_size`` kernel seen at ``scale``."""
    size = int(round(kernel_size * scale))
    size = size if size % 2 else size + 1
    return max(3, size)


def resize_kernels(kernels: jax.Array, size: int) -> jax.Array:
    """``(G, k, k)`` kernels resampled to ``(G, size, size)`` about their centre pixel
    (linear interpolation, antialiased when shrinking), non-negative and summing to 1."""
    kernels = jnp.asarray(kernels, jnp.float32)
    out = jax.image.resize(kernels, (kernels.shape[0], size, size), "linear", antialias=True)
    out = jnp.maximum(out, 0.0)
    return out / jnp.maximum(out.sum(axis=(1, 2), keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("kernel_net", "steps", "lr"))
def refit_kernel_net(kernel_net: unet.KernelNet, params: Any, z_kernel: jax.Array,
                     target: jax.Array, *, steps: int, lr: float) -> Any:
    """Kernel-network parameters moved by ``steps`` Adam steps (rate ``lr``) until every
    head's kernel matches ``target`` ``(G, k, k)``: minimises the cross-entropy
    ``-Σ target · log T_K(z)`` per head (each head is a softmax over its k² logits, so this
    is convex in the logits and zero-gradient exactly at the target)."""
    adam = optax.adam(lr)

    def loss(p):
        kernels = kernel_net.apply(p, z_kernel)
        return -jnp.sum(target * jnp.log(kernels + 1e-12))

    def step(carry, _):
        p, opt = carry
        updates, opt = adam.update(jax.grad(loss)(p), opt, p)
        return (optax.apply_updates(p, updates), opt), None

    (params, _), _ = jax.lax.scan(step, (params, adam.init(params)), None, length=steps)
    return params


def start_level(model: MCEMModel, coarse: MCEMState, coarse_kernels: jax.Array, *,
                key: jax.Array, refit_steps: int, refit_lr: float) -> MCEMState:
    """The initial state of one image at a finer level, from the coarser level's end.

    A fresh `init_state` for ``model`` (new noise inputs of the finer size, new sampler
    and moments), with the coarse chain's image-network parameters carried (the networks
    are fully convolutional, so they apply at any size) and the kernel network refitted
    (`refit_kernel_net`) to ``coarse_kernels`` upsampled to this level's kernel size
    (`resize_kernels`).
    """
    state = init_state(model, key=key)
    k = model.method.kernel_size
    target = resize_kernels(coarse_kernels, k)
    params = refit_kernel_net(model.kernel_net, state.kernel_params, state.z_kernel, target,
                              steps=refit_steps, lr=refit_lr)
    image_params = coarse.chain.params
    chain = state.chain._replace(params=image_params,
                                 sampler=model.sampler(_raw_key(key)).init(image_params))
    return state._replace(chain=chain, kernel_params=params,
                          adam=model.adam.init(params))


def _coarse_levels(blurry: jax.Array, hparams: MCEMHParams, model: MCEMModel,
                   keys: jax.Array, mesh: Any,
                   level_callback: Optional[Callable[[int, int, int, int], None]]
                   ) -> MCEMState:
    """Runs ``hparams.run.levels`` on the resized ``(B, H, W, C)`` batch, coarsest first,
    each level started from the one below (`start_level`), and returns the (batched)
    initial state of the full-resolution ``model``.

    Level ``(scale, n)``: the image resized by ``scale`` (antialiased), the kernel size
    `level_kernel_size`, the same filter-flow grid, ``n`` EM iterations (warm-up the
    config's, capped at ``n``; no refinement phase, no kernel prior). Image ``b`` of level
    ``l`` draws its noise from ``fold_in(key_b, l + 1)``, so batched and single runs agree.
    """
    run, method = hparams.run, hparams.method
    batch, h, w, c = blurry.shape
    levels = tuple((float(scale), int(n)) for scale, n in run.levels)
    sharding = None
    if mesh is not None:
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    def start(level_model, state, kernels, level_keys):
        return _stack([start_level(level_model, _image(state, b), kernels[b],
                                   key=level_keys[b], refit_steps=run.level_refit_steps,
                                   refit_lr=run.level_refit_lr) for b in range(batch)])

    state = kernels = None
    for index, (scale, iterations) in enumerate(levels):
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        # The kernel prior is over full-size kernels: coarse levels run without it.
        level_method = dataclasses.replace(
            method, kernel_size=level_kernel_size(method.kernel_size, scale),
            kernel_prior_weight=0.0)
        level_run = dataclasses.replace(
            run, em_iterations=iterations, refine_iterations=0, levels=(),
            warmup_iterations=min(run.warmup_iterations, iterations))
        small = jax.image.resize(blurry, (batch, *size, c), "linear", antialias=True)
        level_keys = [jax.random.fold_in(k, index + 1) for k in keys]
        level_model = build_model(small.shape[1:], level_method)
        if state is None:
            state = _stack([init_state(level_model, key=k) for k in level_keys])
        else:
            state = start(level_model, state, kernels, level_keys)
        if sharding is not None:
            small, state = jax.device_put((small, state), sharding)
        steps = _Steps(level_model.image_shape, MCEMHParams(level_method, level_run), None,
                       mesh)
        report = None
        if level_callback is not None:
            report = (lambda it, _s, _f, index=index, n=iterations:
                      level_callback(index, len(levels), it, n))
        state, _ = _iterate(steps, level_run, small, state, report)
        uniform = iteration_phase(level_run, iterations)[0]
        kernels = [np.asarray(_kernels(level_model, _image(state.kernel_params, b),
                                       state.z_kernel[b], uniform)) for b in range(batch)]
    return start(model, state, kernels, keys)


def _stack(states: list) -> Any:
    """One batched pytree from per-image pytrees (leading axis: the image)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def _image(tree: Any, b: int) -> Any:
    """Image ``b`` of a batched pytree."""
    return jax.tree.map(lambda x: x[b], tree)


def deblur(
    blurry: Any,
    config: Any,
    *,
    key: jax.Array,
    mesh: Any = None,
    state: Optional[MCEMState] = None,
    callback: Optional[Callable[[int, MCEMState, Any], None]] = None,
    known_kernels: Any = None,
    level_callback: Optional[Callable[[int, int, int, int], None]] = None,
) -> MCEMResult:
    """Blind deblurring of one image, or a batch of same-size images, by Deep EM.

    With ``config.levels`` (coarse to fine, `_coarse_levels`) and no ``state``, the blurry
    image is first solved at each of those scales and the full-resolution run starts from
    the last of them (image network carried, kernel network refitted to the upsampled
    kernels). Then it runs ``config.em_iterations`` MCEM iterations (the first
    ``config.warmup_iterations`` with one kernel for every cell), then
    ``config.refine_iterations`` cold ones (the E-step
    at ``config.refine_temperature``, see `refine_method`), then a last E-step whose
    post-burn-in samples give the posterior mean; the standard deviation is that of the
    sampling phase. Iterations are counted across both phases (``state.iteration``, the
    callback's ``iteration``), so a run resumes from a checkpoint in either. A batch is
    handled by ``jax.vmap`` of the one-image steps; with a ``mesh`` the batch axis is
    sharded over its ``data`` axis (batch size divisible by the axis size) and the steps
    run under ``jax.jit`` with ``NamedSharding``.

    Args:
        blurry: (H, W, C) or (B, H, W, C) float32 in [0, 1].
        config: an MCEM config (see `jaxdeblur/configs/mcem.py`) or its `MCEMHParams`;
            checked once, here (`hparams_from_config`).
        key: PRNG key (keyword-only): one key, or a (B,) batch of keys for a batch (image b
            with key b gives the same result as a single run with that key).
        mesh: optional `jax.sharding.Mesh` with a ``data`` axis of type ``AxisType.Auto``
            (explicit axes make flax's convolutions raise a ShardingTypeError).
        state: resume from this (batched) `MCEMState` instead of initialising.
        callback: called as ``callback(iteration, state, fit)`` after every
            ``config.log_every`` iterations, ``fit`` a (B,) host array of data fits; use it
            for progress bars and checkpoints.
        known_kernels: non-blind mode: (k, k) for every cell or (G, k, k) per cell, shared
            by the batch. The E-steps sample the image posterior for these kernels (the
            M-step is skipped); the result's kernels are these. Also the ceiling of a blind
            run on synthetic data (the image the sampler reaches with the true kernels).
            ``config.levels`` is not used then.
        level_callback: called as ``level_callback(level, levels, iteration, iterations)``
            after every ``config.log_every`` iterations of a coarse level (``callback``
            sees only the full-resolution run, whose states it may checkpoint: a run
            stopped during the coarse levels starts them again).

    Returns:
        An `MCEMResult` (arrays with a leading batch axis when the input had one).

    Raises:
        ValueError: bad shapes, or a config with a missing, unknown or bad field (see
            `hparams_from_config` and `build_model`).
        DataFitError: the data fit became NaN or infinite (the state before it is kept by
            the caller's last checkpoint).
    """
    hparams = hparams_from_config(config)
    run = hparams.run
    blurry = jnp.asarray(blurry, jnp.float32)
    single = blurry.ndim == 3
    if single:
        blurry = blurry[None]
    if blurry.ndim != 4:
        raise ValueError(f"deblur expects (H, W, C) or (B, H, W, C), got {blurry.shape}")
    if not bool(jnp.all(jnp.isfinite(blurry))):
        raise ValueError("the blurry image contains NaN or infinite values")
    model = build_model(blurry.shape[1:], hparams.method, known_kernels)
    steps = _Steps(model.image_shape, hparams, model.known_kernels, mesh)
    keys = _raw_key(key)
    keys = keys[None] if single else keys
    if keys.shape[0] != blurry.shape[0]:
        raise ValueError(f"need one key per image: got {keys.shape[0]} keys for "
                         f"{blurry.shape[0]} images")
    sharding = None
    if mesh is not None:
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        blurry = jax.device_put(blurry, sharding)
    if state is None and run.levels and known_kernels is None:
        state = _coarse_levels(blurry, hparams, model, keys, mesh, level_callback)
    elif state is None:
        # Eager per-image initialisation: compiling the vmapped initialisers (threefry and
        # every layer's init) took minutes on the CPU; running them op by op takes a second.
        state = _stack([init_state(model, key=k) for k in keys])
    if sharding is not None:
        state = jax.device_put(state, sharding)
    state, history = _iterate(steps, run, blurry, state, callback)
    total = total_iterations(run)
    phase = iteration_phase(run, total)
    state = steps.e_step(state, blurry, phase)
    image, kernels, std, fit = (np.asarray(a) for a in steps.result(state, blurry, phase))
    if not np.all(np.isfinite(fit)):
        raise DataFitError(f"final data fit is {fit.tolist()}: the chain diverged")
    if single:
        image, kernels, std, fit = image[0], kernels[0], std[0], fit[0]
    return MCEMResult(image, kernels, std, tuple(int(g) for g in model.geometry.grid_size), fit,
                      history)
