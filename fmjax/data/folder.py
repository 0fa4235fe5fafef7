"""A folder of the user's PNG / JPEG images as a random-access source (source ``"folder"``).

Folder layout
-------------
``data_dir`` holds ``.png``, ``.jpg`` or ``.jpeg`` files (any case), at any depth; hidden
files and folders (names starting with ``.``) are skipped.  Either every image lies in a
sub-folder of ``data_dir`` (the top-level sub-folder of a file is its class: classes are
the sub-folders' names sorted, labels ``0 .. C-1``), or none does (the label is
``NO_LABEL``, -1); images both directly in ``data_dir`` and in sub-folders are refused.

Train and eval splits
---------------------
A fixed rule that needs no list: a file belongs to ``"eval"`` when the first 8 bytes of the
SHA-256 of its path relative to ``data_dir`` (``/``-separated, UTF-8), read as a big-endian
integer, are ``< EVAL_PERCENT`` modulo 100, and to ``"train"`` otherwise (:func:`split_of`).
So adding or removing files never moves another file between the splits, and every process
and every run agrees.  Within a split the files are in sorted order of their relative paths.

Decoding
--------
Each file is decoded with Pillow (EXIF orientation applied; JPEGs decoded at the smallest
DCT scale that keeps both sides at least ``R``, Pillow's ``draft``), converted to RGB
(grayscale and palette images are expanded, an alpha channel is dropped), cropped to the
centred square of side ``s = min(width, height)`` (starting at ``(width - s) // 2``,
``(height - s) // 2``) and resized to ``R x R`` with Pillow's bicubic filter (antialiased
when downscaling; a square of side ``R`` is kept as it is), i.e. the shorter side is
resized to ``R`` and the image centre-cropped.  A file that cannot be decoded (corrupt,
truncated, not an image, or 16-bit / float pixels) raises :class:`ImageFileError` naming
the file when it is read; nothing is skipped silently.

Decoding costs a core per a few hundred to a few thousand images per second
(``docs/benchmarks.md``); :mod:`fmjax.data.folder_arrays` converts a folder once into
memory-mapped arrays that the same source reads instead (and that lists every bad file at
once, or skips them with a count).
"""

from __future__ import annotations

import hashlib
import operator
import os
from typing import Any

import numpy as np

from fmjax.data.sources import NO_LABEL, DatasetNotFoundError, image_shape

__all__ = [
    "EVAL_PERCENT",
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "FolderImageSource",
    "ImageFileError",
    "list_images",
    "load_image",
    "open_folder",
    "split_of",
]

#: The file name endings read as images (compared lower-case).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")
#: The percentage of files (by the hash of their relative path) in the ``"eval"`` split.
EVAL_PERCENT = 5
#: The splits of a folder.
SPLITS: tuple[str, ...] = ("train", "eval")

_UNSUPPORTED_MODES = ("I", "F")  # 32-bit int / float pixels; "I;16*" too (by prefix)


class ImageFileError(ValueError):
    """An image file that cannot be read as an 8-bit RGB image, or a folder that cannot be
    read as a dataset (its layout, its arrays); the message names the file or folder."""


