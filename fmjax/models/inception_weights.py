"""Weights of the FID Inception-v3: their npz layout, I/O and conversion from pytorch-fid.

Weights are never downloaded: pass a ``.npz`` file in the layout below (``weights_path``),
made once from pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (released with
github.com/mseitzer/pytorch-fid) by :func:`convert_pytorch_fid_weights` (needs torch, CPU
build is enough, on any machine).  Without it :class:`FIDWeightsNotFoundError` says how to
make it; callers print ``FID skipped: <message>`` rather than report a number.

NPZ layout (``LAYOUT_VERSION``, all arrays float32, nothing pickled)
----------------------------------------------------------------------
``"__layout__"``: the 0-d string ``"fmjax-fid-inception-v3/1"``.  For each of the 94
conv + batch-norm + ReLU units, named by its torchvision module path with ``/`` for ``.``
(``Conv2d_1a_3x3``, ``Conv2d_2a_3x3``, ``Conv2d_2b_3x3``, ``Conv2d_3b_1x1``,
``Conv2d_4a_3x3``, ``Mixed_5b/branch1x1``, ``Mixed_5b/branch5x5_1``, ...,
``Mixed_7c/branch_pool``; :func:`param_shapes` lists them all with their shapes):

- ``"<unit>/kernel"``: ``(kh, kw, c_in, c_out)`` convolution kernel, HWIO (pytorch's
  ``conv.weight`` ``(c_out, c_in, kh, kw)`` transposed by ``(2, 3, 1, 0)``); no conv bias.
- ``"<unit>/scale"``, ``"<unit>/bias"``: ``(c_out,)`` batch-norm gamma and beta.
- ``"<unit>/mean"``, ``"<unit>/var"``: ``(c_out,)`` batch-norm running mean and variance;
  the unit computes ``relu((conv(x) - mean) * scale / sqrt(var + 1e-3) + bias)``.

The final ``fc`` layer (1008 logits) is not needed for FID and not stored.  In Flax these are
the ``params`` of :class:`fmjax.models.inception.InceptionV3FID`
(``flax.traverse_util.unflatten_dict`` with ``sep="/"``): :func:`load_weights` and
:func:`save_weights` convert.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fmjax.models.inception import InceptionV3FID, unwrap_params

__all__ = [
    "LAYOUT_VERSION",
    "PYTORCH_FID_WEIGHTS",
    "FIDWeightsNotFoundError",
    "convert_pytorch_fid_weights",
    "fid_skip_reason",
    "init_random_params",
    "load_weights",
    "param_shapes",
    "save_weights",
]

#: Tag of the converted Inception weights layout that :func:`load_weights` accepts.
LAYOUT_VERSION = "fmjax-fid-inception-v3/1"
#: File name of pytorch-fid's released FID Inception weights.
PYTORCH_FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"


class FIDWeightsNotFoundError(FileNotFoundError):
    """The Inception weights file for FID was not given or does not exist."""


def _weights_missing_message(weights_path) -> str:
    how = (
        "Nothing is downloaded. Get pytorch-fid's "
        f"{PYTORCH_FID_WEIGHTS} (release 'fid_weights' of github.com/mseitzer/pytorch-fid) "
        "and convert it once with fmjax.models.inception_weights.convert_pytorch_fid_weights("
        "pt_path, 'inception_fid.npz') (needs torch), then pass "
        "weights_path='inception_fid.npz'."
    )
    if weights_path is None:
        return f"no Inception weights file given (weights_path=None). {how}"
    return f"Inception weights file {os.fspath(weights_path)!r} does not exist. {how}"


def fid_skip_reason(weights_path) -> str | None:
    """``None`` if ``weights_path`` names an existing file, else why FID cannot run."""
    if weights_path is not None and os.path.isfile(os.fspath(weights_path)):
        return None
    return _weights_missing_message(weights_path)


@functools.cache
def param_shapes() -> dict[str, tuple[int, ...]]:
    """The npz layout: ``{"<unit>/<field>": shape}`` for every stored array (no I/O)."""
    shapes = jax.eval_shape(
        lambda: InceptionV3FID(resize_to=None).init(jax.random.key(0), jnp.zeros((1, 299, 299, 3)))
    )
    flat = traverse_util.flatten_dict(shapes["params"], sep="/")
    return {k: tuple(v.shape) for k, v in sorted(flat.items())}


def _unit_names() -> list[str]:
    return sorted({k.rsplit("/", 1)[0] for k in param_shapes()})


def _check_flat(flat: dict[str, np.ndarray], where: str) -> None:
    expected = param_shapes()
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    bad = sorted(k for k in set(expected) & set(flat) if tuple(flat[k].shape) != expected[k])
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[:3]})")
        if bad:
            parts.append(
                "wrong shapes: "
                + ", ".join(f"{k} {tuple(flat[k].shape)} != {expected[k]}" for k in bad[:3])
            )
        raise ValueError(
            f"{where} does not match the FID Inception layout {LAYOUT_VERSION!r}: "
            + "; ".join(parts)
            + ". See the docstring of fmjax.models.inception_weights."
        )


def save_weights(path, params) -> None:
    """Writes ``params`` (the Flax params of
    :class:`~fmjax.models.inception.InceptionV3FID`) in the npz layout."""
    flat = {
        k: np.asarray(v, np.float32)
        for k, v in traverse_util.flatten_dict(unwrap_params(params), sep="/").items()
    }
    _check_flat(flat, "params")
    _write_npz(path, flat)


def _write_npz(path, flat: dict[str, np.ndarray]) -> None:
    with open(os.fspath(path), "wb") as f:
        np.savez(f, __layout__=np.array(LAYOUT_VERSION), **flat)


def load_weights(weights_path) -> dict[str, Any]:
    """Reads an npz in the layout above -> ``{"params": tree}`` for
    :func:`~fmjax.models.inception.inception_features`.

    Raises :class:`FIDWeightsNotFoundError` if ``weights_path`` is None or missing, and
    ``ValueError`` if the file is not in the layout.
    """
    reason = fid_skip_reason(weights_path)
    if reason is not None:
        raise FIDWeightsNotFoundError(reason)
    path = os.fspath(weights_path)
    with np.load(path, allow_pickle=False) as z:
        layout = str(z["__layout__"]) if "__layout__" in z.files else None
        if layout != LAYOUT_VERSION:
            raise ValueError(
                f"{path} is not an fmjax FID Inception npz (its '__layout__' is {layout!r}, "
                f"expected {LAYOUT_VERSION!r}). Convert pytorch-fid's {PYTORCH_FID_WEIGHTS} "
                "with convert_pytorch_fid_weights()."
            )
        flat = {k: np.asarray(z[k], np.float32) for k in z.files if k != "__layout__"}
    _check_flat(flat, path)
    return {"params": traverse_util.unflatten_dict(flat, sep="/")}


def init_random_params(seed: int = 0) -> dict[str, Any]:
    """Randomly initialised params in the layout (He-normal kernels, identity batch norm)
    with slightly perturbed batch-norm statistics: for tests only (a random network gives
    meaningless FIDs).  Fast: numpy, no network evaluation."""
    rng = np.random.default_rng(seed)
    flat = {}
    for k, shape in param_shapes().items():
        field = k.rsplit("/", 1)[1]
        if field == "kernel":
            fan_in = shape[0] * shape[1] * shape[2]
            flat[k] = rng.normal(0.0, math.sqrt(2.0 / fan_in), shape).astype(np.float32)
        elif field in ("scale", "var"):
            flat[k] = rng.uniform(0.8, 1.2, shape).astype(np.float32)
        else:
            flat[k] = rng.normal(0.0, 0.05, shape).astype(np.float32)
    return {"params": traverse_util.unflatten_dict(flat, sep="/")}


def _from_torch_state_dict(state_dict: dict[str, Any]) -> dict[str, np.ndarray]:
    """pytorch-fid state dict (arrays or tensors) -> the flat npz layout."""

    def arr(v):
        if hasattr(v, "detach"):
            v = v.detach().cpu().numpy()
        return np.asarray(v, np.float32)

    flat: dict[str, np.ndarray] = {}
    used = set()
    missing = []
    for unit in _unit_names():
        prefix = unit.replace("/", ".")
        names = {
            "kernel": f"{prefix}.conv.weight",
            "scale": f"{prefix}.bn.weight",
            "bias": f"{prefix}.bn.bias",
            "mean": f"{prefix}.bn.running_mean",
            "var": f"{prefix}.bn.running_var",
        }
        for field, name in names.items():
            if name not in state_dict:
                missing.append(name)
                continue
            a = arr(state_dict[name])
            flat[f"{unit}/{field}"] = a.transpose(2, 3, 1, 0) if field == "kernel" else a
            used.add(name)
    unexpected = sorted(
        k
        for k in state_dict
        if k not in used and not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    )
    if missing or unexpected:
        hint = (
            " It has AuxLogits: this looks like torchvision's ImageNet Inception-v3, not "
            f"pytorch-fid's FID Inception ({PYTORCH_FID_WEIGHTS})."
            if any(k.startswith("AuxLogits") for k in unexpected)
            else ""
        )
        raise ValueError(
            f"not a pytorch-fid Inception state dict: {len(missing)} missing keys (e.g. "
            f"{missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}).{hint}"
        )
    _check_flat(flat, "the converted state dict")
    return flat


def convert_pytorch_fid_weights(pt_path, out_npz) -> str:
    """Converts pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` to the npz layout.

    Needs torch (imported here only; the CPU build is enough).  Returns ``out_npz``.
    """
    try:
        import torch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "convert_pytorch_fid_weights needs PyTorch to read the .pth file (pip install "
            "torch; the CPU build is enough). Only the conversion needs it: the resulting "
            ".npz is read without torch."
        ) from err
    pt_path = os.fspath(pt_path)
    if not os.path.isfile(pt_path):
        raise FIDWeightsNotFoundError(f"pytorch-fid weights file {pt_path!r} does not exist.")
    try:
        state = torch.load(pt_path, map_location="cpu", weights_only=True)
    except TypeError:  # torch < 1.13 has no weights_only
        state = torch.load(pt_path, map_location="cpu")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    flat = _from_torch_state_dict(dict(state))
    out_npz = os.fspath(out_npz)
    _write_npz(out_npz, flat)
    return out_npz
