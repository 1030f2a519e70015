"""Tests for jaxdeblur.train.flow_prior: a short run, resume, and its outputs."""

import jax
import numpy as np
import pytest

from jaxdeblur.configs import flow_prior as flow_prior_config
from jaxdeblur import flow as flow_lib
from jaxdeblur.train import checkpoint as checkpoint_lib
from jaxdeblur.train import flow_prior
from jaxdeblur.train import logging as logging_lib


def _tiny_config(num_steps):
    config = flow_prior_config.get_config("motion")   # the cheapest generator
    config.model.update(kernel_size=7, n_blocks=2, hidden_size=8)
    config.kernels.update(canvas=16, n_steps=100, max_length=12.0)
    config.batch_size = 8
    config.steps_per_epoch = 2
    config.lr_decay_first_epoch = 2
    config.num_steps = num_steps
    config.num_eval_kernels = 16
    config.num_sample_kernels = 4
    config.log_every = 1
    config.eval_every = 3
    config.checkpoint_every = 3
    return config


def _params(workdir, config):
    module = flow_lib.KernelFlow(**config.model.to_dict())
    _, variables = flow_lib.load_flow(workdir / "flow_prior")
    return module, variables


def test_short_run_writes_metrics_samples_and_a_loadable_prior(tmp_path):
    config = _tiny_config(num_steps=3)
    metrics = flow_prior.train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(metrics["eval_nll"])
    lines = logging_lib.read_metrics(tmp_path / "metrics.jsonl")
    assert [line["step"] for line in lines if "train_nll" in line] == [1, 2, 3]
    assert (tmp_path / "samples" / "step_0000003.png").stat().st_size > 0
    module, variables = _params(tmp_path, config)
    kernels = module.apply(variables, jax.random.normal(jax.random.key(0), (2, 49)),
                           method=flow_lib.KernelFlow.latent_to_kernel)
    assert kernels.shape == (2, 7, 7) and bool(np.all(np.asarray(kernels) >= 0))


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    flow_prior.train_and_evaluate(_tiny_config(num_steps=6), str(straight))
    flow_prior.train_and_evaluate(_tiny_config(num_steps=3), str(interrupted))
    flow_prior.train_and_evaluate(_tiny_config(num_steps=6), str(interrupted))
    def train_lines(workdir):
        lines = logging_lib.read_metrics(workdir / "metrics.jsonl")
        return {line["step"]: line for line in lines if "train_nll" in line}

    a, b = train_lines(straight), train_lines(interrupted)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert b[step]["train_nll"] == pytest.approx(a[step]["train_nll"], rel=1e-6)
    _, va = _params(straight, _tiny_config(6))
    _, vb = _params(interrupted, _tiny_config(6))
    for x, y in zip(jax.tree_util.tree_leaves(va), jax.tree_util.tree_leaves(vb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_checkpoint_of_another_flow_config_is_refused(tmp_path):
    flow_prior.train_and_evaluate(_tiny_config(num_steps=3), str(tmp_path))
    other = _tiny_config(num_steps=6)
    other.model.hidden_size = 16
    with pytest.raises(checkpoint_lib.CheckpointError, match="another model configuration"):
        flow_prior.train_and_evaluate(other, str(tmp_path))
