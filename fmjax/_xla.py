"""Per-computation XLA compiler options for fmjax's hot paths (CPU only).

XLA:CPU (jaxlib 0.10) hands dots to YNNPACK and, by default, may fuse a whole chain of dots
and elementwise ops into one YNNPACK subgraph. For the exact divergence (one Jacobian-vector
product per input dimension, vmapped against a single primal pass) that fused subgraph runs
~1.3-1.4x slower than the same dots emitted one by one (W2D model, 10,000 points: 413 ms ->
304 ms per evaluation of the field and its divergence; docs/benchmarks.md). The option is
passed to ``jax.jit(..., compiler_options=...)`` of that computation only, so nothing global
(``XLA_FLAGS``) changes, and only when the computation runs on the CPU.

A jaxlib that does not know the option (older or newer XLA) is detected once with a tiny
compile; fmjax then compiles without it. ``FMJAX_XLA_CPU_TUNING=0`` switches it off.

JAX accepts ``compiler_options`` only on a top-level ``jax.jit``: a call made while tracing
(inside the user's ``jit``, ``vmap``, ``grad``, ``scan``...) uses the plain compiled variant,
and the outer computation is compiled with the user's own options.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

__all__ = ["cpu_divergence_options", "jit_with_cpu_options"]

_DIVERGENCE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.cache
def _supported(items: tuple) -> bool:
    try:
        jax.jit(lambda a: a @ a, compiler_options=dict(items)).lower(
            jnp.ones((2, 2), jnp.float32)
        ).compile()
    except Exception:  # noqa: BLE001 - any rejection means: do not use the option
        return False
    return True


def cpu_divergence_options() -> dict:
    """The options used for exact-divergence solves on this backend ({} when not CPU, not
    supported by this jaxlib, or switched off with ``FMJAX_XLA_CPU_TUNING=0``)."""
    if os.environ.get("FMJAX_XLA_CPU_TUNING", "1") == "0" or jax.default_backend() != "cpu":
        return {}
    return dict(_DIVERGENCE_OPTIONS) if _supported(tuple(_DIVERGENCE_OPTIONS.items())) else {}


def _at_top_level() -> bool:
    """True when no JAX transformation is tracing the caller (compiler options allowed)."""
    from jax._src import core  # no public equivalent of this query in JAX 0.10

    is_top_level = getattr(getattr(core, "trace_ctx", None), "is_top_level", None)
    return bool(is_top_level()) if is_top_level is not None else False


def jit_with_cpu_options(fun, **jit_kwargs):
    """``jax.jit(fun, **jit_kwargs)``, and a second compiled variant with
    :func:`cpu_divergence_options`; returns ``get(tuned: bool)`` giving the jitted function
    (always the plain one when called under a transformation, see the module docstring)."""
    plain = jax.jit(fun, **jit_kwargs)
    tuned_jit = jax.jit(fun, compiler_options=_DIVERGENCE_OPTIONS, **jit_kwargs)

    def get(tuned: bool):
        use = tuned and _at_top_level() and cpu_divergence_options()
        return tuned_jit if use else plain

    return get
