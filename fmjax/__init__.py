"""fmjax: Flow Matching for generative modeling (Lipman et al., ICLR 2023) in JAX.

The core (``paths``, ``schedules``, ``couplings``, ``losses``, ``marginals``, ``guidance``,
``sample``, ``log_likelihood``) is pure JAX + diffrax and never imports Flax: a vector field is any
function ``v(t, x)``. ``models``, ``data`` and ``train`` are imported lazily on first use.
"""

import importlib

from fmjax import couplings, guidance, losses, marginals, ode, paths, schedules
from fmjax.cpu_devices import use_cpu_devices
from fmjax.host_memory import tune_cpu_allocator
from fmjax.likelihood import bits_per_dim, log_likelihood
from fmjax.sampling import sample

__version__ = "0.1.0"

__all__ = [
    "bits_per_dim",
    "couplings",
    "data",
    "guidance",
    "log_likelihood",
    "losses",
    "marginals",
    "metrics",
    "models",
    "ode",
    "paths",
    "sample",
    "schedules",
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
