"""Couplings between two 2-D data sets: independent against minibatch OT at the same budget,
and the rest of the flow family (SB-CFM, reflow rounds, one-step distillation).

    python -m experiments.toy2d_pairs [--source=eight_gaussians] [--target=two_moons]
        [--couplings=independent,ot,ot_sinkhorn,sb_cfm] [--sb-sigma=0.5] [--steps=1500]
        [--batch=256] [--reflow=K] [--reflow-steps=1000] [--reflow-pairs=20000]
        [--distill-steps=N] [--workdir=out/toy2d_pairs]

Flow matching between two data distributions (no Gaussian end): x0 from ``--source``, x1 from
``--target`` (both :mod:`fmjax.data.toy` densities), the linear path (CondOT with
sigma_min = 0) and the same MLP, optimiser and steps for every coupling. Each trained flow is
measured from the same source samples: straightness and transport cost
(:func:`fmjax.metrics.efficiency.straightness`), and the sampling-efficiency sweep (MMD
against fresh target data and ODE error against NFE for euler / midpoint / heun / rk4 and
dopri5, :func:`fmjax.metrics.efficiency.sweep`). Writes ``metrics.json`` (one record per
run) and ``nfe_quality_<run>.png`` to the work dir, and ``euler_runs.png`` (MMD against Euler
steps, a line per run).

- ``sb_cfm`` in ``--couplings``: the noisy interpolant ``(1 - t) x0 + t x1 + sigma sqrt(t(1 -
  t)) z`` (``fmjax.paths.get("sb_cfm", sigma=--sb-sigma)``) with its entropic coupling
  (epsilon = 2 sigma^2), sampled with the learned field as the probability-flow ODE.
- ``--reflow=K``: K reflow rounds after the ``independent`` run, records ``reflow_1`` ..
  ``reflow_K``: each round draws ``--reflow-pairs`` pairs ``(x0, psi(x0))`` from the current
  flow and trains on them from its weights with a fresh optimizer and EMA, with toy2d's
  settings and reasons (:func:`experiments.toy2d_reflow.train_on_flow`, toy2d's
  ``config.reflow_round``: Adam 3e-4, EMA 0.99, pairs by dopri5 at 1e-4).
- ``--distill-steps=N``: one-step distillation (Liu et al. 2023) of the last of those flows
  (``reflow_K``, or ``independent`` without reflow): new pairs from it, then N steps of
  :func:`fmjax.reflow.distillation_loss` from its weights; record ``distilled`` (its one-step
  quality is the sweep's 1-step Euler MMD; it is trained at t = 0 only).
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import optax

import fmjax
from experiments import cli
from experiments import toy2d_reflow as rounds_lib
from experiments.configs import toy2d as toy2d_config
from experiments.plots import plot_sweep
from fmjax.checks import integer, real
from fmjax.data import toy
from fmjax.jsonio import write_json_atomic
from fmjax.metrics import efficiency
from fmjax.models import MLP

SWEEP_STEPS = (1, 2, 4, 8, 16, 32)
SWEEP_TOLS = (1e-2, 1e-3, 1e-4)
SWEEP_SOLVERS = efficiency.SWEEP_SOLVERS
SB_CFM = "sb_cfm"  # the run of the noisy interpolant with its entropic coupling


def _numbers(text, kind):
    return tuple(kind(x) for x in text.split(",") if x.strip())


@functools.lru_cache(maxsize=4)
def _model(hidden):
    """One MLP per width: equal fields share compiled solves across runs."""
    return MLP(hidden=hidden, depth=3, time_embedding="raw")


def field(hidden, params):
    """The MLP's field ``v(t, x)`` with ``params``."""
    return jax.tree_util.Partial(_model(hidden).apply, params)


