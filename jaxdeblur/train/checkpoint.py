"""Orbax checkpoints for every jaxdeblur training loop.

One checkpoint step holds three items:

* ``state``: the train state pytree (parameters, optimiser state, step, PRNG key, ...);
* ``data``: the input pipeline's iterator state as JSON, so that a resumed run sees exactly
  the batches an uninterrupted run would have seen (in a multi-process run, every
  process's own iterator state, `gather_json`);
* ``meta``: a JSON dict with the run's configuration fingerprint, checked on restore so that
  a checkpoint written by another configuration is refused with a clear message instead of
  being half-loaded.

Orbax writes each step into a temporary directory and renames it when complete, so a run
killed mid-save (SIGKILL, pre-emption) leaves the previous step intact; a step that is
present but unreadable is reported, and ``restore`` falls back to the newest readable one.

Several processes (a TPU pod slice, `jaxdeblur.launch`): every process constructs the
manager and calls every ``save`` and ``restore`` (orbax synchronises them and writes each
array shard once, the JSON items from process 0), so the run's directory holds one
checkpoint, readable by any number of processes.

For inference, checkpoints are also read without a target: `restore_newest_step` (a
training run's newest state as saved, `find_variables` to pick the model variables out of
it) and `read_converted` (a folder of converted weights written by `save_converted`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint exists but cannot be used (corrupt, or from another configuration)."""


class Restored(NamedTuple):
    """What `CheckpointManager.restore` returns."""

    step: int
    state: Any
    data_state: Any


def config_fingerprint(config: Any) -> str:
    """A stable hash of the fields that decide parameter shapes.

    Args:
      config: an ``ml_collections.ConfigDict``, a dict, or anything JSON-serialisable.

    Returns:
      A 16-character hex digest of the canonical JSON of ``config``.
    """
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def gather_json(value: Any) -> list:
    """Every process's ``value`` (JSON-serialisable), by process index.

    A collective: every process must call it. Orbax writes JSON items from process 0
    only, so per-process values (each process's input iterator) are gathered first.

    Returns:
      ``[value]`` in a single process.
    """
    if jax.process_count() == 1:
        return [value]
    text = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([text.size], np.int32))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:text.size] = text
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(row[:int(n)].tobytes()) for row, n in
            zip(gathered, lengths.reshape(-1))]


def _shape_summary(tree: Any) -> dict[str, list[int]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): list(np.shape(leaf)) for path, leaf in leaves}


