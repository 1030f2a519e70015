"""The RealNVP motion-kernel prior of UFPNet (stage I) as distrax bijectors.

A flow models flattened ``k x k`` motion kernels in logit space. With ``D = k*k``:

* data side: a kernel ``K`` (k, k), values in [0, 1], is flattened row-major to ``(D,)`` and
  mapped to flow space by ``x = logit(alpha + (1 - 2 alpha) K)`` (`KernelSigmoid`, inverse).
* latent side: ``z ~ N(0, I_D)``.
* between them: ``n_blocks`` blocks of (masked affine coupling, flow batch-norm). In the
  distrax convention used here every bijector's ``forward`` maps latent -> data (the
  sampling direction) and ``inverse`` maps data -> latent (the density direction). The
  official code names these the other way round (its ``forward`` is data -> latent).

Layer ``2i`` of the official ``KernelPrior.net`` is the coupling of block ``i`` and layer
``2i+1`` its batch-norm; data -> latent applies them in the order ``net.0, net.1, ...,
net.9``, so ``Chain([coupling_0, batch_norm_0, ..., batch_norm_4])`` (distrax applies a
chain's last bijector first in ``forward``) reproduces both directions exactly.

``log_prob`` follows the official training objective: the density of the logit-space
vector ``x`` (base log-density of the latent plus the flow log-det), without the Jacobian
of the logit pre-processing. `log_prob_kernel_space` adds that Jacobian and is a density
over kernels in [0, 1]^D.

References:
  Fang et al., "Self-supervised Non-uniform Kernel Estimation with Flow-based Motion Prior
  for Blind Image Deblurring", CVPR 2023, Sec. 3.1.
  Liang et al., "Flow-based Kernel Prior with Application to Blind Super-Resolution" (FKP),
  CVPR 2021, Sec. 3.
  Dinh et al., "Density estimation using Real NVP", ICLR 2017.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable, Mapping

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdeblur import convert

Array = jax.Array

#: Flow batch-norm epsilon (official code).
BATCH_NORM_EPS = 1e-5
#: Running-statistics momentum: weight on the *old* value (official code; the opposite of
#: ``torch.nn.BatchNorm``'s convention).
BATCH_NORM_MOMENTUM = 0.9
#: Dequantisation noise scale of the official kernel prior: ``K + U(0, 1) / 720``.
DEQUANTIZATION_SCALE = 1.0 / 720.0

_ASSETS = pathlib.Path(__file__).resolve().parent / "assets"
PRETRAINED_WEIGHTS = _ASSETS / "flow_prior.npz"


def checkerboard_mask(features: int, block: int) -> Array:
    """The coupling mask of block ``block``: ``arange(D) % 2``, flipped on odd blocks.

    A 1 marks the pass-through (conditioning) half. On the flattened 19 x 19 grid this is a
    checkerboard because 19 is odd.

    Args:
      features: D, the flattened kernel size.
      block: the block index (0-based).

    Returns:
      (D,) float32 of zeros and ones.
    """
    mask = jnp.arange(features) % 2
    if block % 2:
        mask = 1 - mask
    return mask.astype(jnp.float32)


class AffineCoupling(distrax.Bijector):
    """Masked affine coupling (RealNVP) with scale and shift networks of the masked input.

    With mask m (1 = pass through), scale net s and shift net t, both functions of ``m*v``:

    * forward (latent -> data): ``x = m*z + (1-m) * (z * exp(s(m*z)) + t(m*z))``,
      ``log|det dx/dz| = sum_d (1-m)_d s_d``;
    * inverse (data -> latent): ``z = m*x + (1-m) * (x - t(m*x)) * exp(-s(m*x))``,
      ``log|det dz/dx| = -sum_d (1-m)_d s_d``.

    Since ``m*x = m*z`` the conditioner sees the same input in both directions, which makes
    the two maps exact inverses.

    Args:
      mask: (D,) float array of zeros and ones.
      conditioner: maps ``(..., D)`` masked inputs to ``(s, t)``, each ``(..., D)``.
    """

    def __init__(self, mask: Array, conditioner: Callable[[Array], tuple[Array, Array]]):
        super().__init__(event_ndims_in=1)
        self._mask = mask
        self._conditioner = conditioner

    def forward_and_log_det(self, x: Array) -> tuple[Array, Array]:
        masked = self._mask * x
        s, t = self._conditioner(masked)
        y = masked + (1 - self._mask) * (x * jnp.exp(s) + t)
        return y, jnp.sum((1 - self._mask) * s, axis=-1)

    def inverse_and_log_det(self, y: Array) -> tuple[Array, Array]:
        masked = self._mask * y
        s, t = self._conditioner(masked)
        x = masked + (1 - self._mask) * (y - t) * jnp.exp(-s)
        return x, -jnp.sum((1 - self._mask) * s, axis=-1)


class FlowBatchNorm(distrax.Bijector):
    """The flow batch-norm of RealNVP, with its statistics given explicitly.

    With per-feature ``log_gamma``, ``beta`` and statistics ``mean``, ``var`` (eps = 1e-5):

    * inverse (data -> latent): ``z = exp(log_gamma) * (x - mean) / sqrt(var + eps) + beta``,
      ``log|det dz/dx| = sum_d (log_gamma_d - log(var_d + eps) / 2)``, the same for every
      sample;
    * forward (latent -> data): ``x = (z - beta) * exp(-log_gamma) * sqrt(var + eps) + mean``,
      with the negated log-det.

    In training the statistics are the batch mean and the *unbiased* batch variance of the
    data-side input (`batch_statistics`); in evaluation they are the running statistics.
    This bijector never updates anything: `KernelFlow` computes the statistics, passes them
    in and writes the running averages to its ``batch_stats`` collection.

    Args:
      log_gamma, beta, mean, var: (D,) arrays.
      eps: added to ``var`` before the square root.
    """

    def __init__(self, log_gamma: Array, beta: Array, mean: Array, var: Array,
                 eps: float = BATCH_NORM_EPS):
        super().__init__(event_ndims_in=1, is_constant_jacobian=True)
        self._log_gamma = log_gamma
        self._beta = beta
        self._mean = mean
        self._var = var
        self._eps = eps

    def _inverse_log_det(self) -> Array:
        return jnp.sum(self._log_gamma - 0.5 * jnp.log(self._var + self._eps))

    def forward_and_log_det(self, x: Array) -> tuple[Array, Array]:
        y = (x - self._beta) * jnp.exp(-self._log_gamma) * jnp.sqrt(self._var + self._eps)
        y = y + self._mean
        return y, jnp.broadcast_to(-self._inverse_log_det(), x.shape[:-1])

    def inverse_and_log_det(self, y: Array) -> tuple[Array, Array]:
        x = jnp.exp(self._log_gamma) * (y - self._mean) / jnp.sqrt(self._var + self._eps)
        x = x + self._beta
        return x, jnp.broadcast_to(self._inverse_log_det(), y.shape[:-1])


def batch_statistics(x: Array) -> tuple[Array, Array]:
    """Batch mean and unbiased batch variance over the leading axis.

    Args:
      x: (N, D) with N >= 2.

    Returns:
      ``(mean, var)``, each (D,); ``var`` uses the divisor N - 1 as the official code does.
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"train-mode batch statistics need a (N, D) batch with N >= 2, got "
                         f"shape {x.shape}; use train=False for single kernels")
    return jnp.mean(x, axis=0), jnp.var(x, axis=0, ddof=1)


