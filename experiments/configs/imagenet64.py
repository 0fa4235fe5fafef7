"""Config for ``python -m experiments.imagenet64`` (Flow Matching on ImageNet 64x64).

Presets (``--config=experiments/configs/imagenet64.py[:preset]``):

``default``
    The paper's ImageNet-64 model and batch (Lipman et al. 2023, appendix table, as reported
    in ``docs/images.md``, which says which numbers could not be checked against the paper's
    text here): ADM UNet with 192 channels, depth 3, channel multipliers (1, 2, 3, 4), 4
    heads x 64 channels, attention at 32x32, 16x16 and 8x8, dropout 0; global batch 2048;
    157k iterations; Adam (0.9, 0.999), eps 1e-8, lr 1e-4; fp32 here (the paper: fp16
    mixed precision; ``model.dtype=bfloat16`` is the closest); CondOT path. Data
    ``imagenet_resized/64x64`` (``imagenet64_npz``: the official npz batches;
    ``downsampled_imagenet/64x64``; ``folder``), evaluated on its validation split by the
    ImageNet-32 protocol (BPD with dopri5 1e-5, Hutchinson, K = 15 dequantization samples;
    NFE; FID when Inception weights are given).
``tiny``
    A tiny three-level UNet (attention at 16x16), batch 8, 200 steps, cheap evaluation: a
    CPU smoke run.

Not in the paper's table (our choices, as for ImageNet-32; say so when reporting): the
20k-step linear warm-up and linear decay to 1e-8 of the ImageNet-32 recipe, EMA decay
0.9999, random horizontal flips, CondOT sigma_min = 1e-5. All fields are described in
``imagenet32.py``.
"""

from experiments.configs import imagenet32


def get_config(preset: str = "default"):
    c = imagenet32.base_config()
    c.data.source = "imagenet_resized/64x64"
    c.data.resolution = 64
    c.data.global_batch_size = 2048
    c.model.ch = 192
    c.model.ch_mult = (1, 2, 3, 4)
    c.model.num_res_blocks = 3
    c.model.attn_resolutions = (32, 16, 8)
    c.model.num_heads = 4
    c.model.num_head_channels = 64
    c.model.dropout = 0.0
    c.train.num_steps = 157_000
    c.train.learning_rate = 1e-4
    preset = preset or "default"
    if preset == "tiny":
        imagenet32.tiny(c)
        c.model.ch_mult = (1, 2, 2)  # 64 -> 32 -> 16, attention at 16
    elif preset != "default":
        raise ValueError(f"unknown imagenet64 preset {preset!r}; known presets: 'default', 'tiny'.")
    return c
