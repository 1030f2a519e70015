"""grain worker processes: same batches as in-process, and resumable (own file: each
worker pool takes seconds to start and stop on a loaded 2-core machine)."""

import functools
import json

import numpy as np

from data_pipelines import pipeline


def _source():
    rng = np.random.default_rng(0)
    return [{"blurry": rng.integers(0, 256, (12, 14, 3), dtype=np.uint8),
             "sharp": rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)} for _ in range(5)]


def test_worker_processes_give_the_same_batches_and_resume():
    make = functools.partial(pipeline.make_pipeline, _source(), batch_size=2, crop_size=8,
                             seed=1, shard_index=0, shard_count=1)
    in_process = [next(iterator) for iterator in [make()] for _ in range(5)]
    workers = make(num_workers=2)
    try:
        head = [next(workers) for _ in range(2)]
        state = pipeline.state_to_json(workers)
        json.loads(state)
        tail = [next(workers) for _ in range(3)]
        # Rewinding the running pool: one pool start-up instead of two (each costs seconds);
        # resuming a fresh iterator from a state is covered in-process in test_data_pipeline.
        pipeline.restore_json_state(workers, state)
        again = [next(workers) for _ in range(3)]
    finally:
        workers.close()
    for want, got in zip(in_process, head + tail):
        np.testing.assert_array_equal(want["blurry"], got["blurry"])
        np.testing.assert_array_equal(want["index"], got["index"])
    for want, got in zip(tail, again):
        np.testing.assert_array_equal(want["sharp"], got["sharp"])
