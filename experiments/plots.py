"""Figures shared by the experiments."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

__all__ = ["plot_sweep"]


def plot_sweep(path: str | os.PathLike, records: Sequence[dict[str, Any]], quality: str | None):
    """The sampling-efficiency study (:func:`fmjax.metrics.efficiency.sweep`'s records) as a
    PNG: ``quality`` (e.g. ``"mmd"`` or ``"fid"``; None: left out) and the ODE error against
    NFE, a line per solver (fixed-step solvers solid, the adaptive one dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ([quality] if quality else []) + ["ode_error"]
    labels = {"ode_error": "ODE error (vs tight dopri5)", "mmd": "MMD$^2$ to fresh data"}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for solver in dict.fromkeys(r["solver"] for r in records):
        rs = [r for r in records if r["solver"] == solver]
        style = "o-" if "steps" in rs[0] else "s--"
        for ax, key in zip(axes[0], panels, strict=True):
            # the reference solve has ODE error 0 by definition: not on a log axis
            pts = [(r["nfe"], r[key]) for r in rs if r.get(key) is not None and r[key] > 0]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=solver, ms=4)
    for ax, key in zip(axes[0], panels, strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel(labels.get(key, key))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("quality against function evaluations, from the same source samples")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
