"""Image input pipeline for Flow Matching on ImageNet 32x32 and CIFAR-10.

The pipeline is TensorFlow-free: TFDS datasets are read through
``tfds.data_source`` (array_record files, random access) and the official
downsampled-ImageNet batches are read with numpy/pickle.  Everything after the
source is a `grain <https://github.com/google/grain>`_ ``MapDataset`` pipeline,
so it is deterministic, seedable and checkpointable.

Sources (``SOURCES``)
---------------------
``"imagenet_resized/32x32"`` (default)
    TFDS ``imagenet_resized/32x32``: the Chrabaszcz et al. (2017) box-resized
    ImageNet used by the Flow Matching paper.  Splits ``train`` / ``validation``.
``"downsampled_imagenet/32x32"``
    TFDS ``downsampled_imagenet/32x32`` (van den Oord et al., 2016).  Splits
    ``train`` / ``validation``.  This dataset has no labels: ``label`` is
    ``NO_LABEL`` (-1).
``"cifar10"``
    TFDS ``cifar10``.  Splits ``train`` / ``test``.
``"imagenet32_npz"``
    The official Chrabaszcz et al. (2017) batches, i.e. the content of
    ``Imagenet32_train_npz.zip`` / ``Imagenet32_val_npz.zip`` (``.npz`` files) or
    of ``Imagenet32_train.zip`` / ``Imagenet32_val.zip`` (pickled files without
    extension): ``train_data_batch_1`` ... ``train_data_batch_10`` and
    ``val_data``, each holding ``data`` (N, 3072) uint8 in channel-major CHW
    order and 1-based ``labels``.  ``data_dir`` is the folder holding them (or a
    folder whose immediate sub-folders hold them).  Split ``"train"`` means all
    ``train_data_batch_*`` files (in numeric order); ``"val_data"`` (alias
    ``"validation"``) the validation file; any other split name selects the
    single file of that name (e.g. ``"train_data_batch_3"``).  Labels are made
    0-based, like TFDS ``imagenet_resized``.  The arrays are loaded lazily into
    memory, one file at a time, in every process that reads them (about 3.9 GB
    for the full 32x32 train set).  Pickled files are unpickled: only use files
    you trust.

Nothing is ever downloaded: a missing dataset raises ``DatasetNotFoundError``.

Value range
-----------
Pixels ``x`` in {0, ..., 255} are uniformly dequantized to ``(x + u) / 256`` with
``u ~ U[0, 1)`` drawn from a per-example seeded RNG, then mapped to model space
``y = 2 * v - 1``, so ``y`` lies in ``[-1, 1)``.  Without dequantization the
image is the bin's lower edge ``y_q = 2 * x / 256 - 1`` (in ``[-1, 1 - 2/256]``),
and an evaluator dequantizes it itself as ``y_q + BIN_WIDTH * u``
(``BIN_WIDTH = 2 / 256``; see ``dequantize``/``to_model_space``).  Batches are
dicts ``{"image": float32 (B, 32, 32, 3) NHWC, "label": int32 (B,)}``; eval
batches also carry ``"mask": bool (B,)``.

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
import pickle
import re
import threading
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from etils import epath

__all__ = [
    "BIN_WIDTH",
    "DEFAULT_SOURCE",
    "IMAGE_SHAPE",
    "NO_LABEL",
    "SOURCES",
    "DatasetNotFoundError",
    "NpzImageSource",
    "dequantize",
    "make_eval_dataset",
    "make_eval_iterator",
    "make_train_dataset",
    "make_train_iterator",
    "num_examples",
    "open_source",
    "to_model_space",
    "to_uint8",
]

#: Shape of one image, ``(height, width, channels)``.
IMAGE_SHAPE: tuple[int, int, int] = (32, 32, 3)
#: Label of examples without a class (e.g. unlabeled npz batches).
NO_LABEL = -1
#: The paper's ImageNet-32 (Chrabaszcz et al. 2017 preprocessing).
DEFAULT_SOURCE = "imagenet_resized/32x32"
#: Width of one quantization bin in model space ([-1, 1] spans 256 bins).
BIN_WIDTH = 2.0 / 256.0
# Largest float32 below 1: keeps (255 + u) / 256 < 1 despite float32 rounding.
_ONE_BELOW = np.float32(np.nextafter(np.float32(1.0), np.float32(0.0)))

#: Data sources: name -> (TFDS name or ``"npz"``, default train split, default eval split).
SOURCES: dict[str, tuple[str, str, str]] = {
    "imagenet_resized/32x32": ("imagenet_resized/32x32", "train", "validation"),
    "downsampled_imagenet/32x32": ("downsampled_imagenet/32x32", "train", "validation"),
    "cifar10": ("cifar10", "train", "test"),
    "imagenet32_npz": ("npz", "train", "val_data"),
}

_IMAGENET_DOWNSAMPLED_URL = "https://image-net.org/download-images.php"

_HOW_TO_PROVIDE: dict[str, str] = {
    "imagenet_resized/32x32": (
        "download Imagenet32_train_npz.zip and Imagenet32_val_npz.zip "
        f"('downsampled images', {_IMAGENET_DOWNSAMPLED_URL}) and either (a) unzip them "
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


def _lookup(source: str) -> tuple[str, str, str]:
    try:
        return SOURCES[source]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown image source {source!r}; known sources: {', '.join(sorted(SOURCES))}"
        ) from None


# --------------------------------------------------------------------------------------
# Value-space helpers.
# --------------------------------------------------------------------------------------


def dequantize(images_uint8: Any, rng: Any) -> Any:
    """Uniform dequantization ``(x + u) / 256`` with ``u ~ U[0, 1)``; result in ``[0, 1)``.

    ``rng`` is a ``np.random.Generator`` (numpy in, numpy float32 out) or a JAX PRNG
    key (JAX float32 out, usable under ``jit``).
    """
    if isinstance(rng, np.random.Generator):
        x = np.asarray(images_uint8, dtype=np.float32)
        u = rng.random(x.shape, dtype=np.float32)
        return np.minimum((x + u) * np.float32(1.0 / 256.0), _ONE_BELOW)
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(images_uint8, dtype=jnp.float32)
    u = jax.random.uniform(rng, x.shape, dtype=jnp.float32)
    return jnp.minimum((x + u) * (1.0 / 256.0), _ONE_BELOW)


def to_model_space(x: Any) -> Any:
    """Maps ``[0, 1)`` to ``[-1, 1)``: ``y = 2 * x - 1`` (dtype preserved)."""
    return x * 2 - 1


def to_uint8(y: Any) -> np.ndarray:
    """Inverse of the pipeline's mapping: model-space ``y`` -> uint8 ``floor((y + 1) * 128)``."""
    y = np.asarray(y, dtype=np.float32)
    return np.clip(np.floor((y + 1.0) * 128.0), 0, 255).astype(np.uint8)


