"""Tests for jaxdeblur.convert (flow part): reading state dicts and strict conversion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_fixture

from jaxdeblur import convert, flow


@pytest.fixture(scope="module")
def state_dict():
    data = load_fixture("flow_motion.npz")
    return {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}


def test_flow_round_trip_through_official_names(state_dict):
    variables = convert.flow_variables_from_state_dict(state_dict)
    kernel = variables["params"]["coupling_2"]["s_net"]["Dense_0"]["kernel"]
    np.testing.assert_array_equal(kernel, state_dict["net.4.s_net.0.weight"].T)
    np.testing.assert_array_equal(variables["batch_stats"]["batch_norm_4"]["var"],
                                  state_dict["net.9.running_var"])
    back = convert.flow_state_dict_from_variables(variables, alpha=convert.flow_alpha(
        state_dict))
    assert sorted(back) == sorted(state_dict)
    for key, value in state_dict.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


@pytest.mark.parametrize("features, block", [(361, 0), (361, 1), (49, 2), (50, 3)])
def test_official_mask_is_the_flow_mask(features, block):
    """convert checks official masks without importing the flow (it is the flow's leaf)."""
    np.testing.assert_array_equal(convert.coupling_mask(features, block),
                                  np.asarray(flow.checkerboard_mask(features, block)))


def test_flow_config_from_variables_matches_the_module():
    module = flow.KernelFlow(kernel_size=5, n_blocks=3, hidden_size=8, n_hidden=2)
    variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((2, 5, 5)))
    assert convert.flow_config_from_variables(variables) == {
        "kernel_size": 5, "n_blocks": 3, "hidden_size": 8, "n_hidden": 2}


def test_converted_variables_fit_the_module(state_dict):
    variables = convert.flow_variables_from_state_dict(state_dict)
    expected = jax.eval_shape(flow.KernelFlow().init, jax.random.key(0),
                              jnp.zeros((2, 19, 19)))
    assert jax.tree.structure(expected) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(variables)):
        assert a.shape == b.shape and b.dtype == np.float32
    assert convert.flow_config_from_state_dict(state_dict) == {
        "kernel_size": 19, "n_blocks": 5, "hidden_size": 25, "n_hidden": 1}
    assert convert.flow_alpha(state_dict) == pytest.approx(1e-6)


def test_missing_and_unexpected_keys_are_listed(state_dict):
    broken = dict(state_dict)
    del broken["net.3.beta"]
    broken["net.3.gamma"] = np.zeros(361, np.float32)
    with pytest.raises(ValueError, match="another config") as info:
        convert.flow_variables_from_state_dict(broken)
    assert "net.3.beta" in str(info.value) and "net.3.gamma" in str(info.value)


def test_shape_mismatch_and_other_config(state_dict):
    broken = dict(state_dict, **{"net.0.t_net.2.bias": np.zeros(24, np.float32)})
    with pytest.raises(ValueError, match=r"net\.0\.t_net\.2\.bias: checkpoint \(24,\)"):
        convert.flow_variables_from_state_dict(broken)
    with pytest.raises(ValueError, match="another config"):
        convert.flow_variables_from_state_dict(state_dict, n_blocks=4)
    with pytest.raises(ValueError, match="another config"):
        convert.flow_variables_from_state_dict(state_dict, kernel_size=17)
    with pytest.raises(ValueError, match="another config"):
        convert.flow_variables_from_state_dict(state_dict, hidden_size=32)


def test_unsupported_buffers_are_refused(state_dict):
    with pytest.raises(ValueError, match="mask"):
        convert.flow_variables_from_state_dict(
            dict(state_dict, **{"net.2.mask": state_dict["net.0.mask"]}))
    with pytest.raises(ValueError, match="normalization"):
        convert.flow_variables_from_state_dict(
            dict(state_dict, normalization=np.array([2.0], np.float32)))
    with pytest.raises(ValueError, match="not a flow checkpoint"):
        convert.flow_variables_from_state_dict({"conv.weight": np.zeros((3, 3))})


def test_load_state_dict_npz_layouts(state_dict, tmp_path):
    np.savez(tmp_path / "prefixed.npz", **{f"param/{k}": v for k, v in state_dict.items()},
             **{"meta/epoch": np.array(62)})
    np.savez(tmp_path / "plain.npz", **state_dict)
    for name in ("prefixed.npz", "plain.npz"):
        loaded = convert.load_state_dict(tmp_path / name)
        assert sorted(loaded) == sorted(state_dict)
    with pytest.raises(FileNotFoundError):
        convert.load_state_dict(tmp_path / "absent.npz")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        convert.load_state_dict(tmp_path / "weights.bin")


def test_load_state_dict_torch_wrappers(state_dict, tmp_path):
    torch = pytest.importorskip("torch")
    tensors = {k: torch.from_numpy(v) for k, v in state_dict.items()}
    torch.save({"epoch": 62, "model_state": tensors, "optimizer_state": {}},
               tmp_path / "Flow_motion.pt")
    torch.save(tensors, tmp_path / "bare.pth")
    for name in ("Flow_motion.pt", "bare.pth"):
        loaded = convert.load_state_dict(tmp_path / name)
        assert sorted(loaded) == sorted(state_dict)
        np.testing.assert_array_equal(loaded["net.1.beta"], state_dict["net.1.beta"])
    module, variables = flow.load_pretrained(str(tmp_path / "Flow_motion.pt"))
    assert module.n_blocks == 5


def test_flatten_unflatten_round_trip():
    tree = {"params": {"a": {"b": np.ones(3)}, "c": np.zeros((2, 2))}, "batch_stats": {}}
    flat = convert.flatten_variables(tree)
    assert sorted(flat) == ["params/a/b", "params/c"]
    back = convert.unflatten_variables(flat)
    np.testing.assert_array_equal(back["params"]["a"]["b"], tree["params"]["a"]["b"])


def test_flow_inside_a_ufpnet_checkpoint(state_dict):
    data = load_fixture("ufpnet_tiny.npz")
    ufpnet = {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}
    variables = convert.flow_variables_from_state_dict(ufpnet, prefix="flow.")
    assert convert.flow_config_from_state_dict(convert.select_prefix(ufpnet, "flow.")) == {
        "kernel_size": 19, "n_blocks": 5, "hidden_size": 25, "n_hidden": 1}
    assert variables["params"]["coupling_0"]["s_net"]["Dense_0"]["kernel"].shape == (361, 25)
    with pytest.raises(ValueError, match="no state-dict entries"):
        convert.select_prefix(ufpnet, "kernel_prior.")
