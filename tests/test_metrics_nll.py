"""The resumable bits/dim driver (fmjax.metrics.nll.evaluate_bpd): every example once, the
same totals after a resume, on a mesh and with the grain eval iterator; the per-batch bits/dim
it sums are checked against closed forms in test_metrics_bpd."""

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
from test_metrics_bpd import BIN, closed_form_bpd, quantized, zero_field

from fmjax.metrics import bpd as metrics_bpd
from fmjax.metrics import nll


def test_nll_reexports_the_batch_functions():
    for name in ("image_bpd", "example_keys", "dequantization_keys", "dequantization_noise"):
        assert getattr(nll, name) is getattr(metrics_bpd, name)


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
    keys = metrics_bpd.example_keys(key, jnp.arange(len(images)))
    u = metrics_bpd.dequantization_noise(keys, images.shape[1:], num_dequant, BIN)
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
    with pytest.raises(ValueError, match=r"differ: \['t0'\]"):
        nll.evaluate_bpd(
            zero_field, lambda: ListEvalIterator(images, 3), key, state_file=state2, t0=1e-3
        )


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
        from test_metrics_bpd import quantized, tanh_field
        from test_metrics_nll import ListEvalIterator
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
