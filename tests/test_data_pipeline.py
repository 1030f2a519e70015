"""grain pipelines: paired augmentation keeps (blurry, sharp, kernel field) aligned,
resumption reproduces batches, per-process shards are disjoint and complete."""

import functools
import itertools
import json

import jax
import numpy as np
import pytest

from data_pipelines import pipeline
from jaxdeblur import blur

H, W, K = 20, 24, 5  # Non-square so that quarter turns change the shape.
CROP = 14  # One crop size everywhere: one compilation of the re-blur.
QUANTISATION = 0.5 / 255 + 1e-5


@functools.lru_cache(maxsize=1)
def _blur_fn():
    return jax.jit(functools.partial(blur.per_pixel_blur, boundary="replicate"))


def _reblur(sharp_uint8, field):
    return np.asarray(_blur_fn()(np.asarray(sharp_uint8, np.float32) / 255.0,
                                 np.asarray(field, np.float32)))


@functools.lru_cache(maxsize=1)
def _records(n: int = 3):
    """Noise-free (blurry, sharp, kernel field, uniform kernel) records, blurry in uint8.

    The kernel field is i.i.d. random per pixel (not a smooth camera-shake field): any
    misplaced pixel of the grid or a kernel flipped the wrong way then shows in the reblur.
    """
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        sharp = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        field = rng.random((H, W, K, K)).astype(np.float32) ** 4
        field /= field.sum(axis=(2, 3), keepdims=True)
        blurry = np.round(np.clip(_reblur(sharp, field), 0, 1) * 255).astype(np.uint8)
        kernel = rng.random((K, K)).astype(np.float32)
        records.append({"blurry": blurry, "sharp": sharp, "kernel_field": field,
                        "kernel": kernel / kernel.sum(), "name": f"r{i}".encode()})
    return records


