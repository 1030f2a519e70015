"""Stage I of UFPNet: the RealNVP motion-kernel prior (FKP / UFPNet training recipe).

Command (the run that produced ``jaxdeblur/assets/flow_prior.*``, on the 2-core CPU
development machine)::

  python train_scripts/flow_prior.py --config train_scripts/configs/flow_prior.py \
      --workdir runs/flow_prior --config.num_steps=STEPS

Result: STEPS steps (RESULT). The official recipe runs to epoch 62 (31,500 steps).
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
