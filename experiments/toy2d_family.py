"""The rest of the flow family on toy2d: maximum-likelihood training, reflow rounds and the
noisy interpolant, beside the flow-matching job of :mod:`experiments.toy2d`.

- ``--config.objective=ml`` trains the same MLP by maximum likelihood
  (:func:`fmjax.cnf.ml_loss`; settings in ``config.ml``), recording the solver's NFE per
  training step.
- ``--config.reflow=K`` runs K reflow rounds after the base training (settings in
  ``config.reflow_round``): each round draws ``num_pairs`` pairs ``(x0, psi(x0))`` from the
  current flow (:func:`fmjax.reflow.pairs`, stored), and retrains on them with the linear
  path, **from the previous weights** (Liu et al. 2023 initialise each rectified flow from
  the previous one: the field already carries the marginals, so a short round suffices on
  a CPU budget; from scratch each round would repeat the base training's cost). Each round
  records straightness, transport cost and the NFE sweep.
  ``--config.reflow_round.distill_steps=N`` adds a one-step distillation of the last round
  (Liu et al. 2023; :func:`fmjax.reflow.distillation_loss`), recorded as round
  ``"distilled"`` (the NLL, plots and top-level metrics stay the last round's). The rounds
  live in :mod:`experiments.toy2d_reflow`.
- ``--config.path.name=sb_cfm --config.path.sb_cfm.sigma=0.5`` trains on the noisy
  interpolant; ``--config.coupling=entropic`` adds its entropic coupling (SB-CFM).
- ``--config.eval.nll_every=N`` records the held-out NLL every N steps against training
  seconds (``nll_curve``; evaluation time is left out of the clock).
- ``--config.eval.sde_noise=(0.0,0.5,1.0)`` samples the model with :func:`fmjax.sample_sde`
  at each noise level (``sde``: MMD^2 against the data and NFE; settings ``eval.sde_*``),
  from the ODE samples' source points, with the score derived from the velocity.
  On ``sb_cfm`` (no Gaussian path to derive it on) a second MLP of ``config.model``'s size
  learns the score beside the flow ([SF]2M, Tong et al. 2024: :func:`fmjax.losses.sf2m_loss`,
  ``train.score_weight``), and ``eval.sde_diffusion=constant`` is required (``g = noise``;
  ``noise = path.sb_cfm.sigma`` is the Schrödinger bridge's own SDE). The parameters are
  then ``{"flow": ..., "score": ...}``; the flow's gradient, and so its training, is that
  of the flow-only run (Adam is per parameter and the draws are the same).
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fmjax
from fmjax.checks import integer, real
from fmjax.data import toy

OBJECTIVES = ("fm", "ml")
# toy2d's couplings: fmjax.couplings' names, and the path's own (SB-CFM's entropic plan)
COUPLINGS = (*fmjax.couplings.COUPLINGS, "entropic")


def check_config(cfg, path) -> None:
    """The family's fields; ``ValueError`` naming the field."""
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}; got {cfg.objective!r}.")
    if cfg.coupling not in COUPLINGS:
        raise ValueError(f"coupling must be one of {COUPLINGS}; got {cfg.coupling!r}.")
    if cfg.coupling == "entropic" and not hasattr(path, "coupling"):
        raise ValueError("coupling='entropic' is the sb_cfm path's own: set path.name=sb_cfm.")
    if cfg.objective == "ml" and cfg.coupling != "independent":
        raise ValueError(
            "objective=ml fits the data's density: it has no coupling; got "
            f"coupling={cfg.coupling!r}."
        )
    integer(cfg.reflow, "reflow", minimum=0)
    integer(cfg.reflow_round.distill_steps, "reflow_round.distill_steps", minimum=0)
    if cfg.reflow_round.distill_steps and not cfg.reflow:
        raise ValueError(
            "reflow_round.distill_steps distils the last reflow round: set reflow >= 1."
        )
    if cfg.reflow_round.distill_steps % cfg.train.steps_per_call:
        raise ValueError(
            f"reflow_round.distill_steps ({cfg.reflow_round.distill_steps}) must be a multiple "
            f"of train.steps_per_call ({cfg.train.steps_per_call})."
        )
    velocity_only = [("objective=ml", cfg.objective == "ml"), ("reflow", cfg.reflow > 0)]
    for what, on in velocity_only:
        if on and cfg.train.prediction != "velocity":
            raise ValueError(
                f"{what} trains a velocity model; got train.prediction={cfg.train.prediction!r}."
            )
    m = cfg.ml
    if m.divergence not in fmjax.likelihood.DIVERGENCES:
        raise ValueError(
            f"ml.divergence must be one of {fmjax.likelihood.DIVERGENCES}; got {m.divergence!r}."
        )
    if m.adjoint not in fmjax.ode.ADJOINTS:
        raise ValueError(f"ml.adjoint must be one of {fmjax.ode.ADJOINTS}; got {m.adjoint!r}.")
    integer(m.batch_size, "ml.batch_size")
    real(m.ema_decay, "ml.ema_decay", low=0.0, high=1.0, low_open=True, high_open=True)
    try:
        ml_solver(cfg)
    except (TypeError, ValueError) as err:
        raise ValueError(f"ml.solver / ml.steps / ml.rtol / ml.atol: {err}") from None
    r = cfg.reflow_round
    for name in ("num_steps", "num_pairs", "batch_size"):
        integer(r[name], f"reflow_round.{name}")
    real(r.learning_rate, "reflow_round.learning_rate", low=0.0, low_open=True)
    real(r.ema_decay, "reflow_round.ema_decay", low=0.0, high=1.0, high_open=True)
    real(r.rtol, "reflow_round.rtol", low=0.0, low_open=True)
    if cfg.reflow and r.num_steps % cfg.train.steps_per_call:
        raise ValueError(
            f"reflow_round.num_steps ({r.num_steps}) must be a multiple of "
            f"train.steps_per_call ({cfg.train.steps_per_call})."
        )
    integer(cfg.eval.nll_every, "eval.nll_every", minimum=0)
    integer(cfg.eval.nll_curve_points, "eval.nll_curve_points")
    if cfg.eval.nll_every and cfg.eval.nll_every % cfg.train.steps_per_call:
        raise ValueError(
            f"eval.nll_every ({cfg.eval.nll_every}) must be a multiple of "
            f"train.steps_per_call ({cfg.train.steps_per_call})."
        )
    _check_sde(cfg, path)


