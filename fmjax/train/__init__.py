"""Training: state with EMA, jitted (optionally fused or sharded) steps, the loop.

Submodules: ``sharding`` (mesh, batch sharding, multi-host initialisation), ``checkpoint``
(orbax CheckpointManager with data position and config), ``logging`` (JSONL, TensorBoard,
PNG grids from process 0).
"""

from fmjax.train import checkpoint, logging, sharding
from fmjax.train.loop import NonFiniteLossError, fit
from fmjax.train.state import TrainState
from fmjax.train.step import (
    DATA_KEY_INDEX,
    PREPARE_KEY_INDEX,
    apply_update,
    make_fused_train_steps,
    make_train_step,
    split_microbatches,
    step_keys,
)

__all__ = [
    "DATA_KEY_INDEX",
    "NonFiniteLossError",
    "PREPARE_KEY_INDEX",
    "TrainState",
    "apply_update",
    "checkpoint",
    "fit",
    "logging",
    "make_fused_train_steps",
    "make_train_step",
    "sharding",
    "split_microbatches",
    "step_keys",
]
