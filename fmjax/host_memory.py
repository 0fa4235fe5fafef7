"""Keep XLA:CPU's per-call scratch memory mapped between calls (glibc hosts).

Every call of a compiled XLA:CPU computation allocates its temporaries as one block (109 MB
for a W2D training step at batch 4096) with ``posix_memalign`` on the executing thread. In
glibc a non-main thread's arena cannot hold a block above 64 MB, so such a block is always
``mmap``-ed and ``munmap``-ed again when the call ends: the next call faults in every page
afresh (~27,000 minor page faults, about 50 ms per W2D step, a third of the step). A
``lax.scan`` of many steps in one call (:func:`fmjax.train.make_fused_train_steps`) pays it
once; a per-step loop pays it every step.

:func:`tune_cpu_allocator` sets glibc's ``mallopt`` so that all threads share the main
arena (``M_ARENA_MAX=1``), blocks come from the heap instead of ``mmap`` (``M_MMAP_MAX=0``)
and freed memory stays with the process (``M_TRIM_THRESHOLD=INT_MAX``). It must run before
the first JAX computation (threads pick their arena on their first allocation), so call it
first thing in a script. The image entry points (``experiments.imagenet32``, ``cifar10``) do;
``--notune_cpu_allocator`` turns it off.

Use it when each call has large temporaries (batch x width over ~64 MB), not for tiny calls
at high rate. Measured on 2 cores (docs/benchmarks.md): W2D per-step training 6.8 -> 8.2
steps/s; but W2D-small per-step training (0.3 ms calls) drops from ~2,970 to 1,200-2,200
steps/s, because one shared arena makes the dispatching thread and XLA's workers contend for
its lock. It is process-wide: other libraries in the process (PyTorch included) get it too.
The process also keeps its peak host memory reserved until it exits.
"""

from __future__ import annotations

import ctypes
import sys
import warnings

__all__ = ["tune_cpu_allocator"]

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


def _jax_backends_started() -> bool:
    from jax._src import xla_bridge  # no public query for this in JAX 0.10

    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if started is not None else True


def tune_cpu_allocator(*, warn_if_late: bool = True) -> bool:
    """Apply the allocator settings of the module docstring; True if they took effect.

    Returns False, changing nothing, on a host without glibc, and when a JAX backend has
    already started (its threads own their arenas by then; a ``RuntimeWarning`` says so
    unless ``warn_if_late=False``).
    """
    if _jax_backends_started():
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
