"""A fresh worker-process pipeline resumes from a saved state (as a restarted training run
does). Own file: each worker pool takes seconds to start and stop on a loaded 2-core
machine, and `test_data_pipeline_workers.py` already starts one."""

import functools

import numpy as np

from data_pipelines import pipeline


def test_fresh_worker_pipeline_resumes_from_saved_state():
    rng = np.random.default_rng(1)
    source = [{"blurry": rng.integers(0, 256, (12, 14, 3), dtype=np.uint8),
               "sharp": rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)} for _ in range(5)]
    make = functools.partial(pipeline.make_pipeline, source, batch_size=2, crop_size=8,
                             seed=2, shard_index=0, shard_count=1)
    in_process = make()
    expected = [next(in_process) for _ in range(6)]
    first_run = make(num_workers=2)
    try:
        for _ in range(3):
            next(first_run)
        state = pipeline.state_to_json(first_run)
    finally:
        first_run.close()
    resumed = pipeline.restore_json_state(make(num_workers=2), state)
    try:
        again = [next(resumed) for _ in range(3)]
    finally:
        resumed.close()
    for want, got in zip(expected[3:], again):
        np.testing.assert_array_equal(want["blurry"], got["blurry"])
        np.testing.assert_array_equal(want["index"], got["index"])
