"""Official PyTorch weights -> Flax variables.

Layout conventions of the official checkpoints: ``Linear`` weights are ``[out, in]``
(Flax ``Dense`` kernels are ``[in, out]``), ``Conv2d`` weights ``[out, in, kh, kw]``
(Flax ``[kh, kw, in, out]``). State dicts are read by `load_state_dict` from ``.npz`` files
(keys ``param/<torch name>`` as in ``shared/fixtures``, or plain torch names) or, when torch
is installed, from ``.pt``/``.pth`` files. Converters are strict: a missing or unexpected
key or a shape mismatch raises ``ValueError`` listing them, because a partly loaded
checkpoint silently computes something else.

This module is the leaf of the package's weight I/O: it imports numpy (and torch, only to
read ``.pt`` files) and no other jaxdeblur module, so that the models (`jaxdeblur.flow`,
`jaxdeblur.nets.ufpnet`) can read and write their weights through it. Building a module
from a checkpoint is one level up (`jaxdeblur.flow.load_pretrained`,
`jaxdeblur.train.ufpnet.load_checkpoint`).
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

_WRAPPER_KEYS = ("model_state", "state_dict", "params")


# --- reading state dicts -------------------------------------------------------------------

def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a state dict as ``{name: numpy array}``.

    * ``.npz``: if any key starts with ``param/``, those keys with the prefix stripped (the
      ``in/``, ``out/`` and ``meta/`` entries of a parity fixture are ignored); otherwise
      every key as it is.
    * ``.pt`` / ``.pth`` (needs torch): a state dict, or a dict wrapping one under
      ``model_state``, ``state_dict`` or ``params`` (training checkpoints).

    Args:
      path: the file.

    Returns:
      A dict from names to numpy arrays.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            names = list(data.files)
            if any(n.startswith("param/") for n in names):
                return {n[len("param/"):]: np.asarray(data[n]) for n in names
                        if n.startswith("param/")}
            return {n: np.asarray(data[n]) for n in names}
    if path.endswith((".pt", ".pth")):
        try:
            import torch  # optional: only needed for .pt files
        except ImportError as e:
            raise ImportError(f"reading {path} needs torch (pip install 'jaxdeblur[bench]'); "
                              "or convert it to .npz first") from e
        obj = torch.load(path, map_location="cpu", weights_only=False)
        while isinstance(obj, Mapping):
            wrapped = [k for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)]
            if not wrapped:
                break
            obj = obj[wrapped[0]]
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
        return {k: v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
                for k, v in obj.items()}
    raise ValueError(f"unknown checkpoint format {path!r}: expected .npz, .pt or .pth")


def flatten_variables(variables: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """A nested variables dict -> ``{"params/a/b": array}`` (for saving as ``.npz``)."""
    flat = {}
    for name, value in variables.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            flat.update(flatten_variables(value, key + "/"))
        else:
            flat[key] = np.asarray(value)
    return flat


def unflatten_variables(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Inverse of `flatten_variables`."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = np.asarray(value)
    return tree


def _check_keys(state_dict: Mapping[str, np.ndarray], expected: Mapping[str, tuple],
                what: str) -> None:
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(f"{k}: checkpoint {tuple(np.shape(state_dict[k]))}, expected "
                        f"{expected[k]}" for k in set(expected) & set(state_dict)
                        if tuple(np.shape(state_dict[k])) != tuple(expected[k]))
    if missing or unexpected or mismatched:
        lines = [f"checkpoint from another config: it does not match {what}."]
        if missing:
            lines.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if mismatched:
            lines.append(f"shape mismatches ({len(mismatched)}): {mismatched}")
        raise ValueError("\n".join(lines))


# --- the flow prior (official KernelPrior / FKP RealNVP) -----------------------------------

_FLOW_BUFFERS = ("kernel_size", "alpha", "normalization", "base_dist_mean", "base_dist_var")


def flow_config_from_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Infers ``kernel_size, n_blocks, hidden_size, n_hidden`` from official key shapes."""
    layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"net\.(\d+)\.", k))}
    if "net.0.s_net.0.weight" not in state_dict:
        raise ValueError("not a flow checkpoint: no 'net.0.s_net.0.weight' key (keys start "
                         f"with {sorted(state_dict)[:5]})")
    hidden, features = state_dict["net.0.s_net.0.weight"].shape
    kernel_size = int(round(np.sqrt(features)))
    n_linear = len({k for k in state_dict if re.match(r"net\.0\.s_net\.\d+\.weight$", k)})
    return {"kernel_size": kernel_size, "n_blocks": (max(layers) + 1) // 2,
            "hidden_size": int(hidden), "n_hidden": n_linear - 2}


