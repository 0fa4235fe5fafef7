"""Minibatch OT couplings against brute force: permutations, classes, contexts, devices."""

import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import run_python

from fmjax import couplings, losses, paths, train


def _points(n, d=2, seed=0, shift=3.0):
    k0, k1 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k0, (n, d)), 2.0 * jax.random.normal(k1, (n, d)) + shift


def _cost(a, b):
    return float(jnp.sum((a - b) ** 2))


def _perm_of(paired, x0):
    """The permutation with paired == x0[perm] (x0's rows are distinct)."""
    d = np.sum((np.asarray(paired)[:, None] - np.asarray(x0)[None]) ** 2, -1)
    perm = d.argmin(1)
    np.testing.assert_allclose(np.asarray(x0)[perm], paired, rtol=0, atol=0)
    return perm


def _is_permutation(perm):
    return sorted(np.asarray(perm).tolist()) == list(range(len(perm)))


LABELS = jnp.array([0, 1, 0, 2, 1, 0, 2], jnp.int32)


@pytest.mark.parametrize("method", ["exact", "sinkhorn"])
def test_labels_pair_only_within_a_class(method):
    x0, x1 = _points(len(LABELS), seed=1)
    p0, p1 = couplings.minibatch_ot(None, x0, x1, method=method, cond=LABELS)
    assert p1 is x1
    perm = _perm_of(p0, x0)
    assert _is_permutation(perm)
    np.testing.assert_array_equal(LABELS[perm], LABELS)  # x0[perm[j]] carries j's class
    if method == "exact":  # the best of all class-preserving permutations (brute force)
        best = min(
            _cost(x0[np.array(p)], x1)
            for p in itertools.permutations(range(len(LABELS)))
            if np.array_equal(LABELS[np.array(p)], LABELS)
        )
        np.testing.assert_allclose(_cost(p0, x1), best, rtol=1e-5)
        unrestricted, _ = couplings.minibatch_ot(None, x0, x1)
        assert _cost(unrestricted, x1) <= _cost(p0, x1) + 1e-5


@pytest.mark.parametrize("solver", ["network_simplex", "hungarian"])
@pytest.mark.parametrize("d", [2, 96])
def test_exact_solvers_and_the_host_permutation_are_optimal(solver, d):
    x0, x1 = _points(7, d=d, seed=4)
    best = min(_cost(x0[np.array(p)], x1) for p in itertools.permutations(range(7)))
    perm = couplings.exact_ot_permutation(np.asarray(x0), np.asarray(x1), solver=solver)
    assert perm.dtype == np.int32 and _is_permutation(perm)
    np.testing.assert_allclose(_cost(x0[perm], x1), best, rtol=1e-5)
    assert _cost(x0[perm], x1) <= _cost(x0, x1) + 1e-5  # never worse than the identity
    p0, _ = couplings.minibatch_ot(None, x0, x1, solver=solver)
    np.testing.assert_allclose(_cost(p0, x1), best, rtol=1e-5)
    # labels and contexts on the host: the same pairs as the jittable coupling
    host = couplings.exact_ot_permutation(np.asarray(x0), np.asarray(x1), np.asarray(LABELS))
    np.testing.assert_array_equal(np.asarray(LABELS)[host], np.asarray(LABELS))
    dev, _ = jax.jit(lambda a, b: couplings.minibatch_ot(None, a, b, cond=LABELS))(x0, x1)
    np.testing.assert_array_equal(np.asarray(x0)[host], dev)
    ctx = np.asarray(x1[:, :2]) * 0.5
    host = couplings.exact_ot_permutation(np.asarray(x0), np.asarray(x1), ctx, 3.0)
    dev, _ = couplings.minibatch_ot(None, x0, x1, cond=jnp.asarray(ctx), cond_weight=3.0)
    np.testing.assert_array_equal(np.asarray(x0)[host], dev)