def _interior_mismatch(blurry, sharp_uint8, field, margin=K // 2):
    """Max |reblur(sharp) - blurry| away from the crop border (padding differs there)."""
    reblurred = _reblur(sharp_uint8, field)
    inner = (slice(margin, -margin), slice(margin, -margin))
    return np.abs(reblurred[inner] - np.asarray(blurry, np.float32)[inner]).max()


@pytest.mark.parametrize("flip_vertical,flip_horizontal,quarter_turns",
                         list(itertools.product((False, True), (False, True), range(4))))
def test_every_rigid_transform_keeps_the_triple_aligned(flip_vertical, flip_horizontal,
                                                        quarter_turns):
    record = _records()[0]
    out = pipeline.transform_example(record, top=3, left=5, crop_size=CROP,
                                     flip_vertical=flip_vertical,
                                     flip_horizontal=flip_horizontal,
                                     quarter_turns=quarter_turns)
    assert out["blurry"].shape == out["sharp"].shape == (CROP, CROP, 3)
    assert out["kernel_field"].shape == (CROP, CROP, K, K)
    mismatch = _interior_mismatch(out["blurry"] / 255.0, out["sharp"], out["kernel_field"])
    assert mismatch <= QUANTISATION
    expected_kernel = np.rot90(record["kernel"][::-1 if flip_vertical else 1,
                                                ::-1 if flip_horizontal else 1], quarter_turns)
    np.testing.assert_array_equal(out["kernel"], expected_kernel)


def test_sharp_frames_move_like_sharp():
    record = dict(_records()[0])
    record["sharp_frames"] = np.stack([record["sharp"], 255 - record["sharp"]])
    out = pipeline.transform_example(record, top=2, left=1, crop_size=9, flip_horizontal=True,
                                     quarter_turns=3)
    assert out["sharp_frames"].shape == (2, 9, 9, 3)
    np.testing.assert_array_equal(out["sharp_frames"][0], out["sharp"])
    np.testing.assert_array_equal(out["sharp_frames"][1], 255 - out["sharp"])


def test_flipping_only_the_grid_is_detected():
    """Control: the check above fails if the kernels are not flipped with the image."""
    record = _records()[0]
    out = pipeline.transform_example(record, flip_horizontal=True)
    wrong_field = out["kernel_field"][:, :, :, ::-1]
    assert _interior_mismatch(out["blurry"] / 255.0, out["sharp"], wrong_field) > 20 / 255


def test_uncropped_rotation_of_whole_images():
    record = _records()[1]
    out = pipeline.transform_example(record, quarter_turns=1)
    assert out["blurry"].shape == (W, H, 3) and out["kernel_field"].shape == (W, H, K, K)
    assert _interior_mismatch(out["blurry"] / 255.0, out["sharp"], out["kernel_field"]) \
        <= QUANTISATION


def test_pipeline_batches_are_aligned_float_and_deterministic():
    source = _records()
    batches = pipeline.make_pipeline(source, batch_size=2, crop_size=CROP, seed=3,
                                     shard_index=0, shard_count=1)
    first = [next(batches) for _ in range(4)]
    for batch in first:
        assert batch["blurry"].shape == (2, CROP, CROP, 3) and batch["blurry"].dtype == np.float32
        assert batch["kernel_field"].shape == (2, CROP, CROP, K, K)
        assert 0.0 <= batch["sharp"].min() and batch["sharp"].max() <= 1.0
        for b in range(2):
            sharp_uint8 = np.round(batch["sharp"][b] * 255)
            assert _interior_mismatch(batch["blurry"][b], sharp_uint8,
                                      batch["kernel_field"][b]) <= QUANTISATION
    again = pipeline.make_pipeline(source, batch_size=2, crop_size=CROP, seed=3,
                                   shard_index=0, shard_count=1)
    for batch, repeat in zip(first, again):
        np.testing.assert_array_equal(batch["blurry"], repeat["blurry"])
    other = next(pipeline.make_pipeline(source, batch_size=2, crop_size=CROP, seed=4,
                                        shard_index=0, shard_count=1))
    assert not np.array_equal(first[0]["blurry"], other["blurry"])


def test_every_epoch_visits_every_record_in_a_new_order():
    source = [{"blurry": np.full((4, 4, 3), i, np.uint8), "sharp": np.full((4, 4, 3), i, np.uint8)}
              for i in range(6)]
    batches = pipeline.make_pipeline(source, batch_size=1, crop_size=None, seed=0,
                                     num_epochs=3, shard_index=0, shard_count=1,
                                     flips=False, rotations=False)
    order = [int(batch["index"][0]) for batch in batches]
    epochs = [order[i:i + 6] for i in range(0, 18, 6)]
    assert len(order) == 18 and all(sorted(e) == list(range(6)) for e in epochs)
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_resume_from_json_state_reproduces_batches():
    make = functools.partial(pipeline.make_pipeline, _records(), batch_size=2, crop_size=10,
                             seed=7, shard_index=0, shard_count=1)
    batches = make()
    _take(batches, 3)
    state = pipeline.state_to_json(batches)
    expected = _take(batches, 4)
    resumed = pipeline.restore_json_state(make(), json.loads(json.dumps(state)))
    for want, got in zip(expected, _take(resumed, 4)):
        for key in ("blurry", "sharp", "kernel_field", "index"):
            np.testing.assert_array_equal(want[key], got[key])


@pytest.mark.parametrize("train", [False, True])
def test_shards_are_disjoint_and_complete(train):
    source = [{"blurry": np.zeros((4, 4, 3), np.uint8), "sharp": np.zeros((4, 4, 3), np.uint8)}
              for _ in range(11)]
    seen = []
    for shard in range(3):
        batches = pipeline.make_pipeline(source, batch_size=2, crop_size=None, seed=0,
                                         train=train, num_epochs=1, shard_index=shard,
                                         shard_count=3, drop_remainder=False)
        seen.append([int(i) for batch in batches for i in batch["index"]])
    flat = sorted(itertools.chain.from_iterable(seen))
    assert flat == list(range(11))  # Complete, and (no duplicates) disjoint.
    assert [len(s) for s in seen] == [4, 4, 3]


def test_evaluation_pipeline_is_a_centre_crop_in_source_order():
    source = _records()
    batches = list(pipeline.make_pipeline(source, batch_size=2, crop_size=8, seed=0,
                                          train=False, shard_index=0, shard_count=1))
    assert [b["blurry"].shape[0] for b in batches] == [2, 1]
    np.testing.assert_array_equal(batches[0]["index"], [0, 1])
    np.testing.assert_array_equal(batches[0]["sharp"][0] * 255,
                                  source[0]["sharp"][6:14, 8:16].astype(np.float32))


def test_bad_arguments_and_records():
    source = _records()
    with pytest.raises(ValueError, match="smaller than crop_size 64"):
        next(pipeline.make_pipeline(source, batch_size=1, crop_size=64, seed=0,
                                    shard_index=0, shard_count=1))
    with pytest.raises(ValueError, match=r"shard_index must be in \[0, shard_count=2\)"):
        pipeline.make_pipeline(source, batch_size=1, crop_size=8, seed=0, shard_index=2,
                               shard_count=2)
    bad = [{**source[0], "sharp": source[0]["sharp"][:-1]}]
    with pytest.raises(ValueError, match="differ in size"):
        next(pipeline.make_pipeline(bad, batch_size=1, crop_size=8, seed=0, shard_index=0,
                                    shard_count=1))
    with pytest.raises(ValueError, match="synthetic_blur records"):
        next(pipeline.make_pipeline(source, batch_size=1, crop_size=8, seed=0, shard_index=0,
                                    shard_count=1, with_kernel_field=True))
