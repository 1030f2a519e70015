"""Stage I of UFPNet: the RealNVP motion-kernel prior (FKP / UFPNet training recipe).

Command (the run that produced the shipped prior ``jaxdeblur/assets/flow_prior.*``)::

  python train_scripts/flow_prior.py --config jaxdeblur/configs/flow_prior.py \
      --workdir runs/flow_prior_mixture --config.num_steps=10000

Result: 10,000 steps (1 M fresh kernels of the calibrated ``mixture``, below; no learning-
rate decay yet) in 36 minutes of wall time on the 2-core development CPU shared with three
other jobs (~0.2 s per step; the mixture draws every family each step). Mean eval-mode
negative log-likelihood on the 2,000 held-out mixture kernels (``eval_seed``; nats per
kernel, logit space, the training objective): 552.4 at step 10,000 (563.0 at 2,500, 557.5
at 5,000, 554.5 at 7,500); the official UFPNet prior (``flow_motion.npz``, converted)
scores 605.0 on the same kernels (``python benchmarks/flow.py --compare``, which also
draws ``docs/flow_samples.png``). On Lai et al.'s 4 measured kernels (8 rotations/flips
each, ``python benchmarks/flow.py --real ../shared/data/lai/kernel_npy``): 569.7 vs the
official 642.9 (the previous shipped prior, trained on ``motion_kernel``, 698.5); on each
calibrated family within 0.1% of a prior trained on that family alone (``--cross-family
--family-prior ...``, benchmarks/README.md). The full official schedule runs to epoch 62
(31,500 steps, the default ``num_steps``, lr halved at steps 20,000 and 25,000 and 30,000);
the schedule does not depend on ``num_steps``, so a shorter run is a prefix of the full one
and rerunning with a larger ``num_steps`` resumes it.

Kernel generators. ``get_config()`` trains on the ``mixture`` of the generators calibrated
to measured camera shake (`generator_settings`; the calibration notes are above it). A
config string selects one family, or ``motion`` for `jaxdeblur.kernels.motion_kernel` with
the public Boracchi–Foi parameters (the data of the prior shipped before, mostly compact
kernels)::

  python train_scripts/flow_prior.py --config jaxdeblur/configs/flow_prior.py:spline \
      --workdir runs/flow_prior_spline --config.num_steps=7500

(``boracchi_foi``, ``gaussian_process``, ``spline`` or ``motion``.)
"""

import ml_collections

#: Generators of `jaxdeblur.kernels.kernel_sampler` that this config can select.
GENERATORS = ("motion", "boracchi_foi", "gaussian_process", "spline", "mixture")

# --- Calibration of the generators to measured camera shake (issue #16) ---------------------
#
# Measures (benchmarks/kernel_stats.py --families, identical for generated and measured
# 19 x 19 kernels): "length" = geodesic diameter of the support (pixels above 5% of the
# maximum), "tortuosity" = that length / the distance between its ends, "thickness" =
# support / (length + 1).
#
# Sources of numbers:
# * Lai et al. 2016, the 4 uniform-set kernels (shared/data/lai/kernel_npy, 31-75 px),
#   fitted into the window by jaxdeblur.kernels.fit_kernel(size=19, fit_size=17,
#   threshold=0.02): lengths 24.0, 18.7, 18.1, 31.4 px (median 21.4), tortuosity 1.67,
#   1.10, 1.07, 2.07, thickness 3.0, 1.8, 1.6, 1.7. Log-normal maximum likelihood on the
#   lengths: median 22.5 px, log-sigma 0.26 (ddof 1).
# * Levin et al. 2009 ("Understanding and evaluating blind deconvolution algorithms"),
#   8 measured kernels in windows of 13-27 px (19, 17, 15, 27, 13, 21, 23, 23; SPEC.md
#   section 5): the log-sigma of those sizes, 0.22, agrees with Lai's 0.26; 5 of the 8
#   (and all 4 of Lai's) are larger than the 17-px fit, so ~3/4 of real kernels fill the
#   window after fitting.
# * Koehler et al. 2012 ("Recording and playback of camera shake"): 12 shakes (2 of each
#   of 6 people) recorded over 1/3 s at 500 Hz, played back over a 1 s exposure. Their
#   kernels vary over the image and are not in shared/data: no pixel figure of theirs is
#   used.
# * GoPro (Nah et al. 2017): a blurry frame averages 7-13 consecutive sharp frames at
#   240 fps, so exposures differ by up to 13/7: the Boracchi-Foi exposure_min/exposure_max
#   is 7/13.
#
# Fitting: log-sigma 0.26 (Lai) for every family. A drawn length is the length of the
# path before the window fit; paths that wander or double back measure shorter than they
# are drawn and long ones are shrunk by the fit, so each family's median is the one whose
# kernels' median measured length reaches ~18 px, where the 17-px fit saturates (Lai's
# 21.4 needs their tortuosity); 60-70% of draws are then shrunk by the fit (Lai + Levin:
# 9 of 12). Boracchi-Foi exposure: with the public shake parameters the exposed path
# curls into scribbles already at exposures 0.11-0.2 of the 2000 steps (median length
# 10 px, thickness 2.5, q90 3.4); of the ranges tried (exposure_max 0.03-0.2, ratio 7/13),
# 0.032-0.06 (65-120 exposed steps) comes closest to the measured thickness and length.
_FIT_SIZE = 17
_REAL_THRESHOLD = 0.02
_LOG_SIGMA = 0.26
_LENGTH_RANGE = dict(minimum=6.0, maximum=120.0)
_GOPRO_EXPOSURE_RATIO = 7.0 / 13.0
_BF_EXPOSURE_MAX = 0.06


