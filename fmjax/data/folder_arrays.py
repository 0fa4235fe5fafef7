"""A one-time conversion of an image folder (:mod:`fmjax.data.folder`) to memory-mapped arrays,
which source ``"folder"`` then reads instead of decoding the files every epoch.

::

    python -m fmjax.data.folder_arrays --data_dir=PHOTOS --out_dir=PHOTOS_64 --resolution=64
    python -m experiments.imagenet64 ... --config.data.source=folder \\
        --config.data.data_dir=PHOTOS_64 --config.data.resolution=64

``out_dir`` gets ``train_images.npy`` / ``eval_images.npy`` (uint8 ``(N, R, R, 3)``),
``train_labels.npy`` / ``eval_labels.npy`` (int32) and ``fmjax_folder.json`` (the
resolution, the classes, the number of images per split, the files left out). The images
are the ones the folder source would decode (same splits, order, labels and pixels), so a
run gives the same batches from either. The arrays are opened with ``mmap_mode="r"``: no
decoding, no loading, pages shared by every reader on a host.

Files that cannot be decoded are all listed in one :class:`~fmjax.data.folder.ImageFileError`
(the conversion writes nothing), or, with ``skip_bad=True`` (``--skip_bad``), left out and
counted (``num_skipped``, ``skipped`` in ``fmjax_folder.json``, and printed).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing
import operator
import os
from typing import Any

import numpy as np

from fmjax.data.folder import (
    SPLITS,
    ImageFileError,
    list_images,
    load_image,
    split_of,
)
from fmjax.data.sources import image_shape
from fmjax.jsonio import write_json_atomic

__all__ = ["MANIFEST", "ArrayImageSource", "convert", "is_converted", "main", "open_arrays"]

#: The file that marks a folder as converted (and describes the arrays).
MANIFEST = "fmjax_folder.json"
_FORMAT = "fmjax-folder-arrays-v1"


def is_converted(data_dir: str | os.PathLike) -> bool:
    """Whether ``data_dir`` holds a conversion (its :data:`MANIFEST`)."""
    return os.path.isfile(os.path.join(os.fspath(data_dir), MANIFEST))


class ArrayImageSource:
    """Random-access source over a converted split: ``{"image": uint8 (R, R, 3), "label":
    int32}``; the arrays are memory-mapped on first use (and again in worker processes)."""

    def __init__(self, images_path: str, labels_path: str):
        self._paths = (images_path, labels_path)
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None
        self._len = len(self._open()[1])

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            images = np.load(self._paths[0], mmap_mode="r")  # (empty: loaded, not mapped)
            labels = np.load(self._paths[1], mmap_mode="r")
            if images.ndim != 4 or images.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"{self._paths[0]}: expected (N, R, R, 3) images for {labels.shape[0]} "
                    f"labels, got {images.shape}"
                )
            self._arrays = (images, labels)
        return self._arrays

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"ArrayImageSource({self._paths[0]!r}, len={len(self)})"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = operator.index(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        images, labels = self._open()
        return {"image": np.array(images[i]), "label": np.int32(labels[i])}


def _manifest(data_dir: str) -> dict[str, Any]:
    with open(os.path.join(data_dir, MANIFEST)) as f:
        manifest = json.load(f)
    if manifest.get("format") != _FORMAT:
        raise ImageFileError(
            f"{os.path.join(data_dir, MANIFEST)}: format {manifest.get('format')!r}, expected "
            f"{_FORMAT!r} (convert the folder again)"
        )
    return manifest


def open_arrays(data_dir: str | os.PathLike, split: str, resolution: int) -> ArrayImageSource:
    """The converted ``split`` in ``data_dir``; an :class:`~fmjax.data.folder.ImageFileError`
    if it was converted at another resolution than ``resolution``."""
    d = os.fspath(data_dir)
    manifest = _manifest(d)
    if manifest["resolution"] != image_shape(resolution)[0]:
        raise ImageFileError(
            f"{d} holds images converted at {manifest['resolution']}x"
            f"{manifest['resolution']}, but resolution {resolution} was asked for: convert "
            f"the original folder again with --resolution={resolution}"
        )
    if split not in SPLITS:
        raise ValueError(f"Source 'folder' has splits {SPLITS}; got split {split!r}")
    return ArrayImageSource(
        os.path.join(d, f"{split}_images.npy"), os.path.join(d, f"{split}_labels.npy")
    )


def _decode(job: tuple[str, int]) -> np.ndarray | str:
    path, resolution = job
    try:
        return load_image(path, resolution)
    except ImageFileError as err:
        return str(err)


def convert(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    resolution: int,
    *,
    num_workers: int | None = None,
    skip_bad: bool = False,
) -> dict[str, Any]:
    """Decode every image of ``data_dir`` once into arrays in ``out_dir`` (see the module
    docstring); returns the manifest. ``num_workers`` decoding processes (default: the
    cores; 0: decode in this process); bad files raise one
    :class:`~fmjax.data.folder.ImageFileError` listing them all, unless ``skip_bad``."""
    src, out = os.fspath(data_dir), os.fspath(out_dir)
    r = image_shape(resolution)[0]
    paths, labels, classes = list_images(src)
    os.makedirs(out, exist_ok=True)
    bad: list[str] = []
    counts = {}
    jobs_of = {s: [i for i, p in enumerate(paths) if split_of(p) == s] for s in SPLITS}
    workers = (os.cpu_count() or 1) if num_workers is None else int(num_workers)
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 0 else None
    decode = map if pool is None else functools.partial(pool.imap, chunksize=64)
    with pool or contextlib.nullcontext():
        for split, idx in jobs_of.items():
            if not idx:  # (a memory map cannot be empty)
                np.save(os.path.join(out, f"{split}_images.npy"), np.zeros((0, r, r, 3), np.uint8))
                np.save(os.path.join(out, f"{split}_labels.npy"), np.zeros((0,), np.int32))
                counts[split] = 0
                continue
            tmp = os.path.join(out, f".{split}_images.tmp.npy")
            arr = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=np.uint8, shape=(len(idx), r, r, 3)
            )
            kept = []
            jobs = ((os.path.join(src, paths[i]), r) for i in idx)
            for i, img in zip(idx, decode(_decode, jobs), strict=True):
                if isinstance(img, str):
                    bad.append(img)
                    continue
                arr[len(kept)] = img
                kept.append(i)
            arr.flush()
            del arr
            final = os.path.join(out, f"{split}_images.npy")
            if len(kept) == len(idx):
                os.replace(tmp, final)
            elif not kept:
                np.save(final, np.zeros((0, r, r, 3), np.uint8))
                os.remove(tmp)
            else:  # compact: the first len(kept) rows hold the kept images
                part = np.load(tmp, mmap_mode="r")[: len(kept)]
                dst = np.lib.format.open_memmap(final, mode="w+", dtype=np.uint8, shape=part.shape)
                for k in range(0, len(kept), 4096):
                    dst[k : k + 4096] = part[k : k + 4096]
                dst.flush()
                del dst, part
                os.remove(tmp)
            np.save(os.path.join(out, f"{split}_labels.npy"), labels[kept].astype(np.int32))
            counts[split] = len(kept)
    if bad and not skip_bad:
        for split in SPLITS:
            for name in (f"{split}_images.npy", f"{split}_labels.npy"):
                if os.path.exists(os.path.join(out, name)):
                    os.remove(os.path.join(out, name))
        shown = "\n".join(bad[:50]) + (f"\n... and {len(bad) - 50} more" if len(bad) > 50 else "")
        raise ImageFileError(
            f"{len(bad)} of {len(paths)} files in {src} cannot be decoded (nothing written; "
            f"fix or remove them, or pass skip_bad=True / --skip_bad):\n{shown}"
        )
    manifest = {
        "format": _FORMAT,
        "resolution": r,
        "classes": classes,
        "num_images": counts,
        "num_skipped": len(bad),
        "skipped": bad,
        "source_dir": os.path.abspath(src),
    }
    write_json_atomic(os.path.join(out, MANIFEST), manifest)
    return manifest


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m fmjax.data.folder_arrays --data_dir=DIR --out_dir=OUT --resolution=R``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", required=True, help="the folder of PNG / JPEG files")
    p.add_argument("--out_dir", required=True, help="where the arrays go")
    p.add_argument("--resolution", required=True, type=int)
    p.add_argument("--num_workers", type=int, default=None, help="default: every core")
    p.add_argument("--skip_bad", action="store_true", help="leave undecodable files out")
    a = p.parse_args(argv)
    manifest = convert(
        a.data_dir, a.out_dir, a.resolution, num_workers=a.num_workers, skip_bad=a.skip_bad
    )
    print(json.dumps({k: v for k, v in manifest.items() if k != "skipped"}, indent=2))
    for line in manifest["skipped"]:
        print(f"skipped: {line}")
    return manifest


if __name__ == "__main__":
    main()
