"""Stage I of UFPNet: the RealNVP motion-kernel prior (FKP / UFPNet training recipe).

Command (the run that produced the shipped prior ``jaxdeblur/assets/flow_prior.*``)::

  python train_scripts/flow_prior.py --config jaxdeblur/configs/flow_prior.py \
      --workdir runs/flow_prior --config.num_steps=25000

Result: 25,000 steps (epoch 50, 2.5 M fresh kernels; lr halved once, at step 20,000) in
about 44 minutes of wall time on the 2-core development CPU, shared with other jobs
(~0.1 s per step). Mean eval-mode negative log-likelihood on the 2,000 held-out kernels
(``eval_seed``; nats per kernel, logit space, the training objective): 491.8 at step
25,000 (504.7 at 2,500, 498.3 at 10,000, 493.3 at 20,000); the official UFPNet prior
(``flow_motion.npz``, converted) scores 564.5 on the same kernels — it was trained on
another kernel generator. ``python benchmarks/flow.py --compare`` reproduces both figures
and ``docs/flow_samples.png``. The full official recipe runs to epoch 62 (31,500 steps,
the default ``num_steps``); the learning-rate schedule does not depend on ``num_steps``,
so a shorter run is a prefix of the full one (the shipped run was in fact launched with
the default and stopped by SIGTERM after its step-25,000 evaluation and checkpoint).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Architecture of the official KernelPrior (UFPNet, FKP x4 configuration).
    config.model = ml_collections.ConfigDict(dict(
        kernel_size=19, n_blocks=5, hidden_size=25, n_hidden=1, alpha=1e-6))

    # Keyword arguments of jaxdeblur.kernels.motion_kernel (fresh kernels every step).
    config.kernels = ml_collections.ConfigDict(dict(
        canvas=64, n_steps=2000, max_length=60.0))
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