class KernelSigmoid(distrax.Bijector):
    """Flow space <-> kernel values: a sigmoid squeezed away from 0 and 1.

    * forward (flow -> kernel, the official ``post_process``):
      ``k = (sigmoid(x) - alpha) / (1 - 2 alpha)``,
      ``log|det dk/dx| = sum_d [log sigmoid(x_d) + log sigmoid(-x_d)] - D log(1 - 2 alpha)``;
    * inverse (kernel -> flow, the official ``pre_process``):
      ``x = logit(alpha + (1 - 2 alpha) k)``, defined for k in [0, 1].

    Args:
      alpha: the squeeze, 1e-6 in the official prior.
    """

    def __init__(self, alpha: float):
        super().__init__(event_ndims_in=1)
        self._alpha = alpha

    def forward_and_log_det(self, x: Array) -> tuple[Array, Array]:
        k = (jax.nn.sigmoid(x) - self._alpha) / (1 - 2 * self._alpha)
        log_det = jnp.sum(jax.nn.log_sigmoid(x) + jax.nn.log_sigmoid(-x), axis=-1)
        return k, log_det - x.shape[-1] * np.log1p(-2 * self._alpha)

    def inverse_and_log_det(self, y: Array) -> tuple[Array, Array]:
        p = self._alpha + (1 - 2 * self._alpha) * y
        x = jnp.log(p) - jnp.log1p(-p)
        log_det = -jnp.sum(jnp.log(p) + jnp.log1p(-p), axis=-1)
        return x, log_det + y.shape[-1] * np.log1p(-2 * self._alpha)


