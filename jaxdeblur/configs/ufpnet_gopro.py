"""UFPNet, official GoPro configuration (Fang et al., CVPR 2023; UFPDeblur option files).

Command (GoPro prepared with ``python -m data_pipelines.build gopro --manual_dir ...``)::

  python train_scripts/ufpnet.py --config jaxdeblur/configs/ufpnet_gopro.py \
      --workdir runs/ufpnet_gopro --tpu

Expected result (paper): GoPro test 34.06 dB / 0.968 SSIM after 400k-800k iterations at
batch 64; HIDE 31.74 / 0.947. Stage II is not public: (ours) L_KE on GoPro pairs, reported
as reblur PSNR (paper ablation: 45.92 dB).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict(dict(
        img_channel=3, width=64, enc_blk_nums=(1, 1, 1, 28), middle_blk_num=1,
        dec_blk_nums=(1, 1, 1, 1), kernel_size=19, ke_widths=(64, 128)))
    # Official test configs use TLC with the default train size 256x256 (windows 384..24).
    config.eval_tlc_train_size = (256, 256)
    # Whole-image inference in row blocks of at most this many pixels (UFPNet fields
    # flow_chunk_pixels, kernel_map_chunk_pixels; None = whole image at once). Not model
    # fields: they change no parameter, so checkpoints do not record them. Measured
    # (benchmarks/ufpnet_step.py --configs official --memory-only, XLA:CPU): 720p compiles
    # to 3.66 GiB and 1080p to 7.91 GiB, against 15.09 and 36.44 GiB without blocks.
    config.flow_chunk_pixels = 16384
    config.kernel_map_chunk_pixels = 65536
    config.flow_checkpoint = "ours"

    config.data = ml_collections.ConfigDict(dict(
        name="gopro", config=None, data_dir="~/tensorflow_datasets", build_if_missing=False,
        train_split="train", eval_split="test", num_workers=8))
    config.batch_size = 64
    config.crop_size = 256
    config.eval_crop_size = None
    config.num_eval_images = 1111
    config.num_sample_images = 8

    config.stage2 = ml_collections.ConfigDict(dict(
        num_steps=100_000, learning_rate=1e-4, b1=0.9, b2=0.999, weight_decay=0.0,
        grad_clip=1.0, kl_weight=0.0, log_every=100, eval_every=5_000,
        checkpoint_every=5_000))

    # AdamW lr 1e-3, wd 1e-3, betas (0.9, 0.9), cosine to 1e-7, global-norm clip 0.01
    # (hidden default of the official NAFNet trainer), reblur L1 weight 0.01.
    config.stage3 = ml_collections.ConfigDict(dict(
        num_steps=600_000, learning_rate=1e-3, min_learning_rate=1e-7, b1=0.9, b2=0.9,
        weight_decay=1e-3, grad_clip=0.01, reblur_weight=0.01, log_every=100,
        eval_every=20_000, checkpoint_every=5_000))

    config.max_checkpoints = 3
    config.async_checkpoint = True
    return config
