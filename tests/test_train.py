"""Tests for jaxdeblur.train: checkpoints, metric logging, mesh helpers, the step loop."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdeblur.train import checkpoint, logging as metric_logging, loop, mesh


def _state(width=4, seed=0):
    rng = np.random.default_rng(seed)
    return {"params": {"w": jnp.asarray(rng.normal(size=(3, width)), jnp.float32),
                       "b": jnp.zeros((width,), jnp.float32)},
            "step": jnp.asarray(seed, jnp.int32)}


def test_save_restore_round_trip_with_data_state(tmp_path):
    ckpt = checkpoint.CheckpointManager(tmp_path, model_config={"width": 4}, async_save=False)
    assert ckpt.restore(_state()) is None
    ckpt.save(5, _state(seed=5), data_state={"next_index": 40, "seed": 1})
    ckpt.save(9, _state(seed=9), data_state={"next_index": 72, "seed": 1})
    ckpt.close()

    again = checkpoint.CheckpointManager(tmp_path, model_config={"width": 4})
    restored = again.restore(_state())
    assert restored.step == 9
    assert restored.data_state == {"next_index": 72, "seed": 1}
    np.testing.assert_array_equal(restored.state["params"]["w"], _state(seed=9)["params"]["w"])
    assert int(restored.state["step"]) == 9
    older = again.restore(_state(), step=5)
    assert older.data_state["next_index"] == 40
    again.close()


def test_checkpoint_from_another_config_is_refused(tmp_path):
    ckpt = checkpoint.CheckpointManager(tmp_path, model_config={"width": 4}, async_save=False)
    ckpt.save(1, _state())
    ckpt.close()
    other = checkpoint.CheckpointManager(tmp_path, model_config={"width": 8})
    with pytest.raises(checkpoint.CheckpointError, match="another model configuration"):
        other.restore(_state(width=8))


def test_checkpoint_with_other_shapes_is_refused_without_fingerprint(tmp_path):
    ckpt = checkpoint.CheckpointManager(tmp_path, async_save=False)
    ckpt.save(1, _state(width=4))
    ckpt.close()
    other = checkpoint.CheckpointManager(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="does not fit this model"):
        other.restore(_state(width=8))


def test_corrupt_latest_step_falls_back_to_older_one(tmp_path):
    ckpt = checkpoint.CheckpointManager(tmp_path, model_config={"width": 4}, async_save=False)
    ckpt.save(1, _state(seed=1), data_state={"i": 1})
    ckpt.save(2, _state(seed=2), data_state={"i": 2})
    ckpt.close()
    step_dir = tmp_path / "checkpoints" / "2"
    for path in step_dir.rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    again = checkpoint.CheckpointManager(tmp_path, model_config={"width": 4})
    restored = again.restore(_state())
    assert restored.step == 1 and restored.data_state == {"i": 1}


def test_all_steps_corrupt_raises_clear_error(tmp_path):
    ckpt = checkpoint.CheckpointManager(tmp_path, model_config={"width": 4}, async_save=False)
    ckpt.save(3, _state())
    ckpt.close()
    for path in (tmp_path / "checkpoints" / "3").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    again = checkpoint.CheckpointManager(tmp_path, model_config={"width": 4})
    with pytest.raises(checkpoint.CheckpointError, match="could be read"):
        again.restore(_state())


def test_config_fingerprint_is_order_independent():
    assert checkpoint.config_fingerprint({"a": 1, "b": [1, 2]}) == \
        checkpoint.config_fingerprint({"b": [1, 2], "a": 1})
    assert checkpoint.config_fingerprint({"a": 1}) != checkpoint.config_fingerprint({"a": 2})


def test_metric_writer_truncates_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with metric_logging.MetricWriter(path) as writer:
        for step in range(1, 6):
            writer.write(step, {"loss": jnp.float32(1.0 / step), "psnr": np.float64(20 + step)})
    with open(path, "a") as f:
        f.write('{"step": 6, "loss"')  # a line torn by a kill
    lines = metric_logging.read_metrics(path)
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5]
    assert lines[1]["loss"] == pytest.approx(0.5)
    with metric_logging.MetricWriter(path, resume_step=3) as writer:
        writer.write(4, {"loss": 0.3})
    assert [line["step"] for line in metric_logging.read_metrics(path)] == [1, 2, 3, 4]
    assert metric_logging.read_metrics(path)[-1]["loss"] == pytest.approx(0.3)


def test_resume_restores_state_iterator_and_metric_log(tmp_path):
    """`loop.resume`: a fresh run starts at 0; a resumed one gets the checkpoint's state and
    step, moves the iterator to the checkpointed position and drops later metric lines."""

    class Iterator:
        position = None

        def set_state(self, state):
            self.position = state

    fresh = {"step": jnp.zeros((), jnp.int32), "w": jnp.zeros(3)}
    state, start, ckpt, writer = loop.resume(fresh, tmp_path, model_config={"width": 3},
                                             iterator=Iterator(), async_save=False)
    assert start == 0 and state is fresh
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step})
    ckpt.save(2, {"step": jnp.full((), 2, jnp.int32), "w": jnp.full(3, 2.0)},
              data_state={"position": 7})
    ckpt.close()
    writer.close()

    it = Iterator()
    state, start, ckpt, writer = loop.resume(fresh, tmp_path, model_config={"width": 3},
                                             iterator=it, async_save=False)
    ckpt.close()
    writer.close()
    assert start == 2 and it.position == {"position": 7}
    np.testing.assert_array_equal(state["w"], np.full(3, 2.0))
    assert [line["step"] for line in metric_logging.read_metrics(tmp_path / "metrics.jsonl")] \
        == [1, 2]
    with pytest.raises(checkpoint.CheckpointError, match="another model configuration"):
        loop.resume(fresh, tmp_path, model_config={"width": 4})


def test_metric_writer_records_nan_as_string(tmp_path):
    with metric_logging.MetricWriter(tmp_path / "m.jsonl") as writer:
        line = writer.write(1, {"loss": float("nan")})
    assert line["loss"] == "nan"
    json.loads((tmp_path / "m.jsonl").read_text())


def test_shard_batch_single_device_and_bad_batch():
    m = mesh.make_mesh()
    batch = {"x": np.ones((2 * jax.device_count(), 3), np.float32)}
    sharded = mesh.shard_batch(batch, m)
    assert sharded["x"].shape == batch["x"].shape
    assert mesh.check_global_batch(4 * jax.device_count(), m) == 4 * jax.device_count()


_MULTI_DEVICE = textwrap.dedent("""
    import jax, numpy as np, jax.numpy as jnp
    from jaxdeblur.train import mesh
    info = mesh.initialize_distributed(tpu=True)
    assert info["device_count"] == 8, info
    m = mesh.make_mesh()
    x = mesh.shard_batch(np.arange(16 * 3, dtype=np.float32).reshape(16, 3), m)
    assert len(x.sharding.device_set) == 8
    assert x.addressable_shards[0].data.shape == (2, 3)
    w = mesh.replicate(jnp.ones((3,)), m)
    total = jax.jit(lambda x, w: jnp.sum(x * w))(x, w)
    assert float(total) == float(np.arange(48).sum())
    try:
        mesh.check_global_batch(12, m)
    except ValueError as err:
        assert "not divisible" in str(err)
    else:
        raise AssertionError("batch 12 over 8 devices was accepted")
    try:
        mesh.shard_batch(np.zeros((6, 2)), m)
    except ValueError as err:
        assert "multiple of the device count" in str(err)
    else:
        raise AssertionError("batch 6 over 8 devices was accepted")
    print("OK")
