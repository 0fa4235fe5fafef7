"""Frechet Inception Distance with the FID Inception-v3 (pool3, 2048-d) in Flax linen.

FID (Heusel et al., 2017) compares the Gaussian statistics ``(mu, Sigma)`` of Inception-v3
pool3 features of generated and reference images:

    FID = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).

The network is the FID variant of Inception-v3 used by pytorch-fid (a port of the TensorFlow
2015-12-05 graph of the original FID code): torchvision's Inception-v3 layout, with the
Mixed_5b/c/d (A), Mixed_6b..e (C) and Mixed_7b (E_1) pool branches averaging over the valid
(unpadded) window only, and Mixed_7c (E_2) max-pooling its pool branch.  Images in
``[-1, 1]`` are resized to 299x299 (bilinear, half-pixel centres, no antialiasing: as
``torch.nn.functional.interpolate(mode='bilinear', align_corners=False)``), and the features
are the spatial mean of the last block.

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
the ``params`` of :class:`InceptionV3FID` (``flax.traverse_util.unflatten_dict`` with
``sep="/"``): :func:`load_weights` and :func:`save_weights` convert.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

__all__ = [
    "LAYOUT_VERSION",
    "FIDWeightsNotFoundError",
    "InceptionV3FID",
    "compute_fid",
    "convert_pytorch_fid_weights",
    "fid_skip_reason",
    "frechet_distance",
    "inception_features",
    "init_random_params",
    "load_weights",
    "param_shapes",
    "preprocess",
    "resize_bilinear",
    "save_weights",
    "statistics",
]

#: Tag of the converted Inception weights layout that :func:`load_weights` accepts.
LAYOUT_VERSION = "fmjax-fid-inception-v3/1"
PYTORCH_FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
BN_EPS = 1e-3
FEATURE_DIM = 2048
_UNIT_FIELDS = ("kernel", "scale", "bias", "mean", "var")


class FIDWeightsNotFoundError(FileNotFoundError):
    """The Inception weights file for FID was not given or does not exist."""


def _weights_missing_message(weights_path) -> str:
    how = (
        "Nothing is downloaded. Get pytorch-fid's "
        f"{PYTORCH_FID_WEIGHTS} (release 'fid_weights' of github.com/mseitzer/pytorch-fid) "
        "and convert it once with fmjax.metrics.fid.convert_pytorch_fid_weights(pt_path, "
        "'inception_fid.npz') (needs torch), then pass weights_path='inception_fid.npz'."
    )
    if weights_path is None:
        return f"no Inception weights file given (weights_path=None). {how}"
    return f"Inception weights file {os.fspath(weights_path)!r} does not exist. {how}"


def fid_skip_reason(weights_path) -> str | None:
    """``None`` if ``weights_path`` names an existing file, else why FID cannot run."""
    if weights_path is not None and os.path.isfile(os.fspath(weights_path)):
        return None
    return _weights_missing_message(weights_path)


# --------------------------------------------------------------------------------------
# The network.
# --------------------------------------------------------------------------------------


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv(nn.Module):
    """Convolution (no bias) + inference batch norm (eps 1e-3) + ReLU."""

    features: int
    kernel_size: Any = 1
    strides: Any = 1
    padding: Any = 0
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        kh, kw = _pair(self.kernel_size)
        ph, pw = _pair(self.padding)
        c_in = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.he_normal(), (kh, kw, c_in, self.features))
        scale = self.param("scale", nn.initializers.ones, (self.features,))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        mean = self.param("mean", nn.initializers.zeros, (self.features,))
        var = self.param("var", nn.initializers.ones, (self.features,))
        y = jax.lax.conv_general_dilated(
            x,
            kernel.astype(x.dtype),
            window_strides=_pair(self.strides),
            padding=((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.precision,
        )
        mult = scale * jax.lax.rsqrt(var + BN_EPS)
        return nn.relu(y * mult + (bias - mean * mult))


def resize_bilinear(images, size: int):
    """``(B, H, W, C)`` -> ``(B, size, size, C)``, bilinear with half-pixel centres and no
    antialiasing (= torch ``interpolate(mode='bilinear', align_corners=False)``)."""
    if images.shape[1:3] == (size, size):
        return images
    return jax.image.resize(
        images, (images.shape[0], size, size, images.shape[3]), method="bilinear", antialias=False
    )


def _avg_pool_valid(x):
    """3x3, stride 1, padding 1, averaging over the in-image part of each window only."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_same(x):
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_down(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):  # Mixed_5b/c/d, 35x35
    pool_features: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        b1 = conv(64, name="branch1x1")(x)
        b5 = conv(48, name="branch5x5_1")(x)
        b5 = conv(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = conv(64, name="branch3x3dbl_1")(x)
        b3 = conv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = conv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, name="branch_pool")(_avg_pool_valid(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):  # Mixed_6a, 35x35 -> 17x17
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        b3 = conv(384, 3, strides=2, name="branch3x3")(x)
        bd = conv(64, name="branch3x3dbl_1")(x)
        bd = conv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = conv(96, 3, strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_down(x)], axis=-1)


