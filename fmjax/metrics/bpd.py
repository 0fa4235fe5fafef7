"""Bits per dimension of 8-bit images under K-sample uniform dequantization.

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

A whole evaluation split, resumable and data parallel, is :func:`fmjax.metrics.nll.evaluate_bpd`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fmjax import ode
from fmjax._field import as_field
from fmjax.batching import check_batch
from fmjax.checks import integer, real
from fmjax.likelihood import (
    DIVERGENCES,
    PROBES,
    bits_per_dim,
    check_span,
    log_likelihood,
    normal_log_prob,
)
from fmjax.solvers import SolverOptions, check_times, solver_options

__all__ = [
    "BpdOptions",
    "as_typed_key",
    "batch_bpd",
    "dequantization_keys",
    "dequantization_noise",
    "example_keys",
    "image_bpd",
]


# --------------------------------------------------------------------------------------
# Keys and dequantization noise.
# --------------------------------------------------------------------------------------


def as_typed_key(key) -> jax.Array:
    """A new-style typed key (array of dtype ``key<...>``) from a typed or raw uint32 key."""
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


def example_keys(key, indices) -> jax.Array:
    """Per-example keys ``fold_in(key, i)`` for the global example positions ``indices``."""
    key = as_typed_key(key)
    if key.ndim != 0:
        raise ValueError(f"example_keys needs a single key; got a key array of shape {key.shape}.")
    return _fold_in_each(key, jnp.asarray(indices, jnp.uint32))


@jax.jit
def _fold_in_each(key, indices):
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)


def dequantization_keys(example_key, num_dequant: int) -> tuple[jax.Array, jax.Array]:
    """``(noise_keys, probe_keys)``, each ``(num_dequant,)``: the k-th pair is
    ``split(fold_in(example_key, k))``."""

    def one(k):
        pair = jax.random.split(jax.random.fold_in(example_key, k))
        return pair[0], pair[1]

    return jax.vmap(one)(jnp.arange(num_dequant, dtype=jnp.uint32))


def _uniform_noise(noise_keys, event_shape, bin_width, dtype):
    """``bin_width * U[0, 1)`` of shape ``(*noise_keys.shape, *event_shape)``."""
    draw = jax.vmap(lambda nk: bin_width * jax.random.uniform(nk, event_shape, dtype))
    return jax.vmap(draw)(noise_keys)


def dequantization_noise(
    example_keys_, event_shape, num_dequant: int, bin_width: float, dtype=jnp.float32
) -> jax.Array:
    """Uniform dequantization noise ``(B, K, *event_shape)`` in ``[0, bin_width)``, drawn from
    the per-example keys ``example_keys_`` (B,) exactly as :func:`image_bpd` draws it."""
    return _noise(
        as_typed_key(example_keys_),
        tuple(event_shape),
        int(num_dequant),
        float(bin_width),
        jnp.dtype(dtype),
    )


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _noise(keys, event_shape, num_dequant, bin_width, dtype):
    noise_keys, _ = jax.vmap(lambda ek: dequantization_keys(ek, num_dequant))(keys)
    return _uniform_noise(noise_keys, event_shape, bin_width, dtype)


# --------------------------------------------------------------------------------------
# Options and one batch.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BpdOptions:
    """Validated, hashable settings of a bits/dim evaluation (a static argument of
    :func:`batch_bpd`).

    ``num_dequant``, the divergence estimate (``divergence``, ``num_probes``, ``probe``,
    ``hutchinson_mode``), the ODE solve (``solve``: one :class:`fmjax.SolverOptions`), the
    data quantization (``value_range``, ``num_levels``) and the flow (``source_std``, ``t0``,
    ``t1``); :meth:`make` builds it from :func:`image_bpd`'s keywords. Invalid values raise
    ``ValueError`` on construction.
    """

    num_dequant: int = 1
    divergence: str = "hutchinson"
    num_probes: int = 1
    probe: str = "rademacher"
    hutchinson_mode: str = "jvp"
    solve: SolverOptions = SolverOptions()
    value_range: tuple[float, float] = (-1.0, 1.0)
    num_levels: int = 256
    source_std: float = 1.0
    t0: float = 0.0
    t1: float = 1.0

    @classmethod
    def make(cls, *, options: SolverOptions | None = None, **kw) -> BpdOptions:
        """From keywords: this class's fields, and the solve's settings either as
        ``options=`` or as :class:`fmjax.SolverOptions` field keywords (``solver``,
        ``rtol``, ``atol``, ``steps``, ``step_size``, ``max_steps``, ``error_norm``; None
        takes the default)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"solve"}
        settings = {k: kw.pop(k) for k in list(kw) if k not in names}
        if "value_range" in kw:
            kw["value_range"] = tuple(kw["value_range"])
        return cls(solve=solver_options(options, **settings), **kw)

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        put("num_dequant", integer(self.num_dequant, "num_dequant"))
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}; got {self.divergence!r}.")
        if self.probe not in PROBES:
            raise ValueError(f"probe must be one of {PROBES}; got {self.probe!r}.")
        put("num_probes", integer(self.num_probes, "num_probes"))
        if self.hutchinson_mode not in ("jvp", "vjp"):
            raise ValueError(
                f"hutchinson_mode must be 'jvp' or 'vjp'; got {self.hutchinson_mode!r}."
            )
        if not isinstance(self.solve, SolverOptions):
            raise TypeError(f"solve must be a fmjax.SolverOptions; got {self.solve!r}.")
        put("t0", real(self.t0, "t0", low=0.0, high=1.0))
        put("t1", real(self.t1, "t1", low=0.0, high=1.0))
        check_span(self.t0, self.t1)
        check_times(self.t0, self.t1, self.solve)
        lo, hi = (float(a) for a in self.value_range)
        if not hi > lo:
            raise ValueError(
                f"value_range must be (lo, hi) with hi > lo; got {self.value_range!r}."
            )
        put("value_range", (lo, hi))
        put("num_levels", integer(self.num_levels, "num_levels", minimum=2))
        put(
            "source_std",
            real(
                self.source_std,
                "source_std (the std of the N(0, source_std^2 I) source)",
                low=0.0,
                low_open=True,
            ),
        )

    @property
    def bin_width(self) -> float:
        """Width of one quantization bin in model space, ``(hi - lo) / num_levels``."""
        lo, hi = self.value_range
        return (hi - lo) / self.num_levels


