"""benchmarks/w2d.py and its harness: the interleaved timing rounds, the per-round ratios,
the table, and smoke runs of the scripts.

The peers (torch) are not installed in CI, so the smoke runs cover the fmjax side only; the
round and ratio logic is checked on made-up callables and times.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT

BENCHMARKS = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCHMARKS)  # the scripts import their sibling modules

import harness  # noqa: E402
import w2d_report  # noqa: E402


def test_interleave_rotates_the_order_and_times_every_call():
    calls = []

    def make(label):
        def fn():
            calls.append(label)
            return f"out-{label}-{len(calls)}"

        return fn

    times, outputs, errors = harness.interleave({k: make(k) for k in "abc"}, repeats=4)
    # round r starts at label r mod 3, each label once per round
    assert calls == list("abcbcacababc")
    assert errors == {}
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 for v in times.values() for t in v)
    assert outputs["a"] == "out-a-10" and outputs["c"] == "out-c-12"  # the last call's


def test_interleave_drops_a_failing_callable_and_keeps_the_others():
    count = {"bad": 0}

    def bad():
        count["bad"] += 1
        if count["bad"] == 2:
            raise RuntimeError("solver diverged")
        return 0

    times, _, errors = harness.interleave({"good": lambda: 1, "bad": bad}, repeats=3)
    assert errors == {"bad": "RuntimeError: solver diverged"}
    assert len(times["good"]) == 3 and len(times["bad"]) == 1
    assert count["bad"] == 2  # not called again after it failed


def test_interleave_repeats_calls_for_min_seconds_and_records_the_mean_per_call():
    calls = {"slow": 0, "fast": 0}

    def make(label, seconds):
        def fn():
            calls[label] += 1
            time.sleep(seconds)
            return calls[label]

        return fn

    t0 = time.perf_counter()
    times, outputs, _ = harness.interleave(
        {"slow": make("slow", 0.03), "fast": make("fast", 0.002)}, repeats=2, min_seconds=0.02
    )
    total = time.perf_counter() - t0
    assert calls["slow"] == 2  # one call per turn: it already lasts min_seconds
    # each fast turn repeats its >= 2 ms call until 0.02 s have passed, and stops then
    assert 2 * 2 <= calls["fast"] <= 2 * 11
    assert total >= 2 * 0.03 + 2 * 0.02
    assert outputs["fast"] == calls["fast"]
    assert all(0.03 <= t < 0.2 for t in times["slow"])
    assert all(0.002 <= t < 0.02 for t in times["fast"])  # per call: a turn lasts >= 0.02 s


def test_round_ratios_take_the_faster_peer_of_each_round():
    times = {"fmjax": [1.0, 2.0, 4.0], "p": [3.0, 3.0, 3.0], "q": [5.0, 1.0, 6.0]}
    # per round: min(peer) / fmjax = 3/1, 1/2, 3/4
    assert harness.round_ratios(times, "fmjax", ["p", "q"]) == pytest.approx([3.0, 0.5, 0.75])
    # a peer that failed after one round limits the rounds compared
    times["q"] = [5.0]
    assert harness.round_ratios(times, "fmjax", ["p", "q"]) == pytest.approx([3.0])
    assert harness.round_ratios(times, "fmjax", []) is None
    assert harness.round_ratios(times, "fmjax", ["missing"]) is None


def test_markdown_lists_the_ratios_of_the_fmjax_lines():
    rec = {
        "row": "small",
        "case": "c",
        "framework": "fmjax",
        "median": 1.0,
        "min": 0.9,
        "max": 1.1,
        "unit": "s",
        **{f"ratio_{k}": v for k, v in harness.summarize([2.0, 3.0, 2.5]).items()},
    }
    peer = {
        "row": "small",
        "case": "c",
        "framework": "torchcfm",
        "median": 2.5,
        "min": 2.0,
        "max": 3.0,
        "unit": "s",
    }
    meta = {
        "quick": True,
        "date": "d",
        "cpu": "cpu",
        "nproc": 2,
        "repeats": 3,
        "loadavg_start": 0.0,
    }
    table = w2d_report.markdown([rec, peer], meta)
    assert "vs faster peer 2.50x (2.00-3.00)" in table
    assert "| small | c | fmjax | 2.50x (2.00-3.00) | 3 |" in table
    assert "| small | c | torchcfm | 2.50x" not in table


def run_script(name, *args):
    """``python benchmarks/<name> args`` from the repository root: its stdout."""
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, name), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_quick_run_of_the_fmjax_side(tmp_path):
    """The script end to end (no peers): every W2D-small case is timed and recorded."""
    out = tmp_path / "raw.json"
    run_script(
        "w2d.py",
        *("--quick", "--only", "fmjax", "--rows", "small", "--repeats", "2"),
        *("--cpu-devices", "1", "--out", str(out)),
    )
    records = json.loads(out.read_text())["records"]
    assert all("error" not in r for r in records)
    cases = {r["case"] for r in records}
    assert len(cases) == 5  # training and the four solves
    for r in records:
        assert len(r["samples"]) == 2 and r["min"] <= r["median"] <= r["max"]
        assert r["first_call_s"] > 0
        assert "ratio_median" not in r  # no peer ran
    solves = [r for r in records if r["unit"] == "s"]
    assert all(r["nfe"] == r["nfe_counted"] for r in solves)


def test_quality_row_over_several_training_seeds(tmp_path):
    """--quality-seeds 2: one line per training seed (different models) and their mean / sd."""
    out = tmp_path / "raw.json"
    run_script(
        "w2d.py",
        *("--quick", "--only", "fmjax", "--rows", "quality", "--quality-steps", "5"),
        *("--quality-seeds", "2", "--cpu-devices", "1", "--out", str(out)),
    )
    records = [r for r in json.loads(out.read_text())["records"] if r["framework"] == "fmjax"]
    assert all("error" not in r for r in records)
    seeds = [r for r in records if "training seed " in r["case"]]
    (mean,) = [r for r in records if "mean of 2 training seeds" in r["case"]]
    assert len(seeds) == 2 and seeds[0]["nll"] != seeds[1]["nll"]
    nll = np.array([r["nll"] for r in seeds])
    mmd = np.array([r["mmd2"] for r in seeds])
    assert mean["nll"] == pytest.approx(nll.mean())
    assert mean["nll_seed_sd"] == pytest.approx(abs(nll[0] - nll[1]) / np.sqrt(2))
    assert mean["mmd2"] == pytest.approx(mmd.mean())
    assert mean["mmd2_seed_sd"] == pytest.approx(abs(mmd[0] - mmd[1]) / np.sqrt(2))


def test_w2d_small_steps_script_runs_on_its_sibling_modules():
    out = run_script(
        "w2d_small_steps.py",
        *("--cpu-devices", "1", "--rounds", "1", "--batch", "16"),
        *("--fused-steps", "2", "--per-step-steps", "2", "--min-turn", "0"),
    )
    assert "| per-step, one device |" in out
    assert "| fused x2, one device, predraw=True |" in out


def test_adaptive_stepping_script_imports_its_sibling_modules():
    """``--help`` imports the script's modules (a run needs the W2D weights files); w2d.py
    runs above, guidance.py in test_guidance."""
    assert "usage:" in run_script("adaptive_stepping.py", "--help")
