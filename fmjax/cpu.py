"""CPU tuning: one JAX device per core, glibc's allocator, and XLA:CPU compiler options.

Three independent settings for running fmjax on a CPU host:

- :func:`use_cpu_devices` exposes the host as several CPU devices
  (``jax_num_cpu_devices``). XLA:CPU runs each operation of a computation on one core
  unless the operation is large, and does not run independent operations side by side, so a
  small model leaves every core but one idle. A batch sharded over the devices
  (``fmjax.sample(..., mesh=mesh)``, ``fmjax.log_likelihood(..., mesh=mesh)``,
  ``fmjax.train.make_fused_train_steps(..., mesh=mesh)``) runs one shard per core, with the
  same NFE and values. Large work gains little (its matmuls already use every core).
  Unsharded arrays stay on device 0, so the rest of a program behaves as with one device.
- :func:`tune_cpu_allocator` keeps XLA:CPU's per-call scratch memory mapped between calls.
  Every call of a compiled XLA:CPU computation allocates its temporaries as one block with
  ``posix_memalign`` on the executing thread; in glibc a non-main thread's arena cannot hold
  a block above 64 MB, so such a block is ``mmap``-ed and ``munmap``-ed on every call and
  the next call faults in every page afresh. The setting makes all threads share the main
  arena (``M_ARENA_MAX=1``), takes blocks from the heap instead of ``mmap``
  (``M_MMAP_MAX=0``) and keeps freed memory with the process (``M_TRIM_THRESHOLD=INT_MAX``).
  Use it when each call has large temporaries (batch x width over ~64 MB), not for tiny
  calls at a high rate: one shared arena makes the dispatching thread and XLA's workers
  contend for its lock. It is process-wide (other libraries in the process, PyTorch
  included, get it too), and the process keeps its peak host memory reserved until it
  exits. The image entry points (``experiments.imagenet32``, ``cifar10``) call it;
  ``--notune_cpu_allocator`` turns it off.
- :func:`jit_with_cpu_options` compiles exact-divergence solves with
  :func:`cpu_divergence_options`. XLA:CPU hands dots to YNNPACK and by default may fuse a
  chain of dots and elementwise ops into one YNNPACK subgraph; for the exact divergence (one
  Jacobian-vector product per input dimension, vmapped against one primal pass) the dots
  emitted one by one run faster (docs/benchmarks.md). The option goes to
  ``jax.jit(..., compiler_options=...)`` of that computation only, so nothing global
  (``XLA_FLAGS``) changes, and only on the CPU. A jaxlib that does not know the option is
  detected once with a tiny compile and fmjax compiles without it;
  ``FMJAX_XLA_CPU_TUNING=0`` switches it off. JAX accepts ``compiler_options`` only on a
  top-level ``jax.jit``: a call made while tracing (inside the user's ``jit``, ``vmap``,
  ``grad``, ``scan``...) uses the plain compiled variant.

The first two must run before the first JAX computation: call them first thing in a script.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp

from fmjax._jax_private import at_top_level, backends_started
from fmjax.checks import integer

__all__ = [
    "cpu_divergence_options",
    "jit_with_cpu_options",
    "num_cores",
    "tune_cpu_allocator",
    "use_cpu_devices",
]


# -- one device per core ------------------------------------------------------------------
def num_cores() -> int:
    """The CPU cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def use_cpu_devices(n: int | None = None, *, warn_if_late: bool = True) -> int:
    """Expose the CPU as ``n`` JAX devices (default: one per core); returns the count in use.

    Must run before the first JAX computation. When a backend has already started, nothing
    changes: the current number of CPU devices is returned, with a ``RuntimeWarning`` if it
    differs from ``n`` (unless ``warn_if_late=False``). Only the CPU backend is affected; on a
    GPU or TPU host the accelerators stay the default devices.
    """
    if n is None:
        n = num_cores()
    n = integer(n, "n (the number of CPU devices)")
    if backends_started():
        have = len(jax.devices("cpu"))
        if have != n and warn_if_late:
            warnings.warn(
                f"fmjax.use_cpu_devices({n}) must run before the first JAX computation; the "
                f"CPU backend already started with {have} device(s), nothing changed.",
                RuntimeWarning,
                stacklevel=2,
            )
        return have
    jax.config.update("jax_num_cpu_devices", n)
    return n


# -- glibc's allocator --------------------------------------------------------------------
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc <malloc.h>
_INT_MAX = 2**31 - 1
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX))


def _glibc():
    """The process's C library if it is glibc (has ``mallopt``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
        return None  # musl and others: no mallopt with these parameters
    return libc


def tune_cpu_allocator(*, warn_if_late: bool = True) -> bool:
    """Apply the allocator settings of the module docstring; True if they took effect.

    Returns False, changing nothing, on a host without glibc, and when a JAX backend has
    already started (its threads own their arenas by then; a ``RuntimeWarning`` says so
    unless ``warn_if_late=False``).
    """
    if backends_started():
        if warn_if_late:
            warnings.warn(
                "fmjax.tune_cpu_allocator() must run before the first JAX computation "
                "(JAX's threads already own their malloc arenas); nothing changed.",
                RuntimeWarning,
                stacklevel=2,
            )
        return False
    libc = _glibc()
    if libc is None:
        return False
    return all(libc.mallopt(option, value) == 1 for option, value in _SETTINGS)


# -- XLA:CPU compiler options -------------------------------------------------------------
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


def jit_with_cpu_options(fun: Callable, **jit_kwargs) -> Callable[[bool], Callable]:
    """``jax.jit(fun, **jit_kwargs)``, and a second compiled variant with
    :func:`cpu_divergence_options`; returns ``get(tuned: bool)`` giving the jitted function
    (always the plain one when called under a transformation, see the module docstring)."""
    plain = jax.jit(fun, **jit_kwargs)
    tuned_jit = jax.jit(fun, compiler_options=_DIVERGENCE_OPTIONS, **jit_kwargs)

    def get(tuned: bool):
        use = tuned and at_top_level() and cpu_divergence_options()
        return tuned_jit if use else plain

    return get
