"""What one minibatch-OT pairing costs, and how good it is, per batch size.

    python benchmarks/ot_coupling.py [--sizes 256,1024,4096] [--repeats 3] [--data 2d|image]

Pairs N(0, I) source points with checkerboard data (the W2D workload's 2-D densities; with
``--data image``: 32x32x3 uniform pixel levels) and times, for each batch size:

* ``fmjax exact``: :func:`fmjax.couplings.minibatch_ot` (``method="exact"``) with POT's network
  simplex; ``fmjax exact (scipy Hungarian)``: the same with scipy's ``linear_sum_assignment``
  (both give the optimal permutation; ``solver="auto"`` picks by the event size);
* ``fmjax sinkhorn reg``: ott-jax's Sinkhorn plan rounded to a permutation on the device
  (:func:`fmjax.couplings.round_to_permutation`), under ``jit``;
* ``POT emd + draw`` (2-D; POT is a dependency of fmjax): what torchcfm's
  ``ExactOptimalTransportConditionalFlowMatcher`` does: ``ot.emd`` with its default iteration
  limit for the plan, then one x0 index per row drawn from the plan with replacement;
* ``exact per process, P processes``: the batch split in P slices, each paired exactly on its
  own (what the input-pipeline pairing of ``fmjax.data.pairing`` does on P processes).

Each row reports the seconds per pairing (median of ``--repeats`` after a first call), the
transport cost ``mean ||x0' - x1||^2`` against the optimum's, and how many distinct source
points the pairs use (a permutation uses all of them). JSON to
``benchmarks/results/ot_coupling.json`` (``ot_coupling_image.json``), a markdown table to
stdout.
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


def _points(n, seed=0, data="2d"):
    k0, k1 = jax.random.split(jax.random.key(seed))
    if data == "image":  # N(0, I) noise against uniform pixel levels in [-1, 1)
        levels = jax.random.randint(k1, (n, 32, 32, 3), 0, 256)
        return jax.random.normal(k0, (n, 32, 32, 3)), levels / 128.0 - 1.0
    return jax.random.normal(k0, (n, 2)), toy.sample("checkerboard", k1, n)


def _per_process(x0, x1, parts):
    """Each of ``parts`` processes pairs its own slice exactly (the input-pipeline pairing)."""
    x0, x1 = np.asarray(x0), np.asarray(x1)
    out = []
    for s in np.array_split(np.arange(len(x0)), parts):
        out.append(x0[s][couplings.exact_ot_permutation(x0[s], x1[s])])
    return np.concatenate(out), x1


def _cost(x0p, x1):
    return float(np.mean(np.sum((np.asarray(x0p) - np.asarray(x1)) ** 2, axis=1)))


def _distinct(x0p):
    rows = np.asarray(x0p).reshape(len(x0p), -1).round(6)
    return len({tuple(r) for r in rows.tolist()})


def _pot_draw(x0, x1, rng):
    import ot

    a, b = np.asarray(x0, np.float64), np.asarray(x1, np.float64)
    cost = ot.dist(a, b)
    plan = ot.emd(ot.unif(len(a)), ot.unif(len(b)), cost)
    p = plan.flatten() / plan.sum()
    choices = rng.choice(plan.size, size=len(a), p=p, replace=True)
    i, j = np.divmod(choices, plan.shape[1])
    return a[i], b[j]


def run(sizes, repeats, log, data="2d", processes=(2, 4, 8)):
    records = []
    rng = np.random.default_rng(0)
    for n in sizes:
        x0, x1 = _points(n, data=data)
        best = None
        ot_exact = functools.partial(couplings.minibatch_ot, None, x0, x1)
        cases = [
            ("fmjax exact", functools.partial(ot_exact, solver="network_simplex")),
            ("fmjax exact (scipy Hungarian)", functools.partial(ot_exact, solver="hungarian")),
        ]
        for reg in (0.05, 0.01):
            f = jax.jit(functools.partial(couplings.minibatch_ot, method="sinkhorn", reg=reg))
            cases.append((f"fmjax sinkhorn {reg:g}", functools.partial(f, None, x0, x1)))
        if data == "2d":
            cases.append(("POT emd + draw", functools.partial(_pot_draw, x0, x1, rng)))
        for p in processes:
            if n % p == 0:
                cases.append(
                    (
                        f"exact per process, {p} processes",
                        functools.partial(_per_process, x0, x1, p),
                    )
                )
        for name, fn in cases:
            reps = 1 if (name.startswith("fmjax exact") and n > 2048) else repeats

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
    ap.add_argument("--data", choices=("2d", "image"), default="2d")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    log = harness.logger("ot")
    records = run(sizes, args.repeats, log, data=args.data)
    if args.out is None:
        suffix = "" if args.data == "2d" else "_image"
        args.out = harness.results_path(f"ot_coupling{suffix}.json")
    harness.write_json(
        args.out,
        {"meta": {**harness.machine_info(), "argv": sys.argv}, "records": records},
    )
    print(markdown(records))


if __name__ == "__main__":
    main()
