"""A training loop: progress bar, periodic host-side metrics, non-finite loss detection."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np

from fmjax.checks import integer

__all__ = ["NonFiniteLossError", "fit"]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; training stopped (``step`` and ``loss`` say where,
    when known)."""

    def __init__(self, message: str, *, step: int | None = None, loss: float | None = None):
        super().__init__(message)
        self.step = step
        self.loss = loss


def _transposed(records: list[dict]) -> dict[str, list]:
    return {k: [r[k] for r in records] for k in (records[0] if records else {})}


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
    on_step: Callable | None = None,
    average: Sequence[str] = (),
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

    ``average``: names of metrics logged as their mean over the calls since the previous log
    (each call's values stay on the device until then) instead of the last call's, e.g.
    ``("loss",)``: a non-finite loss at any step of the interval is then caught at its log.
    ``on_step(step, state, metrics)`` is called after each call (after its log, if any)
    with the device-side metrics, e.g. to checkpoint, sample or evaluate; the time it takes
    is left out of ``steps_per_s``.
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
    t_last, done_last, paused = time.perf_counter(), 0, 0.0
    pending = []
    with bar:
        for call in range(1, calls + 1):
            state, metrics = step_fn(state) if batches is None else step_fn(state, next(batches))
            done = call * steps_per_call
            step = start + done
            if average:
                pending.append({k: metrics[k] for k in average})
            if step // log_every > (step - steps_per_call) // log_every or call == calls:
                logged = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
                for k, values in _transposed(jax.device_get(pending)).items():
                    logged[k] = float(np.mean(np.asarray(values, np.float64)))
                pending = []
                now = time.perf_counter()
                seconds = max(now - t_last - paused, 1e-9)
                logged.update(step=step, steps_per_s=(done - done_last) / seconds)
                t_last, done_last, paused = now, done, 0.0
                if not math.isfinite(logged["loss"]):
                    raise NonFiniteLossError(
                        f"non-finite loss {logged['loss']} at step {step}; stopping. Lower the "
                        "learning rate or enable gradient clipping; the last checkpoint is "
                        "intact.",
                        step=step,
                        loss=logged["loss"],
                    )
                history.append(logged)
                bar.update(done - bar.n)
                bar.set_postfix(loss=f"{logged['loss']:.4f}", it_s=f"{logged['steps_per_s']:.1f}")
                if on_log is not None:
                    on_log(logged)
            if on_step is not None:
                t_hook = time.perf_counter()
                on_step(step, state, metrics)
                paused += time.perf_counter() - t_hook
    return state, history
