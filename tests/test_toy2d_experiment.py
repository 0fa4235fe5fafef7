"""The main job end to end with the tiny preset."""

import json
import os
import subprocess
import sys

import pytest

from experiments import toy2d
from experiments.configs import toy2d as toy2d_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_and_evaluate_tiny(tmp_path):
    cfg = toy2d_config.get_config("tiny")
    metrics = toy2d.train_and_evaluate(cfg, str(tmp_path), progress=False)
    for name in (
        "samples.png",
        "trajectories.png",
        "density.png",
        "metrics.json",
        "config.json",
        "train_log.jsonl",
        "nfe_quality.png",
    ):
        path = tmp_path / name
        assert path.exists() and path.stat().st_size > 0, name
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["nll_nats"] == pytest.approx(metrics["nll_nats"])
    assert on_disk["nfe_sample"] > 0 and on_disk["nfe_likelihood"] > 0
    assert on_disk["true_entropy_nats"] == pytest.approx(3.6765, abs=1e-4)
    # a 20-step model is far from the data, but it is a density: NLL above the entropy
    assert on_disk["nll_nats"] > on_disk["true_entropy_nats"]
    # sampling efficiency: every solver at every step count, then dopri5 at each tolerance
    # and at the reference tolerance (ODE error 0 by definition)
    assert on_disk["straightness"] > 0 and on_disk["transport_cost"] > 0
    sweep = on_disk["sweep"]
    fixed = [(r["solver"], r["steps"]) for r in sweep if "steps" in r]
    assert fixed == [(s, k) for s in ("euler", "midpoint", "heun", "rk4") for k in (1, 4)]
    assert [(r["solver"], r["tol"]) for r in sweep if "tol" in r] == [
        ("dopri5", 1e-2),
        ("dopri5", cfg.eval.rtol),
    ]
    assert all(r["nfe"] > 0 and r["mmd"] >= 0 for r in sweep)
    assert sweep[-1]["ode_error"] == 0.0 and sweep[0]["ode_error"] > 0
    euler = {r["steps"]: r for r in sweep if r["solver"] == "euler"}
    assert euler[1]["nfe"] == 1 and euler[4]["nfe"] == 4


