"""Training state, jitted / fused / sharded steps and the loop."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fmjax
from fmjax import train


def _quadratic_loss(params, key, batch):
    del key
    return jnp.mean(jnp.square(batch @ params["w"] - 1.0))


def _setup(lr=0.1):
    params = {"w": jnp.array([0.5, -0.3])}
    tx = optax.sgd(lr)
    return params, tx, train.TrainState.create(params, tx, jax.random.key(0))


def test_step_matches_hand_written_sgd_and_ema():
    params, tx, state = _setup()
    batch = jnp.array([[1.0, 2.0], [0.5, -1.0]])
    step = train.make_train_step(_quadratic_loss, tx, ema_decay=0.9)
    g = jax.grad(lambda p: _quadratic_loss(p, None, batch))(params)["w"]
    w1 = params["w"] - 0.1 * g
    state, metrics = step(state, batch)
    np.testing.assert_allclose(state.params["w"], w1, rtol=1e-6)
    np.testing.assert_allclose(state.ema_params["w"], 0.9 * params["w"] + 0.1 * w1, rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], jnp.linalg.norm(g), rtol=1e-6)
    assert int(state.step) == 1


@pytest.mark.parametrize("predraw", [None, True, False])
def test_fused_steps_equal_sequential_steps(predraw):
    _, tx, state = _setup(lr=1e-2)
    path = fmjax.paths.CondOT()

    def loss_fn(p, key, x1):
        return fmjax.losses.cfm_loss(lambda t, x: x * p["w"] + t[:, None], path, key, x1)

    def data_fn(key):
        return jax.random.normal(key, (16, 2)) + 2.0

    fused = train.make_fused_train_steps(
        loss_fn, tx, data_fn, 5, ema_decay=0.5, donate=False, predraw=predraw
    )
    s_fused, m = fused(state)
    single = train.make_train_step(loss_fn, tx, ema_decay=0.5, donate=False)
    s = state
    for i in range(5):
        loss_key, data_key = train.step_keys(s.rng, s.step)
        assert np.array_equal(
            jax.random.key_data(loss_key), jax.random.key_data(jax.random.fold_in(s.rng, i))
        )
        s, _ = single(s, data_fn(data_key))
    chex_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5)
    jax.tree_util.tree_map(chex_close, s_fused.params, s.params)
    jax.tree_util.tree_map(chex_close, s_fused.ema_params, s.ema_params)
    assert int(s_fused.step) == 5 and "loss_mean" in m


def test_fused_steps_draw_data_independent_of_the_loss_keys():
    """The data key is none of the keys the loss derives: with threefry keys
    ``fold_in(k, j) == split(k, n)[j]``, so a data key ``fold_in(loss_key, 1)`` made a
    ``data_fn`` drawing ``uniform(key, (B, 1))`` return exactly cfm_loss's ``t``."""
    _, tx, state = _setup(lr=1e-2)
    batch = 64

    def loss_fn(p, key, x1):
        _, kt, _ = jax.random.split(key, 3)  # cfm_loss's own derivation of t's key
        t = jax.random.uniform(kt, (batch,))
        gap = jnp.min(jnp.abs(t - x1[:, 0]))
        return jnp.sum(p["w"] ** 2), {"min_gap": gap, "corr": jnp.corrcoef(t, x1[:, 0])[0, 1]}

    fused = train.make_fused_train_steps(
        loss_fn, tx, lambda k: jax.random.uniform(k, (batch, 1)), 3, donate=False
    )
    _, m = fused(state)
    assert float(m["min_gap"]) > 0.0  # (was exactly 0: x1 == t)
    assert abs(float(m["corr"])) < 0.5
    rng = jax.random.key(3)
    loss_key, data_key = train.step_keys(rng, 7)
    derived = [
        *jax.random.split(loss_key, 3),
        *(jax.random.fold_in(loss_key, j) for j in range(16)),
    ]
    assert not any(
        np.array_equal(jax.random.key_data(data_key), jax.random.key_data(k)) for k in derived
    )


def test_fit_logs_and_stops_on_non_finite_loss():
    _, tx, state = _setup()
    step = train.make_train_step(_quadratic_loss, tx)
    batches = iter([jnp.ones((4, 2))] * 10)
    logged = []
    state, hist = train.fit(
        state, step, batches, 10, log_every=5, on_log=logged.append, progress=False
    )
    assert [h["step"] for h in hist] == [5, 10] and logged == hist
    assert hist[-1]["loss"] < hist[0]["loss"]

    def nan_loss(p, k, b):
        return jnp.sum(p["w"]) * jnp.nan

    # the state has made 10 steps: the NaN of the 2nd step here is step 12
    with pytest.raises(train.NonFiniteLossError, match="non-finite loss nan at step 12"):
        train.fit(
            state,
            train.make_train_step(nan_loss, tx),
            iter([jnp.ones(2)] * 4),
            4,
            log_every=2,
            progress=False,
        )


