"""What one minibatch-OT pairing costs, and how good it is, per batch size.

    python benchmarks/ot_coupling.py [--sizes 256,1024,4096] [--repeats 3]

Pairs N(0, I) source points with checkerboard data (the W2D workload's 2-D densities) and
times, for each batch size:

* ``fmjax exact``: :func:`fmjax.couplings.minibatch_ot` (``method="exact"``): scipy's
  ``linear_sum_assignment`` on the host, the optimal permutation;
* ``fmjax sinkhorn reg``: ott-jax's Sinkhorn plan rounded to a permutation on the device
  (:func:`fmjax.couplings.round_to_permutation`), under ``jit``;
* ``POT emd + draw`` (when POT is installed, as with the ``[peers]`` extra): what torchcfm's
  ``ExactOptimalTransportConditionalFlowMatcher`` does: ``ot.emd`` for the plan, then one
  x0 index per row drawn from the plan with replacement.

Each row reports the seconds per pairing (median of ``--repeats`` after a first call), the
transport cost ``mean ||x0' - x1||^2`` against the optimum's, and how many distinct source
points the pairs use (a permutation uses all of them). JSON to
``benchmarks/results/ot_coupling.json``, a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
for p in (HERE, os.path.dirname(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import harness  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from fmjax import couplings  # noqa: E402
from fmjax.data import toy  # noqa: E402


def _points(n, seed=0):
    k0, k1 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k0, (n, 2)), toy.sample("checkerboard", k1, n)


def _cost(x0p, x1):
    return float(np.mean(np.sum((np.asarray(x0p) - np.asarray(x1)) ** 2, axis=1)))


def _distinct(x0p):
    return len({tuple(r) for r in np.asarray(x0p).round(6).tolist()})


def _pot_draw(x0, x1, rng):
    import ot

    a, b = np.asarray(x0, np.float64), np.asarray(x1, np.float64)
    cost = ot.dist(a, b)
    plan = ot.emd(ot.unif(len(a)), ot.unif(len(b)), cost)
    p = plan.flatten() / plan.sum()
    choices = rng.choice(plan.size, size=len(a), p=p, replace=True)
    i, j = np.divmod(choices, plan.shape[1])
    return a[i], b[j]


def run(sizes, repeats, log):
    records = []
    rng = np.random.default_rng(0)
    for n in sizes:
        x0, x1 = _points(n)
        best = None
        cases = [("fmjax exact", functools.partial(couplings.minibatch_ot, None, x0, x1))]
        for reg in (0.05, 0.01):
            f = jax.jit(functools.partial(couplings.minibatch_ot, method="sinkhorn", reg=reg))
            cases.append((f"fmjax sinkhorn {reg:g}", functools.partial(f, None, x0, x1)))
        if harness.importable(["ot"])[0]:
            cases.append(("POT emd + draw", functools.partial(_pot_draw, x0, x1, rng)))
        for name, fn in cases:
            reps = 1 if (name == "fmjax exact" and n > 2048) else repeats

            def call(fn=fn):
                out = fn()
                return jax.block_until_ready(out[0]), out[1]

            first, times, (x0p, x1p) = harness.bench(call, reps)
            cost = _cost(x0p, x1p)
            if name == "fmjax exact":
                best = cost
            rec = {
                "batch": n,
                "method": name,
                "seconds": harness.summarize(times)["median"] if times else first,
                "first_call_s": first,
                "transport_cost": cost,
                "excess_over_optimum": cost / best - 1.0,
                "distinct_source_points": _distinct(x0p),
            }
            log(f"{n} {name}: {rec['seconds']:.4f} s, cost {cost:.4f}")
            records.append(rec)
    return records


def markdown(records):
    lines = [
        "| batch | method | s per pairing | transport cost (excess over optimum) | "
        "distinct x0 used |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['batch']} | {r['method']} | {harness.fmt(r['seconds'])} | "
            f"{r['transport_cost']:.4f} ({100 * r['excess_over_optimum']:+.2f} %) | "
            f"{r['distinct_source_points']} of {r['batch']} |"
        )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="256,1024,4096")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=harness.results_path("ot_coupling.json"))
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    log = harness.logger("ot")
    records = run(sizes, args.repeats, log)
    harness.write_json(
        args.out,
        {"meta": {**harness.machine_info(), "argv": sys.argv}, "records": records},
    )
    print(markdown(records))


if __name__ == "__main__":
    main()
