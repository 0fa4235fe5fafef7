"""Config for ``python -m experiments.imagenet32`` (Flow Matching on ImageNet 32x32).

Presets (``--config=experiments/configs/imagenet32.py[:preset]``):

``default``
    The paper's recipe (Lipman et al. 2023, Table 3 and appendix E): ADM UNet with 256
    channels, depth 3, channel multipliers (1, 2, 2, 2), 4 heads x 64 channels, attention at
    16x16 and 8x8, dropout 0; global batch 1024; 250k iterations (200 epochs); Adam (0.9,
    0.999), eps 1e-8, no weight decay; lr 1e-4 with a 20k-step linear warm-up from 0, then
    linear decay to 1e-8; fp32; CondOT path. Data ``imagenet_resized/32x32`` (Chrabaszcz et
    al. 2017, the paper's preprocessing). Evaluation: BPD on the validation split with
    dopri5 at rtol = atol = 1e-5, Hutchinson divergence, K = 15 dequantization samples;
    NFE of dopri5 sampling; FID when Inception weights are given.
``tiny``
    A tiny UNet, batch 8, 200 steps, cheap evaluation (rtol 1e-3, one batch): a CPU
    smoke run.

Override any field: ``--config.data.data_dir=/data/tfds --config.train.num_steps=1000``.
Not in the paper's table (our choices, say so when reporting): EMA decay 0.9999 (ADM's),
random horizontal flips (ADM's data loader default), CondOT sigma_min = 1e-5.
"""

import ml_collections
from ml_collections import config_dict

from experiments import path_config


