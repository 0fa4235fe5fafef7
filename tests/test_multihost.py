"""Multi-host data parallelism: two processes on this machine over loopback (gloo CPU
collectives) train on their halves of each global batch (with minibatch OT over the whole
global batch) and reach the parameters that one process reaches on the whole global batch,
then evaluate to its bits/dim and NFE.

Each process runs the real trainer and evaluation (``experiments.images.train`` and
``evaluate``): the image pipeline gives process ``p`` its slice of every global batch,
``shard_batch`` assembles the global array, the gradient all-reduce crosses processes, and
orbax writes one checkpoint from both processes (one data-iterator position file per
process); bits/dim sums its totals over both processes' eval rows, and the samples whose
NFE is counted are one solve over both processes' devices.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, use_compile_cache
from image_runs import subprocess_env, write_npz_dataset

from experiments import images
from experiments.configs import imagenet32

use_compile_cache()
pytestmark = pytest.mark.usefixtures("float32")

NUM_STEPS = 3

WORKER = r"""
import json, sys
import numpy as np
from fmjax.train import sharding
pid, port, workdir, overrides = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
assert sharding.initialize_distributed(f"127.0.0.1:{port}", 2, pid, initialization_timeout=120)
import jax
from experiments import images
from experiments.configs import imagenet32
c = imagenet32.get_config("tiny")
for dotted, value in json.loads(overrides).items():
    node = c
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = tuple(value) if isinstance(value, list) else value
state, summary = images.train(c, workdir, progress=False)
metrics = images.evaluate(c, workdir, state=state, progress=False)
params = jax.tree_util.tree_leaves((state.params, state.ema_params, state.opt_state))
host = [sharding.to_host(x) for x in params]
if jax.process_index() == 0:
    np.savez(workdir + "/final_state.npz", *host)
print("RESULT " + json.dumps({"process": jax.process_index(), "count": jax.process_count(),
                              "devices": jax.device_count(), "step": int(state.step),
                              "final_loss": summary["final_loss"],
                              "summary": metrics["summary"]}), flush=True)
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(runs, timeout, what):
    """Start ``python -c code *args`` for each ``[code, *args]`` in ``runs`` at once (the
    processes of one distributed job wait for each other), CPU only with the tests' compile
    cache; returns each one's ``RESULT`` JSON line, in order."""
    env = subprocess_env()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", *run],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for run in runs
    ]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{what} timed out")
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-4000:]
    return [
        json.loads([ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1][7:])
        for out, _ in outs
    ]


def _overrides(data_dir):
    return {
        "model.ch": 16,
        "model.ch_mult": [1],
        "model.attn_resolutions": [],
        "data.source": "imagenet32_npz",
        "data.data_dir": data_dir,
        "data.global_batch_size": 8,
        "data.read_threads": 1,
        "train.num_steps": NUM_STEPS,
        "train.warmup_steps": 0,
        "train.checkpoint_every": 2,
        "train.sample_every": 0,
        "train.log_every": 1,
        # minibatch OT over the global batch in the step: the host callback sees the whole
        # batch in each process, so the pairs (and the run) are the one process's
        "train.coupling": "ot",
        "train.pairing": "device",
        # Adam's eps keeps rounding-level gradients (e.g. biases before a GroupNorm, zero in
        # exact arithmetic) from becoming +-lr steps whose sign depends on the reduction
        # order; every other gradient gets an Adam-like step as with the paper's 1e-8.
        "train.adam_eps": 1e-3,
        # bits/dim of an eval batch of 8 (4 rows per process), NFE of 4 samples
        "eval.global_batch_size": 8,
        "eval.num_batches": 1,
        "eval.num_dequant": 1,
        "eval.rtol": 1e-3,
        "eval.atol": 1e-3,
        "eval.nfe_num_samples": 4,
        "eval.sample_batch_size": 4,
    }


def _apply(config, overrides):
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = tuple(value) if isinstance(value, list) else value
    return config


