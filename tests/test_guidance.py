"""Classifier-free guidance, checked against closed forms.

Class y's data is N(m_y, s^2 I) and the null class's N(m_null, s^2 I). Under CondOT with
sigma_min the exact marginal field of N(m, s^2 I) is affine in m with an x-coefficient that
does not depend on m, so the guided field with weight w is exactly the field of
N(m_w, s^2 I), m_w = (1 - w) m_null + w m_y, whose flow maps x0 to
m_w + sqrt(sigma_min^2 + s^2) x0 at t = 1.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmjax
from fmjax import guidance, marginals, paths

SIGMA_MIN, STD = 0.05, 0.3
MEANS = jnp.array([[2.0, -1.0], [-1.5, 0.5], [0.0, 3.0], [1.0, 1.0]])  # 3 classes + null
NULL = 3
PATH = paths.CondOT(sigma_min=SIGMA_MIN)


def _class_field(t, x, y):
    """Exact marginal field of the data of class y (row by row), from fmjax.marginals."""
    per_class = jnp.stack(
        [
            marginals.GaussianMixture(MEANS[k : k + 1], jnp.array([STD]), jnp.ones(1)).velocity(
                PATH, x, t
            )
            for k in range(MEANS.shape[0])
        ]
    )  # (K + 1, B, D)
    return jnp.take_along_axis(per_class, y[None, :, None], axis=0)[0]


def _flow_end(w, y, x0):
    w = jnp.reshape(jnp.asarray(w, jnp.float32), (-1, 1))
    m_w = (1 - w) * MEANS[NULL] + w * MEANS[y]
    return m_w + np.sqrt(SIGMA_MIN**2 + STD**2) * x0


@pytest.mark.parametrize("batched", [True, False], ids=["one_call_2B", "two_calls"])
@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5, -0.5, "per_example"])
def test_guided_samples_land_where_the_closed_form_says(scale, batched):
    key = jax.random.key(0)
    y = jnp.array([0, 1, 2, 0, 1, 2], jnp.int32)
    x0 = jax.random.normal(key, (6, 2))
    if scale == "per_example":
        scale = jnp.array([0.0, 1.0, 2.0, 3.0, 1.5, -1.0])
    v = guidance.classifier_free(_class_field, y, NULL, scale, batched=batched)
    x1, stats = fmjax.sample(v, x0, solver="dopri5", rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(x1, _flow_end(scale, y, x0), atol=2e-4)
    assert int(stats.nfe) > 0
    # w = 1 is the conditional model's own sampler, w = 0 the unconditional one
    if isinstance(scale, float) and scale in (0.0, 1.0):
        cond = y if scale == 1.0 else jnp.full_like(y, NULL)
        x1_plain, _ = fmjax.sample(
            lambda t, x: _class_field(t, x, cond), x0, solver="dopri5", rtol=1e-6, atol=1e-6
        )
        np.testing.assert_allclose(x1, x1_plain, atol=1e-6)


def test_guiding_any_prediction_gives_the_same_field():
    # (1 - w) a + w b has weights summing to one, and convert is affine in the prediction
    key = jax.random.key(1)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    x = jax.random.normal(k1, (5, 3))
    t = jax.random.uniform(k2, (5,), minval=0.1, maxval=0.9)
    v_c, v_u = jax.random.normal(k3, (5, 3)), jax.random.normal(k4, (5, 3))
    w = 3.0
    for path in (paths.CondOT(sigma_min=1e-3), paths.VP(), paths.VE()):
        for dst in ("x1", "eps", "score"):

            def conv(v, path=path, dst=dst):
                return path.convert(v, x, t, src="velocity", dst=dst)

            np.testing.assert_allclose(
                conv(v_u + w * (v_c - v_u)),
                conv(v_u) + w * (conv(v_c) - conv(v_u)),
                rtol=1e-4,
                atol=1e-4,
                err_msg=f"{path} {dst}",
            )


def test_number_of_model_calls_and_rows():
    calls = []

    def v(t, x, y):
        calls.append((x.shape[0], np.asarray(y).tolist()))
        return x * y[:, None]

    x, t, y = jnp.ones((3, 2)), jnp.zeros(3), jnp.array([1.0, 2.0, 3.0])
    guidance.classifier_free(v, y, 0.0, 2.0)(t, x)
    assert calls == [(6, [1.0, 0.0, 2.0, 0.0, 3.0, 0.0])]  # one call, rows interleaved
    calls.clear()
    guidance.classifier_free(v, y, 0.0, 2.0, batched=False)(t, x)
    assert calls == [(3, [1.0, 2.0, 3.0]), (3, [0.0, 0.0, 0.0])]
    calls.clear()
    np.testing.assert_allclose(guidance.classifier_free(v, y, 0.0, 1.0)(t, x), v(t, x, y))
    np.testing.assert_allclose(guidance.classifier_free(v, y, 0.0, 0)(t, x), 0.0)
    assert [c[0] for c in calls] == [3, 3, 3]  # one evaluation of B rows each, plus v's own


def test_pytree_conditions_and_per_example_null():
    def v(t, x, c):
        return x * c["scale"][:, None] + c["shift"]

    x, t = jnp.ones((2, 2)), jnp.zeros(2)
    cond = {"scale": jnp.array([2.0, 3.0]), "shift": jnp.array([[1.0, 1.0], [0.0, 0.0]])}
    null = {"scale": jnp.array([0.0, 1.0]), "shift": jnp.zeros(2)}  # per row / broadcast row
    out = guidance.classifier_free(v, cond, null, 0.5)(t, x)
    np.testing.assert_allclose(out, [[1.5, 1.5], [2.0, 2.0]])


def test_guided_solves_compile_once_for_any_weights_and_labels():
    traces = []

    def v(t, x, y):
        traces.append(1)
        return _class_field(t, x, y)

    x0 = jax.random.normal(jax.random.key(2), (4, 2))
    f = jax.tree_util.Partial(v)
    for w, y in ((2.0, [0, 1, 2, 0]), (3.0, [2, 2, 1, 0]), (0.5, [1, 1, 1, 1])):
        y = jnp.array(y, jnp.int32)
        fmjax.sample(guidance.classifier_free(f, y, NULL, w), x0, solver="euler", steps=4)
        if w == 2.0:
            n_first = len(traces)
    assert len(traces) == n_first  # later weights and labels reused the compiled solve


def test_bad_guidance_arguments():
    x, t, y = jnp.ones((3, 2)), jnp.zeros(3), jnp.arange(3)
    v = _class_field
    for bad in (True, "2", float("nan"), float("inf"), None):
        with pytest.raises(ValueError, match="scale"):
            guidance.classifier_free(v, y, NULL, bad)
    with pytest.raises(ValueError, match="scale must be finite"):
        guidance.classifier_free(v, y, NULL, jnp.array([1.0, jnp.nan, 2.0]))
    with pytest.raises(ValueError, match="scale must be a scalar or one weight per example"):
        guidance.classifier_free(v, y, NULL, jnp.ones(2))(t, x)
    with pytest.raises(ValueError, match="cond must have the batch's leading size 3"):
        guidance.classifier_free(v, jnp.arange(4), NULL, 2.0)(t, x)
    with pytest.raises(ValueError, match="cond must have the batch's leading size 3"):
        guidance.classifier_free(v, jnp.arange(4), NULL, 1.0)(t, x)
    for w in (2.0, 1.0):  # a cond fixed in the field: the error says to give it to the solve
        with pytest.raises(
            ValueError,
            match=r"per_example=True\) calls the field on one row"
            r".*fmjax.sample\(v, x0, cond=cond, per_example=True\)",
        ):
            fmjax.sample(guidance.classifier_free(v, y, NULL, w), x, per_example=True)
    with pytest.raises(
        ValueError,
        match=r"shape \(1,\); got shape \(3,\).*per-example "
        "weights need the batch-wide step control",
    ):
        fmjax.sample(
            guidance.classifier_free(v, None, NULL, jnp.ones(3)), x, cond=y, per_example=True
        )
    with pytest.raises(ValueError, match="null_cond must have cond's tree structure"):
        guidance.classifier_free(v, None, jnp.zeros(2), 2.0)(t, x, y)
    with pytest.raises(ValueError, match="null_cond must have cond's tree structure"):
        guidance.classifier_free(v, y, jnp.zeros(2), 2.0)
    with pytest.raises(ValueError, match="null_cond must be an array or a pytree of arrays"):
        guidance.classifier_free(v, None, None, 2.0)
    with pytest.raises(ValueError, match="cond has no arrays"):
        guidance.classifier_free(v, {}, {}, 2.0)(t, x)
    with pytest.raises(ValueError, match="v must be a callable"):
        guidance.classifier_free("model", y, NULL, 2.0)
    with pytest.raises(ValueError, match="batched must be True or False"):
        guidance.classifier_free(v, y, NULL, 2.0, batched=1)
    with pytest.raises(ValueError, match=r"must return x's shape with 6 rows, \(6, 2\)"):
        guidance.classifier_free(lambda t, x, c: x[:1], y, NULL, 2.0)(t, x)


def test_guidance_benchmark_smoke_run(monkeypatch, capsys):
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location(
        "guidance_bench", f"{ROOT}/benchmarks/guidance.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "MODELS", {"tiny": (8, 1, 16, "euler", 3)})
    bench.main(["--rounds", "1"])
    out = capsys.readouterr().out
    assert "tiny: 8 x 1 hidden, 16 points, euler x 3 steps" in out
    for label in ("unguided (w = 1)", "one call of 2B rows", "two calls of B rows"):
        assert label in out and "x unguided" in out


def test_conditional_fixes_each_examples_condition():
    def v(t, x, c):
        return x * c[:, None] + t[:, None]

    x, t, c = jnp.ones((3, 2)), jnp.full((3,), 0.5), jnp.array([1.0, 2.0, 3.0])
    f = guidance.conditional(v, c)
    assert isinstance(f, jax.tree_util.Partial)
    np.testing.assert_allclose(f(t, x), v(t, x, c))
    # a flow conditioned on c: dx/dt = c x from x0 = 1 ends at exp(c)
    x1, _ = fmjax.sample(
        guidance.conditional(lambda t, x, c: x * c[:, None], c),
        jnp.ones((3, 1)),
        rtol=1e-7,
        atol=1e-7,
    )
    np.testing.assert_allclose(x1[:, 0], np.exp(c), rtol=1e-5)
    with pytest.raises(ValueError, match="conditional field: every array of cond must have"):
        guidance.conditional(v, c[:2])(t, x)
    with pytest.raises(ValueError, match="v must be a callable"):
        guidance.conditional(None, c)


# --- conditions given to the solve: fmjax.sample / log_likelihood(cond=...) ----------------

Y6 = jnp.array([0, 1, 2, 0, 1, 2], jnp.int32)


@pytest.mark.parametrize("per_example", [False, True], ids=["batch_steps", "per_example"])
@pytest.mark.parametrize("scale", [1.0, 0.0, 2.5, "array"])
def test_conditions_given_to_the_solve_land_on_the_closed_form(scale, per_example):
    x0 = jax.random.normal(jax.random.key(4), (6, 2))
    if scale == 1.0:  # the conditional field itself
        v, w = _class_field, 1.0
    else:  # a traced scalar weight takes the general path (two evaluations)
        w = 1.7 if scale == "array" else scale
        v = guidance.classifier_free(
            _class_field, None, NULL, jnp.asarray(w) if scale == "array" else w
        )
    x1, stats = fmjax.sample(v, x0, cond=Y6, per_example=per_example, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(x1, _flow_end(w, Y6, x0), atol=1e-4)
    if per_example:  # each row its own solve with its own condition: as if solved alone
        assert stats.nfe.shape == (6,) and len(set(np.asarray(stats.nfe).tolist())) > 1
        for i in (0, 4):
            xi, _ = fmjax.sample(v, x0[i : i + 1], cond=Y6[i : i + 1], rtol=1e-6, atol=1e-6)
            # (the vmapped solve's error estimates differ in the last bits from the solo
            # solve's, which can move an accept/reject decision: equal to the tolerance)
            np.testing.assert_allclose(x1[i], xi[0], atol=1e-5)


def test_batched_and_two_call_guidance_agree_with_conditions_given_to_the_solve():
    x0 = jax.random.normal(jax.random.key(5), (6, 2))
    out = [
        fmjax.sample(
            guidance.classifier_free(_class_field, None, NULL, 3.0, batched=b),
            x0,
            cond=Y6,
            per_example=True,
            rtol=1e-6,
            atol=1e-6,
        )[0]
        for b in (True, False)
    ]
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)
    np.testing.assert_allclose(out[0], _flow_end(3.0, Y6, x0), atol=1e-4)


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_conditional_log_likelihood_is_the_class_density(divergence):
    # p_1(x | y) = N(m_y, (s^2 + sigma_min^2) I): the data convolved with the path's N(0,
    # sigma_min^2); Hutchinson with Rademacher probes is exact for a diagonal Jacobian
    x = jax.random.normal(jax.random.key(6), (6, 2)) * 0.4 + MEANS[Y6]
    var = STD**2 + SIGMA_MIN**2
    expected = -0.5 * jnp.sum((x - MEANS[Y6]) ** 2, axis=1) / var - jnp.log(2 * jnp.pi * var)
    logp, _ = fmjax.log_likelihood(
        _class_field, x, cond=Y6, divergence=divergence, key=jax.random.key(0), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(logp, expected, atol=2e-4)
    same, _ = fmjax.log_likelihood(
        guidance.conditional(_class_field, Y6),
        x,
        rtol=1e-6,
        atol=1e-6,
        divergence=divergence,
        key=jax.random.key(0),
    )
    np.testing.assert_allclose(logp, same, atol=1e-6)


def test_pytree_conditions_go_row_by_row():
    def v(t, x, c):  # dx/dt = a x + b: x(1) = (x0 + b/a) e^a - b/a
        return x * c["a"][:, None] + c["b"]

    cond = {"a": jnp.array([0.5, -1.0, 2.0]), "b": jnp.array([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]])}
    x0 = jnp.ones((3, 2))
    a = cond["a"][:, None]
    expected = (x0 + cond["b"] / a) * jnp.exp(a) - cond["b"] / a
    for per_example in (False, True):
        x1, _ = fmjax.sample(v, x0, cond=cond, per_example=per_example, rtol=1e-7, atol=1e-7)
        np.testing.assert_allclose(x1, expected, rtol=1e-5)


def test_new_conditions_reuse_the_compiled_solve():
    traces = []

    def v(t, x, y):
        traces.append(1)
        return _class_field(t, x, y)

    f, x0 = jax.tree_util.Partial(v), jnp.zeros((6, 2))
    ends = [fmjax.sample(f, x0, cond=Y6, solver="euler", steps=3)[0]]
    n = len(traces)  # the traces of the first (compiling) call
    for y in (Y6[::-1], jnp.zeros(6, jnp.int32)):
        ends.append(fmjax.sample(f, x0, cond=y, solver="euler", steps=3)[0])
    assert len(traces) == n
    assert float(jnp.abs(ends[0] - ends[1]).max()) > 0.1  # the conditions did change


def test_bad_conditions_given_to_the_solve():
    x = jnp.ones((6, 2))
    with pytest.raises(
        ValueError,
        match=r"fmjax.sample: every array of cond must have the "
        r"batch's leading size 6 .*got shape \(3,\)",
    ):
        fmjax.sample(_class_field, x, cond=Y6[:3])
    with pytest.raises(ValueError, match="fmjax.log_likelihood: every array of cond"):
        fmjax.log_likelihood(_class_field, x, cond={"y": Y6, "z": jnp.zeros((5, 1))})
    with pytest.raises(ValueError, match=r"leaf of type int .*np.asarray"):
        fmjax.sample(_class_field, x, cond=[0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match="cond has no arrays"):
        fmjax.sample(_class_field, x, cond={})
    with pytest.raises(TypeError):  # an unconditional field given a condition
        fmjax.sample(lambda t, x: -x, x, cond=Y6)
