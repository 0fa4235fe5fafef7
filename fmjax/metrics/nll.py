"""Negative log-likelihood of 8-bit images in bits per dimension (the paper's protocol).

Lipman et al. (2023, appendix E) report the test-split NLL of ImageNet-32 / CIFAR-10 models
as bits/dim under uniform dequantization with K importance samples: for quantized levels
``x`` in model space (``[-1, 1]`` spanned by 256 bins of width ``bin = 2 / 256``),

    log P(x) >= log (1/K) sum_k p(x + u_k),     u_k ~ U[0, bin)^D  independently,

with ``log p`` from the instantaneous change of variables (:func:`fmjax.log_likelihood`,
dopri5 at rtol = atol = 1e-5, Hutchinson divergence), converted to bits of the discrete
data by :func:`fmjax.bits_per_dim` (for ``[-1, 1]``: ``-log p / (D ln 2) + 7``).
K = 1 is the usual variational dequantization bound; larger K tightens it (3.62 / 3.56 /
3.53 BPD at K = 1 / 5 / 15 in the paper).

Randomness.  Every example has its own key, ``example_key = fold_in(key, i)`` with ``i`` its
global position in the evaluation split (:func:`image_bpd` with one key uses ``i`` = row in
the batch; pass a batch of keys to choose them).  Its k-th dequantization sample uses
``noise_key, probe_key = split(fold_in(example_key, k))``: ``u_k = bin * uniform(noise_key)``
and the Hutchinson probes are drawn from ``probe_key`` (once per solve, held fixed over it).

Solves.  Each (example, k) pair is its own ODE solve (``jax.vmap`` over the examples and the
K samples): the adaptive step sizes and the NFE are per example, so an example's result does
not depend on which other examples share its batch or on how many devices the batch is split
over (up to floating-point reassociation), and the reported NFE is a per-example mean.

:func:`evaluate_bpd` runs a whole split once, data parallel over a mesh if given, and can
checkpoint its running totals (with the data iterator's state) after every batch so a
pre-empted evaluation resumes where it stopped.
"""

from __future__ import annotations

import functools
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
from fmjax._checks import integer, real, traced
from fmjax._field import as_field
from fmjax.batching import auto_mesh
from fmjax.batching import check_batch as _check_batch
from fmjax.likelihood import (
    DIVERGENCES,
    PROBES,
    bits_per_dim,
    check_span,
    log_likelihood,
    normal_log_prob,
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


# --------------------------------------------------------------------------------------
# Keys and dequantization noise.
# --------------------------------------------------------------------------------------


def _typed_key(key):
    """A new-style typed key (array of dtype key<...>) from a typed or raw uint32 key."""
    if key is None:
        raise ValueError("a PRNG key is required (e.g. jax.random.key(0)); got None.")
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if key.dtype != jnp.uint32 or key.ndim < 1:
        raise ValueError(
            f"key must be a JAX PRNG key (jax.random.key(...) or jax.random.PRNGKey(...)); got "
            f"dtype {key.dtype} shape {key.shape}."
        )
    return jax.random.wrap_key_data(key)


def example_keys(key, indices):
    """Per-example keys ``fold_in(key, i)`` for the global example positions ``indices``."""
    key = _typed_key(key)
    if key.ndim != 0:
        raise ValueError(f"example_keys needs a single key; got a key array of shape {key.shape}.")
    return _fold_in_each(key, jnp.asarray(indices, jnp.uint32))


@jax.jit
def _fold_in_each(key, indices):
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)


def dequantization_keys(example_key, num_dequant: int):
    """``(noise_keys, probe_keys)``, each ``(num_dequant,)``: the k-th pair is
    ``split(fold_in(example_key, k))``."""

    def one(k):
        pair = jax.random.split(jax.random.fold_in(example_key, k))
        return pair[0], pair[1]

    return jax.vmap(one)(jnp.arange(num_dequant, dtype=jnp.uint32))


def dequantization_noise(
    example_keys_, event_shape, num_dequant: int, bin_width: float, dtype=jnp.float32
):
    """Uniform dequantization noise ``(B, K, *event_shape)`` in ``[0, bin_width)``, drawn from
    the per-example keys ``example_keys_`` (B,) exactly as :func:`image_bpd` draws it."""
    return _noise(
        _typed_key(example_keys_),
        tuple(event_shape),
        int(num_dequant),
        float(bin_width),
        jnp.dtype(dtype),
    )


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _noise(keys, event_shape, num_dequant, bin_width, dtype):
    def one(ek):
        noise_keys, _ = dequantization_keys(ek, num_dequant)
        return jax.vmap(lambda nk: bin_width * jax.random.uniform(nk, event_shape, dtype))(
            noise_keys
        )

    return jax.vmap(one)(keys)


