"""Tests for fmjax.data.images: determinism, sharding, epochs, eval padding and masks,
exact resume (TF-free; nothing is downloaded).

The TFDS path is exercised two ways here (a real tiny array_record copy is in
test_data_sources):
* ``tfds.testing.mock_data(num_examples=...)`` with its random generator: in TFDS
  4.9.10 it patches ``DatasetBuilder.as_data_source`` (no TensorFlow needed for
  ``tfds.data_source``) with a ``MockPolicy.USE_CODE`` fallback when no metadata is
  present;
* ``mock_data(as_data_source_fn=...)`` returning a list of records whose label is
  the example index, so examples can be identified across batches/processes.
"""

from __future__ import annotations

import contextlib
import json

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from fmjax.data import images as di

H, W, C = di.IMAGE_SHAPE


def example_image(i: int) -> np.ndarray:
    return np.random.default_rng(1000 + i).integers(0, 256, di.IMAGE_SHAPE, dtype=np.uint8)


def levels_of(image_uint8: np.ndarray) -> np.ndarray:
    return image_uint8.astype(np.float32) / 256 * 2 - 1


@contextlib.contextmanager
def indexed_tfds(n: int, *, labels: bool = True):
    """Mocks every TFDS data source as n records with image example_image(i) and label i."""
    records = []
    for i in range(n):
        rec = {"image": example_image(i)}
        if labels:
            rec["label"] = np.int64(i)
        records.append(rec)

    def as_data_source(self, split, decoders=None, deserialize_method=None, **kwargs):
        del self, split, decoders, deserialize_method, kwargs
        return list(records)

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        yield


