"""Deep EM (MCEM) blind deblurring: the configuration of `train_scripts/mcem.py`.

Command (no image arguments: a synthetic 256x256 example from skimage's camera photo
blurred by a smoothly varying `kernels.kernel_field`; prints PSNR before and after):

    python train_scripts/mcem.py --config jaxdeblur/configs/mcem.py --workdir runs/mcem

Result it reaches (measured, 2-core CPU, moment_decay 0.9): PSNR 26.44 -> 27.25 dB in
59.7 min (5.3 s per EM iteration; `python benchmarks/mcem.py --steps 5` alone: 4.49 s); the
kernels come out shorter than the field's. With the image net at 4x32 and the kernel net at
3x16 (everything else as below), blind recovery of a uniform line blur: 64² crop, 12 px,
18.98 -> 22.42 dB after 400 iterations (tests/test_mcem.py); 128² crop, 11 px,
20.37 -> 22.29 dB after 600, and with step_size 0.02 24.13 dB after 1500 and 24.36 dB after
2200 and 2550 with kernel cosine 0.96 (a plateau; README.md, "Deep EM"). With the true
kernel given (non-blind, `--known-kernel`) the same sampler reaches only 22.83 dB after 900
and 23.2 dB after 1350: the noisy chain, not the kernel, limits the posterior mean. A cold
refinement phase after the 1500 EM iterations (refine_iterations = 1200, below) takes the
128² recovery to 25.42 dB (+5.05 dB) with kernel cosine 0.984.

Every number of the method lives here; (paper) = Li et al. CVPR 2023, (measured) = chosen by
the measurement quoted beside it, (ours) = a default not tuned for lack of CPU time. The
library has no defaults of its own: `jaxdeblur.mcem.hparams_from_config` requires every
field below and rejects any other, naming it.
"""

import ml_collections

