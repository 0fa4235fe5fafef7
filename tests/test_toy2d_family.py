"""toy2d's flow family (experiments/toy2d_family.py) with the tiny preset: maximum
likelihood, reflow rounds, the NLL curve, the noisy interpolant, and their config errors."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmjax
from experiments import path_config, toy2d, toy2d_reflow
from experiments import toy2d_family as family
from experiments.configs import toy2d as toy2d_config


def test_ml_objective_then_a_reflow_round(tmp_path):
    cfg = toy2d_config.get_config("tiny")
    cfg.objective, cfg.reflow = "ml", 1
    cfg.train.num_steps = cfg.reflow_round.num_steps = cfg.eval.nll_every = 10
    cfg.reflow_round.distill_steps = 10
    cfg.ml.solver, cfg.ml.steps = "rk4", 2  # (backprop through dopri5: tests/test_cnf.py)
    cfg.eval.sweep = False  # straightness per round only (the sweep: test_toy2d_experiment)
    cfg.eval.grid_size = 8  # 64 points, as num_nll and the curve's: one compiled NLL solve
    metrics = toy2d.train_and_evaluate(cfg, str(tmp_path), progress=False)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert math.isfinite(on_disk["nll_nats"]) and on_disk["nll_nats"] == metrics["nll_nats"]
    # two rk4 steps of the augmented solve; backprop through it: one VJP per evaluation
    assert on_disk["train_nfe_forward"] == on_disk["train_nfe_backward"] == 8
    assert on_disk["train_nfe_per_step"] == (
        on_disk["train_nfe_forward"] + on_disk["train_nfe_backward"]
    )
    [point] = on_disk["nll_curve"]
    assert point["step"] == 10 and point["train_seconds"] > 0 and math.isfinite(point["nll_nats"])
    rounds = on_disk["reflow_rounds"]
    assert [r["round"] for r in rounds] == [0, 1, "distilled"]
    assert all(r["straightness"] > 0 and r["transport_cost"] > 0 for r in rounds)
    assert all(r["pair_seconds"] > 0 and r["train_seconds"] > 0 for r in rounds[1:])
    # retrained (distilled) from the previous weights on its own pairs: a different field
    assert len({r["straightness"] for r in rounds}) == 3
    assert "sweep" not in on_disk and not (tmp_path / "reflow_rounds.png").exists()


def test_reflow_rounds_plot_and_summary(tmp_path):
    sweep = [
        {"solver": "euler", "steps": 1, "nfe": 1, "mmd": 0.5},
        {"solver": "euler", "steps": 4, "nfe": 4, "mmd": 0.1},
        {"solver": "dopri5", "tol": 1e-3, "nfe": 26, "mmd": 0.01},
    ]
    records = [
        {"round": k, "straightness": s, "transport_cost": 3.0, "sweep": sweep}
        for k, s in ((0, 1.4), (1, 0.02))
    ]
    toy2d_reflow.plot_rounds(str(tmp_path / "rounds.png"), records)
    assert (tmp_path / "rounds.png").stat().st_size > 0
    summary = toy2d_reflow.summarize_rounds(records)
    assert summary[1] == {
        "round": 1,
        "straightness": 0.02,
        "transport_cost": 3.0,
        "mmd_dopri5": 0.01,
        "nfe_dopri5": 26,
        "mmd_euler": {"1": 0.5, "4": 0.1},
    }


def test_noisy_interpolant_with_its_entropic_coupling_trains():
    cfg = toy2d_config.get_config("tiny")
    cfg.path.name, cfg.path.sb_cfm.sigma, cfg.coupling = "sb_cfm", 0.5, "entropic"
    cfg.train.num_steps = 10
    path = toy2d.make_path(cfg)
    assert path.sigma == 0.5 and path.epsilon == 0.5
    _, flow_only, history, _ = toy2d.train(cfg, progress=False)
    assert math.isfinite(history[-1]["loss"])
    # with SDE sampling a second MLP learns the score ([SF]2M); the flow trains as without it
    cfg.eval.sde_noise, cfg.eval.sde_steps, cfg.eval.sde_diffusion = (0.0, 0.5), 4, "constant"
    model, state, history, _ = toy2d.train(cfg, progress=False)
    assert set(state.params) == {"flow", "score"}
    for a, b in zip(
        jax.tree_util.tree_leaves(flow_only.params),
        jax.tree_util.tree_leaves(state.params["flow"]),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    last = history[-1]
    assert last["loss"] == pytest.approx(last["flow_loss"] + last["score_loss"], rel=1e-5)
    v, s = (jax.tree_util.Partial(toy2d._velocity(model), state.params[k]) for k in state.params)
    x0, ref = jax.random.normal(jax.random.key(0), (2, 64, 2))
    span = {"t0": 0.0, "t1": 1.0}
    out = family.sde_quality(cfg, v, path, span, x0, ref, jax.random.key(1), score=s)
    assert [(r["noise"], r["nfe"]) for r in out["sde"]] == [(0.0, 4), (0.5, 4)]
    assert all(math.isfinite(r["mmd"]) for r in out["sde"])
    assert out["sde_settings"]["score"] == "learned (score_loss)"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"objective": "mle"}, "objective must be one of"),
        ({"coupling": "entropic"}, "coupling='entropic' is the sb_cfm path's own"),
        ({"reflow": 1, "train.prediction": "x1"}, "reflow trains a velocity model"),
        ({"objective": "ml", "train.prediction": "eps"}, "objective=ml trains a velocity"),
        ({"ml.adjoint": "forward"}, "ml.adjoint must be one of"),
        ({"objective": "ml", "coupling": "ot"}, "objective=ml fits the data's density"),
        ({"ml.solver": "rk4", "ml.steps": 0}, "ml.solver / ml.steps"),
        ({"reflow": -1}, "reflow must be"),
        ({"reflow": 1, "reflow_round.num_steps": 15}, "reflow_round.num_steps"),
        ({"reflow_round.distill_steps": 10}, "distils the last reflow round: set reflow"),
        ({"reflow": 1, "reflow_round.distill_steps": 15}, "reflow_round.distill_steps"),
        ({"reflow_round.distill_steps": -1}, "reflow_round.distill_steps"),
        ({"eval.nll_every": 15}, "eval.nll_every"),
        ({"path.name": "sb_cfm", "path.sb_cfm.sigma": -1.0}, "path.sb_cfm: sigma"),
        ({"eval.sde_noise": (0.5, -1.0)}, "eval.sde_noise entries"),
        ({"eval.sde_steps": 0}, "eval.sde_steps"),
        ({"eval.sde_solver": "rk4"}, "eval.sde_solver must be one of"),
        ({"eval.sde_diffusion": "cosine"}, "eval.sde_diffusion must be one of"),
        ({"path.name": "sb_cfm", "eval.sde_noise": (0.5,)}, "set eval.sde_diffusion=constant"),
        (
            {"path.name": "sb_cfm", "path.sb_cfm.sigma": 0.0, "eval.sde_noise": (0.5,)},
            "leave eval.sde_noise empty",
        ),
        (
            {"path.name": "sb_cfm", "eval.sde_noise": (0.5,), "reflow": 1},
            "learns the score beside a velocity",
        ),
        ({"train.score_weight": 0.0}, "train.score_weight"),
    ],
)
def test_family_config_errors(changes, message):
    cfg = toy2d_config.get_config("tiny")
    for key, value in changes.items():
        *parents, name = key.split(".")
        section = cfg
        for p in parents:
            section = section[p]
        section[name] = value
    with pytest.raises(ValueError, match=message):
        toy2d.train(cfg, progress=False)


def test_make_path_refuses_the_noisy_interpolant_unless_the_loss_draws_its_noise():
    cfg = toy2d_config.get_config("tiny")
    cfg.path.name = "sb_cfm"
    with pytest.raises(ValueError, match="needs a loss that draws its noise"):
        path_config.make_path(cfg.path)


def test_sde_quality_of_the_exact_gaussian_flow():
    # the exact CondOT field of Gaussian data: noise 0 is the Euler ODE sample from the same
    # points; with noise the samples keep the data's law (MMD^2 at the two draws' floor)
    cfg = toy2d_config.get_config("tiny")
    cfg.eval.sde_noise, cfg.eval.sde_steps = (0.0, 1.0), 50
    path = fmjax.paths.CondOT()
    data = fmjax.marginals.GaussianMixture.create(jnp.array([[1.0, -1.0]]), 0.5)
    v = jax.tree_util.Partial(lambda t, x: data.velocity(path, x, t))
    x0 = jax.random.normal(jax.random.key(0), (500, 2))
    ref = 1.0 * jnp.array([1.0, -1.0]) + 0.5 * jax.random.normal(jax.random.key(1), (500, 2))
    span = {"t0": 0.0, "t1": 1.0}
    out = family.sde_quality(cfg, v, path, span, x0, ref, jax.random.key(2))
    ode, _ = fmjax.sample(v, x0, solver="euler", steps=50)
    assert out["sde"][0]["mmd"] == pytest.approx(float(fmjax.metrics.mmd(ode, ref)), rel=1e-5)
    floor = float(fmjax.metrics.mmd(1.0 * jnp.array([1.0, -1.0]) + 0.5 * np.asarray(x0), ref))
    assert [r["nfe"] for r in out["sde"]] == [50, 50]
    assert out["sde"][1]["mmd"] < 3 * floor + 0.01
    assert out["sde_settings"]["t1"] == 1.0
    # a constant diffusion stops eval.t_margin before t = 1, where the score is singular
    cfg.eval.sde_diffusion, cfg.eval.sde_noise = "constant", (1.0,)
    out = family.sde_quality(cfg, v, path, span, x0, ref, jax.random.key(2))
    assert out["sde_settings"]["t1"] == pytest.approx(1.0 - cfg.eval.t_margin)
    assert out["sde"][0]["mmd"] < 3 * floor + 0.01