def test_cli_with_overrides_and_locked_config(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "experiments.toy2d",
        "--config=experiments/configs/toy2d.py:tiny",
        "--config.dataset=eight_gaussians",
        "--config.train.num_steps=10",
        "--config.eval.sweep=False",
        "--config.eval.sde_noise=(0.0,0.5)",
        "--config.eval.sde_steps=4",
        f"--workdir={tmp_path}",
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"to {tmp_path}" in out.stdout
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["dataset"] == "eight_gaussians" and cfg["train"]["num_steps"] == 10
    # the SDE sampler at each noise level (off by default), 4 Euler-Maruyama steps each
    sde = json.loads((tmp_path / "metrics.json").read_text())["sde"]
    assert [(r["noise"], r["nfe"]) for r in sde] == [(0.0, 4), (0.5, 4)]
    assert all(r["mmd"] >= 0 for r in sde)
    assert toy2d_config.get_config().eval.sde_noise == ()
    bad = subprocess.run(
        cmd[:-1] + ["--config.train.num_stepz=3", f"--workdir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: bad config: unknown config field --config.train.num_stepz "
        "(did you mean --config.train.num_steps?)"
    ]


def test_every_named_path_is_configurable():
    import fmjax

    cfg = toy2d_config.get_config("tiny")
    for name in fmjax.paths.NAMES:
        cfg.path.name = name
        assert toy2d.make_path(cfg) == fmjax.paths.get(
            name,
            **(
                {"sigma_min": 1e-4}
                if name == "cond_ot"
                else {"n": 2.0}
                if name == "polynomial"
                else {}
            ),
        )
    cfg.path.name, cfg.path.ve.sigma_max = "ve", 80.0
    assert toy2d.make_path(cfg) == fmjax.paths.VE(sigma_min=0.01, sigma_max=80.0)
    cfg.path.name, cfg.path.polynomial.n = "polynomial", 0.5
    assert toy2d.make_path(cfg).t_range == (1e-5, 1.0)
    cfg.path.name = "condot"
    with pytest.raises(ValueError, match=r"path.name must be one of \('cond_ot', "):
        toy2d.train(cfg, progress=False)
    cfg.path.name, cfg.path.vp.beta_min = "vp", -1.0
    with pytest.raises(ValueError, match="path.vp: VP needs 0 < beta_min"):
        toy2d.train(cfg, progress=False)


def test_bad_config_values():
    cfg = toy2d_config.get_config("tiny")
    cfg.dataset = "spiral_galaxy"
    with pytest.raises(ValueError, match="spiral_galaxy"):
        toy2d.train(cfg, progress=False)
    with pytest.raises(ValueError, match="unknown toy2d preset"):
        toy2d_config.get_config("huge")
    cfg = toy2d_config.get_config("tiny")
    cfg.eval.rtol = -1e-5
    with pytest.raises(ValueError, match="eval.rtol / eval.atol: rtol must be"):
        toy2d.train(cfg, progress=False)
    cfg = toy2d_config.get_config("tiny")
    cfg.eval.grid_rtol = 0.0
    with pytest.raises(ValueError, match="eval.grid_rtol: rtol and atol cannot both be 0"):
        toy2d.train(cfg, progress=False)
    cfg = toy2d_config.get_config("tiny")
    cfg.train.steps_per_call = 0  # was a ZeroDivisionError
    with pytest.raises(ValueError, match="train.steps_per_call must be a positive integer"):
        toy2d.train(cfg, progress=False)
    cfg = toy2d_config.get_config("tiny")
    cfg.eval.grid_size = 0  # was found after training
    with pytest.raises(ValueError, match="eval.grid_size must be a positive integer; got 0"):
        toy2d.train(cfg, progress=False)
    # trained with gradient ascent, or failed with optax's own message
    for field, value, match in [
        ("learning_rate", -1e-3, r"train.learning_rate must be a finite number in \(0, inf\)"),
        ("warmup_steps", 30, r"train.warmup_steps \(30\) must be below train.num_steps"),
    ]:
        cfg = toy2d_config.get_config("tiny")
        cfg.train[field] = value
        with pytest.raises(ValueError, match=match):
            toy2d.train(cfg, progress=False)


class _ExactField:
    """A stand-in for the MLP whose ``apply`` is the exact marginal velocity of the path
    for the eight-Gaussians mixture (Flow Matching's target, eq. 5)."""

    def __init__(self, path):
        from fmjax import marginals
        from fmjax.data import toy

        self.path = path
        self.q = marginals.GaussianMixture.create(
            toy.eight_gaussians_centers(), toy.EIGHT_GAUSSIANS_SIGMA
        )

    def apply(self, params, t, x):
        return self.q.velocity(self.path, x, t)


def test_evaluation_starts_from_the_paths_source(tmp_path):
    # VE starts from N(0, sigma_max^2 I): samples from N(0, I) came out 50x too narrow and
    # the NLL was ~2,600 nats; with the exact field the NLL is the data's own (the VE source
    # is the t = 0 marginal up to the data's spread, 2.8 against sigma_max = 50)
    import jax
    import numpy as np

    from fmjax.data import toy

    cfg = toy2d_config.get_config("tiny")
    cfg.dataset, cfg.path.name = "eight_gaussians", "ve"
    cfg.eval.num_nll, cfg.eval.num_samples, cfg.eval.grid_size = 200, 500, 4
    cfg.eval.num_trajectories, cfg.eval.rtol, cfg.eval.atol = 8, 1e-4, 1e-4
    cfg.eval.sweep = False  # (the sweep is tested in test_train_and_evaluate_tiny)
    toy2d._check_config(cfg)
    model = _ExactField(toy2d.make_path(cfg))
    out = toy2d.evaluate(cfg, model, None, str(tmp_path))
    x = toy.sample("eight_gaussians", jax.random.split(jax.random.key(cfg.seed + 1), 6)[0], 200)
    true_nll = -float(np.mean(toy.log_prob("eight_gaussians", x)))
    assert out["nll_nats"] == pytest.approx(true_nll, abs=0.03)
    assert out["mmd"] < 5 * max(out["mmd_data_vs_data"], 1e-3)


class _ExactPrediction(_ExactField):
    """The exact field as an x1 / eps / score model: what a perfect model of each
    ``train.prediction`` would output."""

    def __init__(self, path, prediction):
        super().__init__(path)
        self.prediction = prediction

    def apply(self, params, t, x):
        return self.path.convert(
            super().apply(params, t, x), x, t, src="velocity", dst=self.prediction
        )


@pytest.mark.parametrize(
    "path_name,prediction,span",
    [
        ("cond_ot", "eps", (1e-3, 1.0)),
        ("cond_ot", "score", (1e-3, 1.0)),
        ("cosine", "x1", (0.0, 0.999)),
    ],
)
def test_prediction_models_are_evaluated_where_their_velocity_is_finite(
    tmp_path, path_name, prediction, span
):
    # eps / score divide by alpha_0 = 0 and x1 by the cosine path's sigma_1 = 0: the solves
    # run over path.velocity_range, and a perfect model still scores the data's own NLL
    import jax
    import numpy as np

    from fmjax.data import toy

    cfg = toy2d_config.get_config("tiny")
    cfg.dataset, cfg.path.name, cfg.train.prediction = "eight_gaussians", path_name, prediction
    cfg.eval.num_nll, cfg.eval.num_samples, cfg.eval.grid_size = 200, 500, 4
    cfg.eval.num_trajectories, cfg.eval.rtol, cfg.eval.atol = 8, 1e-4, 1e-4
    cfg.eval.sweep = False  # (the sweep is tested in test_train_and_evaluate_tiny)
    toy2d._check_config(cfg)
    out = toy2d.evaluate(
        cfg, _ExactPrediction(toy2d.make_path(cfg), prediction), None, str(tmp_path)
    )
    assert (out["prediction"], out["t0"], out["t1"]) == (prediction, *span)
    x = toy.sample("eight_gaussians", jax.random.split(jax.random.key(cfg.seed + 1), 6)[0], 200)
    assert out["nll_nats"] == pytest.approx(
        -float(np.mean(toy.log_prob("eight_gaussians", x))), abs=0.01
    )
    assert out["mmd"] < 5 * max(out["mmd_data_vs_data"], 1e-3)


def test_training_an_x1_model_and_bad_prediction_settings(tmp_path):
    cfg = toy2d_config.get_config("tiny")
    cfg.train.prediction = "x1"
    cfg.eval.sweep = False
    metrics = toy2d.train_and_evaluate(cfg, str(tmp_path), progress=False)
    assert metrics["prediction"] == "x1" and (metrics["t0"], metrics["t1"]) == (0.0, 1.0)
    assert metrics["nll_nats"] > metrics["true_entropy_nats"] and metrics["nfe_sample"] > 0
    for field, value, match in [
        ("prediction", "noise", r"train.prediction must be one of \('velocity', 'x1'"),
        ("t_margin", 0.0, r"eval.t_margin: margin must be a finite number in \(0, 0.5\)"),
    ]:
        cfg = toy2d_config.get_config("tiny")
        cfg["train" if field == "prediction" else "eval"][field] = value
        with pytest.raises(ValueError, match=match):
            toy2d.train(cfg, progress=False)
