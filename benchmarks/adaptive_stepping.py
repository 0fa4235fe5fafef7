"""Whole-batch versus per-example adaptive stepping in ``fmjax.sample`` (dopri5 1e-5).

Three modes: one step sequence for the whole batch with the batch RMS error norm
(``error_norm='rms'``, the default) or with the largest per-example RMS (``error_norm='max'``),
and per-example step control (``per_example=True``, a vmapped solve). Uses the W2D benchmark's
shared weights (``benchmarks/w2d.py --weights ...`` writes them) and prints wall time (median
of 3 after one compiling call) and the true NFE of each mode: one count for the whole batch,
or min / median / max over the examples.

    python benchmarks/adaptive_stepping.py --weights /tmp/w2d_weights.npz \
        --weights-small /tmp/w2d_small.npz [--models W2D-small]
"""

import argparse
import os
import statistics
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]

import jax
import numpy as np
from harness import bench
from w2d_fmjax import FmjaxSide
from w2d_workload import SEED, W2D, W2D_SMALL, load_layers

import fmjax


def measure(cfg, path, n, per_example, error_norm="rms", repeats=3):
    side = FmjaxSide(cfg)
    params = side.params_from_layers(load_layers(path))
    x0 = jax.random.normal(jax.random.PRNGKey(SEED), (n, 2))

    def run():
        x, stats = fmjax.sample(
            side.field(params),
            x0,
            solver="dopri5",
            rtol=1e-5,
            atol=1e-5,
            per_example=per_example,
            error_norm=error_norm,
        )
        jax.block_until_ready(x)
        return stats

    first, times, stats = bench(run, repeats)
    nfe = np.asarray(stats.nfe)
    nfe_desc = (
        f"NFE {int(nfe)}"
        if nfe.ndim == 0
        else f"NFE per example {nfe.min()} / {int(np.median(nfe))} / {nfe.max()} "
        "(min / median / max)"
    )
    mode = "per example" if per_example else f"whole batch, error_norm={error_norm!r}"
    print(
        f"hidden {cfg['hidden']:4d}, {n} points, {mode}: "
        f"{statistics.median(times):.4g} s (min {min(times):.4g}, max {max(times):.4g}; "
        f"first call {first:.3g} s), {nfe_desc}",
        flush=True,
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", required=True, help="W2D weights .npz (from w2d.py)")
    ap.add_argument("--weights-small", required=True, help="W2D-small weights .npz")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="W2D,W2D-small", help="comma-separated subset")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or set(models) - {"W2D", "W2D-small"}:
        ap.error(f"--models must name W2D and/or W2D-small; got {args.models!r}")
    for path in (args.weights, args.weights_small):
        if not os.path.exists(path):
            ap.error(f"no weights file {path!r}: run benchmarks/w2d.py with --weights first")
    for name, cfg, path, n in (
        ("W2D", W2D, args.weights, 50_000),
        ("W2D-small", W2D_SMALL, args.weights_small, 1000),
    ):
        if name not in models:
            continue
        for per_example, norm in ((False, "rms"), (False, "max"), (True, "rms")):
            measure(cfg, path, n, per_example, norm, args.repeats)


if __name__ == "__main__":
    main()
