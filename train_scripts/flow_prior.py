"""Trains the UFPNet / FKP motion-kernel flow prior on freshly synthesized kernels.

Usage::

  python train_scripts/flow_prior.py --config jaxdeblur/configs/flow_prior.py \
      --workdir runs/flow_prior [--config.num_steps=20000 ...]

What it trains and writes into ``--workdir`` (metrics, checkpoints, sample grids and the
prior as ``flow_prior.npz``/``.json``): `jaxdeblur.train.flow_prior`. Rerunning the same
command resumes.
"""

from absl import app, flags
from ml_collections import config_flags

from jaxdeblur.train import flow_prior
from jaxdeblur.train import logging as logging_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a flow_prior config.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created; resumed if present).")


def main(argv):
    del argv
    logging_lib.quiet_library_logs(keep_info=flags.FLAGS["verbosity"].present)
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required")
    print(flow_prior.train_and_evaluate(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