# --------------------------------------------------------------------------------------
# One batch.
# --------------------------------------------------------------------------------------


_OPTION_DEFAULTS = {
    "divergence": "hutchinson",
    "num_probes": 1,
    "probe": "rademacher",
    "hutchinson_mode": "jvp",
    "solver": "dopri5",
    "steps": None,
    "step_size": None,
    "rtol": 1e-5,
    "atol": 1e-5,
    "max_steps": 4096,
    "value_range": (-1.0, 1.0),
    "num_levels": 256,
    "source_std": 1.0,
    "t0": 0.0,
    "t1": 1.0,
}


def _options(num_dequant, **kw) -> dict[str, Any]:
    """Validated, hashable (static) options for the batch computation."""
    unknown = set(kw) - set(_OPTION_DEFAULTS)
    if unknown:
        raise TypeError(
            f"unknown option(s) {sorted(unknown)}; expected some of {sorted(_OPTION_DEFAULTS)}."
        )
    o = {**_OPTION_DEFAULTS, **kw}
    o["num_dequant"] = integer(num_dequant, "num_dequant")
    if o["divergence"] not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}; got {o['divergence']!r}.")
    if o["probe"] not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}; got {o['probe']!r}.")
    o["num_probes"] = integer(o["num_probes"], "num_probes")
    if o["hutchinson_mode"] not in ("jvp", "vjp"):
        raise ValueError(f"hutchinson_mode must be 'jvp' or 'vjp'; got {o['hutchinson_mode']!r}.")
    o["t0"] = real(o["t0"], "t0", low=0.0, high=1.0)
    o["t1"] = real(o["t1"], "t1", low=0.0, high=1.0)
    check_span(o["t0"], o["t1"])
    ode.check_solver_args(
        o["solver"],
        o["steps"],
        o["step_size"],
        o["t0"],
        o["t1"],
        rtol=o["rtol"],
        atol=o["atol"],
        max_steps=o["max_steps"],
    )
    lo, hi = (float(a) for a in o["value_range"])
    if not hi > lo:
        raise ValueError(f"value_range must be (lo, hi) with hi > lo; got {o['value_range']!r}.")
    o["value_range"] = (lo, hi)
    o["num_levels"] = integer(o["num_levels"], "num_levels", minimum=2)
    o["source_std"] = real(
        o["source_std"],
        "source_std (the std of the N(0, source_std^2 I) source)",
        low=0.0,
        low_open=True,
    )
    o["max_steps"] = int(o["max_steps"])
    o["rtol"], o["atol"] = float(o["rtol"]), float(o["atol"])
    return o


@functools.partial(jax.jit, static_argnames=("opts", "mesh"))
def _bpd_core(v, x, keys, mask, *, opts, mesh):
    """Per-example ``(bpd, mean NFE over the K solves, all K solves succeeded, mask)``."""
    o = dict(opts)
    k_samples = o["num_dequant"]
    lo, hi = o["value_range"]
    bin_width = (hi - lo) / o["num_levels"]
    hutch = o["divergence"] == "hutchinson"
    s0 = o["source_std"]
    source_log_prob = None if s0 == 1.0 else functools.partial(normal_log_prob, std=s0)

    def one_solve(y, pk):
        logp, stats = log_likelihood(
            v,
            y[None],
            base_log_prob=source_log_prob,
            divergence=o["divergence"],
            key=pk if hutch else None,
            num_probes=o["num_probes"],
            probe=o["probe"],
            hutchinson_mode=o["hutchinson_mode"],
            solver=o["solver"],
            steps=o["steps"],
            step_size=o["step_size"],
            rtol=o["rtol"],
            atol=o["atol"],
            max_steps=o["max_steps"],
            t0=o["t0"],
            t1=o["t1"],
            throw=False,
        )
        return logp[0], stats.nfe, stats.success

    b = x.shape[0]
    noise_keys, probe_keys = jax.vmap(lambda ek: dequantization_keys(ek, k_samples))(keys)
    u = jax.vmap(jax.vmap(lambda nk: bin_width * jax.random.uniform(nk, x.shape[1:], x.dtype)))(
        noise_keys
    )
    # One flat vmap over the B * K solves (compiles faster than nested vmaps).
    y = (x[:, None] + u).reshape((b * k_samples,) + x.shape[1:])
    logps, nfes, oks = jax.vmap(one_solve)(y, probe_keys.reshape(-1))
    logps = logps.reshape(b, k_samples)
    logp = jax.nn.logsumexp(logps, axis=1) - math.log(k_samples)
    nfe = jnp.mean(nfes.astype(jnp.float32).reshape(b, k_samples), axis=1)
    ok = jnp.all(oks.reshape(b, k_samples), axis=1)
    bpd = bits_per_dim(logp, x.shape[1:], value_range=(lo, hi), num_levels=o["num_levels"])
    out = (bpd, nfe, ok, mask)
    if mesh is not None:  # gather the per-example results onto every device (and process)
        out = jax.lax.with_sharding_constraint(out, NamedSharding(mesh, PartitionSpec()))
    return out


