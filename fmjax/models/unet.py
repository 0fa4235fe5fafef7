"""ADM UNet (Dhariwal & Nichol, 2021) as a Flax linen module, for Flow Matching on images.

Flow Matching (Lipman et al., ICLR 2023) trains its image models with the UNet of
"Diffusion Models Beat GANs on Image Synthesis" (ADM, the ``guided-diffusion`` code base)
and only changes what the network is asked to predict: here the output is the velocity
``v_theta(t, x)`` of the probability path, with the same shape as ``x``.

Architecture (``len(ch_mult)`` resolution levels, ``L = len(ch_mult) - 1`` downsamplings)::

    t  --sinusoid(1000 t, ch)--> Dense(4ch) -> SiLU -> Dense(4ch) --+--> emb
    y  --Embed(num_classes + 1, 4ch)---------------------------------+   (added, optional)

    x --Conv3x3(ch)--> h                                     (kept as a skip)
    for level, mult in enumerate(ch_mult):                   (down path)
        num_res_blocks x [ResBlock(-> ch * mult) (+ Attention if res in attn_resolutions)]
                                                             (each output kept as a skip)
        if not last level: Down (ResBlock(down=True) or strided Conv3x3), kept as a skip
    middle: ResBlock, Attention, ResBlock
    for level, mult in reversed(list(enumerate(ch_mult))):   (up path)
        (num_res_blocks + 1) x [concat(h, skip.pop()) -> ResBlock(-> ch * mult)
                                (+ Attention if res in attn_resolutions)]
        if not level 0: Up (ResBlock(up=True) or nearest x2 + Conv3x3)
    out: GroupNorm -> SiLU -> Conv3x3(out_channels, zero init)

ResBlock(in -> out), with ``emb`` the time(+class) embedding::

    h = Conv3x3(out)(SiLU(GroupNorm(x)))          # for up/down blocks the resampling
                                                  # (nearest x2 / 2x2 average pool) is applied
                                                  # to both h (before the conv) and x
    e = Dense(2 out)(SiLU(emb))                   # (out if use_scale_shift_norm=False)
    scale-shift: h = GroupNorm(h) * (1 + scale) + shift ;  otherwise h = GroupNorm(h + e)
    h = Conv3x3(out, zero init)(Dropout(SiLU(h)))
    return skip(x) + h                            # skip = identity or 1x1 conv if in != out

Attention block (multi-head self-attention over the ``H * W`` positions)::

    qkv = Dense(3C)(GroupNorm(x))   # a 1x1 convolution
    x + Dense(C, zero init)(MHA(q, k, v))

Conventions
-----------
* Layout is NHWC (``x.shape == (B, H, W, C)``); ``H`` and ``W`` must be divisible by
  ``2 ** (len(ch_mult) - 1)``.
* ``attn_resolutions`` are *pixel* resolutions of the feature maps (e.g. ``(16, 8)`` on a
  32x32 input means "after one and after two downsamplings"). ADM's command line takes the
  same numbers and converts them to downsampling factors with the image size; here the
  resolution is read off the actual input's height at call time, and an entry that never
  occurs, or parameters initialised at a size whose attention blocks differ, is a
  ValueError (not a model that silently leaves its attention out).
* Time: ``t`` is in ``[0, 1]`` with shape ``(B,)`` or scalar (broadcast to the batch). It is
  multiplied by 1000 before the sinusoidal embedding so that the sinusoid frequencies
  (``max_period = 10000``, as in ADM) see the same range as a diffusion model's integer
  timesteps ``0..1000``; without this the low frequencies would be almost constant in t.
* Classes: with ``num_classes = K`` the embedding table has ``K + 1`` rows; label ``K`` is the
  null ("unconditional") class used for classifier-free guidance. ``y=None`` on a
  class-conditional model means "all null class". Labels must be integers in ``[0, K]``
  (this cannot be checked under ``jit``; a label outside it, negative ones included, yields
  NaNs).
* Zero initialisation as in ADM: the last conv of every ResBlock, the attention output
  projection and the output conv, so a freshly initialised model outputs exactly 0.
* GroupNorm uses 32 groups; for layers with fewer than 32 channels (small presets) the number
  of groups is the largest divisor of the channel count that is <= 32. Epsilon 1e-5 as in
  PyTorch/ADM. Normalisation statistics are always computed in float32.
* Mixed precision: ``dtype`` is the compute dtype, parameters are always float32
  (``param_dtype=jnp.float32``), and the output is cast back to float32. The sinusoidal
  embedding is computed in float32.
* Other initialisers are Flax defaults (LeCun normal kernels, zero biases), not PyTorch's.
* Dropout (inside the ResBlocks) is active only with ``train=True`` and draws from the
  ``'dropout'`` rng stream.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["UNet"]

Dtype = Any

_zeros = nn.initializers.zeros_init()


def _num_groups(channels: int, max_groups: int = 32) -> int:
    """Largest divisor of ``channels`` that is at most ``max_groups`` (32 for ADM widths)."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """ADM sinusoidal embedding ``[cos(t f_i), sin(t f_i)]``, ``f_i = max_period^(-i/half)``.

    ``t`` has shape ``(B,)`` (already scaled, e.g. ``1000 * t``); returns ``(B, dim)`` float32.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def _group_norm(channels: int, dtype: Dtype, name: str | None = None) -> nn.GroupNorm:
    return nn.GroupNorm(
        num_groups=_num_groups(channels),
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _conv(
    features: int,
    dtype: Dtype,
    kernel: int = 3,
    stride: int = 1,
    zero: bool = False,
    name: str | None = None,
) -> nn.Conv:
    pad = kernel // 2
    kwargs = {"kernel_init": _zeros} if zero else {}
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        # Explicit symmetric padding (PyTorch ``padding=k//2``); for the stride-2
        # downsampling conv this differs from Flax's asymmetric 'SAME'.
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
        **kwargs,
    )


