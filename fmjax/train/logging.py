"""Run logging without TensorFlow: a JSONL scalars file, TensorBoard events, PNG grids.

Only process 0 writes (every method is a no-op elsewhere, so all processes can call them).
A :class:`MetricWriter` on ``workdir`` produces::

    workdir/metrics.jsonl          one JSON object per line: {"step": ..., "time": ..., ...}
    workdir/tb/events.out.tfevents.*   TensorBoard scalars and images (via tensorboardX)
    workdir/samples/<name>_<step>.png  image grids
    workdir/config.json            the run's config

TensorBoard event files are written with ``tensorboardX`` (protobuf only, no TensorFlow);
without it the writer warns once and writes the JSONL file and PNGs only.
``tensorboard --logdir workdir/tb`` shows them.

When a run resumes from a checkpoint at step ``s``, construct the writer with
``resume_step=s``: records after ``s`` (written by the interrupted run after its last
checkpoint) are dropped from ``metrics.jsonl``, so it reads as if the run never stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from fmjax.jsonio import json_default, write_json_atomic

__all__ = ["MetricWriter", "image_grid", "is_main_process", "save_image_grid", "write_json"]


def is_main_process() -> bool:
    """True in process 0 (the process that writes logs, grids and JSON files)."""
    import jax

    return jax.process_index() == 0


def write_json(path, obj, *, only_main: bool = True) -> None:
    """Write ``obj`` as indented JSON, atomically (temp file + rename); process 0 only.

    Args:
      path: the file to write (see :func:`fmjax.jsonio.write_json_atomic`).
      obj: a JSON-able object; NumPy numbers and arrays are converted.
      only_main: write in process 0 only (a no-op elsewhere); False writes in every process.
    """
    if only_main and not is_main_process():
        return
    write_json_atomic(path, obj)


def image_grid(
    images,
    nrow: int | None = None,
    padding: int = 2,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> np.ndarray:
    """Tile a batch ``(N, H, W, C)`` into one ``uint8`` image ``(rows*H', cols*W', C)``.

    Float images are mapped from ``value_range`` to [0, 255] (clipped); uint8 pass as they
    are. ``nrow`` images per row (default about sqrt(N)); ``padding`` pixels between them.
    """
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"images must have shape (N, H, W, C); got {x.shape}.")
    if x.dtype != np.uint8:
        lo, hi = value_range
        x = np.clip((x.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)
        x = np.round(x * 255.0).astype(np.uint8)
    n, h, w, c = x.shape
    if c not in (1, 3, 4):
        raise ValueError(f"images need 1, 3 or 4 channels; got {c}.")
    cols = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    grid = np.full(
        (rows * (h + padding) + padding, cols * (w + padding) + padding, c), 255, np.uint8
    )
    for i in range(n):
        r, k = divmod(i, cols)
        y0, x0 = padding + r * (h + padding), padding + k * (w + padding)
        grid[y0 : y0 + h, x0 : x0 + w] = x[i]
    return grid


def save_image_grid(images, path, **kwargs) -> np.ndarray:
    """Save :func:`image_grid` of ``images`` as a PNG at ``path`` (any process); the grid."""
    from PIL import Image

    grid = image_grid(images, **kwargs)
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(os.fspath(path))
    return grid


class MetricWriter:
    """Process-0 JSONL + TensorBoard + PNG writer for one run (see the module docstring).

    Args:
      workdir: the run's directory.
      tensorboard: also write TensorBoard event files (needs ``tensorboardX``).
      resume_step: drop ``metrics.jsonl`` records with ``step > resume_step`` (a resumed
        run); None keeps the file as it is and appends.
    """

    def __init__(self, workdir, *, tensorboard: bool = True, resume_step: int | None = None):
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.active = is_main_process()
        self.jsonl_path = os.path.join(self.workdir, "metrics.jsonl")
        self._tb = None
        if not self.active:
            return
        os.makedirs(self.workdir, exist_ok=True)
        if resume_step is not None:
            self._truncate(int(resume_step))
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                warnings.warn(
                    "tensorboardX is not installed: no TensorBoard event files "
                    "(pip install tensorboardX); metrics.jsonl is still written.",
                    stacklevel=2,
                )
            else:
                self._tb = SummaryWriter(logdir=os.path.join(self.workdir, "tb"), flush_secs=30)

    def _truncate(self, resume_step: int):
        if not os.path.exists(self.jsonl_path):
            return
        kept = []
        with open(self.jsonl_path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by the kill
                    continue
                if int(rec.get("step", 0)) <= resume_step:
                    kept.append(json.dumps(rec) + "\n")
        tmp = self.jsonl_path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.jsonl_path)

    def write_scalars(self, step: int, scalars: Mapping[str, Any], *, prefix: str = "") -> None:
        """Append one record ``{"step": step, "time": ..., **scalars}``; TB gets each scalar."""
        if not self.active:
            return
        rec = {"step": int(step), "time": time.time()}
        for k, v in scalars.items():
            try:
                rec[prefix + k] = float(np.asarray(v))
            except (TypeError, ValueError):
                rec[prefix + k] = v
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(rec, default=json_default) + "\n")
        if self._tb is not None:
            for k, v in rec.items():
                if k not in ("step", "time") and isinstance(v, float):
                    self._tb.add_scalar(k, v, int(step))

    def write_images(self, step: int, name: str, images, **grid_kwargs) -> str | None:
        """Save a grid of ``images`` as ``samples/<name>_<step>.png`` (and in TB); the path."""
        if not self.active:
            return None
        path = os.path.join(self.workdir, "samples", f"{name}_{int(step):08d}.png")
        grid = save_image_grid(images, path, **grid_kwargs)
        if self._tb is not None:
            self._tb.add_image(name, grid, int(step), dataformats="HWC")
        return path

    def write_config(self, config) -> None:
        """``config.json`` in the work dir (a ConfigDict or a JSON-able mapping)."""
        if not self.active:
            return
        if hasattr(config, "to_json_best_effort"):
            obj = json.loads(config.to_json_best_effort())
        else:
            obj = config
        write_json(os.path.join(self.workdir, "config.json"), obj)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