def dequantize(kernels: Array, *, key: Array, scale: float = DEQUANTIZATION_SCALE) -> Array:
    """Adds the official dequantisation noise ``U(0, 1) * scale`` and clips to [0, 1].

    The clip is ours: the official code can push a delta kernel (value 1) above 1, where
    the logit is NaN.

    Args:
      kernels: any shape, values in [0, 1].
      key: PRNG key.
      scale: noise amplitude, 1/720 in the official prior.

    Returns:
      Same shape and dtype as ``kernels``.
    """
    noise = jax.random.uniform(key, kernels.shape, kernels.dtype) * scale
    return jnp.clip(kernels + noise, 0.0, 1.0)


def _check_kernel_values(kernels: Array) -> None:
    # Only concrete arrays can be checked; under jit a negative entry gives NaN log-probs.
    if isinstance(kernels, jax.core.Tracer):
        return
    values = np.asarray(kernels)
    if values.size and (np.nanmin(values) < 0 or np.nanmax(values) > 1):
        raise ValueError(f"kernel entries must lie in [0, 1] for the logit pre-processing; got "
                         f"min {np.nanmin(values):.3g}, max {np.nanmax(values):.3g}. Clip or "
                         "renormalise the kernels first")


class Conditioner(nn.Module):
    """The coupling MLP: Linear(D->H) - act - [Linear(H->H) - act] * n_hidden - Linear(H->D).

    The last layer is zero-initialised so that a fresh coupling is the identity (the
    official code uses PyTorch's default uniform initialisation for every layer).

    Attributes:
      features: D.
      hidden_size: H (25 in the official prior).
      n_hidden: number of hidden H->H layers (1 in the official prior).
      activation: "tanh" (scale net) or "relu" (shift net).
    """

    features: int
    hidden_size: int
    n_hidden: int
    activation: str

    @nn.compact
    def __call__(self, x: Array) -> Array:
        act = {"tanh": jnp.tanh, "relu": jax.nn.relu}[self.activation]
        for _ in range(self.n_hidden + 1):
            x = act(nn.Dense(self.hidden_size)(x))
        return nn.Dense(self.features, kernel_init=nn.initializers.zeros)(x)


class CouplingNets(nn.Module):
    """The scale (tanh) and shift (ReLU) conditioners of one coupling."""

    features: int
    hidden_size: int
    n_hidden: int

    def setup(self):
        self.s_net = Conditioner(self.features, self.hidden_size, self.n_hidden, "tanh")
        self.t_net = Conditioner(self.features, self.hidden_size, self.n_hidden, "relu")

    def __call__(self, masked: Array) -> tuple[Array, Array]:
        return self.s_net(masked), self.t_net(masked)


