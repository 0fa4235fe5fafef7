"""The official downsampled-ImageNet batches (Chrabaszcz et al. 2017) as a random-access source,
at any of their resolutions (sources ``imagenet32_npz`` and ``imagenet64_npz``).

The batches are the content of ``Imagenet{R}_train_npz.zip`` / ``Imagenet{R}_val_npz.zip``
(``.npz`` files; at 64x64 the train set comes as ``Imagenet64_train_part1_npz.zip`` and
``..._part2_npz.zip``) or of the pickled ``Imagenet{R}_train.zip`` / ``Imagenet{R}_val.zip``
(files without extension): ``train_data_batch_1`` ... ``train_data_batch_10`` and
``val_data``, each holding ``data`` (N, 3 R R) uint8 in channel-major order (the R plane, the
G plane, the B plane, each row by row) and 1-based ``labels``.  ``data_dir`` is the folder
holding them, or a folder whose immediate sub-folders hold them (e.g. the two train parts
unzipped side by side).  Split ``"train"`` means every ``train_data_batch_<k>`` found there
(in numeric order; a number found in more than one folder is read from the first of
``data_dir`` and then its sub-folders by name; an ``.npz`` is preferred to a pickled file);
``"val_data"`` (alias ``"validation"``) the validation file; any other split name selects
the single file of that name (e.g. ``"train_data_batch_3"``).  Labels are made 0-based, like
TFDS ``imagenet_resized``.  The arrays are loaded lazily into memory, one file at a time, in
every process that reads them (about 3.9 GB for the full 32x32 train set, 15.7 GB at
64x64).  Pickled files are unpickled: only use files you trust.

Nothing is ever downloaded: missing files raise
:class:`~fmjax.data.sources.DatasetNotFoundError` saying how to provide them.
"""

from __future__ import annotations

import operator
import os
import pickle
import re
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from fmjax.data.sources import (
    DOWNSAMPLED_IMAGENET_URL,
    DatasetNotFoundError,
    image_shape,
    source_resolution,
)

__all__ = ["NpzImageSource", "open_npz"]

_TRAIN_BATCH_RE = re.compile(r"^train_data_batch_(\d+)(\.npz)?$")
_NPZ_SPLIT_ALIASES = {"val": "val_data", "validation": "val_data", "valid": "val_data"}


