"""Training: state with EMA, jitted (optionally fused or sharded) steps, the loop."""

from fmjax.train.loop import NonFiniteLossError, fit
from fmjax.train.state import TrainState
from fmjax.train.step import apply_update, make_fused_train_steps, make_train_step

__all__ = [
           "NonFiniteLossError",
           "TrainState",
           "apply_update",
           "fit",
           "make_fused_train_steps",
           "make_train_step",
]
