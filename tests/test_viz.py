"""Tests for jaxdeblur.viz: figures are written, have the planned pixel sizes, and
survive edge cases (gray, RGBA, tiny images, flat kernels)."""

import json

import numpy as np
import pytest
from PIL import Image

from jaxdeblur import viz


def _png_size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def _image(shape, seed=0):
    return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def _kernels(n, k=9):
    kernels = np.zeros((n, k, k), np.float32)
    for i in range(n):
        kernels[i, k // 2, : i % k + 1] = 1.0
        kernels[i] /= kernels[i].sum()
    return kernels


@pytest.mark.parametrize("shape", [(60, 90, 3), (60, 90), (60, 90, 1), (60, 90, 4), (3, 2, 3)])
def test_kernel_field_figure(tmp_path, shape):
    grid = (2, 3) if shape[0] > 3 else (1, 1)
    centres = viz.grid_centres(shape, grid)
    kernels = _kernels(len(centres))
    kernels[0] = 0.0  # an all-zero kernel must not divide by zero
    path = viz.kernel_field_figure(_image(shape), kernels, centres, tmp_path / "k.png",
                                   title="kernels", width_px=300)
    width, height = _png_size(path)
    assert width == 300
    assert height == round(300 * shape[0] / shape[1]) + 30


def test_sample_kernel_field_picks_grid_centres():
    field = np.zeros((20, 30, 5, 5), np.float32)
    field[..., 2, 2] = np.arange(20 * 30, dtype=np.float32).reshape(20, 30)
    kernels, centres = viz.sample_kernel_field(field, (2, 3))
    assert kernels.shape == (6, 5, 5) and centres.shape == (6, 2)
    np.testing.assert_allclose(centres[0], (5.0, 5.0))
    assert kernels[0, 2, 2] == 5 * 30 + 5
    with pytest.raises(ValueError, match="kernel field"):
        viz.sample_kernel_field(np.zeros((20, 30, 5)), (2, 2))


@pytest.mark.parametrize("shape", [(64, 48, 3), (64, 48), (5, 7, 1), (1, 1, 3)])
def test_comparison_figure(tmp_path, shape):
    blurry, restored = _image(shape, 1), _image(shape, 2)
    path = viz.comparison_figure([blurry, restored], ["blurry", "restored 25.0 dB"],
                                 tmp_path / "cmp.png", width_px=400)
    width, height = _png_size(path)
    assert width == 400
    crop = viz.detail_crop(restored, max(1, min(shape[:2]) // 4))
    expected = 28 + 200 * shape[0] / shape[1] + 200 * crop[2] / crop[3]
    assert abs(height - expected) <= 1


def test_detail_crop_finds_the_edges():
    image = np.zeros((64, 64), np.float32)
    image[40:, 40:] = np.indices((24, 24)).sum(0) % 2  # a checkerboard in one corner
    y, x, h, w = viz.detail_crop(image, 16)
    assert (h, w) == (16, 16) and y >= 32 and x >= 32


def test_comparison_rejects_mismatched_sizes(tmp_path):
    with pytest.raises(ValueError, match="same size"):
        viz.comparison_figure([_image((8, 8)), _image((8, 9))], ["a", "b"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="title"):
        viz.comparison_figure([_image((8, 8))], ["a", "b"], tmp_path / "x.png")


@pytest.mark.parametrize("shape", [(40, 80, 3), (2, 2)])
def test_uncertainty_figure(tmp_path, shape):
    uncertainty = _image(shape[:2], 3)
    path = viz.uncertainty_figure(_image(shape), uncertainty, tmp_path / "u.png", width_px=470)
    width, height = _png_size(path)
    assert width == 470
    assert height == round(200 * shape[0] / shape[1] + 28)
    # A constant-zero map (a single MCEM sample) still draws.
    viz.uncertainty_figure(_image(shape), np.zeros(shape[:2]), tmp_path / "zero.png")
    with pytest.raises(ValueError, match="uncertainty"):
        viz.uncertainty_figure(_image(shape), np.zeros((3, 3, 3, 3)), tmp_path / "bad.png")


def test_training_curves_from_jsonl(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "w") as handle:
        for step in range(0, 100, 10):
            handle.write(json.dumps({"step": step, "loss": 1.0 / (step + 1), "lr": 1e-3}) + "\n")
            if step % 50 == 0:
                handle.write(json.dumps({"step": step, "eval/psnr": 20.0 + step / 10}) + "\n")
        handle.write("\n")
    path = viz.training_curves_figure(metrics, tmp_path / "curves.png", log_scale=["loss"],
                                      width_px=600, panel_height_px=200)
    assert _png_size(path) == (600, 400)  # three metrics: two rows of two panels
    single = viz.training_curves_figure([{"step": 0, "loss": 1.0}], tmp_path / "one.png",
                                        width_px=300, panel_height_px=150)
    assert _png_size(single) == (300, 150)


def test_training_curves_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "loss": 1}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        viz.training_curves_figure(bad, tmp_path / "x.png")
    with pytest.raises(ValueError, match="step"):
        viz.training_curves_figure([{"loss": 1.0}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="numeric"):
        viz.training_curves_figure([{"step": 1, "name": "x"}], tmp_path / "x.png")