def test_fit_counts_steps_from_the_state_and_logs_at_each_multiple():
    _, tx, state = _setup()
    step = train.make_train_step(_quadratic_loss, tx)
    state, hist = train.fit(
        state, step, iter([jnp.ones((4, 2))] * 10), 10, log_every=5, progress=False
    )
    assert int(state.step) == 10
    # a restored state continues the uninterrupted run's step numbers
    state, hist = train.fit(
        state, step, iter([jnp.ones((4, 2))] * 10), 10, log_every=5, progress=False
    )
    assert [h["step"] for h in hist] == [15, 20] and int(state.step) == 20

    # log_every not a multiple of steps_per_call: the first call at or past each multiple
    def fused(st):
        for _ in range(5):
            st, m = step(st, jnp.ones((4, 2)))
        return st, m

    _, hist = train.fit(state, fused, None, 40, log_every=12, steps_per_call=5, progress=False)
    assert [h["step"] for h in hist] == [25, 40, 50, 60]  # 24, 36, 48, 60 and the last call
    with pytest.raises(ValueError, match="log_every must be a positive integer"):
        train.fit(state, fused, None, 40, log_every=0, steps_per_call=5)


def test_fit_hooks_run_after_each_step_and_average_the_interval():
    _, tx, state = _setup()
    step = train.make_train_step(_quadratic_loss, tx)
    seen, per_step = [], []

    def on_step(i, st, metrics):
        seen.append((i, int(st.step)))
        per_step.append(float(metrics["loss"]))

    state, hist = train.fit(
        state,
        step,
        iter([jnp.ones((4, 2))] * 6),
        6,
        log_every=3,
        on_step=on_step,
        average=("loss",),
        progress=False,
    )
    assert seen == [(i, i) for i in range(1, 7)]  # after each step, with its state
    assert [h["step"] for h in hist] == [3, 6]
    assert hist[0]["loss"] == pytest.approx(np.mean(per_step[:3]), rel=1e-6)
    assert hist[1]["loss"] == pytest.approx(np.mean(per_step[3:]), rel=1e-6)

    def nan_at_2(p, k, b):  # finite, then NaN, then finite again: the interval's mean is NaN
        return _quadratic_loss(p, k, b) * jnp.where(jnp.all(b == 2.0), jnp.nan, 1.0)

    batches = iter([jnp.ones((4, 2)), 2.0 * jnp.ones((4, 2)), jnp.ones((4, 2))])
    with pytest.raises(train.NonFiniteLossError, match="at step 9") as err:
        train.fit(
            state,
            train.make_train_step(nan_at_2, tx),
            batches,
            3,
            log_every=3,
            average=("loss",),
            progress=False,
        )
    assert err.value.step == 9 and np.isnan(err.value.loss)


def test_fused_steps_predraw_only_small_vmappable_batches(monkeypatch):
    """``predraw`` vmaps ``data_fn``: a sampler that cannot be vmapped (a host callback
    without a vmap rule) gets a clear error, and the default draws inside the steps when the
    batches of all steps are larger than ``PREDRAW_MAX_BYTES``."""
    _, tx, state = _setup(lr=1e-2)

    def host_data(key):
        seed = jax.random.randint(key, (), 0, 2**30)
        return jax.pure_callback(
            lambda s: np.random.default_rng(int(s)).normal(size=(8, 2)).astype(np.float32),
            jax.ShapeDtypeStruct((8, 2), jnp.float32),
            seed,
        )

    def loss_fn(p, key, x):
        return jnp.mean((x * p["w"] - 1.0) ** 2)

    with pytest.raises(ValueError, match="predraw=False"):
        train.make_fused_train_steps(loss_fn, tx, host_data, 3, donate=False, predraw=True)(state)
    s_off, _ = train.make_fused_train_steps(loss_fn, tx, host_data, 3, donate=False, predraw=False)(
        state
    )
    monkeypatch.setattr(train.step, "PREDRAW_MAX_BYTES", 3 * 8 * 2 * 4 - 1)  # one byte short
    s_auto, _ = train.make_fused_train_steps(loss_fn, tx, host_data, 3, donate=False)(state)
    np.testing.assert_array_equal(s_auto.params["w"], s_off.params["w"])
    with pytest.raises(ValueError, match="predraw"):
        train.make_fused_train_steps(loss_fn, tx, host_data, 3, predraw="yes")


def _mlp_loss(params, key, batch):
    """A key-free per-row-mean loss with aux (a small tanh MLP regression)."""
    del key
    h = jnp.tanh(batch @ params["w1"])
    err = h @ params["w2"] - jnp.sin(batch)
    return jnp.mean(jnp.square(err)), {"abs_err": jnp.mean(jnp.abs(err))}


