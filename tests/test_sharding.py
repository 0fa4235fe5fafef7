"""Data parallelism: a step on 4 devices equals the 1-device step on the same global batch.

The pytest process has already initialised JAX with one CPU device, so the multi-device part
runs in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
"""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, use_compile_cache
from image_runs import subprocess_env

from fmjax.train import sharding

use_compile_cache()
pytestmark = pytest.mark.usefixtures("float32")

# Two training steps of the image trainer's loss (tiny UNet, class-conditional with label
# dropout, dropout 0.1) on a 1-device mesh and on a 4-device mesh, same global batch.
WORKER = r"""
import functools, json
import jax, jax.numpy as jnp, numpy as np
from experiments import images
from experiments.configs import imagenet32
from experiments.images import step as step_lib
from fmjax.train import make_train_step, sharding

assert jax.device_count() == 4, jax.devices()
c = imagenet32.get_config("tiny")
c.model.ch = 16; c.model.ch_mult = (1,); c.model.attn_resolutions = (); c.model.dropout = 0.1
c.model.num_classes = 10; c.model.class_dropout = 0.5
c.train.warmup_steps = 0
# Adam's eps: gradients that are zero up to rounding (biases right before a GroupNorm) would
# otherwise become +-lr steps whose sign depends on the all-reduce's summation order; every
# other gradient still gets an Adam-like step, as with the paper's 1e-8.
c.train.adam_eps = 1e-3
setup = images.build(c)
tx = setup.tx
loss_fn = functools.partial(step_lib.loss_fn, setup)
rng = np.random.default_rng(0)
batches = [{"image": rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32),
            "label": rng.integers(0, 10, 8).astype(np.int32)} for _ in range(2)]

def run(mesh, tx):
    state = jax.jit(setup.init_state, out_shardings=sharding.replicated_sharding(mesh))()
    step = make_train_step(loss_fn, tx, ema_decay=0.9, mesh=mesh)
    metrics = []
    for b in batches:
        gb = sharding.shard_batch(b, mesh)
        assert len(gb["image"].sharding.device_set) == mesh.size
        state, m = step(state, gb)
        metrics.append({k: float(v) for k, v in m.items()})
    leaf = jax.tree_util.tree_leaves(state.params)[0]
    assert len(leaf.sharding.device_set) == mesh.size and leaf.sharding.is_fully_replicated
    return jax.device_get(state), metrics

def leaves(tree, name=""):
    return [np.asarray(x, np.float64) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if name in jax.tree_util.keystr(p)]

def worst(l1, l4, rtol, atol_frac):
    # max over elements of |a - b| / (rtol |a| + atol), atol = atol_frac * the largest |a|
    # of all the arrays; <= 1 means allclose(b, a, rtol, atol) holds everywhere.
    atol = atol_frac * max(float(np.max(np.abs(a))) for a in l1)
    return max(float(np.max(np.abs(a - b) / (rtol * np.abs(a) + atol))) for a, b in zip(l1, l4))

mesh1, mesh4 = sharding.make_mesh(jax.devices()[:1]), sharding.make_mesh()
s1, m1 = run(mesh1, tx)
s4, m4 = run(mesh4, tx)
res = {"metrics": [m1, m4], "steps": [int(s1.step), int(s4.step)]}
res["params_worst"] = worst(leaves((s1.params, s1.ema_params)),
                           leaves((s4.params, s4.ema_params)), 1e-5, 1e-7)
res["mu_worst"] = worst(leaves(s1.opt_state, ".mu"), leaves(s4.opt_state, ".mu"), 1e-5, 1e-7)
res["nu_worst"] = worst(leaves(s1.opt_state, ".nu"), leaves(s4.opt_state, ".nu"), 1e-5, 1e-7)
res["rng_equal"] = (jax.random.key_data(s1.rng) == jax.random.key_data(s4.rng)).all().item()
try:
    sharding.shard_batch({"image": np.zeros((6, 32, 32, 3), np.float32)}, sharding.make_mesh())
    error = None
except ValueError as e:
    error = str(e)
res["error"] = error
print("RESULT " + json.dumps(res))
"""


def test_four_devices_equal_one_device_and_indivisible_batch_errors():
    out = subprocess.run(
        [sys.executable, "-c", WORKER],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
        env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"),
    )
    assert out.returncode == 0, out.stderr[-4000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT ") :])
    assert r["steps"] == [2, 2] and r["rng_equal"]
    one, four = r["metrics"]
    for m1, m4 in zip(one, four, strict=True):  # loss and gradient norm of each step
        np.testing.assert_allclose(
            [m4["loss"], m4["grad_norm"]], [m1["loss"], m1["grad_norm"]], rtol=1e-5
        )
    # params, EMA and both Adam moments after two steps, elementwise: rtol 1e-5 and atol 1e-7
    # of the largest magnitude (float32 reassociation of the gradient all-reduce)
    for k in ("params_worst", "mu_worst", "nu_worst"):
        assert r[k] <= 1.0, (k, r[k])
    assert r["error"] is not None
    assert "(6)" in r["error"] and "4" in r["error"] and "divisible" in r["error"]


def test_single_device_helpers():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.size == jax.device_count()
    batch = {"image": np.arange(24, dtype=np.float32).reshape(4, 3, 2), "label": np.arange(4)}
    g = sharding.shard_batch(batch, mesh)
    np.testing.assert_array_equal(sharding.to_host(g["image"]), batch["image"])
    assert g["label"].shape == (4,)
    tree = {"w": jnp.ones((2, 2)), "k": jax.random.key(1), "n": np.float32(3.0)}
    r = sharding.replicate(tree, mesh)
    assert r["w"].sharding.is_fully_replicated
    assert jax.random.key_data(r["k"]).tolist() == jax.random.key_data(tree["k"]).tolist()
    assert sharding.check_batch_divisible(8, mesh) == 8 // mesh.size


def test_bad_batches_and_arguments():
    mesh = sharding.make_mesh()
    with pytest.raises(ValueError, match="same leading"):
        sharding.shard_batch({"a": np.zeros((4, 2)), "b": np.zeros((3,))}, mesh)
    with pytest.raises(ValueError, match="positive multiple"):
        sharding.check_batch_divisible(0, mesh)
    with pytest.raises(ValueError, match="together"):
        sharding.initialize_distributed(coordinator="127.0.0.1:1234")
    with pytest.raises(ValueError, match="process_id"):
        sharding.initialize_distributed("127.0.0.1:1234", 2, 5)


def test_initialize_distributed_is_a_noop_for_one_process(monkeypatch):
    for k in (
        "JAX_COORDINATOR_ADDRESS",
        "SLURM_JOB_ID",
        "OMPI_COMM_WORLD_SIZE",
        "TPU_WORKER_HOSTNAMES",
    ):
        monkeypatch.delenv(k, raising=False)
    assert sharding.initialize_distributed() is False
    assert sharding.initialize_distributed(num_processes=1) is False
    assert jax.process_count() == 1