def test_two_processes_match_one_process(tmp_path):
    data_dir = str(tmp_path / "data")
    write_npz_dataset(data_dir, n_train=48, n_val=16)
    overrides = _overrides(data_dir)
    multi = str(tmp_path / "multi")
    port = _free_port()
    results = _run_workers(
        [[WORKER, str(i), str(port), multi, json.dumps(overrides)] for i in range(2)],
        timeout=300,
        what="multi-process training",
    )
    assert sorted(r["process"] for r in results) == [0, 1]
    assert all(r["count"] == 2 and r["devices"] == 2 and r["step"] == NUM_STEPS for r in results)

    # Both processes wrote into one checkpoint; each recorded its own data position.
    ckpt = os.path.join(multi, "checkpoints", str(NUM_STEPS))
    assert sorted(os.listdir(os.path.join(ckpt, "data"))) == [
        "commit_success.txt",
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    # Only process 0 logs.
    with open(os.path.join(multi, "metrics.jsonl")) as f:
        lines = f.read().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == list(range(1, NUM_STEPS + 1))

    # One process, one device, the whole global batch.
    config = _apply(imagenet32.get_config("tiny"), overrides)
    state, summary = images.train(config, str(tmp_path / "single"), progress=False)
    assert summary["num_processes"] == 1 and summary["num_devices"] == 1
    single = [
        np.asarray(x)
        for x in jax.tree_util.tree_leaves((state.params, state.ema_params, state.opt_state))
    ]
    with np.load(os.path.join(multi, "final_state.npz")) as z:
        multi_leaves = [z[f"arr_{i}"] for i in range(len(z.files))]
    assert len(multi_leaves) == len(single)
    np.testing.assert_allclose(results[0]["final_loss"], summary["final_loss"], rtol=1e-5)
    scale = max(float(np.max(np.abs(a))) for a in single if a.dtype.kind == "f")
    for a, b in zip(single, multi_leaves, strict=True):
        # params, EMA, Adam moments and count: float32 reassociation of the all-reduce only
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * scale)

    # Evaluation: both processes report the one-process bits/dim and NFE; process 0 writes.
    one = images.evaluate(config, str(tmp_path / "single"), state=state, progress=False)
    assert one["results"]["bpd"]["num_examples"] == 8
    for r in results:
        assert r["summary"].keys() == one["summary"].keys()
        for key, value in one["summary"].items():
            if value is not None:
                assert r["summary"][key] == pytest.approx(value, rel=1e-4), key
    with open(os.path.join(multi, "eval_metrics.json")) as f:
        written = json.load(f)
    assert written["summary"] == results[0]["summary"] and written["num_devices"] == 2


STEPS_WORKER = r"""
import json, sys
import numpy as np
import fmjax
from fmjax.train import sharding
mode = sys.argv[1]
if mode == "two_processes":
    pid, port = int(sys.argv[2]), sys.argv[3]
    assert sharding.initialize_distributed(f"127.0.0.1:{port}", 2, pid,
                                           initialization_timeout=120)
else:
    fmjax.use_cpu_devices(2)
import jax, jax.numpy as jnp, optax
from fmjax import train

def loss_fn(params, key, batch):  # per-row mean, with the device's noise
    noise = 0.1 * jax.random.normal(key, batch.shape)
    h = jnp.tanh((batch + noise) @ params["w1"])
    return jnp.mean(jnp.square(h @ params["w2"] - jnp.sin(batch)))

mesh = sharding.make_mesh()
tx = optax.adam(1e-2)
params = {"w1": jnp.full((3, 8), 0.2), "w2": jnp.full((8, 3), -0.1)}
state = sharding.replicate(train.TrainState.create(params, tx, jax.random.key(0)), mesh)
step = train.make_train_step(loss_fn, tx, mesh=mesh, shard_loss=True, microbatches=2)
rows = np.random.default_rng(0).standard_normal((3, 8, 3)).astype(np.float32)
for i in range(3):  # each process feeds its half of every global batch of 8
    local = rows[i] if mode == "one_process" else rows[i][4 * jax.process_index():][:4]
    state, metrics = step(state, sharding.shard_batch(local, mesh))
print("RESULT " + json.dumps({"devices": jax.device_count(), "loss": float(metrics["loss"]),
      "w1": sharding.to_host(state.params["w1"]).tolist()}), flush=True)
"""


