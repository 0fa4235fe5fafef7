"""Data parallelism over every device: the mesh, batches, replicated state, multi-host start.

The training step is one global-view ``jax.jit`` (see :func:`fmjax.train.make_train_step`)
on a 1-D mesh with axis ``"data"``: parameters, optimizer state and EMA are replicated, the
batch is sharded along its leading axis, and XLA inserts the gradient all-reduce.

Each process feeds only its own slice of every global batch (the image pipeline gives
process ``p`` of ``P`` the rows ``[p*B, (p+1)*B)`` of each global batch, ``B = G / P``);
:func:`shard_batch` assembles those per-process slices into one global array with
``jax.make_array_from_process_local_data``, so the step sees the global batch exactly as a
single process would.

Multi-host: call :func:`initialize_distributed` first thing in the program, before any
other JAX call. It wraps ``jax.distributed.initialize`` and does nothing for a
single-process run, so the same entry point runs on a laptop, one GPU box or a pod.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fmjax.batching import DATA_AXIS, auto_axes

__all__ = [
    "DATA_AXIS",
    "check_batch_divisible",
    "data_sharding",
    "initialize_distributed",
    "make_mesh",
    "replicate",
    "replicated_sharding",
    "shard_batch",
    "to_host",
]

# jax.distributed.initialize() reads these itself.
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS",)


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all devices (of every process) with the single axis ``"data"``.

    The axis is ``AxisType.Auto``: the step is a global-view jit whose shardings XLA
    propagates (the default ``Explicit`` axes of ``jax.make_mesh`` would make every op that
    mixes the sharded batch with freshly drawn, unsharded noise a sharding-type error).
    """
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over ``"data"``, the rest replicated, on ``mesh``'s devices with
    Auto axes whatever its axis types (the train steps are global-view jits on such a mesh;
    arrays on ``jax.make_mesh``'s default Explicit axes would not match them)."""
    return NamedSharding(auto_axes(mesh), PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh (Auto axes, as :func:`data_sharding`)."""
    return NamedSharding(auto_axes(mesh), PartitionSpec())


def _num_data_shards(mesh: Mesh) -> int:
    if DATA_AXIS not in mesh.shape:
        raise ValueError(f"mesh must have a {DATA_AXIS!r} axis; got axes {tuple(mesh.shape)}.")
    return int(mesh.shape[DATA_AXIS])


def check_batch_divisible(global_batch_size: int, mesh: Mesh, what: str = "global batch"):
    """Raise a ValueError unless ``global_batch_size`` splits evenly over the devices."""
    n = _num_data_shards(mesh)
    if global_batch_size < 1 or global_batch_size % n:
        raise ValueError(
            f"the {what} size ({global_batch_size}) must be a positive multiple of the number "
            f"of devices on the {DATA_AXIS!r} mesh axis ({n}, over {jax.process_count()} "
            f"process(es)); choose a batch size divisible by {n}."
        )
    return global_batch_size // n


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """This process's slice of a global batch -> global arrays sharded on ``"data"``.

    ``batch`` is a pytree of host arrays whose leading axis is the per-process batch (the
    same size in every process); the result has leading axis ``process_count`` times
    that, laid out in process order, sharded over all devices of ``mesh``.
    """
    sharding = data_sharding(mesh)
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        raise ValueError("shard_batch got an empty batch.")
    local = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if None in local or len(local) != 1:
        raise ValueError(
            "every array of a batch must have the same leading (batch) axis; got shapes "
            f"{[np.shape(x) for x in leaves]}."
        )
    (local_size,) = local
    global_size = local_size * jax.process_count()
    check_batch_divisible(global_size, mesh)
    n_local = len(mesh.local_devices)
    if local_size % n_local:
        raise ValueError(
            f"this process's share of the batch ({local_size}) must be divisible by its "
            f"{n_local} local devices."
        )

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, (global_size, *x.shape[1:]))

    return jax.tree_util.tree_map(put, batch)


def _replicate_leaf(x, sharding):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        return jax.random.wrap_key_data(
            _replicate_leaf(jax.random.key_data(x), sharding), impl=impl
        )
    if jax.process_count() == 1:
        # a copy: the train step donates its state, which must never delete the caller's
        return jax.device_put(x, sharding, may_alias=False)
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
        return jax.numpy.copy(x)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        raise ValueError(
            "replicate() got a global array that is sharded differently; "
            "reshard it inside jit instead."
        )
    host = np.asarray(x)  # the same value in every process
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def replicate(tree: Any, mesh: Mesh) -> Any:
    """A copy of every array of ``tree`` on every device of ``mesh`` (all processes).

    Always a new buffer (never an alias of the input), so the result may be donated to a
    train step without deleting the caller's arrays. Host values must be identical in every
    process (e.g. built from the same seed). To make
    a large state without a host round trip, jit its initialiser with
    ``out_shardings=replicated_sharding(mesh)`` instead.
    """
    sharding = replicated_sharding(mesh)
    return jax.tree_util.tree_map(lambda x: _replicate_leaf(x, sharding), tree)


def to_host(x) -> np.ndarray:
    """The full value of a (possibly multi-process) array as numpy, in every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _env_int(name: str) -> int:
    try:
        return int(os.environ.get(name, "1"))
    except ValueError:
        return 1


def _cluster_detectable() -> bool:
    """Whether the environment describes a multi-process job jax can join by itself."""
    if any(os.environ.get(k) for k in _CLUSTER_ENV):
        return True
    if os.environ.get("SLURM_JOB_ID") and _env_int("SLURM_NTASKS") > 1:
        return True
    if _env_int("OMPI_COMM_WORLD_SIZE") > 1:
        return True
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    return len(hosts) > 1


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids=None,
    initialization_timeout: int = 300,
) -> bool:
    """Start JAX's multi-process runtime; a no-op for a single-process run.

    Call it before any other JAX call. With ``coordinator`` (``"host:port"`` of process 0),
    ``num_processes`` and ``process_id`` it connects explicitly; with none of them it lets
    ``jax.distributed.initialize()`` detect the job when the environment describes one with
    more than one process (``JAX_COORDINATOR_ADDRESS``, SLURM with ``SLURM_NTASKS > 1``,
    Open MPI with ``OMPI_COMM_WORLD_SIZE > 1``, a multi-host Cloud TPU slice) and does
    nothing otherwise. On CPU it
    selects the gloo collectives, which cross-process CPU all-reduces need.

    Returns True when a multi-process runtime is (now) running.
    """
    if jax.distributed.is_initialized():
        return True
    explicit = (coordinator, num_processes, process_id)
    if all(a is None for a in explicit):
        if not _cluster_detectable():
            return False
    elif num_processes is not None and int(num_processes) == 1 and coordinator is None:
        return False
    elif coordinator is None or num_processes is None or process_id is None:
        raise ValueError(
            "initialize_distributed needs coordinator ('host:port'), num_processes and "
            f"process_id together (or none of them); got coordinator={coordinator!r}, "
            f"num_processes={num_processes!r}, process_id={process_id!r}."
        )
    elif not 0 <= int(process_id) < int(num_processes):
        raise ValueError(f"process_id must be in [0, {num_processes}); got {process_id}.")
    platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    if platforms.split(",")[0] in ("", "cpu"):
        # Harmless on GPU/TPU (only the CPU backend reads it); needed for CPU multi-process.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
    )
    return jax.process_count() > 1
