"""2-D flow matching on a toy density, trained for real on a CPU in 2-3 minutes (2 cores).

    python -m experiments.toy2d [--config=experiments/configs/toy2d.py[:tiny]]
                                [--config.dataset=eight_gaussians] [--workdir=out/toy2d]

Writes to the work dir: ``samples.png`` (model samples beside data), ``trajectories.png``,
``density.png`` (exp of ``fmjax.log_likelihood`` on a grid), ``metrics.json`` (held-out NLL
in nats with exact divergence and dopri5, the data's true entropy where known, NFE of
sampling and likelihood, MMD and sliced Wasserstein against fresh data, timings) and
``config.json``. :func:`train_and_evaluate` is the library entry point notebooks call.
``--config.objective=ml``, ``--config.reflow=K``, ``--config.path.name=sb_cfm``,
``--config.eval.nll_every=N`` and ``--config.eval.sde_noise=(0.0,0.5,1.0)`` (SDE sampling)
run the rest of the flow family (:mod:`experiments.toy2d_family`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import fmjax
from experiments import cli, path_config
from experiments import toy2d_family as family
from experiments import toy2d_reflow as rounds_lib
from experiments.plots import plot_sweep
from fmjax.checks import integer, real
from fmjax.data import toy
from fmjax.metrics import efficiency
from fmjax.models import MLP


def make_path(cfg):
    return path_config.make_path(cfg.path, noisy=True)


# integer config fields: (section, name, least allowed value)
_INT_FIELDS = (
    ("train", "num_steps", 1),
    ("train", "batch_size", 1),
    ("train", "steps_per_call", 1),
    ("train", "log_every", 1),
    ("train", "warmup_steps", 0),
    ("eval", "num_nll", 1),
    ("eval", "num_samples", 1),
    ("eval", "grid_size", 1),
    ("eval", "num_trajectories", 1),
    ("eval", "sweep_samples", 2),
)


def _check_config(cfg):
    toy.check_name(cfg.dataset)
    for section, name, minimum in _INT_FIELDS:
        integer(cfg[section][name], f"{section}.{name}", minimum=minimum)
    t = cfg.train
    real(t.learning_rate, "train.learning_rate", low=0.0, low_open=True)
    real(cfg.eval.plot_lim, "eval.plot_lim", low=0.0, low_open=True)
    fmjax.predictions.check_prediction(t.prediction, "train.prediction")
    try:
        make_path(cfg).velocity_range(t.prediction, cfg.eval.t_margin)
    except ValueError as err:
        raise ValueError(f"eval.t_margin: {err}") from None
    family.check_config(cfg, make_path(cfg))
    if t.warmup_steps >= t.num_steps:
        raise ValueError(
            f"train.warmup_steps ({t.warmup_steps}) must be below train.num_steps ({t.num_steps})."
        )
    if t.num_steps % t.steps_per_call:
        raise ValueError(
            f"train.num_steps ({t.num_steps}) must be a multiple of "
            f"train.steps_per_call ({t.steps_per_call})."
        )
    e = cfg.eval  # checked before training, not after it
    for k in e.sweep_steps:
        integer(k, "eval.sweep_steps entries")
    for tol in e.sweep_tols:
        real(tol, "eval.sweep_tols entries", low=0.0, low_open=True)
    for keys, rtol, atol in (
        ("eval.rtol / eval.atol", e.rtol, e.atol),
        ("eval.grid_rtol", e.grid_rtol, e.grid_rtol),
    ):
        try:
            fmjax.SolverOptions(solver="dopri5", rtol=rtol, atol=atol)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{keys}: {err}") from err


@functools.lru_cache(maxsize=8)
def _velocity(model):
    """``v(params, t, x)``; one function per (equal, hashable) model, so that the solves of
    training, reflow and evaluation key their compiled code on the same field."""

    def v(params, t, x):
        return model.apply(params, t, x)

    return v


def make_model(cfg):
    return MLP(
        hidden=cfg.model.hidden,
        depth=cfg.model.depth,
        activation=cfg.model.activation,
        time_embedding=cfg.model.time_embedding,
    )


def train(cfg, *, progress=True, log_fn=None, on_step=None):
    """Train the MLP (``config.objective``: flow matching or maximum likelihood); returns
    ``(model, state, history, seconds)``. ``on_step``: :func:`fmjax.train.fit`'s hook."""
    _check_config(cfg)
    path = make_path(cfg)
    model = make_model(cfg)
    key = jax.random.key(cfg.seed)
    k_init, k_train = jax.random.split(key)
    params = model.init(k_init, jnp.zeros((1,)), jnp.zeros((1, 2)))
    if family.trains_score(cfg, path):  # a second MLP of the same size: the score
        score = model.init(jax.random.fold_in(k_init, 1), jnp.zeros((1,)), jnp.zeros((1, 2)))
        params = {"flow": params, "score": score}
    tx = family.optimizer(cfg.train.num_steps, cfg.train.learning_rate, cfg.train.warmup_steps)
    state = fmjax.train.TrainState.create(params, tx, k_train)
    loss_fn, data_fn, ema_decay = family.objective(cfg, path, _velocity(model))
    state, history, seconds = family.fit(
        cfg, state, loss_fn, data_fn, cfg.train.num_steps, ema_decay, tx,
        progress=progress, log_fn=log_fn, on_step=on_step,
    )  # fmt: skip
    return model, state, history, seconds


