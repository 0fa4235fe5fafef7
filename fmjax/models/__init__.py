"""Flax models: the velocity fields ``MLP`` (toy / tabular), ``UNet`` (ADM, images) and
``ImageConditionedUNet`` (a UNet conditioned on an image, for super-resolution:
``conditioned_unet``), and ``InceptionV3FID``, the feature network of FID (``inception``,
with its weights in ``inception_weights``)."""

from fmjax.models.conditioned_unet import ImageConditionedUNet
from fmjax.models.inception import InceptionV3FID
from fmjax.models.mlp import MLP
from fmjax.models.unet import UNet

__all__ = ["MLP", "ImageConditionedUNet", "InceptionV3FID", "UNet"]