class BatchNormVariables(nn.Module):
    """Holds one flow batch-norm's parameters and running statistics.

    ``params``: ``log_gamma``, ``beta`` (init 0). ``batch_stats``: ``mean`` (init 0), ``var``
    (init 1).
    """

    features: int

    def setup(self):
        self.log_gamma = self.param("log_gamma", nn.initializers.zeros, (self.features,))
        self.beta = self.param("beta", nn.initializers.zeros, (self.features,))
        self.mean = self.variable("batch_stats", "mean", jnp.zeros, (self.features,))
        self.var = self.variable("batch_stats", "var", jnp.ones, (self.features,))

    def __call__(self) -> tuple[Array, Array, Array, Array]:
        return self.log_gamma, self.beta, self.mean.value, self.var.value

    def update(self, batch_mean: Array, batch_var: Array) -> None:
        """Running stats <- momentum * running + (1 - momentum) * batch, when mutable.

        The batch statistics are also sown into the ``intermediates`` collection (as
        ``batch_mean`` / ``batch_var``) for inspection when that collection is mutable.
        """
        self.sow("intermediates", "batch_mean", batch_mean)
        self.sow("intermediates", "batch_var", batch_var)
        if self.is_initializing() or not self.is_mutable_collection("batch_stats"):
            return
        m = BATCH_NORM_MOMENTUM
        self.mean.value = m * self.mean.value + (1 - m) * jax.lax.stop_gradient(batch_mean)
        self.var.value = m * self.var.value + (1 - m) * jax.lax.stop_gradient(batch_var)


