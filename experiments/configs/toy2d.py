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
    # cond_ot | ve | vp | rectified_flow | cosine | polynomial | sb_cfm (noisy interpolant)
    c.path.name = "cond_ot"
    c.path.sigma_min = 1e-4  # used by cond_ot only
    # path.ve.*, path.vp.*, path.polynomial.*, path.sb_cfm.*: their parameters
    path_config.add_fields(c.path)
    # independent | ot | ot_sinkhorn | entropic (sb_cfm's: Sinkhorn with epsilon = 2 sigma^2)
    c.coupling = "independent"
    # fm: flow matching (cfm_loss) | ml: maximum likelihood (fmjax.cnf.ml_loss, settings in ml)
    c.objective = "fm"
    c.reflow = 0  # reflow rounds after the base training (settings in reflow_round)

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
    # sb_cfm with eval.sde_noise: weight of the score network's loss beside the flow's
    # (fmjax.losses.sf2m_loss; [SF]2M sums the two)
    c.train.score_weight = 1.0

    # maximum-likelihood training (objective=ml): the NLL's solve and its gradient, on
    # batches of its own size (each step solves the flow: 256 keeps 200 steps in minutes)
    c.ml = ml_collections.ConfigDict()
    c.ml.divergence = "exact"  # exact | hutchinson
    c.ml.adjoint = "checkpoint"  # checkpoint (backprop through the solver) | backsolve
    c.ml.solver = "dopri5"
    c.ml.steps = 8  # fixed-step solvers only
    c.ml.rtol = 1e-3  # adaptive solvers only
    c.ml.atol = 1e-3
    c.ml.batch_size = 256
    c.ml.ema_decay = 0.99  # a shorter average than FM's: ML runs fewer steps

    # each reflow round: pairs from the current flow, then training from its weights
    c.reflow_round = ml_collections.ConfigDict()
    c.reflow_round.num_pairs = 20000
    c.reflow_round.rtol = 1e-4  # dopri5 rtol = atol of the pairs' solve
    c.reflow_round.num_steps = 1500
    c.reflow_round.batch_size = 1024
    c.reflow_round.learning_rate = 3e-4
    # the round's EMA starts at the previous round's field: 0.999 over 1,500 steps would keep
    # 22 % of it (a blend of the curved and the straightened network); 0.99 keeps 3e-7
    c.reflow_round.ema_decay = 0.99
    # > 0: then distil the last round to one Euler step for this many steps (a record of its
    # own in reflow_rounds; evaluate keeps the last round's model)
    c.reflow_round.distill_steps = 0

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
    c.eval.nll_every = 0  # > 0: held-out NLL every this many steps (nll_curve)
    c.eval.nll_curve_points = 1000
    # SDE sampling (fmjax.sample_sde, score from the velocity) at these noise levels; () = off.
    # On sb_cfm a second MLP learns the score beside the flow (train.score_weight) and
    # sde_diffusion must be "constant" (noise = path.sb_cfm.sigma: the bridge's own SDE)
    c.eval.sde_noise = ()
    c.eval.sde_steps = 100
    c.eval.sde_solver = "euler"  # Euler-Maruyama
    c.eval.sde_diffusion = "sigma"  # g = noise * sqrt(sigma_t); "constant": g = noise

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
        c.ml.batch_size = 32
        c.ml.rtol = c.ml.atol = 1e-2
        c.reflow_round.num_pairs = 256
        c.reflow_round.rtol = 1e-3
        c.reflow_round.num_steps = 20
        c.reflow_round.batch_size = 128
        c.eval.nll_curve_points = 64
    elif preset != "default":
        raise ValueError(f"unknown toy2d preset {preset!r}; known presets: 'default', 'tiny'.")
    return c
