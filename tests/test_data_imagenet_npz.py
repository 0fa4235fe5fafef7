"""The official downsampled-ImageNet reader (fmjax.data.imagenet_npz), directly and through
fmjax.data.images' pipelines."""

import pickle

import numpy as np
import pytest
from test_data_images import example_image, levels_of, train_iterator

from fmjax.data import imagenet_npz
from fmjax.data import images as di
from fmjax.data.sources import DatasetNotFoundError


def _official_batch(labels_1based, offset=0):
    """Official-format arrays: data (N, 3072) CHW-flattened, with known HWC images."""
    hwc = np.stack([example_image(offset + i) for i in range(len(labels_1based))])
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
    np.testing.assert_array_equal(b["image"][0, 3, 4], levels_of(np.array([11, 22, 33])))
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
        np.testing.assert_array_equal(seen[label], levels_of(hwc))
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


def _write(path, images_hwc, labels_1based):
    data = images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), -1)
    np.savez(path, data=data, labels=np.asarray(labels_1based))


def test_source_reads_files_in_order_lazily(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    _write(tmp_path / "train_data_batch_2.npz", b, [4, 5])
    _write(tmp_path / "train_data_batch_1.npz", a, [1, 2, 3])
    src = imagenet_npz.open_npz("imagenet32_npz", "train", tmp_path)
    assert isinstance(src, imagenet_npz.NpzImageSource) and len(src) == 5
    assert [f.name for f in src.files] == ["train_data_batch_1.npz", "train_data_batch_2.npz"]
    assert src._arrays == [None, None]  # nothing loaded by opening
    np.testing.assert_array_equal(src[1]["image"], a[1])
    np.testing.assert_array_equal(src[-1]["image"], b[1])
    assert [int(src[i]["label"]) for i in range(5)] == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(src))[3]["image"], b[0])
    with pytest.raises(IndexError):
        src[5]


def test_missing_split_says_what_it_looked_for(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"val_data\[\.npz\]"):
        imagenet_npz.open_npz("imagenet32_npz", "validation", tmp_path)


def test_imagenet64_keeps_every_pixels_row_column_and_channel(tmp_path):
    """64x64 batches in the official layout (train in two sub-folders, as the two zips
    unzip): pixel values encode (row, channel) in one image and (column, channel) in the
    other, so any transposition, flip or channel swap shows."""
    r, c, ch = np.meshgrid(np.arange(64), np.arange(64), np.arange(3), indexing="ij")
    by_row, by_col = (4 * r + ch).astype(np.uint8), (4 * c + ch).astype(np.uint8)
    hwc = np.stack([by_row, by_col])
    for part, k in (("Imagenet64_train_part1_npz", 1), ("Imagenet64_train_part2_npz", 6)):
        (tmp_path / part).mkdir()
        _write(tmp_path / part / f"train_data_batch_{k}.npz", hwc[::-1] if k == 6 else hwc, [k, 9])
    (tmp_path / "val").mkdir()
    # channel-major: the R plane, then G, then B, each row by row
    data = np.concatenate([(4 * r + ch)[..., j].reshape(-1) for j in range(3)])
    np.savez(tmp_path / "val" / "val_data.npz", data=data[None].astype(np.uint8), labels=[1000])
    src = di.open_source("imagenet64_npz", "train", tmp_path)
    assert len(src) == 4 and src.resolution == 64
    np.testing.assert_array_equal(src[0]["image"], by_row)
    np.testing.assert_array_equal(src[1]["image"], by_col)
    np.testing.assert_array_equal(src[2]["image"], by_col)  # batch 6, in the second folder
    assert [int(src[i]["label"]) for i in range(4)] == [0, 8, 5, 8]
    val = di.open_source("imagenet64_npz", "val_data", tmp_path, resolution=64)
    np.testing.assert_array_equal(val[0]["image"], by_row)
    b = next(di.make_eval_iterator("imagenet64_npz", global_batch_size=2, data_dir=tmp_path))
    assert b["image"].shape == (2, 64, 64, 3) and b["mask"].tolist() == [True, False]
    np.testing.assert_array_equal(b["image"][0], levels_of(by_row))
    t = next(train_iterator("imagenet64_npz", global_batch_size=4, data_dir=tmp_path))
    assert t["image"].shape == (4, 64, 64, 3)
    # the 32x32 reader refuses 64x64 rows (when it reads them), saying what it expected
    part1 = tmp_path / "Imagenet64_train_part1_npz" / "train_data_batch_1.npz"
    with pytest.raises(ValueError, match=r"\(N, 3072\) \(32x32 RGB images\).*\(2, 12288\)"):
        imagenet_npz.NpzImageSource([part1])[0]
    with pytest.raises(ValueError, match="holds 64x64 images, but resolution 32"):
        di.open_source("imagenet64_npz", "train", tmp_path, resolution=32)
    with pytest.raises(DatasetNotFoundError, match="Imagenet64_train_part1_npz.zip"):
        di.num_examples("imagenet64_npz", "train", tmp_path / "val")
