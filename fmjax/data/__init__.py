"""Data: ``toy`` (2-D densities as JAX samplers) and ``images`` (TFDS / npz pipelines).

``images`` imports tensorflow-datasets and grain, so it is loaded only when used.
"""

import importlib

from fmjax.data import toy

__all__ = ["images", "toy"]


def __getattr__(name):
    if name == "images":
        module = importlib.import_module("fmjax.data.images")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'fmjax.data' has no attribute {name!r}")
