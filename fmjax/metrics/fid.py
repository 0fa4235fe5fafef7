"""Frechet Inception Distance with the FID Inception-v3 (pool3, 2048-d features).

FID (Heusel et al., 2017) compares the Gaussian statistics ``(mu, Sigma)`` of Inception-v3
pool3 features of generated and reference images:

    FID = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).

The network is :class:`fmjax.models.inception.InceptionV3FID` (pytorch-fid's FID variant of
Inception-v3); its weights file, never downloaded, is described in
:mod:`fmjax.models.inception_weights`.  Without it
:class:`~fmjax.models.inception_weights.FIDWeightsNotFoundError` says how to make it;
callers print ``FID skipped: <message>`` rather than report a number.

The network and weight names (``InceptionV3FID``, ``inception_features``,
``resize_bilinear``, ``LAYOUT_VERSION``, ``FIDWeightsNotFoundError``,
``convert_pytorch_fid_weights``, ``fid_skip_reason``, ``init_random_params``,
``load_weights``, ``param_shapes``, ``save_weights``) are importable from here as well.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from fmjax.models.inception import (
    FEATURE_DIM,
    InceptionV3FID,
    inception_features,
    resize_bilinear,
)
from fmjax.models.inception_weights import (
    LAYOUT_VERSION,
    FIDWeightsNotFoundError,
    convert_pytorch_fid_weights,
    fid_skip_reason,
    init_random_params,
    load_weights,
    param_shapes,
    save_weights,
)

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
      weights_path: the npz of :mod:`fmjax.models.inception_weights`; None or missing raises
        :class:`~fmjax.models.inception_weights.FIDWeightsNotFoundError` before anything is
        sampled.
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
