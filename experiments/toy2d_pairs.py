"""Couplings between two 2-D data sets: independent against minibatch OT at the same budget.

    python -m experiments.toy2d_pairs [--source=eight_gaussians] [--target=two_moons]
        [--couplings=independent,ot,ot_sinkhorn] [--steps=1500] [--batch=256]
        [--workdir=out/toy2d_pairs]

Flow matching between two data distributions (no Gaussian end): x0 from ``--source``, x1 from
``--target`` (both :mod:`fmjax.data.toy` densities), the linear path (CondOT with
sigma_min = 0) and the same MLP, optimiser and steps for every coupling. Each trained flow is
measured from the same source samples: straightness and transport cost
(:func:`fmjax.metrics.efficiency.straightness`), and the sampling-efficiency sweep (MMD
against fresh target data and ODE error against NFE for euler / midpoint / heun / rk4 and
dopri5, :func:`fmjax.metrics.efficiency.sweep`). Writes ``metrics.json`` (one record per
coupling) and ``nfe_quality_<coupling>.png`` to the work dir.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import optax

import fmjax
from experiments import cli
from experiments.plots import plot_sweep
from fmjax.checks import integer
from fmjax.data import toy
from fmjax.jsonio import write_json_atomic
from fmjax.metrics import efficiency
from fmjax.models import MLP

SWEEP_STEPS = (1, 2, 4, 8, 16, 32)
SWEEP_TOLS = (1e-2, 1e-3, 1e-4)
SWEEP_SOLVERS = efficiency.SWEEP_SOLVERS


def _numbers(text, kind):
    return tuple(kind(x) for x in text.split(",") if x.strip())


def train(source, target, coupling, *, steps, batch, hidden, seed=0):
    """The MLP field trained for ``steps`` steps -> ``(v, seconds)``."""
    model = MLP(hidden=hidden, depth=3, time_embedding="raw")
    k_init, k_train = jax.random.split(jax.random.key(seed))
    params = model.init(k_init, jnp.zeros((1,)), jnp.zeros((1, 2)))
    tx = optax.adam(optax.cosine_decay_schedule(1e-3, steps, alpha=0.01))
    path = fmjax.paths.CondOT(sigma_min=0.0)

    def loss_fn(p, k, pair):
        x0, x1 = pair
        field = jax.tree_util.Partial(model.apply, p)
        return fmjax.losses.cfm_loss(field, path, k, x1, x0=x0, coupling=coupling)

    def data_fn(k):
        k0, k1 = jax.random.split(k)
        return toy.sample(source, k0, batch), toy.sample(target, k1, batch)

    per_call = next(c for c in (50, 10, 5, 1) if steps % c == 0)
    run = fmjax.train.make_fused_train_steps(loss_fn, tx, data_fn, per_call, ema_decay=None)
    state = fmjax.train.TrainState.create(params, tx, k_train)
    t0 = time.perf_counter()
    state, _ = fmjax.train.fit(state, run, None, steps, steps_per_call=per_call, progress=False)
    jax.block_until_ready(state)
    return jax.tree_util.Partial(model.apply, state.params), time.perf_counter() - t0


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
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=256)
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
            fmjax.couplings.get(c)
        for name in ("steps", "batch", "hidden", "samples"):
            integer(getattr(args, name), f"--{name}", minimum=1)
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
    for c in names:
        v, seconds = train(
            args.source, args.target, c, steps=args.steps, batch=args.batch, hidden=args.hidden
        )
        rec = measure(
            v, args.source, args.target, n=args.samples, steps=steps, tols=tols, solvers=solvers
        )
        rec = {"train_seconds": seconds, **rec}
        out["runs"][c] = rec
        plot_sweep(os.path.join(args.workdir, f"nfe_quality_{c}.png"), rec["sweep"], "mmd")
        euler = {r["steps"]: r["mmd"] for r in rec["sweep"] if r["solver"] == "euler"}
        print(
            f"{c}: straightness {rec['straightness']:.4f}, transport cost "
            f"{rec['transport_cost']:.4f}, MMD^2 at 1/2/4 Euler steps "
            f"{euler[1]:.4f} / {euler[2]:.4f} / {euler[4]:.4f}",
            flush=True,
        )
    write_json_atomic(os.path.join(args.workdir, "metrics.json"), out)
    return out


if __name__ == "__main__":
    main()
