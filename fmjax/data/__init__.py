"""Data: ``toy`` (2-D densities as JAX samplers) and ``images`` (TFDS / npz / folder pipelines),
with the image pipelines' ``sources``, the official downsampled-ImageNet reader
``imagenet_npz``, the image-folder reader ``folder`` and its array conversion
``folder_arrays``, the pixel values' ``quantization``, the input pipeline's minibatch-OT
``pairing``, the stored pairs of reflow (``reflow_pairs``), the multi-process batch layout
they all share (``sharded``) and the low-resolution inputs of super-resolution (``superres``).

``images`` imports grain (and opens TFDS through tensorflow-datasets), so it and its
submodules are loaded only when used.
"""

import importlib

from fmjax.data import toy

__all__ = [
    "folder",
    "folder_arrays",
    "imagenet_npz",
    "images",
    "pairing",
    "quantization",
    "reflow_pairs",
    "sharded",
    "sources",
    "superres",
    "toy",
]

_LAZY = tuple(name for name in __all__ if name != "toy")  # imported on first use


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f"fmjax.data.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'fmjax.data' has no attribute {name!r}")
