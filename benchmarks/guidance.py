"""Cost of classifier-free guidance in ``fmjax.sample``: one call of the model on 2B rows
against two calls of B rows, and against the unguided conditional field (w = 1).

A class-conditional MLP of the W2D benchmark's sizes (input concat(x, t, one-hot class),
SiLU; random weights: only the time matters), 8 classes and a null class. Fixed-step solves
(so every mode takes the same NFE), the modes timed in interleaved rounds (median and min-max
of ``--rounds``, each turn at least 0.3 s), first calls apart::

    python benchmarks/guidance.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]

import jax
import jax.numpy as jnp
from harness import bench, interleave

import fmjax

NUM_CLASSES = 8
MODELS = {  # name: (hidden width, hidden layers, points, solver, steps)
    "W2D": (512, 4, 10_000, "midpoint", 20),
    "W2D-small": (64, 3, 1_000, "euler", 100),
}


def init(key, width, depth):
    sizes = [2 + 1 + NUM_CLASSES + 1] + [width] * depth + [2]
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (jax.random.normal(k, (a, b)) / jnp.sqrt(a), jnp.zeros(b))
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def field(params, t, x, y):
    h = jnp.concatenate([x, t[:, None], jax.nn.one_hot(y, NUM_CLASSES + 1)], axis=1)
    for w, b in params[:-1]:
        h = jax.nn.silu(h @ w + b)
    w, b = params[-1]
    return h @ w + b


def _runner(f, x0, solver, steps):
    def run():
        x, stats = fmjax.sample(f, x0, solver=solver, steps=steps)
        jax.block_until_ready(x)
        return stats

    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--scale", type=float, default=2.0, help="guidance weight w")
    args = ap.parse_args(argv)
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs")
    for name, (width, depth, n, solver, steps) in MODELS.items():
        params = init(jax.random.key(0), width, depth)
        v = jax.tree_util.Partial(field, params)
        x0 = jax.random.normal(jax.random.key(1), (n, 2))
        y = jnp.arange(n) % NUM_CLASSES
        fields = {
            "unguided (w = 1)": fmjax.guidance.classifier_free(v, y, NUM_CLASSES, 1.0),
            "guided, one call of 2B rows": fmjax.guidance.classifier_free(
                v, y, NUM_CLASSES, args.scale
            ),
            "guided, two calls of B rows": fmjax.guidance.classifier_free(
                v, y, NUM_CLASSES, args.scale, batched=False
            ),
        }

        runs = {label: _runner(f, x0, solver, steps) for label, f in fields.items()}
        firsts = {label: bench(run, 0)[0] for label, run in runs.items()}
        times, _, errors = interleave(runs, args.rounds, min_seconds=0.3)
        if errors:
            raise RuntimeError(errors)
        print(f"\n{name}: {width} x {depth} hidden, {n} points, {solver} x {steps} steps")
        base = statistics.median(times["unguided (w = 1)"])
        for label, ts in times.items():
            med = statistics.median(ts)
            print(
                f"  {label:30s} {med * 1e3:9.2f} ms (min {min(ts) * 1e3:.2f}, max "
                f"{max(ts) * 1e3:.2f}; first call {firsts[label]:.2f} s)  "
                f"{med / base:.2f}x unguided"
            )


if __name__ == "__main__":
    main()