#: toy2d's SDE diffusions: ``g = noise * sqrt(sigma_t)`` (:func:`fmjax.sde.sigma_diffusion`,
#: finite to the data end) or the constant ``g = noise`` (the span then ends ``eval.t_margin``
#: before an end where the derived score is singular)
SDE_DIFFUSIONS = ("sigma", "constant")


def _check_sde(cfg, path) -> None:
    e = cfg.eval
    for g in e.sde_noise:
        real(g, "eval.sde_noise entries", low=0.0)
    integer(e.sde_steps, "eval.sde_steps")
    if e.sde_solver not in fmjax.sde.SDE_SOLVERS:
        raise ValueError(
            f"eval.sde_solver must be one of {tuple(fmjax.sde.SDE_SOLVERS)}; got {e.sde_solver!r}."
        )
    if e.sde_diffusion not in SDE_DIFFUSIONS:
        raise ValueError(
            f"eval.sde_diffusion must be one of {SDE_DIFFUSIONS}; got {e.sde_diffusion!r}."
        )
    real(cfg.train.score_weight, "train.score_weight", low=0.0, low_open=True)
    if not e.sde_noise or hasattr(path, "convert"):
        return
    if not hasattr(path, "score_target") or path.sigma == 0:
        raise ValueError(
            "eval.sde_noise derives the score from the velocity on a Gaussian path or learns "
            f"it on sb_cfm with sigma > 0; {path!r} has neither: leave eval.sde_noise empty."
        )
    for what, bad in (
        ("objective=ml", cfg.objective == "ml"),
        ("reflow", cfg.reflow > 0),
        (f"train.prediction={cfg.train.prediction!r}", cfg.train.prediction != "velocity"),
    ):
        if bad:
            raise ValueError(
                f"eval.sde_noise on sb_cfm learns the score beside a velocity trained by flow "
                f"matching, without reflow; got {what}."
            )
    if e.sde_diffusion != "constant":
        raise ValueError(
            "eval.sde_diffusion='sigma' needs a Gaussian path's sigma_t; on sb_cfm set "
            "eval.sde_diffusion=constant (g = noise; noise = path.sb_cfm.sigma is the "
            "bridge's own SDE)."
        )


