"""Flax models: the velocity fields ``MLP`` (toy / tabular) and ``UNet`` (ADM, images), and
``InceptionV3FID``, the feature network of FID (``inception``, with its weights in
``inception_weights``)."""

from fmjax.models.inception import InceptionV3FID
from fmjax.models.mlp import MLP
from fmjax.models.unet import UNet

__all__ = ["MLP", "InceptionV3FID", "UNet"]
