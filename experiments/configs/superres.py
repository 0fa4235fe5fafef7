"""Config for ``python -m experiments.superres`` (super-resolution by Flow Matching).

The flow is conditioned on the low-resolution image, upsampled (bicubic) to the output
resolution and concatenated to ``x_t`` as extra UNet input channels (SR3's conditioning;
Lipman et al. 2023, section 6.3). The low-resolution input is made from each
high-resolution batch (``superres.factor``, ``superres.downsample``,
``superres.upsample``: :mod:`fmjax.data.superres`), so any image source at resolution ``R``
gives pairs ``R / factor -> R``. Every other field is the image experiments'
(``imagenet32.py`` describes them).

Presets (``--config=experiments/configs/superres.py[:preset]``):

``default``
    The paper's 64 -> 256 setting: ``data.resolution = 256``, ``superres.factor = 4``.
    UNet and training as we recall the 64 -> 256 column of the paper's hyper-parameter
    table (appendix E, Table 3), which could NOT be checked against the paper in this
    build (no copy of it was at hand): 256 channels, depth 2, channel multipliers
    (1, 1, 2, 2, 4, 4), 4 heads x 64 channels, attention at 32, 16 and 8, dropout 0, batch
    256, lr 1e-4. The warm-up (5k), the number of steps (1M) and the linear decay are our
    choices; verify all of these before reporting a reproduction (ADM's released 64 -> 256
    upsampler has this shape with 192 channels). It needs a 256 x 256
    image source (``data.resolution``, issue 23 item 1: e.g. ``--config.data.source=folder
    --config.data.data_dir=DIR``).
``tiny``
    16 -> 32 on the 32 x 32 sources (mock, npz): a tiny UNet, batch 8, 300 steps on CPU in
    about a minute, evaluated on one batch of 16 validation images.

Evaluation (``eval_metrics.json``): PSNR and SSIM (dm-pix, on 8-bit images) of one sample
per validation image against the image, with the bicubic upsampling of the same
low-resolution input as the baseline; FID of the samples against the train split when
``eval.fid_inception_weights`` is given; ``superres_grid.png`` with rows of low-res
(nearest) | sample | high-res.
"""

import ml_collections

from experiments.configs import imagenet32


def base_config():
    """All fields: the image experiments' and the ``superres`` section."""
    c = imagenet32.base_config()
    c.data.resolution = 256  # high resolution (the output); issue 23 item 1 reads it
    c.data.random_flip = True
    c.superres = ml_collections.ConfigDict()
    c.superres.factor = 4  # low resolution = data.resolution / factor
    c.superres.downsample = "area"  # area | cubic (anti-aliased)
    c.superres.upsample = "cubic"  # cubic | linear | nearest: the input at full size
    c.superres.num_grid_images = 8  # rows of superres_grid.png

    c.model.ch = 256
    c.model.num_res_blocks = 2
    c.model.ch_mult = (1, 1, 2, 2, 4, 4)
    c.model.attn_resolutions = (32, 16, 8)
    c.model.num_heads = 4
    c.model.num_head_channels = 64
    c.model.dropout = 0.0

    c.data.global_batch_size = 256
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 5_000
    c.train.num_steps = 1_000_000
    c.train.sample_every = 0  # grids are drawn at evaluation (superres_grid.png)
    c.eval.global_batch_size = 64
    return c


def get_config(preset: str = "default"):
    c = base_config()
    preset = preset or "default"
    if preset == "tiny":
        tiny(c)
    elif preset != "default":
        raise ValueError(f"unknown superres preset {preset!r}; known presets: 'default', 'tiny'.")
    return c


def tiny(c):
    """Shrink ``c`` in place to a CPU run: 16 -> 32 with a tiny UNet."""
    imagenet32.tiny(c)
    c.data.resolution = 32
    c.superres.factor = 2
    c.train.num_steps = 300
    c.train.warmup_steps = 20
    c.train.checkpoint_every = 100
    c.train.sample_every = 0
    c.eval.global_batch_size = 16
    c.eval.num_batches = 1
    return c
