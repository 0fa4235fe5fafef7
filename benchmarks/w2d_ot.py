"""W2D OT-CFM training: fmjax's minibatch-OT couplings against torchcfm's exact OT-CFM.

    python benchmarks/w2d_ot.py [--sizes small,W2D] [--repeats 3] [--steps 20,2]

The W2D workloads of ``w2d.py`` (checkerboard data drawn fresh every step, CondOT with
sigma_min = 0, Adam 1e-3, float32; W2D-small: torchcfm's example MLP at batch 256; W2D: the
4x512 MLP at batch 4,096), trained with a minibatch-OT coupling, timed in interleaved rounds
(``harness.interleave``) in one process:

* ``torchcfm exact``: ``ExactOptimalTransportConditionalFlowMatcher(sigma=0)`` in its
  example loop (POT ``ot.emd`` with its default 100,000 iterations, then one x0 per row drawn
  from the plan with replacement: not a permutation);
* ``fmjax exact (in step)``: ``cfm_loss(coupling="ot")`` in the jitted step: the optimal
  permutation (POT's network simplex run to optimality, ``solver="auto"``) in a host callback
  that the step waits for;
* ``fmjax exact (pipelined)``: the same optimal permutation computed in a host thread for the
  next batch (numpy data, ``fmjax.couplings.exact_ot_permutation``) while the device runs
  the current step, which takes ``x0`` as given (the thread works only during this line's
  turns: on one machine it shares the cores with the step);
* ``fmjax sinkhorn (in step)``: ott-jax Sinkhorn (reg 0.01) rounded to a permutation on the
  device.

JSON to ``benchmarks/results/w2d_ot.json``, a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import functools
import os
import queue
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
for p in (HERE, os.path.dirname(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import harness  # noqa: E402
import numpy as np  # noqa: E402
from w2d_fmjax import FmjaxSide, checkerboard_fn  # noqa: E402
from w2d_workload import CHECKERBOARD_SCALE, SEED, W2D, W2D_SMALL  # noqa: E402

log = harness.logger("w2d_ot")
SIZES = {"small": ("W2D-small", W2D_SMALL, 256), "W2D": ("W2D", W2D, 4096)}


def numpy_checkerboard(rng, n):
    """The W2D checkerboard on the host (the formula of ``w2d.py``'s docstring)."""
    x1 = rng.uniform(-2.0, 2.0, n)
    x2 = rng.uniform(0.0, 1.0, n) - 2.0 * rng.integers(0, 2, n) + np.floor(x1) % 2
    return (np.stack([x1, x2], 1) / CHECKERBOARD_SCALE).astype(np.float32)


class PairedBatches:
    """Batches ``{"x0", "x1"}`` paired by exact OT in a background thread, ``depth`` ahead.

    The thread pairs only while ``active`` is set (during this line's turns), so it takes no
    CPU from the other lines' turns and a turn cannot live off batches paired in them."""

    def __init__(self, batch, seed, depth=1):
        self.q = queue.Queue(maxsize=depth)
        self.rng = np.random.default_rng(seed)
        self.batch, self.stop = batch, False
        self.active = threading.Event()
        self.wait_s = 0.0
        threading.Thread(target=self._fill, daemon=True).start()

    def _fill(self):
        from fmjax import couplings

        while not self.stop:
            self.active.wait()
            x1 = numpy_checkerboard(self.rng, self.batch)
            x0 = self.rng.standard_normal(x1.shape).astype(np.float32)
            x0 = x0[couplings.exact_ot_permutation(x0, x1)]
            self.q.put({"x0": x0, "x1": x1})

    def __next__(self):
        t0 = time.perf_counter()
        out = self.q.get()
        self.wait_s += time.perf_counter() - t0
        return out


def fmjax_timer(spec, batch, steps, mode):
    """``run()`` makes ``steps`` fmjax OT-CFM steps (one jitted call each); the first call
    (compile + one step) is made here."""
    import jax
    import optax

    import fmjax

    side = FmjaxSide(spec)
    path = fmjax.paths.CondOT(sigma_min=0.0)
    tx = optax.adam(1e-3)
    draw = checkerboard_fn(batch)
    coupling = {"in_step": "ot", "sinkhorn": "ot_sinkhorn", "pipelined": "independent"}[mode]

    def loss_fn(params, key, b):
        field = lambda t, x: side.model.apply(params, t, x)  # noqa: E731
        k_data, k_loss = jax.random.split(key)
        if mode == "pipelined":  # x0 paired on the host, ahead of this step
            return fmjax.losses.cfm_loss(field, path, k_loss, b["x1"], x0=b["x0"])
        return fmjax.losses.cfm_loss(field, path, k_loss, draw(k_data), coupling=coupling)

    state = fmjax.train.TrainState.create(side.init(SEED), tx, jax.random.PRNGKey(SEED + 1))
    step = fmjax.train.make_train_step(loss_fn, tx, ema_decay=None)
    batches = PairedBatches(batch, SEED) if mode == "pipelined" else None
    dummy = {"x0": np.zeros((1, 2), np.float32), "x1": np.zeros((1, 2), np.float32)}
    box = {"state": state}

    def run_n(n):
        s = box["state"]
        if batches:
            batches.active.set()
        for _ in range(n):
            s, metrics = step(s, next(batches) if batches else dummy)
        jax.block_until_ready(s.params)
        if batches:
            batches.active.clear()
        box["state"] = s
        return float(metrics["loss"])

    t0 = time.perf_counter()
    run_n(1)
    return time.perf_counter() - t0, lambda: run_n(steps), batches


def torchcfm_timer(spec, batch, steps):
    import torch
    from torchcfm.conditional_flow_matching import ExactOptimalTransportConditionalFlowMatcher
    from w2d_torchcfm import TorchCFMSide

    torch.set_num_threads(2)
    side = TorchCFMSide(spec)
    side.fm = ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)
    _, run = side.train_timer(batch, steps)
    return None, run, None