def train(source, target, coupling, *, steps, batch, hidden, sb_sigma=0.5, seed=0):
    """The MLP trained for ``steps`` steps -> ``(params, seconds)``: the linear path with
    ``coupling``, or SB-CFM's noisy path and entropic coupling for ``coupling="sb_cfm"``."""
    model = _model(hidden)
    k_init, k_train = jax.random.split(jax.random.key(seed))
    params = model.init(k_init, jnp.zeros((1,)), jnp.zeros((1, 2)))
    tx = optax.adam(optax.cosine_decay_schedule(1e-3, steps, alpha=0.01))
    if coupling == SB_CFM:
        path = fmjax.paths.get(SB_CFM, sigma=sb_sigma)
        coupling = path.coupling
    else:
        path = fmjax.paths.CondOT(sigma_min=0.0)

    def loss_fn(p, k, pair):
        x0, x1 = pair
        v = jax.tree_util.Partial(model.apply, p)
        return fmjax.losses.cfm_loss(v, path, k, x1, x0=x0, coupling=coupling)

    def data_fn(k):
        k0, k1 = jax.random.split(k)
        return toy.sample(source, k0, batch), toy.sample(target, k1, batch)

    run = fmjax.train.make_fused_train_steps(loss_fn, tx, data_fn, _per_call(steps), ema_decay=None)
    state = fmjax.train.TrainState.create(params, tx, k_train)
    t0 = time.perf_counter()
    state, _ = fmjax.train.fit(
        state, run, None, steps, steps_per_call=_per_call(steps), progress=False
    )
    jax.block_until_ready(state)
    return state.params, time.perf_counter() - t0


def _per_call(steps):
    return next(c for c in (50, 10, 5, 1) if steps % c == 0)


def round_settings(num_steps, num_pairs, batch):
    """toy2d's ``config.reflow_round`` (learning rate, EMA, the pairs' tolerance) with this
    study's steps, pairs and batch."""
    r = toy2d_config.get_config().reflow_round
    r.num_steps, r.num_pairs, r.batch_size = num_steps, num_pairs, batch
    return r


def flow_rounds(source, params, *, hidden, reflow, distill_steps, r, seed=0):
    """``reflow`` reflow rounds from ``params`` (the independent coupling's field), then
    ``distill_steps`` steps of one-step distillation of the last field (0: none). Yields
    ``(name, params, record)`` per round: ``reflow_k`` and ``distilled``."""
    warmup = toy2d_config.get_config().train.warmup_steps
    rounds = [("reflow", k, r) for k in range(1, reflow + 1)]
    if distill_steps:
        rounds.append(
            ("distill", reflow + 1, round_settings(distill_steps, r.num_pairs, r.batch_size))
        )
    for loss, k, settings in rounds:
        k_x0, k_state = jax.random.split(jax.random.fold_in(jax.random.key(seed + 2), k))
        x0 = toy.sample(source, k_x0, settings.num_pairs)
        state, pair_seconds, seconds = rounds_lib.train_on_flow(
            _model(hidden).apply, params, x0, k_state, settings, loss=loss,
            warmup_steps=warmup, steps_per_call=_per_call(settings.num_steps),
        )  # fmt: skip
        params = state.ema_params
        name = f"reflow_{k}" if loss == "reflow" else "distilled"
        rec = {"pair_seconds": pair_seconds, "train_seconds": seconds, "steps": settings.num_steps}
        yield name, params, rec


