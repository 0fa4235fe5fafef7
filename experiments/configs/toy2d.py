"""Config for ``python -m experiments.toy2d`` (2-D flow matching on a toy density).

Presets: ``--config=experiments/configs/toy2d.py`` (default: checkerboard, CondOT, 4x512 MLP,
2-3 minutes on 2 CPU cores) and ``...toy2d.py:tiny`` (a few steps, for tests).
Override any field with ``--config.key=value``.
"""

import ml_collections

from experiments import path_config


def get_config(preset: str = "default"):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dataset = "checkerboard"  # see fmjax.data.toy.DENSITIES

    c.path = ml_collections.ConfigDict()
    c.path.name = "cond_ot"  # cond_ot | ve | vp | rectified_flow | cosine | polynomial
    c.path.sigma_min = 1e-4  # used by cond_ot only
    path_config.add_fields(c.path)  # path.ve.*, path.vp.*, path.polynomial.*: their parameters
    c.coupling = "independent"  # independent | ot | ot_sinkhorn

    c.model = ml_collections.ConfigDict()
    c.model.hidden = 512
    c.model.depth = 4
    c.model.activation = "silu"
    c.model.time_embedding = "raw"  # concat(x, t): smooth in t, so dopri5 needs ~50 NFE

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 3000
    c.train.batch_size = 1024
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 100
    c.train.ema_decay = 0.999
    c.train.steps_per_call = 50  # steps fused into one compiled call (lax.scan)
    c.train.log_every = 500
    # what the MLP predicts and is regressed on: velocity | x1 | eps | score; sampling and
    # likelihood convert it to a velocity over path.velocity_range (eval.t_margin)
    c.train.prediction = "velocity"

    c.eval = ml_collections.ConfigDict()
    c.eval.num_nll = 5000  # held-out points for the NLL (exact divergence, dopri5)
    c.eval.num_samples = 20000  # samples for plots, MMD and sliced Wasserstein
    c.eval.rtol = 1e-5
    c.eval.atol = 1e-5
    c.eval.grid_size = 120  # density plot resolution (grid_size^2 likelihood evaluations)
    c.eval.grid_rtol = 1e-4
    c.eval.num_trajectories = 500
    c.eval.plot_lim = 4.5
    c.eval.t_margin = 1e-3  # kept from an end where the prediction's conversion is singular
    # sampling efficiency: straightness, transport cost and MMD against NFE for euler,
    # midpoint, heun, rk4 at sweep_steps steps and dopri5 at sweep_tols (fmjax.metrics.efficiency)
    c.eval.sweep = True
    c.eval.sweep_samples = 1000
    c.eval.sweep_steps = (1, 2, 4, 8, 16, 32, 64, 128)
    c.eval.sweep_tols = (1e-2, 1e-3, 1e-4)

    if preset == "tiny":
        c.model.hidden = 32
        c.model.depth = 2
        c.train.num_steps = 20
        c.train.batch_size = 128
        c.train.warmup_steps = 2
        c.train.steps_per_call = 10
        c.train.log_every = 10
        c.eval.num_nll = 64
        c.eval.num_samples = 256
        c.eval.grid_size = 12
        c.eval.num_trajectories = 16
        c.eval.rtol = c.eval.atol = 1e-3
        c.eval.grid_rtol = 1e-3
        c.eval.sweep_samples = 64
        c.eval.sweep_steps = (1, 4)
        c.eval.sweep_tols = (1e-2,)
    elif preset != "default":
        raise ValueError(f"unknown toy2d preset {preset!r}; known presets: 'default', 'tiny'.")
    return c
