"""fmjax.tune_cpu_allocator: XLA:CPU scratch memory is reused between calls, not refaulted.

Measured in fresh subprocesses (the allocator must be set before JAX's first computation),
by counting minor page faults per call of a computation with 96 MB of temporaries: without
the setting glibc maps and unmaps that block on every call (one fault per 4 KiB page).
"""

import json
import os
import subprocess
import sys
import warnings

import pytest
from conftest import ROOT

import fmjax
from fmjax import cpu

_PROBE = r"""
import json, resource, sys
import fmjax
applied = fmjax.tune_cpu_allocator() if sys.argv[1] == "tuned" else None
import jax, jax.numpy as jnp
from jax import lax

def f(x):  # the barriers keep two 48 MB temporaries from being fused away
    y1 = lax.optimization_barrier(jnp.exp(x))
    y2 = lax.optimization_barrier(jnp.sin(y1))
    return jnp.sum(y1 * y2)

x = jnp.ones((12 * 2**20,), jnp.float32)
fj = jax.jit(f)
temp = fj.lower(x).compile().memory_analysis().temp_size_in_bytes
faults = []
for _ in range(40):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = float(fj(x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "temp": temp, "faults": faults, "out": out}))
"""


def _last_line_of_fresh_python(code, *args):
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def _probe(mode):
    return json.loads(_last_line_of_fresh_python(_PROBE, mode))


@pytest.mark.skipif(cpu._glibc() is None, reason="needs glibc (mallopt)")
def test_tuned_allocator_stops_per_call_page_faults():
    plain, tuned = _probe("plain"), _probe("tuned")
    assert tuned["applied"] is True
    assert plain["temp"] >= 90 * 2**20  # the block is above glibc's 64 MB thread-heap limit
    assert tuned["out"] == pytest.approx(plain["out"], rel=1e-6)  # same results
    steady_plain = sorted(plain["faults"][-10:])[5]
    steady_tuned = sorted(tuned["faults"][-10:])[5]
    # Untuned, every call refaults the block (24,576 4-KiB pages; fewer with huge pages).
    assert steady_tuned <= max(16, steady_plain // 10), (steady_plain, steady_tuned)


def test_too_late_warns_and_changes_nothing(monkeypatch):
    import jax.numpy as jnp

    float(jnp.ones(2).sum())  # this process's backend is running
    calls = []
    monkeypatch.setattr(cpu, "_glibc", lambda: calls.append(1))
    with pytest.warns(RuntimeWarning, match="before the first JAX computation"):
        assert fmjax.tune_cpu_allocator() is False
    assert calls == []  # mallopt never reached


def test_without_glibc_returns_false(monkeypatch):
    monkeypatch.setattr(cpu, "backends_started", lambda: False)
    monkeypatch.setattr(cpu, "_glibc", lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fmjax.tune_cpu_allocator() is False


def test_importing_fmjax_and_experiments_starts_no_backend():
    """So that tune_cpu_allocator() after the imports (as the entry points do) still works."""
    code = (
        "import fmjax, fmjax.data, fmjax.models, fmjax.train, fmjax.metrics\n"
        "import experiments.toy2d, experiments.imagenet32, experiments.cifar10\n"
        "from fmjax import _jax_private\n"
        "print(_jax_private.backends_started())"
    )
    assert _last_line_of_fresh_python(code) == "False"