def image_bpd(
    v,
    x,
    key,
    *,
    num_dequant: int = 1,
    divergence: str = "hutchinson",
    solver: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    value_range=(-1.0, 1.0),
    num_levels: int = 256,
    num_probes: int = 1,
    probe: str = "rademacher",
    hutchinson_mode: str = "jvp",
    steps: int | None = None,
    step_size: float | None = None,
    max_steps: int = 4096,
    source_std: float = 1.0,
    t0: float = 0.0,
    t1: float = 1.0,
    throw: bool = True,
):
    """Bits/dim of quantized images under K-sample uniform dequantization.

    Args:
      v: the vector field ``v(t, x)`` on a batch (``t`` of shape (B,)); wrap a Flax model as
        ``jax.tree_util.Partial(model.apply, params)``.
      x: ``(B, *event_shape)`` quantized levels in model space: the lower bin edges
        ``lo + (hi - lo) * k / num_levels`` (what ``make_eval_iterator(dequantize=False)``
        yields), not already-dequantized data.
      key: one PRNG key (example ``i`` of the batch then uses ``fold_in(key, i)``) or a batch
        of ``B`` keys, one per example (see the module docstring for the derivation).
      num_dequant: K, the number of dequantization samples per example; the result is the
        importance-weighted bound ``log (1/K) sum_k p(x + u_k)`` (K = 1: the usual bound).
      divergence, num_probes, probe, hutchinson_mode: as in :func:`fmjax.log_likelihood`
        (Hutchinson probes are drawn per example and per k).
      solver, rtol, atol, steps, step_size, max_steps: the ODE solver (paper: dopri5, 1e-5).
      value_range, num_levels: the model-space range of the data and the number of levels;
        ``bin = (hi - lo) / num_levels`` and the range's log-determinant is corrected for.
      source_std: the flow starts from ``N(0, source_std^2 I)`` (a path's
        ``source_std()``: 1 for CondOT, ``sigma_max`` for VE).
      t0, t1: the flow's time span, source at ``t0``, data at ``t1`` (default ``[0, 1]``); a
        model that predicts x1, eps or the score is a velocity only over its path's
        ``velocity_range(prediction)``.
      throw: raise if any ODE solve failed (e.g. ``max_steps`` reached); not under ``jit``.

    Returns:
      ``(bpd, nfe)``: bits/dim per example, shape (B,), and the mean NFE of the augmented
      field over the ``B * K`` solves (a scalar).
    """
    _check_batch(x, "x")
    opts = _options(
        num_dequant,
        divergence=divergence,
        solver=solver,
        rtol=rtol,
        atol=atol,
        value_range=tuple(value_range),
        num_levels=num_levels,
        num_probes=num_probes,
        probe=probe,
        hutchinson_mode=hutchinson_mode,
        steps=steps,
        step_size=step_size,
        max_steps=max_steps,
        source_std=source_std,
        t0=t0,
        t1=t1,
    )
    x = jnp.asarray(x)
    b = x.shape[0]
    key = _typed_key(key)
    if key.ndim == 0:
        keys = example_keys(key, jnp.arange(b))
    elif key.shape == (b,):
        keys = key
    else:
        raise ValueError(
            f"key must be one key or a batch of {b} keys (one per example); got "
            f"a key array of shape {key.shape}."
        )
    bpd, nfe, ok, _ = _bpd_core(
        as_field(v), x, keys, jnp.ones((b,), bool), opts=tuple(sorted(opts.items())), mesh=None
    )
    if throw:
        _raise_if_failed(ok, "fmjax.metrics.image_bpd")
    return bpd, jnp.mean(nfe)


