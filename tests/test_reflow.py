"""fmjax.reflow: the exact flow of Gaussian data, rectified once, is a fixed point.

The CondOT (sigma_min = 0) flow from N(0, I) to N(M, S^2 I) is curved for every S > 0 (its
trajectories ``t M + sqrt((1 - t)^2 + t^2 S^2) x0`` are not lines), so it is not itself
straight; its reflow pairs are the affine map M + S x0, whose lines never cross:
the rectified field is straight and reflowing it returns the same pairs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmjax
from fmjax import reflow
from fmjax.metrics import efficiency

M = jnp.array([1.0, -2.0])
S = 0.5


def exact_field(t, x):
    """The marginal field of CondOT(sigma_min=0) from N(0, I) to N(M, S^2 I): its flow maps
    x0 to M + S x0 along x_t = t M + sqrt((1 - t)^2 + t^2 S^2) x0, a curve."""
    data = fmjax.marginals.GaussianMixture.create(M[None], S)
    return data.velocity(fmjax.paths.CondOT(sigma_min=0.0), x, t)


def rectified_field(a, c):
    """The exact field of the deterministic coupling x1 = A x0 + c under the linear path:
    along x_t = ((1 - t) I + t A) x0 + t c it is x1 - x0 = (A - I) x0 + c."""

    def v(t, x):
        def one(t, x):
            x0 = jnp.linalg.solve((1.0 - t) * jnp.eye(2) + t * a, x - t * c)
            return (a - jnp.eye(2)) @ x0 + c

        return jax.vmap(one)(t, x)

    return jax.tree_util.Partial(v)


@pytest.fixture(scope="module")
def first_round():
    x0 = jax.random.normal(jax.random.key(0), (256, 2))
    return reflow.pairs(jax.tree_util.Partial(exact_field), x0, rtol=1e-6, atol=1e-6)


def test_rectified_gaussian_flow_is_a_fixed_point(first_round):
    x0, x1 = first_round
    # the pairs of the exact (curved) flow are its transport map M + S x0
    np.testing.assert_allclose(x1, M + S * x0, atol=2e-4)
    # the coupling, read from the pairs: x1 = A x0 + c by least squares
    sol, *_ = jnp.linalg.lstsq(jnp.concatenate([x0, jnp.ones((x0.shape[0], 1))], 1), x1)
    v1 = rectified_field(sol[:2].T, sol[2])
    flow = efficiency.straightness(v1, x0, rtol=1e-6, atol=1e-6)
    assert float(flow.straightness) < 1e-7  # straight: 0 to solver accuracy
    cost = float(jnp.mean(jnp.sum((x1 - x0) ** 2, 1)))
    assert float(flow.transport_cost) == pytest.approx(cost, rel=1e-4)
    np.testing.assert_allclose(flow.x1, x1, atol=2e-4)  # reflowing it returns the same pairs
    # on the fly, through couplings.pairing: a straight flow at constant speed is solved
    # exactly by one Euler step
    prepare = fmjax.couplings.pairing(
        reflow.coupling(v1, solver="euler", steps=1), source=lambda k, shape, dtype: x0
    )
    batch = prepare(jax.random.key(1), {"x1": jnp.zeros_like(x0)})
    np.testing.assert_array_equal(batch["x0"], x0)
    np.testing.assert_allclose(batch["x1"], x1, atol=2e-4)
    # and it is the minimiser of the CFM loss on its pairs: the loss is 0
    loss = fmjax.losses.cfm_loss(
        v1, fmjax.paths.rectified_flow(), jax.random.key(2), batch["x1"], x0=batch["x0"]
    )
    assert float(loss) < 1e-8
    # (one Euler step of the exact curved flow is far from its pairs)
    euler, _ = fmjax.sample(exact_field, x0, solver="euler", steps=1)
    assert float(jnp.max(jnp.abs(euler - x1))) > 0.1


# one-step distillation: an affine field fitted to affine pairs, where everything is closed form


def affine(w, b, c):
    """``v(t, x) = W x + b + t c``: the loss is quadratic in ``(W, b, c)``."""
    return lambda t, x: x @ w.T + b + t[:, None] * c


@pytest.fixture(scope="module")
def noisy_pairs():
    k0, k1 = jax.random.split(jax.random.key(3))
    x0 = jax.random.normal(k0, (512, 2))
    a = jnp.array([[0.5, -1.0], [2.0, 0.3]])
    x1 = x0 @ a.T + M + 0.1 * jax.random.normal(k1, x0.shape)
    return x0, x1


def test_distillation_minimiser_is_least_squares_and_the_loss_is_its_residual(noisy_pairs):
    x0, x1 = noisy_pairs
    t0, t1 = 0.25, 0.75
    dt = t1 - t0
    # the minimiser: regress (x1 - x0) / dt on (x0, 1), in float64
    xa = np.concatenate([np.asarray(x0, np.float64), np.ones((x0.shape[0], 1))], 1)
    y = (np.asarray(x1, np.float64) - np.asarray(x0, np.float64)) / dt
    sol, *_ = np.linalg.lstsq(xa, y, rcond=None)
    w, b = jnp.asarray(sol[:2].T, jnp.float32), jnp.asarray(sol[2], jnp.float32)
    c = jnp.zeros(2)
    residual = float(np.mean(np.sum((dt * (xa @ sol - y)) ** 2, 1)))

    def loss(w, b, c):
        return reflow.distillation_loss(affine(w, b, c), x0, x1, t0=t0, t1=t1)

    assert float(loss(w, b, c)) == pytest.approx(residual, rel=1e-4)
    for g in jax.grad(loss, argnums=(0, 1))(w, b, c):  # stationary at the minimiser
        np.testing.assert_allclose(g, 0.0, atol=2e-4)
    # away from it the loss grows by the perturbation's own squared norm (the residual is
    # orthogonal to the affine functions of x0); t0 enters through c
    dw, db, dc = (
        jnp.array([[0.1, 0.0], [-0.2, 0.05]]),
        jnp.array([0.3, -0.1]),
        jnp.array([1.0, 2.0]),
    )
    extra = float(jnp.mean(jnp.sum((dt * (x0 @ dw.T + db + t0 * dc)) ** 2, 1)))
    assert float(loss(w + dw, b + db, c + dc)) == pytest.approx(residual + extra, rel=1e-4)


def test_distillation_of_exact_pairs_is_zero_at_the_one_step_field(first_round):
    # the Gaussian flow's pairs x1 = M + S x0: one Euler step of (M + (S - 1) x) lands on them
    x0, x1 = first_round
    v = jax.tree_util.Partial(lambda t, x: M + (S - 1.0) * x)
    assert float(reflow.distillation_loss(v, x0, x1)) < 1e-7
    # the exact (curved) field itself, read at t = 0, does not
    assert float(reflow.distillation_loss(jax.tree_util.Partial(exact_field), x0, x1)) > 0.1


@pytest.mark.parametrize(
    "x1_shape, times, message",
    [
        ((4, 3), (0.0, 1.0), "x0 and x1 must have the same shape"),
        ((4, 2), (1.0, 1.0), "t1 > t0"),
        ((4, 2), (0.0, float("nan")), "t1"),
    ],
)
def test_distillation_loss_refuses_bad_input(x1_shape, times, message):
    v = jax.tree_util.Partial(lambda t, x: x)
    with pytest.raises(ValueError, match=message):
        reflow.distillation_loss(
            v, jnp.zeros((4, 2)), jnp.zeros(x1_shape), t0=times[0], t1=times[1]
        )
