"""Data sources (fmjax.data.sources, through fmjax.data.images' pipelines): the source
table, a TFDS copy that is not there or only in tfrecord format, and a real tiny
array_record ``cifar10`` written to ``tmp_path`` through the real builder (PNG encoding
patched to PIL, since TFDS's encoder needs TF), read back with ``tfds.data_source`` (real PNG
decoding via PIL)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from test_data_images import example_image, levels_of, train_iterator

from fmjax.data import images as di
from fmjax.data import sources


def test_sources_table_and_unknown_source():
    assert di.SOURCES["imagenet_resized/32x32"][2] == "validation"
    assert di.SOURCES["downsampled_imagenet/32x32"][2] == "validation"
    assert di.SOURCES["cifar10"][2] == "test"
    assert di.SOURCES["imagenet32_npz"] == ("npz", "train", "val_data")
    assert di.DEFAULT_SOURCE == "imagenet_resized/32x32"
    for call in (
        lambda: train_iterator("mnist", global_batch_size=2),
        lambda: di.make_eval_iterator("mnist", global_batch_size=2),
        lambda: di.num_examples("mnist", "train"),
    ):
        with pytest.raises(ValueError, match="cifar10") as err:
            call()
        assert "imagenet32_npz" in str(err.value) and "mnist" in str(err.value)


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
                {
                    "id": f"id{offset + i}",
                    "image": example_image(offset + i),
                    "label": (offset + i) % 10,
                },
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
    by_label = {i % 10: example_image(i) for i in range(100, 105)}
    imgs = np.concatenate([x["image"] for x in e])[mask]
    labels = np.concatenate([x["label"] for x in e])[mask]
    assert sorted(labels.tolist()) == sorted(by_label)
    for img, label in zip(imgs, labels, strict=True):  # PNG round trip is lossless
        np.testing.assert_array_equal(img, levels_of(by_label[int(label)]))
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


def test_lookup_source_lists_the_known_sources():
    assert sources.lookup_source("cifar10") == ("cifar10", "train", "test")
    assert sources.lookup_source(sources.DEFAULT_SOURCE) == sources.SOURCES[sources.DEFAULT_SOURCE]
    with pytest.raises(ValueError, match="mnist") as err:
        sources.lookup_source("mnist")
    assert all(name in str(err.value) for name in sources.SOURCES)


def test_open_tfds_without_a_prepared_copy(tmp_path):
    with pytest.raises(sources.DatasetNotFoundError) as err:
        sources.open_tfds("cifar10", "train", tmp_path / "none")
    assert isinstance(err.value, FileNotFoundError)
    assert err.value.source == "cifar10" and err.value.split == "train"
    assert "tfds build cifar10" in str(err.value)