def _upsample_nearest(x: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _downsample_avg(x: jax.Array) -> jax.Array:
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class ResBlock(nn.Module):
    """ADM residual block with time embedding, optional up/down sampling."""

    out_ch: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    up: bool = False
    down: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
        in_ch = x.shape[-1]
        h = nn.silu(_group_norm(in_ch, self.dtype, name="in_norm")(x))
        if self.up:
            h, x = _upsample_nearest(h), _upsample_nearest(x)
        elif self.down:
            h, x = _downsample_avg(h), _downsample_avg(x)
        h = _conv(self.out_ch, self.dtype, name="in_conv")(h)

        emb_out = nn.Dense(
            2 * self.out_ch if self.use_scale_shift_norm else self.out_ch,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="emb_proj",
        )(nn.silu(emb))
        emb_out = emb_out[:, None, None, :].astype(h.dtype)

        out_norm = _group_norm(self.out_ch, self.dtype, name="out_norm")
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = out_norm(h) * (1 + scale) + shift
        else:
            h = out_norm(h + emb_out)
        h = nn.silu(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = _conv(self.out_ch, self.dtype, zero=True, name="out_conv")(h)

        if in_ch != self.out_ch:
            x = _conv(self.out_ch, self.dtype, kernel=1, name="skip")(x)
        return x + h


class AttentionBlock(nn.Module):
    """ADM self-attention over all spatial positions (qkv 1x1 projection, zero-init output)."""

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        hd = c // self.num_heads
        h = _group_norm(c, self.dtype, name="norm")(x)
        qkv = nn.Dense(3 * c, dtype=self.dtype, param_dtype=jnp.float32, name="qkv")(h)
        qkv = qkv.reshape(b, hgt * wid, 3, self.num_heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        # Logits and softmax are computed in float32 by the XLA implementation.
        a = jax.nn.dot_product_attention(q, k, v)  # (B, T, heads, hd), scale 1/sqrt(hd)
        a = a.reshape(b, hgt, wid, c)
        a = nn.Dense(
            c, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_zeros, name="proj_out"
        )(a)
        return x + a


class UNet(nn.Module):
    """ADM UNet predicting a velocity field ``v(t, x[, y])``; see the module docstring.

    Attributes:
      ch: base channel count (``model_channels`` in ADM).
      ch_mult: channel multiplier per resolution level.
      num_res_blocks: residual blocks per level on the down path (``+1`` on the up path).
      attn_resolutions: feature-map resolutions (pixels) at which attention is applied.
      num_heads: attention heads (used when ``num_head_channels`` is None).
      num_head_channels: channels per head; if set, heads = channels // num_head_channels.
      dropout: dropout rate inside the residual blocks.
      num_classes: if set, class-conditional with ``num_classes + 1`` embeddings (last = null).
      resblock_updown: use residual blocks for up/down sampling (ADM) instead of convs.
      use_scale_shift_norm: FiLM-style ``norm(h) * (1 + scale) + shift`` conditioning.
      dtype: compute dtype (params are float32; output is float32).
      out_channels: output channels; defaults to the input channels.
    """

    ch: int = 128
    ch_mult: tuple = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple = (16,)
    num_heads: int = 4
    num_head_channels: int | None = 64
    dropout: float = 0.0
    num_classes: int | None = None
    resblock_updown: bool = True
    use_scale_shift_norm: bool = True
    dtype: Dtype = jnp.float32
    out_channels: int | None = None

    def _heads(self, channels: int) -> int:
        if self.num_head_channels is not None:
            if channels % self.num_head_channels:
                raise ValueError(
                    f"attention at {channels} channels is not divisible by "
                    f"num_head_channels={self.num_head_channels}"
                )
            return channels // self.num_head_channels
        if channels % self.num_heads:
            raise ValueError(
                f"attention at {channels} channels is not divisible by num_heads={self.num_heads}"
            )
        return self.num_heads

    def _validate(self, t, x, y):
        """Checks shapes statically; returns ``(t, y)`` normalised to shape ``(B,)``."""
        x_shape = getattr(x, "shape", None)
        if x_shape is None or len(x_shape) != 4:
            raise ValueError(
                f"UNet expects x of rank 4 with layout NHWC (B, H, W, C); got shape {x_shape}"
            )
        b, hgt, wid, c = x_shape
        factor = 2 ** (len(self.ch_mult) - 1)
        if hgt % factor or wid % factor:
            raise ValueError(
                f"UNet with ch_mult={self.ch_mult} downsamples {len(self.ch_mult) - 1} times, so H "
                f"and W must be divisible by {factor}; got x of shape {x_shape} (H={hgt}, W={wid})"
            )
        if c < 1:
            raise ValueError(f"x must have at least one channel; got shape {x_shape}")
        resolutions = [hgt // 2**level for level in range(len(self.ch_mult))]
        missing = [r for r in self.attn_resolutions if r not in resolutions]
        if missing:
            raise ValueError(
                f"attn_resolutions={tuple(self.attn_resolutions)}: {missing} never occur for an "
                f"input of height {hgt} (the feature maps are {resolutions} pixels high); "
                "attention there would silently be left out"
            )
        if self.has_variable("params", "conv_in"):
            have = {k for k in self.variables["params"] if "_attn_" in k}
            want = {
                f"{side}_{level}_attn_{i}"
                for level, r in enumerate(resolutions)
                if r in self.attn_resolutions
                for side, n in (("down", self.num_res_blocks), ("up", self.num_res_blocks + 1))
                for i in range(n)
            }
            if have != want:
                raise ValueError(
                    f"UNet parameters were initialised at another input size: their attention "
                    f"blocks are {sorted(have)}, an input of shape {x_shape} would use "
                    f"{sorted(want)} (attn_resolutions are pixel heights of the feature maps); "
                    "apply the model at the size it was initialised for"
                )
        if self.has_variable("params", "conv_in"):
            expected_c = self.variables["params"]["conv_in"]["kernel"].shape[-2]
            if c != expected_c:
                raise ValueError(
                    f"UNet parameters were initialised for inputs with {expected_c} channels; "
                    f"got x with {c} channels (shape {x_shape})"
                )

        t = jnp.asarray(t, dtype=jnp.float32)
        if t.ndim == 0:
            t = jnp.broadcast_to(t, (b,))
        elif t.shape != (b,):
            raise ValueError(f"t must be a scalar or have shape (B,) = ({b},); got shape {t.shape}")

        if y is not None:
            if self.num_classes is None:
                raise ValueError(
                    "class labels y were given but this UNet is unconditional "
                    "(num_classes=None); construct it with num_classes=K to use labels"
                )
            y = jnp.asarray(y)
            if y.shape != (b,):
                raise ValueError(f"y must have shape (B,) = ({b},); got shape {y.shape}")
            if not jnp.issubdtype(y.dtype, jnp.integer):
                raise ValueError(f"y must contain integer class labels; got dtype {y.dtype}")
        elif self.num_classes is not None:
            y = jnp.full((b,), self.num_classes, dtype=jnp.int32)  # null class
        return t, y

    @nn.compact
    def __call__(self, t, x, y=None, *, train: bool = False) -> jax.Array:
        """Velocity ``v(t, x, y)``: ``t`` (B,) or scalar in [0, 1], ``x`` (B, H, W, C) NHWC,
        ``y`` int (B,) in ``[0, num_classes]`` (``num_classes`` = null) or None."""
        t, y = self._validate(t, x, y)
        out_ch = self.out_channels if self.out_channels is not None else x.shape[-1]
        dt = self.dtype
        emb_dim = 4 * self.ch

        def dense(features, name):
            return nn.Dense(features, dtype=dt, param_dtype=jnp.float32, name=name)

        # Time (and class) embedding. t in [0, 1] is scaled to the [0, 1000] range of
        # diffusion timesteps before the sinusoid.
        emb = timestep_embedding(1000.0 * t, self.ch)
        emb = dense(emb_dim, "time_embed_0")(emb.astype(dt))
        emb = dense(emb_dim, "time_embed_1")(nn.silu(emb))
        if self.num_classes is not None:
            label_emb = nn.Embed(
                self.num_classes + 1,
                emb_dim,
                dtype=dt,
                param_dtype=jnp.float32,
                name="label_emb",
            )
            # labels outside [0, K] (negative ones would index from the end of the table,
            # -1 being the null class) are sent past it, where the lookup gives NaN
            y = jnp.where((y < 0) | (y > self.num_classes), self.num_classes + 1, y)
            emb = emb + label_emb(y)

        def res(out_c, name, up=False, down=False):
            return ResBlock(
                out_c,
                dropout=self.dropout,
                use_scale_shift_norm=self.use_scale_shift_norm,
                up=up,
                down=down,
                dtype=dt,
                name=name,
            )

        def attn(channels, name):
            return AttentionBlock(self._heads(channels), dtype=dt, name=name)

        h = _conv(self.ch * self.ch_mult[0], dt, name="conv_in")(x.astype(dt))
        skips = [h]
        res_now = x.shape[1]

        # Down path.
        last = len(self.ch_mult) - 1
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = res(self.ch * mult, f"down_{level}_res_{i}")(h, emb, train)
                if res_now in self.attn_resolutions:
                    h = attn(h.shape[-1], f"down_{level}_attn_{i}")(h)
                skips.append(h)
            if level != last:
                if self.resblock_updown:
                    h = res(h.shape[-1], f"down_{level}_downsample", down=True)(h, emb, train)
                else:
                    h = _conv(h.shape[-1], dt, stride=2, name=f"down_{level}_downsample")(h)
                skips.append(h)
                res_now //= 2

        # Middle.
        h = res(h.shape[-1], "mid_res_0")(h, emb, train)
        h = attn(h.shape[-1], "mid_attn")(h)
        h = res(h.shape[-1], "mid_res_1")(h, emb, train)

        # Up path: num_res_blocks + 1 blocks per level, each consuming one skip.
        for level, mult in reversed(list(enumerate(self.ch_mult))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res(self.ch * mult, f"up_{level}_res_{i}")(h, emb, train)
                if res_now in self.attn_resolutions:
                    h = attn(h.shape[-1], f"up_{level}_attn_{i}")(h)
            if level != 0:
                if self.resblock_updown:
                    h = res(h.shape[-1], f"up_{level}_upsample", up=True)(h, emb, train)
                else:
                    h = _conv(h.shape[-1], dt, name=f"up_{level}_upsample")(_upsample_nearest(h))
                res_now *= 2
        assert not skips

        h = nn.silu(_group_norm(h.shape[-1], dt, name="out_norm")(h))
        h = _conv(out_ch, dt, zero=True, name="conv_out")(h)
        return h.astype(jnp.float32)
