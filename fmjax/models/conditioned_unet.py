"""A UNet conditioned on an image: ``v(t, x, cond)`` with ``cond`` concatenated to ``x``.

Super-resolution (SR3, Saharia et al. 2021; Flow Matching, Lipman et al. 2023, section 6.3)
conditions the UNet on the low-resolution image upsampled to the output resolution
(:func:`fmjax.data.superres.condition`), given as extra input channels::

    v(t, x, cond) = UNet(t, concat([x, cond], channels))     # x_t: C channels, cond: C'

The wrapped :class:`~fmjax.models.unet.UNet` sees ``C + C'`` input channels and outputs
``C`` (its ``out_channels`` must be ``C``). ``cond`` is the third argument of every field
in fmjax, so one ``jax.tree_util.Partial(model.apply, params)`` serves the loss
(``cfm_loss(..., cond=...)``), :func:`fmjax.sample` and :func:`fmjax.log_likelihood`
(``cond=``): each row of ``x`` with its own conditioning image, split over a mesh with it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.models.unet import UNet

__all__ = ["ImageConditionedUNet", "image_conditioned"]


class ImageConditionedUNet(nn.Module):
    """``v(t, x, cond) = unet(t, concat([x, cond], -1))``; see the module docstring.

    Attributes:
      unet: the network, unconditional (``num_classes=None``) and with ``out_channels``
        set to ``x``'s channels (:func:`image_conditioned` sets it).
    """

    unet: UNet

    def _check(self, x, cond) -> None:
        xs, cs = jnp.shape(x), getattr(cond, "shape", None)
        if cond is None or cs is None:
            raise ValueError(
                "ImageConditionedUNet needs cond, the conditioning image (B, H, W, C') at x's "
                f"resolution; got {type(cond).__name__}."
            )
        if len(xs) != 4 or len(cs) != 4 or tuple(cs[:3]) != tuple(xs[:3]):
            raise ValueError(
                "cond must be the conditioning image (B, H, W, C') with x's batch, height and "
                f"width (B, H, W) = {tuple(xs[:3])} (x has shape {xs}); got cond of shape "
                f"{cs}."
            )
        if self.unet.out_channels != xs[-1]:
            raise ValueError(
                f"the wrapped UNet must output x's {xs[-1]} channels (out_channels={xs[-1]}, "
                f"as image_conditioned sets); it has out_channels={self.unet.out_channels}."
            )
        if self.unet.num_classes is not None:
            raise ValueError("the wrapped UNet must be unconditional (num_classes=None).")

    @nn.compact
    def __call__(self, t, x, cond, *, train: bool = False) -> jax.Array:
        """Velocity ``v(t, x, cond)``: ``x`` (B, H, W, C), ``cond`` (B, H, W, C')."""
        self._check(x, cond)
        h = jnp.concatenate([jnp.asarray(x), jnp.asarray(cond).astype(jnp.asarray(x).dtype)], -1)
        return self.unet(t, h, None, train=train)


def image_conditioned(unet: UNet, channels: int = 3) -> ImageConditionedUNet:
    """``unet`` (unbound) as an :class:`ImageConditionedUNet` for ``x`` with ``channels``
    channels (it is copied with ``out_channels=channels``)."""
    return ImageConditionedUNet(unet.clone(out_channels=int(channels)))
