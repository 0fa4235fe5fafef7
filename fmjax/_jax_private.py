"""Every use of JAX's private API (``jax._src``) in fmjax, behind two functions.

JAX has no public query for either fact. Each function falls back to the safe answer when
the attribute it reads is gone from a JAX release; ``tests/test_jax_private.py`` fails with
the JAX version and the missing attribute when that happens (:func:`missing`).
"""

from __future__ import annotations

import importlib

__all__ = ["REQUIRED", "at_top_level", "backends_started", "missing"]

#: (module, attribute path) of every private attribute fmjax reads.
REQUIRED = (
    ("jax._src.xla_bridge", "backends_are_initialized"),
    ("jax._src.core", "trace_ctx.is_top_level"),
)


def _lookup(module: str, path: str):
    obj = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def missing() -> list[str]:
    """The ``module.attribute`` paths of :data:`REQUIRED` that this JAX lacks."""
    return [f"{m}.{p}" for m, p in REQUIRED if _lookup(m, p) is None]


def backends_started() -> bool:
    """True once a JAX backend has started (then the device count and the threads' malloc
    arenas are fixed); True also when this JAX cannot say."""
    started = _lookup(*REQUIRED[0])
    return bool(started()) if started is not None else True


def at_top_level() -> bool:
    """True when no JAX transformation is tracing the caller (a ``jax.jit`` with
    ``compiler_options`` may then be called); False also when this JAX cannot say."""
    is_top_level = _lookup(*REQUIRED[1])
    return bool(is_top_level()) if is_top_level is not None else False