def test_exact_solver_choice_errors():
    x0, x1 = _points(4)
    with pytest.raises(ValueError, match="solver must be one of"):
        couplings.minibatch_ot(None, x0, x1, solver="lapjv")
    with pytest.raises(ValueError, match="same shape"):
        couplings.exact_ot_permutation(np.zeros((4, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        couplings.exact_ot_permutation(np.full((4, 2), np.nan), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="leading size 4"):
        couplings.exact_ot_permutation(np.zeros((4, 2)), np.zeros((4, 2)), np.zeros(3, int))


def test_context_vectors_add_their_cost_exactly():
    n = 6
    x0, x1 = _points(n, seed=2)
    ctx = jax.random.normal(jax.random.key(7), (n, 3))
    w = 2.5
    p0, _ = couplings.minibatch_ot(None, x0, x1, cond=ctx, cond_weight=w)
    perm = _perm_of(p0, x0)
    total = lambda p: _cost(x0[p], x1) + w * _cost(ctx[p], ctx)  # noqa: E731
    best = min(total(np.array(p)) for p in itertools.permutations(range(n)))
    np.testing.assert_allclose(total(perm), best, rtol=1e-5)
    # a heavy weight keeps every source sample with its own context: the identity
    p0, _ = couplings.minibatch_ot(None, x0, x1, cond=ctx, cond_weight=1e6)
    np.testing.assert_array_equal(_perm_of(p0, x0), np.arange(n))


def test_sinkhorn_is_a_permutation_close_to_the_optimum():
    x0, x1 = _points(256, seed=3)
    exact = _cost(couplings.minibatch_ot(None, x0, x1)[0], x1)
    ident = _cost(x0, x1)
    # its excess cost over the optimum, as a share of what OT saves over the identity
    for reg, share in ((0.05, 0.08), (0.01, 0.02)):
        ot = jax.jit(functools.partial(couplings.minibatch_ot, method="sinkhorn", reg=reg))
        approx, _ = ot(None, x0, x1)
        assert _is_permutation(_perm_of(approx, x0))
        assert exact <= _cost(approx, x1) <= exact + share * (ident - exact)


def test_round_to_permutation():
    # a plan that is a permutation comes back as it is
    perm = jax.random.permutation(jax.random.key(0), 9)
    scores = jnp.where(jnp.arange(9)[:, None] == perm[None, :], 0.0, -5.0)
    np.testing.assert_array_equal(couplings.round_to_permutation(scores), perm)
    # any scores (ties, NaN, -inf included) give a permutation that respects `allowed`
    s = jax.random.normal(jax.random.key(1), (7, 7)).round(0)
    s = s.at[0, :].set(jnp.nan).at[2, 3].set(-jnp.inf)
    p = couplings.round_to_permutation(s)
    assert _is_permutation(p)
    allowed = LABELS[:, None] == LABELS[None, :]
    p = jax.jit(couplings.round_to_permutation)(s, allowed)
    assert _is_permutation(p)
    np.testing.assert_array_equal(LABELS[p], LABELS)
    # greedy by rounds: the best pair overall is always taken
    s = jnp.array([[5.0, 4.0], [3.0, 0.0]])
    np.testing.assert_array_equal(couplings.round_to_permutation(s), [0, 1])


def test_bad_conditions():
    x0, x1 = _points(4)
    with pytest.raises(ValueError, match=r"leading size 4 .*got shape \(3,\)"):
        couplings.minibatch_ot(None, x0, x1, cond=jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="cond_weight applies to float context vectors"):
        couplings.minibatch_ot(None, x0, x1, cond=jnp.zeros(4, jnp.int32), cond_weight=2.0)
    with pytest.raises(ValueError, match="integer class labels .* or float context"):
        couplings.minibatch_ot(None, x0, x1, cond=jnp.zeros((4, 2), bool))
    with pytest.raises(ValueError, match="cond_weight must be a finite number"):
        couplings.minibatch_ot(None, x0, x1, cond=jnp.zeros((4, 2)), cond_weight=-1.0)
    with pytest.raises(ValueError, match="reg must be a finite number"):
        couplings.minibatch_ot(None, x0, x1, method="sinkhorn", reg=0.0)


def test_cfm_loss_gives_the_coupling_its_conditions():
    x0, x1 = _points(len(LABELS), seed=6)
    seen = {}

    def coupling(key, a, b, cond=None):
        seen["cond"] = cond
        return couplings.minibatch_ot(key, a, b, cond=cond)

    def v(t, x, y):
        return x * 0.0

    path = paths.CondOT()
    key = jax.random.key(0)
    loss = losses.cfm_loss(v, path, key, x1, x0=x0, cond=LABELS, coupling=coupling)
    np.testing.assert_array_equal(seen["cond"], LABELS)
    # by name, the same labels reach the OT coupling: the loss of the class-aware pairing
    named = losses.cfm_loss(v, path, key, x1, x0=x0, cond=LABELS, coupling="ot")
    np.testing.assert_allclose(named, loss, rtol=1e-6)


# Under jit on a batch sharded over 4 devices, the pairing is over the global batch: the
# same permutation as on one device, for both methods, with and without labels.
FOUR_DEVICES = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import functools, json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from fmjax import couplings
assert jax.device_count() == 4
mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
rows = NamedSharding(mesh, PartitionSpec("data"))
k0, k1 = jax.random.split(jax.random.key(0))
x0 = jax.random.normal(k0, (64, 2)); x1 = 2.0 * jax.random.normal(k1, (64, 2)) + 3.0
labels = jnp.arange(64, dtype=jnp.int32) % 3
out = {}
for method in ("exact", "sinkhorn"):
    for cond in (None, labels):
        f = jax.jit(functools.partial(couplings.minibatch_ot, method=method))
        one = f(None, x0, x1, cond=cond)[0]
        args = [jax.device_put(a, rows) for a in (x0, x1)]
        c = None if cond is None else jax.device_put(cond, rows)
        four = f(None, *args, cond=c)[0]
        assert len(four.sharding.device_set) == 4 or four.sharding.is_fully_replicated
        out[f"{method}/{cond is not None}"] = float(jnp.max(jnp.abs(one - four)))
# a training step that pairs before splitting over devices (shard_loss) and microbatches
import optax
from fmjax import losses, paths, train
def loss_fn(p, key, batch):
    v = lambda t, x: x @ p["w"] + t[:, None] * p["b"]
    return losses.cfm_loss(v, paths.CondOT(), key, batch["x1"], x0=batch["x0"], t=batch["t"])
state = train.TrainState.create(
    {"w": jnp.eye(2) * 0.3, "b": jnp.ones(2)}, optax.sgd(0.1), jax.random.key(4))
batch = {"x1": x1, "t": jnp.linspace(0.0, 1.0, 64)}
kw = dict(microbatches=2, prepare=couplings.pairing("ot"), donate=False)
one = train.make_train_step(loss_fn, optax.sgd(0.1), **kw)(state, batch)[0].params
four = train.make_train_step(loss_fn, optax.sgd(0.1), mesh=mesh, shard_loss=True, **kw)(
    state, batch)[0].params
out["train_step"] = float(max(jnp.max(jnp.abs(one[k] - four[k])) for k in one))
# fused steps: the batch drawn in the step, paired whole before the per-device split
def data_fn(key):
    return {"x1": 2.0 * jax.random.normal(key, (64, 2)) + 3.0, "t": jnp.linspace(0.0, 1.0, 64)}
kw = dict(prepare=couplings.pairing("ot"), donate=False, predraw=False)
one = train.make_fused_train_steps(loss_fn, optax.sgd(0.1), data_fn, 3, **kw)(state)[0].params
four = train.make_fused_train_steps(loss_fn, optax.sgd(0.1), data_fn, 3, mesh=mesh, **kw)(
    train.sharding.replicate(state, mesh))[0].params
out["fused"] = float(max(jnp.max(jnp.abs(one[k] - four[k])) for k in one))
per_device = train.make_fused_train_steps(
    lambda p, k, b: loss_fn(p, k, couplings.pairing("ot")(k, b)), optax.sgd(0.1), data_fn, 3,
    mesh=mesh, donate=False, predraw=False)(train.sharding.replicate(state, mesh))[0].params
out["fused_per_device"] = float(max(jnp.max(jnp.abs(one[k] - per_device[k])) for k in one))
print("RESULT", json.dumps(out))
"""


def test_four_devices_pair_the_global_batch_as_one_device():
    proc = run_python(FOUR_DEVICES, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1]
    diffs = json.loads(line.split(" ", 1)[1])
    step, fused = diffs.pop("train_step"), diffs.pop("fused")
    per_device = diffs.pop("fused_per_device")
    assert len(diffs) == 4
    assert all(d == 0.0 for d in diffs.values()), diffs
    assert step < 1e-6 and fused < 1e-5
    assert per_device > 1e-3  # pairing inside the loss pairs each device's rows: not the same


def _linear_loss(params, key, batch):
    def v(t, x):
        return x @ params["w"] + t[:, None] * params["b"]

    return losses.cfm_loss(v, paths.CondOT(), key, batch["x1"], x0=batch["x0"], t=batch["t"])


def test_pairing_over_the_whole_step_batch_before_microbatches():
    x1 = _points(16, seed=8)[1]
    batch = {"x1": x1, "t": jnp.linspace(0.0, 1.0, 16)}  # times fixed per row
    state = train.TrainState.create(
        {"w": jnp.eye(2) * 0.3, "b": jnp.ones(2)}, optax.sgd(0.1), jax.random.key(4)
    )
    prepare = couplings.pairing("ot")
    out = {}
    for k in (1, 4):
        step = train.make_train_step(
            _linear_loss, optax.sgd(0.1), microbatches=k, prepare=prepare, donate=False
        )
        out[k] = step(state, batch)[0].params
    # one pairing of all 16 rows, then split: the same update with and without microbatches
    for name in ("w", "b"):
        np.testing.assert_allclose(out[4][name], out[1][name], rtol=1e-5)
    # the x0 it adds is the global optimum for its draw: a permutation of N(0, I) draws
    key = jax.random.fold_in(train.step_keys(state.rng, 0)[0], train.PREPARE_KEY_INDEX)
    x0 = prepare(key, batch)["x0"]
    drawn = jax.random.normal(jax.random.split(key)[0], x1.shape)
    np.testing.assert_array_equal(x0, couplings.minibatch_ot(None, drawn, x1)[0])

    # pairing inside the loss pairs within each microbatch instead: another update
    def paired_in_loss(params, key, batch):
        return losses.cfm_loss(
            lambda t, x: x @ params["w"] + t[:, None] * params["b"],
            paths.CondOT(),
            key,
            batch["x1"],
            t=batch["t"],
            coupling="ot",
        )

    inner = {
        k: train.make_train_step(paired_in_loss, optax.sgd(0.1), microbatches=k, donate=False)(
            state, batch
        )[0].params["w"]
        for k in (1, 4)
    }
    assert not np.allclose(inner[1], inner[4], rtol=1e-3)


def test_pairing_with_labels_and_errors():
    x1 = _points(len(LABELS), seed=9)[1]
    prepare = couplings.pairing(
        "ot_sinkhorn", cond="label", source=lambda k, s, d: 0.5 * jax.random.normal(k, s, d)
    )
    out = prepare(jax.random.key(0), {"x1": x1, "label": LABELS})
    drawn = 0.5 * jax.random.normal(jax.random.split(jax.random.key(0))[0], x1.shape)
    perm = _perm_of(out["x0"], drawn)
    assert _is_permutation(perm)
    np.testing.assert_array_equal(LABELS[perm], LABELS)
    with pytest.raises(
        ValueError, match=r"the batch must hold \['x1', 'label'\]; got keys \['x1'\]"
    ):
        prepare(jax.random.key(0), {"x1": x1})
