"""The ``path`` section of the experiment configs: the probability path and its parameters.

``path.name`` is one of :func:`fmjax.paths.get`'s names. ``cond_ot`` reads ``path.sigma_min``;
``ve``, ``vp`` and ``polynomial`` read their own sub-sections (``path.ve.sigma_max=80``, ...),
filled with the paths' defaults by :func:`add_fields`; ``rectified_flow`` and ``cosine`` take
no parameters.
"""

from __future__ import annotations

import dataclasses

import ml_collections

import fmjax

# the sub-section of each parameterised path (cond_ot keeps its flat path.sigma_min)
SECTIONS = {
    "ve": {f.name: f.default for f in dataclasses.fields(fmjax.paths.VE)},
    "vp": {f.name: f.default for f in dataclasses.fields(fmjax.paths.VP)},
    "polynomial": {"n": 2.0, "eps": 1e-5},
}


def add_fields(path_cfg: ml_collections.ConfigDict) -> None:
    """Add the ``ve`` / ``vp`` / ``polynomial`` sub-sections with the paths' defaults."""
    for name, defaults in SECTIONS.items():
        path_cfg[name] = ml_collections.ConfigDict(dict(defaults))


def make_path(path_cfg):
    """The configured path; ``ValueError`` naming the field for an unknown name or a bad
    parameter."""
    name = path_cfg.name
    if name not in fmjax.paths.NAMES:
        raise ValueError(f"path.name must be one of {fmjax.paths.NAMES}; got {name!r}.")
    if name == "cond_ot":
        kwargs, where = {"sigma_min": float(path_cfg.sigma_min)}, "path.sigma_min"
    elif name in SECTIONS:
        kwargs, where = {k: float(v) for k, v in path_cfg[name].items()}, f"path.{name}"
    else:
        kwargs, where = {}, "path"
    try:
        return fmjax.paths.get(name, **kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