def _read_batch_file(path: epath.Path, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Reads one official batch file -> (data (N, 3*R*R) uint8, 0-based int32 labels)."""
    with path.open("rb") as f:
        if path.name.endswith(".npz"):
            with np.load(f, allow_pickle=False) as z:
                data, labels = z["data"], z["labels"]
        else:
            try:
                d = pickle.load(f)
            except UnicodeDecodeError:  # Python-2 pickle
                f.seek(0)
                d = pickle.load(f, encoding="latin1")
            data, labels = d["data"], d["labels"]
    data = np.asarray(data)
    labels = np.asarray(labels).reshape(-1)
    expected = int(np.prod(image_shape(resolution)))
    if data.ndim != 2 or data.shape[1] != expected or data.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{path}: expected 'data' of shape (N, {expected}) ({resolution}x{resolution} "
            f"RGB images) and N 'labels', got {data.shape} and {labels.shape}"
        )
    if data.dtype != np.uint8:
        data = data.astype(np.uint8)
    return data, (labels.astype(np.int64) - 1).astype(np.int32)


def _count_batch_file(path: epath.Path, resolution: int) -> int:
    """Number of examples in a batch file: an npz's labels only; a pickled batch has no
    index, so it is loaded and dropped again (opening the ~3.9 GB train split must not keep
    it in memory; the files are read again one at a time when their examples are)."""
    if path.name.endswith(".npz"):
        with path.open("rb") as f, np.load(f, allow_pickle=False) as z:
            return int(np.asarray(z["labels"]).reshape(-1).shape[0])
    return int(_read_batch_file(path, resolution)[1].shape[0])


class NpzImageSource:
    """Random-access source over official downsampled-ImageNet batch files.

    Yields ``{"image": uint8 (R, R, 3) HWC, "label": int32 (0-based)}`` with ``R`` the
    ``resolution`` of the files' images (32 by default).  Files are loaded lazily
    (thread-safe); the arrays are not pickled, so worker processes reload them themselves.
    """

    def __init__(self, files: Sequence[str | os.PathLike], resolution: int = 32):
        self._files = [epath.Path(f) for f in files]
        if not self._files:
            raise ValueError("NpzImageSource needs at least one file")
        self._shape = image_shape(resolution)
        self._arrays: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(self._files)
        self._offsets = np.cumsum([0, *(_count_batch_file(f, resolution) for f in self._files)])
        self._lock = threading.Lock()

    @property
    def files(self) -> list[epath.Path]:
        return list(self._files)

    @property
    def resolution(self) -> int:
        return self._shape[0]

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __repr__(self) -> str:
        files = [os.fspath(f) for f in self._files]
        return f"NpzImageSource(files={files}, resolution={self.resolution}, len={len(self)})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = [None] * len(self._files)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _file_arrays(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        arrays = self._arrays[k]
        if arrays is None:
            with self._lock:
                arrays = self._arrays[k]
                if arrays is None:
                    arrays = _read_batch_file(self._files[k], self.resolution)
                    n = int(self._offsets[k + 1] - self._offsets[k])
                    if arrays[1].shape[0] != n:
                        raise ValueError(f"{self._files[k]} changed size while reading")
                    self._arrays[k] = arrays
        return arrays

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = operator.index(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {n} examples")
        k = int(np.searchsorted(self._offsets, i, side="right")) - 1
        data, labels = self._file_arrays(k)
        j = i - int(self._offsets[k])
        (h, w, c) = self._shape
        # Channel-major CHW (R plane, G plane, B plane) -> HWC.
        image = data[j].reshape(c, h, w).transpose(1, 2, 0)
        return {"image": image, "label": labels[j]}


def _npz_candidate_dirs(root: epath.Path) -> list[epath.Path]:
    if not root.is_dir():
        return []
    return [root, *sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.name)]


def _train_batches(directory: epath.Path) -> dict[int, epath.Path]:
    """``train_data_batch_<k>`` files of one folder by ``k`` (an ``.npz`` over a pickle)."""
    found: dict[int, epath.Path] = {}
    for path in directory.iterdir():
        m = _TRAIN_BATCH_RE.match(path.name)
        if m and not path.is_dir() and (int(m.group(1)) not in found or m.group(2)):
            found[int(m.group(1))] = path
    return found


def _match_npz_split(directories: list[epath.Path], split: str) -> list[epath.Path]:
    if split == "train":
        found: dict[int, epath.Path] = {}
        for directory in directories:  # the first folder holding a batch number wins
            for k, path in _train_batches(directory).items():
                found.setdefault(k, path)
        return [found[k] for k in sorted(found)]
    stem = _NPZ_SPLIT_ALIASES.get(split, split)
    for directory in directories:
        names = {p.name: p for p in directory.iterdir() if not p.is_dir()}
        for name in (f"{stem}.npz", stem):
            if name in names:
                return [names[name]]
    return []


def open_npz(source: str, split: str, data_dir: str | os.PathLike | None) -> NpzImageSource:
    """The :class:`NpzImageSource` of ``split``'s files in ``data_dir`` or its immediate
    sub-folders, at the resolution of ``source`` (``imagenet32_npz`` or ``imagenet64_npz``)."""
    resolution = source_resolution(source)
    zips = f"Imagenet{resolution}_train_npz.zip"
    if resolution == 64:
        zips = "Imagenet64_train_part1_npz.zip, Imagenet64_train_part2_npz.zip"
    expected = (
        "train_data_batch_1 ... train_data_batch_10 (.npz or pickled without extension)"
        if split == "train"
        else f"{_NPZ_SPLIT_ALIASES.get(split, split)}[.npz]"
    )
    how = (
        f"To provide them, download {zips} and Imagenet{resolution}_val_npz.zip "
        f"(or the pickled Imagenet{resolution}_train / _val archives) from "
        f"{DOWNSAMPLED_IMAGENET_URL} ('downsampled images') and unzip them into data_dir; "
        f"or use source='imagenet_resized/{resolution}x{resolution}' with a prepared TFDS copy."
    )
    if data_dir is None:
        raise DatasetNotFoundError(
            f"Source {source!r} (split {split!r}) needs data_dir: the folder holding the "
            f"official downsampled-ImageNet batches {expected}. {how}",
            source=source,
            split=split,
            data_dir=None,
        )
    files = _match_npz_split(_npz_candidate_dirs(epath.Path(data_dir)), split)
    if files:
        return NpzImageSource(files, resolution)
    raise DatasetNotFoundError(
        f"Source {source!r}: no files for split {split!r} ({expected}) found in "
        f"data_dir={os.fspath(data_dir)!r} or its immediate sub-folders. {how}",
        source=source,
        split=split,
        data_dir=os.fspath(data_dir),
    )