def evaluate(cfg, model, params, workdir):
    """Held-out NLL, sample quality, NFE and the three plots; returns the metrics dict."""
    # samples start from the path's source noise and likelihoods use its density (VE's is
    # N(0, sigma_max^2 I), not N(0, I))
    path = make_path(cfg)
    # an x1 / eps / score model as a velocity, solved where that conversion is finite
    prediction = cfg.train.prediction
    score = None
    if family.trains_score(cfg, path):  # sb_cfm's learned score, for the SDE
        score = jax.tree_util.Partial(_velocity(model), params["score"])
    params = family.flow_params(params)
    v = path.velocity_field(jax.tree_util.Partial(_velocity(model), params), prediction)
    t_lo, t_hi = path.velocity_range(prediction, cfg.eval.t_margin)
    span = {"t0": t_lo, "t1": t_hi}
    key = jax.random.key(cfg.seed + 1)
    # (split(key, n)[i] does not depend on n, so added keys leave the first ones as they
    # were; fold_in(k_ref, 1) would be the key toy.sample(k_ref) draws its u with)
    k_nll, k_x0, k_ref, k_sw, k_traj, k_ref2, k_sweep, k_ref3 = jax.random.split(key, 8)
    e = cfg.eval
    out = {"prediction": prediction, "t0": t_lo, "t1": t_hi}

    # held-out NLL (exact divergence, dopri5)
    x_test = toy.sample(cfg.dataset, k_nll, e.num_nll)
    t0 = time.perf_counter()
    logp, lstats = fmjax.log_likelihood(
        v,
        x_test,
        divergence="exact",
        solver="dopri5",
        rtol=e.rtol,
        atol=e.atol,
        base_log_prob=path.source_log_prob,
        **span,
    )
    out["nll_seconds"] = time.perf_counter() - t0
    nll = -np.asarray(logp, np.float64)
    out["nll_nats"] = float(nll.mean())
    out["nll_stderr"] = float(nll.std() / math.sqrt(nll.size))
    out["nfe_likelihood"] = int(lstats.nfe)
    if cfg.dataset in toy.ENTROPY:
        out["true_entropy_nats"] = float(toy.ENTROPY[cfg.dataset])
        out["kl_upper_gap_nats"] = out["nll_nats"] - out["true_entropy_nats"]

    # samples
    x0 = path.sample_source(k_x0, (e.num_samples, 2))
    t0 = time.perf_counter()
    samples, sstats = fmjax.sample(v, x0, solver="dopri5", rtol=e.rtol, atol=e.atol, **span)
    samples = jax.block_until_ready(samples)
    out["sample_seconds"] = time.perf_counter() - t0
    out["nfe_sample"] = int(sstats.nfe)
    ref = toy.sample(cfg.dataset, k_ref, e.num_samples)
    out["mmd"] = float(fmjax.metrics.mmd(samples, ref))
    out["sliced_wasserstein"] = float(fmjax.metrics.sliced_wasserstein(k_sw, samples, ref))
    if e.sde_noise:  # the same source points and data draw, with noise
        k_sde = jax.random.fold_in(key, 1)
        out.update(family.sde_quality(cfg, v, path, span, x0, ref, k_sde, score=score))
    # the same distances between two independent data draws: the noise floor
    ref2 = toy.sample(cfg.dataset, k_ref2, e.num_samples)
    out["mmd_data_vs_data"] = float(fmjax.metrics.mmd(ref2, ref))
    out["sliced_wasserstein_data_vs_data"] = float(
        fmjax.metrics.sliced_wasserstein(k_sw, ref2, ref)
    )

    # straightness and transport cost of the learned flow, and quality against NFE
    if e.sweep:
        out.update(_efficiency(cfg, v, path, span, k_sweep, k_ref3))

    # density on a grid
    lim = e.plot_lim
    g = np.linspace(-lim, lim, e.grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    grid_logp, _ = fmjax.log_likelihood(
        v,
        jnp.asarray(grid),
        solver="dopri5",
        rtol=e.grid_rtol,
        atol=e.grid_rtol,
        base_log_prob=path.source_log_prob,
        **span,
    )
    grid_logp = np.asarray(grid_logp).reshape(e.grid_size, e.grid_size)

    # trajectories
    ts = jnp.linspace(t_lo, t_hi, 33)[1:-1]
    xt0 = path.sample_source(k_traj, (e.num_trajectories, 2))
    xt1, tstats = fmjax.sample(
        v, xt0, solver="dopri5", rtol=e.rtol, atol=e.atol, save_times=ts, **span
    )
    traj = np.concatenate(
        [np.asarray(xt0)[None], np.asarray(tstats.trajectory), np.asarray(xt1)[None]]
    )

    _plot(cfg, workdir, np.asarray(samples), np.asarray(ref), traj, grid_logp, out)
    return out


def _efficiency(cfg, v, path, span, key, key_ref):
    """Straightness and transport cost (one dopri5 solve) and the sweep of solvers and step
    counts from the same source samples, with the MMD of each against fresh data (no sweep
    with ``eval.sweep=False``: reflow rounds measure straightness still)."""
    e = cfg.eval
    x0 = path.sample_source(key, (e.sweep_samples, 2))
    ref = toy.sample(cfg.dataset, key_ref, e.sweep_samples)
    t0 = time.perf_counter()
    flow = efficiency.straightness(v, x0, rtol=e.rtol, atol=e.atol, **span)
    records = e.sweep and efficiency.sweep(
        v,
        x0,
        steps=tuple(e.sweep_steps),
        tolerances=tuple(e.sweep_tols),
        reference_tol=e.rtol,
        quality=lambda x: {"mmd": float(fmjax.metrics.mmd(x, ref))},
        **span,
    )
    return {
        "straightness": float(flow.straightness),
        "transport_cost": float(flow.transport_cost),
        "sweep": records,
        "sweep_seconds": time.perf_counter() - t0,
    }


def _plot(cfg, workdir, samples, ref, traj, grid_logp, metrics):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lim = cfg.eval.plot_lim
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax, pts, title in [
        (axes[0], ref, f"data: {cfg.dataset}"),
        (axes[1], samples, (f"fmjax samples (dopri5, NFE {metrics['nfe_sample']})")),
    ]:
        ax.hist2d(pts[:, 0], pts[:, 1], bins=200, range=[[-lim, lim], [-lim, lim]], cmap="viridis")
        ax.set_title(title)
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "samples.png"), dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 6))
    for i in range(traj.shape[1]):
        ax.plot(traj[:, i, 0], traj[:, i, 1], color="tab:blue", alpha=0.25, lw=0.6)
    ax.scatter(traj[0, :, 0], traj[0, :, 1], s=3, c="k", label="t=0 (noise)")
    ax.scatter(traj[-1, :, 0], traj[-1, :, 1], s=3, c="tab:red", label="t=1 (samples)")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.legend(loc="upper right")
    ax.set_title("trajectories of the learned flow")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "trajectories.png"), dpi=100)
    plt.close(fig)

    if "sweep" in metrics:
        plot_sweep(os.path.join(workdir, "nfe_quality.png"), metrics["sweep"], "mmd")

    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(np.exp(grid_logp), origin="lower", extent=[-lim, lim, -lim, lim], cmap="viridis")
    ax.set_title(f"learned density exp(log p) — held-out NLL {metrics['nll_nats']:.3f} nats")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "density.png"), dpi=100)
    plt.close(fig)