def _take(it, k):
    return [next(it) for _ in range(k)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def train_iterator(source="imagenet_resized/32x32", **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    kw.setdefault("seed", 0)
    return di.make_train_iterator(source, **kw)


# ----------------------------------------------------------------------------- sources


@pytest.mark.parametrize("source", ["imagenet_resized/32x32", "cifar10"])
def test_mock_data_random_generator(source):
    with tfds.testing.mock_data(num_examples=10):
        assert di.num_examples(source, "train") == 10
        it = train_iterator(source, global_batch_size=4, seed=3)
        batches = _take(it, 5)  # crosses epoch boundaries (10 examples)
    for b in batches:
        assert set(b) == {"image", "label"}
        assert b["image"].dtype == np.float32 and b["image"].shape == (4, H, W, C)
        assert b["label"].dtype == np.int32 and b["label"].shape == (4,)
        assert b["image"].min() >= -1.0 and b["image"].max() < 1.0


def test_downsampled_imagenet_has_no_label():
    with indexed_tfds(6, labels=False):
        b = next(train_iterator("downsampled_imagenet/32x32", global_batch_size=3))
        e = next(di.make_eval_iterator("downsampled_imagenet/32x32", global_batch_size=3))
    np.testing.assert_array_equal(b["label"], [di.NO_LABEL] * 3)
    np.testing.assert_array_equal(e["label"], [di.NO_LABEL] * 3)


def test_wrong_image_shape_is_reported():
    def as_data_source(self, split, **kwargs):
        return [{"image": np.zeros((8, 8, 3), np.uint8), "label": 0}] * 4

    with (
        tfds.testing.mock_data(as_data_source_fn=as_data_source),
        pytest.raises(ValueError, match=r"\(32, 32, 3\)"),
    ):
        next(train_iterator("cifar10", global_batch_size=2))


# ----------------------------------------------------------------------------- values


def test_dequantized_values_in_range_and_within_one_bin():
    n = 12
    with indexed_tfds(n):
        b = next(train_iterator(global_batch_size=n, random_flip=False, dequantize=True))
    y = b["image"]
    assert y.min() >= -1.0 and y.max() < 1.0
    levels = np.stack([levels_of(example_image(i)) for i in b["label"]])
    diff = y - levels
    assert diff.min() >= -1e-6 and diff.max() < 1 / 128 + 1e-6
    assert diff.std() > 1e-3  # noise was actually added
    assert sorted(b["label"]) == list(range(n))


def test_non_dequantized_values_are_exact_levels():
    with indexed_tfds(8):
        b = next(train_iterator(global_batch_size=8, random_flip=False, dequantize=False))
    for img, label in zip(b["image"], b["label"], strict=True):
        np.testing.assert_array_equal(img, levels_of(example_image(int(label))))
        np.testing.assert_array_equal(di.to_uint8(img), example_image(int(label)))


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_batches_different_seed_different():
    with indexed_tfds(20):
        a = _take(train_iterator(global_batch_size=4, seed=7), 6)
        b = _take(train_iterator(global_batch_size=4, seed=7), 6)
        c = _take(train_iterator(global_batch_size=4, seed=8), 6)
    _assert_batches_equal(a, b)
    assert not all(np.array_equal(x["label"], y["label"]) for x, y in zip(a, c, strict=True))
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_reshuffled_each_epoch_and_every_epoch_complete():
    n = 16
    with indexed_tfds(n):
        epochs = [
            b["label"].tolist() for b in _take(train_iterator(global_batch_size=n, seed=0), 3)
        ]
    for ep in epochs:
        assert sorted(ep) == list(range(n))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert epochs[0] != list(range(n))


def test_num_epochs_stops():
    with indexed_tfds(10):
        batches = list(train_iterator(global_batch_size=4, num_epochs=2))  # floor(20 / 4) = 5
        assert len(batches) == 5
        labels = np.concatenate([b["label"] for b in batches])
        assert sorted(labels[:10].tolist()) == list(range(10))
        with pytest.raises(ValueError, match="fewer than one global batch"):
            train_iterator(global_batch_size=32, num_epochs=2)


# ----------------------------------------------------------------------------- sharding


def test_per_process_slices_partition_the_global_batch():
    g = 8  # 24 % 8 == 0: no global batch straddles an epoch, so labels are unique in it
    with indexed_tfds(24):
        whole = _take(train_iterator(global_batch_size=g, seed=5), 6)
        parts = [
            _take(train_iterator(global_batch_size=g, seed=5, process_index=p, process_count=2), 6)
            for p in range(2)
        ]
    for step, full in enumerate(whole):
        assert len(set(full["label"].tolist())) == g
        p0, p1 = parts[0][step], parts[1][step]
        assert p0["image"].shape == (g // 2, H, W, C)
        assert not set(p0["label"].tolist()) & set(p1["label"].tolist())
        assert set(p0["label"].tolist()) | set(p1["label"].tolist()) == set(full["label"].tolist())
        # Process p holds exactly slice [p*B, (p+1)*B) of the global batch, noise included.
        for key in full:
            np.testing.assert_array_equal(np.concatenate([p0[key], p1[key]]), full[key])


def test_process_layout_validation():
    with indexed_tfds(8):
        with pytest.raises(ValueError, match="not divisible by process_count"):
            train_iterator(global_batch_size=5, process_count=2)
        with pytest.raises(ValueError, match="not divisible by process_count"):
            di.make_eval_iterator("cifar10", global_batch_size=7, process_index=0, process_count=2)
        with pytest.raises(ValueError, match="process_index"):
            train_iterator(global_batch_size=4, process_index=2, process_count=2)
        # Defaults come from jax (single process here).
        b = next(di.make_train_iterator("cifar10", global_batch_size=4, seed=0))
        assert b["image"].shape[0] == 4


# ----------------------------------------------------------------------------- flip


def test_random_flip_flips_some_deterministically():
    n = 32
    with indexed_tfds(n):
        runs = [
            next(train_iterator(global_batch_size=n, seed=11, dequantize=False, random_flip=flip))
            for flip in (True, True, False)
        ]

    def flipped(batch):
        out = []
        for img, label in zip(batch["image"], batch["label"], strict=True):
            ref = levels_of(example_image(int(label)))
            if np.array_equal(img, ref):
                out.append(False)
            else:
                np.testing.assert_array_equal(img, ref[:, ::-1])
                out.append(True)
        return out

    f = flipped(runs[0])
    assert 0 < sum(f) < n
    assert flipped(runs[1]) == f
    assert runs[0]["label"].tolist() == runs[2]["label"].tolist()
    assert not any(flipped(runs[2]))


# ----------------------------------------------------------------------------- eval


@pytest.mark.parametrize("dequantize", [False, True])
def test_eval_covers_every_example_once_with_padding(dequantize):
    n, g = 23, 8  # 23 % 8 != 0 -> last global batch padded with 1 example
    with indexed_tfds(n):
        per_proc = [
            list(
                di.make_eval_iterator(
                    "cifar10",
                    global_batch_size=g,
                    process_index=p,
                    process_count=2,
                    dequantize=dequantize,
                )
            )
            for p in range(2)
        ]
        assert di.num_examples("cifar10", "test") == n
    assert [len(x) for x in per_proc] == [3, 3]  # ceil(23 / 8) batches each
    labels, masks = [], []
    for step in range(3):
        for p in range(2):
            b = per_proc[p][step]
            assert set(b) == {"image", "label", "mask"}
            assert b["image"].shape == (4, H, W, C) and b["image"].dtype == np.float32
            assert b["mask"].dtype == np.bool_ and b["label"].dtype == np.int32
            for img, label, m in zip(b["image"], b["label"], b["mask"], strict=True):
                if not m:
                    continue
                ref = levels_of(example_image(int(label)))  # no flip, no shuffle
                if dequantize:
                    assert ((img - ref) >= -1e-6).all() and ((img - ref) < 1 / 128 + 1e-6).all()
                else:
                    np.testing.assert_array_equal(img, ref)
            labels.extend(b["label"].tolist())
            masks.extend(b["mask"].tolist())
    assert masks == [True] * n + [False]
    assert labels[:n] == list(range(n))  # in order, each exactly once


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("k", [0, 3])
def test_exact_resume_from_iterator_state(k):
    total = 8  # 8 batches of 6 over 20 examples: crosses epoch boundaries
    kw = {"global_batch_size": 6, "seed": 2, "process_index": 1, "process_count": 2}
    with indexed_tfds(20):
        reference = _take(train_iterator(**kw), total)
        it = train_iterator(**kw)
        head = _take(it, k)
        state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable
        del it
        fresh = train_iterator(**kw)
        fresh.set_state(state)
        tail = _take(fresh, total - k)
    _assert_batches_equal(head + tail, reference)


def test_orbax_checkpoint_of_iterator_state(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    kw = {"global_batch_size": 4, "seed": 9}
    with indexed_tfds(10):
        reference = _take(train_iterator(**kw), 6)
        it = train_iterator(**kw)
        head = _take(it, 2)
        with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
            mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
            mngr.wait_until_finished()
        fresh = train_iterator(**kw)
        with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
            mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
        tail = _take(fresh, 4)
    _assert_batches_equal(head + tail, reference)
    saved = list((tmp_path / "ckpt").rglob("process_0-of-1.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text()) == {"next_index": 2}


@pytest.mark.slow
def test_worker_processes_same_batches_and_resume(tmp_path):
    # ~10 s on 2 cores (spawning grain workers); excluded from the default run.
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "train_data_batch_1.npz",
        labels=np.arange(1, 41),
        data=rng.integers(0, 256, (40, 3072), dtype=np.uint8),
    )
    kw = {
        "global_batch_size": 8,
        "seed": 1,
        "data_dir": tmp_path,
        "process_index": 0,
        "process_count": 1,
    }
    reference = _take(di.make_train_iterator("imagenet32_npz", **kw), 12)
    it = di.make_train_iterator("imagenet32_npz", worker_count=2, **kw)
    head = _take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    it.close()
    fresh = di.make_train_iterator("imagenet32_npz", worker_count=2, **kw)
    fresh.set_state(state)
    tail = _take(fresh, 7)
    fresh.close()
    _assert_batches_equal(head + tail, reference)
