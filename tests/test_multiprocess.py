"""Several JAX processes on one machine (`jaxdeblur.launch`): the per-process code paths.

Elsewhere multi-device tests force 8 CPU devices into one process, where every per-process
branch (data shards, collectives across processes, orbax saves taken together, files
written once) is dead code. Here the launcher the README documents starts 2 processes of
4 forced CPU devices each (gloo collectives), and the results are compared with 1 process
of 8 devices on the same global batch:

* the launcher: a process killed with SIGKILL ends the run within 60 s, the error naming
  it; every line is kept per process;
* data: each process reads its own records, the shards are disjoint and together are the
  global batch that the 1-process reference reads;
* UFPNet (stages II and III, `python -m jaxdeblur.launch ... -- python
  train_scripts/ufpnet.py`): SIGKILL of process 1 after a stage-III checkpoint, restart,
  then the losses the killed run logged past its checkpoint come back (rtol 1e-6), and
  the finished run equals the 1-process run (parameters within 1e-6, losses rtol 1e-6);
  one orbax checkpoint, one metrics file, one set of samples;
* Deep EM (`train_scripts/mcem.py`): a batch of 8 images split 4 + 4 over the processes
  gives the 1-process results, written once.

This file is also the worker the launcher runs for the checks that need code of their own
(``python tests/test_multiprocess.py <mode> <json>``, see `_worker`). The models are the
smallest the configs allow; compilation dominates (about a minute of CPU per process and
stage), and a persistent compilation cache shared by the runs of this file lets a restart
skip it.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import FAST_COMPILE_FLAGS, config_flags

from jaxdeblur import launch

REPO = pathlib.Path(__file__).resolve().parents[1]
THIS = pathlib.Path(__file__).resolve()
ASSET_FLOW = REPO / "jaxdeblur" / "assets" / "flow_prior.npz"

#: Wall-clock bound of one launched run (generous: 2 cores shared with other tests).
RUN_TIMEOUT = 1200

#: UFPNet: the tiny config at its smallest (two levels, width 4). ke_widths (8, 16), not
#: (4, 8): with width 4 and a (4, 8) KE-Net some pixels' codes come out constant at
#: initialisation and the gradient of their std is NaN from the first stage-II step.
UFPNET_OVERRIDES = {
    "model.width": 4, "model.enc_blk_nums": (1, 1), "model.dec_blk_nums": (1, 1),
    "model.ke_widths": (8, 16), "crop_size": 32, "batch_size": 8, "eval_crop_size": 32,
    "num_eval_images": 1, "num_sample_images": 1, "data.config": "tiny",
    "stage2.num_steps": 2, "stage2.log_every": 1, "stage2.checkpoint_every": 2,
    "stage2.eval_every": 1000, "stage3.num_steps": 8, "stage3.log_every": 1,
    "stage3.checkpoint_every": 4, "stage3.eval_every": 1000, "async_checkpoint": False,
}
#: The stage-III checkpoint the killed run resumes from, and the losses it must give back.
RESUME_STEP, NEXT_LOSSES = 4, 3

#: Deep EM: the smallest networks of tests/test_mcem.py, one EM iteration, short chains cut
#: into one-step calls so that the final E-step reuses the iteration's compiled step. The
#: chains as lax.scan: unrolled, the per-device programs of an 8-device and a 4-device
#: process rounded differently (results within 3e-5 relative; scanned: identical).
MCEM_OVERRIDES = {
    "kernel_size": 5, "grid": (2, 2), "image_net.features": (8, 8),
    "image_net.skip_features": 4, "image_net.input_channels": 4,
    "kernel_net.features": (4, 4), "kernel_net.skip_features": 2,
    "kernel_net.input_channels": 2, "e_step_steps": 2, "e_step_burn_in": 1,
    "m_step_steps": 1, "e_step_chunk": "1", "m_step_chunk": "1", "loop": "scan",
    "em_iterations": 1, "warmup_iterations": 1, "log_every": 1, "checkpoint_every": 1,
}


def _as_overrides(overrides: dict) -> list[str]:
    """``key=value`` overrides of `jaxdeblur.configs.load` (text that is no Python literal
    stays text)."""
    return [f"{key}={value}" for key, value in overrides.items()]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO))


def _metrics(path) -> list[dict]:
    path = pathlib.Path(path)
    if not path.exists():
        return []
    lines = []
    for raw in path.read_text().splitlines():
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            continue  # a line being written
    return lines


def _losses(path, key: str) -> dict[int, float]:
    lines = [line for line in _metrics(path) if key in line]
    steps = [line["step"] for line in lines]
    assert len(steps) == len(set(steps)), f"{path}: a step logged twice: {steps}"
    return {line["step"]: float(line[key]) for line in lines}


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """One persistent compilation cache for the launched runs of this file."""
    return tmp_path_factory.mktemp("compilation_cache")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The tiny synthetic_blur data set (4 training tiles of 32²), built once."""
    from data_pipelines import build
    root = tmp_path_factory.mktemp("tfds")
    build.build_dataset("synthetic_blur", data_dir=root, config="tiny")
    return root


