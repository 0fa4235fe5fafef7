"""Data sources (fmjax.data.sources): the source table and a TFDS copy that is not there."""

import pytest

from fmjax.data import sources


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
