"""Metrics: two-sample distances for low-dimensional samples (``mmd``,
``sliced_wasserstein``), sampling efficiency (``efficiency``: straightness, transport cost,
quality against NFE), image bits/dim with dequantization (``nll.image_bpd``,
``nll.evaluate_bpd``) and FID from user-provided Inception weights (``fid``). ``nll`` and
``fid`` are imported on first use."""

import importlib

from fmjax.metrics import efficiency
from fmjax.metrics.distances import mmd, sliced_wasserstein

__all__ = ["efficiency", "fid", "mmd", "nll", "sliced_wasserstein"]


def __getattr__(name):
    if name in ("nll", "fid"):
        module = importlib.import_module(f"fmjax.metrics.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'fmjax.metrics' has no attribute {name!r}")
