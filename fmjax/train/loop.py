"""A training loop: progress bar, periodic host-side metrics, non-finite loss detection."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np

from fmjax._checks import integer

__all__ = ["NonFiniteLossError", "fit"]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; training stopped."""


def fit(
    state,
    step_fn: Callable,
    batches: Iterator | None,
    num_steps: int,
    *,
    log_every: int = 100,
    on_log: Callable | None = None,
    progress: bool = True,
    steps_per_call: int = 1,
    desc: str = "train",
):
    """Run ``num_steps`` steps of ``step_fn``; returns ``(state, history)``.

    ``step_fn(state, batch)`` (or ``step_fn(state)`` when ``batches`` is None, e.g. a fused
    step drawing its own data, which advances ``steps_per_call`` steps per call) returns
    ``(state, metrics)``. Metrics are pulled to the host only every ``log_every`` steps (no
    per-step synchronisation): after the call that reaches or passes each multiple of
    ``log_every``, and after the last call. Steps are counted from ``state.step`` (a state
    without a ``step`` field counts from 0), so a restored state logs the steps of the
    uninterrupted run. Each log record gets ``step`` and ``steps_per_s`` and is passed to
    ``on_log``. A non-finite loss raises :class:`NonFiniteLossError` naming the step.
    """
    num_steps = integer(num_steps, "num_steps")
    steps_per_call = integer(steps_per_call, "steps_per_call")
    log_every = integer(log_every, "log_every")
    if num_steps % steps_per_call:
        raise ValueError(
            f"num_steps={num_steps} must be a multiple of steps_per_call={steps_per_call}."
        )
    from tqdm.auto import tqdm

    history = []
    calls = num_steps // steps_per_call
    start = int(jax.device_get(state.step)) if hasattr(state, "step") else 0
    bar = tqdm(total=num_steps, desc=desc, disable=not progress, dynamic_ncols=True)
    t_last, done_last = time.perf_counter(), 0
    for call in range(1, calls + 1):
        state, metrics = step_fn(state) if batches is None else step_fn(state, next(batches))
        done = call * steps_per_call
        step = start + done
        if step // log_every > (step - steps_per_call) // log_every or call == calls:
            metrics = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
            now = time.perf_counter()
            metrics.update(step=step, steps_per_s=(done - done_last) / max(now - t_last, 1e-9))
            t_last, done_last = now, done
            if not math.isfinite(metrics["loss"]):
                bar.close()
                raise NonFiniteLossError(
                    f"non-finite loss {metrics['loss']} at step {step}; stopping. Lower the "
                    "learning rate or enable gradient clipping; the last checkpoint is intact."
                )
            history.append(metrics)
            bar.update(done - bar.n)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", it_s=f"{metrics['steps_per_s']:.1f}")
            if on_log is not None:
                on_log(metrics)
    bar.close()
    return state, history
