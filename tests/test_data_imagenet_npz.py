"""The official downsampled-ImageNet reader (fmjax.data.imagenet_npz) on small files."""

import pickle

import numpy as np
import pytest

from fmjax.data import imagenet_npz
from fmjax.data.sources import DatasetNotFoundError


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