def measure(
    v, source, target, *, n, steps=SWEEP_STEPS, tols=SWEEP_TOLS, solvers=SWEEP_SOLVERS, seed=1
):
    """Straightness, transport cost and the sweep from ``n`` source samples."""
    k0, k_ref = jax.random.split(jax.random.key(seed))
    x0, ref = toy.sample(source, k0, n), toy.sample(target, k_ref, n)
    flow = efficiency.straightness(v, x0, rtol=1e-5, atol=1e-5)
    records = efficiency.sweep(
        v,
        x0,
        solvers=solvers,
        steps=steps,
        tolerances=tols,
        quality=lambda x: {"mmd": float(fmjax.metrics.mmd(x, ref))},
    )
    return {
        "straightness": float(flow.straightness),
        "transport_cost": float(flow.transport_cost),
        "sweep": records,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="eight_gaussians")
    ap.add_argument("--target", default="two_moons")
    ap.add_argument("--couplings", default="independent,ot,ot_sinkhorn")
    ap.add_argument("--sb-sigma", type=float, default=0.5, help="sb_cfm's sigma")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--reflow", type=int, default=0, help="reflow rounds after independent")
    ap.add_argument("--reflow-steps", type=int, default=1000)
    ap.add_argument("--reflow-pairs", type=int, default=20000)
    ap.add_argument("--distill-steps", type=int, default=0, help="0: no distillation")
    ap.add_argument("--samples", type=int, default=1000, help="source samples measured")
    ap.add_argument("--sweep-steps", default=",".join(map(str, SWEEP_STEPS)))
    ap.add_argument("--sweep-tols", default=",".join(map(str, SWEEP_TOLS)))
    ap.add_argument("--sweep-solvers", default=",".join(SWEEP_SOLVERS))
    ap.add_argument("--workdir", default="out/toy2d_pairs")
    args = ap.parse_args(argv)
    names = [c.strip() for c in args.couplings.split(",") if c.strip()]
    try:
        toy.check_name(args.source)
        toy.check_name(args.target)
        for c in names:
            if c != SB_CFM:
                fmjax.couplings.get(c)
        if SB_CFM in names:
            fmjax.paths.get(SB_CFM, sigma=args.sb_sigma)
        for name in ("steps", "batch", "hidden", "samples", "reflow_steps", "reflow_pairs"):
            integer(getattr(args, name), "--" + name.replace("_", "-"), minimum=1)
        for name in ("reflow", "distill_steps"):
            integer(getattr(args, name), "--" + name.replace("_", "-"), minimum=0)
        real(args.sb_sigma, "--sb-sigma", low=0.0)
        if (args.reflow or args.distill_steps) and "independent" not in names:
            raise ValueError(
                "--reflow and --distill-steps start from the independent run: add "
                f"independent to --couplings; got {','.join(names)}."
            )
        steps, tols = _numbers(args.sweep_steps, int), _numbers(args.sweep_tols, float)
        solvers = _numbers(args.sweep_solvers, str)
        if "euler" not in solvers:
            raise ValueError(f"--sweep-solvers must include euler; got {solvers}.")
        if 1 not in steps or 2 not in steps or 4 not in steps:
            raise ValueError(f"--sweep-steps must include 1, 2 and 4; got {steps}.")
    except ValueError as err:
        cli.fail(cli.BAD_CONFIG, f"bad config: {err}")
    os.makedirs(args.workdir, exist_ok=True)
    out = {"source": args.source, "target": args.target, "args": vars(args), "runs": {}}

    def record(name, params, rec):
        v = field(args.hidden, params)
        rec = {
            **rec,
            **measure(
                v, args.source, args.target, n=args.samples, steps=steps, tols=tols,
                solvers=solvers,
            ),
        }  # fmt: skip
        out["runs"][name] = rec
        plot_sweep(os.path.join(args.workdir, f"nfe_quality_{name}.png"), rec["sweep"], "mmd")
        euler = {r["steps"]: r["mmd"] for r in rec["sweep"] if r["solver"] == "euler"}
        print(
            f"{name}: straightness {rec['straightness']:.4f}, transport cost "
            f"{rec['transport_cost']:.4f}, MMD^2 at 1/2/4 Euler steps "
            f"{euler[1]:.4f} / {euler[2]:.4f} / {euler[4]:.4f}",
            flush=True,
        )

    base = None
    for c in names:
        params, seconds = train(
            args.source, args.target, c, steps=args.steps, batch=args.batch,
            hidden=args.hidden, sb_sigma=args.sb_sigma,
        )  # fmt: skip
        rec = {"train_seconds": seconds}
        if c == SB_CFM:
            rec["sigma"] = args.sb_sigma
        record(c, params, rec)
        if c == "independent":
            base = params
    if args.reflow or args.distill_steps:
        r = round_settings(args.reflow_steps, args.reflow_pairs, args.batch)
        rounds = flow_rounds(
            args.source, base, hidden=args.hidden, reflow=args.reflow,
            distill_steps=args.distill_steps, r=r,
        )  # fmt: skip
        for name, params, rec in rounds:
            record(name, params, rec)
    rounds_lib.plot_rounds(
        os.path.join(args.workdir, "euler_runs.png"),
        [{"label": name, **rec} for name, rec in out["runs"].items()],
    )
    write_json_atomic(os.path.join(args.workdir, "metrics.json"), out)
    return out


if __name__ == "__main__":
    main()
