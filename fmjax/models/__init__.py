"""Flax velocity-field models: ``MLP`` (toy / tabular) and ``UNet`` (ADM, images)."""

from fmjax.models.mlp import MLP
from fmjax.models.unet import UNet

__all__ = ["MLP", "UNet"]
