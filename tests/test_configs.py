"""Tests for the shipped configs as the library reads them: `mcem.hparams_from_config`."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest

from jaxdeblur import configs, mcem


def test_shipped_mcem_config_gives_frozen_hashable_hparams():
    config = configs.load("mcem")
    hparams = mcem.hparams_from_config(config)
    assert hash(hparams) == hash(mcem.hparams_from_config(configs.load("mcem")))
    assert hparams.method.moment_decay == config.moment_decay == 0.9
    assert hparams.method.kernel_centre_weight == config.kernel_centre_weight
    assert hparams.method.image_net.features == tuple(config.image_net.features)
    assert hparams.run.em_iterations == config.em_iterations
    assert mcem.hparams_from_config(hparams) is hparams
    with pytest.raises(dataclasses.FrozenInstanceError):
        hparams.method.step_size = 0.1


def test_json_config_round_trip():
    """A config stored as JSON (checkpoints, summary.json) reads back to equal hparams:
    its lists become tuples."""
    config = configs.load("mcem")
    stored = json.loads(config.to_json())
    assert isinstance(stored["image_net"]["features"], list)
    assert mcem.hparams_from_config(stored) == mcem.hparams_from_config(config)


@pytest.mark.parametrize("path", ["moment_decay", "kernel_centre_weight", "refine_iterations",
                                  "loop", "image_net.norm", "synthetic.seed"])
def test_missing_field_is_named(path):
    config = configs.load("mcem")
    *parents, leaf = path.split(".")
    section = config
    for name in parents:
        section = section[name]
    del section[leaf]
    with pytest.raises(ValueError, match=rf"{path}\b.*missing"):
        mcem.hparams_from_config(config)


@pytest.mark.parametrize("path", ["momentum_decay", "image_net.widht", "kernel_net.depth"])
def test_unknown_field_is_named(path):
    config = configs.load("mcem")
    *parents, leaf = path.split(".")
    section = config
    for name in parents:
        section = section[name]
    section[leaf] = 1
    with pytest.raises(ValueError, match=rf"unknown .*{path}"):
        mcem.hparams_from_config(config)


@pytest.mark.parametrize("overrides, match", [
    ({"sampler": "hmc"}, "config.sampler"),
    ({"temperature": -1.0}, "config.temperature"),
    ({"step_size": 0.0}, "step_size"),
    ({"em_iterations": 0}, "config.em_iterations"),
    ({"log_every": 2.5}, "config.log_every"),
    ({"image_net": 3}, "image_net must be a section"),
])
def test_bad_values_are_named(overrides, match):
    config = configs.load("mcem").to_dict()
    config.update(overrides)
    with pytest.raises(ValueError, match=match):
        mcem.hparams_from_config(config)


def test_mcem_entry_points_check_the_config_first():
    """`deblur` and `build_model` take a ConfigDict and convert it at the boundary: an old
    config without a field fails before anything is traced."""
    config = configs.load("mcem")
    del config["moment_decay"]
    with pytest.raises(ValueError, match="moment_decay"):
        mcem.deblur(jnp.zeros((40, 40, 1)), config, key=jax.random.key(0))
    with pytest.raises(ValueError, match="moment_decay"):
        mcem.build_model((40, 40, 1), config)
    with pytest.raises(ValueError, match="moment_decay"):
        mcem.total_iterations(config)
