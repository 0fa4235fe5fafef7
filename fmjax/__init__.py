"""fmjax: Flow Matching for generative modeling (Lipman et al., ICLR 2023) in JAX.

The core (``paths``, ``predictions``, ``schedules``, ``assignment``, ``couplings``,
``losses``, ``marginals``, ``guidance``, ``batching``, ``ode``, ``sample``, ``sample_sde``,
``log_likelihood``) is pure JAX + diffrax and never imports Flax: a vector field is any
function ``v(t, x)``. ``models``, ``data`` and ``train`` are imported lazily on first use.
"""

import importlib

from fmjax import (
    assignment,
    batching,
    bridges,
    cnf,
    couplings,
    cpu,
    densities,
    guidance,
    losses,
    marginals,
    ode,
    paths,
    predictions,
    reflow,
    schedules,
    sde,
    solvers,
)
from fmjax.cpu import tune_cpu_allocator, use_cpu_devices
from fmjax.likelihood import bits_per_dim, log_likelihood
from fmjax.sampling import sample
from fmjax.sde import sample_sde
from fmjax.solvers import SolverOptions

__version__ = "0.1.0"

__all__ = [
    "SolverOptions",
    "assignment",
    "batching",
    "bits_per_dim",
    "bridges",
    "cnf",
    "couplings",
    "cpu",
    "data",
    "densities",
    "guidance",
    "log_likelihood",
    "losses",
    "marginals",
    "metrics",
    "models",
    "ode",
    "paths",
    "predictions",
    "reflow",
    "sample",
    "sample_sde",
    "schedules",
    "sde",
    "solvers",
    "train",
    "tune_cpu_allocator",
    "use_cpu_devices",
]

_LAZY = ("models", "data", "train", "metrics")


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f"fmjax.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'fmjax' has no attribute {name!r}")