def flow_alpha(state_dict: Mapping[str, np.ndarray], default: float = 1e-6) -> float:
    """The checkpoint's ``alpha`` buffer as a Python float (``default`` when absent)."""
    return float(np.asarray(state_dict["alpha"]).reshape(-1)[0]) if "alpha" in state_dict \
        else default


def _expected_flow_shapes(kernel_size: int, n_blocks: int, hidden_size: int,
                          n_hidden: int) -> dict[str, tuple]:
    d, h = kernel_size * kernel_size, hidden_size
    shapes: dict[str, tuple] = {"kernel_size": (1,), "alpha": (1,), "normalization": (1,),
                                "base_dist_mean": (d,), "base_dist_var": (d,)}
    for i in range(n_blocks):
        c, b = f"net.{2 * i}", f"net.{2 * i + 1}"
        shapes[f"{c}.mask"] = (d,)
        for net in ("s_net", "t_net"):
            dims = [d] + [h] * (n_hidden + 1) + [d]
            for j in range(n_hidden + 2):
                shapes[f"{c}.{net}.{2 * j}.weight"] = (dims[j + 1], dims[j])
                shapes[f"{c}.{net}.{2 * j}.bias"] = (dims[j + 1],)
        for name in ("log_gamma", "beta", "running_mean", "running_var"):
            shapes[f"{b}.{name}"] = (d,)
    return shapes


def coupling_mask(features: int, block: int) -> np.ndarray:
    """The ``net.{2i}.mask`` buffer of the official ``KernelPrior``: ``arange(D) % 2``,
    flipped on odd blocks (1 = pass-through half).

    `jaxdeblur.flow.checkerboard_mask` builds the same mask for our couplings
    (``tests/test_convert.py`` checks that they agree).
    """
    mask = np.arange(features) % 2
    if block % 2:
        mask = 1 - mask
    return mask.astype(np.float32)


def flow_config_from_variables(variables: Mapping[str, Any]) -> dict[str, int]:
    """``kernel_size, n_blocks, hidden_size, n_hidden`` of `KernelFlow` variables' shapes.

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` of a `jaxdeblur.flow.KernelFlow`.

    Raises:
      ValueError: no couplings, or a flattened size that is not a square kernel.
    """
    params = variables["params"]
    n_blocks = sum(1 for name in params if name.startswith("coupling_"))
    if n_blocks == 0:
        raise ValueError(f"no coupling_* entries in variables['params'] (keys: "
                         f"{sorted(params)}); are these KernelFlow variables?")
    s_net = params["coupling_0"]["s_net"]
    features, hidden = np.shape(s_net["Dense_0"]["kernel"])
    kernel_size = int(round(np.sqrt(features)))
    if kernel_size * kernel_size != features:
        raise ValueError(f"flow input size {features} is not a square kernel")
    return {"kernel_size": kernel_size, "n_blocks": n_blocks, "hidden_size": int(hidden),
            "n_hidden": len(s_net) - 2}


