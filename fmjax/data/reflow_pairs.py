"""Stored reflow pairs ``(x0, x̂1)`` on disk, and the training pipeline that reads them.

Rectified flow's reflow (Liu et al. 2023) trains on pairs drawn once from a teacher flow;
for images each pair costs a full ODE solve, so the pairs are drawn in chunks, written as
they come and read back at random by grain, like a dataset.

A pair directory holds:

- ``pairs.json``: the settings the pairs were drawn with (teacher, solver, seed, image
  shape, chunk size, number of chunks): a directory drawn with other settings is refused,
  never mixed;
- per chunk ``k``: ``x0_<k>.npy`` and ``x1_<k>.npy`` (float32 ``(C, *shape)``),
  ``label_<k>.npy`` (int32 ``(C,)``, the class each pair was drawn for, or
  :data:`fmjax.data.sources.NO_LABEL`) and, written last, ``chunk_<k>.json``. A chunk
  without its JSON is incomplete (a run killed while writing it) and is drawn again, so a
  stopped generation resumes where it stopped and loses at most one chunk.

The arrays are memory-mapped: a directory larger than the host's memory trains as well.
Training batches are ``{"x0", "image", "label"}`` (``image`` is x̂1, the data end of the
pair), shuffled every epoch and split over processes as :mod:`fmjax.data.sharded` lays out.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import numpy as np

from fmjax.data.sharded import derive_seeds, process_layout, sharded_batches
from fmjax.data.sources import NO_LABEL

__all__ = ["MANIFEST", "PairStore", "PairsSource", "make_pairs_dataset", "make_pairs_iterator"]

#: The file of a pair directory that records the settings its pairs were drawn with.
MANIFEST = "pairs.json"


def _chunk_file(directory: str, kind: str, k: int, ext: str = "npy") -> str:
    return os.path.join(directory, f"{kind}_{k:05d}.{ext}")


def _write_atomic(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class PairStore:
    """A pair directory drawn with ``settings`` (a JSON-able dict; it must hold
    ``num_chunks``, ``chunk_size`` and ``shape``, the event shape of one x0).

    Creating it writes the manifest, or checks an existing one: a directory whose manifest
    records other settings raises ValueError naming the differences."""

    def __init__(self, directory: str | os.PathLike, settings: dict[str, Any]):
        for key in ("num_chunks", "chunk_size", "shape"):
            if key not in settings:
                raise ValueError(f"settings must give {key!r}; got keys {sorted(settings)}.")
        self.directory = os.path.abspath(os.fspath(directory))
        self.settings = json.loads(json.dumps(settings))  # tuples as lists, as read back
        manifest = os.path.join(self.directory, MANIFEST)
        if os.path.exists(manifest):
            with open(manifest) as f:
                saved = json.load(f)
            diffs = [
                f"{k}={saved.get(k)!r} (now {v!r})"
                for k, v in self.settings.items()
                if saved.get(k) != v
            ]
            if diffs:
                raise ValueError(
                    f"the reflow pairs in {self.directory} were drawn with "
                    + "; ".join(diffs)
                    + ": delete them or draw into another directory."
                )
        else:
            os.makedirs(self.directory, exist_ok=True)
            text = json.dumps(self.settings, indent=2).encode()
            _write_atomic(manifest, lambda f: f.write(text))

    @property
    def num_chunks(self) -> int:
        return int(self.settings["num_chunks"])

    @property
    def chunk_size(self) -> int:
        return int(self.settings["chunk_size"])

    def missing(self) -> list[int]:
        """The chunks not yet written completely, in order."""
        return [
            k
            for k in range(self.num_chunks)
            if not os.path.exists(_chunk_file(self.directory, "chunk", k, "json"))
        ]

    def write(self, k: int, x0, x1, label=None, info: dict | None = None) -> None:
        """Write chunk ``k`` (``chunk_size`` pairs; ``label`` None: unlabelled), its JSON
        (``info``, e.g. the solve's NFE) last."""
        if not 0 <= k < self.num_chunks:
            raise ValueError(f"chunk index must be in [0, {self.num_chunks}); got {k}.")
        shape = (self.chunk_size, *self.settings["shape"])
        x0, x1 = np.asarray(x0, np.float32), np.asarray(x1, np.float32)
        if x0.shape != shape or x1.shape != shape:
            raise ValueError(
                f"chunk {k} must hold x0 and x1 of shape {shape}; got {x0.shape} and {x1.shape}."
            )
        if label is None:
            label = np.full((self.chunk_size,), NO_LABEL, np.int32)
        label = np.asarray(label, np.int32)
        if label.shape != (self.chunk_size,):
            raise ValueError(f"chunk {k}: labels of shape {label.shape}, expected {shape[:1]}.")
        for kind, arr in (("x0", x0), ("x1", x1), ("label", label)):
            _write_atomic(_chunk_file(self.directory, kind, k), lambda f, a=arr: np.save(f, a))
        text = json.dumps({"chunk": k, **(info or {})}).encode()
        _write_atomic(_chunk_file(self.directory, "chunk", k, "json"), lambda f: f.write(text))

    def chunk_info(self) -> list[dict]:
        """The JSON of every complete chunk (what :meth:`write` was given)."""
        out = []
        for k in range(self.num_chunks):
            path = _chunk_file(self.directory, "chunk", k, "json")
            if os.path.exists(path):
                with open(path) as f:
                    out.append(json.load(f))
        return out


class PairsSource:
    """grain's random-access source over a complete pair directory: record ``i`` is
    ``{"x0", "image" (x̂1), "label"}`` of pair ``i`` (chunk ``i // chunk_size``). The arrays
    are opened memory-mapped on first use (so the source pickles to grain's workers)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.path.abspath(os.fspath(directory))
        manifest = os.path.join(self.directory, MANIFEST)
        if not os.path.exists(manifest):
            raise FileNotFoundError(f"no reflow pairs in {self.directory} (no {MANIFEST}).")
        with open(manifest) as f:
            settings = json.load(f)
        store = PairStore(self.directory, settings)
        if missing := store.missing():
            raise ValueError(
                f"the reflow pairs in {self.directory} are incomplete: {len(missing)} of "
                f"{store.num_chunks} chunks missing (first: {missing[0]}); draw them first."
            )
        self.num_chunks, self.chunk_size = store.num_chunks, store.chunk_size
        self.shape = tuple(settings["shape"])
        self._arrays: dict | None = None

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}

    def _open(self) -> dict:
        if self._arrays is None:
            arrays = {}
            for kind in ("x0", "x1", "label"):
                arrays[kind] = [
                    np.load(_chunk_file(self.directory, kind, k), mmap_mode="r")
                    for k in range(self.num_chunks)
                ]
            self._arrays = arrays
        return self._arrays

    def __len__(self) -> int:
        return self.num_chunks * self.chunk_size

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"pair {index} out of range [0, {len(self)})")
        k, i = divmod(index, self.chunk_size)
        a = self._open()
        return {
            "x0": np.array(a["x0"][k][i], np.float32),
            "image": np.array(a["x1"][k][i], np.float32),
            "label": np.int32(a["label"][k][i]),
        }

    def __repr__(self) -> str:
        return f"PairsSource({self.directory!r}, pairs={len(self)})"


def make_pairs_dataset(
    directory: str | os.PathLike,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    read_threads: int = 8,
    prefetch_buffer_size: int = 8,
) -> grain.IterDataset:
    """The training pipeline over stored pairs: ``{"x0", "image", "label"}`` batches of
    ``global_batch_size // process_count`` rows, this process's block of every global batch,
    reshuffled every epoch, forever. No flips or noise: a pair is the teacher's, as drawn.
    Its iterator checkpoints like :func:`fmjax.data.images.make_train_iterator`'s."""
    layout = process_layout(global_batch_size, process_index, process_count)
    src = PairsSource(directory)
    if len(src) < global_batch_size:
        raise ValueError(
            f"{len(src)} reflow pairs are fewer than one global batch of {global_batch_size}."
        )
    (shuffle_seed,) = derive_seeds(seed, 1)
    ds = grain.MapDataset.source(src).shuffle(seed=shuffle_seed).repeat(None)
    return sharded_batches(ds, layout, None, read_threads, prefetch_buffer_size, worker_count)


def make_pairs_iterator(directory: str | os.PathLike, **kwargs: Any) -> grain.DatasetIterator:
    """``iter(make_pairs_dataset(directory, **kwargs))``: the checkpointable iterator."""
    return iter(make_pairs_dataset(directory, **kwargs))
