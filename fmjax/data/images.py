"""Image input pipeline for Flow Matching on images at any resolution (ImageNet 32x32 and
64x64, CIFAR-10, a folder of the user's images).

The pipeline is TensorFlow-free: TFDS datasets are read through
``tfds.data_source`` (array_record files, random access) and the official
downsampled-ImageNet batches are read with numpy/pickle.  Everything after the
source is a `grain <https://github.com/google/grain>`_ ``MapDataset`` pipeline,
so it is deterministic, seedable and checkpointable.

Sources (``SOURCES``) are listed in :mod:`fmjax.data.sources`: TFDS
``imagenet_resized/32x32`` (the paper's ImageNet-32, default) and ``/64x64``,
``downsampled_imagenet/32x32`` and ``/64x64`` and ``cifar10``, the official
downsampled-ImageNet files (``"imagenet32_npz"``, ``"imagenet64_npz"``, read by
:mod:`fmjax.data.imagenet_npz`) and a folder of PNG / JPEG files (``"folder"``, read by
:mod:`fmjax.data.folder`).  Nothing is ever downloaded: a missing dataset raises
``DatasetNotFoundError``.

Every pipeline takes ``resolution``: ``None`` reads a source at its images' own resolution
(``SOURCE_RESOLUTIONS``: 32 or 64); a fixed-size source refuses another one, and
``"folder"`` needs one (its images are resized and centre-cropped to it).  Batches are
dicts ``{"image": float32 (B, R, R, 3) NHWC, "label": int32 (B,)}``; eval batches also carry
``"mask": bool (B,)``.  Images are in model space ``[-1, 1)``, uniformly
dequantized or at the lower edges of the 256 bins (see :mod:`fmjax.data.quantization`).

Multi-process sharding
----------------------
Every process builds the same global, seeded example order (shuffled with a
new permutation every epoch; epochs are concatenated, so a global batch may
straddle an epoch boundary).  Global batch ``g`` is the positions
``[g * G, (g + 1) * G)`` of that order, and process ``p`` of ``P`` gets the
contiguous slice ``[p * B, (p + 1) * B)`` of every global batch, ``B = G // P``.
So each process gets a *disjoint slice of every global batch* and their
concatenation in process order is exactly the global batch; the flip and
dequantization noise of an example depend only on ``seed`` and its global
position, so the global batch stream does not depend on ``process_count``.
Only the ``B`` examples a process needs are read by that process.

Checkpointing
-------------
``make_train_iterator`` returns a grain ``DatasetIterator``.  Its
``get_state()`` is a small JSON-serialisable dict (e.g. ``{"next_index": 12}``)
and ``set_state(state)`` on a freshly built iterator with the same arguments
resumes exactly.  With orbax, save it through grain's handler::

    ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(iterator))
    ocp.args.Composite(..., data=grain.checkpoint.CheckpointRestore(iterator))

which writes ``process_<i>-of-<n>.json`` (the iterator state as JSON) beside
the orbax checkpoint; alternatively store ``json.dumps(it.get_state())``
yourself.  The state is per process and must be restored into an iterator built
with the same arguments (``worker_count`` included: with workers the state is a
larger, still JSON-serialisable dict).  ``worker_count > 0`` uses grain's
``mp_prefetch``; it marks absl flags as parsed if they are not (grain 0.2.18
workers read absl flags, google/grain#1355), and such iterators should be
``close()``-d when done.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
from typing import Any

import grain
import numpy as np

from fmjax.data.folder import open_folder
from fmjax.data.imagenet_npz import NpzImageSource, open_npz
from fmjax.data.pairing import DrawSource, PairBatch
from fmjax.data.quantization import (
    BIN_WIDTH,
    dequantize,
    quantized_levels,
    to_model_space,
    to_uint8,
)
from fmjax.data.sharded import derive_seeds, process_layout, sharded_batches
from fmjax.data.sources import (
    DEFAULT_SOURCE,
    IMAGE_SHAPE,
    NO_LABEL,
    SOURCE_RESOLUTIONS,
    SOURCES,
    DatasetNotFoundError,
    image_shape,
    lookup_source,
    open_tfds,
    source_resolution,
)

__all__ = [
    "BIN_WIDTH",
    "DEFAULT_SOURCE",
    "IMAGE_SHAPE",
    "NO_LABEL",
    "SOURCES",
    "SOURCE_RESOLUTIONS",
    "DatasetNotFoundError",
    "NpzImageSource",
    "dequantize",
    "image_shape",
    "make_eval_dataset",
    "make_eval_iterator",
    "make_train_dataset",
    "make_train_iterator",
    "num_examples",
    "open_source",
    "source_resolution",
    "to_model_space",
    "to_uint8",
]


def open_source(
    source: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    resolution: int | None = None,
) -> Any:
    """Returns the random-access source (``len`` + ``__getitem__``) for ``source``/``split``.

    TFDS sources are opened with ``tfds.data_source(..., download=False)``; records are
    dicts with at least ``"image"`` (uint8 HWC).  ``resolution``: see
    :func:`~fmjax.data.sources.source_resolution` (a ``ValueError`` for one a fixed-size
    source does not hold; ``"folder"`` needs it).
    """
    tfds_name, _, _ = lookup_source(source)
    resolution = source_resolution(source, resolution)
    if tfds_name == "npz":
        return open_npz(source, split, data_dir)
    if tfds_name == "folder":
        return open_folder(split, data_dir, resolution)
    return open_tfds(source, split, data_dir)


def num_examples(
    source: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    resolution: int | None = None,
) -> int:
    """Number of examples in ``source``/``split`` (reads metadata or labels; a pickled batch
    file is read once and dropped; a folder is listed, not decoded)."""
    return len(open_source(source, split, data_dir, resolution))


# --------------------------------------------------------------------------------------
# Per-example transforms (module-level classes so they pickle into grain workers).
# --------------------------------------------------------------------------------------


def _extract(record: Any, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.int32]:
    image = np.asarray(record["image"])
    if image.shape != shape or image.dtype != np.uint8:
        raise ValueError(f"Expected uint8 images of shape {shape}, got {image.dtype} {image.shape}")
    label = record.get("label", NO_LABEL) if isinstance(record, dict) else NO_LABEL
    return image, np.int32(label)


@dataclasses.dataclass(frozen=True)
class _TrainTransform:
    """uint8 record -> model-space float32 image (+ flip, + dequantization)."""

    random_flip: bool
    dequantize: bool
    shape: tuple[int, int, int] = IMAGE_SHAPE

    def __call__(self, record: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
        image, label = _extract(record, self.shape)
        # The coin is always drawn so the noise stream does not depend on random_flip.
        flip = rng.random() < 0.5
        if self.random_flip and flip:
            image = image[:, ::-1, :]
        if self.dequantize:
            out = to_model_space(dequantize(image, rng))
        else:
            out = quantized_levels(image)
        return {"image": np.ascontiguousarray(out, dtype=np.float32), "label": label}


class _Padding:
    """Placeholder record past the end of an eval split (``None`` would be dropped by grain)."""


class _PaddedSource:
    """Source padded to ``length`` with ``_Padding`` records."""

    def __init__(self, source: Any, length: int):
        self._source = source
        self._n = len(source)
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Any:
        index = operator.index(index)
        return self._source[index] if index < self._n else _Padding()

    def __repr__(self) -> str:
        return f"_PaddedSource({self._source!r}, length={self._length})"


@dataclasses.dataclass(frozen=True)
class _EvalExample:
    """uint8 record (or padding: zeros, label 0, masked out) -> image, label and mask."""

    shape: tuple[int, int, int] = IMAGE_SHAPE

    def __call__(self, record: Any) -> dict[str, Any]:
        if isinstance(record, _Padding):
            return {"image": np.zeros(self.shape, np.uint8), "label": np.int32(0), "mask": False}
        image, label = _extract(record, self.shape)
        return {"image": image, "label": label, "mask": True}


def _eval_quantized(ex: dict[str, Any]) -> dict[str, np.ndarray]:
    return {
        "image": quantized_levels(ex["image"]),
        "label": ex["label"],
        "mask": np.bool_(ex["mask"]),
    }


def _eval_dequantized(ex: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "image": to_model_space(dequantize(ex["image"], rng)),
        "label": ex["label"],
        "mask": np.bool_(ex["mask"]),
    }


# --------------------------------------------------------------------------------------
# Pipelines.
# --------------------------------------------------------------------------------------


def make_train_dataset(
    source: str = DEFAULT_SOURCE,
    *,
    global_batch_size: int,
    seed: int,
    data_dir: str | os.PathLike | None = None,
    split: str = "train",
    random_flip: bool = True,
    dequantize: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
    worker_count: int = 0,
    read_threads: int = 8,
    prefetch_buffer_size: int = 8,
    pairing: PairBatch | None = None,
    source_std: float = 1.0,
    resolution: int | None = None,
) -> grain.IterDataset:
    """The seeded, sharded training pipeline as a grain ``IterDataset``.

    Yields ``{"image": float32 (B, R, R, 3) in [-1, 1), "label": int32 (B,)}`` with
    ``B = global_batch_size // process_count``; this process's slice
    ``[p*B, (p+1)*B)`` of every global batch (see the module docstring).  The data
    is reshuffled every epoch; ``num_epochs=None`` repeats forever, otherwise the
    iterator stops after ``floor(num_epochs * N / global_batch_size)`` batches (the
    incomplete last global batch is dropped).  ``random_flip`` flips horizontally
    with probability 1/2; ``dequantize`` adds uniform noise (else the bin's lower
    edge ``2x/256 - 1`` is returned).  ``worker_count > 0`` runs the transforms in
    that many grain worker processes (same output).  ``process_index`` /
    ``process_count`` default to JAX's; ``read_threads`` and ``prefetch_buffer_size`` are
    grain's read options; ``resolution`` ``R`` is the source's own by default (see the
    module docstring).

    ``pairing`` (a :class:`fmjax.data.pairing.PairBatch`) adds ``"x0"``: source noise
    ``source_std * N(0, I)`` per example, seeded by its global position, then paired with
    each of this process's batches by exact minibatch OT in the pipeline's threads (see
    :mod:`fmjax.data.pairing`); the other entries are unchanged.
    """
    lookup_source(source)
    shape = image_shape(source_resolution(source, resolution))
    layout = process_layout(global_batch_size, process_index, process_count)
    shuffle_seed, augment_seed, source_seed = derive_seeds(seed, 3)
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None or >= 1, got {num_epochs}")
    src = open_source(source, split, data_dir, shape[0])
    n = len(src)
    if n == 0:
        raise ValueError(f"{source!r} split {split!r} is empty")
    ds = grain.MapDataset.source(src).shuffle(seed=shuffle_seed)  # new order every epoch
    ds = ds.repeat(num_epochs)  # global example order, epochs concatenated
    # Seeded by global position: same flip/noise whatever the process layout.
    ds = ds.random_map(_TrainTransform(random_flip, dequantize, shape), seed=augment_seed)
    if pairing is not None:  # the noise, also by global position: exact on resume
        ds = ds.random_map(DrawSource(float(source_std), "image"), seed=source_seed)
    num_global = None
    if num_epochs is not None:
        num_global = n * num_epochs // global_batch_size
        if num_global == 0:
            raise ValueError(
                f"{n * num_epochs} examples ({num_epochs} epochs) are fewer than one "
                f"global batch of {global_batch_size}"
            )
    return sharded_batches(
        ds, layout, num_global, read_threads, prefetch_buffer_size, worker_count, pairing
    )


def make_train_iterator(source: str = DEFAULT_SOURCE, **kwargs: Any) -> grain.DatasetIterator:
    """``iter(make_train_dataset(source, **kwargs))``: the checkpointable training iterator.

    ``get_state()`` / ``set_state()`` on the returned iterator checkpoint its position (see
    the module docstring); the arguments are those of :func:`make_train_dataset`.
    """
    return iter(make_train_dataset(source, **kwargs))


def make_eval_dataset(
    source: str = DEFAULT_SOURCE,
    *,
    global_batch_size: int,
    data_dir: str | os.PathLike | None = None,
    split: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    dequantize: bool = False,
    seed: int = 0,
    read_threads: int = 8,
    prefetch_buffer_size: int = 8,
    resolution: int | None = None,
) -> grain.IterDataset:
    """One ordered, unshuffled, unflipped pass over ``split`` (default: the source's eval split).

    Yields ``{"image": float32 (B, R, R, 3), "label": int32 (B,), "mask": bool (B,)}``
    with ``B = global_batch_size // process_count``.  Example ``i`` of the split sits
    at position ``i`` of the global stream (global batch ``i // G``, process
    ``(i % G) // B``); the last global batch is padded with zero-valued (``-1.0``)
    images, label 0 and ``mask=False``, so every process yields exactly
    ``ceil(N / G)`` batches and every example appears exactly once with
    ``mask=True``.  Images are the quantized levels ``2x/256 - 1`` (add
    ``BIN_WIDTH * U[0, 1)`` to dequantize) unless ``dequantize=True``, which adds
    seeded uniform noise like training.  ``resolution``: as in :func:`make_train_dataset`.
    """
    _, _, eval_split = lookup_source(source)
    shape = image_shape(source_resolution(source, resolution))
    split = eval_split if split is None else split
    layout = process_layout(global_batch_size, process_index, process_count)
    src = open_source(source, split, data_dir, shape[0])
    num_global = math.ceil(len(src) / global_batch_size)
    ds = grain.MapDataset.source(_PaddedSource(src, num_global * global_batch_size))
    ds = ds.map(_EvalExample(shape))
    if dequantize:
        (eval_seed,) = derive_seeds(seed, 1)
        ds = ds.random_map(_eval_dequantized, seed=eval_seed)
    else:
        ds = ds.map(_eval_quantized)
    return sharded_batches(ds, layout, None, read_threads, prefetch_buffer_size)


def make_eval_iterator(source: str = DEFAULT_SOURCE, **kwargs: Any) -> grain.DatasetIterator:
    """``iter(make_eval_dataset(source, **kwargs))``: one pass over the evaluation split.

    The arguments are those of :func:`make_eval_dataset`.
    """
    return iter(make_eval_dataset(source, **kwargs))
