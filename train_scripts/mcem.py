"""Deep EM (MCEM) blind deblurring of image files, or of a synthetic example.

    # a synthetic example (skimage camera, smoothly varying kernel field); prints PSNR
    python train_scripts/mcem.py --config jaxdeblur/configs/mcem.py --workdir runs/mcem

    # files and/or folders; same-size images are deblurred together as one batch
    python train_scripts/mcem.py --workdir runs/mcem_real photo1.png blurry_folder/

    # config overrides, e.g. a smaller problem
    python train_scripts/mcem.py --config.kernel_size=15 --config.grid="(2,3)" ...

    # several processes on this machine, each deblurring its share of the batch
    python -m jaxdeblur.launch --processes 2 --local-devices 4 -- \
        python train_scripts/mcem.py --workdir runs/mcem_2x4 blurry_folder/

What it writes into ``--workdir`` (restored images, kernels, uncertainty, ``summary.json``,
metrics, checkpoints every ``config.checkpoint_every`` EM iterations; re-running the same
command resumes): `jaxdeblur.train.mcem.deblur_files`. A NaN or infinite data fit stops
the run with a message; the last good checkpoint is kept. Under `jaxdeblur.launch`, or
with ``--tpu`` on a TPU pod slice / SLURM cluster (every host runs the same command), the
processes split each batch and process 0 writes the results.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from jaxdeblur import configs, mcem
from jaxdeblur.train import logging as logging_lib
from jaxdeblur.train import mcem as mcem_runs
from jaxdeblur.train import mesh as mesh_lib

_CONFIG = config_flags.DEFINE_config_file("config", str(configs.path("mcem")),
                                          "MCEM config file.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/mcem", "Output and checkpoint folder.")
_SHARD = flags.DEFINE_bool("shard", True, "Shard each batch over all devices (data axis) "
                           "when the batch size is a multiple of the device count.")
_TPU = flags.DEFINE_bool("tpu", False, "Multi-host set-up: jax.distributed.initialize(), then "
                         "each process deblurs its share of every batch.")


def main(argv):
    logging_lib.quiet_library_logs(keep_info=flags.FLAGS["verbosity"].present)
    print(f"devices: {mesh_lib.initialize_distributed(_TPU.value)}", flush=True)
    try:
        mcem_runs.deblur_files(_CONFIG.value, _WORKDIR.value, argv[1:], shard=_SHARD.value)
    except mcem.DataFitError as err:
        sys.exit(str(err))
    except FileNotFoundError as err:
        raise app.UsageError(str(err)) from err


if __name__ == "__main__":
    app.run(main)