# --- the launcher -------------------------------------------------------------------------

def test_process_environment_and_distributed_settings():
    from jaxdeblur.train import mesh
    flags = "--xla_foo=1 --xla_force_host_platform_device_count=8"
    env = launch.process_environment(1, 2, "127.0.0.1:1234", local_devices=4,
                                     compilation_cache="/c", base={"XLA_FLAGS": flags})
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"
    assert env["JAX_PLATFORMS"] == "cpu" and env["JAX_COMPILATION_CACHE_DIR"] == "/c"
    assert mesh.distributed_settings(env) == mesh.DistributedSettings("127.0.0.1:1234", 2, 1)
    single = launch.process_environment(0, 1, "127.0.0.1:1234", base={})
    assert mesh.distributed_settings(single) is None
    with pytest.raises(ValueError, match="JAXDEBLUR_PROCESS_ID not"):
        mesh.distributed_settings({"JAXDEBLUR_COORDINATOR": "h:1",
                                   "JAXDEBLUR_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="id in"):
        mesh.distributed_settings({"JAXDEBLUR_COORDINATOR": "h:1",
                                   "JAXDEBLUR_NUM_PROCESSES": "2",
                                   "JAXDEBLUR_PROCESS_ID": "2"})
    with pytest.raises(ValueError, match="host:port"):
        mesh.distributed_settings({"JAXDEBLUR_COORDINATOR": "h",
                                   "JAXDEBLUR_NUM_PROCESSES": "2",
                                   "JAXDEBLUR_PROCESS_ID": "0"})
    with pytest.raises(ValueError, match="processes must be >= 1"):
        launch.start(["true"], processes=0)


def test_sigkill_of_one_process_stops_the_others_and_names_it(tmp_path, compilation_cache):
    """Process 1 killed while both exchange data every step: process 0 would wait in its
    next collective forever; the launcher stops it and names process 1 within 60 s."""
    job = launch.start([sys.executable, str(THIS), "collectives", "{}"], processes=2,
                       local_devices=2, log_dir=tmp_path / "logs",
                       compilation_cache=compilation_cache, env=_env(), cwd=REPO,
                       echo=False, grace=5)
    with job:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and job.returncodes() == [None, None]:
            logs = [job.log_file(i).read_text() for i in range(2)]
            if all("step 3 sum" in log for log in logs):
                break
            time.sleep(0.1)
        assert all("step 3 sum 2.0" in job.log_file(i).read_text() for i in range(2)), \
            [job.log_file(i).read_text()[-2000:] for i in range(2)]
        os.kill(job.processes[1].pid, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(launch.LaunchError) as failure:
            job.wait(timeout=120)
        elapsed = time.monotonic() - killed
    message = str(failure.value)
    print(message[:300], f"\n(reported after {elapsed:.1f} s)")
    assert elapsed < 60
    assert failure.value.process_id == 1 and failure.value.returncode == -signal.SIGKILL
    assert message.startswith("process 1 of 2") and "SIGKILL" in message
    assert all(p.poll() is not None for p in job.processes)
    assert "process_index 0 of 2" in job.log_file(0).read_text()
    assert "process_index 1 of 2" in job.log_file(1).read_text()


def test_a_signal_to_one_process_stops_all_at_the_same_step(tmp_path, compilation_cache):
    """`loop.train_loop` over 2 processes: SIGTERM reaches process 1 only; both stop after
    the same (log) step, save it together and end as SIGTERM asks, even when process 1
    takes seconds longer than process 0 to close its files (without a shutdown together,
    process 0's exit took the coordination service away and process 1 aborted)."""
    workdir = tmp_path / "run"
    job = launch.start([sys.executable, str(THIS), "train-loop",
                        json.dumps({"workdir": str(workdir), "slow_close_process": 1})],
                       processes=2, local_devices=2, log_dir=tmp_path / "logs",
                       compilation_cache=compilation_cache, env=_env(), cwd=REPO,
                       echo=False, grace=5)
    with job:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and None in job.returncodes():
            if max(_losses(workdir / "metrics.jsonl", "total") or [0]) >= 4:
                break
            time.sleep(0.05)
        os.kill(job.processes[1].pid, signal.SIGTERM)
        while time.monotonic() < deadline and None in job.returncodes():
            time.sleep(0.05)
        codes = job.returncodes()
    logs = [job.log_file(i).read_text() for i in range(2)]
    assert codes == [-signal.SIGTERM] * 2, (codes, logs)
    stops = [re.findall(r"stopped by SIGTERM at toy step (\d+)", log) for log in logs]
    assert stops[0] == stops[1] and len(stops[0]) == 1, logs
    from jaxdeblur.train import checkpoint as checkpoint_lib
    step = int(stops[0][0])
    assert step % 2 == 0 and checkpoint_lib.CheckpointManager(workdir).latest_step == step
    assert max(_losses(workdir / "metrics.jsonl", "total")) == step


# --- data shards --------------------------------------------------------------------------

class ShardsInOneProcess:
    """The data of an N-process run, read by one process: each global batch is the
    concatenation of the N shards' batches (`data_pipelines.training.ConfigData` with
    ``shard_index`` i of N and ``batch_size / N``), in process order, so that 1 process
    and N processes train on the same global batches."""

    def __init__(self, config, shards: int):
        from data_pipelines.training import ConfigData
        self.config, self.shards, self.data = config, shards, ConfigData(config)

    def train_iterator(self, seed_offset: int = 0):
        from data_pipelines import pipeline
        c = self.config
        self.data.dataset_dir()
        source = pipeline.load_split(c.data.name, c.data.train_split,
                                     pathlib.Path(c.data.data_dir).expanduser(),
                                     config=c.data.config)
        return _Concatenated([pipeline.make_pipeline(
            source, batch_size=c.batch_size // self.shards, crop_size=c.crop_size,
            seed=c.seed + seed_offset, num_workers=c.data.num_workers, shard_index=i,
            shard_count=self.shards) for i in range(self.shards)])

    def eval_batches(self, *, with_kernel_field: bool = False) -> list[dict]:
        return self.data.eval_batches(with_kernel_field=with_kernel_field)


class _Concatenated:
    def __init__(self, iterators):
        self.iterators = iterators

    def __next__(self):
        parts = [next(it) for it in self.iterators]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self):
        return [it.get_state() for it in self.iterators]

    def set_state(self, state):
        for it, s in zip(self.iterators, state):
            it.set_state(s)


def _ufpnet_config(data_dir, flow: str = "ours"):
    from jaxdeblur import configs
    return configs.load("ufpnet_tiny", _as_overrides(
        {**UFPNET_OVERRIDES, "data.data_dir": str(data_dir), "flow_checkpoint": flow}))


def test_each_process_reads_its_own_shard(data_dir, tmp_path, compilation_cache):
    """2 processes x 4 devices: the records each process reads (``index``) are disjoint,
    together they are the global batch the 1-process reference reads, and the globally
    sharded array built from them (`mesh.shard_batch`) holds exactly that batch."""
    out = tmp_path / "shards"
    launch.run([sys.executable, str(THIS), "shards",
                json.dumps({"data_dir": str(data_dir), "out": str(out), "steps": 3})],
               processes=2, local_devices=4, log_dir=tmp_path / "logs", env=_env(),
               cwd=REPO, compilation_cache=compilation_cache, timeout=RUN_TIMEOUT,
               echo=False)
    seen = [json.loads((out / f"process_{i}.json").read_text()) for i in range(2)]
    reference = ShardsInOneProcess(_ufpnet_config(data_dir), 2).train_iterator(seed_offset=1)
    records = set()
    for step in range(3):
        own = [set(s["local"][step]) for s in seen]
        assert not own[0] & own[1], f"step {step}: both processes read records {own}"
        batch = next(reference)
        expected = [int(i) for i in batch["index"]]
        assert seen[0]["local"][step] + seen[1]["local"][step] == expected
        for s in seen:  # what the jitted step sees, gathered on every process
            assert s["global"][step] == expected
            np.testing.assert_array_equal(np.asarray(s["blurry_sum"][step]),
                                          batch["blurry"].sum(axis=(1, 2, 3)))
        records |= own[0] | own[1]
    assert records == {0, 1, 2, 3}  # the 4 training tiles, 2 per process


# --- UFPNet -------------------------------------------------------------------------------

def _kill_tree(pids) -> None:
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _launcher_pids(log: pathlib.Path) -> dict[int, int]:
    # The whole line (newline included): a line being written has a truncated pid.
    match = re.search(r"pids ((?:\d+:\d+ ?)+)\n", log.read_text()) if log.exists() else None
    if not match:
        return {}
    return {int(i): int(p) for i, p in (item.split(":") for item in match.group(1).split())}


def _npz(path) -> dict:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _assert_params_close(ours, theirs, what, atol=1e-6):
    assert ours.keys() == theirs.keys(), what
    worst = max(float(np.abs(ours[k] - theirs[k]).max()) for k in ours)
    print(f"{what}: max |2 processes - 1 process| = {worst:.3g}")
    assert worst <= atol, f"{what}: parameters differ by {worst}"


@pytest.mark.slow
def test_ufpnet_two_processes_equal_one_and_resume_after_sigkill(data_dir, tmp_path,
                                                                  compilation_cache):
    if not ASSET_FLOW.exists():
        pytest.skip(f"the shipped flow prior {ASSET_FLOW} is absent")
    # 1 process x 8 devices, reading both shards itself: the reference.
    reference = tmp_path / "one_process"
    launch.run([sys.executable, str(THIS), "ufpnet-reference",
                json.dumps({"data_dir": str(data_dir), "workdir": str(reference)})],
               processes=1, local_devices=8, log_dir=tmp_path / "logs_reference",
               compilation_cache=compilation_cache, env=_env(), cwd=REPO,
               timeout=RUN_TIMEOUT, echo=False)

    # 2 processes x 4 devices, the documented commands; process 1 is killed once stage III
    # has checkpointed step 4 and logged 3 more steps.
    workdir = tmp_path / "two_processes"
    command = [sys.executable, "-m", "jaxdeblur.launch", "--processes", "2",
               "--local-devices", "4", "--grace", "5", "--timeout", str(RUN_TIMEOUT),
               "--compilation-cache", str(compilation_cache), "--",
               sys.executable, "train_scripts/ufpnet.py", f"--workdir={workdir}",
               *config_flags({**UFPNET_OVERRIDES, "data.data_dir": str(data_dir)})]
    stage3 = workdir / "stage3"
    first_log = tmp_path / "first.log"
    pids: dict[int, int] = {}
    with open(first_log, "w") as out:
        launcher = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=_env(),
                                    cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        killed_at = None
        while time.monotonic() < deadline and launcher.poll() is None:
            pids = pids or _launcher_pids(first_log)
            steps = _losses(stage3 / "metrics.jsonl", "loss")
            if pids and steps and max(steps) >= RESUME_STEP + NEXT_LOSSES:
                os.kill(pids[1], signal.SIGKILL)
                killed_at = time.monotonic()
                break
            time.sleep(0.02)
        assert killed_at is not None, first_log.read_text()[-5000:]
        launcher.wait(timeout=90)
        elapsed = time.monotonic() - killed_at
    finally:
        _kill_tree(pids.values())
        _kill_tree([launcher.pid])
        launcher.wait()
    output = first_log.read_text()
    print(f"launcher ended {elapsed:.1f} s after the SIGKILL:",
          output[output.find("[launch] error"):][:200])
    assert launcher.returncode == 1 and elapsed < 60
    assert re.search(r"\[launch\] error: process 1 of 2 \(pid \d+\) was killed by SIGKILL",
                     output), output[-3000:]
    killed_run = _losses(stage3 / "metrics.jsonl", "loss")
    from jaxdeblur.train import checkpoint as checkpoint_lib
    # Killed before its next checkpoint (which needs process 1 to be written).
    assert checkpoint_lib.CheckpointManager(stage3).latest_step == RESUME_STEP

    # Restart: both stages resume (stage II is complete, stage III from step 4).
    restart_log = tmp_path / "restart.log"
    with open(restart_log, "w") as log:
        restart = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=_env(),
                                 cwd=REPO, timeout=RUN_TIMEOUT + 60)
    assert restart.returncode == 0, restart_log.read_text()[-5000:]
    resumed = _losses(stage3 / "metrics.jsonl", "loss")
    assert sorted(resumed) == list(range(1, UFPNET_OVERRIDES["stage3.num_steps"] + 1))
    for step in range(RESUME_STEP + 1, RESUME_STEP + NEXT_LOSSES + 1):
        np.testing.assert_allclose(resumed[step], killed_run[step], rtol=1e-6,
                                   err_msg=f"stage III step {step} after the restart")

    # The finished 2-process run equals the 1-process run.
    for stage, key in (("stage2", "l_ke"), ("stage3", "loss")):
        ours = _losses(workdir / stage / "metrics.jsonl", key)
        theirs = _losses(reference / stage / "metrics.jsonl", key)
        assert ours.keys() == theirs.keys() and ours, (stage, ours, theirs)
        assert all(np.isfinite(list(ours.values())))
        np.testing.assert_allclose([ours[s] for s in sorted(ours)],
                                   [theirs[s] for s in sorted(ours)], rtol=1e-6,
                                   err_msg=f"{stage} {key}")
    _assert_params_close(_npz(workdir / "stage2" / "kernel_estimator.npz"),
                         _npz(reference / "stage2" / "kernel_estimator.npz"), "stage II")
    _assert_params_close(_npz(workdir / "stage3" / "ufpnet.npz"),
                         _npz(reference / "stage3" / "ufpnet.npz"), "stage III")

    # One checkpoint, readable by one process, holding the final parameters; files once.
    newest = checkpoint_lib.restore_newest_step(stage3)
    assert newest.directory.name == str(UFPNET_OVERRIDES["stage3.num_steps"])
    assert sorted(p.name for p in (stage3 / "checkpoints").iterdir()) == ["4", "8"]
    from jaxdeblur import convert
    saved = convert.flatten_variables(
        checkpoint_lib.find_variables(newest.state, ("kernel_extra", "intro")))
    _assert_params_close({k: np.asarray(v) for k, v in saved.items()},
                         _npz(stage3 / "ufpnet.npz"), "checkpoint vs ufpnet.npz", atol=0)
    samples = sorted(p.name for p in (stage3 / "samples").iterdir())
    assert samples == ["step_0000000_0.png", "step_0000008_0.png"]
    from PIL import Image
    for name in samples:
        ours = np.asarray(Image.open(stage3 / "samples" / name), np.int16)
        theirs = np.asarray(Image.open(reference / "stage3" / "samples" / name), np.int16)
        assert np.abs(ours - theirs).max() <= 1, name
    assert json.loads((workdir / "summary.json").read_text())["loss_last"]["step"] == 8


# --- Deep EM ------------------------------------------------------------------------------

@pytest.mark.slow
def test_deep_em_two_processes_equal_one(tmp_path, compilation_cache):
    """8 images: 1 process x 8 devices, and 2 processes x 4 devices (images 0-3 on process
    0, 4-7 on process 1, one per device); results gathered and written once."""
    from PIL import Image
    from skimage import data as skimage_data
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    camera = skimage_data.camera()
    for i in range(8):
        Image.fromarray(camera[100 + 24 * i:116 + 24 * i, 180:196]).save(inputs / f"c{i}.png")
    runs = {}
    for processes, devices in ((1, 8), (2, 4)):
        workdir = tmp_path / f"mcem_{processes}x{devices}"
        logs = launch.run(
            [sys.executable, "train_scripts/mcem.py", f"--workdir={workdir}",
             *config_flags(MCEM_OVERRIDES), str(inputs)],
            processes=processes, local_devices=devices, log_dir=tmp_path / f"logs_{processes}",
            compilation_cache=compilation_cache, cwd=REPO, timeout=RUN_TIMEOUT, echo=False,
            # the launcher adds each process's device count to these flags
            env=dict(_env(), XLA_FLAGS=FAST_COMPILE_FLAGS))
        runs[processes] = workdir
        if processes == 2:
            assert "wrote" in (logs / "process_0.log").read_text()
            assert "wrote" not in (logs / "process_1.log").read_text()
    one, two = (json.loads((runs[n] / "summary.json").read_text())["images"] for n in (1, 2))
    assert sorted(one) == sorted(two) == [f"c{i}" for i in range(8)]
    for name in one:
        for field in ("data_fit", "uncertainty_max", "uncertainty_mean"):
            np.testing.assert_allclose(two[name][field], one[name][field], rtol=1e-6,
                                       err_msg=f"{name} {field}")
        for suffix in ("restored", "kernels", "uncertainty"):
            a, b = (np.asarray(Image.open(runs[n] / f"{name}_{suffix}.png")) for n in (1, 2))
            np.testing.assert_array_equal(a, b, err_msg=f"{name}_{suffix}.png")
    fits = [_metrics(runs[n] / "metrics_16x16x1.jsonl") for n in (1, 2)]
    assert [line["step"] for line in fits[1]] == [1]  # written once, all 8 fits
    np.testing.assert_allclose(fits[1][0]["data_fit"], fits[0][0]["data_fit"], rtol=1e-6)
    # One checkpoint of the whole batch, saved by both processes together.
    from jaxdeblur.train import checkpoint as checkpoint_lib
    newest = checkpoint_lib.restore_newest_step(runs[2] / "16x16x1")
    assert {np.shape(leaf)[0] for leaf in jax.tree.leaves(newest.state)} == {8}


# --- the worker ---------------------------------------------------------------------------

def _worker(mode: str, args: dict) -> None:
    """What a launched process of this file runs: ``python tests/test_multiprocess.py
    <mode> <json args>``."""
    from jax.experimental import multihost_utils

    from jaxdeblur.train import mesh
    info = mesh.initialize_distributed(False)
    print(f"process_index {info['process_index']} of {info['process_count']}, "
          f"{info['local_device_count']} of {info['device_count']} devices", flush=True)
    if mode == "collectives":
        m = mesh.make_mesh()
        total = jax.jit(lambda x: x.sum(), out_shardings=mesh.replicated_sharding(m))
        ones = np.ones(jax.local_device_count(), np.float32) / jax.local_device_count()
        for step in range(1, 3000):  # killed long before the end
            value = float(total(mesh.shard_batch(ones, m)))
            print(f"step {step} sum {value}", flush=True)
            time.sleep(0.1)
    elif mode == "train-loop":
        from jaxdeblur.train import loop
        m = mesh.make_mesh()
        state, start, checkpoints, writer = loop.resume(
            {"total": np.zeros((), np.float32)}, args["workdir"], model_config={"test": 1},
            async_save=False)
        state = mesh.replicate(state, m)
        add = jax.jit(lambda s, b: ({"total": s["total"] + b.sum()},
                                    {"total": s["total"] + b.sum()}),
                      out_shardings=mesh.replicated_sharding(m))

        def next_batch():
            time.sleep(0.05)
            return mesh.shard_batch(np.ones(jax.local_device_count(), np.float32), m)

        if jax.process_index() == args.get("slow_close_process", -1):
            # A peer still closing its files when process 0 (which hosts the
            # coordination service) ends: the case that loaded machines produce by chance.
            close = writer.close
            writer.close = lambda: (time.sleep(3), close())[1]
        loop.train_loop(state, add, start=start, num_steps=2000, checkpoints=checkpoints,
                        writer=writer, log_every=2, eval_every=10 ** 6,
                        checkpoint_every=10 ** 6, next_batch=next_batch,
                        sync_checkpoints=True, name="toy")
    elif mode == "shards":
        from data_pipelines.training import ConfigData
        config = _ufpnet_config(args["data_dir"])
        m = mesh.make_mesh()
        it = ConfigData(config).train_iterator(seed_offset=1)
        seen = {"local": [], "global": [], "blurry_sum": []}
        for _ in range(args["steps"]):
            raw = next(it)
            seen["local"].append([int(i) for i in raw["index"]])
            batch = mesh.shard_batch({"index": raw["index"].astype(np.int32),
                                      "blurry": raw["blurry"]}, m)
            assert batch["blurry"].shape[0] == config.batch_size
            whole = multihost_utils.process_allgather(batch, tiled=True)
            seen["global"].append([int(i) for i in whole["index"]])
            seen["blurry_sum"].append(whole["blurry"].sum(axis=(1, 2, 3)).tolist())
        out = pathlib.Path(args["out"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"process_{jax.process_index()}.json").write_text(json.dumps(seen))
    elif mode == "ufpnet-reference":
        from jaxdeblur.train import ufpnet
        assert jax.process_count() == 1 and jax.device_count() == 8, jax.devices()
        config = _ufpnet_config(args["data_dir"])
        ufpnet.train_and_evaluate(config, args["workdir"],
                                  data=ShardsInOneProcess(config, shards=2))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _worker(sys.argv[1], json.loads(sys.argv[2]))
