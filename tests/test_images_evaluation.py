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
    return jax.jit(images.build(small_config(**MODEL)).init_state)()


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
