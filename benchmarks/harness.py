"""The timing harness shared by the benchmark scripts of this folder.

* timing: :func:`bench` (a first call apart, then repeats), :func:`interleave` (several
  callables timed in interleaved rounds), :func:`round_ratios` (per-round ratios between
  them) and :func:`summarize` (median, min, max);
* output: :func:`fmt` for table cells, :func:`results_path` (raw results go to
  ``benchmarks/results/``, the tables to ``docs/``), :func:`write_json`;
* the machine: :func:`machine_info` (CPU, cores, Python), :func:`loadavg`, :func:`versions`,
  :func:`importable`, :func:`matmul_times` (the fp32 matmul rate the machine reaches);
* CLI helpers: :func:`parse_subset`, :func:`add_min_turn`.

The scripts import it as a sibling module: run as ``python benchmarks/<script>.py``, the
script's folder is on ``sys.path``; a script loaded from elsewhere (a test) puts it there
itself (:data:`HERE`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")


def logger(tag):
    """A ``log(msg)`` that prints ``[tag HH:MM:SS] msg`` to stderr."""

    def log(msg):
        print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    return log


# ----------------------------------------------------------------------------- timing


def bench(fn, repeats):
    """Run ``fn`` (which must return after the work is done) 1 + repeats times.

    Returns ``(first_call_s, [times], last_output)``; the first call is timed apart.
    """
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return first, times, out


def summarize(times):
    return {
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "samples": list(times),
    }


def interleave(fns, repeats, min_seconds=0.0):
    """Time ``fns`` (label -> callable) in ``repeats`` rounds, one turn of each per round.

    The machine's speed drifts over minutes, so timing one callable's repeats after
    another's compares different machines; in rounds every callable sees the same stretch of
    time. Round ``r`` starts at label ``r mod k`` (no fixed order). A turn calls the callable
    until ``min_seconds`` have passed (at least once) and records the mean time per call, so
    a short call and a long call are each averaged over a similar stretch of the machine's
    noise. With ``min_seconds=0`` a turn is one call, which follows another callable's work:
    a call of about a millisecond then measures what a request arriving after other work
    sees, not a hot loop of the same call.
    Returns ``(times, outputs, errors)``: label -> list of seconds per call, label -> last
    output, label -> exception text for a callable that raised (dropped from later rounds).
    """
    labels = list(fns)
    times = {label: [] for label in labels}
    outputs, errors = {}, {}
    for r in range(repeats):
        k = r % len(labels) if labels else 0
        for label in labels[k:] + labels[:k]:
            if label in errors:
                continue
            calls, t0 = 0, time.perf_counter()
            try:
                while True:
                    outputs[label] = fns[label]()
                    calls += 1
                    elapsed = time.perf_counter() - t0
                    if elapsed >= min_seconds:
                        break
            except Exception as e:  # noqa: BLE001 - one callable failing ends only its line
                traceback.print_exc(file=sys.stderr)
                errors[label] = f"{type(e).__name__}: {e}"
                continue
            times[label].append(elapsed / calls)
    return times, outputs, errors


def round_ratios(times, label, peers):
    """Per round: the fastest peer's time over ``label``'s time (>1: ``label`` is faster).

    ``times`` maps label -> per-round seconds from :func:`interleave`; a round in which a
    peer has no time (it failed) is left out. None when no peer has a time."""
    peers = [p for p in peers if times.get(p)]
    n = min([len(times.get(label, []))] + [len(times[p]) for p in peers]) if peers else 0
    if n == 0:
        return None
    return [min(times[p][i] for p in peers) / times[label][i] for i in range(n)]


def matmul_times(n, repeats, backend="jax"):
    """Seconds of ``repeats`` fp32 ``n x n`` matmuls (``jnp.dot`` jitted, or ``torch.mm``),
    after one untimed call; ``2 n^3 / time`` is the rate. Raises ImportError for a
    backend that is not installed."""
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
        dot = jax.jit(jnp.dot)

        def call():
            dot(a, b).block_until_ready()

    elif backend == "torch":
        import torch

        ta, tb = torch.randn(n, n), torch.randn(n, n)

        def call():
            torch.mm(ta, tb)

    else:
        raise ValueError(f"backend must be 'jax' or 'torch'; got {backend!r}")
    return bench(call, repeats)[1]  # the first, untimed call compiles / warms up


# ----------------------------------------------------------------------------- output


def fmt(x, digits=4):
    """A table cell: '' for None, ``digits`` significant digits, scientific when far from 1."""
    if x is None:
        return ""
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 1e4 or abs(x) < 1e-3:
            return f"{x:.3e}"
        return f"{x:.{digits}g}"
    return str(x)


def results_path(name):
    """Where a script writes its raw results by default: ``benchmarks/results/<name>``."""
    return os.path.join(RESULTS_DIR, name)


def write_json(path, payload):
    """``payload`` as indented JSON at ``path`` (folders made; numpy scalars as floats)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=float)


# ----------------------------------------------------------------------------- the machine


def pkg_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions(packages):
    """package -> installed version (None where it is not installed)."""
    return {p: pkg_version(p) for p in packages}


def importable(modules):
    """(ok, reason): whether every module of ``modules`` imports."""
    for m in modules:
        try:
            importlib.import_module(m)
        except Exception as e:  # noqa: BLE001 - any import failure means "skip"
            return False, f"{m} not importable ({type(e).__name__}: {e})"
    return True, ""


def cpu_name():
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        return cpu


def loadavg():
    """The 1-minute load average: other processes on the machine skew timings."""
    return os.getloadavg()[0]


def machine_info():
    """The CPU's name, its core count and the Python version, for a results file's meta."""
    return {"cpu": cpu_name(), "nproc": os.cpu_count(), "python": platform.python_version()}


# ----------------------------------------------------------------------------- CLI helpers


def parse_subset(text, allowed):
    """The comma-separated names of ``text`` and those of them not in ``allowed``."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    return names, [s for s in names if s not in allowed]


def add_min_turn(ap, default=0.5, what="framework"):
    """``--min-turn``: the seconds each turn of :func:`interleave` lasts at least."""
    ap.add_argument(
        "--min-turn",
        type=float,
        default=default,
        help=f"seconds each {what}'s turn in a round lasts at least (calls repeated, mean "
        "per call); 0: one call per turn",
    )


def check_min_turn(ap, args):
    if not args.min_turn >= 0:
        ap.error(f"--min-turn must be >= 0 seconds; got {args.min_turn}")