@pytest.mark.parametrize("tx", [optax.sgd(0.1), optax.adam(1e-2)], ids=["sgd", "adam"])
@pytest.mark.parametrize("k", [2, 4])
def test_microbatches_give_the_whole_batch_update(tx, k):
    params = {
        "w1": jax.random.normal(jax.random.key(1), (3, 16)) * 0.5,
        "w2": jax.random.normal(jax.random.key(2), (16, 3)) * 0.5,
    }
    state = train.TrainState.create(params, tx, jax.random.key(0))
    batches = [jax.random.normal(jax.random.key(10 + i), (16, 3)) for i in range(3)]
    whole = train.make_train_step(_mlp_loss, tx, ema_decay=0.9, donate=False)
    parts = train.make_train_step(_mlp_loss, tx, ema_decay=0.9, donate=False, microbatches=k)
    s1, s2 = state, state
    for b in batches:
        s1, m1 = whole(s1, b)
        s2, m2 = parts(s2, b)
        for name in ("loss", "grad_norm", "abs_err"):
            np.testing.assert_allclose(m2[name], m1[name], rtol=1e-5, err_msg=name)
    chex.assert_trees_all_close(s2.params, s1.params, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(s2.ema_params, s1.ema_params, rtol=1e-5, atol=1e-7)
    assert int(s2.step) == 3

    # the fused steps accumulate the same way
    def data_fn(key):
        return jax.random.normal(key, (16, 3))

    f1 = train.make_fused_train_steps(_mlp_loss, tx, data_fn, 3, donate=False)(state)
    f2 = train.make_fused_train_steps(_mlp_loss, tx, data_fn, 3, donate=False, microbatches=k)(
        state
    )
    chex.assert_trees_all_close(f2[0].params, f1[0].params, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(f2[1]["loss_mean"], f1[1]["loss_mean"], rtol=1e-5)


def test_microbatch_rows_and_keys():
    """Microbatch j holds rows j, j + k, ... and draws with fold_in(step key, j)."""

    def loss_fn(params, key, batch):
        return jnp.sum(params["w"]) * 0.0, {
            "row0": batch["x"][0, 0],
            "label0": batch["y"][0].astype(jnp.float32),
            "u": jax.random.uniform(key),
        }

    tx = optax.sgd(0.1)
    state = train.TrainState.create({"w": jnp.zeros(2)}, tx, jax.random.key(3))
    batch = {"x": jnp.arange(24.0).reshape(12, 2), "y": jnp.arange(12) * 10}
    parts = train.split_microbatches(batch, 3)
    chex.assert_shape(parts["x"], (3, 4, 2))
    np.testing.assert_array_equal(parts["x"][1], batch["x"][1::3])
    np.testing.assert_array_equal(parts["y"][2], batch["y"][2::3])
    _, m = train.make_train_step(loss_fn, tx, microbatches=3, donate=False)(state, batch)
    key = train.step_keys(state.rng, 0)[0]
    assert float(m["row0"]) == pytest.approx(np.mean([0.0, 2.0, 4.0]))  # rows 0, 1, 2
    assert float(m["label0"]) == pytest.approx(10.0)
    u = np.mean([jax.random.uniform(jax.random.fold_in(key, j)) for j in range(3)])
    assert float(m["u"]) == pytest.approx(float(u), rel=1e-6)


def test_microbatches_cut_the_step_activation_memory():
    def loss_fn(params, key, batch):
        h = batch
        for w in params:
            h = jnp.tanh(h @ w)
        return jnp.mean(jnp.square(h))

    params = [jnp.full((256, 256), 0.01) for _ in range(6)]
    tx = optax.sgd(0.1)
    state = train.TrainState.create(params, tx, jax.random.key(0))
    x = jnp.ones((2048, 256))  # 2 MiB per activation, six layers of them

    def temp_bytes(k):
        step = train.make_train_step(loss_fn, tx, microbatches=k)
        return step.lower(state, x).compile().memory_analysis().temp_size_in_bytes

    whole, quarter = temp_bytes(1), temp_bytes(4)
    assert whole > 12 * 2**20  # the activations of the whole batch are alive at once
    assert quarter < 0.55 * whole, (whole, quarter)


def test_bad_arguments():
    params, tx, _ = _setup()
    with pytest.raises(ValueError, match="ema_decay"):
        train.make_train_step(_quadratic_loss, tx, ema_decay=1.0)
    for bad in (0, 1.5, "2"):
        with pytest.raises(ValueError, match="microbatches"):
            train.make_train_step(_quadratic_loss, tx, microbatches=bad)
        with pytest.raises(ValueError, match="microbatches"):
            train.make_fused_train_steps(
                _quadratic_loss, tx, lambda k: jnp.ones((4, 2)), 2, microbatches=bad
            )
    state = train.TrainState.create(params, tx, jax.random.key(0))
    with pytest.raises(ValueError, match=r"microbatches=4 must divide .* shape \(6, 2\)"):
        train.make_train_step(_quadratic_loss, tx, microbatches=4)(state, jnp.ones((6, 2)))
    with pytest.raises(ValueError, match="GradientTransformation"):
        train.TrainState.create(params, "adam", jax.random.key(0))
    with pytest.raises(ValueError, match="multiple of"):
        train.fit(None, None, None, 10, steps_per_call=3)
