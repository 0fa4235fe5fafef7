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
