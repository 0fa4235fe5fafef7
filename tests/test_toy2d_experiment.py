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
    for name in ("samples.png", "trajectories.png", "density.png", "metrics.json",
                 "config.json", "train_log.jsonl"):
        path = tmp_path / name
        assert path.exists() and path.stat().st_size > 0, name
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["nll_nats"] == pytest.approx(metrics["nll_nats"])
    assert on_disk["nfe_sample"] > 0 and on_disk["nfe_likelihood"] > 0
    assert on_disk["true_entropy_nats"] == pytest.approx(3.6765, abs=1e-4)
    # a 20-step model is far from the data, but it is a density: NLL above the entropy
    assert on_disk["nll_nats"] > on_disk["true_entropy_nats"]


def test_cli_with_overrides_and_locked_config(tmp_path):
    cmd = [sys.executable, "-m", "experiments.toy2d",
           "--config=experiments/configs/toy2d.py:tiny", "--config.dataset=eight_gaussians",
           "--config.train.num_steps=10", f"--workdir={tmp_path}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"to {tmp_path}" in out.stdout
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["dataset"] == "eight_gaussians" and cfg["train"]["num_steps"] == 10
    bad = subprocess.run(cmd[:-1] + ["--config.train.num_stepz=3", f"--workdir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "num_stepz" in bad.stderr


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
