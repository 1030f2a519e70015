"""Device mesh, sharding and multi-host set-up for data-parallel training.

Data parallelism in jaxdeblur is ``jax.jit`` over a one-axis ``Mesh`` named ``data``: the
global batch is split along its leading axis (``NamedSharding(mesh, P("data"))``) and
parameters and optimiser state are replicated (``NamedSharding(mesh, P())``). XLA inserts
the gradient all-reduce. ``jax.pmap`` is not used.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

DATA_AXIS = "data"


def initialize_distributed(tpu: bool) -> dict:
    """Initialises multi-host JAX when asked, then describes the devices in use.

    On a TPU pod slice (or a GPU cluster with SLURM / Open MPI variables) every host must
    call ``jax.distributed.initialize()`` before touching devices; it discovers the
    coordinator on its own. On a single host it has nothing to discover: the run goes on
    as one process on all local devices, which is also how the test suite covers ``--tpu``
    on forced CPU devices.

    Args:
      tpu: whether ``--tpu`` was given.

    Returns:
      A dict with ``process_index``, ``process_count``, ``platform``, ``device_count``
      and ``local_device_count``, for the run log.
    """
    if tpu:
        try:
            jax.distributed.initialize()
        except (ValueError, RuntimeError) as err:
            # Raised when no cluster environment is detected, i.e. a single host.
            log.info("jax.distributed.initialize() found no cluster (%s); running as a "
                     "single process on the local devices.", err)
    devices = jax.devices()
    info = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "platform": devices[0].platform,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
    }
    if tpu and info["platform"] != "tpu":
        log.warning("--tpu given but the devices are %s; using all %d of them.",
                    info["platform"], info["device_count"])
    return info


def make_mesh(devices: Any = None) -> Mesh:
    """A one-axis mesh named ``data`` over ``devices`` (default: all devices)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split across the ``data`` axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every array of ``tree`` on all devices of ``mesh``."""
    return jax.device_put(tree, replicated_sharding(mesh))


def check_global_batch(global_batch: int, mesh: Mesh) -> int:
    """Returns the per-process batch size; raises when the batch does not split evenly."""
    n = mesh.devices.size
    if global_batch % n:
        raise ValueError(
            f"global batch size {global_batch} is not divisible by the {n} devices of the "
            f"mesh; choose a multiple of {n} (config.batch_size).")
    return global_batch // jax.process_count()


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Turns this process's slice of the global batch into globally sharded arrays.

    Args:
      batch: a pytree of host arrays whose leading axis is this process's share of the
        global batch (the whole batch on a single host).
      mesh: the data mesh.

    Returns:
      The same pytree of ``jax.Array``s sharded along ``data``.
    """
    sharding = data_sharding(mesh)
    n_local = len(mesh.local_devices)

    def put(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % n_local:
            raise ValueError(
                f"a batch array of shape {x.shape} cannot be split over {n_local} local "
                "devices: the leading (batch) axis must be a multiple of the device count.")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map(put, batch)