def run_size(name, args, steps):
    label, spec, batch = SIZES[name]
    timers, records = {}, []
    lines = {
        "fmjax exact (in step)": functools.partial(fmjax_timer, spec, batch, steps, "in_step"),
        "fmjax exact (pipelined)": functools.partial(fmjax_timer, spec, batch, steps, "pipelined"),
        "fmjax sinkhorn (in step)": functools.partial(fmjax_timer, spec, batch, steps, "sinkhorn"),
    }
    if harness.importable(["torch", "torchcfm", "ot"])[0]:
        lines["torchcfm exact"] = functools.partial(torchcfm_timer, spec, batch, steps)
    for line, make in lines.items():
        log(f"{label}: preparing {line}")
        timers[line] = make()
    times, losses, errors = harness.interleave(
        {k: v[1] for k, v in timers.items()}, args.repeats, args.min_turn
    )
    peers = [k for k in timers if not k.startswith("fmjax")]
    for line, (first, _, batches) in timers.items():
        if line in errors:
            records.append({"case": label, "framework": line, "error": errors[line]})
            continue
        rates = harness.summarize([steps / t for t in times[line]])
        rec = {
            "case": f"{label} OT-CFM training, batch {batch}",
            "framework": line,
            "unit": "steps/s",
            "first_call_s": first,
            "loss": losses[line],
            "loadavg_1m": harness.loadavg(),
            **rates,
        }
        ratios = harness.round_ratios(times, line, peers) if peers else None
        if line.startswith("fmjax") and ratios:
            rec["vs_peer"] = harness.summarize(ratios)
        if batches is not None:
            batches.stop = True
            rec["pipeline_wait_s"] = batches.wait_s
        records.append(rec)
        log(f"{label} {line}: {rates['median']:.3f} steps/s")
    return records


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="small,W2D")
    ap.add_argument("--steps", default="20,2", help="steps per turn, per size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=harness.results_path("w2d_ot.json"))
    harness.add_min_turn(ap)
    args = ap.parse_args(argv)
    harness.check_min_turn(ap, args)
    sizes, bad = harness.parse_subset(args.sizes, tuple(SIZES))
    if bad:
        ap.error(f"--sizes: unknown {bad}; known: {sorted(SIZES)}")
    steps = [int(s) for s in args.steps.split(",")]
    records = []
    for name, k in zip(sizes, steps, strict=False):
        records += run_size(name, args, k)
    harness.write_json(
        args.out, {"machine": harness.machine_info(), "args": vars(args), "records": records}
    )
    print("| case | line | steps/s (median, min-max) | x torchcfm (per round) |")
    print("|---|---|---|---|")
    for r in records:
        if "error" in r:
            print(f"| {r['case']} | {r['framework']} | error: {r['error']} | |")
            continue
        vs = r.get("vs_peer")
        ratio = f"{vs['median']:.2f} ({vs['min']:.2f}-{vs['max']:.2f})" if vs else ""
        print(
            f"| {r['case']} | {r['framework']} | {harness.fmt(r['median'])} "
            f"({harness.fmt(r['min'])}-{harness.fmt(r['max'])}) | {ratio} |"
        )
    return records


if __name__ == "__main__":
    main()