def base_config():
    """All fields, set to the paper's ImageNet-32 recipe."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mode = "train_and_eval"  # train | eval | train_and_eval | sweep

    c.data = ml_collections.ConfigDict()
    # imagenet_resized/32x32 (the paper's), downsampled_imagenet/32x32 (van den Oord et al.,
    # unlabelled), imagenet32_npz (the official npz batches), cifar10, folder (your own PNG /
    # JPEG files, fmjax.data.folder); the 64x64 ones with data.resolution=64. BPD is only
    # comparable within one source: every reported number names it.
    c.data.source = "imagenet_resized/32x32"
    c.data.data_dir = config_dict.placeholder(str)  # TFDS data dir / npz folder / image folder
    # side of the square images trained on: a fixed-size source's own (32 or 64); source
    # folder resizes and centre-crops its files to it
    c.data.resolution = 32
    c.data.global_batch_size = 1024  # over all devices and processes
    c.data.random_flip = True
    c.data.worker_count = 0  # grain worker processes (0: threads in the main process)
    c.data.read_threads = 8

    c.model = ml_collections.ConfigDict()  # fmjax.models.UNet fields
    c.model.ch = 256
    c.model.ch_mult = (1, 2, 2, 2)
    c.model.num_res_blocks = 3
    c.model.attn_resolutions = (16, 8)
    c.model.num_heads = 4
    c.model.num_head_channels = 64
    c.model.dropout = 0.0
    c.model.resblock_updown = True
    c.model.use_scale_shift_norm = True
    c.model.num_classes = config_dict.placeholder(int)  # None: unconditional (the paper)
    c.model.class_dropout = 0.1  # label -> null class with this probability (conditional)
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)

    c.path = ml_collections.ConfigDict()
    c.path.name = "cond_ot"  # or ve, vp, rectified_flow, cosine, polynomial, sb_cfm
    c.path.sigma_min = 1e-5
    path_config.add_fields(c.path)  # path.name=vp (etc.) reads path.vp.*; see path_config

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 250_000
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 20_000  # linear from 0 to learning_rate
    c.train.end_learning_rate = 1e-8  # then polynomial decay to this at num_steps
    c.train.decay_power = 1.0  # 1.0: linear decay
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.999
    c.train.adam_eps = 1e-8
    c.train.grad_clip_norm = 0.0  # > 0: optax.clip_by_global_norm
    # gradient accumulation: each step's batch in this many parts, one after another on
    # each device, one update of their mean gradient (the same update, ~1/k the activation
    # memory: the paper's batch of 1024 on fewer accelerators); divides each device's rows
    c.train.microbatches = 1
    # minibatch OT pairing of the noise with each step's whole global batch (within classes
    # for a class-conditional model): independent | ot | ot_sinkhorn | entropic (path
    # sb_cfm's own entropic plan, epsilon = 2 sigma^2: SB-CFM)
    c.train.coupling = "independent"
    # where the OT pairing runs: host (exact OT in the input pipeline's threads, ahead of the
    # device; per process) | device (in the jitted step, over the global batch; the exact
    # solver is a synchronous host callback) | auto (host for ot, device for ot_sinkhorn)
    c.train.pairing = "auto"
    c.train.ema_decay = 0.9999  # 0: no EMA
    c.train.loss_reduction = "mean"  # mean | sum (see fmjax.losses.cfm_loss)
    # what the UNet predicts: velocity (the paper) | x1 | eps | score; eps on path.name=vp is
    # DDPM's parameterisation (its L_simple in continuous time). Sampling and bits/dim
    # convert the prediction to a velocity over path.velocity_range (eval.t_margin)
    c.train.prediction = "velocity"
    c.train.log_every = 100
    c.train.checkpoint_every = 5_000
    c.train.keep_checkpoints = 3
    c.train.best_metric = "loss"  # also keep the best checkpoint by this ('' : off)
    c.train.async_checkpointing = True
    c.train.sample_every = 10_000  # sample grid of the EMA model (0: off)
    c.train.num_sample_images = 64
    c.train.sample_solver = "dopri5"
    c.train.sample_tol = 1e-4  # rtol = atol of the sample grids
    c.train.eval_every = 0  # > 0 and mode train_and_eval: BPD every that many steps too
    c.train.progress = True

    c.eval = ml_collections.ConfigDict()
    c.eval.use_ema = True
    c.eval.checkpoint_step = config_dict.placeholder(int)  # None: the latest
    c.eval.split = config_dict.placeholder(str)  # None: the source's eval split
    c.eval.global_batch_size = 256
    c.eval.num_batches = 0  # 0: the whole split
    c.eval.num_dequant = 15  # K importance samples of the uniform dequantization
    c.eval.solver = "dopri5"
    c.eval.rtol = 1e-5
    c.eval.atol = 1e-5
    c.eval.probe = "rademacher"  # Hutchinson probe
    # matmul precision of every evaluation solve (bits/dim, NFE, FID, the sweep), so that the
    # numbers do not depend on the chip's default (on TPUs one bfloat16 pass, on recent
    # NVIDIA GPUs TF32): highest (float32) | high (tensorfloat32) | default (bfloat16, the
    # chip's fastest); training and its sample grids keep the chip's default
    c.eval.matmul_precision = "highest"
    # kept from an end where train.prediction's conversion to a velocity divides by zero
    # (eps / score: t = 0 on CondOT; x1: t = 1 where sigma_1 = 0); unused for velocity
    c.eval.t_margin = 1e-3
    c.eval.nfe_num_samples = 50_000  # samples whose dopri5 NFE is averaged (0: skip)
    c.eval.sample_batch_size = 1_000
    c.eval.fid_inception_weights = ""  # path of the Inception weights; '' skips FID
    c.eval.fid_reference_stats = ""  # npz with mu, sigma of the data features ('' computes)
    c.eval.fid_num_samples = 50_000
    # mode sweep: quality (FID with Inception weights) and ODE error against NFE for each
    # fixed-step solver at each step count and dopri5 at each tolerance, from the same
    # sweep_samples source draws (fmjax.metrics.efficiency)
    c.eval.sweep_samples = 1_000
    c.eval.sweep_solvers = ("euler", "midpoint", "heun", "rk4")
    c.eval.sweep_steps = (1, 2, 4, 8, 16, 32, 64, 128)
    c.eval.sweep_tols = (1e-2, 1e-3, 1e-4)
    # classifier-free guidance weight w of every sample drawn (grids, NFE, FID) of a
    # class-conditional model: (1 - w) v(x | null) + w v(x | y); 1 is the conditional field
    # (the paper's models are unconditional), > 1 needs model.class_dropout > 0
    c.eval.guidance_scale = 1.0

    # rectified flow's reflow (Liu et al. 2023; experiments.images.reflow): this run trains
    # on pairs (x0, psi(x0)) drawn once from the trained run in teacher_workdir, in place of
    # (noise, data); its second round is a run whose teacher is the first round
    c.reflow = ml_collections.ConfigDict()
    c.reflow.teacher_workdir = ""  # '' : off (an ordinary run)
    c.reflow.teacher_step = config_dict.placeholder(int)  # None: its latest checkpoint
    c.reflow.num_pairs = 100_000  # each a solve of the teacher; 2 * R * R * 3 float32 on disk
    c.reflow.batch_size = 500  # pairs per solve and per stored chunk, over all devices
    c.reflow.solver = "dopri5"
    c.reflow.rtol = 1e-4
    c.reflow.atol = 1e-4
    # teacher: start from the teacher's (EMA) weights, as Liu et al. (a round then needs far
    # fewer steps than the base run) | scratch: a fresh model of this config's architecture
    c.reflow.init = "teacher"
    c.reflow.pairs_dir = ""  # '' : <workdir>/reflow_pairs (a shared folder reuses pairs)
    return c


def get_config(preset: str = "default"):
    c = base_config()
    preset = preset or "default"
    if preset == "tiny":
        tiny(c)
    elif preset != "default":
        raise ValueError(f"unknown imagenet32 preset {preset!r}; known presets: 'default', 'tiny'.")
    return c


def tiny(c):
    """Shrink ``c`` in place to a CPU smoke run (fmjax.models.unet_presets.tiny)."""
    c.data.global_batch_size = 8
    c.data.read_threads = 2
    c.model.ch = 32
    c.model.ch_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = (16,)
    c.model.num_heads = 2
    c.model.num_head_channels = 16
    c.train.num_steps = 200
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 10
    c.train.ema_decay = 0.99
    c.train.log_every = 10
    c.train.checkpoint_every = 50
    c.train.sample_every = 100
    c.train.num_sample_images = 8
    c.train.sample_tol = 1e-2
    c.eval.global_batch_size = 8
    c.eval.num_batches = 1
    c.eval.num_dequant = 2
    c.eval.rtol = 1e-3
    c.eval.atol = 1e-3
    c.eval.nfe_num_samples = 8
    c.eval.sample_batch_size = 8
    c.eval.fid_num_samples = 16
    c.eval.sweep_samples = 8
    c.eval.sweep_steps = (1, 2, 4)
    c.eval.sweep_tols = (1e-2,)
    c.reflow.num_pairs = 64
    c.reflow.batch_size = 16
    c.reflow.rtol = 1e-3
    c.reflow.atol = 1e-3
    return c
