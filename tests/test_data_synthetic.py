"""The embedded `synthetic_blur` data set (tiny config): stored triples are consistent.

Tolerances: `blurry` is stored as uint8, so re-synthesis with the stored seeds matches it
to within quantisation, |Δ| <= 0.5/255; the noise-free re-blur `per_pixel_blur(sharp, field)`
matches it to within the noise (σ = 0.01) plus quantisation.
"""

import functools

import jax
import numpy as np
import pytest
from PIL import Image

from data_pipelines import build, pipeline, synthetic_blur
from jaxdeblur import blur, kernels

QUANTISATION = 0.5 / 255 + 1e-6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data = tmp_path_factory.mktemp("tfds")
    build.build_dataset("synthetic_blur", data_dir=data, config="tiny")
    return data


@pytest.fixture(scope="module")
def records(data_dir):
    return {split: list(pipeline.load_split("synthetic_blur", split, data_dir))
            for split in ("train", "test")}


_PER_PIXEL_BLUR = jax.jit(functools.partial(blur.per_pixel_blur, boundary="replicate"))


def _reblur(sharp_uint8, field):
    return np.asarray(_PER_PIXEL_BLUR(np.asarray(sharp_uint8, np.float32) / 255.0, field))


def test_splits_and_disjoint_sources(records):
    config = synthetic_blur.SyntheticBlur.builder_configs["tiny"]
    assert len(records["train"]) == 4 and len(records["test"]) == 2
    sources = {split: {r["name"].decode().split("/")[0] for r in rs}
               for split, rs in records.items()}
    assert sources == {"train": set(config.train_sources), "test": set(config.test_sources)}
    for name, builder_config in synthetic_blur.SyntheticBlur.builder_configs.items():
        assert not set(builder_config.train_sources) & set(builder_config.test_sources), name
    for record in records["train"] + records["test"]:
        assert record["blurry"].shape == record["sharp"].shape == (32, 32, 3)
        assert record["sharp"].dtype == np.uint8 and record["sharp"].std() > 5


def test_stored_blurry_is_the_resynthesis_up_to_uint8_rounding(records):
    for record in records["train"] + records["test"]:
        resynthesised = synthetic_blur.resynthesize_blurry(record)
        error = np.abs(record["blurry"] / 255.0 - resynthesised).max()
        assert error <= QUANTISATION, record["name"]


def test_rebuilt_kernel_field_is_exact_and_explains_the_blur(records):
    # The tiny config's documented parameters, independent of the module's cached function.
    direct_field = jax.jit(functools.partial(kernels.kernel_field, image_shape=(32, 32), size=7,
                                             mode="rotation", max_angle_deg=2.0, n_samples=16))
    residuals = []
    for record in records["train"] + records["test"]:
        field = synthetic_blur.rebuild_kernel_field(record)
        assert field.shape == (32, 32, 7, 7) and field.min() >= 0
        np.testing.assert_allclose(field.sum(axis=(2, 3)), 1.0, atol=1e-5)
        assert int(record["kernel_size"]) == 7
        field_key = jax.random.split(jax.random.key(int(record["seed"])))[0]
        np.testing.assert_allclose(field, direct_field(field_key), atol=1e-6)
        residuals.append(record["blurry"] / 255.0 - _reblur(record["sharp"], field))
    residuals = np.stack(residuals)
    sigma = float(records["train"][0]["noise_sigma"])
    assert sigma == pytest.approx(0.01)
    assert np.abs(residuals).max() <= 6 * sigma + QUANTISATION
    assert 0.8 * sigma <= residuals.std() <= 1.2 * sigma


def test_pipeline_with_kernel_field_stays_aligned(data_dir):
    source = pipeline.load_split("synthetic_blur", "train", data_dir)
    batches = pipeline.make_pipeline(source, batch_size=2, crop_size=24, seed=0,
                                     with_kernel_field=True, shard_index=0, shard_count=1)
    batch = next(batches)
    assert batch["kernel_field"].shape == (2, 24, 24, 7, 7)
    for b in range(2):
        reblurred = _reblur(np.round(batch["sharp"][b] * 255), batch["kernel_field"][b])
        inner = (slice(3, -3), slice(3, -3))
        assert np.abs(reblurred[inner] - batch["blurry"][b][inner]).max() <= 0.06 + QUANTISATION


def test_user_sharp_folder_is_split_by_name(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(
            tmp_path / f"user{i}.png")
    data = tmp_path / "data"
    build.build_dataset("synthetic_blur", data_dir=data, config="tiny", sharp_dir=tmp_path)
    names = {split: [r["name"].decode() for r in
                     pipeline.load_split("synthetic_blur", split, data, config="tiny")]
             for split in ("train", "test")}
    assert sorted(n for n in names["train"] if n.startswith("user/")) == [
        "user/user0.png/000", "user/user0.png/001", "user/user1.png/000", "user/user1.png/001"]
    assert sorted(n for n in names["test"] if n.startswith("user/")) == [
        "user/user2.png/000", "user/user2.png/001"]


def test_empty_user_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        build.build_dataset("synthetic_blur", data_dir=tmp_path / "data", config="tiny",
                            sharp_dir=tmp_path / "empty")
    assert not (tmp_path / "data").exists()
