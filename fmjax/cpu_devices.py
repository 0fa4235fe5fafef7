"""One JAX device per CPU core, so small and mid-size work runs data parallel on every core.

XLA:CPU runs each operation of a computation on one core unless the operation is large: a
``(1000, 64) x (64, 64)`` matmul or a SELU over ``(1000, 64)`` uses one core of a 2-core host
(measured: process CPU time equals wall time), and independent operations are not run side by
side. For a small model (the W2D-small MLP, 8,706 parameters) every core but one sits idle.

JAX can instead expose the host as several CPU devices (``jax_num_cpu_devices``). A batch
sharded over them (``fmjax.sample(..., mesh=mesh)``, ``fmjax.log_likelihood(..., mesh=mesh)``,
``fmjax.train.make_fused_train_steps(..., mesh=mesh)``) then runs one shard per core. On
2 cores (docs/benchmarks.md, W2D-small, the 2026-11-23 23:16 run): exact log-likelihood of
1,000 points with dopri5 241 -> 160 ms and Euler sampling of 1,000 points 27 -> 17 ms, with
the same NFE and values; fused training 3,852 -> 4,945 steps/s. Large work gains little
(the W2D model's 4096 x 512 matmuls already use every core). Unsharded arrays stay on
device 0, so the rest of a program behaves as with one device.

Call :func:`use_cpu_devices` first thing in a script, before any JAX computation.
"""

from __future__ import annotations

import os
import warnings

from fmjax._checks import integer
from fmjax.host_memory import _jax_backends_started

__all__ = ["num_cores", "use_cpu_devices"]


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
    import jax

    if n is None:
        n = num_cores()
    n = integer(n, "n (the number of CPU devices)")
    if _jax_backends_started():
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
