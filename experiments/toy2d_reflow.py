"""toy2d's reflow rounds and one-step distillation (``--config.reflow=K``,
``--config.reflow_round.*``; also the rounds of :mod:`experiments.toy2d_pairs`).

Each round draws pairs ``(x0, psi(x0))`` from the current flow (:func:`fmjax.reflow.pairs`,
stored) and trains on them **from the previous weights** with a fresh optimizer and EMA
(Liu et al. 2023 initialise each rectified flow from the previous one: the field already
carries the marginals, so a short round suffices; from scratch each round would repeat the
base training's cost). Distillation trains the same way on
:func:`fmjax.reflow.distillation_loss`, for one Euler step.
"""

from __future__ import annotations

import time

import jax

import fmjax
from experiments.toy2d_family import fit_steps, optimizer

__all__ = ["ROUND_LOSSES", "plot_rounds", "reflow_rounds", "summarize_rounds", "train_on_flow"]

ROUND_LOSSES = ("reflow", "distill")


def train_on_flow(
    v, params, x0, key, r, *, loss="reflow", field=None, t_range=(0.0, 1.0), warmup_steps,
    steps_per_call, log_every=500, progress=False, log_fn=None,
):  # fmt: skip
    """One round on the flow of ``v(params, t, x)``: the pairs ``(x0, psi(x0))``
    (:func:`fmjax.reflow.pairs`, dopri5 at ``r.rtol``, stored), then training **from
    ``params``** on batches of them with a fresh optimizer and EMA (settings ``r``: a
    ``reflow_round`` config). ``loss="reflow"``: rectified flow's CFM loss on the linear path;
    ``"distill"``: :func:`fmjax.reflow.distillation_loss` (one Euler step over ``t_range``).
    ``field``: the field solved for the pairs, when it is not ``Partial(v, params)``.
    Returns ``(state, pair_seconds, train_seconds)``; the round's field is ``state.ema_params``.
    """
    if loss not in ROUND_LOSSES:
        raise ValueError(f"loss must be one of {ROUND_LOSSES}; got {loss!r}.")
    t_lo, t_hi = t_range
    t0 = time.perf_counter()
    x0, x1 = fmjax.reflow.pairs(  # (the field as evaluate builds it: shared compiles)
        jax.tree_util.Partial(v, params) if field is None else field,
        x0,
        rtol=r.rtol,
        atol=r.rtol,
        t0=t_lo,
        t1=t_hi,
    )
    x0, x1 = jax.block_until_ready((x0, x1))
    pair_seconds = time.perf_counter() - t0
    n = x0.shape[0]

    def data_fn(kd, x0=x0, x1=x1):
        i = jax.random.randint(kd, (r.batch_size,), 0, n)
        return {"x0": x0[i], "x1": x1[i]}

    linear = fmjax.paths.rectified_flow()

    def loss_fn(p, kl, batch):
        field = jax.tree_util.Partial(v, p)
        if loss == "distill":
            return fmjax.reflow.distillation_loss(field, batch["x0"], batch["x1"], t0=t_lo, t1=t_hi)
        return fmjax.losses.cfm_loss(field, linear, kl, batch["x1"], x0=batch["x0"])

    # from the previous weights, a fresh optimizer and EMA for the round; the EMA starts at
    # the previous field, so its decay must forget it within the round
    tx = optimizer(r.num_steps, r.learning_rate, min(warmup_steps, r.num_steps - 1))
    state = fmjax.train.TrainState.create(params, tx, key)
    state, _, seconds = fit_steps(
        state, loss_fn, data_fn, r.num_steps, r.ema_decay, tx, steps_per_call=steps_per_call,
        log_every=log_every, progress=progress, log_fn=log_fn,
    )  # fmt: skip
    return state, pair_seconds, seconds


