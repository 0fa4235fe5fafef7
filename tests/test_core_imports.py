"""The core (paths, couplings, losses, sampling, likelihood) imports no Flax, models, data
or training code: a vector field is any ``v(t, x)``."""

import json

from conftest import run_python

CORE = [
    "fmjax",
    "fmjax.paths",
    "fmjax.schedules",
    "fmjax.assignment",
    "fmjax.couplings",
    "fmjax.losses",
    "fmjax.marginals",
    "fmjax.sampling",
    "fmjax.sde",
    "fmjax.likelihood",
    "fmjax.cnf",
    "fmjax.bridges",
    "fmjax.reflow",
    "fmjax.ode",
    "fmjax.guidance",
    "fmjax.predictions",
    "fmjax.batching",
    "fmjax.solvers",
    "fmjax.densities",
    "fmjax.cpu",
]


def test_core_imports_no_flax_models_data_or_train():
    code = (
        "import importlib, json, sys\n"
        f"for m in {CORE!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'flax' or "
        "m.startswith(('fmjax.models', 'fmjax.data', 'fmjax.train', 'experiments')))))"
    )
    out = run_python(code, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