class KernelFlow(nn.Module):
    """RealNVP prior over ``kernel_size x kernel_size`` kernels (UFPNet / FKP architecture).

    Variables: ``params`` (``coupling_i/{s_net,t_net}/Dense_j/{kernel,bias}``,
    ``batch_norm_i/{log_gamma,beta}``) and ``batch_stats`` (``batch_norm_i/{mean,var}``).
    In train mode the batch-norms use batch statistics and, when ``batch_stats`` is
    mutable, update the running statistics; eval mode uses the running statistics.

    Example::

      flow = KernelFlow()
      variables = flow.init(jax.random.key(0), jnp.full((2, 19, 19), 1 / 361))
      kernels = flow.apply(variables, jax.random.key(1), 8, method="sample")  # (8, 19, 19)

    Attributes:
      kernel_size: k; the flow acts on D = k*k dimensions.
      n_blocks: number of (coupling, batch-norm) blocks.
      hidden_size: conditioner width.
      n_hidden: hidden H->H layers per conditioner.
      alpha: logit squeeze of the pre/post-processing.
    """

    kernel_size: int = 19
    n_blocks: int = 5
    hidden_size: int = 25
    n_hidden: int = 1
    alpha: float = 1e-6

    @property
    def features(self) -> int:
        return self.kernel_size * self.kernel_size

    def setup(self):
        self.couplings = [CouplingNets(self.features, self.hidden_size, self.n_hidden,
                                       name=f"coupling_{i}") for i in range(self.n_blocks)]
        self.batch_norms = [BatchNormVariables(self.features, name=f"batch_norm_{i}")
                            for i in range(self.n_blocks)]

    def __call__(self, kernels: Array, train: bool = False) -> Array:
        return self.log_prob(kernels, train=train)

    # --- shape checks -------------------------------------------------------------------

    def _check_flat(self, x: Array, what: str) -> None:
        if x.ndim != 2 or x.shape[1] != self.features:
            raise ValueError(f"{what} must have shape (N, {self.features}) for kernel_size "
                             f"{self.kernel_size}, got {x.shape}")

    def _flatten_kernels(self, kernels: Array) -> Array:
        k = self.kernel_size
        if kernels.ndim != 3 or kernels.shape[1:] != (k, k):
            raise ValueError(f"kernels must have shape (N, {k}, {k}) for this flow "
                             f"(kernel_size={k}), got {kernels.shape}")
        return kernels.reshape(kernels.shape[0], self.features)

    # --- bijectors ----------------------------------------------------------------------

    def bijector(self) -> distrax.Chain:
        """The eval-mode flow (running statistics) as one distrax chain, latent -> flow."""
        layers = []
        for i in range(self.n_blocks):
            log_gamma, beta, mean, var = self.batch_norms[i]()
            layers += [AffineCoupling(checkerboard_mask(self.features, i), self.couplings[i]),
                       FlowBatchNorm(log_gamma, beta, mean, var)]
        return distrax.Chain(layers)

    def flow_to_latent(self, x: Array, train: bool = False) -> tuple[Array, Array]:
        """Data -> latent in flow (logit) space, the official ``forward``.

        Args:
          x: (N, D) flow-space vectors.
          train: use (and, when ``batch_stats`` is mutable, record) batch statistics.

        Returns:
          ``(u, log_det)``: (N, D) latents and (N,) ``log|det du/dx|``.
        """
        self._check_flat(x, "flow-space x")
        if not train:
            return self.bijector().inverse_and_log_det(x)
        log_det = jnp.zeros(x.shape[:1], x.dtype)
        for i in range(self.n_blocks):
            coupling = AffineCoupling(checkerboard_mask(self.features, i), self.couplings[i])
            x, ld = coupling.inverse_and_log_det(x)
            log_det += ld
            log_gamma, beta, _, _ = self.batch_norms[i]()
            batch_mean, batch_var = batch_statistics(x)
            self.batch_norms[i].update(batch_mean, batch_var)
            x, ld = FlowBatchNorm(log_gamma, beta, batch_mean, batch_var).inverse_and_log_det(x)
            log_det += ld
        return x, log_det

    def latent_to_flow(self, z: Array) -> tuple[Array, Array]:
        """Latent -> flow space in eval mode, the official ``inverse``.

        Args:
          z: (N, D) latents.

        Returns:
          ``(x, log_det)``: (N, D) flow-space vectors and (N,) ``log|det dx/dz|``.
        """
        self._check_flat(z, "latent z")
        return self.bijector().forward_and_log_det(z)

    def flow_log_prob(self, x: Array, train: bool = False) -> Array:
        """Log-density of flow-space vectors, the official ``log_prob(x)[0]``.

        ``log p(x) = sum_d log N(u_d; 0, 1) + log|det du/dx|``.

        Args:
          x: (N, D) flow-space (logit) vectors.
          train: batch statistics instead of running ones (see `flow_to_latent`).

        Returns:
          (N,) log-densities.
        """
        u, log_det = self.flow_to_latent(x, train=train)
        return jnp.sum(jax.scipy.stats.norm.logpdf(u), axis=-1) + log_det

    # --- kernel-space API ---------------------------------------------------------------

    def preprocess(self, kernels: Array, *, key: Array | None = None) -> Array:
        """Kernels -> flow space: optional dequantisation, then the squeezed logit.

        Args:
          kernels: (N, k, k), entries in [0, 1] (checked when concrete).
          key: if given, adds ``U(0, 1) / 720`` dequantisation noise first (training).

        Returns:
          (N, D) flow-space vectors.
        """
        flat = self._flatten_kernels(kernels)
        _check_kernel_values(flat)
        if key is not None:
            flat = dequantize(flat, key=key)
        return KernelSigmoid(self.alpha).inverse(flat)

    def postprocess(self, x: Array) -> Array:
        """Flow space -> kernels ``(sigmoid(x) - alpha) / (1 - 2 alpha)``, not renormalised.

        Args:
          x: (N, D).

        Returns:
          (N, k, k) kernels in [0, 1] (row-major reshape).
        """
        self._check_flat(x, "flow-space x")
        k = KernelSigmoid(self.alpha).forward(x)
        return k.reshape(x.shape[0], self.kernel_size, self.kernel_size)

    def log_prob(self, kernels: Array, train: bool = False, *,
                 key: Array | None = None) -> Array:
        """Log-density of kernels under the prior, in the official (logit-space) convention.

        ``log_prob(K) = flow_log_prob(logit(alpha + (1 - 2 alpha) K))``: the training
        objective of the official prior, without the Jacobian of the logit (see
        `log_prob_kernel_space` for that).

        Entries outside [0, 1] raise ``ValueError`` when ``kernels`` is concrete; under
        ``jax.jit`` they cannot be checked and give NaN.

        Args:
          kernels: (N, k, k) non-negative kernels (sums need not be 1).
          train: batch statistics (N >= 2); call ``apply(..., mutable=["batch_stats"])``
            to also update the running statistics.
          key: optional dequantisation key (training).

        Returns:
          (N,) log-probabilities.
        """
        return self.flow_log_prob(self.preprocess(kernels, key=key), train=train)

    def log_prob_kernel_space(self, kernels: Array) -> Array:
        """Eval-mode log-density over kernels in [0, 1]^D (includes the logit Jacobian).

        Args:
          kernels: (N, k, k).

        Returns:
          (N,) ``log p_K(K) = flow_log_prob(x) + log|det dx/dK|``.
        """
        flat = self._flatten_kernels(kernels)
        _check_kernel_values(flat)
        x, log_det = KernelSigmoid(self.alpha).inverse_and_log_det(flat)
        return self.flow_log_prob(x) + log_det

    def kernel_to_latent(self, kernels: Array) -> Array:
        """Kernels (N, k, k) -> latents (N, D), eval mode, no dequantisation."""
        return self.flow_to_latent(self.preprocess(kernels))[0]

    def latent_to_kernel(self, z: Array) -> Array:
        """Latents (N, D) -> kernels (N, k, k), eval mode, sigmoid post-processed.

        The kernels are *not* renormalised to sum 1 (UFPNet uses them as they are).
        """
        return self.postprocess(self.latent_to_flow(z)[0])

    def sample(self, key: Array, n: int) -> Array:
        """``n`` kernels (n, k, k) from the prior: z ~ N(0, I), then `latent_to_kernel`."""
        z = jax.random.normal(key, (n, self.features))
        return self.latent_to_kernel(z)