def trains_score(cfg, path) -> bool:
    """Whether a score network trains beside the flow: SDE sampling on ``sb_cfm``."""
    return bool(cfg.eval.sde_noise) and not hasattr(path, "convert")


def flow_params(params):
    """The flow's parameters of ``params`` (``params["flow"]`` when a score trains too)."""
    if isinstance(params, dict) and set(params) == {"flow", "score"}:
        return params["flow"]
    return params


def sde_quality(cfg, v, path, span, x0, ref, key, score=None) -> dict:
    """MMD^2 against ``ref`` of :func:`fmjax.sample_sde` samples from ``x0`` at each
    ``eval.sde_noise`` level (noise 0: the ODE with the same solver and steps); the score
    derived from ``v`` on the path, or the learned ``score(t, x)``."""
    e = cfg.eval
    t0, t1 = span["t0"], span["t1"]
    if score is None and e.sde_diffusion == "constant":  # stop short of a singular score
        c = path.coefficients(jnp.float32(t1))
        if abs(float(c[1])) < 1e-6:
            t1 = t1 - e.t_margin
    given = {"path": path} if score is None else {"score": score}
    records = []
    for noise in e.sde_noise:
        g = fmjax.sde.sigma_diffusion(path, noise) if e.sde_diffusion == "sigma" else noise
        start = time.perf_counter()
        x, stats = fmjax.sample_sde(
            v, x0, key, diffusion=g, steps=e.sde_steps, solver=e.sde_solver, t0=t0, t1=t1,
            **given,
        )  # fmt: skip
        x = jax.block_until_ready(x)
        records.append(
            {
                "noise": float(noise),
                "mmd": float(fmjax.metrics.mmd(x, ref)),
                "nfe": int(stats.nfe),
                "seconds": time.perf_counter() - start,
            }
        )
    return {
        "sde": records,
        "sde_settings": {
            "solver": e.sde_solver,
            "steps": int(e.sde_steps),
            "diffusion": e.sde_diffusion,
            "t0": t0,
            "t1": t1,
            "score": "derived from the velocity" if score is None else "learned (score_loss)",
        },
    }


def ml_solver(cfg) -> fmjax.SolverOptions:
    """The solve of the maximum-likelihood loss (``config.ml``)."""
    m = cfg.ml
    if m.solver in fmjax.ode.FIXED_SOLVERS:
        return fmjax.SolverOptions(solver=m.solver, steps=m.steps)
    return fmjax.SolverOptions(solver=m.solver, rtol=m.rtol, atol=m.atol)


def objective(cfg, path, v):
    """``(loss_fn, data_fn, ema_decay)`` of the configured objective on ``cfg.dataset``.

    ``fm`` is the default job's CFM loss (unchanged); ``ml`` the NLL of
    :func:`fmjax.cnf.ml_loss` with its NFE as metrics ``nfe`` and ``nfe_backward``."""
    if cfg.objective == "ml":
        m, options = cfg.ml, ml_solver(cfg)
        t0, t1 = path.velocity_range("velocity")

        def ml(p, k, x1):
            loss, stats = fmjax.cnf.ml_loss(
                jax.tree_util.Partial(v, p),
                x1,
                key=k,
                divergence=m.divergence,
                adjoint=m.adjoint,
                options=options,
                base_log_prob=path.source_log_prob,
                t0=t0,
                t1=t1,
            )
            return loss, {"nfe": stats.nfe, "nfe_backward": stats.nfe_backward}

        return ml, _sampler(cfg, m.batch_size), m.ema_decay

    coupling = path.coupling if cfg.coupling == "entropic" else cfg.coupling
    if trains_score(cfg, path):  # [SF]2M: the flow and the score on one draw

        def sf2m(p, k, x1):
            return fmjax.losses.sf2m_loss(
                jax.tree_util.Partial(v, p["flow"]),
                jax.tree_util.Partial(v, p["score"]),
                path,
                k,
                x1,
                coupling=coupling,
                score_weight=cfg.train.score_weight,
            )

        return sf2m, _sampler(cfg, cfg.train.batch_size), cfg.train.ema_decay

    def loss_fn(p, k, x1):
        return fmjax.losses.cfm_loss(
            jax.tree_util.Partial(v, p),
            path,
            k,
            x1,
            coupling=coupling,
            prediction=cfg.train.prediction,
        )

    return loss_fn, _sampler(cfg, cfg.train.batch_size), cfg.train.ema_decay


