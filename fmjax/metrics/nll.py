"""Negative log-likelihood of an image evaluation split in bits/dim: the resumable driver.

:func:`evaluate_bpd` runs a whole split once by the paper's protocol (the bits/dim of one
batch, with its dequantization and per-example keys, is :mod:`fmjax.metrics.bpd`), data
parallel over a mesh if given, and can checkpoint its running totals (with the data
iterator's state) after every batch so a pre-empted evaluation resumes where it stopped.

:func:`~fmjax.metrics.bpd.image_bpd`, :func:`~fmjax.metrics.bpd.example_keys`,
:func:`~fmjax.metrics.bpd.dequantization_keys` and
:func:`~fmjax.metrics.bpd.dequantization_noise` are importable from here as well.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fmjax import ode
from fmjax._field import as_field
from fmjax.batching import auto_mesh
from fmjax.jsonio import write_json_atomic
from fmjax.metrics.bpd import (
    BpdOptions,
    as_typed_key,
    batch_bpd,
    dequantization_keys,
    dequantization_noise,
    example_keys,
    image_bpd,
)

__all__ = [
    "STATE_VERSION",
    "dequantization_keys",
    "dequantization_noise",
    "evaluate_bpd",
    "example_keys",
    "image_bpd",
]

#: Version of the resumable state file of :func:`evaluate_bpd` (a mismatch is refused).
STATE_VERSION = 1

# Settings that do not change the result, so a state file stays valid when they change
# (raise max_steps and rerun after a failed solve; jvp and vjp give the same estimate).
_NOT_FINGERPRINTED = ("hutchinson_mode", "max_steps", "solve")


def evaluate_bpd(
    v,
    make_iterator,
    key,
    *,
    num_dequant: int = 1,
    state_file: str | os.PathLike | None = None,
    mesh: Mesh | None = None,
    max_batches: int | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    **solver_kw,
) -> dict[str, Any]:
    """Mean bits/dim over an evaluation split, exactly once per example, resumable.

    Args:
      v: the vector field ``v(t, x)`` (e.g. ``jax.tree_util.Partial(model.apply, params)``).
      make_iterator: a zero-argument callable returning a fresh iterator over the split (or
        the iterator itself), e.g. ``lambda: make_eval_iterator(source,
        global_batch_size=G)``.  Batches are dicts with ``"image"`` (quantized levels in model
        space, ``(B, *event)``), optionally ``"mask"`` (bool (B,), False for padding rows,
        which then count zero) and optionally ``"index"`` (int (B,), the examples' global
        positions).  Without ``"index"``, a batch of ``B`` rows per process is taken to hold
        positions ``R * process_count + process_index * B + j``, where ``R`` counts this
        process's rows in the batches before (every process reads equal batches): the layout
        of :func:`fmjax.data.images.make_eval_iterator`, and consecutive positions for a
        single process whatever its batch sizes.  With ``state_file`` the iterator must
        have JSON-able ``get_state()`` / ``set_state()`` (grain's do).
      key: one PRNG key; example ``i`` uses ``fold_in(key, i)`` (see
        :mod:`fmjax.metrics.bpd`), so results do not depend on the batch size, the device
        count or resumption.
      num_dequant: K importance samples per example (paper: 15 on ImageNet-32).
      state_file: JSON file for the running totals and the iterator state, rewritten
        atomically (temp file + ``os.replace``) after every batch.  If it exists, the
        evaluation resumes from it (it must come from the same key and settings, else
        ``ValueError``); a finished one is returned as is.  With several processes each
        writes ``<state_file>.process<i>-of-<n>``.
      mesh: a mesh with a ``"data"`` axis (``jax.make_mesh((n,), ("data",))``): batches are
        sharded over it (the local batch is padded with masked rows to a multiple of the
        local device count) and the per-example results gathered onto every process.
        ``None``: the default device, one process.
      max_batches: stop once this many batches in total (counting those done before a resume)
        are done; the result then has ``complete=False``.  ``None``: the whole split.
      callback: called with the running summary after every batch (e.g. for logging).
      **solver_kw: ``divergence``, ``value_range``, ``num_levels``, ``num_probes``,
        ``probe``, ``hutchinson_mode``, ``source_std``, ``t0``, ``t1``, and the solve as
        ``options=`` (a :class:`fmjax.SolverOptions`) or its fields as keywords, as in
        :func:`~fmjax.metrics.bpd.image_bpd` (changing ``max_steps`` or ``hutchinson_mode``
        keeps a state file valid: raise ``max_steps`` and rerun when a solve failed).

    Returns:
      A dict of plain Python numbers with the keys ``bpd`` (the mean), ``bpd_stderr`` (the standard
      error of the mean over examples), ``num_examples``, ``nfe_mean`` (mean NFE per
      solve), ``num_batches``, ``complete``, ``num_dequant`` and ``resumed``.

    Raises:
      RuntimeError: an ODE solve failed in some batch (the totals up to the previous batch
        are kept in ``state_file``).
    """
    options = BpdOptions.make(num_dequant=num_dequant, **solver_kw)
    key = as_typed_key(key)
    if key.ndim != 0:
        raise ValueError(f"evaluate_bpd needs a single key; got a key array of shape {key.shape}.")
    if max_batches is not None and (int(max_batches) != max_batches or max_batches < 0):
        raise ValueError(
            f"max_batches must be None or a non-negative integer; got {max_batches!r}."
        )
    if mesh is None and jax.process_count() > 1:
        raise ValueError(
            "with several processes pass mesh= (a mesh over all devices with a "
            "'data' axis); mesh=None evaluates on one device of one process."
        )
    fingerprint = _fingerprint(key, options)
    v = as_field(v)
    if mesh is not None:
        mesh = auto_mesh(mesh)
        v = jax.device_put(v, NamedSharding(mesh, PartitionSpec()))

    owned = callable(make_iterator)  # we made it, so we close it (grain workers)
    it = make_iterator() if owned else make_iterator
    if not hasattr(it, "__next__"):
        it = iter(it)
    try:
        path = None if state_file is None else _state_path(state_file, it)
        totals, complete = _load_state(path, fingerprint, it)
        resumed = totals is not None
        totals = totals or dict.fromkeys(_TOTALS, 0)
        while not complete:
            if max_batches is not None and totals["batches_done"] >= max_batches:
                break
            try:
                batch = next(it)
            except StopIteration:
                complete = True
                break
            x, keys, mask = _batch_inputs(batch, key, totals["local_rows_done"], mesh)
            bpd, stats, mask = batch_bpd(v, x, keys, mask, options=options, mesh=mesh)
            bpd, stats, mask = jax.tree.map(np.asarray, (bpd, stats, mask))
            ode.raise_if_failed(
                stats._replace(success=stats.success | ~mask[:, None]),
                f"fmjax.metrics.evaluate_bpd (batch {totals['batches_done']})",
            )
            totals = _add_batch(totals, bpd, stats.nfe, mask, local_rows=len(batch["image"]))
            if path is not None:
                _save_state(path, fingerprint, totals, False, it)
            if callback is not None:
                callback(_summary(totals, False, options.num_dequant, resumed))
        if path is not None and complete:
            _save_state(path, fingerprint, totals, True, it)
        return _summary(totals, complete, options.num_dequant, resumed)
    finally:
        if owned and hasattr(it, "close"):
            it.close()


# --------------------------------------------------------------------------------------
# Batches and running totals.
# --------------------------------------------------------------------------------------

_TOTALS = (
    "sum_bpd",
    "sum_sq_bpd",
    "count",
    "sum_nfe",
    "batches_done",
    "rows_seen",
    "local_rows_done",
)


def _batch_inputs(batch, key, rows_done, mesh):
    """``(x, keys, mask)`` of an iterator batch, sharded over ``mesh`` if given.

    Without ``"index"``, positions continue from the ``rows_done`` rows this process read
    before, over all processes (equal local batches), so a short last batch does not reuse
    the positions of the one before.
    """
    x = np.asarray(batch["image"])
    if x.ndim < 2 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(
            f"batch['image'] must be a floating (B, *event) array; got {x.dtype} {x.shape}."
        )
    b = x.shape[0]
    mask = np.asarray(batch["mask"], bool) if "mask" in batch else np.ones((b,), bool)
    if "index" in batch:
        index = np.asarray(batch["index"], np.int64)
    else:
        index = rows_done * jax.process_count() + jax.process_index() * b + np.arange(b)
    if mask.shape != (b,) or index.shape != (b,):
        raise ValueError(
            f"batch 'mask'/'index' must have shape ({b},); got {mask.shape} and {index.shape}."
        )
    index = index.astype(np.uint32)
    if mesh is None:
        return jnp.asarray(x), example_keys(key, index), jnp.asarray(mask)
    # pad the local batch with masked rows to a multiple of the local device count
    pad = (-b) % max(1, mesh.shape["data"] // jax.process_count())
    x, mask, index = (_shard_rows(_pad_rows(a, pad), mesh) for a in (x, mask, index))
    return x, example_keys(key, index), mask


def _shard_rows(array, mesh):
    """Process-local rows -> a global array sharded along axis 0 over 'data'."""
    spec = PartitionSpec("data", *([None] * (np.ndim(array) - 1)))
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), array)


def _pad_rows(a, n):
    if n == 0:
        return a
    return np.concatenate([a, np.zeros((n,) + a.shape[1:], a.dtype)])


def _add_batch(totals, bpd, nfe, mask, *, local_rows):
    """The totals with a batch's unmasked examples added (``nfe``: (B, K) per solve)."""
    sel = bpd[mask].astype(np.float64)
    nfe = nfe.astype(np.float32).mean(axis=1)[mask].astype(np.float64)
    return {
        "sum_bpd": totals["sum_bpd"] + float(np.sum(sel)),
        "sum_sq_bpd": totals["sum_sq_bpd"] + float(np.sum(sel * sel)),
        "count": totals["count"] + int(sel.size),
        "sum_nfe": totals["sum_nfe"] + float(np.sum(nfe)),
        "batches_done": totals["batches_done"] + 1,
        "local_rows_done": totals["local_rows_done"] + local_rows,
        "rows_seen": totals["rows_seen"] + int(mask.size),
    }


def _summary(totals, complete, num_dequant, resumed) -> dict[str, Any]:
    n = totals["count"]
    mean = totals["sum_bpd"] / n if n else float("nan")
    if n > 1:
        var = max(totals["sum_sq_bpd"] - n * mean * mean, 0.0) / (n - 1)
        stderr = math.sqrt(var / n)
    else:
        stderr = float("nan")
    return {
        "bpd": mean,
        "bpd_stderr": stderr,
        "num_examples": n,
        "nfe_mean": totals["sum_nfe"] / n if n else float("nan"),
        "num_batches": totals["batches_done"],
        "complete": complete,
        "num_dequant": num_dequant,
        "resumed": resumed,
    }


# --------------------------------------------------------------------------------------
# The state file.
# --------------------------------------------------------------------------------------


def _fingerprint(key, options: BpdOptions) -> dict[str, Any]:
    """What the totals depend on: a state file written under other settings is rejected."""
    fields = {**vars(options), **vars(options.solve)}
    fp = {k: v for k, v in fields.items() if k not in _NOT_FINGERPRINTED}
    fp["value_range"] = list(options.value_range)
    fp["key"] = np.asarray(jax.random.key_data(key)).ravel().tolist()
    fp["key_impl"] = str(jax.random.key_impl(key))
    return fp


def _state_path(state_file, it) -> str:
    if not (hasattr(it, "get_state") and hasattr(it, "set_state")):
        raise TypeError(
            "state_file needs an iterator with get_state()/set_state() (e.g. "
            f"grain's); got {type(it).__name__}."
        )
    path = os.fspath(state_file)
    if jax.process_count() > 1:  # the iterator state is per process
        path = f"{path}.process{jax.process_index()}-of-{jax.process_count()}"
    return path


def _load_state(path, fingerprint, it) -> tuple[dict[str, Any] | None, bool]:
    """``(totals, complete)`` of the state file at ``path`` with the iterator moved to its
    position; ``(None, False)`` when there is none."""
    if path is None or not os.path.exists(path):
        return None, False
    with open(path) as f:
        saved = json.load(f)
    if saved.get("version") != STATE_VERSION:
        raise ValueError(
            f"{path}: unknown state version {saved.get('version')!r} (expected {STATE_VERSION})."
        )
    if saved["fingerprint"] != fingerprint:
        diff = sorted(
            k
            for k in set(fingerprint) | set(saved["fingerprint"])
            if saved["fingerprint"].get(k) != fingerprint.get(k)
        )
        raise ValueError(
            f"{path} holds an evaluation with other settings (differ: {diff}); delete "
            "it or pass another state_file to start over."
        )
    it.set_state(saved["iterator"])
    return saved["totals"], saved["complete"]


def _save_state(path, fingerprint, totals, complete, it) -> None:
    write_json_atomic(
        path,
        {
            "version": STATE_VERSION,
            "fingerprint": fingerprint,
            "totals": totals,
            "complete": complete,
            "iterator": it.get_state(),
        },
    )
