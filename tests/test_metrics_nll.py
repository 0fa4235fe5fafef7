"""Bits/dim of images under K-sample dequantization (fmjax.metrics.nll) against closed forms.

With the zero vector field the flow is the identity, so p = the standard normal base exactly
and log p(x + u) is analytic; Hutchinson is exact too (the divergence is 0 for any probe). A
linear field v = a x has divergence a D (Rademacher probes: exact as well) and latent
x e^{-a}.
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

import fmjax
from fmjax.metrics import nll

BIN = 2.0 / 256.0


def _field(params, t, x):
    """a x + c tanh(2 x) (1 + t): one Python function for every test field, so the fields
    differ only in array leaves and share one compilation per shape and setting."""
    a, c = params
    return a * x + c * jnp.tanh(2.0 * x) * (1.0 + t)[:, None, None, None]


def field(a, c):
    return jax.tree_util.Partial(_field, (jnp.float32(a), jnp.float32(c)))


zero_field = field(0.0, 0.0)
A = -0.7
linear_field = field(A, 0.0)
tanh_field = field(0.0, 1.0)


def quantized(rng, shape):
    return (2.0 * rng.integers(0, 256, size=shape) / 256.0 - 1.0).astype(np.float32)


def closed_form_bpd(x, u, *, scale=1.0, div=0.0):
    """bpd of the K-sample bound for a flow whose latent is scale * y and log-det term div.

    x: (B, *event) levels, u: (B, K, *event) noise; log p(y) = log N(scale y) - div.
    """
    x = np.asarray(x, np.float64)
    u = np.asarray(u, np.float64)
    b, k = u.shape[:2]
    d = x[0].size
    y = (x[:, None] + u).reshape(b, k, d) * scale
    logp = -0.5 * np.sum(y * y, axis=2) - 0.5 * d * math.log(2 * math.pi) - div
    logp_iw = logsumexp(logp, axis=1) - math.log(k)
    return -logp_iw / (d * math.log(2.0)) + 7.0


# ----------------------------------------------------------------------------- image_bpd


def test_noise_derivation_and_range():
    key = jax.random.key(3)
    keys = nll.example_keys(key, jnp.arange(2))
    u = np.asarray(nll.dequantization_noise(keys, (4, 4, 3), 3, BIN))
    assert u.shape == (2, 3, 4, 4, 3)
    assert u.min() >= 0.0 and u.max() < BIN
    # The documented derivation, written out by hand.
    ek = jax.random.fold_in(key, 1)
    nk, _ = jax.random.split(jax.random.fold_in(ek, 2))
    np.testing.assert_array_equal(u[1, 2], BIN * np.asarray(jax.random.uniform(nk, (4, 4, 3))))
    # Raw uint32 keys give the same noise as typed ones.
    u_raw = nll.dequantization_noise(jax.random.key_data(keys), (4, 4, 3), 3, BIN)
    np.testing.assert_array_equal(u, np.asarray(u_raw))


K = 3


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_zero_and_linear_fields_match_closed_form(divergence):
    rng = np.random.default_rng(0)
    x = quantized(rng, (3, 4, 4, 3))
    key = jax.random.key(7)
    u = nll.dequantization_noise(nll.example_keys(key, jnp.arange(3)), x.shape[1:], K, BIN)
    # v = 0: p is the standard normal base; the K-sample bound and the +7 of [-1, 1] data.
    bpd, nfe = nll.image_bpd(zero_field, x, key, num_dequant=K, divergence=divergence)
    np.testing.assert_allclose(np.asarray(bpd), closed_form_bpd(x, u), rtol=1e-5, atol=1e-5)
    assert bpd.shape == (3,) and float(nfe) > 0
    # v = a x: back from t=1 to t=0 the latent is y e^{-a}, and log p(y) = log N(latent) - a D.
    bpd, _ = nll.image_bpd(linear_field, x, key, num_dequant=K, divergence=divergence)
    expected = closed_form_bpd(x, u, scale=math.exp(-A), div=A * x[0].size)
    np.testing.assert_allclose(np.asarray(bpd), expected, rtol=1e-4)


@pytest.mark.parametrize("s0", [0.5, 3.0])
def test_source_std_scores_against_the_scaled_gaussian(s0):
    # A flow from N(0, s0^2 I): log p(y) = log N(y / s0) - D log s0 for v = 0, and with
    # v = a x the latent y e^{-a} gives log N(y e^{-a} / s0) - D (a + log s0).
    rng = np.random.default_rng(2)
    x = quantized(rng, (3, 4, 4, 3))
    key = jax.random.key(7)
    d = x[0].size
    u = nll.dequantization_noise(nll.example_keys(key, jnp.arange(3)), x.shape[1:], K, BIN)
    bpd, _ = nll.image_bpd(zero_field, x, key, num_dequant=K, source_std=s0)
    np.testing.assert_allclose(
        np.asarray(bpd), closed_form_bpd(x, u, scale=1 / s0, div=d * math.log(s0)), rtol=1e-5
    )
    bpd, _ = nll.image_bpd(linear_field, x, key, num_dequant=K, source_std=s0, divergence="exact")
    np.testing.assert_allclose(
        np.asarray(bpd),
        closed_form_bpd(x, u, scale=math.exp(-A) / s0, div=d * (A + math.log(s0))),
        rtol=1e-4,
    )


def test_time_span_scores_the_flow_over_that_span():
    # v = a x solved over [t0, t1]: the latent is y e^{-a (t1 - t0)} and the log-det term
    # a D (t1 - t0) (a model that predicts eps is a velocity only over such a span)
    rng = np.random.default_rng(5)
    x = quantized(rng, (3, 4, 4, 3))
    key = jax.random.key(7)
    u = nll.dequantization_noise(nll.example_keys(key, jnp.arange(3)), x.shape[1:], K, BIN)
    t0, t1 = 0.25, 0.9
    bpd, _ = nll.image_bpd(linear_field, x, key, num_dequant=K, t0=t0, t1=t1)
    span = t1 - t0
    np.testing.assert_allclose(
        np.asarray(bpd),
        closed_form_bpd(x, u, scale=math.exp(-A * span), div=A * x[0].size * span),
        rtol=1e-4,
    )


def test_bound_equals_direct_log_likelihood_per_sample():
    """Each of the K samples is fmjax.log_likelihood at x + u_k with probes from its key."""
    rng = np.random.default_rng(1)
    x = quantized(rng, (3, 4, 4, 3))
    key = jax.random.key(11)
    bpd, _ = nll.image_bpd(tanh_field, x, key, num_dequant=K)
    d = x[0].size
    for i in range(3):
        ek = jax.random.fold_in(key, i)
        logps = []
        for k in range(K):
            nk, pk = jax.random.split(jax.random.fold_in(ek, k))
            y = x[i] + BIN * jax.random.uniform(nk, x.shape[1:])
            logp, _ = fmjax.log_likelihood(tanh_field, y[None], divergence="hutchinson", key=pk)
            logps.append(float(logp[0]))
        ref = -(logsumexp(logps) - math.log(K)) / (d * math.log(2.0)) + 7.0
        np.testing.assert_allclose(float(bpd[i]), ref, rtol=1e-6)


def test_per_example_results_do_not_depend_on_the_batch():
    rng = np.random.default_rng(4)
    x = quantized(rng, (3, 4, 4, 3))
    other = quantized(rng, (3, 4, 4, 3))
    keys = nll.example_keys(jax.random.key(0), jnp.array([10, 11, 12]))
    full, _ = nll.image_bpd(tanh_field, x, keys, num_dequant=K)
    # Row 1 among other examples (own adaptive steps per example): same value.
    mixed = other.copy()
    mixed[1] = x[1]
    again, _ = nll.image_bpd(tanh_field, mixed, keys, num_dequant=K)
    np.testing.assert_allclose(float(again[1]), float(full[1]), rtol=1e-6)
    assert not np.allclose(np.asarray(again)[[0, 2]], np.asarray(full)[[0, 2]])
    # One key == the batch of keys fold_in(key, row).
    a, _ = nll.image_bpd(tanh_field, x, jax.random.key(0), num_dequant=K)
    b, _ = nll.image_bpd(
        tanh_field, x, nll.example_keys(jax.random.key(0), jnp.arange(3)), num_dequant=K
    )
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_image_bpd_bad_input():
    x = np.zeros((2, 4, 4, 3), np.float32)
    with pytest.raises(ValueError, match="num_dequant"):
        nll.image_bpd(zero_field, x, jax.random.key(0), num_dequant=0)
    with pytest.raises(ValueError, match="batch of 2 keys"):
        nll.image_bpd(zero_field, x, jax.random.split(jax.random.key(0), 3))
    with pytest.raises(ValueError, match="divergence"):
        nll.image_bpd(zero_field, x, jax.random.key(0), divergence="trace")
    with pytest.raises(ValueError, match="unknown solver"):
        nll.image_bpd(zero_field, x, jax.random.key(0), solver="rk45")
    for bad in (0.0, -1.0, float("nan"), float("inf"), "abc", True):
        with pytest.raises(
            ValueError, match=r"source_std \(the std of .*\) must be a finite number in \(0, inf\)"
        ):
            nll.image_bpd(zero_field, x, jax.random.key(0), source_std=bad)
    for kw, match in (
        ({"t0": 0.5, "t1": 0.5}, r"need t0 < t1 \(noise end before data end\); got t0=0.5, t1=0.5"),
        ({"t1": 1.5}, r"t1 must be a finite number in \[0, 1\]; got 1.5"),
        ({"t0": -0.1}, r"t0 must be a finite number in \[0, 1\]"),
    ):
        with pytest.raises(ValueError, match=match):
            nll.image_bpd(zero_field, x, jax.random.key(0), **kw)


# ----------------------------------------------------------------------------- evaluate_bpd


class ListEvalIterator:
    """In-memory stand-in for grain's eval iterator: fixed-size batches, the last padded with
    masked rows, get_state()/set_state() as a JSON-able dict; optionally fails after a given
    number of batches (a pre-emption)."""

    def __init__(self, images, batch_size, fail_after=None):
        self.images = images
        self.batch_size = batch_size
        self.next_index = 0
        self.fail_after = fail_after
        self.yielded = 0

    def __iter__(self):
        return self

    def __next__(self):
        n = len(self.images)
        start = self.next_index * self.batch_size
        if start >= n:
            raise StopIteration
        if self.fail_after is not None and self.yielded >= self.fail_after:
            raise KeyboardInterrupt("pre-empted")
        img = self.images[start : start + self.batch_size]
        mask = np.ones(len(img), bool)
        pad = self.batch_size - len(img)
        if pad:
            img = np.concatenate([img, np.full((pad,) + img.shape[1:], -1.0, img.dtype)])
            mask = np.concatenate([mask, np.zeros(pad, bool)])
        self.next_index += 1
        self.yielded += 1
        return {"image": img, "label": np.zeros(len(img), np.int32), "mask": mask}

    def get_state(self):
        return {"next_index": self.next_index}

    def set_state(self, state):
        self.next_index = state["next_index"]


def expected_mean(images, key, num_dequant):
    keys = nll.example_keys(key, jnp.arange(len(images)))
    u = nll.dequantization_noise(keys, images.shape[1:], num_dequant, BIN)
    return closed_form_bpd(images, u)


@pytest.fixture(scope="module")
def images():
    return quantized(np.random.default_rng(9), (7, 32, 32, 3))


def test_evaluate_counts_every_example_once(images):
    key = jax.random.key(42)
    res = nll.evaluate_bpd(zero_field, lambda: ListEvalIterator(images, 3), key)
    assert res["num_examples"] == 7 and res["num_batches"] == 3 and res["complete"]
    per_example = expected_mean(images, key, 1)
    assert res["bpd"] == pytest.approx(per_example.mean(), rel=1e-6)
    assert res["bpd_stderr"] == pytest.approx(per_example.std(ddof=1) / math.sqrt(7), rel=1e-3)
    assert res["nfe_mean"] > 0


@pytest.mark.parametrize("sizes", [(4, 2, 1), (3, 3, 1), (7,)])
def test_evaluate_numbers_unpadded_ragged_batches_consecutively(images, sizes):
    # batches of any sizes without "index": positions 0..6 in order, so every example gets
    # its own key (a short last batch once reused the positions of the batch before)
    key = jax.random.key(5)
    starts = np.cumsum((0,) + sizes[:-1])
    batches = [{"image": images[a : a + n]} for a, n in zip(starts, sizes, strict=True)]
    res = nll.evaluate_bpd(zero_field, lambda: iter(batches), key)
    assert res["num_examples"] == 7
    assert res["bpd"] == pytest.approx(expected_mean(images, key, 1).mean(), rel=1e-6)


def test_evaluate_resume_gives_identical_totals(images, tmp_path):
    key = jax.random.key(1)
    full = nll.evaluate_bpd(zero_field, lambda: ListEvalIterator(images, 3), key)
    state = tmp_path / "nll_state.json"
    # Pre-empted after two batches: the state file holds them.
    with pytest.raises(KeyboardInterrupt):
        nll.evaluate_bpd(
            zero_field, lambda: ListEvalIterator(images, 3, fail_after=2), key, state_file=state
        )
    saved = json.loads(state.read_text())
    assert saved["totals"]["batches_done"] == 2 and saved["iterator"] == {"next_index": 2}
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    resumed = nll.evaluate_bpd(
        zero_field, lambda: ListEvalIterator(images, 3), key, state_file=state
    )
    assert resumed["resumed"] and resumed["complete"]
    for k in ("bpd", "bpd_stderr", "num_examples", "nfe_mean", "num_batches"):
        assert resumed[k] == full[k], k
    # max_batches stops early; rerunning finishes; a finished state is returned as is.
    state2 = tmp_path / "nll_state2.json"
    part = nll.evaluate_bpd(
        zero_field, lambda: ListEvalIterator(images, 3), key, state_file=state2, max_batches=1
    )
    assert not part["complete"] and part["num_batches"] == 1 and part["num_examples"] == 3
    again = nll.evaluate_bpd(
        zero_field, lambda: ListEvalIterator(images, 3), key, state_file=state2
    )
    assert again["bpd"] == full["bpd"] and again["num_examples"] == 7
    done = nll.evaluate_bpd(zero_field, lambda: ListEvalIterator(images, 3), key, state_file=state2)
    assert done["bpd"] == full["bpd"] and done["num_batches"] == 3
    # Another key (or other settings) is refused instead of mixing totals.
    with pytest.raises(ValueError, match="other settings"):
        nll.evaluate_bpd(
            zero_field, lambda: ListEvalIterator(images, 3), jax.random.key(2), state_file=state2
        )
    with pytest.raises(ValueError, match=r"differ: \['source_std'\]"):
        nll.evaluate_bpd(
            zero_field, lambda: ListEvalIterator(images, 3), key, state_file=state2, source_std=2.0
        )
    with pytest.raises(ValueError, match=r"differ: \['t0', 't1'\]"):
        nll.evaluate_bpd(
            zero_field, lambda: ListEvalIterator(images, 3), key, state_file=state2, t0=1e-3
        )
    # source_std=1 and the span [0, 1] (the defaults) are what state files written before
    # those options hold
    assert not {"source_std", "t0", "t1"} & set(json.loads(state2.read_text())["fingerprint"])


def test_evaluate_mesh_matches_no_mesh(images):
    key = jax.random.key(8)
    mesh = jax.make_mesh((1,), ("data",))
    a = nll.evaluate_bpd(zero_field, lambda: ListEvalIterator(images, 3), key)
    b = nll.evaluate_bpd(zero_field, lambda: ListEvalIterator(images, 3), key, mesh=mesh)
    for k in ("bpd", "bpd_stderr", "num_examples", "nfe_mean", "num_batches"):
        assert a[k] == pytest.approx(b[k], rel=1e-7), k


def test_evaluate_with_grain_eval_iterator(images, tmp_path):
    di = pytest.importorskip("fmjax.data.images")
    u8 = np.round((images + 1.0) * 128.0).astype(np.uint8)  # levels 2k/256 - 1 -> k
    data = u8.transpose(0, 3, 1, 2).reshape(len(u8), -1)  # official layout: (N, 3072) CHW
    np.savez(tmp_path / "val_data.npz", data=data, labels=np.arange(1, len(u8) + 1))

    def make():
        return di.make_eval_iterator(
            "imagenet32_npz",
            global_batch_size=3,
            data_dir=tmp_path,
            read_threads=1,
            prefetch_buffer_size=1,
        )

    key = jax.random.key(4)
    full = nll.evaluate_bpd(zero_field, make, key)
    assert full["num_examples"] == 7 and full["num_batches"] == 3
    assert full["bpd"] == pytest.approx(expected_mean(images, key, 1).mean(), rel=1e-6)
    state = tmp_path / "state.json"
    nll.evaluate_bpd(zero_field, make, key, state_file=state, max_batches=2)
    resumed = nll.evaluate_bpd(zero_field, make, key, state_file=state)
    assert resumed["num_examples"] == 7 and resumed["bpd"] == full["bpd"]


@pytest.mark.slow
def test_evaluate_two_devices_matches_one(tmp_path):
    """Two CPU devices (a fresh process): same result as one device, padding rows masked."""
    script = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        import json, sys
        import jax, jax.numpy as jnp, numpy as np
        sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
        from test_metrics_nll import ListEvalIterator, quantized, tanh_field
        from fmjax.metrics import nll
        images = quantized(np.random.default_rng(0), (5, 8, 8, 3))
        key = jax.random.key(0)
        out = {}
        for n in (1, 2):
            mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
            out[n] = nll.evaluate_bpd(tanh_field, lambda: ListEvalIterator(images, 3), key,
                                      mesh=mesh, num_dequant=2)
        print(json.dumps(out))
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", script, root],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one, two = out["1"], out["2"]
    assert one["num_examples"] == two["num_examples"] == 5
    assert two["bpd"] == pytest.approx(one["bpd"], rel=1e-5)
    assert two["nfe_mean"] == one["nfe_mean"]
