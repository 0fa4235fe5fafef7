"""Image data sources: the names the pipelines accept, their resolutions, and opening their
TFDS copies.

Sources (``SOURCES``)
---------------------
``"imagenet_resized/32x32"`` (default), ``"imagenet_resized/64x64"``
    TFDS ``imagenet_resized``: the Chrabaszcz et al. (2017) box-resized ImageNet used by
    the Flow Matching paper.  Splits ``train`` / ``validation``.
``"downsampled_imagenet/32x32"``, ``"downsampled_imagenet/64x64"``
    TFDS ``downsampled_imagenet`` (van den Oord et al., 2016).  Splits ``train`` /
    ``validation``.  This dataset has no labels: ``label`` is ``NO_LABEL`` (-1).
``"cifar10"``
    TFDS ``cifar10``.  Splits ``train`` / ``test``.
``"imagenet32_npz"``, ``"imagenet64_npz"``
    The official Chrabaszcz et al. (2017) ``.npz`` (or pickled) batches in ``data_dir``,
    read by :mod:`fmjax.data.imagenet_npz` (see there for the files and split names).
    Splits ``train`` / ``val_data``.
``"folder"``
    A folder of the user's PNG / JPEG files (optionally one sub-folder per class), or
    its one-time conversion to arrays, at any resolution, read by :mod:`fmjax.data.folder`.
    Splits ``train`` / ``eval`` (a fixed hash of each file's path; see there).

Every source but ``"folder"`` holds images of one size (``SOURCE_RESOLUTIONS``);
:func:`image_shape` is the ``(R, R, 3)`` of a resolution.  Nothing is ever downloaded: a
missing dataset raises ``DatasetNotFoundError``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_SOURCE",
    "DOWNSAMPLED_IMAGENET_URL",
    "IMAGE_SHAPE",
    "NO_LABEL",
    "SOURCES",
    "SOURCE_RESOLUTIONS",
    "DatasetNotFoundError",
    "image_shape",
    "lookup_source",
    "open_tfds",
    "source_resolution",
]

#: Shape of one image at the default resolution 32, ``(height, width, channels)``; other
#: resolutions: :func:`image_shape`.
IMAGE_SHAPE: tuple[int, int, int] = (32, 32, 3)
#: Label of examples without a class (e.g. unlabeled npz batches).
NO_LABEL = -1
#: The paper's ImageNet-32 (Chrabaszcz et al. 2017 preprocessing).
DEFAULT_SOURCE = "imagenet_resized/32x32"

#: Data sources: name -> (TFDS name, ``"npz"`` or ``"folder"``, default train split, default
#: eval split).
SOURCES: dict[str, tuple[str, str, str]] = {
    "imagenet_resized/32x32": ("imagenet_resized/32x32", "train", "validation"),
    "downsampled_imagenet/32x32": ("downsampled_imagenet/32x32", "train", "validation"),
    "cifar10": ("cifar10", "train", "test"),
    "imagenet32_npz": ("npz", "train", "val_data"),
    "imagenet_resized/64x64": ("imagenet_resized/64x64", "train", "validation"),
    "downsampled_imagenet/64x64": ("downsampled_imagenet/64x64", "train", "validation"),
    "imagenet64_npz": ("npz", "train", "val_data"),
    "folder": ("folder", "train", "eval"),
}

#: The one resolution of each source's images (``"folder"``: any, so not listed).
SOURCE_RESOLUTIONS: dict[str, int] = {
    "imagenet_resized/32x32": 32,
    "downsampled_imagenet/32x32": 32,
    "cifar10": 32,
    "imagenet32_npz": 32,
    "imagenet_resized/64x64": 64,
    "downsampled_imagenet/64x64": 64,
    "imagenet64_npz": 64,
}

#: Where the official downsampled-ImageNet files are downloaded (by hand).
DOWNSAMPLED_IMAGENET_URL = "https://image-net.org/download-images.php"

_HOW_TO_PROVIDE: dict[str, str] = {
    "imagenet_resized/32x32": (
        "download Imagenet32_train_npz.zip and Imagenet32_val_npz.zip "
        f"('downsampled images', {DOWNSAMPLED_IMAGENET_URL}) and either (a) unzip them "
        "into one folder and use source='imagenet32_npz' with data_dir=<that folder> "
        "(no TFDS build needed), or (b) prepare the TFDS copy on a machine that can "
        "fetch them: `tfds build imagenet_resized/32x32 --data_dir=<DIR> "
        "--file_format=array_record` and point data_dir at <DIR>"
    ),
    "downsampled_imagenet/32x32": (
        "prepare it on a machine that can fetch the source files: "
        "`tfds build downsampled_imagenet/32x32 --data_dir=<DIR> "
        "--file_format=array_record` (the archives may have to be placed in "
        "<DIR>/downloads/manual first), then point data_dir at <DIR>"
    ),
    "imagenet_resized/64x64": (
        "download Imagenet64_train_part1_npz.zip, Imagenet64_train_part2_npz.zip and "
        f"Imagenet64_val_npz.zip ('downsampled images', {DOWNSAMPLED_IMAGENET_URL}) and either "
        "(a) unzip them into one folder and use source='imagenet64_npz' with "
        "data_dir=<that folder>, or (b) prepare the TFDS copy on a machine that can fetch "
        "them: `tfds build imagenet_resized/64x64 --data_dir=<DIR> "
        "--file_format=array_record` and point data_dir at <DIR>"
    ),
    "downsampled_imagenet/64x64": (
        "prepare it on a machine that can fetch the source files: "
        "`tfds build downsampled_imagenet/64x64 --data_dir=<DIR> "
        "--file_format=array_record` (the archives may have to be placed in "
        "<DIR>/downloads/manual first), then point data_dir at <DIR>"
    ),
    "cifar10": (
        "prepare it on a machine with internet access: `tfds build cifar10 "
        "--data_dir=<DIR> --file_format=array_record`, copy <DIR> here and point "
        "data_dir at it"
    ),
}


class DatasetNotFoundError(FileNotFoundError):
    """The requested dataset/split is not available locally (nothing is downloaded)."""

    def __init__(self, message: str, *, source: str, split: str, data_dir: str | None):
        super().__init__(message)
        self.source = source
        self.split = split
        self.data_dir = data_dir

    def __str__(self) -> str:  # FileNotFoundError would otherwise format as OSError
        return self.args[0]


def image_shape(resolution: int) -> tuple[int, int, int]:
    """``(resolution, resolution, 3)``: the shape of one RGB image (a ``ValueError`` for a
    resolution that is not a positive int)."""
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)):
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    if resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    return (int(resolution), int(resolution), 3)


def source_resolution(source: str, resolution: int | None = None) -> int:
    """The resolution ``source`` is read at: its images' own (``SOURCE_RESOLUTIONS``), which
    ``resolution``, if given, must equal; ``"folder"`` needs ``resolution`` (any positive int).
    A ``ValueError`` says what was expected and what was given."""
    lookup_source(source)
    native = SOURCE_RESOLUTIONS.get(source)
    if native is None:
        if resolution is None:
            raise ValueError(
                f"source {source!r} resizes its images to any resolution: give one "
                "(resolution=R, e.g. --config.data.resolution=64)"
            )
        return image_shape(resolution)[0]
    if resolution is not None and image_shape(resolution)[0] != native:
        others = sorted(s for s, r in SOURCE_RESOLUTIONS.items() if r == resolution)
        hint = f"sources at {resolution}x{resolution}: {', '.join(others)}, or 'folder'"
        if not others:
            hint = "use source 'folder' to resize your own images to it"
        raise ValueError(
            f"source {source!r} holds {native}x{native} images, but resolution {resolution} "
            f"was asked for ({hint})"
        )
    return native


def lookup_source(source: str) -> tuple[str, str, str]:
    """``SOURCES[source]``: (TFDS name, ``"npz"`` or ``"folder"``, default train split, default
    eval split); a ``ValueError`` listing the known sources for an unknown one."""
    try:
        return SOURCES[source]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown image source {source!r}; known sources: {', '.join(sorted(SOURCES))}"
        ) from None


def _missing_tfds_error(
    source: str, tfds_name: str, split: str, data_dir: str | os.PathLike | None
) -> DatasetNotFoundError | None:
    """Explains why ``tfds.data_source`` failed, if the cause is missing data."""
    import tensorflow_datasets as tfds

    data_dir_str = None if data_dir is None else os.fspath(data_dir)
    try:
        builder = tfds.builder(tfds_name, data_dir=data_dir)
        where = builder.data_dir
        prepared = builder.is_prepared()
    except Exception:  # noqa: BLE001 - only used to phrase the error
        builder, where, prepared = None, data_dir_str, False
    looked = f"data_dir={data_dir_str!r}" + (
        f" (TFDS default data dir; set TFDS_DATA_DIR or pass data_dir), looked in {where}"
        if data_dir is None
        else f", looked in {where}"
    )
    how = _HOW_TO_PROVIDE.get(source, f"`tfds build {tfds_name} --file_format=array_record`")
    if not prepared:
        return DatasetNotFoundError(
            f"TFDS dataset {tfds_name!r} (source {source!r}, split {split!r}) is not "
            f"prepared: {looked}. Nothing is downloaded (download=False). To provide it, "
            f"{how}; or point data_dir at an existing prepared copy (array_record format).",
            source=source,
            split=split,
            data_dir=data_dir_str,
        )
    try:
        formats = {str(f.value) for f in builder.info.available_file_formats()}
    except Exception:  # noqa: BLE001 - only used to phrase the error
        return None
    if "array_record" not in formats:
        return DatasetNotFoundError(
            f"TFDS dataset {tfds_name!r} (source {source!r}, split {split!r}) is prepared "
            f"at {where} only as {sorted(formats)}, but this TF-free pipeline needs "
            "random-access array_record files. Rebuild it with `tfds build "
            f"{tfds_name} --data_dir=<DIR> --file_format=array_record`, or convert it "
            f"(needs TensorFlow, e.g. on another machine): `tfds convert_format "
            f"--dataset_version_dir={where} --out_file_format=array_record`.",
            source=source,
            split=split,
            data_dir=data_dir_str,
        )
    return None


def open_tfds(source: str, split: str, data_dir: str | os.PathLike | None = None) -> Any:
    """The random-access ``tfds.data_source(..., download=False)`` of a TFDS ``source``.

    A dataset that is not prepared, or not as array_record files, raises
    :class:`DatasetNotFoundError` saying how to provide it.
    """
    tfds_name, _, _ = lookup_source(source)
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
    except Exception as err:
        missing = _missing_tfds_error(source, tfds_name, split, data_dir)
        if missing is not None:
            raise missing from err
        raise