class InceptionC(nn.Module):  # Mixed_6b/c/d/e, 17x17, factorised 7x7
    channels_7x7: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        c7 = self.channels_7x7
        b1 = conv(192, name="branch1x1")(x)
        b7 = conv(c7, name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = conv(c7, name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = conv(192, name="branch_pool")(_avg_pool_valid(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):  # Mixed_7a, 17x17 -> 8x8
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        b3 = conv(192, name="branch3x3_1")(x)
        b3 = conv(320, 3, strides=2, name="branch3x3_2")(b3)
        b7 = conv(192, name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, 3, strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_down(x)], axis=-1)


class InceptionE(nn.Module):  # Mixed_7b (pool='avg': FID E_1), Mixed_7c (pool='max': E_2)
    pool: str
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        b1 = conv(320, name="branch1x1")(x)
        b3 = conv(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = conv(448, name="branch3x3dbl_1")(x)
        bd = conv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        pooled = _avg_pool_valid(x) if self.pool == "avg" else _max_pool_same(x)
        bp = conv(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3FID(nn.Module):
    """FID Inception-v3 up to pool3: ``(B, H, W, 3)`` images in ``[-1, 1]`` -> ``(B, 2048)``.

    ``resize_to``: the square size images are bilinearly resized to first (299 for FID; a
    smaller size, at least 75, only for fast tests; ``None`` keeps the input size).
    """

    resize_to: int | None = 299
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, images):
        x = jnp.asarray(images, jnp.float32)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"images must be (B, H, W, 3); got shape {x.shape}.")
        if self.resize_to is not None:
            x = resize_bilinear(x, self.resize_to)
        conv = functools.partial(BasicConv, precision=self.precision)
        p = self.precision
        x = conv(32, 3, strides=2, name="Conv2d_1a_3x3")(x)
        x = conv(32, 3, name="Conv2d_2a_3x3")(x)
        x = conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool_down(x)
        x = conv(80, 1, name="Conv2d_3b_1x1")(x)
        x = conv(192, 3, name="Conv2d_4a_3x3")(x)
        x = _max_pool_down(x)
        x = InceptionA(32, precision=p, name="Mixed_5b")(x)
        x = InceptionA(64, precision=p, name="Mixed_5c")(x)
        x = InceptionA(64, precision=p, name="Mixed_5d")(x)
        x = InceptionB(precision=p, name="Mixed_6a")(x)
        x = InceptionC(128, precision=p, name="Mixed_6b")(x)
        x = InceptionC(160, precision=p, name="Mixed_6c")(x)
        x = InceptionC(160, precision=p, name="Mixed_6d")(x)
        x = InceptionC(192, precision=p, name="Mixed_6e")(x)
        x = InceptionD(precision=p, name="Mixed_7a")(x)
        x = InceptionE("avg", precision=p, name="Mixed_7b")(x)
        x = InceptionE("max", precision=p, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


# --------------------------------------------------------------------------------------
# Weights: layout, npz I/O, conversion from pytorch-fid.
# --------------------------------------------------------------------------------------


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
            + ". See fmjax.metrics.fid's docstring."
        )


def _as_params(params):
    """Accept ``{"params": tree}`` (as returned by load_weights / init) or the tree itself."""
    if isinstance(params, dict) and set(params) == {"params"}:
        return params["params"]
    return params


def save_weights(path, params) -> None:
    """Writes ``params`` (the Flax params of :class:`InceptionV3FID`) in the npz layout."""
    flat = {
        k: np.asarray(v, np.float32)
        for k, v in traverse_util.flatten_dict(_as_params(params), sep="/").items()
    }
    _check_flat(flat, "params")
    with open(os.fspath(path), "wb") as f:
        np.savez(f, __layout__=np.array(LAYOUT_VERSION), **flat)


def load_weights(weights_path) -> dict[str, Any]:
    """Reads an npz in the layout above -> ``{"params": tree}`` for :func:`inception_features`.

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
    with open(out_npz, "wb") as f:
        np.savez(f, __layout__=np.array(LAYOUT_VERSION), **flat)
    return out_npz


# --------------------------------------------------------------------------------------
# Features and statistics.
# --------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("resize_to",))
def _features(params, images, resize_to):
    return InceptionV3FID(resize_to=resize_to).apply({"params": params}, images)


def inception_features(params, images, *, resize_to: int | None = 299):
    """Pool3 features ``(B, 2048)`` float32 of images ``(B, H, W, 3)`` in ``[-1, 1]``.

    ``params``: from :func:`load_weights` (or the params tree itself).  Compiled once per
    input shape: feed fixed-size batches (see :func:`compute_fid`).
    """
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (B, H, W, 3) in [-1, 1]; got shape {images.shape}.")
    return _features(_as_params(params), images, resize_to)


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` in float64: the mean and the (N-1)-normalised covariance."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2; got shape {f.shape}.")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(a):
    w, q = np.linalg.eigh((a + a.T) / 2)
    return (q * np.sqrt(np.clip(w, 0.0, None))) @ q.T


def frechet_distance(
    mu1, sigma1, mu2, sigma2, *, eps: float = 1e-6, method: str = "sqrtm"
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64 on the host.

    ``method="sqrtm"`` (default, as pytorch-fid): ``tr sqrtm(sigma1 @ sigma2)`` with
    :func:`scipy.linalg.sqrtm`; if that is not finite (singular product), both covariances
    get ``eps * I`` added; a negligible imaginary part is dropped (a large one raises).
    ``method="eigh"``: the symmetric form ``tr (S1^{1/2} S2 S1^{1/2})^{1/2}`` from two
    symmetric eigendecompositions (negative round-off eigenvalues clipped to 0): faster and
    well defined for singular covariances; equal up to round-off.
    """
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    s1, s2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"need mu (D,) and sigma (D, D) of the same D; got {mu1.shape}, "
            f"{s1.shape}, {mu2.shape}, {s2.shape}."
        )
    diff = mu1 - mu2
    if method == "eigh":
        r = _psd_sqrt(s1)
        m = r @ s2 @ r
        tr_covmean = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None))))
    elif method == "sqrtm":
        from scipy import linalg

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns on singular input; handled below
            covmean = linalg.sqrtm(s1 @ s2)
            if not np.all(np.isfinite(covmean)):
                offset = np.eye(d) * eps
                covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
        if np.iscomplexobj(covmean):
            imag = np.max(np.abs(np.diagonal(covmean).imag))
            if imag > 1e-3:
                raise ValueError(
                    f"frechet_distance: sqrtm has a large imaginary part ({imag:g}"
                    "); the covariances are probably not PSD. Try method='eigh'."
                )
            covmean = covmean.real
        tr_covmean = float(np.trace(covmean))
    else:
        raise ValueError(f"method must be 'sqrtm' or 'eigh'; got {method!r}.")
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def preprocess(images, *, quantize: bool = True) -> np.ndarray:
    """Model-space images in ``[-1, 1]`` -> the Inception input in ``[-1, 1]``.

    ``quantize=True`` (default) first maps them to 8-bit levels like saving a PNG, with the
    data pipeline's inverse map ``k = clip(floor((y + 1) * 128), 0, 255)`` (so the eval
    split's levels ``2k/256 - 1`` give back k exactly), then feeds ``2 k / 255 - 1``, what
    pytorch-fid feeds for an 8-bit image file.  ``quantize=False``: clip to ``[-1, 1]`` only.

    Integer arrays are taken as 8-bit levels ``k`` in ``[0, 255]`` (image files) and fed as
    ``2 k / 255 - 1``.  A float batch that looks like another convention (all values >= 0,
    as ``[0, 1]`` or ``[0, 255]`` images; or values beyond 10) gets a warning: such images
    would be clipped into ``[-1, 1]`` and give a meaningless FID.
    """
    raw = np.asarray(images)
    if np.issubdtype(raw.dtype, np.integer):
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            raise ValueError(
                f"integer images are 8-bit levels in [0, 255]; got values in "
                f"[{raw.min()}, {raw.max()}]."
            )
        return (raw.astype(np.float32) * (2.0 / 255.0) - 1.0).astype(np.float32)
    y = raw.astype(np.float32)
    if y.size > 1 and np.all(np.isfinite(y)) and (y.min() >= 0.0 or y.max() > 10.0):
        warnings.warn(
            f"FID expects model-space images in [-1, 1]; got a batch with values in "
            f"[{y.min():g}, {y.max():g}] ([0, 1] or [0, 255] images?). Pass 8-bit "
            "levels as an integer array, or map to [-1, 1].",
            stacklevel=2,
        )
    if not quantize:
        return np.clip(y, -1.0, 1.0)
    k = np.clip(np.floor((y + 1.0) * 128.0), 0, 255)
    return (k * (2.0 / 255.0) - 1.0).astype(np.float32)


