"""Config for ``python -m experiments.cifar10`` (Flow Matching on CIFAR-10).

Presets (``--config=experiments/configs/cifar10.py[:preset]``):

``default``
    The paper's CIFAR-10 recipe (Lipman et al. 2023, Table 3): ADM UNet with 256 channels,
    depth 2, channel multipliers (1, 2, 2, 2), 4 heads x 64 channels, attention at 16x16,
    dropout 0; batch 256; 391k iterations; Adam (0.9, 0.999), eps 1e-8; lr 5e-4 with a
    45k-step linear warm-up, then linear decay to 1e-8; fp32; CondOT path. Data TFDS
    ``cifar10``, evaluated on its test split (BPD with dopri5 1e-5, Hutchinson, K
    dequantization samples; NFE; FID when Inception weights are given).
``tiny``
    A tiny UNet, batch 8, 200 steps, cheap evaluation: a CPU smoke run.

All fields and the choices not in the paper are described in ``imagenet32.py``.
"""

from experiments.configs import imagenet32


def get_config(preset: str = "default"):
    c = imagenet32.base_config()
    c.data.source = "cifar10"
    c.data.global_batch_size = 256
    c.model.ch = 256
    c.model.ch_mult = (1, 2, 2, 2)
    c.model.num_res_blocks = 2
    c.model.attn_resolutions = (16,)
    c.train.num_steps = 391_000
    c.train.learning_rate = 5e-4
    c.train.warmup_steps = 45_000
    c.eval.num_dequant = 15
    preset = preset or "default"
    if preset == "tiny":
        imagenet32.tiny(c)
    elif preset != "default":
        raise ValueError(f"unknown cifar10 preset {preset!r}; known presets: 'default', 'tiny'.")
    return c