def _raise_if_failed(ok, what, where=""):
    if traced(ok):
        return
    ok = np.asarray(ok)
    if not ok.all():
        bad = np.flatnonzero(~ok)
        raise RuntimeError(
            f"{what}: the ODE solve failed for {bad.size} example(s){where} (rows "
            f"{bad[:10].tolist()}{'...' if bad.size > 10 else ''}); the adaptive solver most "
            "likely hit max_steps. Raise max_steps= or loosen rtol/atol."
        )


# --------------------------------------------------------------------------------------
# A whole split, resumable.
# --------------------------------------------------------------------------------------


def _shard_rows(array, mesh):
    """Process-local rows -> a global array sharded along axis 0 over 'data'."""
    spec = PartitionSpec("data", *([None] * (np.ndim(array) - 1)))
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), array)


def _pad_rows(a, n):
    if n == 0:
        return a
    return np.concatenate([a, np.zeros((n,) + a.shape[1:], a.dtype)])


def _state_path(state_file):
    path = os.fspath(state_file)
    if jax.process_count() > 1:  # the iterator state is per process
        path = f"{path}.process{jax.process_index()}-of-{jax.process_count()}"
    return path


def _write_json_atomic(path: str, obj) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fingerprint(key, opts) -> dict[str, Any]:
    """What the totals depend on: a state file written under other settings is rejected."""
    fp = {
        k: opts[k]
        for k in (
            "num_dequant",
            "divergence",
            "num_probes",
            "probe",
            "solver",
            "steps",
            "step_size",
            "rtol",
            "atol",
            "num_levels",
        )
    }
    fp["value_range"] = list(opts["value_range"])
    if opts["source_std"] != 1.0:  # absent for N(0, I): state files from before stay valid
        fp["source_std"] = opts["source_std"]
    if (opts["t0"], opts["t1"]) != (0.0, 1.0):  # likewise for the default time span
        fp["t0"], fp["t1"] = opts["t0"], opts["t1"]
    fp["key"] = np.asarray(jax.random.key_data(key)).ravel().tolist()
    fp["key_impl"] = str(jax.random.key_impl(key))
    return fp