class CheckpointManager:
    """Saves and restores (train state, data-iterator state) under ``<workdir>/checkpoints``.

    Args:
      workdir: the run directory; checkpoints go to ``workdir/checkpoints``.
      model_config: the part of the configuration that decides parameter shapes (for
        example ``config.model``). Its fingerprint is stored and checked on restore.
      max_to_keep: how many recent steps to keep on disk.
      async_save: write in a background thread (the train loop continues meanwhile).

    Example::

      ckpt = CheckpointManager(workdir, model_config=config.model)
      restored = ckpt.restore(state)          # None on a fresh run
      if restored: state, data_state = restored.state, restored.data_state
      ...
      ckpt.save(step, state, data_state=it.get_state())
      ckpt.close()
    """

    def __init__(self, workdir: str | pathlib.Path, *, model_config: Any = None,
                 max_to_keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(workdir).resolve() / "checkpoints"
        self._meta = {
            "model_fingerprint": config_fingerprint(model_config) if model_config is not None else None,
            "model_config": (model_config.to_dict() if hasattr(model_config, "to_dict") else model_config),
        }
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True)
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as err:
            raise CheckpointError(
                f"cannot create the checkpoint directory {self.directory}: {err}. "
                "Choose a writable --workdir.") from err

    @property
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, *, data_state: Any = None, force: bool = False) -> bool:
        """Saves ``state`` (and the iterator state) as step ``step``; returns whether it saved.

        With several processes, every process calls it with its own ``data_state``; all
        of them are stored (``process_iterators``) and each gets its own back on restore.
        """
        data = {"iterator": data_state}
        if jax.process_count() > 1:
            data["process_iterators"] = gather_json(data_state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data),
            meta=ocp.args.JsonSave(self._meta),
        )
        return self._manager.save(int(step), args=args, force=force)

    def wait(self) -> None:
        """Blocks until a background save has reached the disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def _check_meta(self, step: int, meta: dict) -> None:
        ours, theirs = self._meta["model_fingerprint"], meta.get("model_fingerprint")
        if ours is not None and theirs is not None and ours != theirs:
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} was written by another model "
                f"configuration:\n  checkpoint: {json.dumps(meta.get('model_config'), sort_keys=True)}\n"
                f"  this run:   {json.dumps(self._meta['model_config'], sort_keys=True)}\n"
                "Use the configuration it was trained with, or a new --workdir to start afresh.")

    def restore(self, target: Any, *, step: int | None = None) -> Restored | None:
        """Restores the newest readable step (or ``step``) into the structure of ``target``.

        Args:
          target: a pytree with the shapes, dtypes and shardings to restore into (typically
            the freshly initialised train state); its arrays are not used.
          step: a specific step; by default the newest one that reads back.

        Returns:
          ``Restored(step, state, data_state)``, or None when there is no checkpoint yet.

        Raises:
          CheckpointError: the checkpoint comes from another configuration (shapes or
            fingerprint differ), or no saved step can be read.
        """
        steps = [step] if step is not None else sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            return None
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        errors = []
        for candidate in steps:
            try:
                meta = self._manager.restore(
                    candidate, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            except Exception as err:  # noqa: BLE001 - orbax raises many types for bad files
                errors.append(f"step {candidate}: unreadable metadata ({type(err).__name__}: {err})")
                log.warning("checkpoint step %s is unreadable, trying an older one: %s", candidate, err)
                continue
            self._check_meta(candidate, meta or {})
            try:
                restored = self._manager.restore(candidate, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
            except (ValueError, KeyError, TypeError) as err:
                if _looks_like_mismatch(err):
                    raise CheckpointError(
                        f"checkpoint {self.directory / str(candidate)} does not fit this model "
                        f"({err}). It was probably written by another configuration; use that "
                        "configuration or a new --workdir.") from err
                errors.append(f"step {candidate}: {type(err).__name__}: {err}")
                log.warning("checkpoint step %s is unreadable, trying an older one: %s", candidate, err)
                continue
            except Exception as err:  # noqa: BLE001
                errors.append(f"step {candidate}: {type(err).__name__}: {err}")
                log.warning("checkpoint step %s is unreadable, trying an older one: %s", candidate, err)
                continue
            _check_shapes(target, restored["state"], self.directory / str(candidate))
            data = restored["data"] or {}
            return Restored(int(candidate), restored["state"],
                            _own_iterator(data, self.directory / str(candidate)))
        raise CheckpointError(
            f"no checkpoint under {self.directory} could be read:\n  " + "\n  ".join(errors) +
            "\nDelete the corrupt step directories, or start afresh with a new --workdir.")


def _own_iterator(data: dict, where: pathlib.Path) -> Any:
    """This process's iterator state from a checkpoint's ``data`` item (None: no state)."""
    states = data.get("process_iterators")
    if states is None:
        states = [data.get("iterator")]
    if all(state is None for state in states):
        return None
    if len(states) != jax.process_count():
        # Each process reads its own shard of the records; another process count splits
        # them differently, so no saved position fits.
        raise CheckpointError(
            f"checkpoint {where} was written by {len(states)} process(es), this run has "
            f"{jax.process_count()}: the input iterators cannot resume exactly. Resume "
            "with the same number of processes, or start afresh with a new --workdir.")
    return states[jax.process_index()]


def _looks_like_mismatch(err: Exception) -> bool:
    text = str(err).lower()
    return any(word in text for word in ("shape", "structure", "mismatch", "not match", "missing"))


def _check_shapes(target: Any, restored: Any, where: pathlib.Path) -> None:
    want, got = _shape_summary(target), _shape_summary(restored)
    if want != got:
        diff = [k for k in set(want) | set(got) if want.get(k) != got.get(k)]
        raise CheckpointError(
            f"checkpoint {where} does not fit this model: {len(diff)} arrays differ, e.g. "
            + ", ".join(f"{k}: checkpoint {got.get(k)} vs model {want.get(k)}" for k in sorted(diff)[:5])
            + ". Use the configuration it was trained with, or a new --workdir.")


# --- reading checkpoints without a target (inference) --------------------------------------

#: The file that marks a folder of converted weights (``jaxdeblur convert``): the method,
#: the model config and the source file.
CONVERTED_META = "jaxdeblur.json"


def save_converted(directory: str | pathlib.Path, variables: Any, meta: dict) -> None:
    """Writes ``directory/variables`` (orbax) and ``directory/CONVERTED_META`` (``meta``).

    Args:
      directory: the folder (created).
      variables: the model variables.
      meta: JSON-serialisable; ``method`` and ``model_config`` are what `read_converted`
        needs.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((directory / "variables").resolve(), variables, force=True)
    checkpointer.wait_until_finished()
    (directory / CONVERTED_META).write_text(json.dumps(meta, indent=2) + "\n")