# --- functional interface ------------------------------------------------------------------

def flow_from_variables(variables: Mapping[str, Any], *, alpha: float = 1e-6) -> KernelFlow:
    """The `KernelFlow` whose configuration matches the shapes in ``variables``.

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` of a `KernelFlow`.
      alpha: logit squeeze (not recoverable from shapes).

    Returns:
      A `KernelFlow` with kernel_size, n_blocks, hidden_size and n_hidden inferred.
    """
    return KernelFlow(**convert.flow_config_from_variables(variables), alpha=alpha)


def latent_to_kernel_fn(variables: Mapping[str, Any], z: Array, *,
                        alpha: float = 1e-6) -> Array:
    """Pure-function form of `KernelFlow.latent_to_kernel`: (N, D) latents -> (N, k, k)."""
    return flow_from_variables(variables, alpha=alpha).apply(
        variables, z, method=KernelFlow.latent_to_kernel)


def kernel_to_latent_fn(variables: Mapping[str, Any], kernels: Array, *,
                        alpha: float = 1e-6) -> Array:
    """Pure-function form of `KernelFlow.kernel_to_latent`: (N, k, k) -> (N, D)."""
    return flow_from_variables(variables, alpha=alpha).apply(
        variables, kernels, method=KernelFlow.kernel_to_latent)