def get_config() -> ml_collections.ConfigDict:
    """Returns the MCEM configuration."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Blur model: filter flow of grid_size cells, kernel_size x kernel_size kernels.
    c.kernel_size = 31
    c.grid = (6, 8)
    c.blur_method = "auto"

    # Image network T_f (paper: 5-level U-Net, 64 channels). (measured, 128² recovery,
    # step 0.02) 4x64 instead of 4x32: 20.68 vs 22.46 dB after 500 iterations, 2.2x the time.
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
    # (measured, 128² recovery below, step 0.02, data noise 0.01) A broader likelihood as
    # regularisation is worse: sigma 0.02 -> 20.45 dB, 0.03 -> 21.77 dB after 700 iterations
    # (0.01: 23.1). Data noise 0.005 (sigma 0.01 or 0.005): the kernel shrinks (cosine
    # 0.73 / 0.66, ~20.2 dB after 600): the blind estimate needs the chain's noise.
    c.noise_sigma = 0.01
    c.weight_decay = 1e-4

    # E-step sampler (paper: lr 0.01 for T_f). (measured) E-step alone with the true 9x9
    # kernel, 32² crop, image net (16,)*3: step 0.01 -> 37.5 dB after 600 steps, 1e-3 ->
    # 37.0 dB; 0.01 is also ~3 dB ahead after 100-300 steps. Blind, the 128² recovery above
    # with moment_decay 0.9: 0.01 -> 23.17 dB, kernel cosine 0.90 after 1500 iterations;
    # 0.02 -> 24.13 dB, cosine 0.96; a decaying 0.02 (1 + t/1000)^-0.55 (Welling & Teh) ->
    # 21.4 dB after 950: at this noise the chain mostly drifts (the injected noise is ~1e-3
    # of a parameter per step against ~alpha of drift), and the image sharpens only as fast
    # as it drifts. The default stays the paper's 0.01 until measured with its networks.
    c.sampler = "psgld"
    c.step_size = 0.01
    c.psgld_decay = 0.99
    # (measured) lambda = 1e-5 (Li et al.) lets a parameter whose gradient vanishes take
    # noise steps of up to sqrt(2 alpha / lambda) = 45: a batch-of-4 run and four single runs
    # (same keys, 18² images, 2 EM iterations) then differed by 0.094 in the image, because
    # 1e-7 rounding differences in ~0 gradients change G by orders of magnitude. With 1.0
    # (gradients of this likelihood are ~1e4, so G = 1/sqrt(V) is unaffected where it
    # matters) they differed by 2.5e-3. Its effect on deblurring PSNR was not measured.
    # (measured, 128² recovery, step 0.02) eps 1e-5 -> kernel cosine 0.72, 20.35 dB after
    # 450 iterations; eps 5 -> cosine 0.74, 20.29 dB after 800 (1.0: 0.94, 23.4 dB).
    c.psgld_eps = 1.0
    # Noise temperature of the sampler (1 = the posterior; 0 = RMSprop, no noise).
    # (measured, 128² recovery, step 0.02) 0.3 -> the kernel shrinks (cosine 0.72, 19.96 dB
    # after 700 iterations). With the true kernel given, 0 (MAP) sharpens faster than 1:
    # 24.39 vs 22.83 dB after 900 iterations (step 0.01 vs 0.02).
    c.temperature = 1.0
    # (measured) n_s = 10 (burn-in 5) per M-step was worse than 5 on the recovery run above
    # (18.8 vs 23.0 dB after 500 iterations): the kernel then moves too little per image step.
    c.e_step_steps = 5
    c.e_step_burn_in = 2
    # Steps per jitted call and their form. loop "auto": unrolled on the CPU, lax.scan on
    # GPU/TPU (jaxdeblur.mcem.loop, benchmarks/README.md). e_step_chunk "auto": the whole
    # E-step per call as a scan; unrolled, at most 5 steps per call, since unrolled compile
    # time grows with the steps (20 steps at 64²: 160 s).
    c.e_step_chunk = "auto"
    c.loop = "auto"

    # M-step (paper: lr 1e-4). (measured, 64² camera crop, 15x15 line kernel of 12 px,
    # uniform model, 800 EM iterations; python benchmarks/mcem.py --recovery uniform):
    # 1e-3 -> 18.98 to 23.25 dB, kernel L1 error 0.32 (flat kernel: 1.75); 1e-4 -> the image
    # drifted off (11.2 dB); 3e-3 (and 1e-2) -> the kernel shrinks towards a delta while the
    # image network fits the blurry image (the no-blur solution, no gain in PSNR).
    c.m_step_lr = 1e-3
    c.m_step_steps = 1
    c.m_step_chunk = "auto"
    c.m_step_variance_term = True
    # (measured) Moments of the image samples that the M-step and the result use: each new
    # E-step multiplies the earlier samples' weight by moment_decay (0 = only this E-step's
    # n_s - burn_in = 3 samples, the paper's MCEM; rho > 0 = stochastic-approximation EM
    # over the chain's recent past, ~3 / (1 - rho) samples). With 3 samples the variance
    # term of Q is underestimated and the M-step behaves like joint MAP, which favours short
    # kernels. 128² camera crop, 11 px line kernel (15x15), noise 0.01, image net 4x32,
    # kernel net 3x16, 600 iterations (python benchmarks/mcem.py --recovery uniform):
    # rho = 0 -> kernel cosine 0.70, 20.37 -> 20.13 dB (best 20.9 dB at iteration 200, then
    # the kernel shrank to half its length); 0.9 -> cosine 0.88, 22.29 dB, still rising
    # (23.17 dB at 1500); 0.97 -> cosine 0.79, 20.54 dB (moments lag the moving chain).
    c.moment_decay = 0.9
    # (ours) Penalty weight on the squared centre of mass of each kernel (pixels²) in the
    # M-step. Shifting kernel and image together leaves the data fit unchanged, so without
    # it the kernel drifted to the window's corner (cut off there) and the image came out
    # shifted by 3-4 px (measured: 64² crop, 9x9 kernel, 11.1 dB vs 21.4 blurry).
    c.kernel_centre_weight = 1e-3
    # The two methods composed: UFPNet's normalising-flow motion prior as a prior term of
    # the M-step, kernel_prior_weight * -log p_flow(k) per kernel in the units of Q
    # (1 = MAP-EM, Q + log p(K); jaxdeblur.mcem._q_loss), the flow kernel_prior ("ours": the
    # shipped jaxdeblur/assets prior over 19x19 kernels, or an official checkpoint path;
    # needs kernel_size = 19). 0 = off (the paper's M-step). (measured, the 128² recovery
    # below with 19x19 kernels, 600 iterations, seeds 0/1/2) no prior: 20.21 / 23.38 /
    # 22.98 dB; weight 100: 22.89 / 22.04 / 22.94 dB (rescues the failed start, costs
    # 1.3 dB on a good one); weight 1: 20.31 (seed 0, too weak); 3000: 20.13, cosine 0.50.
    c.kernel_prior = "ours"
    c.kernel_prior_weight = 0.0

    # Outer loop.
    c.em_iterations = 600
    c.warmup_iterations = 150
    # (ours) Cold refinement phase after the EM iterations (jaxdeblur.mcem.refine_method):
    # refine_iterations more iterations whose E-step runs at refine_temperature (0: RMSprop
    # on the image network, no noise) with refine_step_size, the M-step still fitting the
    # kernel; the uncertainty map stays the sampling phase's. Off by default (the paper's
    # MCEM). Measured, 128² recovery below (step_size 0.02; after 1500 EM iterations the
    # blind run is at 24.13 dB, kernel cosine 0.959, a plateau: +0.2 dB per 1000 more):
    #   refine 300 / 600 / 1000 / 1500 -> 24.81 / 25.09 / 25.34 / 25.49 dB, kernel cosine
    #   0.979 / 0.982 / 0.983 / 0.983 (the sharper image sharpens the kernel);
    #   `python benchmarks/mcem.py --recovery uniform --size 128 --iterations 1500 ...
    #   --set refine_iterations=1200` -> 20.37 -> 25.42 dB, cosine 0.984, 23.8 min;
    #   the kernel frozen at the estimate instead (known_kernels) -> 24.82 dB after 600;
    #   the true kernel frozen (same start) -> 25.43 dB after 900: the ceiling, reached;
    #   refine_step_size 0.02 -> 24.35 dB after 100 (0.01: 24.47).
    # 64² recovery (tests/test_mcem.py settings, step 0.01): 400 EM + 200 refinement ->
    # 22.93 dB, 600 EM -> 22.74 dB (400 EM: 22.42). It sharpens what EM found, right or
    # wrong: on an astronaut crop whose kernel EM finds poorly (850 iterations, 19.43 dB from
    # 20.80 blurry, cosine 0.871) 600 refinement iterations -> 18.77 dB, cosine 0.828.
    c.refine_iterations = 0
    c.refine_temperature = 0.0
    c.refine_step_size = 0.01
    c.log_every = 10
    c.checkpoint_every = 50

    # Coarse to fine (jaxdeblur.mcem.deblur, _coarse_levels): (scale, em_iterations) pairs,
    # coarsest first, each solved before the full-resolution run on the image resized by
    # scale, the kernel size scaled with it (odd, >= 3) and the same grid; each level
    # starts from the one below: image network carried, kernel network refitted to the
    # upsampled kernels by level_refit_steps Adam steps at level_refit_lr. () = the
    # paper's single scale. (measured, 128² recovery below with the 4x32 / 3x16 nets, step
    # 0.01, four seeds) levels ((0.5, 600),) + 450 full-size iterations: 23.20 dB mean
    # (22.42-23.82), kernel cosine 0.905-0.919 on every seed, 298-327 s; single scale, 900
    # iterations (256-271 s): 20.96 dB mean, the kernel found on 1 seed of 4 (cosine 0.66-
    # 0.69 = half its length, no gain, on the others). Kept () until measured on the
    # default 256² field run (README, "Coarse to fine").
    c.levels = ()
    # (ours) 200 steps at 1e-2: per-head L1 error to the target 1.8 -> < 0.15
    # (tests/test_mcem.py::test_level_kernels_resize_and_refit), < 1 s.
    c.level_refit_steps = 200
    c.level_refit_lr = 1e-2

    # The synthetic example of train_scripts/mcem.py without image arguments.
    c.synthetic = ml_collections.ConfigDict()
    c.synthetic.size = 256
    c.synthetic.kernel_size = 15
    c.synthetic.max_angle_deg = 1.0
    c.synthetic.noise_sigma = 0.01
    c.synthetic.seed = 1
    return c
