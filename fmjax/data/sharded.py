"""The multi-process layout every input pipeline shares: which rows of each global batch a
process reads, the per-pipeline seeds, and the batching of a per-example grain stream into
this process's batches (see :mod:`fmjax.data.images` for the layout's guarantees).

Global batch ``g`` is the positions ``[g * G, (g + 1) * G)`` of a pipeline's global
example order, and process ``p`` of ``P`` reads the contiguous block ``[p * B, (p + 1) * B)``
of it, ``B = G // P``: the processes' batches concatenated in process order are the global
batch, whatever ``P``.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

__all__ = ["derive_seeds", "process_layout", "sharded_batches"]


def process_layout(
    global_batch_size: int, process_index: int | None = None, process_count: int | None = None
) -> tuple[int, int, int]:
    """``(process_index, process_count, per-process batch size)``; the index and count
    default to JAX's. Raises ValueError for a batch the processes cannot split evenly."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1:
        raise ValueError(f"process_count must be >= 1, got {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by process_count "
            f"{process_count}"
        )
    return process_index, process_count, global_batch_size // process_count


def derive_seeds(seed: int, n: int) -> list[int]:
    """``n`` independent 32-bit seeds from a run's ``seed`` (one per random stage)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return [int(s) for s in np.random.SeedSequence(int(seed)).generate_state(n, np.uint32)]


def _ensure_absl_flags_parsed() -> None:
    """grain 0.2.18's worker processes read absl flags (google/grain#1355): outside
    ``absl.app.run`` they are unparsed and ``mp_prefetch`` fails with
    ``UnparsedFlagAccessError``; marking them parsed keeps every default."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def sharded_batches(
    ds: grain.MapDataset,
    layout: tuple[int, int, int],
    num_global: int | None,
    read_threads: int,
    prefetch_buffer_size: int,
    worker_count: int = 0,
    batch_map: Any = None,
) -> grain.IterDataset:
    """The per-example stream ``ds`` in global order -> this process's batches.

    ``layout`` is :func:`process_layout`'s.  Block ``k`` is positions ``[k*B, (k+1)*B)``;
    global batch ``g`` is blocks ``g*P`` .. ``g*P+P-1``, of which process ``p`` takes block
    ``g*P + p`` (``num_global`` global batches, ``None``: all).  ``batch_map`` runs on each
    of this process's batches in the reader threads (or workers), ahead of the consumer;
    ``worker_count > 0`` runs the transforms in that many grain worker processes.
    """
    process_index, process_count, per_process = layout
    ds = ds.batch(per_process, drop_remainder=True)
    stop = None if num_global is None else num_global * process_count
    ds = ds.slice(slice(process_index, stop, process_count))
    if batch_map is not None:
        ds = ds.map(batch_map)
    out = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size)
    )
    if worker_count > 0:
        _ensure_absl_flags_parsed()
        out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return out