def _length(median: float) -> dict:
    return dict(median=median, log_sigma=_LOG_SIGMA, **_LENGTH_RANGE)


def generator_settings(name: str) -> ml_collections.ConfigDict:
    """The config section of a calibrated kernel generator (`jaxdeblur.kernels`).

    Args:
      name: ``boracchi_foi``, ``gaussian_process``, ``spline`` or ``mixture``.

    Returns:
      a ConfigDict with every field of the generator's frozen config
      (`jaxdeblur.kernels.generator_config` converts it).
    """
    families = dict(
        # Shake dynamics of the public generator (Boracchi & Foi's code, also DeblurGAN's):
        # 2000 steps, a 60-px canvas path, anxiety 0.1 U, big shakes 0.2 U, centripetal
        # 0.7 U, Gaussian shake 10 U.
        boracchi_foi=dict(
            length=_length(30.0), exposure_min=_BF_EXPOSURE_MAX * _GOPRO_EXPOSURE_RATIO,
            exposure_max=_BF_EXPOSURE_MAX, n_steps=2000, canvas_length=60.0,
            anxiety_max=0.1, big_shake_prob_max=0.2, centripetal_max=0.7,
            gaussian_shake_max=10.0, fit_size=_FIT_SIZE),
        # Schuler et al. / deepinv MotionBlurGenerator: Matern nu = 3/2, l = 0.3 over a
        # unit exposure (deepinv's sigma = 0.25 only scales the path, which the length law
        # sets here).
        gaussian_process=dict(
            length=_length(45.0), n_steps=512, duration=1.0, lengthscale=0.3,
            smoothness=1.5, fit_size=_FIT_SIZE),
        spline=dict(length=_length(35.0), n_control=4, n_steps=512, fit_size=_FIT_SIZE),
    )
    if name in families:
        return ml_collections.ConfigDict(families[name])
    if name == "mixture":
        # Boracchi-Foi (the SPEC's generator, constant speed), Gaussian process and spline
        # (smooth, with bright spots where they slow down, as measured kernels have).
        return ml_collections.ConfigDict(dict(families, weights=(0.4, 0.3, 0.3)))
    raise ValueError(f"no calibrated generator {name!r}; choose one of {GENERATORS[1:]}")


def get_config(generator: str = "mixture") -> ml_collections.ConfigDict:
    """The stage-I config; ``generator`` (the config string after ``flow_prior.py:``)
    selects the kernels it trains on (`GENERATORS`)."""
    if generator not in GENERATORS:
        raise ValueError(f"unknown kernel generator {generator!r}; choose one of {GENERATORS}")
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Architecture of the official KernelPrior (UFPNet, FKP x4 configuration).
    config.model = ml_collections.ConfigDict(dict(
        kernel_size=19, n_blocks=5, hidden_size=25, n_hidden=1, alpha=1e-6))

    # The kernels drawn fresh at every step: jaxdeblur.kernels.kernel_sampler(generator,
    # kernels, kernel_size). For "motion", keyword arguments of motion_kernel.
    config.generator = generator
    config.kernels = (ml_collections.ConfigDict(dict(canvas=64, n_steps=2000, max_length=60.0))
                      if generator == "motion" else generator_settings(generator))
    # Measured kernels (benchmarks/flow.py --real): jaxdeblur.kernels.fit_kernel settings.
    config.real_kernels = ml_collections.ConfigDict(dict(
        fit_size=_FIT_SIZE, threshold=_REAL_THRESHOLD))
    config.dequantization_scale = 1.0 / 720.0

    # Optimisation (FKP defaults): Adam with L2 weight decay (torch.optim.Adam's
    # weight_decay adds wd * param to the gradient before the moment estimates).
    config.batch_size = 100
    config.steps_per_epoch = 500  # 50,000 fresh kernels per epoch
    config.num_steps = 31_500  # the official checkpoint: epoch 62
    config.learning_rate = 1e-4
    config.weight_decay = 1e-6
    config.adam_b1 = 0.9
    config.adam_b2 = 0.999
    config.adam_eps = 1e-8
    # lr halved at epochs 40, 50, 60, ...
    config.lr_decay_first_epoch = 40
    config.lr_decay_every_epochs = 10
    config.lr_decay_factor = 0.5

    # Evaluation: mean NLL (eval mode, running statistics) on a fixed held-out set of
    # synthesized, dequantised kernels drawn from eval_seed; a PNG grid of samples.
    config.eval_seed = 12345
    config.num_eval_kernels = 2000
    config.num_sample_kernels = 64
    config.sample_seed = 7

    config.log_every = 100
    config.eval_every = 2500
    config.checkpoint_every = 2500
    config.max_checkpoints = 2
    return config
