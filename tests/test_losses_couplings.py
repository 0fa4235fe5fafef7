"""CFM loss against its definition; couplings against brute-force optimal transport."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmjax
from fmjax import couplings, losses, paths


def _batch(n=8, d=3, seed=0):
    k0, k1, kt = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(k0, (n, d)),
        jax.random.normal(k1, (n, d)) + 3.0,
        jax.random.uniform(kt, (n,)),
    )


def _field(t, x):
    return 0.5 * x + t[:, None]


def test_cfm_loss_matches_definition_and_reductions():
    s = 1e-2
    path = paths.CondOT(sigma_min=s)
    x0, x1, t = _batch()
    xt = (1 - (1 - s) * t[:, None]) * x0 + t[:, None] * x1
    sq = (_field(t, xt) - (x1 - (1 - s) * x0)) ** 2
    got = losses.cfm_loss(_field, path, None, x1, x0=x0, t=t)
    np.testing.assert_allclose(got, jnp.mean(sq), rtol=1e-6)
    np.testing.assert_allclose(
        losses.cfm_loss(_field, path, None, x1, x0=x0, t=t, reduction="sum"),
        jnp.mean(jnp.sum(sq, 1)),
        rtol=1e-6,
    )
    per = losses.cfm_loss(_field, path, None, x1, x0=x0, t=t, reduction="none")
    np.testing.assert_allclose(per, jnp.mean(sq, 1), rtol=1e-6)


def test_cfm_loss_draws_x0_and_t_from_key_and_uses_time_sampler():
    path = paths.CondOT()
    _, x1, _ = _batch()
    key = jax.random.key(4)
    a = losses.cfm_loss(_field, path, key, x1)
    assert a == losses.cfm_loss(_field, path, key, x1)
    assert a != losses.cfm_loss(_field, path, jax.random.key(5), x1)
    seen = []

    def sampler(k, n):
        seen.append(n)
        return jnp.full((n,), 0.25)

    k0, _, _ = jax.random.split(key, 3)
    x0 = jax.random.normal(k0, x1.shape)
    np.testing.assert_allclose(
        losses.cfm_loss(_field, path, key, x1, time_sampler=sampler),
        losses.cfm_loss(_field, path, key, x1, x0=x0, t=jnp.full((8,), 0.25)),
        rtol=1e-6,
    )
    assert seen == [8]
    # VP trains on its safe range only
    t = losses.uniform_time(key, 10000, paths.VP().t_range)
    assert float(t.max()) <= 1 - 1e-5


def test_cfm_loss_is_zero_for_the_exact_field_of_one_point():
    # One data point x1 and sigma_min = 0: the marginal field is the conditional one, so a
    # model equal to it has zero loss for every x0, t.
    x1 = jnp.array([[1.0, -2.0]])
    path = paths.CondOT(sigma_min=0.1)

    def exact(t, x):
        return path.conditional_velocity(x, jnp.broadcast_to(x1, x.shape), t)

    data = jnp.broadcast_to(x1, (64, 2))
    assert float(losses.cfm_loss(exact, path, jax.random.key(0), data)) < 1e-10


def test_cfm_loss_images_and_grad():
    path = paths.CondOT(sigma_min=1e-3)
    x1 = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))

    def v(w, t, x):
        return w * x + t[:, None, None, None]

    g = jax.jit(
        jax.grad(lambda w: losses.cfm_loss(lambda t, x: v(w, t, x), path, jax.random.key(2), x1))
    )(0.3)
    eps = 1e-3
    fd = (
        losses.cfm_loss(lambda t, x: v(0.3 + eps, t, x), path, jax.random.key(2), x1)
        - losses.cfm_loss(lambda t, x: v(0.3 - eps, t, x), path, jax.random.key(2), x1)
    ) / (2 * eps)
    np.testing.assert_allclose(g, fd, rtol=1e-2)


def _cost(x0, x1):
    return float(jnp.sum((x0 - x1) ** 2))


@pytest.mark.parametrize("jit", [False, True], ids=["eager_host", "jit_callback"])
def test_exact_ot_is_optimal_against_all_permutations(jit):
    x0, x1, _ = _batch(n=6, d=2, seed=3)
    ot = functools.partial(couplings.minibatch_ot, method="exact")
    p0, _ = (jax.jit(ot) if jit else ot)(None, x0, x1)
    best = min(_cost(x0[np.array(p)], x1) for p in itertools.permutations(range(6)))
    np.testing.assert_allclose(_cost(p0, x1), best, rtol=1e-5)
    # it is a permutation: each x0 used once
    assert sorted(map(tuple, np.asarray(p0).round(6))) == sorted(
        map(tuple, np.asarray(x0).round(6))
    )


def test_ot_couplings_under_jit_and_sinkhorn_recovers_separated_matching():
    # x1 = x0 shifted a little: the optimal matching is the identity after a shuffle.
    x0 = jnp.arange(16.0).reshape(8, 2) * 3.0
    perm = jax.random.permutation(jax.random.key(0), 8)
    x1 = x0[perm] + 0.1
    p0, _ = jax.jit(lambda a, b: couplings.minibatch_ot(None, a, b))(x0, x1)
    np.testing.assert_allclose(p0, x0[perm])
    s0, _ = couplings.minibatch_ot(
        jax.random.key(1), x0, x1, method="sinkhorn", reg=0.001, num_iters=500
    )
    np.testing.assert_allclose(s0, x0[perm])
    plan = couplings.sinkhorn_plan(x0, x1, reg=0.5, threshold=1e-7)
    np.testing.assert_allclose(plan.sum(0), 1 / 8, rtol=1e-4)
    np.testing.assert_allclose(plan.sum(1), 1 / 8, rtol=1e-3)


def test_ot_coupling_lowers_transport_cost_in_the_loss():
    x0, x1, _ = _batch(n=64, d=2, seed=9)
    c_ind = _cost(*couplings.independent(None, x0, x1))
    c_ot = _cost(*couplings.get("ot")(None, x0, x1))
    assert c_ot < 0.9 * c_ind
    path = paths.CondOT()
    loss = losses.cfm_loss(_field, path, jax.random.key(0), x1, coupling="ot")
    assert jnp.isfinite(loss)


def test_grad_through_the_ot_coupling_matches_finite_differences():
    # Data through a linear map W: the exact OT pairing is piecewise constant in W, so for a
    # small step the loss (re-solving the assignment) is smooth and its finite difference is
    # the gradient with the pairing held fixed (it was: "Pure callbacks do not support JVP").
    x0, x1, t = _batch(n=8, d=2, seed=4)
    x0, x1, t = (np.asarray(a, np.float64) for a in (x0, x1, t))
    path = paths.CondOT()

    def loss(w, coupling):
        return losses.cfm_loss(
            lambda s, x: 0.5 * x, path, jax.random.key(0), x1 @ w, x0=x0, t=t, coupling=coupling
        )

    with jax.enable_x64():
        w = jnp.eye(2, dtype=jnp.float64) + 0.1
        for coupling in ("ot", "ot_sinkhorn", "independent"):
            g = jax.grad(loss)(w, coupling)
            eps = 1e-6
            fd = np.zeros((2, 2))
            for i, j in itertools.product(range(2), range(2)):
                dw = jnp.zeros((2, 2), jnp.float64).at[i, j].set(eps)
                fd[i, j] = (loss(w + dw, coupling) - loss(w - dw, coupling)) / (2 * eps)
            np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9, err_msg=coupling)
        # the OT pairing is not the identity here, so the test differs from "independent"
        assert not np.allclose(jax.grad(loss)(w, "ot"), jax.grad(loss)(w, "independent"))


@pytest.mark.parametrize("method", ["exact", "sinkhorn"])
def test_ot_of_non_finite_data_says_so_or_gives_nan(method):
    x0, x1, _ = _batch()
    key = jax.random.key(0)
    msg = "OT coupling: the squared-distance cost has non-finite entries, so x0 or x1 holds"
    for bad in ((x0, x1.at[1, 0].set(jnp.nan)), (x0.at[3, 2].set(jnp.inf), x1)):
        # eagerly: a plain ValueError before any pairing is made
        with pytest.raises(ValueError, match=msg):
            couplings.minibatch_ot(key, *bad, method=method)
        ot = jax.jit(functools.partial(couplings.minibatch_ot, method=method))
        if method == "exact":  # the host callback raises the same message
            with pytest.raises(Exception, match=msg):
                jax.block_until_ready(ot(key, *bad))
        else:  # no arbitrary pairing: the NaN reaches the pairs (and so the loss)
            assert np.all(np.isnan(ot(key, *bad)[0]))
    # finite data under jit: no NaN
    assert np.all(
        np.isfinite(
            jax.jit(functools.partial(couplings.minibatch_ot, method=method))(key, x0, x1)[0]
        )
    )


def test_bad_inputs():
    path = paths.CondOT()
    x0, x1, t = _batch()
    with pytest.raises(ValueError, match="reduction must be one of"):
        losses.cfm_loss(_field, path, None, x1, x0=x0, t=t, reduction="max")
    with pytest.raises(ValueError, match="x1 must be a batch"):
        losses.cfm_loss(_field, path, None, x1[0], x0=x0[0], t=t[0])
    with pytest.raises(ValueError, match=r"t must have shape \(8,\)"):
        losses.cfm_loss(_field, path, None, x1, x0=x0, t=t[:3])
    with pytest.raises(ValueError, match="x0 must have x1's shape"):
        losses.cfm_loss(_field, path, jax.random.key(0), x1, x0=x0[:, :2])
    with pytest.raises(ValueError, match="PRNG key"):
        losses.cfm_loss(_field, path, None, x1)
    with pytest.raises(ValueError, match="PRNG key"):  # a custom coupling gets a key
        losses.cfm_loss(_field, path, None, x1, x0=x0, t=t, coupling=couplings.independent)
    # the named couplings are deterministic: no key needed
    assert jnp.isfinite(losses.cfm_loss(_field, path, None, x1, x0=x0, t=t, coupling="ot_sinkhorn"))
    assert jnp.isfinite(losses.cfm_loss(_field, path, None, x1, x0=x0, t=t, coupling="ot"))
    with pytest.raises(ValueError, match=r"x1 must be floating point .*; got dtype int32"):
        losses.cfm_loss(_field, path, None, x1.astype(jnp.int32), x0=x0, t=t)
    with pytest.raises(ValueError, match="must return x's shape"):
        losses.fm_loss(
            lambda t, x: x[:, :1],
            path,
            None,
            x1,
            fmjax.marginals.GaussianMixture.create(jnp.zeros((1, 3)), 1.0),
            x0=x0,
            t=t,
        )
    with pytest.raises(ValueError, match="must return x's shape"):
        losses.cfm_loss(lambda t, x: x[:, :1], path, None, x1, x0=x0, t=t)
    with pytest.raises(ValueError, match=r"t must lie in \[0.0, 1.0\]"):
        losses.cfm_loss(_field, path, None, x1, x0=x0, t=t + 2)
    with pytest.raises(ValueError, match="unknown coupling"):
        couplings.get("sinkhorn")
    with pytest.raises(ValueError, match="same shape"):
        couplings.minibatch_ot(None, x0, x1[:4])
    with pytest.raises(ValueError, match="method must be"):
        couplings.minibatch_ot(None, x0, x1, method="greedy")
    assert fmjax.losses is losses


# --- conditional models: cfm_loss(cond=...) ---------------------------------------------

CENTERS = jnp.array([[-2.0, 1.0], [3.0, 0.5], [0.0, -4.0]])


def _x1_predictor(t, x, y):
    """The exact E[x1 | x_t, y] of data that sit at CENTERS[y]: the class centre itself."""
    del t
    return jnp.broadcast_to(CENTERS[y], x.shape)


@pytest.mark.parametrize("coupling", [None, "ot", "ot_sinkhorn"])
def test_conditions_stay_with_their_data_points(coupling):
    # a one-point class per label: the exact conditional predictor has zero loss exactly when
    # every x1 row meets its own label, whatever x0 the coupling pairs it with
    y = jnp.array([0, 1, 2, 2, 1, 0, 1, 2], jnp.int32)
    x1, key = CENTERS[y], jax.random.key(3)
    path = paths.CondOT(sigma_min=1e-3)
    loss = losses.cfm_loss(_x1_predictor, path, key, x1, cond=y, coupling=coupling, prediction="x1")
    assert float(loss) < 1e-10
    wrong = losses.cfm_loss(
        _x1_predictor, path, key, x1, cond=jnp.roll(y, 1), coupling=coupling, prediction="x1"
    )
    assert float(wrong) > 1.0
    # the same loss as the field with its conditions closed over, for x1 and velocity models
    # (with the labels given to the coupling too: the OT couplings pair within each class)
    v = path.velocity_field(_x1_predictor, "x1")  # a conditional v(t, x, cond)
    labelled = coupling and functools.partial(couplings.get(coupling), cond=y)
    for f, prediction in ((_x1_predictor, "x1"), (v, "velocity")):
        given = losses.cfm_loss(f, path, key, x1, cond=y, coupling=coupling, prediction=prediction)
        closed = losses.cfm_loss(
            lambda t, x, f=f: f(t, x, y), path, key, x1, coupling=labelled, prediction=prediction
        )
        np.testing.assert_allclose(given, closed, rtol=1e-6)


def test_conditional_loss_gradients_and_errors():
    y = jnp.array([0, 1, 2, 1], jnp.int32)
    x1 = CENTERS[y]

    def model(w, t, x, c):  # learns one vector per class
        return jnp.broadcast_to(w[c], x.shape)

    path = paths.CondOT(sigma_min=1e-3)
    g = jax.grad(
        lambda w: losses.cfm_loss(
            functools.partial(model, w), path, jax.random.key(0), x1, cond=y, prediction="x1"
        )
    )(jnp.zeros((3, 2)))
    # d/dw_k mean_i,d (w_y_i - x1_i)^2 = -2 sum_{i: y_i = k} CENTERS[k] / (4 * 2)
    counts = jnp.array([1.0, 2.0, 1.0])[:, None]
    np.testing.assert_allclose(g, -2 * counts * CENTERS / 8, rtol=1e-6)
    with pytest.raises(
        ValueError,
        match=r"cfm_loss: every array of cond must have the batch's "
        r"leading size 4",
    ):
        losses.cfm_loss(_x1_predictor, path, jax.random.key(0), x1, cond=y[:3])

    def reorders(key, x0, x1):
        return x0, x1[::-1]

    with pytest.raises(ValueError, match="the coupling .* returned a new x1"):
        losses.cfm_loss(_x1_predictor, path, jax.random.key(0), x1, cond=y, coupling=reorders)
    # without conditions a custom coupling may re-pair x1 too
    losses.cfm_loss(lambda t, x: x, path, jax.random.key(0), x1, coupling=reorders)
