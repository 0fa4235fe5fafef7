"""Metrics: two-sample distances for low-dimensional samples (``mmd``,
``sliced_wasserstein``), sampling efficiency (``efficiency``: straightness, transport cost,
quality against NFE), image bits/dim with dequantization (``bpd.image_bpd`` for a batch,
``nll.evaluate_bpd`` for a whole split, resumable), FID from user-provided Inception
weights (``fid``) and PSNR / SSIM (``image_quality``). ``bpd``, ``nll``, ``fid`` and
``image_quality`` are imported on first use."""

import importlib

from fmjax.metrics import efficiency
from fmjax.metrics.distances import mmd, sliced_wasserstein

__all__ = ["bpd", "efficiency", "fid", "image_quality", "mmd", "nll", "sliced_wasserstein"]

_LAZY = ("bpd", "fid", "image_quality", "nll")


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f"fmjax.metrics.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'fmjax.metrics' has no attribute {name!r}")
