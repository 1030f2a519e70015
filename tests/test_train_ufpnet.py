"""UFPNet training (stages II and III): data parallelism, --tpu set-up, exact resume, inputs.

The model here is smaller than the tiny default (two levels, width 4, KE-Net 4/8) so that
each subprocess compiles in seconds; the pretrained 19x19 flow is the real one.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES_DIR, config_flags
from jaxdeblur import configs

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "train_scripts"
ASSET_FLOW = REPO / "jaxdeblur" / "assets" / "flow_prior.npz"
FIXTURE_FLOW = FIXTURES_DIR / "flow_motion.npz"

OVERRIDES = {
    "model.width": 4, "model.enc_blk_nums": (1, 1), "model.dec_blk_nums": (1, 1),
    "model.ke_widths": (4, 8), "crop_size": 32, "batch_size": 8, "eval_crop_size": 32,
    "num_eval_images": 0, "num_sample_images": 0,
    "data.config": "tiny", "stage2.num_steps": 0, "stage2.log_every": 1,
    "stage2.checkpoint_every": 1, "stage3.num_steps": 10, "stage3.log_every": 1,
    "stage3.checkpoint_every": 3, "stage3.eval_every": 1000, "async_checkpoint": False,
}


def _flow_checkpoint() -> str:
    if ASSET_FLOW.exists():
        return "ours"
    if FIXTURE_FLOW.exists():
        return str(FIXTURE_FLOW)
    pytest.skip("no pretrained flow: neither jaxdeblur/assets/flow_prior.npz nor "
                f"{FIXTURE_FLOW}")


def _config(data_dir, **extra):
    config = configs.load("ufpnet_tiny")
    for key, value in {**OVERRIDES, "flow_checkpoint": _flow_checkpoint(),
                       "data.data_dir": str(data_dir), **extra}.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _env(n_devices=None):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    if n_devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    return env


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The tiny synthetic_blur data set (32² tiles), built once for this file."""
    from data_pipelines import build
    root = tmp_path_factory.mktemp("tfds")
    build.build_dataset("synthetic_blur", data_dir=root, config="tiny")
    return root