""")


def test_mesh_on_eight_forced_cpu_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _MULTI_DEVICE], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout


# --- the shared step loop ---------------------------------------------------------------------

def _saved_steps(workdir):
    ckpt = checkpoint.CheckpointManager(workdir)
    steps = ckpt.all_steps()
    ckpt.close()
    return steps


def test_train_loop_logs_evaluates_and_checkpoints_on_its_cadence(tmp_path, capsys):
    batches = iter(range(1, 1000))
    seen, evaluations = [], []

    def step_fn(state, batch):
        seen.append(batch)
        return {"count": state["count"] + 1}, {"loss": 1.0 / (state["count"] + 1)}

    ckpt = checkpoint.CheckpointManager(tmp_path, max_to_keep=10, async_save=False)
    writer = metric_logging.MetricWriter(tmp_path / "metrics.jsonl")
    state = loop.train_loop(
        {"count": jnp.asarray(0, jnp.int32)}, step_fn, start=0, num_steps=7,
        checkpoints=ckpt, writer=writer, log_every=2, eval_every=3, checkpoint_every=3,
        next_batch=lambda: next(batches), data_state=lambda: {"batches_read": len(seen)},
        on_log=lambda step, out: {"loss": out["loss"], "step_squared": step**2},
        log_first_step=True,
        evaluate=lambda step, state: evaluations.append((step, int(state["count"]))),
        sync_checkpoints=True, name="toy")
    assert int(state["count"]) == 7 and seen == list(range(1, 8))
    lines = metric_logging.read_metrics(tmp_path / "metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2, 4, 6]
    assert lines[2]["loss"] == pytest.approx(0.25) and lines[2]["step_squared"] == 16
    assert evaluations == [(3, 3), (6, 6), (7, 7)]
    ckpt = checkpoint.CheckpointManager(tmp_path)
    assert ckpt.all_steps() == [3, 6, 7]
    restored = ckpt.restore({"count": jnp.asarray(0, jnp.int32)}, step=6)
    assert int(restored.state["count"]) == 6 and restored.data_state == {"batches_read": 6}
    ckpt.close()
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("checkpoint saved")] == [
        "checkpoint saved: toy step 3", "checkpoint saved: toy step 6",
        "checkpoint saved: toy step 7"]


def test_train_loop_without_batches_and_nothing_left_to_do(tmp_path):
    def step_fn(state):
        return {"count": state["count"] + 1}, {"loss": state["count"]}

    ckpt = checkpoint.CheckpointManager(tmp_path, async_save=False)
    writer = metric_logging.MetricWriter(tmp_path / "metrics.jsonl")
    state = loop.train_loop({"count": jnp.asarray(2, jnp.int32)}, step_fn, start=2,
                            num_steps=5, checkpoints=ckpt, writer=writer, log_every=1,
                            eval_every=10, checkpoint_every=10)
    assert int(state["count"]) == 5
    assert [line["loss"] for line in metric_logging.read_metrics(
        tmp_path / "metrics.jsonl")] == [2, 3, 4]
    assert _saved_steps(tmp_path) == [5]

    # Resumed at its last step: no step runs and no checkpoint is added.
    ckpt = checkpoint.CheckpointManager(tmp_path / "done", async_save=False)
    writer = metric_logging.MetricWriter(tmp_path / "done" / "metrics.jsonl")
    loop.train_loop({"count": jnp.asarray(5, jnp.int32)}, step_fn, start=5, num_steps=5,
                    checkpoints=ckpt, writer=writer, log_every=1, eval_every=1,
                    checkpoint_every=1)
    assert _saved_steps(tmp_path / "done") == []


def test_sigterm_stops_the_loop_between_steps_and_saves_that_step(tmp_path, capsys):
    """The step that receives SIGTERM completes; the loop saves it, restores the handler
    that was there before and passes the signal on to it."""
    received = []

    def outer_handler(signum, frame):
        received.append(signum)

    def step_fn(state, batch):
        if batch == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return {"count": state["count"] + 1}, {"loss": 0.0}

    before = signal.signal(signal.SIGTERM, outer_handler)
    int_handler = signal.getsignal(signal.SIGINT)
    try:
        batches = iter(range(1, 1000))
        ckpt = checkpoint.CheckpointManager(tmp_path, async_save=False)
        writer = metric_logging.MetricWriter(tmp_path / "metrics.jsonl")
        state = loop.train_loop({"count": jnp.asarray(0, jnp.int32)}, step_fn, start=0,
                                num_steps=10, checkpoints=ckpt, writer=writer, log_every=1,
                                eval_every=100, checkpoint_every=5,
                                next_batch=lambda: next(batches),
                                data_state=lambda: {"next_batch": 4}, name="toy")
        assert signal.getsignal(signal.SIGTERM) is outer_handler
        assert signal.getsignal(signal.SIGINT) is int_handler
    finally:
        signal.signal(signal.SIGTERM, before)
    assert received == [signal.SIGTERM]
    assert int(state["count"]) == 3
    assert [line["step"] for line in metric_logging.read_metrics(
        tmp_path / "metrics.jsonl")] == [1, 2, 3]
    ckpt = checkpoint.CheckpointManager(tmp_path)
    assert ckpt.all_steps() == [3]
    assert ckpt.restore({"count": jnp.asarray(0, jnp.int32)}).data_state == {"next_batch": 4}
    ckpt.close()
    assert "stopped by SIGTERM at toy step 3" in capsys.readouterr().err


def test_ctrl_c_saves_then_raises_keyboard_interrupt(tmp_path):
    """Under Python's default SIGINT handler a Ctrl-C ends in KeyboardInterrupt, but only
    after the step under way and its checkpoint."""
    def step_fn(state):
        if int(state["count"]) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return {"count": state["count"] + 1}, {"loss": 0.0}

    # Python's default handler, also where the test runner was started with SIGINT ignored
    # (a background job of a non-interactive shell).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        ckpt = checkpoint.CheckpointManager(tmp_path, async_save=False)
        writer = metric_logging.MetricWriter(tmp_path / "metrics.jsonl")
        with pytest.raises(KeyboardInterrupt):
            loop.train_loop({"count": jnp.asarray(0, jnp.int32)}, step_fn, start=0,
                            num_steps=10, checkpoints=ckpt, writer=writer, log_every=1,
                            eval_every=100, checkpoint_every=100)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert _saved_steps(tmp_path) == [2]