def train_and_evaluate(config, workdir: str, *, progress: bool = True) -> dict:
    """Train on ``config.dataset``, evaluate the EMA parameters, write everything to workdir."""
    _check_config(config)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    path, v = make_path(config), _velocity(make_model(config))
    curve = family.NLLCurve(config, path, v) if config.eval.nll_every else None
    model, state, history, seconds = train(config, progress=progress, on_step=curve)
    metrics = {
        "train_seconds": seconds,
        "train_steps_per_s": config.train.num_steps / seconds,
        "final_loss": history[-1]["loss_mean"] if history else None,
        "num_params": state.num_params(),
        "backend": jax.default_backend(),
        **family.nfe_summary(history),
    }
    if family.trains_score(config, path):  # the flow's and the score's loss, last log
        last = history[-1] if history else {}
        metrics["score_net"] = {
            "architecture": "a second MLP of config.model",
            "loss": "fmjax.losses.sf2m_loss (lambda_t = sigma_t)",
            "score_weight": float(config.train.score_weight),
            "final_flow_loss": last.get("flow_loss"),
            "final_score_loss": last.get("score_loss"),
        }
    if curve is not None:  # its evaluations are not training time
        metrics["train_seconds"] = seconds - curve.paused
        metrics["train_steps_per_s"] = config.train.num_steps / metrics["train_seconds"]
        metrics.update(nll_curve=curve.records, nll_curve_seconds=curve.paused)
    rounds = None
    if config.reflow:  # straightness and sweep per round, from the same keys as evaluate's
        span = path.velocity_range("velocity", config.eval.t_margin)
        keys = jax.random.split(jax.random.key(config.seed + 1), 8)[6:]

        def round_efficiency(params):
            u = path.velocity_field(jax.tree_util.Partial(v, params), "velocity")
            return _efficiency(config, u, path, {"t0": span[0], "t1": span[1]}, *keys)

        state, rounds = rounds_lib.reflow_rounds(
            config, state, v, path, round_efficiency, progress=progress, log_fn=None
        )
        metrics["reflow_rounds"] = rounds_lib.summarize_rounds(rounds)
    metrics.update(evaluate(config, model, state.ema_params, workdir))
    if rounds is not None and config.eval.sweep:
        rounds_lib.plot_rounds(os.path.join(workdir, "reflow_rounds.png"), rounds)
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(workdir, "train_log.jsonl"), "w") as f:
        f.writelines(json.dumps(rec) + "\n" for rec in history)
    return metrics


def main(argv):
    del argv
    from absl import flags

    cfg = flags.FLAGS.config
    workdir = flags.FLAGS.workdir
    try:
        _check_config(cfg)
    except ValueError as e:
        cli.fail(cli.BAD_CONFIG, f"bad config: {e}")
    metrics = train_and_evaluate(cfg, workdir)
    keys = [
        "nll_nats",
        "nll_stderr",
        "true_entropy_nats",
        "nfe_sample",
        "nfe_likelihood",
        "mmd",
        "mmd_data_vs_data",
        "sliced_wasserstein",
        "straightness",
        "transport_cost",
        "train_seconds",
    ]
    print(json.dumps({k: metrics[k] for k in keys if k in metrics}, indent=2))
    print(
        f"wrote samples.png, trajectories.png, density.png, nfe_quality.png, metrics.json to "
        f"{os.path.abspath(workdir)}"
    )


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    here = os.path.dirname(os.path.abspath(__file__))
    config_flags.DEFINE_config_file(
        "config",
        os.path.join(here, "configs", "toy2d.py"),
        "Config file (path[:preset]).",
        lock_config=True,
    )
    flags.DEFINE_string("workdir", "out/toy2d", "Where to write plots and metrics.")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main, flags_parser=cli.parse)