@pytest.mark.slow
def test_data_parallel_step_equals_single_device_step():
    """8 forced CPU devices: one sharded step == the same global batch on one device."""
    flow = _flow_checkpoint()
    code = textwrap.dedent(f"""
        import json, sys
        import jax, jax.numpy as jnp, numpy as np
        sys.path.insert(0, {str(REPO / 'tests')!r})
        import test_train_ufpnet as T
        from jaxdeblur.train import kernel_estimator as K, mesh as M, ufpnet as S
        assert jax.device_count() == 8, jax.devices()
        config = T._config("/nonexistent", flow_checkpoint={flow!r})
        model = K.make_model(config)
        flow_variables = K.load_flow_variables(config)
        rng = np.random.default_rng(0)
        batch = {{"blurry": rng.random((8, 32, 32, 3), np.float32),
                  "sharp": rng.random((8, 32, 32, 3), np.float32)}}
        key = jax.random.key(3)
        results = {{}}
        for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
            mesh = M.make_mesh(devices)
            opt = S.make_optimizer(config.stage3)
            variables = K.init_variables(model, 0, flow_variables)
            state = S.init_state(config, model, flow_variables,
                                 variables["params"]["kernel_extra"], opt)
            state = M.replicate(jax.device_get(state), mesh)
            step = S.make_train_step(model, opt, config.stage3, key, mesh)
            state, metrics = step(state, M.shard_batch(batch, mesh))
            results[name] = (jax.device_get(state.params), float(metrics["loss"]),
                             len(state.params["intro"]["kernel"].sharding.device_set))
        one, eight = results["one"], results["eight"]
        diff = max(float(np.abs(a - b).max()) for a, b in
                   zip(jax.tree.leaves(one[0]), jax.tree.leaves(eight[0])))
        print(json.dumps({{"diff": diff, "loss": [one[1], eight[1]],
                          "devices": [one[2], eight[2]]}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=_env(8), capture_output=True,
                         text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(result)
    assert result["devices"] == [1, 8]
    assert result["diff"] < 1e-5
    np.testing.assert_allclose(*result["loss"], rtol=1e-5)


def _metrics(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()
            if line.strip()]


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(data_dir, tmp_path):
    """--tpu on 8 forced CPU devices; SIGKILL after a stage-III checkpoint, then restart.

    The killed run logged some steps past its last checkpoint without interruption; the
    restarted run must log exactly the same losses for those steps.
    """
    workdir = tmp_path / "run"
    cmd = [sys.executable, str(SCRIPTS / "ufpnet.py"), "--tpu", f"--workdir={workdir}",
           *config_flags({**OVERRIDES, "flow_checkpoint": _flow_checkpoint(),
                    "data.data_dir": str(data_dir)})]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, env=_env(8), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    metrics_file = workdir / "stage3" / "metrics.jsonl"
    deadline = time.time() + 1500
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        lines = _metrics(metrics_file) if metrics_file.exists() else []
        steps = [line["step"] for line in lines if "loss" in line]
        if steps and max(steps) >= 5:  # checkpoint at 3, at least two steps beyond it
            proc.send_signal(signal.SIGKILL)
            killed_at = max(steps)
            break
        time.sleep(0.05)
    if proc.poll() is None and killed_at is None:
        proc.kill()
    proc.wait()
    log.close()
    assert killed_at is not None, (tmp_path / "first.log").read_text()[-3000:]
    first = {line["step"]: line for line in _metrics(metrics_file) if "loss" in line}
    out = subprocess.run(cmd, env=_env(8), capture_output=True, text=True, timeout=1500,
                         cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "devices: {" in out.stdout and "'device_count': 8" in out.stdout
    second = {line["step"]: line for line in _metrics(metrics_file) if "loss" in line}
    # Killed as soon as step 5 was logged: the restart resumes from the step-3 checkpoint
    # and recomputes steps 4 and 5, which the killed run had logged uninterrupted.
    overlap = [s for s in first if s > 3]
    assert overlap and max(overlap) >= 5, first.keys()
    for step in overlap:
        np.testing.assert_allclose(second[step]["loss"], first[step]["loss"], rtol=1e-6,
                                   err_msg=f"step {step}")
    assert max(second) == OVERRIDES["stage3.num_steps"]
    assert (workdir / "summary.json").exists() and (workdir / "stage3" / "ufpnet.npz").exists()


def test_checkpoint_from_another_config_is_refused(data_dir, tmp_path):
    from data_pipelines.training import ConfigData
    from jaxdeblur.train import checkpoint, mesh, ufpnet
    config = _config(data_dir, **{"stage2.num_steps": 0, "stage3.num_steps": 1})
    m = mesh.make_mesh(jax.devices()[:1])
    ufpnet.train_and_evaluate(config, tmp_path, data=ConfigData(config), mesh=m)
    other = _config(data_dir, **{"stage2.num_steps": 0, "stage3.num_steps": 1,
                                 "model.width": 8})
    with pytest.raises(checkpoint.CheckpointError, match="another model configuration"):
        ufpnet.train_and_evaluate(other, tmp_path, data=ConfigData(other), mesh=m)


def test_inputs_not_multiple_of_16_and_grayscale():
    """Sides not multiple of 2**levels are reflect-padded and cropped back (as the authors);
    a grayscale input is refused with a hint to replicate it."""
    from jaxdeblur.nets.ufpnet import UFPNet
    model = UFPNet(width=4, enc_blk_nums=(1, 1), dec_blk_nums=(1, 1), ke_widths=(4, 8))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 30, 37, 3)),
                                               key=jax.random.key(1)))
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 30, 37, 3)),
                                               key=jax.random.key(1)), shapes)
    assert out[0].shape == (2, 30, 37, 19, 19) and out[1].shape == (2, 30, 37, 3)
    with pytest.raises(ValueError, match="RGB only"):
        jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 32, 32, 1)),
                                             key=jax.random.key(1)), shapes)
