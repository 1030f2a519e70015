"""The data a UFPNet training config names, in the form `jaxdeblur.train` runners take.

The library never imports a pipeline (data flows data_pipelines -> train_scripts ->
jaxdeblur); a train script builds `ConfigData` from ``config.data`` and hands it to
`jaxdeblur.train.ufpnet.train_and_evaluate` (or the stage-II runner), which asks it for a
resumable training iterator and the held-out batches.

    data = ConfigData(config)                  # builds synthetic_blur on first use if allowed
    it = data.train_iterator(seed_offset=1)    # this process's share of the global batch
    held_out = data.eval_batches(with_kernel_field=True)
"""

from __future__ import annotations

import pathlib

import jax

from data_pipelines import build, pipeline

#: Data sets whose records rebuild their ground-truth kernel fields (`with_kernel_field`).
WITH_KERNEL_FIELDS = ("synthetic_blur",)


class ConfigData:
    """Training and held-out batches of the data set ``config.data`` names.

    Fields read: ``data.{name, config, data_dir, train_split, eval_split, num_workers,
    build_if_missing}``, ``batch_size`` (global), ``crop_size``, ``eval_crop_size``,
    ``num_eval_images`` and ``seed``.
    """

    def __init__(self, config):
        self.config = config

    def dataset_dir(self) -> pathlib.Path:
        """The prepared data set folder; builds it on first use when
        ``data.build_if_missing`` (the embedded ``synthetic_blur`` needs no download)."""
        data = self.config.data
        data_dir = pathlib.Path(data.data_dir).expanduser()
        try:
            return pipeline.dataset_dir(data.name, data_dir, config=data.config)
        except FileNotFoundError:
            if not data.build_if_missing:
                raise
            print(f"building {data.name} ({data.config}) into {data_dir} ...", flush=True)
            return build.build_dataset(data.name, data_dir=data_dir, config=data.config)

    def _split(self, split: str):
        self.dataset_dir()
        data = self.config.data
        return pipeline.load_split(data.name, split, pathlib.Path(data.data_dir).expanduser(),
                                   config=data.config)

    def train_iterator(self, seed_offset: int = 0):
        """The resumable (``get_state``/``set_state``) iterator of this process's share of
        the global batch: shuffled, augmented ``crop_size`` crops, seeded by
        ``seed + seed_offset`` (each stage its own offset)."""
        config = self.config
        return pipeline.make_pipeline(
            self._split(config.data.train_split),
            batch_size=config.batch_size // jax.process_count(), crop_size=config.crop_size,
            seed=config.seed + seed_offset, num_workers=config.data.num_workers)

    def eval_batches(self, *, with_kernel_field: bool = False) -> list[dict]:
        """The first ``num_eval_images`` held-out examples (centre crops), one per batch;
        with ``with_kernel_field`` their ground-truth kernel fields, where the data set has
        them (`WITH_KERNEL_FIELDS`)."""
        config = self.config
        if config.num_eval_images <= 0:
            return []
        it = pipeline.make_pipeline(
            self._split(config.data.eval_split), batch_size=1,
            crop_size=config.eval_crop_size, seed=config.seed, train=False, shard_index=0,
            shard_count=1,
            with_kernel_field=with_kernel_field and config.data.name in WITH_KERNEL_FIELDS)
        batches = []
        for batch in it:
            batches.append(batch)
            if len(batches) >= config.num_eval_images:
                break
        return batches