def _quantized_model_space(image_uint8: np.ndarray) -> np.ndarray:
    return to_model_space(np.asarray(image_uint8, dtype=np.float32) * np.float32(1.0 / 256.0))


# --------------------------------------------------------------------------------------
# Sources.
# --------------------------------------------------------------------------------------

_TRAIN_BATCH_RE = re.compile(r"^train_data_batch_(\d+)(\.npz)?$")
_NPZ_SPLIT_ALIASES = {"val": "val_data", "validation": "val_data", "valid": "val_data"}


def _read_batch_file(path: epath.Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads one official batch file -> (data (N, 3*S*S) uint8, 0-based int32 labels)."""
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
    expected = int(np.prod(IMAGE_SHAPE))
    if data.ndim != 2 or data.shape[1] != expected or data.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{path}: expected 'data' of shape (N, {expected}) and N 'labels', got "
            f"{data.shape} and {labels.shape}"
        )
    if data.dtype != np.uint8:
        data = data.astype(np.uint8)
    return data, (labels.astype(np.int64) - 1).astype(np.int32)


def _count_batch_file(path: epath.Path) -> int:
    """Number of examples in a batch file: an npz's labels only; a pickled batch has no
    index, so it is loaded and dropped again (opening the ~3.9 GB train split must not keep
    it in memory; the files are read again one at a time when their examples are)."""
    if path.name.endswith(".npz"):
        with path.open("rb") as f, np.load(f, allow_pickle=False) as z:
            return int(np.asarray(z["labels"]).reshape(-1).shape[0])
    return int(_read_batch_file(path)[1].shape[0])


class NpzImageSource:
    """Random-access source over official downsampled-ImageNet batch files.

    Yields ``{"image": uint8 (32, 32, 3) HWC, "label": int32 (0-based)}``.  Files are
    loaded lazily (thread-safe); the arrays are not pickled, so worker processes
    reload them themselves.
    """

    def __init__(self, files: Sequence[str | os.PathLike]):
        self._files = [epath.Path(f) for f in files]
        if not self._files:
            raise ValueError("NpzImageSource needs at least one file")
        self._arrays: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(self._files)
        self._offsets = np.cumsum([0, *(_count_batch_file(f) for f in self._files)])
        self._lock = threading.Lock()

    @property
    def files(self) -> list[epath.Path]:
        return list(self._files)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __repr__(self) -> str:
        return f"NpzImageSource(files={[os.fspath(f) for f in self._files]}, len={len(self)})"

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
                    arrays = _read_batch_file(self._files[k])
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
        c, (h, w) = IMAGE_SHAPE[2], IMAGE_SHAPE[:2]
        # Channel-major CHW (R plane, G plane, B plane) -> HWC.
        image = data[j].reshape(c, h, w).transpose(1, 2, 0)
        return {"image": image, "label": labels[j]}


def _npz_candidate_dirs(root: epath.Path) -> list[epath.Path]:
    if not root.is_dir():
        return []
    return [root, *sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.name)]


def _match_npz_split(directory: epath.Path, split: str) -> list[epath.Path]:
    names = {p.name: p for p in directory.iterdir() if not p.is_dir()}
    if split == "train":
        found: dict[int, epath.Path] = {}
        for name, path in names.items():
            m = _TRAIN_BATCH_RE.match(name)
            if m and (int(m.group(1)) not in found or name.endswith(".npz")):
                found[int(m.group(1))] = path
        return [found[k] for k in sorted(found)]
    stem = _NPZ_SPLIT_ALIASES.get(split, split)
    for name in (f"{stem}.npz", stem):
        if name in names:
            return [names[name]]
    return []


def _open_npz(source: str, split: str, data_dir: str | os.PathLike | None) -> NpzImageSource:
    expected = (
        "train_data_batch_1 ... train_data_batch_10 (.npz or pickled without extension)"
        if split == "train"
        else f"{_NPZ_SPLIT_ALIASES.get(split, split)}[.npz]"
    )
    how = (
        "To provide them, download Imagenet32_train_npz.zip and Imagenet32_val_npz.zip "
        "(or the pickled Imagenet32_train.zip / Imagenet32_val.zip) from "
        f"{_IMAGENET_DOWNSAMPLED_URL} ('downsampled images') and unzip them into data_dir; "
        "or use source='imagenet_resized/32x32' with a prepared TFDS copy."
    )
    if data_dir is None:
        raise DatasetNotFoundError(
            f"Source {source!r} (split {split!r}) needs data_dir: the folder holding the "
            f"official downsampled-ImageNet batches {expected}. {how}",
            source=source,
            split=split,
            data_dir=None,
        )
    root = epath.Path(data_dir)
    for directory in _npz_candidate_dirs(root):
        files = _match_npz_split(directory, split)
        if files:
            return NpzImageSource(files)
    raise DatasetNotFoundError(
        f"Source {source!r}: no files for split {split!r} ({expected}) found in "
        f"data_dir={os.fspath(data_dir)!r} or its immediate sub-folders. {how}",
        source=source,
        split=split,
        data_dir=os.fspath(data_dir),
    )


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


def open_source(source: str, split: str, data_dir: str | os.PathLike | None = None) -> Any:
    """Returns the random-access source (``len`` + ``__getitem__``) for ``source``/``split``.

    TFDS sources are opened with ``tfds.data_source(..., download=False)``; records are
    dicts with at least ``"image"`` (uint8 HWC).
    """
    tfds_name, _, _ = _lookup(source)
    if tfds_name == "npz":
        return _open_npz(source, split, data_dir)
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
    except Exception as err:
        missing = _missing_tfds_error(source, tfds_name, split, data_dir)
        if missing is not None:
            raise missing from err
        raise


def num_examples(source: str, split: str, data_dir: str | os.PathLike | None = None) -> int:
    """Number of examples in ``source``/``split`` (reads metadata or labels; a pickled batch
    file is read once and dropped)."""
    return len(open_source(source, split, data_dir))


# --------------------------------------------------------------------------------------
# Per-example transforms (module-level classes so they pickle into grain workers).
# --------------------------------------------------------------------------------------


def _extract(record: Any) -> tuple[np.ndarray, np.int32]:
    image = np.asarray(record["image"])
    if image.shape != IMAGE_SHAPE or image.dtype != np.uint8:
        raise ValueError(
            f"Expected uint8 images of shape {IMAGE_SHAPE}, got {image.dtype} {image.shape}"
        )
    label = record.get("label", NO_LABEL) if isinstance(record, dict) else NO_LABEL
    return image, np.int32(label)


@dataclasses.dataclass(frozen=True)
class _TrainTransform:
    """uint8 record -> model-space float32 image (+ flip, + dequantization)."""

    random_flip: bool
    dequantize: bool

    def __call__(self, record: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
        image, label = _extract(record)
        # The coin is always drawn so the noise stream does not depend on random_flip.
        flip = rng.random() < 0.5
        if self.random_flip and flip:
            image = image[:, ::-1, :]
        if self.dequantize:
            out = to_model_space(dequantize(image, rng))
        else:
            out = _quantized_model_space(image)
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


def _eval_example(record: Any) -> dict[str, Any]:
    if isinstance(record, _Padding):
        return {"image": np.zeros(IMAGE_SHAPE, np.uint8), "label": np.int32(0), "mask": False}
    image, label = _extract(record)
    return {"image": image, "label": label, "mask": True}


def _eval_quantized(ex: dict[str, Any]) -> dict[str, np.ndarray]:
    return {
        "image": _quantized_model_space(ex["image"]),
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


def _process_layout(
    global_batch_size: int, process_index: int | None, process_count: int | None
) -> tuple[int, int, int]:
    """-> (process_index, process_count, per-process batch size)."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1:
        raise ValueError(f"process_count must be >= 1, got {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by process_count "
            f"{process_count}"
        )
    return process_index, process_count, global_batch_size // process_count


def _derive_seeds(seed: int, n: int) -> list[int]:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return [int(s) for s in np.random.SeedSequence(int(seed)).generate_state(n, np.uint32)]


def _ensure_absl_flags_parsed() -> None:
    """grain 0.2.18's worker processes read absl flags (google/grain#1355): outside
    ``absl.app.run`` they are unparsed and ``mp_prefetch`` fails with
    ``UnparsedFlagAccessError``; marking them parsed keeps every default."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _read_options(read_threads: int, prefetch_buffer_size: int) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size)


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
) -> grain.IterDataset:
    """The training pipeline as a grain ``IterDataset`` (see ``make_train_iterator``)."""
    _lookup(source)
    p, count, per_process = _process_layout(global_batch_size, process_index, process_count)
    shuffle_seed, augment_seed = _derive_seeds(seed, 2)
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None or >= 1, got {num_epochs}")
    src = open_source(source, split, data_dir)
    n = len(src)
    if n == 0:
        raise ValueError(f"{source!r} split {split!r} is empty")
    ds = grain.MapDataset.source(src).shuffle(seed=shuffle_seed)  # new order every epoch
    ds = ds.repeat(num_epochs)  # global example order, epochs concatenated
    # Seeded by global position: same flip/noise whatever the process layout.
    ds = ds.random_map(_TrainTransform(random_flip, dequantize), seed=augment_seed)
    # Block k = positions [k*B, (k+1)*B); global batch g = blocks g*P .. g*P+P-1.
    ds = ds.batch(per_process, drop_remainder=True)
    stop = None
    if num_epochs is not None:
        num_global = n * num_epochs // global_batch_size
        if num_global == 0:
            raise ValueError(
                f"{n * num_epochs} examples ({num_epochs} epochs) are fewer than one "
                f"global batch of {global_batch_size}"
            )
        stop = num_global * count
    ds = ds.slice(slice(p, stop, count))
    out = ds.to_iter_dataset(_read_options(read_threads, prefetch_buffer_size))
    if worker_count > 0:
        _ensure_absl_flags_parsed()
        out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return out


def make_train_iterator(
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
) -> grain.DatasetIterator:
    """Seeded, sharded, checkpointable training iterator.

    Yields ``{"image": float32 (B, 32, 32, 3) in [-1, 1), "label": int32 (B,)}`` with
    ``B = global_batch_size // process_count``; this process's slice
    ``[p*B, (p+1)*B)`` of every global batch (see the module docstring).  The data
    is reshuffled every epoch; ``num_epochs=None`` repeats forever, otherwise the
    iterator stops after ``floor(num_epochs * N / global_batch_size)`` batches (the
    incomplete last global batch is dropped).  ``random_flip`` flips horizontally
    with probability 1/2; ``dequantize`` adds uniform noise (else the bin's lower
    edge ``2x/256 - 1`` is returned).  ``worker_count > 0`` runs the transforms in
    that many grain worker processes (same output).  ``get_state()`` /
    ``set_state()`` on the returned iterator checkpoint its position.
    """
    return iter(
        make_train_dataset(
            source,
            global_batch_size=global_batch_size,
            seed=seed,
            data_dir=data_dir,
            split=split,
            random_flip=random_flip,
            dequantize=dequantize,
            process_index=process_index,
            process_count=process_count,
            num_epochs=num_epochs,
            worker_count=worker_count,
            read_threads=read_threads,
            prefetch_buffer_size=prefetch_buffer_size,
        )
    )


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
) -> grain.IterDataset:
    """The evaluation pipeline as a grain ``IterDataset`` (see ``make_eval_iterator``)."""
    _, _, eval_split = _lookup(source)
    split = eval_split if split is None else split
    p, count, per_process = _process_layout(global_batch_size, process_index, process_count)
    src = open_source(source, split, data_dir)
    num_global = math.ceil(len(src) / global_batch_size)
    ds = grain.MapDataset.source(_PaddedSource(src, num_global * global_batch_size))
    ds = ds.map(_eval_example)
    if dequantize:
        (eval_seed,) = _derive_seeds(seed, 1)
        ds = ds.random_map(_eval_dequantized, seed=eval_seed)
    else:
        ds = ds.map(_eval_quantized)
    ds = ds.batch(per_process, drop_remainder=True).slice(slice(p, None, count))
    return ds.to_iter_dataset(_read_options(read_threads, prefetch_buffer_size))


def make_eval_iterator(
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
) -> grain.DatasetIterator:
    """One ordered, unshuffled, unflipped pass over ``split`` (default: the source's eval split).

    Yields ``{"image": float32 (B, 32, 32, 3), "label": int32 (B,), "mask": bool (B,)}``
    with ``B = global_batch_size // process_count``.  Example ``i`` of the split sits
    at position ``i`` of the global stream (global batch ``i // G``, process
    ``(i % G) // B``); the last global batch is padded with zero-valued (``-1.0``)
    images, label 0 and ``mask=False``, so every process yields exactly
    ``ceil(N / G)`` batches and every example appears exactly once with
    ``mask=True``.  Images are the quantized levels ``2x/256 - 1`` (add
    ``BIN_WIDTH * U[0, 1)`` to dequantize) unless ``dequantize=True``, which adds
    seeded uniform noise like training.
    """
    return iter(
        make_eval_dataset(
            source,
            global_batch_size=global_batch_size,
            data_dir=data_dir,
            split=split,
            process_index=process_index,
            process_count=process_count,
            dequantize=dequantize,
            seed=seed,
            read_threads=read_threads,
            prefetch_buffer_size=prefetch_buffer_size,
        )
    )
