"""Resumption: N steps uninterrupted == k steps, a restart from the checkpoint, N - k more.

Compared: params, EMA, Adam state, step, PRNG key, the data iterator position and the
logged metrics. Interruptions: a crash between checkpoints (work since the last checkpoint
is redone), a clean stop (``stop_at``), and a SIGKILL of the command-line run at a random
moment after its first checkpoint. With minibatch OT on (``train.coupling=ot``): paired in
the input pipeline (the noise is part of the data iterator's state) and on the device.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT, use_compile_cache
from image_runs import subprocess_env, write_npz_dataset

import fmjax.train.sharding
from experiments import images
from experiments.configs import imagenet32
from fmjax.train.checkpoint import CheckpointManager

use_compile_cache()
pytestmark = pytest.mark.usefixtures("float32")

N = 6


OVERRIDES = {
    "model.ch": 16,
    "model.ch_mult": (1,),
    "model.attn_resolutions": (),
    "model.dropout": 0.1,
    "data.source": "imagenet32_npz",
    "data.global_batch_size": 4,
    "data.read_threads": 1,
    "train.num_steps": N,
    "train.warmup_steps": 2,
    "train.checkpoint_every": 2,
    "train.keep_checkpoints": 10,
    "train.log_every": 1,
    "train.sample_every": 0,
    "train.progress": False,
}


# train.coupling / train.pairing of each run kind
# (pairing in the jitted step is as deterministic as the rest of the step; the two-process
# test in test_multihost.py trains with it against one process)
COUPLINGS = {
    "independent": {},
    "ot_host": {"train.coupling": "ot", "train.pairing": "host"},
}


def _config(data_dir, kind="independent"):
    c = imagenet32.get_config("tiny")
    for dotted, value in {**OVERRIDES, **COUPLINGS[kind], "data.data_dir": data_dir}.items():
        group, name = dotted.split(".")
        c[group][name] = value
    return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("npz"))
    # 20 examples, batch 4: 5 batches per epoch, N crosses an epoch
    write_npz_dataset(d, n_train=20)
    return d


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """The uninterrupted run of each kind, made on first use."""
    cache = {}

    def get(kind):
        if kind not in cache:
            workdir = str(tmp_path_factory.mktemp(f"uninterrupted_{kind}"))
            state, summary = images.train(_config(data_dir, kind), workdir)
            assert summary["start_step"] == 0 and not summary["resumed"]
            assert summary["data_wait_s"] >= 0.0
            cache[kind] = workdir, jax.device_get(state)
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def uninterrupted(runs):
    return runs("independent")


def test_the_ot_run_differs_from_the_independent_run(runs):
    """The OT pairing changes the training (so the resume tests below test something)."""
    final = {k: _leaves(runs(k)[1])[0] for k in COUPLINGS}
    assert not np.array_equal(final["ot_host"], final["independent"])


def _leaves(state):
    return jax.tree_util.tree_leaves(
        (state.params, state.ema_params, state.opt_state, jax.random.key_data(state.rng))
    )


def _assert_same_run(workdir_a, state_a, workdir_b, state_b):
    assert int(state_a.step) == int(state_b.step) == N
    la, lb = _leaves(state_a), _leaves(jax.device_get(state_b))
    assert len(la) == len(lb)
    for a, b in zip(la, lb, strict=True):  # same program, same inputs: bitwise on one CPU
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    # data position saved with the final checkpoint
    meta_a = CheckpointManager(os.path.join(workdir_a, "checkpoints")).metadata(N)
    meta_b = CheckpointManager(os.path.join(workdir_b, "checkpoints")).metadata(N)
    assert meta_a["data_state"] == meta_b["data_state"]
    assert meta_a["data_state"]["next_index"] == N

    # the log reads as one run: every step once, same losses
    def log(w):
        with open(os.path.join(w, "metrics.jsonl")) as f:
            recs = [json.loads(ln) for ln in f]
        return [(r["step"], r["loss"]) for r in recs if "loss" in r]

    assert log(workdir_b) == log(workdir_a)
    assert [s for s, _ in log(workdir_a)] == list(range(1, N + 1))


def _train_until_crash(config, workdir, monkeypatch, at_batch, image_shape=None):
    """``images.train`` that crashes when it shards its ``at_batch``-th batch (checking each
    batch's image shape); the real sharding is put back after."""
    calls = {"n": 0}
    real = fmjax.train.sharding.shard_batch

    def crashing(batch, mesh):
        calls["n"] += 1
        if calls["n"] == at_batch:
            raise RuntimeError("simulated crash")
        assert image_shape is None or batch["image"].shape == image_shape
        return real(batch, mesh)

    monkeypatch.setattr(fmjax.train.sharding, "shard_batch", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        images.train(config, workdir)
    monkeypatch.setattr(fmjax.train.sharding, "shard_batch", real)


@pytest.mark.parametrize("kind", list(COUPLINGS))
def test_crash_between_checkpoints_then_resume(data_dir, runs, kind, tmp_path, monkeypatch):
    workdir = str(tmp_path / "crashed")
    # steps 1-5 ran, the last checkpoint is step 4
    _train_until_crash(_config(data_dir, kind), workdir, monkeypatch, at_batch=6)
    assert CheckpointManager(os.path.join(workdir, "checkpoints")).latest_step() == 4
    # step 5 was logged by the crashed run; the resumed run drops and redoes it
    state, summary = images.train(_config(data_dir, kind), workdir)  # fresh objects
    assert summary["resumed"] and summary["start_step"] == 4
    _assert_same_run(*runs(kind), workdir, state)


def test_stop_and_resume(data_dir, uninterrupted, tmp_path):
    workdir = str(tmp_path / "stopped")
    state, summary = images.train(_config(data_dir), workdir, stop_at=3)
    assert summary["stopped_early"] and int(state.step) == 3
    assert CheckpointManager(os.path.join(workdir, "checkpoints")).latest_step() == 3
    state, summary = images.train(_config(data_dir), workdir)
    assert summary["start_step"] == 3
    _assert_same_run(*uninterrupted, workdir, state)
    # a finished run restarted does nothing
    _, summary = images.train(_config(data_dir), workdir)
    assert summary["start_step"] == N and "steps_run" not in summary


def test_restore_data_iterator_position(data_dir, uninterrupted):
    workdir, _ = uninterrupted
    config = _config(data_dir)
    ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"))
    setup = images.build(config)
    fresh = setup.train_iterator()
    for _ in range(N):  # the batch after N steps, from a fresh iterator
        next(fresh)
    expected = next(fresh)
    it = setup.train_iterator()
    abstract = setup.abstract_state(fmjax.train.sharding.make_mesh())
    state, meta = ckpt.restore(abstract, it, step=4)
    assert int(state.step) == 4 and meta["step"] == 4
    for _ in range(N - 4):
        next(it)
    np.testing.assert_array_equal(next(it)["image"], expected["image"])
    ckpt.close()


def test_sigkill_at_any_moment_then_resume(data_dir, runs, tmp_path):
    """The command-line run killed with SIGKILL mid-run (maybe mid-save) resumes exactly,
    with minibatch OT paired in the input pipeline (the default for train.coupling=ot)."""
    workdir = str(tmp_path / "killed")
    cmd = [
        sys.executable,
        "-m",
        "experiments.imagenet32",
        "--config=experiments/configs/imagenet32.py:tiny",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        "--config.mode=train",
    ]
    for dotted, value in {**OVERRIDES, "train.coupling": "ot"}.items():
        v = ",".join(map(str, value)) if isinstance(value, tuple) else value
        v = (
            f"({v},)"
            if isinstance(value, tuple) and len(value) == 1
            else (f"({v})" if isinstance(value, tuple) else v)
        )
        cmd.append(f"--config.{dotted}={v}")
    env = subprocess_env()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    first = os.path.join(workdir, "checkpoints", "2")
    deadline = time.time() + 240
    while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    time.sleep(float(np.random.default_rng().uniform(0.0, 0.2)))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL  # killed, not finished
    proc.stderr.close()
    killed_at = CheckpointManager(os.path.join(workdir, "checkpoints")).latest_step()
    assert killed_at is not None and 2 <= killed_at < N
    out = subprocess.run(
        cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout[: out.stdout.rindex("}") + 1])["train"]
    assert summary["end_step"] == N
    config = _config(data_dir, "ot_host")
    abstract = images.build(config).abstract_state(fmjax.train.sharding.make_mesh())
    with CheckpointManager(os.path.join(workdir, "checkpoints")) as ckpt:
        state, _ = ckpt.restore(abstract)
    _assert_same_run(*runs("ot_host"), workdir, state)


def test_imagenet64_npz_crash_then_exact_resume_then_eval(tmp_path, monkeypatch):
    """ImageNet-64 from npz files in the official layout, the tiniest UNet: a run that
    crashes after its step-2 checkpoint resumes to the uninterrupted run's state bit for
    bit, and mode eval then writes finite bits/dim on the validation file."""
    from experiments.configs import imagenet64

    data = str(tmp_path / "npz64")
    write_npz_dataset(data, n_train=10, n_val=4, resolution=64)
    n = 4

    def config(**extra):
        c = imagenet64.get_config("tiny")
        values = {
            **OVERRIDES,
            "data.source": "imagenet64_npz",
            "data.data_dir": data,
            "train.num_steps": n,
            "model.dropout": 0.0,
            "model.ch_mult": (1, 1),  # the middle attention at 32x32, not 64x64
            **extra,
        }
        for dotted, value in values.items():
            *group, name = dotted.split(".")
            (c[group[0]] if group else c)[name] = value
        return c

    ref_dir, crashed = str(tmp_path / "uninterrupted"), str(tmp_path / "crashed")
    ref_state, _ = images.train(config(), ref_dir)
    # steps 1-3 ran, the last checkpoint is step 2
    _train_until_crash(config(), crashed, monkeypatch, at_batch=4, image_shape=(4, 64, 64, 3))
    state, summary = images.train(config(), crashed)
    assert summary["resumed"] and summary["start_step"] == 2 and int(state.step) == n
    la, lb = _leaves(jax.device_get(ref_state)), _leaves(jax.device_get(state))
    for a, b in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    meta = CheckpointManager(os.path.join(crashed, "checkpoints")).metadata(n)
    assert meta["data_state"]["next_index"] == n and meta["config"]["data"]["resolution"] == 64

    small_eval = {"mode": "eval", "eval.global_batch_size": 2, "eval.num_batches": 1}
    small_eval.update({"eval.num_dequant": 1, "eval.nfe_num_samples": 0})
    images.evaluate(config(**small_eval), crashed)
    with open(os.path.join(crashed, "eval_metrics.json")) as f:
        m = json.load(f)
    assert m["dataset"]["name"] == "imagenet64_npz:val_data" and m["checkpoint_step"] == n
    bpd = m["results"]["bpd"]
    assert np.isfinite(bpd["value"]) and bpd["value"] > 0 and bpd["num_examples"] == 2
