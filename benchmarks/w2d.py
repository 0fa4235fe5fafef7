"""W2D: side-by-side CPU benchmark of fmjax against Meta's ``flow_matching`` and ``torchcfm``.

All three frameworks run in ONE process on the same machine, on the workload of the 2-D
example of Meta's ``flow_matching`` library:

* data: the checkerboard ``x1 ~ U[-2, 2)``, ``x2 = u - 2b + (floor(x1) mod 2)``,
  ``u ~ U[0, 1)``, ``b ~ Bernoulli(1/2)``, then ``(x1, x2) / 0.45`` (entropy 3.6765 nats);
  fresh data every training step, drawn on each framework's own side (torch for the peers,
  with the example's ``inf_train_gen``; jax for fmjax, inside the jitted step);
* model: ``concat(x, t)`` -> Linear(3,512) -> 3 x Linear(512,512) -> Linear(512,2), SiLU
  after the first four (791,042 parameters);
* CondOT path with sigma_min = 0, ``t ~ U[0, 1]``, MSE to ``x1 - x0``, Adam(1e-3),
  batch 4096, float32, 2 threads (``torch.set_num_threads(2)``; XLA uses the 2 cores as is).
  The torch model uses ``nn.SiLU`` (the example writes ``sigmoid(x) * x`` by hand, which is
  slower) and, for the training loops, each peer's own example loop.

Rows (``--rows``):

* ``train``: training steps/s (fmjax also: first call = compile + one step), one jitted
  ``make_train_step`` call per step; an extra fmjax line (``--no-fused`` drops it) runs the
  same steps fused into one ``make_fused_train_steps`` call (a ``lax.scan``).
* ``sample``: 50,000 samples with midpoint (step 0.05, 40 NFE) and dopri5 (rtol=atol=1e-5):
  wall time and the true NFE (counted by a wrapper on the torch side; ``stats.nfe`` on the
  fmjax side, checked once against a ``jax.debug.callback`` counter).
* ``likelihood``: log-likelihood of 10,000 points: exact divergence + midpoint 0.05,
  Hutchinson (one Rademacher probe) + midpoint 0.05, exact divergence + dopri5 1e-5.
  ``flow_matching`` uses ``ODESolver.compute_likelihood``; torchcfm has no likelihood API,
  so its row is torchdiffeq's ``odeint`` on the augmented state ``[x, logp]`` with the
  divergence from autograd (2 backward passes for the exact trace in 2-D, one for
  Hutchinson), integrated from t=1 to t=0.
* ``quality``: each framework trains its own model for 3,000 steps, then the held-out NLL
  (exact divergence, dopri5 1e-5) of 20,000 points and an MMD^2 (sum of RBF kernels with
  fixed bandwidths, unbiased estimator, computed by the same jax code for all) between 20,000
  dopri5 samples and 20,000 fresh data points. ``--quality-seeds N`` trains N models per
  framework (different initializations and data streams) and adds their mean and standard
  deviation, so a ranking can be read against the spread between training runs.
* ``small``: W2D-small, Linear(3,64)-SELU-Linear(64,64)-SELU-Linear(64,64)-SELU-Linear(64,2)
  (8,706 parameters, torchcfm's example MLP), batch 256: training steps/s; 1,000 samples with
  Euler (100 steps) and with dopri5 1e-5; ONE sample with dopri5 1e-5 (latency); exact
  log-likelihood of 1,000 points with dopri5 1e-5.
* ``matmul``: the machine's fp32 matmul throughput (best of several 4096x4096 ``jnp.dot``,
  ``torch.mm`` for reference) and the fraction of it each framework's W2D training step
  reaches (FLOP/step = 3 x 2 x params x batch).

Rows ``sample``, ``likelihood`` and ``small`` use the SAME weights in all three frameworks
(the fmjax model of the ``quality`` row when that row ran first, else trained once, by fmjax
if it is there, else by torch; or loaded with ``--weights`` /
``--weights-small``, ``.npz`` files with ``kernel_i`` (in, out) and ``bias_i`` arrays, which
are written there when the file does not exist yet), and the same starting points / data
points, so the rows also report how far each framework's outputs are from the first one's.

Data parallel on the CPU cores: the script first calls ``fmjax.use_cpu_devices(N)``
(``--cpu-devices``, default one device per core) and adds an fmjax line, ``fmjax (N CPU
devices)``, that splits each batch over the N devices (``mesh=`` of ``fmjax.sample``,
``fmjax.log_likelihood`` and ``make_fused_train_steps``): XLA:CPU runs a small model's ops on
one core each, so a single device leaves the other cores idle. The plain ``fmjax`` lines use
device 0 only, as a one-device process does. Rows whose batch does not split (ONE sample)
have no such line. ``--cpu-devices 1`` drops them.

Timings: the median of ``--repeats`` runs (default 3) with min-max.  For fmjax the first
call (trace + compile + one run) is reported separately; the torch side is warmed up
untimed on a small input.  Within a case the frameworks are timed in interleaved rounds,
one turn of each per round with the starting framework rotating, because the machine's
speed drifts by tens of percent over minutes; a turn repeats the call for at least
``--min-turn`` seconds (default 0.5) and records the mean time per call, except in the
single-point latency case, where a turn is one call made after other frameworks' work.
Each fmjax line also gets its per-round ratio to the faster peer (median and min-max over
the rounds), in its notes and in a second table.

The code: ``harness.py`` (timing in interleaved rounds, output, machine info), one module
per framework (``w2d_fmjax.py``; ``w2d_torch.py``, the PyTorch base of
``w2d_flow_matching.py`` and ``w2d_torchcfm.py``), ``w2d_workload.py`` (sizes, data,
weights), ``w2d_runner.py`` and ``w2d_quality.py`` (the rows), ``w2d_report.py`` (the
tables); this file is the command line.

Usage::

    python benchmarks/w2d.py                       # the full run (2 cores: hours)
    python benchmarks/w2d.py --quick               # tiny sizes, a smoke check
    python benchmarks/w2d.py --only flow_matching,torchcfm --rows train,sample --repeats 5

Run it on an otherwise idle machine: the 1-minute load average is recorded with every row
(``loadavg_1m``); with other processes busy, torch with 2 threads slows down far more than
XLA on the small model (its two threads wait for each other at every op).

Writes a markdown table to stdout and the raw numbers to ``benchmarks/results/w2d_raw.json``
(``--quick``: to a file in the temp directory unless ``--out`` is given); the tables of
``docs/benchmarks.md`` are taken from such files.  A peer that is
not installed is skipped with a note.  Install the peers with the CPU build of torch::

    pip install torch==2.13.0   # the local +cpu wheel
    pip install flow_matching==1.0.10 torchdiffeq==0.2.5
    pip install --no-deps torchcfm==1.0.7 && pip install POT
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

# Run from a checkout without installing fmjax, and loaded from elsewhere (a test): this
# folder (the sibling modules) and the repository root on the path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (_HERE, os.path.dirname(_HERE)) if p not in sys.path]

from harness import (
    add_min_turn,
    check_min_turn,
    loadavg,
    logger,
    machine_info,
    parse_subset,
    results_path,
    versions,
    write_json,
)
from w2d_quality import MMD_BANDWIDTHS
from w2d_report import markdown
from w2d_runner import Runner
from w2d_sides import FRAMEWORKS, available
from w2d_workload import (
    FULL,
    QUICK,
    W2D,
    W2D_SMALL,
    checkerboard_entropy,
    num_params,
    train_flop_per_step,
)

ROWS = ("train", "sample", "likelihood", "quality", "small", "matmul")
VERSIONS_OF = (
    "fmjax",
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "diffrax",
    "torch",
    "flow_matching",
    "torchcfm",
    "torchdiffeq",
    "numpy",
)
log = logger("w2d")


def parser():
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke check)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--only",
        default=",".join(FRAMEWORKS),
        help="comma-separated subset of " + ",".join(FRAMEWORKS),
    )
    ap.add_argument(
        "--rows", default=",".join(ROWS), help="comma-separated subset of " + ",".join(ROWS)
    )
    ap.add_argument(
        "--out",
        default=None,
        help="raw JSON output (default benchmarks/results/w2d_raw.json; --quick: the temp "
        "directory)",
    )
    ap.add_argument(
        "--weights",
        default=None,
        help="W2D shared weights .npz: loaded if it exists, else written there",
    )
    ap.add_argument("--weights-small", default=None, help="the same for W2D-small")
    ap.add_argument("--quality-steps", type=int, default=None, help="override (3000)")
    ap.add_argument(
        "--quality-seeds",
        type=int,
        default=1,
        help="training runs (seeds) per framework in the quality row; with more "
        "than one, a line per seed and their mean and standard deviation",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument(
        "--no-fused",
        action="store_true",
        help="skip the extra fmjax row with make_fused_train_steps (lax.scan)",
    )
    ap.add_argument(
        "--no-nfe-check",
        action="store_true",
        help="skip the untimed fmjax NFE count by jax.debug.callback",
    )
    ap.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        help="fmjax.use_cpu_devices(N) first, and extra fmjax lines that split "
        "each batch over the N CPU devices (default: one per core; 1: none)",
    )
    add_min_turn(ap)
    ap.add_argument(
        "--tune-allocator",
        action="store_true",
        help="call fmjax.tune_cpu_allocator() first (process-wide: the PyTorch "
        "peers in this process get it too)",
    )
    return ap


def parse_args(argv):
    """(args, cfg, only): the checked arguments, the run sizes, the frameworks asked for."""
    ap = parser()
    args = ap.parse_args(argv)
    args.rows, bad = parse_subset(args.rows, ROWS)
    only, bad_fw = parse_subset(args.only, FRAMEWORKS)
    if bad + bad_fw:
        ap.error(f"unknown row(s)/framework(s): {bad + bad_fw}")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    check_min_turn(ap, args)
    cfg = dict(QUICK if args.quick else FULL)
    if args.quality_steps is not None:
        cfg["quality_steps"] = args.quality_steps
    if args.quality_seeds < 1:
        ap.error(f"--quality-seeds must be >= 1; got {args.quality_seeds}")
    cfg["quality_seeds"] = args.quality_seeds
    if args.out is None:
        args.out = (
            os.path.join(tempfile.gettempdir(), "benchmarks_w2d_quick.json")
            if args.quick
            else results_path("w2d_raw.json")
        )

    import fmjax  # starts no JAX backend: the two settings below must come before one

    if args.cpu_devices is None:
        args.cpu_devices = fmjax.cpu.num_cores()
    if args.cpu_devices < 1:
        ap.error("--cpu-devices must be >= 1")
    args.cpu_devices = fmjax.use_cpu_devices(args.cpu_devices)
    args.tuned_allocator = bool(args.tune_allocator) and fmjax.tune_cpu_allocator()
    return args, cfg, only


def run_meta(args, cfg, frameworks, skipped):
    """What a results file says about the run: arguments, sizes, machine, versions."""
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "quick": args.quick,
        "repeats": args.repeats,
        "config": cfg,
        "frameworks": frameworks,
        "skipped": skipped,
        "rows": args.rows,
        **machine_info(),
        "torch_threads": args.threads,
        "tuned_allocator": args.tuned_allocator,
        "cpu_devices": args.cpu_devices,
        "min_turn_s": args.min_turn,
        "versions": versions(VERSIONS_OF),
        "W2D": dict(
            **W2D,
            params=num_params(W2D["hidden"], W2D["depth"]),
            train_flop_per_step=train_flop_per_step(
                W2D["hidden"], W2D["depth"], cfg["train_batch"]
            ),
        ),
        "W2D_small": dict(**W2D_SMALL, params=num_params(W2D_SMALL["hidden"], W2D_SMALL["depth"])),
        "true_entropy_nats": checkerboard_entropy(),
        "mmd_bandwidths": list(MMD_BANDWIDTHS),
    }


def main(argv=None):
    args, cfg, only = parse_args(argv)
    frameworks, skipped = [], {}
    for fw in only:
        ok, why = available(fw)
        if ok:
            frameworks.append(fw)
        else:
            skipped[fw] = why
            print(f"NOTE: skipping {fw}: {why}")
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        pass

    meta = run_meta(args, cfg, frameworks, skipped)
    meta["loadavg_start"] = loadavg()
    if meta["loadavg_start"] > 0.5:
        print(
            f"WARNING: 1-min load average {meta['loadavg_start']:.2f} before the start: other "
            "processes compete for the cores and skew the timings (torch with 2 threads "
            "suffers most: its threads wait for each other at every op)."
        )
    log(f"frameworks {frameworks}, rows {args.rows}, {'quick' if args.quick else 'full'}")
    runner = Runner(args, cfg, frameworks)
    t0 = time.perf_counter()
    runner.run()
    meta["total_s"] = time.perf_counter() - t0
    meta["weights_source"] = runner.weights_source
    if args.weights:
        meta["weights_file"] = args.weights
    table = markdown(runner.records, meta)
    print(table)
    write_json(args.out, {"meta": meta, "records": runner.records, "table": table})
    print(f"\nraw numbers: {os.path.abspath(args.out)}")
    return 0 if not any("error" in r for r in runner.records) else 1


if __name__ == "__main__":
    sys.exit(main())
