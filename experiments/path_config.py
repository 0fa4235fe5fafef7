"""The ``path`` section of the experiment configs: the probability path and its parameters.

``path.name`` is one of :func:`fmjax.paths.get`'s names. ``cond_ot`` reads ``path.sigma_min``;
``ve``, ``vp``, ``polynomial`` and ``sb_cfm`` read their own sub-sections
(``path.ve.sigma_max=80``, ``path.sb_cfm.sigma=0.5``, ...),
filled with the paths' defaults by :func:`add_fields`; ``rectified_flow`` and ``cosine`` take
no parameters.
"""

from __future__ import annotations

import dataclasses

import ml_collections

import fmjax
import fmjax.bridges

# the sub-section of each parameterised path (cond_ot keeps its flat path.sigma_min)
SECTIONS = {
    "ve": {f.name: f.default for f in dataclasses.fields(fmjax.paths.VE)},
    "vp": {f.name: f.default for f in dataclasses.fields(fmjax.paths.VP)},
    "polynomial": {"n": 2.0, "eps": 1e-5},
    "sb_cfm": {f.name: f.default for f in dataclasses.fields(fmjax.bridges.SchrodingerBridge)},
}


def add_fields(path_cfg: ml_collections.ConfigDict) -> None:
    """Add the ``ve`` / ``vp`` / ``polynomial`` sub-sections with the paths' defaults."""
    for name, defaults in SECTIONS.items():
        path_cfg[name] = ml_collections.ConfigDict(dict(defaults))


def path_params(path_cfg) -> tuple[str, dict[str, float], str]:
    """``(name, parameters, field)``: what :func:`make_path` builds the path from (only the
    named path's own fields), and the config field they come from. ``path_cfg`` is a
    ``ConfigDict`` or the plain dict a checkpoint's saved config holds."""
    name = path_cfg["name"]
    if name not in fmjax.paths.NAMES:
        raise ValueError(f"path.name must be one of {fmjax.paths.NAMES}; got {name!r}.")
    if name == "cond_ot":
        return name, {"sigma_min": float(path_cfg["sigma_min"])}, "path.sigma_min"
    if name in SECTIONS:
        return name, {k: float(v) for k, v in path_cfg[name].items()}, f"path.{name}"
    return name, {}, "path"


def make_path(path_cfg, *, noisy: bool = False):
    """The configured path; ``ValueError`` naming the field for an unknown name or a bad
    parameter. ``noisy``: the caller's loss draws the noise of ``sb_cfm`` (the noisy
    interpolant, :class:`fmjax.bridges.SchrodingerBridge`); otherwise it is refused."""
    name, kwargs, where = path_params(path_cfg)
    if name == "sb_cfm" and not noisy:
        raise ValueError(
            "path.name='sb_cfm' (the noisy interpolant) needs a loss that draws its noise "
            "z; this caller's does not (make_path(..., noisy=True) where it does)."
        )
    try:
        return fmjax.paths.get(name, **kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
