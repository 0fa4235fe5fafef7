"""Tests for fmjax.data.images (TF-free; nothing is downloaded).

The TFDS path is exercised three ways:
* ``tfds.testing.mock_data(num_examples=...)`` with its random generator: in TFDS
  4.9.10 it patches ``DatasetBuilder.as_data_source`` (no TensorFlow needed for
  ``tfds.data_source``) with a ``MockPolicy.USE_CODE`` fallback when no metadata is
  present;
* ``mock_data(as_data_source_fn=...)`` returning a list of records whose label is
  the example index, so examples can be identified across batches/processes;
* a real tiny array_record ``cifar10`` written to ``tmp_path`` through the real
  builder (PNG encoding patched to PIL, since TFDS's encoder needs TF), read back
  with ``tfds.data_source`` (real PNG decoding via PIL).
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from fmjax.data import images as di

H, W, C = di.IMAGE_SHAPE


def _image(i: int) -> np.ndarray:
    return np.random.default_rng(1000 + i).integers(0, 256, di.IMAGE_SHAPE, dtype=np.uint8)


def _level(image_uint8: np.ndarray) -> np.ndarray:
    return image_uint8.astype(np.float32) / 256 * 2 - 1


@contextlib.contextmanager
def indexed_tfds(n: int, *, labels: bool = True):
    """Mocks every TFDS data source as n records with image _image(i) and label i."""
    records = []
    for i in range(n):
        rec = {"image": _image(i)}
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


def _train(source="imagenet_resized/32x32", **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    kw.setdefault("seed", 0)
    return di.make_train_iterator(source, **kw)


# ----------------------------------------------------------------------------- sources


def test_sources_table_and_unknown_source():
    assert di.SOURCES["imagenet_resized/32x32"][2] == "validation"
    assert di.SOURCES["downsampled_imagenet/32x32"][2] == "validation"
    assert di.SOURCES["cifar10"][2] == "test"
    assert di.SOURCES["imagenet32_npz"] == ("npz", "train", "val_data")
    assert di.DEFAULT_SOURCE == "imagenet_resized/32x32"
    for call in (
        lambda: _train("mnist", global_batch_size=2),
        lambda: di.make_eval_iterator("mnist", global_batch_size=2),
        lambda: di.num_examples("mnist", "train"),
    ):
        with pytest.raises(ValueError, match="cifar10") as err:
            call()
        assert "imagenet32_npz" in str(err.value) and "mnist" in str(err.value)


@pytest.mark.parametrize("source", ["imagenet_resized/32x32", "cifar10"])
def test_mock_data_random_generator(source):
    with tfds.testing.mock_data(num_examples=10):
        assert di.num_examples(source, "train") == 10
        it = _train(source, global_batch_size=4, seed=3)
        batches = _take(it, 5)  # crosses epoch boundaries (10 examples)
    for b in batches:
        assert set(b) == {"image", "label"}
        assert b["image"].dtype == np.float32 and b["image"].shape == (4, H, W, C)
        assert b["label"].dtype == np.int32 and b["label"].shape == (4,)
        assert b["image"].min() >= -1.0 and b["image"].max() < 1.0


def test_downsampled_imagenet_has_no_label():
    with indexed_tfds(6, labels=False):
        b = next(_train("downsampled_imagenet/32x32", global_batch_size=3))
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
        next(_train("cifar10", global_batch_size=2))


# ----------------------------------------------------------------------------- values


def test_dequantized_values_in_range_and_within_one_bin():
    n = 12
    with indexed_tfds(n):
        b = next(_train(global_batch_size=n, random_flip=False, dequantize=True))
    y = b["image"]
    assert y.min() >= -1.0 and y.max() < 1.0
    levels = np.stack([_level(_image(i)) for i in b["label"]])
    diff = y - levels
    assert diff.min() >= -1e-6 and diff.max() < 1 / 128 + 1e-6
    assert diff.std() > 1e-3  # noise was actually added
    assert sorted(b["label"]) == list(range(n))


def test_non_dequantized_values_are_exact_levels():
    with indexed_tfds(8):
        b = next(_train(global_batch_size=8, random_flip=False, dequantize=False))
    for img, label in zip(b["image"], b["label"], strict=True):
        np.testing.assert_array_equal(img, _level(_image(int(label))))
        np.testing.assert_array_equal(di.to_uint8(img), _image(int(label)))


def test_dequantize_helpers_numpy_and_jax():
    import jax

    x = np.full((1000,), 255, np.uint8)
    v = di.dequantize(x, np.random.default_rng(0))
    assert v.dtype == np.float32 and v.min() >= 255 / 256 and v.max() < 1.0
    y = di.to_model_space(v)
    assert y.dtype == np.float32 and y.max() < 1.0
    np.testing.assert_array_equal(di.to_uint8(y), x)
    vj = np.asarray(di.dequantize(np.arange(256, dtype=np.uint8), jax.random.key(0)))
    assert (vj >= np.arange(256) / 256).all() and (vj < (np.arange(256) + 1) / 256).all()
    assert di.to_model_space(np.float32(0.0)) == -1.0


# ----------------------------------------------------------------------------- npz


def _official_batch(labels_1based, offset=0):
    """Official-format arrays: data (N, 3072) CHW-flattened, with known HWC images."""
    hwc = np.stack([_image(offset + i) for i in range(len(labels_1based))])
    # Channel 0/1/2 get distinct constant offsets in pixel (0, 0) to pin the order.
    hwc[:, 0, 0] = [10, 20, 30]
    data = hwc.transpose(0, 3, 1, 2).reshape(len(hwc), -1)
    return hwc, {"data": data, "labels": np.asarray(labels_1based), "mean": np.zeros(3072)}


def test_npz_chw_to_hwc_with_known_channel_values(tmp_path):
    # Per-channel constant images: R plane = 11, G plane = 22, B plane = 33.
    data = np.concatenate([np.full(1024, 11), np.full(1024, 22), np.full(1024, 33)])
    data = np.stack([data, data[::-1]]).astype(np.uint8)  # 2nd: B=11, G=22, R=33
    np.savez(tmp_path / "val_data.npz", data=data, labels=np.array([1, 1000]))
    src = di.open_source("imagenet32_npz", "val_data", tmp_path)
    assert len(src) == 2
    np.testing.assert_array_equal(src[0]["image"][5, 7], [11, 22, 33])
    assert (src[0]["image"] == np.array([11, 22, 33], np.uint8)).all()
    assert (src[1]["image"] == np.array([33, 22, 11], np.uint8)).all()
    assert src[0]["label"] == 0 and src[1]["label"] == 999  # 1-based -> 0-based
    b = next(
        di.make_eval_iterator(
            "imagenet32_npz",
            global_batch_size=2,
            data_dir=tmp_path,
            process_index=0,
            process_count=1,
        )
    )
    np.testing.assert_array_equal(b["image"][0, 3, 4], _level(np.array([11, 22, 33])))
    np.testing.assert_array_equal(b["label"], [0, 999])


@pytest.mark.parametrize("pickled", [False, True])
def test_npz_official_format_train_and_val(tmp_path, pickled):
    sub = tmp_path / "Imagenet32_train_npz"  # files may sit in a sub-folder
    sub.mkdir()
    expected = {}
    offset = 0
    for k, n in [(1, 3), (2, 4), (10, 2)]:  # numeric (not lexicographic) file order
        labels = np.arange(offset, offset + n) % 1000 + 1
        hwc, d = _official_batch(labels, offset)
        for j in range(n):
            expected[offset + j] = (hwc[j], labels[j] - 1)
        name = f"train_data_batch_{k}"
        if pickled:
            with open(sub / name, "wb") as f:
                pickle.dump(d, f)
        else:
            np.savez(sub / f"{name}.npz", **d)
        offset += n
    _, dval = _official_batch([5, 6, 7], 100)
    if pickled:
        with open(tmp_path / "val_data", "wb") as f:
            pickle.dump(dval, f)
    else:
        np.savez(tmp_path / "val_data.npz", **dval)

    assert di.num_examples("imagenet32_npz", "train", tmp_path) == 9
    assert di.num_examples("imagenet32_npz", "val_data", tmp_path) == 3
    assert di.num_examples("imagenet32_npz", "train_data_batch_2", tmp_path) == 4
    src = di.open_source("imagenet32_npz", "train", tmp_path)
    # opening counts the examples but holds no file in memory (pickled batches were kept)
    assert src._arrays == [None, None, None]
    assert [f.name for f in src.files] == [
        f"train_data_batch_{k}" + ("" if pickled else ".npz") for k in (1, 2, 10)
    ]
    for i, (hwc, label) in expected.items():
        np.testing.assert_array_equal(src[i]["image"], hwc)
        np.testing.assert_array_equal(src[i]["image"][0, 0], [10, 20, 30])
        assert src[i]["label"] == label
    # The source pickles without its arrays and reloads them (grain workers).
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone[8]["image"], expected[8][0])

    it = di.make_train_iterator(
        "imagenet32_npz",
        global_batch_size=9,
        seed=0,
        data_dir=tmp_path,
        random_flip=False,
        dequantize=False,
        process_index=0,
        process_count=1,
    )
    b = next(it)
    seen = {}
    for img, label in zip(b["image"], b["label"], strict=True):
        seen[int(label)] = img
    assert len(seen) == 9
    for hwc, label in expected.values():
        np.testing.assert_array_equal(seen[label], _level(hwc))
    e = list(
        di.make_eval_iterator(
            "imagenet32_npz",
            global_batch_size=2,
            data_dir=tmp_path,
            process_index=0,
            process_count=1,
        )
    )
    assert [x["label"].tolist() for x in e] == [[4, 5], [6, 0]]
    assert [x["mask"].tolist() for x in e] == [[True, True], [True, False]]


def test_npz_missing_files(tmp_path):
    with pytest.raises(di.DatasetNotFoundError) as err:
        di.num_examples("imagenet32_npz", "train", tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "train_data_batch_1" in msg
    assert "Imagenet32_train_npz.zip" in msg
    assert isinstance(err.value, FileNotFoundError)
    assert err.value.data_dir == str(tmp_path) and err.value.split == "train"
    with pytest.raises(di.DatasetNotFoundError, match="needs data_dir"):
        di.make_eval_iterator("imagenet32_npz", global_batch_size=2)


# ----------------------------------------------------------------------------- TFDS errors


@pytest.mark.parametrize(
    "source, name",
    [
        ("imagenet_resized/32x32", "imagenet_resized/32x32"),
        ("downsampled_imagenet/32x32", "downsampled_imagenet/32x32"),
        ("cifar10", "cifar10"),
    ],
)
def test_missing_tfds_dataset(tmp_path, source, name):
    data_dir = tmp_path / "empty_tfds"
    with pytest.raises(di.DatasetNotFoundError) as err:
        di.make_train_iterator(
            source, global_batch_size=2, seed=0, data_dir=data_dir, process_index=0, process_count=1
        )
    msg = str(err.value)
    assert str(data_dir) in msg and name in msg and "'train'" in msg
    assert f"tfds build {name}" in msg and "array_record" in msg
    assert not (data_dir / "downloads").exists() or not any((data_dir / "downloads").iterdir())
    with pytest.raises(di.DatasetNotFoundError, match=r"validation|test"):
        di.make_eval_iterator(
            source, global_batch_size=2, data_dir=data_dir, process_index=0, process_count=1
        )


def _write_tiny_cifar10(data_dir, monkeypatch, n_train=7, n_test=5):
    """Writes a real array_record cifar10 through the real builder, without TF."""
    from PIL import Image as PILImage
    from tensorflow_datasets.core.features import image_feature

    def encode_png(self, image):
        buf = io.BytesIO()
        PILImage.fromarray(np.asarray(image)).save(buf, format="PNG")
        return buf.getvalue()

    builder = tfds.builder("cifar10", data_dir=data_dir, file_format="array_record")
    monkeypatch.setattr(image_feature.Image, "encode_example", encode_png)
    # No checksums lookup (its classproperty needs importlib_resources, absent here).
    # monkeypatch.setattr would evaluate the old classproperty, so patch by hand.
    cls = type(builder)
    assert "url_infos" not in vars(cls)
    cls.url_infos = {}

    def gen(offset, n):
        for i in range(n):
            yield (
                f"k{offset + i}",
                {"id": f"id{offset + i}", "image": _image(offset + i), "label": (offset + i) % 10},
            )

    monkeypatch.setattr(
        builder,
        "_split_generators",
        lambda dl_manager: {"train": gen(0, n_train), "test": gen(100, n_test)},
    )
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    finally:
        del cls.url_infos


def test_real_array_record_tfds_dataset(tmp_path, monkeypatch):
    data_dir = tmp_path / "tfds"
    _write_tiny_cifar10(data_dir, monkeypatch)
    monkeypatch.undo()  # reading must not need any patch
    assert di.num_examples("cifar10", "train", data_dir) == 7
    assert di.num_examples("cifar10", "test", data_dir) == 5
    e = list(
        di.make_eval_iterator(
            "cifar10", global_batch_size=4, data_dir=data_dir, process_index=0, process_count=1
        )
    )
    assert len(e) == 2
    mask = np.concatenate([x["mask"] for x in e])
    assert mask.tolist() == [True] * 5 + [False] * 3
    by_label = {i % 10: _image(i) for i in range(100, 105)}
    imgs = np.concatenate([x["image"] for x in e])[mask]
    labels = np.concatenate([x["label"] for x in e])[mask]
    assert sorted(labels.tolist()) == sorted(by_label)
    for img, label in zip(imgs, labels, strict=True):  # PNG round trip is lossless
        np.testing.assert_array_equal(img, _level(by_label[int(label)]))
    b = next(
        di.make_train_iterator(
            "cifar10",
            global_batch_size=7,
            seed=1,
            data_dir=data_dir,
            process_index=0,
            process_count=1,
        )
    )
    assert sorted(b["label"].tolist()) == sorted(i % 10 for i in range(7))
    # A split that does not exist is not reported as a missing dataset.
    with pytest.raises(Exception) as err:
        di.num_examples("cifar10", "validation", data_dir)
    assert not isinstance(err.value, di.DatasetNotFoundError)


def test_tfrecord_only_copy_is_reported_with_conversion_hint(tmp_path, monkeypatch):
    data_dir = tmp_path / "tfds"
    _write_tiny_cifar10(data_dir, monkeypatch, n_train=2, n_test=2)
    monkeypatch.undo()
    # Pretend the copy was prepared in the default tfrecord format (writing real
    # tfrecords would need TensorFlow).
    info = next(data_dir.rglob("dataset_info.json"))
    info.write_text(info.read_text().replace('"array_record"', '"tfrecord"'))
    with pytest.raises(di.DatasetNotFoundError) as err:
        di.num_examples("cifar10", "train", data_dir)
    msg = str(err.value)
    assert "tfrecord" in msg and "--file_format=array_record" in msg and str(data_dir) in msg


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_batches_different_seed_different():
    with indexed_tfds(20):
        a = _take(_train(global_batch_size=4, seed=7), 6)
        b = _take(_train(global_batch_size=4, seed=7), 6)
        c = _take(_train(global_batch_size=4, seed=8), 6)
    _assert_batches_equal(a, b)
    assert not all(np.array_equal(x["label"], y["label"]) for x, y in zip(a, c, strict=True))
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_reshuffled_each_epoch_and_every_epoch_complete():
    n = 16
    with indexed_tfds(n):
        epochs = [b["label"].tolist() for b in _take(_train(global_batch_size=n, seed=0), 3)]
    for ep in epochs:
        assert sorted(ep) == list(range(n))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert epochs[0] != list(range(n))


def test_num_epochs_stops():
    with indexed_tfds(10):
        batches = list(_train(global_batch_size=4, num_epochs=2))  # floor(20 / 4) = 5
        assert len(batches) == 5
        labels = np.concatenate([b["label"] for b in batches])
        assert sorted(labels[:10].tolist()) == list(range(10))
        with pytest.raises(ValueError, match="fewer than one global batch"):
            _train(global_batch_size=32, num_epochs=2)


# ----------------------------------------------------------------------------- sharding


def test_per_process_slices_partition_the_global_batch():
    g = 8  # 24 % 8 == 0: no global batch straddles an epoch, so labels are unique in it
    with indexed_tfds(24):
        whole = _take(_train(global_batch_size=g, seed=5), 6)
        parts = [
            _take(_train(global_batch_size=g, seed=5, process_index=p, process_count=2), 6)
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
            _train(global_batch_size=5, process_count=2)
        with pytest.raises(ValueError, match="not divisible by process_count"):
            di.make_eval_iterator("cifar10", global_batch_size=7, process_index=0, process_count=2)
        with pytest.raises(ValueError, match="process_index"):
            _train(global_batch_size=4, process_index=2, process_count=2)
        # Defaults come from jax (single process here).
        b = next(di.make_train_iterator("cifar10", global_batch_size=4, seed=0))
        assert b["image"].shape[0] == 4


# ----------------------------------------------------------------------------- flip


def test_random_flip_flips_some_deterministically():
    n = 32
    with indexed_tfds(n):
        runs = [
            next(_train(global_batch_size=n, seed=11, dequantize=False, random_flip=flip))
            for flip in (True, True, False)
        ]

    def flipped(batch):
        out = []
        for img, label in zip(batch["image"], batch["label"], strict=True):
            ref = _level(_image(int(label)))
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
                ref = _level(_image(int(label)))  # no flip, no shuffle
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
        reference = _take(_train(**kw), total)
        it = _train(**kw)
        head = _take(it, k)
        state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable
        del it
        fresh = _train(**kw)
        fresh.set_state(state)
        tail = _take(fresh, total - k)
    _assert_batches_equal(head + tail, reference)


def test_orbax_checkpoint_of_iterator_state(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    kw = {"global_batch_size": 4, "seed": 9}
    with indexed_tfds(10):
        reference = _take(_train(**kw), 6)
        it = _train(**kw)
        head = _take(it, 2)
        with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
            mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
            mngr.wait_until_finished()
        fresh = _train(**kw)
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