def reflow_rounds(cfg, state, v, path, efficiency_fn, *, progress, log_fn):
    """``cfg.reflow`` rounds from ``state``; returns ``(state, records)``: per round (0 is
    the base model) straightness, transport cost and the sweep (``efficiency_fn(v_params)``),
    pair generation and training seconds. With ``reflow_round.distill_steps``, a last record
    (round ``"distilled"``) is the one-step distillation of the last round (new pairs, then
    :func:`fmjax.reflow.distillation_loss` from its weights); ``state`` stays the last
    round's (the distilled model is for one Euler step, not for the NLL and plots)."""
    r = cfg.reflow_round
    t_range = path.velocity_range("velocity")
    records = [{"round": 0, **efficiency_fn(state.ema_params)}]
    for k in range(1, cfg.reflow + 1):
        key = jax.random.fold_in(jax.random.key(cfg.seed + 2), k)
        k_x0, k_state = jax.random.split(key)
        field = path.velocity_field(jax.tree_util.Partial(v, state.ema_params), "velocity")
        state, pair_seconds, seconds = train_on_flow(
            v, state.ema_params, path.sample_source(k_x0, (r.num_pairs, 2)), k_state, r,
            field=field, t_range=t_range, warmup_steps=cfg.train.warmup_steps,
            steps_per_call=cfg.train.steps_per_call, log_every=cfg.train.log_every,
            progress=progress, log_fn=log_fn,
        )  # fmt: skip
        records.append(
            {
                "round": k,
                "pair_seconds": pair_seconds,
                "train_seconds": seconds,
                **efficiency_fn(state.ema_params),
            }
        )
    if r.distill_steps:  # a one-step model of the last round, recorded beside the rounds
        key = jax.random.fold_in(jax.random.key(cfg.seed + 2), cfg.reflow + 1)
        k_x0, k_state = jax.random.split(key)
        distill = r.copy_and_resolve_references()
        distill.num_steps = r.distill_steps
        one_step, pair_seconds, seconds = train_on_flow(
            v, state.ema_params, path.sample_source(k_x0, (r.num_pairs, 2)), k_state, distill,
            loss="distill", t_range=t_range, warmup_steps=cfg.train.warmup_steps,
            steps_per_call=cfg.train.steps_per_call, log_every=cfg.train.log_every,
            progress=progress, log_fn=log_fn,
        )  # fmt: skip
        records.append(
            {
                "round": "distilled",
                "pair_seconds": pair_seconds,
                "train_seconds": seconds,
                **efficiency_fn(one_step.ema_params),
            }
        )
    return state, records


def plot_rounds(filename, records) -> None:
    """MMD against NFE of the Euler solves, a line per reflow round (or per record's
    ``label``, where it has one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for rec in records:
        pts = [(s["nfe"], s["mmd"]) for s in rec["sweep"] if s["solver"] == "euler"]
        label = rec.get("label", f"round {rec.get('round')}")
        label = f"{label}: straightness {rec['straightness']:.3g}"
        ax.plot(*zip(*pts, strict=True), "o-", label=label, ms=4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("Euler steps (NFE)")
    ax.set_ylabel("MMD$^2$ to fresh data")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("quality against Euler steps")
    fig.tight_layout()
    fig.savefig(filename, dpi=100)
    plt.close(fig)


def summarize_rounds(records) -> list[dict]:
    """Per round: straightness, transport cost, the Euler MMDs and the tight dopri5 solve's
    MMD and NFE, for metrics.json."""
    out = []
    for rec in records:
        keep = {k: rec[k] for k in rec if k != "sweep"}
        if rec["sweep"]:  # (eval.sweep=False: none)
            euler = {s["steps"]: s["mmd"] for s in rec["sweep"] if s["solver"] == "euler"}
            ref = rec["sweep"][-1]  # the tight dopri5 reference solve
            keep.update(mmd_dopri5=ref["mmd"], nfe_dopri5=ref["nfe"])
            keep["mmd_euler"] = {str(n): m for n, m in euler.items()}
        out.append(keep)
    return out