def _batch_images(batch) -> np.ndarray:
    if isinstance(batch, dict):
        images = np.asarray(batch["image"])
        if "mask" in batch:
            images = images[np.asarray(batch["mask"], bool)]
        return images
    return np.asarray(batch)


class _FeatureAccumulator:
    """Features of fixed-size chunks (padded, so one compilation) until ``limit`` rows."""

    def __init__(self, params, limit, chunk, resize_to, quantize):
        self.params, self.limit, self.chunk = params, limit, chunk
        self.resize_to, self.quantize = resize_to, quantize
        self.parts: list[np.ndarray] = []
        self.count = 0

    @property
    def full(self) -> bool:
        return self.limit is not None and self.count >= self.limit

    def add(self, images) -> None:
        images = _batch_images(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (B, H, W, 3); got shape {images.shape}.")
        if self.limit is not None:
            images = images[: self.limit - self.count]
        x = preprocess(images, quantize=self.quantize)
        for s in range(0, len(x), self.chunk):
            part = x[s : s + self.chunk]
            n = len(part)
            if n < self.chunk:
                part = np.concatenate(
                    [part, np.zeros((self.chunk - n,) + part.shape[1:], part.dtype)]
                )
            f = inception_features(self.params, part, resize_to=self.resize_to)
            self.parts.append(np.asarray(f, np.float64)[:n])
            self.count += n

    def features(self) -> np.ndarray:
        if not self.parts:
            return np.zeros((0, FEATURE_DIM))
        return np.concatenate(self.parts)


def _load_ref_stats(ref_stats):
    if isinstance(ref_stats, (str, os.PathLike)):
        with np.load(os.fspath(ref_stats), allow_pickle=False) as z:
            return np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
    mu, sigma = ref_stats
    return np.asarray(mu, np.float64), np.asarray(sigma, np.float64)


def compute_fid(
    sample_fn: Callable[[int], Any],
    ref_images_iter: Iterable[Any] | None,
    weights_path,
    num_samples: int,
    *,
    num_ref: int | None = None,
    ref_stats=None,
    save_ref_stats: str | os.PathLike | None = None,
    feature_batch_size: int = 100,
    resize_to: int | None = 299,
    quantize: bool = True,
    method: str = "sqrtm",
    params=None,
) -> float:
    """FID between ``num_samples`` generated images and reference images.

    Args:
      sample_fn: ``sample_fn(i)`` for ``i = 0, 1, ...`` returns the i-th batch of generated
        images ``(b, H, W, 3)`` in model space ``[-1, 1]`` (e.g. derive its noise from
        ``fold_in(key, i)``); called until ``num_samples`` images are collected (the last
        batch is truncated, so a fixed batch size never recompiles).
      ref_images_iter: an iterable of reference batches: arrays ``(b, H, W, 3)`` in
        ``[-1, 1]`` or dicts with ``"image"`` (and ``"mask"``, honoured), e.g. the eval or
        train iterator; read until ``num_ref`` images or until exhausted.  Unused (may be
        None) when ``ref_stats`` is given.
      weights_path: the npz of the layout above; None or missing raises
        :class:`FIDWeightsNotFoundError` before anything is sampled.
      num_samples: number of generated images (50k in the paper's protocol).
      num_ref: reference images to use (default ``num_samples``; ``-1``: all).
      ref_stats: precomputed reference ``(mu, sigma)`` or the path of an npz with ``mu`` and
        ``sigma`` (pytorch-fid's stats format), e.g. written by ``save_ref_stats``.
      save_ref_stats: where to write the reference ``mu``/``sigma`` once computed.
      feature_batch_size: images per Inception forward pass.
      resize_to: Inception input size (299 for FID; smaller only for tests).
      quantize: round generated and reference images to 8-bit levels first (see
        :func:`preprocess`), as images saved to files would be.
      method: matrix square root of :func:`frechet_distance`.
      params: already loaded weights (skips reading ``weights_path``).

    Returns:
      The FID (a Python float).
    """
    if params is None:
        params = load_weights(weights_path)
    if int(num_samples) != num_samples or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2; got {num_samples!r}.")
    chunk = int(feature_batch_size)

    if ref_stats is not None:
        mu_ref, sigma_ref = _load_ref_stats(ref_stats)
    else:
        if ref_images_iter is None:
            raise ValueError("compute_fid needs ref_images_iter or ref_stats.")
        limit = num_samples if num_ref is None else (None if num_ref == -1 else int(num_ref))
        ref = _FeatureAccumulator(params, limit, chunk, resize_to, quantize)
        for batch in ref_images_iter:
            ref.add(batch)
            if ref.full:
                break
        feats = ref.features()
        if feats.shape[0] < 2:
            raise ValueError(f"ref_images_iter gave {feats.shape[0]} images; need >= 2.")
        mu_ref, sigma_ref = statistics(feats)
        if save_ref_stats is not None:
            with open(os.fspath(save_ref_stats), "wb") as f:
                np.savez(f, mu=mu_ref, sigma=sigma_ref, num_images=feats.shape[0])

    gen = _FeatureAccumulator(params, int(num_samples), chunk, resize_to, quantize)
    i = 0
    while not gen.full:
        before = gen.count
        gen.add(sample_fn(i))
        if gen.count == before:
            raise ValueError(f"sample_fn({i}) returned no images.")
        i += 1
    mu, sigma = statistics(gen.features())
    return frechet_distance(mu, sigma, mu_ref, sigma_ref, method=method)
