"""Training: state with EMA, jitted (optionally fused or sharded) steps, the loop.

Submodules: ``sharding`` (mesh, batch sharding, multi-host initialisation), ``checkpoint``
(orbax CheckpointManager with data position and config), ``logging`` (JSONL, TensorBoard,
PNG grids from process 0).
"""

from fmjax.train import checkpoint, logging, sharding
from fmjax.train.loop import NonFiniteLossError, fit
from fmjax.train.state import TrainState
from fmjax.train.step import apply_update, make_fused_train_steps, make_train_step

__all__ = [
    "checkpoint", "logging", "sharding", "NonFiniteLossError", "TrainState", "apply_update",
    "fit", "make_fused_train_steps", "make_train_step",
]
