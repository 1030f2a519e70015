"""The step loop shared by every jaxdeblur training run, and the resume before it.

`resume` opens a run directory's checkpoints and metric log and restores the newest step
(with the input iterator's position). `train_loop` runs a jitted step from there to the
last one and does the bookkeeping around it: metric lines, evaluations, checkpoints (with
the input pipeline's iterator state) and a clean stop on Ctrl-C or SIGTERM.

The steps donate their input state, so an exception raised while one runs could leave no
valid state to save. Signals therefore only set a flag; the loop stops between two steps,
saves the state it holds, and then delivers the signal again to the handler that was in
place before (by default: SIGINT raises ``KeyboardInterrupt``, SIGTERM ends the process),
so that a pre-empted run still ends as its supervisor asked, with its checkpoint on disk.
Several processes (`jaxdeblur.launch`, a TPU pod slice) run the loop in lock-step: each
calls every step, save and restore, they agree on a stop at the log steps, and process 0
alone writes the metric log.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxdeblur.train import checkpoint as checkpoint_lib
from jaxdeblur.train import logging as logging_lib
from jaxdeblur.train import mesh as mesh_lib

State = TypeVar("State")

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Resumed(NamedTuple):
    """Where a run starts (`resume`): its state, step, checkpoints and metric log."""

    state: Any
    start: int
    checkpoints: checkpoint_lib.CheckpointManager
    writer: logging_lib.MetricWriter


def resume(state: State, workdir: str | os.PathLike, *, model_config: Any,
           metrics_path: str | os.PathLike | None = None, iterator: Any = None,
           max_to_keep: int = 3, async_save: bool = True) -> Resumed:
    """Opens ``workdir``'s checkpoints and metric log, resuming from the newest step.

    On a fresh run ``state`` is kept and the run starts at step 0 with an empty metric log.
    Otherwise the newest readable checkpoint replaces ``state`` (restored into its
    structure), ``iterator`` (anything with ``set_state``, e.g. a grain iterator) is moved
    to where the checkpointed run was, and metric lines after that step (logged by the
    interrupted run past its last checkpoint) are dropped: they will be logged again.
    In a multi-process run every process calls it (checkpoints are opened, saved and
    restored together) and only process 0 writes the metric log.

    Args:
      state: the freshly initialised state (its shapes, dtypes and shardings are the
        restore target).
      workdir: the run directory; checkpoints go to ``workdir/checkpoints``.
      model_config: the configuration that decides the state's shapes (stored with every
        checkpoint; a checkpoint of another one is refused).
      metrics_path: the JSON-lines metric log; default ``workdir/metrics.jsonl``.
      iterator: the input iterator whose position is checkpointed, or None.
      max_to_keep: checkpoints kept on disk.
      async_save: write checkpoints in the background.

    Returns:
      ``Resumed(state, start, checkpoints, writer)``; `train_loop` closes the last two.

    Raises:
      checkpoint.CheckpointError: a checkpoint of another configuration, or none readable.
    """
    checkpoints = checkpoint_lib.CheckpointManager(
        workdir, model_config=model_config, max_to_keep=max_to_keep, async_save=async_save)
    restored = checkpoints.restore(state)
    start = 0
    if restored is not None:
        state, start = restored.state, restored.step
        if iterator is not None and restored.data_state is not None:
            iterator.set_state(restored.data_state)
    if metrics_path is None:
        metrics_path = os.path.join(workdir, "metrics.jsonl")
    writer = logging_lib.MetricWriter(metrics_path,
                                      resume_step=None if restored is None else start,
                                      enabled=mesh_lib.is_primary())
    return Resumed(state, start, checkpoints, writer)


def train_loop(
    state: State,
    step_fn: Callable[..., tuple[State, Any]],
    *,
    start: int,
    num_steps: int,
    checkpoints: checkpoint_lib.CheckpointManager,
    writer: logging_lib.MetricWriter,
    log_every: int,
    eval_every: int,
    checkpoint_every: int,
    next_batch: Callable[[], Any] | None = None,
    data_state: Callable[[], Any] | None = None,
    on_log: Callable[[int, Any], Mapping[str, Any]] | None = None,
    log_first_step: bool = False,
    evaluate: Callable[[int, State], Any] | None = None,
    sync_checkpoints: bool = False,
    name: str = "step",
) -> State:
    """Runs ``step_fn`` from step ``start`` to ``num_steps``; returns the final state.

    After step ``s`` (counted on the host: reading ``state.step`` would wait for the
    device every step and stop dispatch from running ahead), in this order:

    * ``s % log_every == 0`` (or ``s == 1`` with ``log_first_step``): writes
      ``on_log(s, output)`` (by default the step's output itself) to ``writer``;
    * ``s % eval_every == 0`` or ``s == num_steps``: calls ``evaluate(s, state)``;
    * ``s % checkpoint_every == 0``: saves ``state`` and ``data_state()`` as step ``s``.

    When the loop ends, by reaching ``num_steps`` or by a stop signal, after at least one
    step, a checkpoint of the current step is saved (forced) unless one exists. SIGINT
    and SIGTERM received while the loop runs stop it after the step under way (several
    processes: after the next step ``s % log_every == 0``, every process together); their
    previous handlers are restored on return, and a stop is reported on stderr and then
    passed on to them (Python's defaults: ``KeyboardInterrupt``, end of the process).
    ``checkpoints`` and ``writer`` are closed on return (or on an exception).

    Args:
      state: the train state at step ``start``, placed on the devices.
      step_fn: the jitted step, ``(state, batch) -> (state, output)``, or
        ``(state) -> (state, output)`` without ``next_batch``; it may donate ``state``.
      start: the step of ``state`` (0 on a fresh run, the restored step on resume).
      num_steps: the last step.
      checkpoints: where checkpoints go.
      writer: the ``metrics.jsonl`` writer.
      log_every: steps between metric lines.
      eval_every: steps between evaluations (the last step is always evaluated).
      checkpoint_every: steps between periodic checkpoints.
      next_batch: returns the next batch, sharded for ``step_fn``; None when the step
        makes its own data.
      data_state: returns the input iterator's state, saved with every checkpoint.
      on_log: ``(step, output) -> metrics``, the line to write for a step's output (the
        place for derived values and for bookkeeping by the caller).
      log_first_step: also log step 1, the loss before training has moved much.
      evaluate: ``(step, state) -> Any``, held-out evaluation; it writes its own lines.
      sync_checkpoints: force every periodic save, wait until it is on disk and print
        ``checkpoint saved: <name> step <s>`` (so that whoever reads the log knows the
        run can resume from there). Otherwise periodic saves follow orbax's own policy
        and are written in the background.
      name: what the progress bar and the messages call the run (``"stage II"``).

    Returns:
      The state after the last step run.

    Example::

      ckpt = CheckpointManager(workdir, model_config=config.model)
      writer = MetricWriter(workdir / "metrics.jsonl")
      state = train_loop(state, jax.jit(step, donate_argnums=0), start=0, num_steps=1000,
                         checkpoints=ckpt, writer=writer, log_every=10, eval_every=100,
                         checkpoint_every=500, next_batch=lambda: next(batches))
    """
    stop: list[int] = []
    previous = _catch_stop_signals(stop)
    bar = logging_lib.progress(total=num_steps, initial=start, desc=name)

    def save(step: int, *, force: bool) -> None:
        checkpoints.save(step, state, force=force,
                         data_state=data_state() if data_state is not None else None)
        if sync_checkpoints:
            checkpoints.wait()
            print(f"checkpoint saved: {name} step {step}", flush=True)

    step = start
    first_batch = None
    try:
        if step < num_steps and jax.process_count() > 1:
            first_batch = None if next_batch is None else next_batch()
            _compile_together(step_fn, (state,) if next_batch is None else (state, first_batch),
                              name)
        while step < num_steps and not _stop_agreed(stop, step % log_every == 0
                                                     or step == start):
            if next_batch is None:
                state, output = step_fn(state)
            else:
                batch, first_batch = (first_batch if first_batch is not None
                                      else next_batch()), None
                state, output = step_fn(state, batch)
            step += 1
            bar.update(1)
            if step % log_every == 0 or (log_first_step and step == 1):
                metrics = on_log(step, output) if on_log is not None else output
                writer.write(step, metrics)
                bar.set_postfix_str(logging_lib.format_metrics(metrics))
            if evaluate is not None and (step % eval_every == 0 or step == num_steps):
                evaluate(step, state)
            if step % checkpoint_every == 0:
                save(step, force=sync_checkpoints)
        # A signal that came after the last agreement must stop every process or none.
        _stop_agreed(stop, True)
        if stop:
            print(f"stopped by {signal.Signals(stop[0]).name} at {name} step {step}",
                  file=sys.stderr, flush=True)
        if step > start and checkpoints.latest_step != step:
            save(step, force=True)
    finally:
        bar.close()
        checkpoints.close()
        writer.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if stop:
        if previous.get(stop[0], signal.SIG_DFL) == signal.SIG_DFL:
            _leave_distributed()
        signal.raise_signal(stop[0])
    return state


#: How long a process waits for the others to compile a loop's step (`_compile_together`).
COMPILE_BARRIER_TIMEOUT_S = 3600
_barriers = itertools.count()


def _compile_together(step_fn: Callable[..., Any], args: tuple, name: str) -> None:
    """Several processes: compiles ``step_fn`` for ``args`` before its first call and waits
    until every process has, so that they all enter its first collective together.

    The CPU's gloo collectives give the processes 30 s to meet in a new collective's
    context. A process that compiles the step while another loads it from the
    compilation cache (a restart) can be later than that on a loaded machine: a 2-process
    restart failed so ("Gloo context initialization failed: GetKeyValue() timed out").
    The wait is the coordination service's barrier, which has no such limit. The call
    after it reuses the compiled step. A step without ``lower`` (not jitted) is left as is.
    """
    if not hasattr(step_fn, "lower"):
        return
    step_fn.lower(*args).compile()
    from jax._src import distributed  # the coordination client: no public barrier

    client = getattr(distributed.global_state, "client", None)
    if client is not None:
        client.wait_at_barrier(f"jaxdeblur train_loop {next(_barriers)} {name} compiled",
                               COMPILE_BARRIER_TIMEOUT_S * 1000)


def _leave_distributed() -> None:
    """Before a signal's default action ends this process: leaves the multi-process run
    together with the others.

    The default action (SIGTERM) ends the process at once, without the exit handlers that
    shut JAX's distributed client down. Process 0 hosts the coordination service: ended
    that way while a peer is still closing its checkpoints, it takes the service with it,
    and the peer's client aborts (SIGABRT) instead of ending as the signal asks.
    ``jax.distributed.shutdown`` waits at the service's shutdown barrier until every
    process has reached it, then disconnects, so each ends by the signal on its own.
    A handler that raises (SIGINT's ``KeyboardInterrupt``) leaves this to the exit
    handlers, after the program has unwound.
    """
    if jax.process_count() > 1 and jax.distributed.is_initialized():
        jax.distributed.shutdown()


def _stop_agreed(stop: list[int], sync: bool) -> bool:
    """Whether the loop stops before its next step.

    One process: whether a stop signal came. Several: each may get the signal (or see
    its flag) between different steps, yet all must stop after the same step, to save it
    together and not wait for each other in the next step's collectives. They agree at
    ``sync`` points (the log steps, where every process waits for the devices anyway): a
    signal on any process stops all of them, and each records it in ``stop`` to end as
    that signal asks.
    """
    if jax.process_count() == 1:
        return bool(stop)
    if not sync:
        return False
    signals = multihost_utils.process_allgather(np.asarray(stop[0] if stop else 0, np.int32))
    received = int(np.max(signals))
    if received and not stop:
        stop.append(received)
    return bool(received)


def _catch_stop_signals(stop: list[int]) -> dict[int, Any]:
    """Makes SIGINT and SIGTERM append to ``stop``; returns the handlers they replace."""
    if threading.current_thread() is not threading.main_thread():
        # Python accepts signal handlers only in the main thread; elsewhere the signals
        # keep their handlers and the loop cannot be stopped cleanly.
        return {}

    def request_stop(signum, frame):
        del frame
        stop.append(signum)

    previous = {}
    for signum in _STOP_SIGNALS:
        # None: a handler installed outside Python, which cannot be put back.
        previous[signum] = signal.getsignal(signum)
        if previous[signum] is None:
            previous[signum] = signal.SIG_DFL
        signal.signal(signum, request_stop)
    return previous