def select_prefix(state_dict: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The entries whose names start with ``prefix``, with the prefix removed.

    For example ``select_prefix(ufpnet_state_dict, "flow.")`` is the flow prior embedded in
    a UFPNet checkpoint.
    """
    selected = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not selected:
        raise ValueError(f"no state-dict entries start with {prefix!r} (first keys: "
                         f"{sorted(state_dict)[:5]})")
    return selected


def flow_variables_from_state_dict(state_dict: Mapping[str, np.ndarray], *,
                                   kernel_size: int | None = None,
                                   n_blocks: int | None = None,
                                   hidden_size: int | None = None,
                                   n_hidden: int | None = None,
                                   prefix: str = "") -> dict[str, Any]:
    """Official ``KernelPrior`` state dict -> `jaxdeblur.flow.KernelFlow` variables.

    Mapping (i = block, j = layer of the MLP):

    * ``net.{2i}.{s,t}_net.{2j}.weight`` [out, in] -> ``params/coupling_i/{s,t}_net/Dense_j/
      kernel`` [in, out]; ``.bias`` -> ``bias``;
    * ``net.{2i+1}.log_gamma``, ``.beta`` -> ``params/batch_norm_i/...``;
    * ``net.{2i+1}.running_mean``, ``.running_var`` -> ``batch_stats/batch_norm_i/mean``,
      ``var``;
    * ``net.{2i}.mask`` must equal `coupling_mask` (our masks are fixed by the
      architecture); ``kernel_size``, ``normalization`` = 1, ``base_dist_mean`` = 0
      and ``base_dist_var`` = 1 are checked; ``alpha`` is read by `flow_alpha`.

    Args:
      state_dict: ``{torch name: array}`` (see `load_state_dict`).
      kernel_size, n_blocks, hidden_size, n_hidden: the expected configuration; each one
        left as None is inferred from the checkpoint.
      prefix: take only the keys starting with it, stripped (``"flow."`` for the prior
        inside a UFPNet checkpoint); other keys are then ignored.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` with float32 numpy arrays.

    Raises:
      ValueError: missing/unexpected keys, shape mismatches ("checkpoint from another
        config"), or buffers the flow does not model (masks, normalisation, base).
    """
    if prefix:
        state_dict = select_prefix(state_dict, prefix)
    inferred = flow_config_from_state_dict(state_dict)
    config = {"kernel_size": kernel_size, "n_blocks": n_blocks, "hidden_size": hidden_size,
              "n_hidden": n_hidden}
    config = {k: inferred[k] if v is None else v for k, v in config.items()}
    _check_keys(state_dict, _expected_flow_shapes(**config), f"KernelFlow({config})")
    sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
    d = config["kernel_size"] ** 2
    problems = []
    if int(sd["kernel_size"][0]) != config["kernel_size"]:
        problems.append(f"kernel_size buffer {sd['kernel_size'][0]} != {config['kernel_size']}")
    if sd["normalization"][0] != 1:
        problems.append(f"normalization buffer {sd['normalization'][0]} != 1")
    if np.any(sd["base_dist_mean"] != 0) or np.any(sd["base_dist_var"] != 1):
        problems.append("base distribution is not N(0, I)")
    params: dict[str, Any] = {}
    batch_stats: dict[str, Any] = {}
    for i in range(config["n_blocks"]):
        c, b = f"net.{2 * i}", f"net.{2 * i + 1}"
        if not np.array_equal(sd[f"{c}.mask"], coupling_mask(d, i)):
            problems.append(f"{c}.mask is not arange(D) % 2 (flipped on odd blocks)")
        coupling = {}
        for net in ("s_net", "t_net"):
            coupling[net] = {
                f"Dense_{j}": {"kernel": sd[f"{c}.{net}.{2 * j}.weight"].T.copy(),
                               "bias": sd[f"{c}.{net}.{2 * j}.bias"]}
                for j in range(config["n_hidden"] + 2)}
        params[f"coupling_{i}"] = coupling
        params[f"batch_norm_{i}"] = {"log_gamma": sd[f"{b}.log_gamma"],
                                     "beta": sd[f"{b}.beta"]}
        batch_stats[f"batch_norm_{i}"] = {"mean": sd[f"{b}.running_mean"],
                                          "var": sd[f"{b}.running_var"]}
    if problems:
        raise ValueError("flow checkpoint not representable by KernelFlow: "
                         + "; ".join(problems))
    return {"params": params, "batch_stats": batch_stats}


def flow_state_dict_from_variables(variables: Mapping[str, Any], *,
                                   alpha: float = 1e-6) -> dict[str, np.ndarray]:
    """Inverse of `flow_variables_from_state_dict`: KernelFlow variables -> official names.

    Used to run our weights in the official PyTorch architecture (benchmarks) and to ship
    them to PyTorch users.
    """
    config = flow_config_from_variables(variables)
    d = config["kernel_size"] ** 2
    sd = {"kernel_size": np.array([config["kernel_size"]], np.float32),
          "alpha": np.array([alpha], np.float32),
          "normalization": np.ones(1, np.float32),
          "base_dist_mean": np.zeros(d, np.float32), "base_dist_var": np.ones(d, np.float32)}
    params, stats = variables["params"], variables["batch_stats"]
    for i in range(config["n_blocks"]):
        c, b = f"net.{2 * i}", f"net.{2 * i + 1}"
        sd[f"{c}.mask"] = coupling_mask(d, i)
        for net in ("s_net", "t_net"):
            for j in range(config["n_hidden"] + 2):
                layer = params[f"coupling_{i}"][net][f"Dense_{j}"]
                sd[f"{c}.{net}.{2 * j}.weight"] = np.asarray(layer["kernel"], np.float32).T.copy()
                sd[f"{c}.{net}.{2 * j}.bias"] = np.asarray(layer["bias"], np.float32)
        sd[f"{b}.log_gamma"] = np.asarray(params[f"batch_norm_{i}"]["log_gamma"], np.float32)
        sd[f"{b}.beta"] = np.asarray(params[f"batch_norm_{i}"]["beta"], np.float32)
        sd[f"{b}.running_mean"] = np.asarray(stats[f"batch_norm_{i}"]["mean"], np.float32)
        sd[f"{b}.running_var"] = np.asarray(stats[f"batch_norm_{i}"]["var"], np.float32)
    return sd


# --- UFPNet (official UFPNet_code_uncertainty: KE-Net, flow, kernel-attention NAFNet) ------

def _ufpnet_level_blocks(state_dict: Mapping[str, np.ndarray], prefix: str) -> list[int]:
    """Blocks per level from keys ``<prefix>.<level>.<block>.conv1.weight``."""
    counts: dict[int, int] = {}
    for k in state_dict:
        if m := re.match(rf"{prefix}\.(\d+)\.(\d+)\.conv1\.weight$", k):
            level, block = int(m.group(1)), int(m.group(2))
            counts[level] = max(counts.get(level, 0), block + 1)
    return [counts[i] for i in range(len(counts))]


def ufpnet_config_from_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Infers the `jaxdeblur.nets.ufpnet.UFPNet` fields from official key shapes.

    Returns:
      ``{"img_channel", "width", "enc_blk_nums", "middle_blk_num", "dec_blk_nums",
      "kernel_size"}``.
    """
    if "intro.weight" not in state_dict or "kernel_extra.Conv_tail.mean.2.weight" not in \
            state_dict:
        raise ValueError("not a UFPNet checkpoint: no 'intro.weight' / 'kernel_extra.Conv_tail"
                         f".mean.2.weight' key (keys start with {sorted(state_dict)[:5]})")
    width, img_channel = np.shape(state_dict["intro.weight"])[:2]
    k2 = np.shape(state_dict["kernel_extra.Conv_tail.mean.2.weight"])[0]
    middle = {int(m.group(1)) for k in state_dict
              if (m := re.match(r"middle_blks\.(\d+)\.conv1\.weight$", k))}
    return {"img_channel": int(img_channel), "width": int(width),
            "enc_blk_nums": tuple(_ufpnet_level_blocks(state_dict, "encoders")),
            "middle_blk_num": len(middle),
            "dec_blk_nums": tuple(_ufpnet_level_blocks(state_dict, "decoders")),
            "kernel_size": int(round(np.sqrt(k2)))}


def _conv(w: np.ndarray) -> np.ndarray:
    """torch Conv2d [out, in/groups, kh, kw] -> flax HWIO [kh, kw, in/groups, out]."""
    return np.transpose(w, (2, 3, 1, 0))


def _conv_transpose(w: np.ndarray) -> np.ndarray:
    """torch ConvTranspose2d [in, out, kh, kw] -> our ``ConvTranspose2d`` [kh, kw, in, out].

    Not flipped here: `jaxdeblur.nets.ufpnet.ConvTranspose2d` flips it when it applies it.
    """
    return np.transpose(w, (2, 3, 0, 1))


def _ufpnet_name_map(config: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
    """torch name -> (flax ``params`` path, layout transform) for every backbone/KE-Net key."""
    ident = np.asarray
    names: dict[str, tuple[str, Any]] = {}

    def conv_pair(torch_name, flax_name, bias=True, transform=_conv):
        names[f"{torch_name}.weight"] = (f"{flax_name}/kernel", transform)
        if bias:
            names[f"{torch_name}.bias"] = (f"{flax_name}/bias", ident)

    ke = "kernel_extra"
    for i in (1, 2):
        for block, ours in ((f"{ke}.Encoding_Block{i}", f"{ke}/enc{i}"),
                            (f"{ke}.Decoding_Block{i}", f"{ke}/dec{i}")):
            conv_pair(f"{block}.Conv_head", f"{ours}/conv_head")
            for r in (1, 2):
                conv_pair(f"{block}.ResBlock{r}.body.1", f"{ours}/res{r}/conv1")
                conv_pair(f"{block}.ResBlock{r}.body.3", f"{ours}/res{r}/conv2")
        conv_pair(f"{ke}.Encoding_Block{i}.downsample", f"{ke}/enc{i}/downsample")
        conv_pair(f"{ke}.Decoding_Block{i}.Conv_t", f"{ke}/dec{i}/conv_t",
                  transform=_conv_transpose)
    for j in range(5):
        conv_pair(f"{ke}.Conv_mid.body.{2 * j}", f"{ke}/mid{j}")
    for tail in ("mean", "var"):
        conv_pair(f"{ke}.Conv_tail.{tail}.0", f"{ke}/{tail}1")
        conv_pair(f"{ke}.Conv_tail.{tail}.2", f"{ke}/{tail}2")

    def naf_block(torch_name, flax_name, kernel_attention):
        for scale in ("beta", "gamma"):
            names[f"{torch_name}.{scale}"] = (f"{flax_name}/{scale}", lambda v: v.reshape(-1))
        for c in ("conv1", "conv2", "conv3", "conv4", "conv5"):
            conv_pair(f"{torch_name}.{c}", f"{flax_name}/{c}")
        conv_pair(f"{torch_name}.sca.1", f"{flax_name}/sca")
        for n in ("norm1", "norm2"):
            names[f"{torch_name}.{n}.weight"] = (f"{flax_name}/{n}/scale", ident)
            names[f"{torch_name}.{n}.bias"] = (f"{flax_name}/{n}/bias", ident)
        if kernel_attention:
            att_t, att_f = f"{torch_name}.kernel_atttion", f"{flax_name}/kernel_atttion"
            conv_pair(f"{att_t}.conv_1.0", f"{att_f}/conv_1")
            conv_pair(f"{att_t}.conv_kernel.0", f"{att_f}/conv_kernel1")
            conv_pair(f"{att_t}.conv_kernel.2", f"{att_f}/conv_kernel2")
            conv_pair(f"{att_t}.conv_2.0", f"{att_f}/conv_2")

    conv_pair("intro", "intro")
    conv_pair("ending", "ending")
    for level, num in enumerate(config["enc_blk_nums"]):
        for b in range(num):
            naf_block(f"encoders.{level}.{b}", f"encoders_{level}_{b}", num == 1)
        conv_pair(f"downs.{level}", f"downs_{level}")
        if num == 1:
            conv_pair(f"kernel_down.{level}", f"kernel_down_{level}")
    for b in range(config["middle_blk_num"]):
        naf_block(f"middle_blks.{b}", f"middle_blks_{b}", False)
    for level, num in enumerate(config["dec_blk_nums"]):
        conv_pair(f"ups.{level}.0", f"ups_{level}", bias=False)
        for b in range(num):
            naf_block(f"decoders.{level}.{b}", f"decoders_{level}_{b}", False)
    return names


def _unused_kernel_down_keys(config: Mapping[str, Any]) -> list[str]:
    """The official model builds ``kernel_down.l`` at every level but uses it only at
    kernel-attention levels (one block); the others are in its state dict, never applied."""
    return [f"kernel_down.{level}.{p}" for level, num in enumerate(config["enc_blk_nums"])
            if num != 1 for p in ("weight", "bias")]


def ufpnet_variables_from_state_dict(state_dict: Mapping[str, np.ndarray], *,
                                     config: Mapping[str, Any] | None = None
                                     ) -> dict[str, Any]:
    """Official ``UFPNet_code_uncertainty`` state dict -> `jaxdeblur.nets.ufpnet.UFPNet` variables.

    Mapping (torch -> flax ``params``; conv weights [out, in/groups, kh, kw] -> HWIO, so a
    depthwise [C, 1, 3, 3] becomes [3, 3, 1, C] with ``feature_group_count = C``):

    * ``kernel_extra.Encoding_Block{i}.{Conv_head, ResBlock{r}.body.{1,3}, downsample}`` ->
      ``kernel_extra/enc{i}/{conv_head, res{r}/conv{1,2}, downsample}``; ``Decoding_Block{i}``
      likewise -> ``dec{i}``, with ``Conv_t`` (ConvTranspose2d [in, out, kh, kw]) ->
      ``dec{i}/conv_t/kernel`` [kh, kw, in, out] (flipped at apply time);
      ``Conv_mid.body.{0,2,4,6,8}`` -> ``mid{0..4}``; ``Conv_tail.{mean,var}.{0,2}`` ->
      ``{mean,var}{1,2}``;
    * ``flow.*`` -> ``params/flow`` and ``batch_stats/flow`` via
      `flow_variables_from_state_dict`;
    * ``encoders.{l}.{b}``, ``middle_blks.{b}``, ``decoders.{l}.{b}`` -> ``encoders_{l}_{b}``,
      ``middle_blks_{b}``, ``decoders_{l}_{b}``: ``beta``/``gamma`` (1, C, 1, 1) -> (C,),
      ``norm{1,2}.weight`` -> ``norm{1,2}/scale``, ``sca.1`` -> ``sca``, and the kernel
      attention ``kernel_atttion.{conv_1.0, conv_kernel.0, conv_kernel.2, conv_2.0}`` (the
      official typo kept) -> ``kernel_atttion/{conv_1, conv_kernel1, conv_kernel2, conv_2}``;
    * ``downs.{l}``, ``kernel_down.{l}``, ``ups.{l}.0`` (no bias), ``intro``, ``ending``
      -> ``downs_{l}``, ``kernel_down_{l}``, ``ups_{l}``, ``intro``, ``ending``.
      ``kernel_down.{l}`` of a level with several blocks is never used by the official
      forward: it is accepted and dropped.

    Args:
      state_dict: ``{torch name: array}`` (see `load_state_dict`; official ``.pth`` files
        wrap it under ``params``).
      config: the expected `UFPNet` fields (``width``, ``enc_blk_nums``, ...); when given, a
        checkpoint of another configuration raises ``ValueError`` naming both. Inferred from
        the checkpoint when None.

    Returns:
      ``{"params": ..., "batch_stats": {"flow": ...}}`` with float32 numpy arrays.

    Raises:
      ValueError: another configuration, missing/unexpected keys or shape mismatches.
    """
    inferred = ufpnet_config_from_state_dict(state_dict)
    if config is not None:
        wanted = {k: tuple(v) if isinstance(v, (list, tuple)) else v
                  for k, v in config.items() if k in inferred}
        diff = {k: (inferred[k], v) for k, v in wanted.items() if inferred[k] != v}
        if diff:
            raise ValueError("checkpoint from another config: " + ", ".join(
                f"{k} is {got} in the checkpoint but {want} in the config"
                for k, (got, want) in diff.items()))
    config = inferred
    names = _ufpnet_name_map(config)
    flow_sd = {k[len("flow."):]: v for k, v in state_dict.items() if k.startswith("flow.")}
    rest = {k: v for k, v in state_dict.items() if not k.startswith("flow.")}
    expected = _ufpnet_torch_shapes(config)
    k2 = config["kernel_size"] ** 2
    for key in _unused_kernel_down_keys(config):
        if key in rest:
            expected[key] = (k2, k2, 2, 2) if key.endswith("weight") else (k2,)
    _check_keys(rest, expected, f"UFPNet({config})")
    params: dict[str, Any] = {}
    for torch_name, (path, transform) in names.items():
        node = params
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = np.ascontiguousarray(transform(np.asarray(rest[torch_name], np.float32)))
    flow = flow_variables_from_state_dict(flow_sd, kernel_size=config["kernel_size"])
    params["flow"] = flow["params"]
    return {"params": params, "batch_stats": {"flow": flow["batch_stats"]}}


def _ufpnet_torch_shapes(config: Mapping[str, Any]) -> dict[str, tuple]:
    """Official state-dict shapes (without ``flow.*``) of a UFPNet configuration."""
    k2 = config["kernel_size"] ** 2
    c3 = config["img_channel"]
    shapes: dict[str, tuple] = {}

    def conv(name, cout, cin, k, bias=True):
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        if bias:
            shapes[f"{name}.bias"] = (cout,)

    ke = "kernel_extra"
    for i, (cin, c) in enumerate(((c3, 64), (64, 128)), start=1):
        conv(f"{ke}.Encoding_Block{i}.Conv_head", c, cin, 3)
        conv(f"{ke}.Encoding_Block{i}.downsample", c, c, 3)
        for r in (1, 2):
            for j in (1, 3):
                conv(f"{ke}.Encoding_Block{i}.ResBlock{r}.body.{j}", c, c, 3)
    for j in range(5):
        conv(f"{ke}.Conv_mid.body.{2 * j}", 256, 128 if j == 0 else 256, 3)
    for i, (cin, c) in enumerate(((256, 128), (128, 64)), start=1):
        shapes[f"{ke}.Decoding_Block{i}.Conv_t.weight"] = (cin, c, 3, 3)
        shapes[f"{ke}.Decoding_Block{i}.Conv_t.bias"] = (c,)
        conv(f"{ke}.Decoding_Block{i}.Conv_head", c, 2 * c, 3)
        for r in (1, 2):
            for j in (1, 3):
                conv(f"{ke}.Decoding_Block{i}.ResBlock{r}.body.{j}", c, c, 3)
    for tail in ("mean", "var"):
        conv(f"{ke}.Conv_tail.{tail}.0", 64, 64, 3)
        conv(f"{ke}.Conv_tail.{tail}.2", k2, 64, 3)

    def naf(name, c, kernel_attention):
        dw = 2 * c
        shapes[f"{name}.beta"] = shapes[f"{name}.gamma"] = (1, c, 1, 1)
        conv(f"{name}.conv1", dw, c, 1)
        conv(f"{name}.conv2", dw, 1, 3)
        conv(f"{name}.conv3", c, c, 1)
        conv(f"{name}.sca.1", c, c, 1)
        conv(f"{name}.conv4", dw, c, 1)
        conv(f"{name}.conv5", c, c, 1)
        for n in ("norm1", "norm2"):
            shapes[f"{name}.{n}.weight"] = shapes[f"{name}.{n}.bias"] = (c,)
        if kernel_attention:
            conv(f"{name}.kernel_atttion.conv_1.0", c, c, 3)
            conv(f"{name}.kernel_atttion.conv_kernel.0", c, k2, 3)
            conv(f"{name}.kernel_atttion.conv_kernel.2", c, c, 3)
            conv(f"{name}.kernel_atttion.conv_2.0", c, 2 * c, 3)

    chan = config["width"]
    conv("intro", chan, c3, 3)
    conv("ending", c3, chan, 3)
    for level, num in enumerate(config["enc_blk_nums"]):
        for b in range(num):
            naf(f"encoders.{level}.{b}", chan, num == 1)
        conv(f"downs.{level}", 2 * chan, chan, 2)
        if num == 1:
            conv(f"kernel_down.{level}", k2, k2, 2)
        chan *= 2
    for b in range(config["middle_blk_num"]):
        naf(f"middle_blks.{b}", chan, False)
    for level, num in enumerate(config["dec_blk_nums"]):
        conv(f"ups.{level}.0", 2 * chan, chan, 1, bias=False)
        chan //= 2
        for b in range(num):
            naf(f"decoders.{level}.{b}", chan, False)
    return shapes

