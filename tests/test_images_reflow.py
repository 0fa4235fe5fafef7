"""Reflow in the image experiments: the stored pairs (fmjax.data.reflow_pairs) and a round
trained on a tiny teacher run (experiments.images.reflow)."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import use_compile_cache
from image_runs import small_config, write_npz_dataset

import fmjax
from experiments import images
from experiments.images import reflow
from experiments.images.config import ConfigError
from fmjax.data.reflow_pairs import PairsSource, PairStore, make_pairs_iterator
from fmjax.train import sharding as sharding_lib

use_compile_cache()
pytestmark = pytest.mark.usefixtures("float32")

SHAPE = (2, 2, 3)


def _store(tmp_path, chunks=3, size=4, **extra):
    return PairStore(
        tmp_path / "pairs", {"num_chunks": chunks, "chunk_size": size, "shape": SHAPE, **extra}
    )


def _fill(store, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for k in store.missing():
        x0 = rng.normal(size=(store.chunk_size, *SHAPE))
        x1 = rng.normal(size=(store.chunk_size, *SHAPE))
        label = np.arange(store.chunk_size) + 10 * k
        store.write(k, x0, x1, label, info={"nfe": 7.0 + k})
        out.append((x0, x1, label))
    return out


def test_pair_store_resumes_refuses_other_settings_and_reads_back(tmp_path):
    store = _store(tmp_path, teacher_step=5)
    assert store.missing() == [0, 1, 2]
    written = _fill(store)
    # a chunk whose JSON never landed (killed mid-write) is missing again, the rest kept
    os.remove(tmp_path / "pairs" / "chunk_00001.json")
    assert _store(tmp_path, teacher_step=5).missing() == [1]
    with pytest.raises(ValueError, match="incomplete: 1 of 3 chunks missing"):
        PairsSource(tmp_path / "pairs")
    store.write(1, *written[1], info={"nfe": 8.0})
    with pytest.raises(ValueError, match=r"teacher_step=5 \(now 6\)"):
        _store(tmp_path, teacher_step=6)
    src = PairsSource(tmp_path / "pairs")
    assert len(src) == 12
    for i in (0, 5, 11):
        k, j = divmod(i, 4)
        rec = src[i]
        np.testing.assert_array_equal(rec["x0"], np.float32(written[k][0][j]))
        np.testing.assert_array_equal(rec["image"], np.float32(written[k][1][j]))
        assert rec["label"] == written[k][2][j]
    with pytest.raises(IndexError):
        src[12]
    assert [i["nfe"] for i in store.chunk_info()] == [7.0, 8.0, 9.0]
    with pytest.raises(ValueError, match=r"shape \(4, 2, 2, 3\)"):
        store.write(0, np.zeros((3, *SHAPE)), np.zeros((4, *SHAPE)))
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        store.write(3, np.zeros((4, *SHAPE)), np.zeros((4, *SHAPE)))
    with pytest.raises(FileNotFoundError, match="no reflow pairs"):
        PairsSource(tmp_path / "nothing")


def test_pairs_pipeline_splits_global_batches_over_processes_and_resumes(tmp_path):
    store = _store(tmp_path, chunks=4, size=4)
    _fill(store)
    kw = {"global_batch_size": 8, "seed": 3, "read_threads": 1}
    one = make_pairs_iterator(tmp_path / "pairs", process_index=0, process_count=1, **kw)
    batches = [next(one) for _ in range(5)]  # past one epoch of 16 pairs
    halves = [
        make_pairs_iterator(tmp_path / "pairs", process_index=p, process_count=2, **kw)
        for p in (0, 1)
    ]
    src, seen = PairsSource(tmp_path / "pairs"), set()
    for i, b in enumerate(batches):
        parts = [next(h) for h in halves]
        for key in ("x0", "image", "label"):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), b[key])
        if i < 2:  # each epoch is a permutation of the pairs, kept together
            for row in range(8):
                (n,) = [n for n in range(16) if np.array_equal(src[n]["x0"], b["x0"][row])]
                np.testing.assert_array_equal(src[n]["image"], b["image"][row])
                seen.add(n)
    assert seen == set(range(16))
    state = one.get_state()
    nxt = next(one)
    again = make_pairs_iterator(tmp_path / "pairs", process_index=0, process_count=1, **kw)
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["x0"], nxt["x0"])
    with pytest.raises(ValueError, match="fewer than one global batch"):
        make_pairs_iterator(tmp_path / "pairs", global_batch_size=32, seed=0)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny unconditional run on a tiny npz dataset: the teacher of the rounds below."""
    root = tmp_path_factory.mktemp("reflow")
    data = str(root / "npz")
    write_npz_dataset(data)
    config = small_config(  # (its raw weights, trained fast, so that its flow moves)
        **{
            "data.source": "imagenet32_npz",
            "data.data_dir": data,
            "train.sample_every": 0,
            "train.learning_rate": 1e-2,
            "train.warmup_steps": 0,
            "eval.use_ema": False,
        }
    )
    config.mode = "train"
    workdir = str(root / "teacher")
    images.train(config, workdir, progress=False)
    return root, config, workdir


