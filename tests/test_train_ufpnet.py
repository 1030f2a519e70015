"""UFPNet training (stages II and III): data parallelism, --tpu set-up, refused checkpoints,
inputs (exact resume after SIGKILL: tests/test_multiprocess.py).

The model here is smaller than the tiny default (two levels, width 4, KE-Net 4/8) so that
each subprocess compiles in seconds; the pretrained 19x19 flow is the real one.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

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


def test_tpu_flag_on_one_host_runs_as_one_process_on_every_local_device():
    """``--tpu`` on a host with no cluster: `mesh.initialize_distributed(True)` finds none
    and the run goes on as one process on all 8 forced CPU devices, saying so.

    The whole ``--tpu`` run (stages II and III, SIGKILL, restart, losses equal past the
    checkpoint) is `tests/test_multiprocess.py`'s UFPNet test, whose launched command
    passes ``--tpu``; a one-process copy of it here cost 3.5 minutes of CI for nothing
    that test does not check.
    """
    code = textwrap.dedent("""
        import json, logging
        logging.basicConfig(level=logging.INFO)
        from jaxdeblur.train import mesh
        print(json.dumps(mesh.initialize_distributed(True)))
    """)
    env = {k: v for k, v in _env(8).items() if not k.startswith("JAXDEBLUR_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["process_count"] == 1 and info["process_index"] == 0
    assert info["device_count"] == info["local_device_count"] == 8
    assert "found no cluster" in out.stderr


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
