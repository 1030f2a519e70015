"""Device mesh, sharding and multi-host set-up for data-parallel training.

Data parallelism in jaxdeblur is ``jax.jit`` over a one-axis ``Mesh`` named ``data``: the
global batch is split along its leading axis (``NamedSharding(mesh, P("data"))``) and
parameters and optimiser state are replicated (``NamedSharding(mesh, P())``). XLA inserts
the gradient all-reduce. ``jax.pmap`` is not used.

Several processes (one per host of a TPU pod slice or GPU cluster, or `jaxdeblur.launch`
on one machine): `initialize_distributed` connects them; the mesh then spans every
process's devices, each process passes only its own share of the batch to `shard_batch`
and the same values to `replicate`, and `is_primary` (process 0) writes the files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxdeblur import launch

log = logging.getLogger(__name__)

DATA_AXIS = "data"


class DistributedSettings(NamedTuple):
    """Where a process of a multi-process run finds the others (`distributed_settings`)."""

    coordinator: str
    num_processes: int
    process_id: int


def distributed_settings(
        environ: Mapping[str, str] | None = None) -> DistributedSettings | None:
    """The ``JAXDEBLUR_COORDINATOR`` / ``_NUM_PROCESSES`` / ``_PROCESS_ID`` variables.

    `jaxdeblur.launch` sets them for every process it starts; on a cluster without SLURM
    or TPU metadata they can be set by hand on every host (the coordinator is process 0's
    ``host:port``).

    Args:
      environ: the environment (default ``os.environ``).

    Returns:
      The settings, or None when none of the three variables is set.

    Raises:
      ValueError: some but not all of them set, or values that are not a ``host:port``,
        a count >= 1 and an id in ``[0, count)``; the message names the variable.
    """
    environ = os.environ if environ is None else environ
    names = (launch.COORDINATOR_ENV, launch.NUM_PROCESSES_ENV, launch.PROCESS_ID_ENV)
    present = [name for name in names if environ.get(name)]
    if not present:
        return None
    if len(present) < len(names):
        missing = [name for name in names if name not in present]
        raise ValueError(f"{', '.join(present)} set but {', '.join(missing)} not: a process "
                         f"of a multi-process run needs all of {', '.join(names)}")
    coordinator = environ[launch.COORDINATOR_ENV]
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{launch.COORDINATOR_ENV}={coordinator!r} is not a host:port")
    values = {}
    for name in names[1:]:
        try:
            values[name] = int(environ[name])
        except ValueError:
            raise ValueError(f"{name}={environ[name]!r} is not an integer") from None
    count, index = values[launch.NUM_PROCESSES_ENV], values[launch.PROCESS_ID_ENV]
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"{launch.PROCESS_ID_ENV}={index} and {launch.NUM_PROCESSES_ENV}="
                         f"{count}: need a count >= 1 and an id in [0, count)")
    return DistributedSettings(coordinator, count, index)


def initialize_distributed(tpu: bool) -> dict:
    """Initialises multi-process JAX when asked, then describes the devices in use.

    Three cases, before anything touches the devices:

    * the ``JAXDEBLUR_*`` variables (`distributed_settings`, set by `jaxdeblur.launch` or
      by hand) are present: ``jax.distributed.initialize(coordinator, num_processes,
      process_id)``, with gloo collectives for the CPU backend (XLA's CPU client has no
      cross-process collectives of its own), whether or not ``--tpu`` was given;
    * ``tpu``: on a TPU pod slice (or a GPU cluster with SLURM / Open MPI variables) every
      host calls ``jax.distributed.initialize()``, which discovers the coordinator on its
      own (``JAX_COORDINATOR_ADDRESS`` overrides the address). On a single host it has
      nothing to discover: the run goes on as one process on all local devices, which is
      also how the test suite covers ``--tpu`` on forced CPU devices;
    * otherwise: one process, nothing to initialise.

    Args:
      tpu: whether ``--tpu`` was given.

    Returns:
      A dict with ``process_index``, ``process_count``, ``platform``, ``device_count``
      and ``local_device_count``, for the run log.

    Raises:
      ValueError: incomplete or malformed ``JAXDEBLUR_*`` variables.
    """
    settings = distributed_settings()
    if settings is not None:
        if not jax.distributed.is_initialized():
            # Only the CPU client reads this; on GPU/TPU it changes nothing.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(settings.coordinator,
                                       num_processes=settings.num_processes,
                                       process_id=settings.process_id)
    elif tpu:
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


def is_primary() -> bool:
    """Whether this process writes the run's files (metrics, samples, summaries): process 0.

    Every process runs every step and takes part in every checkpoint save (orbax writes
    one checkpoint together); files that hold one copy of a result are written once.
    """
    return jax.process_index() == 0


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
    """Places every array of ``tree`` on all devices of ``mesh``.

    With several processes every process passes the same values (a fresh state, or one
    restored from the checkpoint they share). Arrays that sit on this process's devices
    (orbax restores onto them) go through the host first: ``jax.device_put`` does not
    move a committed array onto other processes' devices.
    """
    if jax.process_count() > 1:
        tree = jax.tree_util.tree_map(
            lambda x: jax.device_get(x) if isinstance(x, jax.Array) and x.is_fully_addressable
            else x, tree)
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