def _round(config, teacher_workdir, **extra):
    data = {"data.source": config.data.source, "data.data_dir": config.data.data_dir}
    c = small_config(**{**data, "train.sample_every": 0, **extra})
    c.mode = "train"
    c.reflow.teacher_workdir = teacher_workdir
    c.reflow.num_pairs = 8
    c.reflow.batch_size = 4
    return c


def test_a_reflow_round_trains_on_the_teachers_flow(teacher):
    root, config, teacher_dir = teacher
    c = _round(config, teacher_dir)
    workdir = str(root / "round1")
    mesh = sharding_lib.make_mesh()
    # step 0 of the round: the teacher's EMA weights, and the pairs are drawn
    state0, summary = images.train(c, workdir, stop_at=0, mesh=mesh)
    r = summary["reflow"]
    assert r["pairs_drawn_now"] == 8 and r["num_pairs"] == 8 and r["init"] == "teacher"
    assert 0 < r["pairs_seconds_all"] <= r["pairs_seconds"] and r["pairs_nfe_mean"] > 0
    t = reflow.Teacher(images.build(c, mesh), mesh)
    assert t.step == 4
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(state0.params), leaves(t.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # each stored pair is (x0, the teacher's flow of x0): solved again here, as drawn
    src = PairsSource(r["pairs_dir"])
    rows = [src[i] for i in range(4)]  # chunk 0
    x0 = np.stack([row["x0"] for row in rows])
    x1, _ = fmjax.sample(
        t.setup.velocity(t.params), x0, rtol=1e-3, atol=1e-3, t0=t.setup.t_range[0],
        t1=t.setup.t_range[1],
    )  # fmt: skip
    stored = np.stack([row["image"] for row in rows])
    moved = np.abs(stored - x0).mean()
    assert moved > 1e-2  # the pairs are not the identity
    np.testing.assert_allclose(stored, np.asarray(x1), atol=1e-5 * moved + 1e-6)
    assert np.std(x0) == pytest.approx(t.setup.source_std, rel=0.2)
    # train the round on them; the pairs are not drawn again
    _, summary = images.train(c, workdir, mesh=mesh)
    assert summary["end_step"] == 4 and summary["reflow"]["pairs_drawn_now"] == 0
    assert np.isfinite(summary["final_loss"])
    assert summary["dataset"].startswith("reflow pairs of")
    with open(os.path.join(r["pairs_dir"], "pairs.json")) as f:
        assert json.load(f)["teacher_step"] == 4
    # pairs drawn with other settings are never mixed with new ones
    other = _round(config, teacher_dir)
    other.reflow.rtol = 1e-2
    with pytest.raises(ConfigError, match=r"rtol=0.001 \(now 0.01\)"):
        images.train(other, workdir, mesh=mesh)
    # a killed generation redraws only its missing chunk, and draws the same pairs again
    before = np.load(os.path.join(r["pairs_dir"], "x1_00001.npy"))
    os.remove(os.path.join(r["pairs_dir"], "chunk_00001.json"))
    _, summary = images.train(c, workdir, mesh=mesh)
    assert summary["reflow"]["pairs_drawn_now"] == 4 and summary["end_step"] == 4
    np.testing.assert_allclose(
        np.load(os.path.join(r["pairs_dir"], "x1_00001.npy")), before, atol=1e-5
    )


def test_reflow_settings_that_cannot_work_are_refused(teacher, tmp_path):
    root, config, teacher_dir = teacher
    os.makedirs(tmp_path / "untrained" / "checkpoints")
    bad = [
        ({"reflow.teacher_workdir": str(tmp_path)}, "no checkpoints in"),
        ({"reflow.teacher_workdir": str(tmp_path / "untrained")}, "train the teacher first"),
        ({"reflow.init": "warm"}, "reflow.init must be one of"),
        ({"reflow.num_pairs": 0}, "reflow.num_pairs"),
        ({"reflow.solver": "euler"}, "adaptive solver"),
        ({"train.coupling": "ot"}, "train.coupling=independent"),
        ({"reflow.teacher_step": 3}, r"has checkpoints \[2, 4\]"),
        ({"model.num_res_blocks": 2}, "reflow.init=scratch"),
    ]
    for fields, message in bad:
        c = _round(config, teacher_dir)
        for dotted, value in fields.items():
            section, name = dotted.split(".")
            c[section][name] = value
        with pytest.raises(ConfigError, match=message):
            images.train(c, str(tmp_path / "student"), stop_at=0)
