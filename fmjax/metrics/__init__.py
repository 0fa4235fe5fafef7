"""Sample-quality metrics: MMD and sliced Wasserstein for low-dimensional samples."""

from fmjax.metrics.distances import mmd, sliced_wasserstein

__all__ = ["mmd", "sliced_wasserstein"]
