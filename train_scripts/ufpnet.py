"""UFPNet stages II and III: KE-Net by re-blurring, then the kernel-attention NAFNet.

Usage::

  python train_scripts/ufpnet.py                      # tiny default run, a few CPU minutes
  python train_scripts/ufpnet.py --config jaxdeblur/configs/ufpnet_gopro.py \
      --workdir runs/ufpnet_gopro --tpu                # official configuration, all devices

With no flags it loads the pretrained flow shipped with the package, builds the embedded
``synthetic_blur`` data set if needed, trains stage II into ``<workdir>/stage2`` and stage
III into ``<workdir>/stage3``, evaluates on the held-out split and prints the work dir and
a summary. Rerunning the same command resumes both stages exactly. What it trains and
writes: `jaxdeblur.train.ufpnet`. ``--tpu`` runs ``jax.distributed.initialize()`` first
(every host runs the same command). Several processes on one machine (each one host of a
multi-host run, with its own share of every batch)::

  python -m jaxdeblur.launch --processes 2 --local-devices 4 -- \
      python train_scripts/ufpnet.py --workdir runs/ufpnet_2x4
"""

import json
import pathlib

from absl import app, flags
from ml_collections import config_flags

from data_pipelines.training import ConfigData
from jaxdeblur import configs
from jaxdeblur.train import logging as logging_lib
from jaxdeblur.train import mesh as mesh_lib
from jaxdeblur.train import ufpnet

_CONFIG = config_flags.DEFINE_config_file("config", str(configs.path("ufpnet_tiny")),
                                          "UFPNet config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/ufpnet",
                               "Run directory (created; resumed if present).")
_TPU = flags.DEFINE_bool("tpu", False, "Multi-host set-up: jax.distributed.initialize(), then "
                         "every device of every host.")


def main(argv):
    del argv
    logging_lib.quiet_library_logs(keep_info=flags.FLAGS["verbosity"].present)
    print(f"devices: {mesh_lib.initialize_distributed(_TPU.value)}", flush=True)
    workdir = pathlib.Path(_WORKDIR.value).expanduser().resolve()
    print(f"work dir: {workdir}", flush=True)
    summary = ufpnet.train_and_evaluate(_CONFIG.value, workdir, data=ConfigData(_CONFIG.value))
    print(json.dumps(summary, indent=2))
    print(f"work dir: {workdir}", flush=True)


if __name__ == "__main__":
    app.run(main)