def _sampler(cfg, batch_size):
    def data_fn(k):
        return toy.sample(cfg.dataset, k, batch_size)

    return data_fn


def fit(cfg, state, loss_fn, data_fn, num_steps, ema_decay, tx, *, progress, log_fn, on_step):
    """``fmjax.train.fit`` of the fused steps; returns ``(state, history, seconds)``."""
    return fit_steps(
        state, loss_fn, data_fn, num_steps, ema_decay, tx,
        steps_per_call=cfg.train.steps_per_call, log_every=cfg.train.log_every,
        progress=progress, log_fn=log_fn, on_step=on_step,
    )  # fmt: skip


def fit_steps(
    state, loss_fn, data_fn, num_steps, ema_decay, tx, *, steps_per_call, log_every=500,
    progress=False, log_fn=None, on_step=None,
):  # fmt: skip
    """:func:`fit` with the fused steps' settings as arguments (no config)."""
    run = fmjax.train.make_fused_train_steps(
        loss_fn, tx, data_fn, steps_per_call, ema_decay=ema_decay
    )
    t0 = time.perf_counter()
    state, history = fmjax.train.fit(
        state,
        run,
        None,
        num_steps,
        log_every=log_every,
        steps_per_call=steps_per_call,
        progress=progress,
        on_log=log_fn,
        on_step=on_step,
        desc="toy2d",
    )
    jax.block_until_ready(state)
    return state, history, time.perf_counter() - t0


def optimizer(num_steps, learning_rate, warmup_steps):
    """The toy2d optimizer: Adam with warm-up and cosine decay to 1% over ``num_steps``."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, num_steps, end_value=learning_rate * 0.01
    )
    return optax.adam(schedule)


class NLLCurve:
    """``on_step`` hook: the held-out NLL of the current (not EMA) parameters every
    ``eval.nll_every`` steps against training seconds since it was made (compilation
    included, the hook's own time, ``paused``, left out)."""

    def __init__(self, cfg, path, v):
        e = cfg.eval
        self.every, self.v, self.path = e.nll_every, v, path
        k = jax.random.fold_in(jax.random.key(cfg.seed + 1), 7)
        self.x = toy.sample(cfg.dataset, k, e.nll_curve_points)
        self.rtol, self.atol = e.rtol, e.atol
        self.records, self.start, self.paused = [], time.perf_counter(), 0.0

    def __call__(self, step, state, metrics):
        del metrics
        if not self.every or step % self.every:
            return
        jax.block_until_ready(state.params)  # (dispatch is asynchronous: the steps' time)
        t_hook = time.perf_counter()
        seconds = t_hook - self.start - self.paused
        nll = self.nll(flow_params(state.params))
        self.records.append({"step": int(step), "train_seconds": seconds, **nll})
        self.paused += time.perf_counter() - t_hook

    def nll(self, params):
        t0, t1 = self.path.velocity_range("velocity")
        logp, _ = fmjax.log_likelihood(
            self.path.velocity_field(jax.tree_util.Partial(self.v, params), "velocity"),
            self.x,
            solver="dopri5",  # as evaluate's held-out NLL (one compiled solve for both)
            rtol=self.rtol,
            atol=self.atol,
            base_log_prob=self.path.source_log_prob,
            t0=t0,
            t1=t1,
        )
        return {"nll_nats": float(-jnp.mean(logp))}


def nfe_summary(history) -> dict:
    """Mean NFE per training step of the ML loss over the logged steps."""
    fwd = [h["nfe"] for h in history if "nfe" in h]
    if not fwd:
        return {}
    bwd = [h["nfe_backward"] for h in history]
    return {
        "train_nfe_forward": float(np.mean(fwd)),
        "train_nfe_backward": float(np.mean(bwd)),
        "train_nfe_per_step": float(np.mean(fwd) + max(np.mean(bwd), 0.0)),
    }


def nll_reached(curve, level) -> float | None:
    """Training seconds when the curve first reaches ``level`` nats (None: never)."""
    for rec in curve:
        if math.isfinite(rec["nll_nats"]) and rec["nll_nats"] <= level:
            return rec["train_seconds"]
    return None
