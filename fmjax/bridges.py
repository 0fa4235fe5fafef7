"""The noisy interpolant of Schrödinger-bridge conditional flow matching (SB-CFM; Tong et al.
2024) and of stochastic interpolants (Albergo & Vanden-Eijnden 2023):

    x_t = (1 - t) x0 + t x1 + sigma sqrt(t (1 - t)) z,    z ~ N(0, I),

a Brownian bridge of diffusion ``sigma`` between a source point ``x0`` and a data point
``x1``. Its regression target, the time derivative of the interpolant with ``z`` held
fixed, is

    u_t = (1 - 2t) / (2 t (1 - t)) (x_t - ((1 - t) x0 + t x1)) + (x1 - x0)
        = sigma (1 - 2t) / (2 sqrt(t (1 - t))) z + (x1 - x0),

finite inside (0, 1) and infinite at the ends, where the noise term is born and dies: the
path's ``t_range`` (where the loss draws t) is ``(eps, 1 - eps)``, while the interpolant
itself is defined on [0, 1] with ``x_0 = x0`` and ``x_1 = x1`` exactly.

The interpolant needs the pair ``(x0, x1)`` jointly and a third draw ``z``: it is not a
:class:`fmjax.paths.GaussianPath` (``sigma_t x0 + alpha_t x1``), and
:func:`fmjax.losses.cfm_loss` draws ``z`` for it (``needs_noise``). With the independent
coupling it is a stochastic interpolant; with :meth:`SchrodingerBridge.coupling` (a draw from
the entropic OT plan with ``epsilon = 2 sigma^2``, :func:`fmjax.couplings.entropic_ot`) the
marginals ``p_t`` are those of the Schrödinger bridge from the source to the data, and the
learned field is the drift of its probability-flow ODE: sample with :func:`fmjax.sample` as
for any field. ``sigma = 0`` is rectified flow (with the coupling: minibatch OT).

Given both ends, ``x_t`` is Gaussian with mean ``mu_t = (1 - t) x0 + t x1`` and std
``sigma_t = sigma sqrt(t (1 - t))``: its conditional score is

    grad_x log p_t(x_t | x0, x1) = -(x_t - mu_t) / sigma_t^2 = -z / sigma_t

(:meth:`SchrodingerBridge.score_target`), the regression target of the score network of
[SF]2M (Tong et al. 2024; :func:`fmjax.losses.sf2m_loss`). With the learned velocity ``v``
and score ``s`` of the marginals, the SDE ``dx = [v + g^2/2 s] dt + g dW`` has the
bridge's marginals for every ``g`` (:func:`fmjax.sample_sde`); ``g = sigma`` is the
Schrödinger bridge's own SDE.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from fmjax.checks import broadcast_time, real, same_shape
from fmjax.couplings import entropic_ot
from fmjax.densities import standard_normal_log_prob
from fmjax.paths import check_time
from fmjax.predictions import check_prediction

__all__ = ["SchrodingerBridge"]


def _broadcast(t, x):
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(jnp.float32)
    return broadcast_time(t, x)


@dataclasses.dataclass(frozen=True)
class SchrodingerBridge:
    """The Brownian-bridge interpolant ``(1 - t) x0 + t x1 + sigma sqrt(t(1 - t)) z``.

    Args:
      sigma: the bridge's diffusion (>= 0); its coupling's entropic regularisation is
        ``epsilon = 2 sigma^2``.
      eps: the training times are ``U[eps, 1 - eps]``, away from the target's singular ends.

    Hashable and a pytree without leaves, like the paths of :mod:`fmjax.paths`, so equal
    bridges share one compiled step. Build it as ``fmjax.paths.get("sb_cfm", sigma=0.5)``.
    """

    sigma: float = 1.0
    eps: float = 1e-4

    #: cfm_loss draws the noise ``z`` of the interpolant for paths that set this
    needs_noise = True

    def __post_init__(self):
        object.__setattr__(self, "sigma", real(self.sigma, "sigma", low=0.0))
        eps = real(self.eps, "eps", low=0.0, low_open=True)
        if not eps < 0.5:
            raise ValueError(f"eps must lie in (0, 0.5); got {self.eps!r}.")
        object.__setattr__(self, "eps", eps)

    @property
    def t_range(self) -> tuple[float, float]:
        """``(eps, 1 - eps)``: where the target is finite (the loss draws t here)."""
        return (self.eps, 1.0 - self.eps)

    @property
    def epsilon(self) -> float:
        """The entropic regularisation of the bridge's coupling, ``2 sigma^2``."""
        return 2.0 * self.sigma**2

    def noise_std(self, t):
        """``sigma sqrt(t (1 - t))``, the std of ``x_t`` given both ends."""
        t = jnp.asarray(t)
        return self.sigma * jnp.sqrt(jnp.clip(t * (1.0 - t), 0.0))

    def interpolate(self, x0, x1, t, noise=None):
        """``x_t``, for ``t`` in [0, 1]; ``noise=None``: the mean ``(1 - t) x0 + t x1``."""
        same_shape(x0, x1, "x0", "x1")
        check_time(t, (0.0, 1.0))
        tb = _broadcast(t, x1)
        xt = (1.0 - tb) * x0 + tb * x1
        if noise is not None:
            same_shape(noise, x1, "noise", "x1")
            xt = xt + self.noise_std(tb) * noise
        return xt

    def target(self, x0, x1, t, noise=None):
        """``d/dt x_t`` with ``noise`` held fixed, for ``t`` in ``t_range``."""
        same_shape(x0, x1, "x0", "x1")
        check_time(t, self.t_range)
        tb = _broadcast(t, x1)
        u = x1 - x0
        if noise is not None and self.sigma > 0:
            same_shape(noise, x1, "noise", "x1")
            u = u + self.sigma * (1.0 - 2.0 * tb) / (2.0 * jnp.sqrt(tb * (1.0 - tb))) * noise
        return u

    def score_target(self, x0, x1, t, noise):
        """``grad_x log p_t(x_t | x0, x1) = -noise / sigma_t`` at ``x_t =
        interpolate(x0, x1, t, noise)``, for ``t`` in ``t_range`` and ``sigma > 0`` (the
        score of the Gaussian bridge; infinite at the ends, where ``sigma_t = 0``)."""
        same_shape(x0, x1, "x0", "x1")
        same_shape(noise, x1, "noise", "x1")
        if self.sigma == 0:
            raise ValueError(
                "the bridge with sigma = 0 is deterministic given its ends: it has no score; "
                "use sigma > 0."
            )
        check_time(t, self.t_range)
        return -noise / self.noise_std(_broadcast(t, x1))

    def interpolate_and_target(self, x0, x1, t, noise=None):
        """``(x_t, d/dt x_t)``, as :func:`fmjax.losses.cfm_loss` calls it."""
        check_time(t, self.t_range)
        return self.interpolate(x0, x1, t, noise), self.target(x0, x1, t, noise)

    def conditional_velocity(self, x, x0, x1, t):
        """Tong et al.'s form of the target at a point ``x`` of the bridge from x0 to x1:
        ``(1 - 2t) / (2t(1 - t)) (x - ((1 - t) x0 + t x1)) + (x1 - x0)``."""
        same_shape(x, x1, "x", "x1")
        mean = self.interpolate(x0, x1, t)
        check_time(t, self.t_range)
        tb = _broadcast(t, x1)
        return (1.0 - 2.0 * tb) / (2.0 * tb * (1.0 - tb)) * (x - mean) + (x1 - x0)

    def coupling(self, key, x0, x1, *, cond=None):
        """A draw from the entropic OT plan of the batch with ``epsilon = 2 sigma^2``
        (:func:`fmjax.couplings.entropic_ot`); for ``cfm_loss(coupling=path.coupling)``.
        ``sigma = 0`` pairs by the exact OT assignment."""
        if self.sigma == 0:
            from fmjax.couplings import minibatch_ot

            return minibatch_ot(key, x0, x1, cond=cond)
        return entropic_ot(key, x0, x1, epsilon=self.epsilon, cond=cond)

    # -- the source and what sampling and likelihood need ------------------------------
    def sample_source(self, key, shape, dtype=jnp.float32):
        """``N(0, I)`` draws: ``x_0 = x0``."""
        return jax.random.normal(key, shape, dtype)

    def source_std(self, dtype=jnp.float32):
        """1: the source is ``N(0, I)``."""
        return jnp.asarray(1.0, dtype)

    def source_log_prob(self, x):
        """``log N(x; 0, I)`` per example of a batch."""
        return standard_normal_log_prob(jnp.asarray(x))

    def velocity_range(self, prediction: str, margin: float = 1e-3) -> tuple[float, float]:
        """``(0, 1)`` for a velocity model: the learned marginal field is finite at the ends
        (only the conditional target is not). Other predictions are not defined here."""
        del margin
        self._only_velocity(prediction)
        return (0.0, 1.0)

    def velocity_field(self, f: Callable, prediction: str) -> Callable:
        """``f`` itself for a velocity model (the probability-flow ODE's drift)."""
        self._only_velocity(prediction)
        return f if isinstance(f, jax.tree_util.Partial) else jax.tree_util.Partial(f)

    def _only_velocity(self, prediction):
        check_prediction(prediction, "prediction")
        if prediction != "velocity":
            raise ValueError(
                "the sb_cfm interpolant trains velocity models only; got "
                f"prediction={prediction!r}."
            )


jax.tree_util.register_dataclass(SchrodingerBridge, data_fields=[], meta_fields=["sigma", "eps"])
