"""The image experiments' evaluation (experiments/images/evaluation.py): the matmul
precision ``eval.matmul_precision`` reaches the model's dots and convolutions when the
evaluators trace their solves, is recorded in eval_metrics.json, and is checked."""

import re

import jax
import jax.numpy as jnp
import pytest
from image_runs import small_config

import fmjax.metrics.nll
from experiments import images
from experiments.images.evaluation import evaluate
from experiments.images.evaluators import bpd, fid, grid, nfe, sweep

pytestmark = pytest.mark.usefixtures("float32")

# the tiny UNet, with an attention block at 32x32 so that its dot_generals are traced too
MODEL = {"model.attn_resolutions": (32,), "eval.nfe_num_samples": 0, "mode": "eval"}


def _precisions(hlo: str, op: str) -> list[str]:
    """The precision of each ``op`` (``dot_general`` or ``convolution``) in StableHLO text
    (``DEFAULT`` where none is printed)."""
    out = []
    for line in hlo.splitlines():
        if f"stablehlo.{op}" not in line:
            continue
        found = re.findall(r"precision(?:_config)? = \[([^\]]*)\]", line)
        names = re.findall(r"(DEFAULT|HIGHEST|HIGH)", found[0]) if found else ["DEFAULT"]
        out.append(",".join(sorted(set(names))))
    return out


@pytest.fixture(scope="module")
def state():
    """A state of zeros of the model's shapes (its values are not looked at: the model is
    only lowered), which spares the UNet's initialisation."""

    def zeros(a):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jax.random.split(jax.random.key(0), a.shape) if a.shape else jax.random.key(0)
        return jnp.zeros(a.shape, a.dtype)

    return jax.tree_util.tree_map(zeros, images.build(small_config(**MODEL)).state_shapes)


@pytest.mark.parametrize("precision,expected", [("highest", "HIGHEST"), ("default", "DEFAULT")])
def test_eval_precision_reaches_the_models_dots(state, precision, expected, tmp_path, monkeypatch):
    config = small_config(**MODEL, **{"eval.matmul_precision": precision})
    setup = images.build(config)
    lowered, x = {}, jnp.zeros((2, 32, 32, 3))

    def fake_evaluate_bpd(v, *args, **kwargs):  # what bits/dim would jit: the model's field
        lowered["hlo"] = jax.jit(v).lower(jnp.float32(0.5), x).as_text()
        return {"bpd": 1.0, "num_examples": 2}

    monkeypatch.setattr(fmjax.metrics.nll, "evaluate_bpd", fake_evaluate_bpd)
    m = evaluate(setup, fmjax.train.sharding.make_mesh(), str(tmp_path), state=state)
    assert m["matmul_precision"] == precision
    assert m["results"]["bpd"]["matmul_precision"] == precision
    dots = _precisions(lowered["hlo"], "dot_general")
    convs = _precisions(lowered["hlo"], "convolution")
    assert len(dots) >= 3 and len(convs) >= 3  # attention, dense layers, convolutions
    assert set(dots) == {expected} and set(convs) == {expected}, (dots, convs)
    # outside the evaluators (training, its sample grids) the default is untouched
    outside = jax.jit(setup.velocity(state.params)).lower(jnp.float32(0.5), x)
    assert "HIGHEST" not in outside.as_text()


def test_bad_matmul_precision_is_a_config_error():
    config = small_config(**{"eval.matmul_precision": "fp32"})
    with pytest.raises(images.ConfigError, match=r"eval.matmul_precision must be one of .*fp32"):
        images.build(config)


def test_every_evaluator_but_the_training_grid_runs_at_the_eval_precision():
    for module in (bpd, nfe, fid, sweep):  # wrapped by at_eval_precision
        assert module.run.__wrapped__.__module__ == module.__name__
    assert not hasattr(grid.run, "__wrapped__")