def split_of(relative_path: str) -> str:
    """``"eval"`` or ``"train"``: the split of the file at ``relative_path`` (relative to the
    folder, ``/``-separated) by the rule in the module docstring."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return "eval" if int.from_bytes(digest[:8], "big") % 100 < EVAL_PERCENT else "train"


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(data_dir: str | os.PathLike) -> tuple[list[str], np.ndarray, list[str]]:
    """``(relative paths sorted, int32 labels, class names)`` of the images in ``data_dir``
    (labels ``NO_LABEL`` and no classes without class sub-folders).

    A missing or image-less folder is a :class:`~fmjax.data.sources.DatasetNotFoundError`;
    images both directly in it and in sub-folders are an :class:`ImageFileError`.
    """
    root = os.fspath(data_dir)
    if not os.path.isdir(root):
        raise DatasetNotFoundError(
            f"Source 'folder': data_dir={root!r} is not a folder (expected a folder of "
            f"{'/'.join(IMAGE_EXTENSIONS)} files, optionally one sub-folder per class).",
            source="folder",
            split="",
            data_dir=root,
        )
    paths = []
    for here, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(here, root)
        for name in files:
            if _is_image(name):
                paths.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    paths.sort()
    if not paths:
        raise DatasetNotFoundError(
            f"Source 'folder': no {'/'.join(IMAGE_EXTENSIONS)} files in data_dir={root!r} "
            "or its sub-folders.",
            source="folder",
            split="",
            data_dir=root,
        )
    top = [p for p in paths if "/" not in p]
    if not top:
        classes = sorted({p.split("/", 1)[0] for p in paths})
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index[p.split("/", 1)[0]] for p in paths], np.int32)
        return paths, labels, classes
    if len(top) != len(paths):
        nested = next(p for p in paths if "/" in p)
        raise ImageFileError(
            f"Source 'folder': data_dir={root!r} has images both directly in it (e.g. "
            f"{top[0]!r}) and in sub-folders (e.g. {nested!r}): put every image in a class "
            "sub-folder, or none."
        )
    return paths, np.full(len(paths), NO_LABEL, np.int32), []


def load_image(path: str | os.PathLike, resolution: int) -> np.ndarray:
    """The image file at ``path`` as uint8 ``(resolution, resolution, 3)``, decoded, cropped
    and resized as the module docstring says; :class:`ImageFileError` naming the file if it
    cannot be."""
    from PIL import Image, ImageOps

    r = image_shape(resolution)[0]
    path = os.fspath(path)
    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("RGB", (r, r))
            img.load()
            if img.mode in _UNSUPPORTED_MODES or img.mode.startswith("I;16"):
                raise ImageFileError(
                    f"{path}: {img.mode!r} pixels (16-bit or float) are not supported; "
                    "save it as an 8-bit RGB or grayscale PNG / JPEG"
                )
            img = ImageOps.exif_transpose(img)
            img = img.convert("RGB")
    except ImageFileError:
        raise
    except Exception as err:  # noqa: BLE001 - any decoder failure is this file's
        raise ImageFileError(
            f"{path}: cannot be read as an image ({type(err).__name__}: {err})"
        ) from err
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    if s != r:
        img = img.resize((r, r), Image.BICUBIC, box=(left, top, left + s, top + s))
    elif (w, h) != (r, r):
        img = img.crop((left, top, left + r, top + r))
    out = np.asarray(img, dtype=np.uint8)
    if out.shape != (r, r, 3):  # pragma: no cover - Pillow guarantees it
        raise ImageFileError(f"{path}: decoded to shape {out.shape}, expected {(r, r, 3)}")
    return out


class FolderImageSource:
    """Random-access source over image files: ``{"image": uint8 (R, R, 3), "label": int32}``
    for ``files`` (relative to ``root``) with ``labels``, decoded when read."""

    def __init__(
        self,
        root: str | os.PathLike,
        files: list[str],
        labels: np.ndarray,
        resolution: int,
    ):
        self._root = os.fspath(root)
        self._files = list(files)
        self._labels = np.asarray(labels, np.int32)
        self._resolution = image_shape(resolution)[0]
        if self._labels.shape != (len(self._files),):
            raise ValueError(f"{len(self._files)} files but labels of shape {labels.shape}")

    @property
    def files(self) -> list[str]:
        return list(self._files)

    @property
    def resolution(self) -> int:
        return self._resolution

    def __len__(self) -> int:
        return len(self._files)

    def __repr__(self) -> str:
        return (
            f"FolderImageSource(root={self._root!r}, resolution={self._resolution}, "
            f"len={len(self)})"
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = operator.index(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        path = os.path.join(self._root, self._files[i])
        return {"image": load_image(path, self._resolution), "label": self._labels[i]}


def open_folder(split: str, data_dir: str | os.PathLike | None, resolution: int) -> Any:
    """The source of ``split`` (``"train"`` or ``"eval"``) of the folder ``data_dir`` at
    ``resolution``: a :class:`FolderImageSource`, or the memory-mapped arrays of
    :mod:`fmjax.data.folder_arrays` when ``data_dir`` holds a conversion (its resolution
    must be ``resolution``)."""
    from fmjax.data import folder_arrays

    if data_dir is None:
        raise DatasetNotFoundError(
            "Source 'folder' needs data_dir: the folder of your PNG / JPEG files "
            "(--config.data.data_dir=DIR).",
            source="folder",
            split=split,
            data_dir=None,
        )
    if split not in SPLITS:
        raise ValueError(f"Source 'folder' has splits {SPLITS}; got split {split!r}")
    if folder_arrays.is_converted(data_dir):
        source = folder_arrays.open_arrays(data_dir, split, resolution)
    else:
        paths, labels, _ = list_images(data_dir)
        keep = [i for i, p in enumerate(paths) if split_of(p) == split]
        source = FolderImageSource(data_dir, [paths[i] for i in keep], labels[keep], resolution)
    if not len(source):
        raise DatasetNotFoundError(
            f"Source 'folder': no image of data_dir={os.fspath(data_dir)!r} falls in split "
            f"{split!r} (the {EVAL_PERCENT}% of files whose path hashes into 'eval', see "
            "fmjax.data.folder); add images, or evaluate on the other split "
            "(--config.eval.split).",
            source="folder",
            split=split,
            data_dir=os.fspath(data_dir),
        )
    return source