def read_converted(directory: str | pathlib.Path, *, method: str) -> tuple[dict, Any] | None:
    """``(model_config, variables)`` of a folder written by `save_converted`.

    Returns:
      None when ``directory`` holds no ``CONVERTED_META``.

    Raises:
      CheckpointError: the folder holds weights of another method.
    """
    directory = pathlib.Path(directory)
    meta_file = directory / CONVERTED_META
    if not meta_file.exists():
        return None
    meta = json.loads(meta_file.read_text())
    if meta.get("method") != method:
        raise CheckpointError(f"checkpoint {directory} is a {meta.get('method')!r} checkpoint, "
                              f"not {method!r}; use --method accordingly")
    variables = ocp.StandardCheckpointer().restore((directory / "variables").resolve())
    return meta["model_config"], variables


class NewestStep(NamedTuple):
    """What `restore_newest_step` returns."""

    directory: pathlib.Path
    state: Any
    model_config: dict


def restore_newest_step(workdir: str | pathlib.Path) -> NewestStep:
    """The newest step of a `CheckpointManager` directory, restored as saved (no target).

    Args:
      workdir: a run directory or its ``checkpoints/`` folder.

    Returns:
      ``NewestStep(directory, state, model_config)``; ``model_config`` is the one stored
      with the step (empty when its metadata is unreadable).

    Raises:
      CheckpointError: no numbered step, or the newest one cannot be read.
    """
    workdir = pathlib.Path(workdir)
    root = workdir / "checkpoints" if (workdir / "checkpoints").is_dir() else workdir
    steps = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir()),
                   reverse=True)
    if not steps:
        raise CheckpointError(f"{workdir} is neither a converted checkpoint ({CONVERTED_META} "
                              "missing) nor a training directory with numbered checkpoint "
                              "steps")
    step_dir = root / str(steps[0])
    try:
        state = _restore_on_this_device((step_dir / "state").resolve())
    except Exception as err:  # noqa: BLE001 - orbax raises many types for bad files
        raise CheckpointError(f"cannot read checkpoint {step_dir}: {type(err).__name__}: "
                              f"{err}") from err
    model_config: dict = {}
    meta_dir = step_dir / "meta"
    for candidate in sorted(meta_dir.glob("*")) if meta_dir.is_dir() else []:
        try:
            model_config = json.loads(candidate.read_text()).get("model_config") or {}
            break
        except (ValueError, OSError, AttributeError):
            continue
    return NewestStep(step_dir, state, model_config)


def _restore_on_this_device(directory: pathlib.Path) -> Any:
    """A saved pytree restored as saved, every array on this process's first device.

    Without a target orbax restores onto the devices that wrote the checkpoint, which a
    run on 8 devices or several processes has and an inference process does not.
    """
    checkpointer = ocp.StandardCheckpointer()
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
        checkpointer.metadata(directory).item_metadata)
    return checkpointer.restore(directory, target)


def find_variables(tree: Any, required: tuple[str, ...]) -> dict | None:
    """The ``{"params", "batch_stats"}`` dict anywhere in ``tree`` whose ``params`` hold
    every name of ``required`` (a train state restored without a target), or None."""
    if isinstance(tree, dict):
        params = tree.get("params")
        if isinstance(params, dict) and all(name in params for name in required):
            return {k: tree[k] for k in ("params", "batch_stats") if k in tree}
        for value in tree.values():
            found = find_variables(value, required)
            if found is not None:
                return found
    return None


def describe_tree(tree: Any) -> str:
    """``{a, b, ...}`` (the first eight keys) or the type name, for error messages."""
    if isinstance(tree, dict):
        return "{" + ", ".join(sorted(map(str, tree.keys()))[:8]) + "}"
    return type(tree).__name__