def _summary(totals, *, complete, num_dequant, resumed) -> dict[str, Any]:
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
      key: one PRNG key; example ``i`` uses ``fold_in(key, i)`` (see the module docstring), so
        results do not depend on the batch size, the device count or resumption.
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
      **solver_kw: ``divergence``, ``solver``, ``rtol``, ``atol``, ``value_range``,
        ``num_levels``, ``num_probes``, ``probe``, ``hutchinson_mode``, ``steps``,
        ``step_size``, ``max_steps``, ``source_std``, ``t0``, ``t1`` as in :func:`image_bpd`
        (changing ``max_steps`` keeps a state file valid: raise it and rerun when a solve failed).

    Returns:
      A dict of plain Python numbers with the keys ``bpd`` (the mean), ``bpd_stderr`` (the standard
      error of the mean over examples), ``num_examples``, ``nfe_mean`` (mean NFE per
      solve), ``num_batches``, ``complete``, ``num_dequant`` and ``resumed``.

    Raises:
      RuntimeError: an ODE solve failed in some batch (the totals up to the previous batch
        are kept in ``state_file``).
    """
    opts = _options(num_dequant, **solver_kw)
    key = _typed_key(key)
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
    fingerprint = _fingerprint(key, opts)
    v = as_field(v)

    owned = callable(make_iterator)  # we made it, so we close it (grain workers)
    it = make_iterator() if owned else make_iterator
    if not hasattr(it, "__next__"):
        it = iter(it)
    try:
        return _evaluate(v, it, key, opts, fingerprint, state_file, mesh, max_batches, callback)
    finally:
        if owned and hasattr(it, "close"):
            it.close()


def _evaluate(v, it, key, opts, fingerprint, state_file, mesh, max_batches, callback):
    static_opts = tuple(sorted(opts.items()))
    totals = {
        "sum_bpd": 0.0,
        "sum_sq_bpd": 0.0,
        "count": 0,
        "sum_nfe": 0.0,
        "batches_done": 0,
        "rows_seen": 0,
        "local_rows_done": 0,
    }
    complete = False
    resumed = False
    path = None
    if state_file is not None:
        if not (hasattr(it, "get_state") and hasattr(it, "set_state")):
            raise TypeError(
                "state_file needs an iterator with get_state()/set_state() (e.g. "
                f"grain's); got {type(it).__name__}."
            )
        path = _state_path(state_file)
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if saved.get("version") != STATE_VERSION:
                raise ValueError(
                    f"{path}: unknown state version {saved.get('version')!r} "
                    f"(expected {STATE_VERSION})."
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
            totals = saved["totals"]
            complete = saved["complete"]
            it.set_state(saved["iterator"])
            resumed = True

    if mesh is not None:
        mesh = auto_mesh(mesh)
        v = jax.device_put(v, NamedSharding(mesh, PartitionSpec()))
        local_shards = max(1, mesh.shape["data"] // jax.process_count())
    base_key = key

    while not complete:
        if max_batches is not None and totals["batches_done"] >= max_batches:
            break
        try:
            batch = next(it)
        except StopIteration:
            complete = True
            break
        x = np.asarray(batch["image"])
        if x.ndim < 2 or not np.issubdtype(x.dtype, np.floating):
            raise ValueError(
                f"batch['image'] must be a floating (B, *event) array; got {x.dtype} {x.shape}."
            )
        b = x.shape[0]
        mask = np.asarray(batch["mask"], bool) if "mask" in batch else np.ones((b,), bool)
        # this process's rows in the batches before (state files from before this total
        # was kept had equal batches)
        rows_done = totals.get("local_rows_done", totals["batches_done"] * b)
        if "index" in batch:
            index = np.asarray(batch["index"], np.int64)
        else:
            # positions continue from the rows before, over all processes (equal local
            # batches), so a short last batch does not reuse the positions of the one before
            index = rows_done * jax.process_count() + jax.process_index() * b + np.arange(b)
        if mask.shape != (b,) or index.shape != (b,):
            raise ValueError(
                f"batch 'mask'/'index' must have shape ({b},); got {mask.shape} and {index.shape}."
            )
        index = index.astype(np.uint32)
        if mesh is None:
            keys = example_keys(base_key, index)
            bpd, nfe, ok, gmask = _bpd_core(
                v, jnp.asarray(x), keys, jnp.asarray(mask), opts=static_opts, mesh=None
            )
        else:
            pad = (-b) % local_shards
            xs, ms, ids = _pad_rows(x, pad), _pad_rows(mask, pad), _pad_rows(index, pad)
            keys = _fold_in_each(base_key, _shard_rows(ids, mesh))
            bpd, nfe, ok, gmask = _bpd_core(
                v, _shard_rows(xs, mesh), keys, _shard_rows(ms, mesh), opts=static_opts, mesh=mesh
            )
        bpd, nfe, ok, gmask = (np.asarray(a) for a in (bpd, nfe, ok, gmask))
        _raise_if_failed(
            ok | ~gmask, "fmjax.metrics.evaluate_bpd", f" in batch {totals['batches_done']}"
        )
        sel = bpd[gmask].astype(np.float64)
        totals = {
            "sum_bpd": totals["sum_bpd"] + float(np.sum(sel)),
            "sum_sq_bpd": totals["sum_sq_bpd"] + float(np.sum(sel * sel)),
            "count": totals["count"] + int(sel.size),
            "sum_nfe": totals["sum_nfe"] + float(np.sum(nfe[gmask].astype(np.float64))),
            "batches_done": totals["batches_done"] + 1,
            "local_rows_done": rows_done + b,
            "rows_seen": totals["rows_seen"] + int(gmask.size),
        }
        if path is not None:
            _write_json_atomic(
                path,
                {
                    "version": STATE_VERSION,
                    "fingerprint": fingerprint,
                    "totals": totals,
                    "complete": False,
                    "iterator": it.get_state(),
                },
            )
        if callback is not None:
            callback(
                _summary(totals, complete=False, num_dequant=opts["num_dequant"], resumed=resumed)
            )

    if path is not None and complete:
        _write_json_atomic(
            path,
            {
                "version": STATE_VERSION,
                "fingerprint": fingerprint,
                "totals": totals,
                "complete": True,
                "iterator": it.get_state(),
            },
        )
    return _summary(totals, complete=complete, num_dequant=opts["num_dequant"], resumed=resumed)
