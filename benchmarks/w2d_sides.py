"""The frameworks of the W2D benchmark: their names, what each needs, and its side class.

A side wraps one framework behind the same methods (``train_timer``, ``train``,
``params_from_layers``, ``to_layers``, ``sample``, ``log_likelihood``); the benchmark's rows
call only these. The fmjax side also runs data parallel over the CPU devices (:data:`DP`).
"""

from __future__ import annotations

from harness import importable
from w2d_flow_matching import FlowMatchingSide
from w2d_fmjax import FmjaxSide
from w2d_torchcfm import TorchCFMSide

FRAMEWORKS = ("fmjax", "flow_matching", "torchcfm")
PEERS = ("flow_matching", "torchcfm")
DP = "fmjax-dp"  # the fmjax side with a mesh over the CPU devices (--cpu-devices)

REQUIRES = {
    "fmjax": ("jax", "fmjax", "optax"),
    "flow_matching": ("torch", "flow_matching", "torchdiffeq"),
    "torchcfm": ("torch", "torchcfm", "torchdiffeq"),
}
SIDES = {"fmjax": FmjaxSide, "flow_matching": FlowMatchingSide, "torchcfm": TorchCFMSide}


def available(framework):
    """(ok, reason) for a framework being importable."""
    return importable(REQUIRES[framework])


def make_side(framework, spec):
    """The side of ``framework`` (or :data:`DP`) for the model ``spec``."""
    if framework == DP:
        import fmjax.train

        return FmjaxSide(spec, mesh=fmjax.train.sharding.make_mesh())
    return SIDES[framework](spec)