@functools.partial(jax.jit, static_argnames=("options", "mesh"))
def batch_bpd(
    v, x, keys, mask=None, *, options: BpdOptions, mesh: Mesh | None = None
) -> tuple[jax.Array, ode.SolveStats, Any]:
    """Per-example bits/dim of a batch, one ODE solve per (example, k), jitted.

    Args:
      v: the vector field ``v(t, x)`` (a pytree-callable, e.g. ``jax.tree_util.Partial``).
      x: ``(B, *event_shape)`` quantized levels in model space.
      keys: ``(B,)`` typed per-example keys (:func:`example_keys`).
      mask: optional ``(B,)`` array returned with the results (gathered with them under
        ``mesh``), e.g. the padding mask of the rows.
      options: the settings.
      mesh: if given, the results are gathered onto every device (and process) of it.

    Returns:
      ``(bpd, stats, mask)``: bits/dim ``(B,)``, the solves' :class:`fmjax.ode.SolveStats`
      with fields of shape ``(B, K)``, and ``mask``.
    """
    o = options
    b, k = x.shape[0], o.num_dequant
    noise_keys, probe_keys = jax.vmap(lambda ek: dequantization_keys(ek, k))(keys)
    u = _uniform_noise(noise_keys, x.shape[1:], o.bin_width, x.dtype)
    hutch = o.divergence == "hutchinson"
    solve = functools.partial(
        log_likelihood,
        v,
        base_log_prob=None
        if o.source_std == 1.0
        else functools.partial(normal_log_prob, std=o.source_std),
        divergence=o.divergence,
        num_probes=o.num_probes,
        probe=o.probe,
        hutchinson_mode=o.hutchinson_mode,
        options=o.solve,
        t0=o.t0,
        t1=o.t1,
        throw=False,
    )
    # One flat vmap over the B * K solves of one example each (compiles faster than nested
    # vmaps); keyword arguments of a vmapped function are mapped over their leading axis.
    y = (x[:, None] + u).reshape((b * k, 1) + x.shape[1:])
    logps, st = jax.vmap(solve)(y, key=probe_keys.reshape(-1) if hutch else None)
    logp = jax.nn.logsumexp(logps.reshape(b, k), axis=1) - math.log(k)
    bpd = bits_per_dim(logp, x.shape[1:], value_range=o.value_range, num_levels=o.num_levels)
    stats = ode.SolveStats(
        *(a.reshape(b, k) for a in (st.nfe, st.num_steps, st.num_accepted, st.num_rejected)),
        success=st.success.reshape(b, k),
    )
    out = (bpd, stats, mask)
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
    value_range=(-1.0, 1.0),
    num_levels: int = 256,
    num_probes: int = 1,
    probe: str = "rademacher",
    hutchinson_mode: str = "jvp",
    source_std: float = 1.0,
    t0: float = 0.0,
    t1: float = 1.0,
    throw: bool = True,
    options: SolverOptions | None = None,
    **solver_settings,
) -> tuple[jax.Array, jax.Array]:
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
      value_range, num_levels: the model-space range of the data and the number of levels;
        ``bin = (hi - lo) / num_levels`` and the range's log-determinant is corrected for.
      source_std: the flow starts from ``N(0, source_std^2 I)`` (a path's
        ``source_std()``: 1 for CondOT, ``sigma_max`` for VE).
      t0, t1: the flow's time span, source at ``t0``, data at ``t1`` (default ``[0, 1]``); a
        model that predicts x1, eps or the score is a velocity only over its path's
        ``velocity_range(prediction)``.
      throw: raise if any ODE solve failed (e.g. ``max_steps`` reached); not under ``jit``.
      options: the ODE solve as one :class:`fmjax.SolverOptions` (default dopri5 at
        rtol = atol = 1e-5, the paper's), or instead its fields as keywords
        (``solver=``, ``rtol=``, ``atol=``, ``steps=``, ``step_size=``, ``max_steps=``,
        ``error_norm=``).

    Returns:
      ``(bpd, nfe)``: bits/dim per example, shape (B,), and the mean NFE of the augmented
      field over the ``B * K`` solves (a scalar).
    """
    check_batch(x, "x")
    bpd_options = BpdOptions.make(
        num_dequant=num_dequant,
        divergence=divergence,
        value_range=value_range,
        num_levels=num_levels,
        num_probes=num_probes,
        probe=probe,
        hutchinson_mode=hutchinson_mode,
        source_std=source_std,
        t0=t0,
        t1=t1,
        options=options,
        **solver_settings,
    )
    x = jnp.asarray(x)
    b = x.shape[0]
    key = as_typed_key(key)
    if key.ndim == 0:
        key = example_keys(key, jnp.arange(b))
    elif key.shape != (b,):
        raise ValueError(
            f"key must be one key or a batch of {b} keys (one per example); got "
            f"a key array of shape {key.shape}."
        )
    bpd, stats, _ = batch_bpd(as_field(v), x, key, options=bpd_options)
    if throw:
        ode.raise_if_failed(stats, "fmjax.metrics.image_bpd")
    return bpd, jnp.mean(stats.nfe.astype(jnp.float32))