def log_prob_fn(variables: Mapping[str, Any], kernels: Array, *,
                alpha: float = 1e-6) -> Array:
    """Pure-function form of eval-mode `KernelFlow.log_prob`: (N, k, k) -> (N,)."""
    return flow_from_variables(variables, alpha=alpha).apply(
        variables, kernels, method=KernelFlow.log_prob)


def sample_fn(variables: Mapping[str, Any], key: Array, n: int, *,
              alpha: float = 1e-6) -> Array:
    """Pure-function form of `KernelFlow.sample`: ``n`` kernels (n, k, k)."""
    return flow_from_variables(variables, alpha=alpha).apply(
        variables, key, n, method=KernelFlow.sample)


def save_flow(path: str | pathlib.Path, module: KernelFlow, variables: Mapping[str, Any],
              **info: Any) -> None:
    """Writes ``variables`` to ``<path>.npz`` and the module config to ``<path>.json``.

    This is the format of the shipped prior (``jaxdeblur/assets/flow_prior.*``) and of the
    exports of `jaxdeblur.train.flow_prior`; `load_flow` reads it back.

    Args:
      path: the file path without suffix (a suffix is replaced).
      module: the `KernelFlow` the variables belong to.
      variables: ``{"params": ..., "batch_stats": ...}``.
      **info: JSON-serialisable extras stored beside the config (step, NLL, command, ...).
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = convert.flatten_variables(jax.device_get(dict(variables)))
    np.savez(path.with_suffix(".npz"), **{k: v.astype(np.float32) for k, v in flat.items()})
    config = {"model": {"kernel_size": module.kernel_size, "n_blocks": module.n_blocks,
                        "hidden_size": module.hidden_size, "n_hidden": module.n_hidden,
                        "alpha": module.alpha}, **info}
    path.with_suffix(".json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_flow(path: str | pathlib.Path) -> tuple[KernelFlow, dict]:
    """Reads a flow written by `save_flow` as ``(module, variables)``."""
    path = pathlib.Path(path)
    config = json.loads(path.with_suffix(".json").read_text())
    variables = convert.unflatten_variables(convert.load_state_dict(path.with_suffix(".npz")))
    module = KernelFlow(**config["model"])
    expected = jax.eval_shape(module.init, jax.random.key(0),
                              jnp.zeros((2, module.kernel_size, module.kernel_size)))
    if jax.tree.structure(expected) != jax.tree.structure(variables) or any(
            a.shape != b.shape for a, b in zip(jax.tree.leaves(expected),
                                               jax.tree.leaves(variables))):
        raise ValueError(f"{path.with_suffix('.npz')} does not match the config in "
                         f"{path.with_suffix('.json')} (checkpoint from another config)")
    return module, jax.tree.map(jnp.asarray, variables)


def load_pretrained(which: str = "ours") -> tuple[KernelFlow, dict]:
    """A pretrained motion-kernel prior as ``(module, variables)``.

    Args:
      which: ``"ours"`` for the prior trained by `jaxdeblur.train.flow_prior` and shipped
        in ``jaxdeblur/assets``, or a path to an official checkpoint: a ``.npz`` with
        ``param/<torch name>`` (or plain torch-name) keys such as the parity fixture
        ``flow_motion.npz``, or a ``.pt``/``.pth`` file (needs torch).

    Returns:
      ``(KernelFlow, {"params": ..., "batch_stats": ...})`` with float32 arrays.
    """
    if which == "ours":
        if not PRETRAINED_WEIGHTS.exists():
            raise FileNotFoundError(f"the shipped prior {PRETRAINED_WEIGHTS} is missing; "
                                    "reinstall jaxdeblur or pass an official checkpoint path")
        return load_flow(PRETRAINED_WEIGHTS)
    state_dict = convert.load_state_dict(which)
    variables = convert.flow_variables_from_state_dict(state_dict)
    module = flow_from_variables(variables, alpha=convert.flow_alpha(state_dict))
    return module, jax.tree.map(jnp.asarray, variables)
