"""UFPNet stage II alone: the kernel-estimation network (KE-Net) trained by re-blurring.

Usage::

  python train_scripts/kernel_estimator.py --config jaxdeblur/configs/ufpnet_tiny.py \
      --workdir runs/kernel_estimator [--tpu] [--config.stage2.num_steps=1000 ...]

The loss, the outputs in ``--workdir`` and the resume are those of
`jaxdeblur.train.kernel_estimator.train_and_evaluate`; the data are the ones
``config.data`` names (`data_pipelines.training.ConfigData`). ``train_scripts/ufpnet.py``
runs this stage and then stage III.
"""

import pathlib

from absl import app, flags
from ml_collections import config_flags

from data_pipelines.training import ConfigData
from jaxdeblur import configs
from jaxdeblur.train import kernel_estimator
from jaxdeblur.train import logging as logging_lib
from jaxdeblur.train import mesh as mesh_lib

_CONFIG = config_flags.DEFINE_config_file("config", str(configs.path("ufpnet_tiny")),
                                          "UFPNet config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/kernel_estimator",
                               "Run directory (created; resumed if present).")
_TPU = flags.DEFINE_bool("tpu", False, "Multi-host set-up: jax.distributed.initialize(), then "
                         "every device of every host.")


def main(argv):
    del argv
    logging_lib.quiet_library_logs(keep_info=flags.FLAGS["verbosity"].present)
    print(f"devices: {mesh_lib.initialize_distributed(_TPU.value)}", flush=True)
    workdir = pathlib.Path(_WORKDIR.value).expanduser().resolve()
    print(f"work dir: {workdir}", flush=True)
    kernel_estimator.train_and_evaluate(_CONFIG.value, workdir, data=ConfigData(_CONFIG.value))


if __name__ == "__main__":
    app.run(main)
