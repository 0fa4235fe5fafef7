"""Atomic JSON files: the one writer behind run summaries, configs and resumable state.

:func:`write_json_atomic` writes to a temporary file beside ``path``, flushes it to disk and
renames it over ``path``, so a reader (or a run that resumes after being killed) sees either
the previous file or the new one, never a partial one.  NumPy scalars and arrays, and objects
with ``to_dict()``, are converted by :func:`json_default`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

__all__ = ["json_default", "write_json_atomic"]


def json_default(x: Any) -> Any:
    """``default=`` hook of :func:`json.dump`: NumPy numbers and arrays as Python ones,
    objects with ``to_dict()`` as that dict, anything else as ``str(x)``."""
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if hasattr(x, "to_dict"):
        return x.to_dict()
    return str(x)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as indented JSON to ``path`` atomically (temp file, fsync, rename).

    Args:
      path: the file to write; its directory is created if needed.
      obj: a JSON-able object (see :func:`json_default` for what else is accepted).
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=json_default, allow_nan=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
