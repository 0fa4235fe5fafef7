"""Minibatch-OT pairing in the host input pipeline, so the device never waits for it.

The device-side coupling (``fmjax.couplings.pairing`` inside the jitted step) pairs each step's
whole global batch, but its exact solver runs on the host in a synchronous callback: the
accelerator idles while it runs. Here the same exact pairing runs inside the grain pipeline
instead, in its reader threads (or worker processes), for batches ahead of the one the device
is computing:

1. :class:`DrawSource` (a per-example ``random_map``) adds ``x0 = source_std * N(0, I)`` to each
   example, from grain's per-example generator: seeded by the run's seed and the example's
   global position, so a resumed run (grain's iterator state is checkpointed) sees exactly the
   noise an uninterrupted run would, whatever the process layout.
2. :class:`PairBatch` (a per-batch ``map``) re-pairs each batch's ``x0`` with its images by
   :func:`fmjax.assignment.exact_ot_permutation` (within classes when ``by_label``).

The training step then uses ``batch["x0"]`` as it is. With one process, each batch is the
whole global batch, so the pairing is the same as the device coupling's. With several
processes, each pairs its own slice of the global batch (``1/P`` of it): cheaper, and a
slightly higher transport cost than one global pairing (docs/benchmarks.md measures both);
the device coupling (``train.pairing=device`` in the image experiments) pairs globally.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fmjax import assignment

__all__ = ["DrawSource", "PairBatch"]


@dataclasses.dataclass(frozen=True)
class DrawSource:
    """Per example: add ``x0``, ``source_std`` times a standard normal of the image's shape.

    A grain ``RandomMapTransform``-style callable ``(example, rng) -> example``."""

    source_std: float = 1.0
    data: str = "image"

    def __call__(self, example: dict, rng: np.random.Generator) -> dict:
        x1 = example[self.data]
        noise = rng.standard_normal(np.shape(x1), dtype=np.float32)
        return {**example, "x0": np.float32(self.source_std) * noise}


@dataclasses.dataclass(frozen=True)
class PairBatch:
    """Per batch: permute ``batch["x0"]`` by the exact OT pairing with ``batch[data]``.

    ``by_label``: pair only within equal ``batch["label"]`` (a class-conditional model: each
    source sample keeps the class of the row it is paired with). ``solver``: one of
    :data:`fmjax.assignment.EXACT_SOLVERS`."""

    data: str = "image"
    by_label: bool = False
    solver: str = "auto"

    def __post_init__(self):
        if self.solver not in assignment.EXACT_SOLVERS:
            raise ValueError(
                f"solver must be one of {assignment.EXACT_SOLVERS}; got {self.solver!r}."
            )

    def __call__(self, batch: dict) -> dict:
        if "x0" not in batch or self.data not in batch:
            raise ValueError(
                f"PairBatch needs the batch entries 'x0' (from DrawSource) and {self.data!r}; "
                f"got {sorted(batch)}."
            )
        labels = batch["label"] if self.by_label else None
        perm = assignment.exact_ot_permutation(
            batch["x0"], batch[self.data], labels, solver=self.solver
        )
        return {**batch, "x0": batch["x0"][perm]}