def test_microbatched_shard_loss_steps_across_processes(tmp_path):
    """make_train_step(shard_loss=True, microbatches=2), the image trainer's step with
    train.microbatches > 1: two processes with one device each take the steps of one process
    with two devices (the same rows and keys per device; the all-reduce crosses processes)."""
    port = _free_port()
    results = _run_workers(
        [[STEPS_WORKER, "two_processes", str(i), str(port)] for i in range(2)]
        + [[STEPS_WORKER, "one_process"]],
        timeout=180,
        what="multi-process steps",
    )
    assert [r["devices"] for r in results] == [2, 2, 2]
    for r in results[:2]:
        np.testing.assert_allclose(r["w1"], results[2]["w1"], rtol=1e-6, atol=1e-7)
        assert r["loss"] == pytest.approx(results[2]["loss"], rel=1e-6)
    assert not np.allclose(results[2]["w1"], 0.2)  # it trained


OT_WORKER = r"""
import json, sys
import numpy as np
from fmjax.train import sharding
pid, port = int(sys.argv[1]), sys.argv[2]
assert sharding.initialize_distributed(f"127.0.0.1:{port}", 2, pid, initialization_timeout=120)
import jax
from fmjax import couplings
mesh = sharding.make_mesh()
rng = np.random.default_rng(0)
x0 = rng.standard_normal((3, 8, 2)).astype(np.float32)
x1 = (2 * rng.standard_normal((3, 8, 2)) + 1).astype(np.float32)
labels = np.array([0, 1, 0, 1, 2, 2, 0, 1], np.int32)
mine = slice(4 * jax.process_index(), 4 * jax.process_index() + 4)  # this process's half
out = {}
for name, kw in (("exact", {}), ("labels", {"cond": True}), ("sinkhorn", {"method": "sinkhorn"})):
    def pair(a, b, c, kw=kw):
        cond = c if kw.get("cond") else None
        return couplings.minibatch_ot(None, a, b, method=kw.get("method", "exact"), cond=cond)[0]
    rows = []
    for i in range(3):
        args = [sharding.shard_batch(v[mine], mesh) for v in (x0[i], x1[i], labels)]
        rows.append(sharding.to_host(jax.jit(pair)(*args)).tolist())
    out[name] = rows
print("RESULT " + json.dumps({"devices": jax.device_count(), **out}), flush=True)
"""


def test_two_processes_pair_the_global_batch_as_one_device():
    """minibatch_ot under jit on a batch split over two processes pairs the whole global
    batch: the pairs one device makes from the whole batch (exact, within labels, Sinkhorn)."""
    from fmjax import couplings

    port = _free_port()
    results = _run_workers(
        [[OT_WORKER, str(i), str(port)] for i in range(2)], timeout=180, what="OT pairing"
    )
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 8, 2)).astype(np.float32)
    x1 = (2 * rng.standard_normal((3, 8, 2)) + 1).astype(np.float32)
    labels = np.array([0, 1, 0, 1, 2, 2, 0, 1], np.int32)
    for i in range(3):
        exact = x0[i][couplings.exact_ot_permutation(x0[i], x1[i])]
        within = x0[i][couplings.exact_ot_permutation(x0[i], x1[i], labels)]
        sink = couplings.minibatch_ot(None, x0[i], x1[i], method="sinkhorn")[0]
        assert not np.array_equal(exact, x0[i])  # the pairing moved something
        for r in results:
            assert r["devices"] == 2
            np.testing.assert_array_equal(np.asarray(r["exact"][i], np.float32), exact)
            np.testing.assert_array_equal(np.asarray(r["labels"][i], np.float32), within)
            np.testing.assert_allclose(np.asarray(r["sinkhorn"][i]), sink, atol=1e-6)
