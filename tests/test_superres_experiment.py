"""``python -m experiments.superres`` end to end with the tiny preset made smaller (in this
process, on ``tfds.testing.mock_data``), the step's condition, and the config's refusals."""

import functools
import math
import os

import image_runs
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import use_compile_cache
from image_runs import config_flag, parsed_flags, read_json
from PIL import Image

import fmjax
from experiments import superres
from experiments.configs import superres as superres_config
from experiments.images import ConfigError
from experiments.images import main as main_lib
from experiments.images import step as step_lib
from experiments.superres import evaluation
from fmjax.data import superres as superres_lib
from fmjax.metrics import fid

use_compile_cache()
pytestmark = pytest.mark.usefixtures("float32")

# the tiny preset made smaller still (one resolution level, 16 channels, 4 steps), without
# the trainer's sample grids (the evaluation draws super-resolution's)
SMALL = {**image_runs.SMALL, "train.sample_every": 0, "superres.num_grid_images": 2}


def small_config(**extra):
    c = superres_config.get_config("tiny")
    for dotted, value in {**SMALL, **extra}.items():
        *section, name = dotted.split(".")
        (c[section[0]] if section else c)[name] = value
    return c


def test_command_line_trains_and_writes_psnr_ssim_and_the_grid(tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "run"
    args = [config_flag(k, v) for k, v in SMALL.items()]
    with tfds.testing.mock_data(num_examples=16):
        out = main_lib.run(
            parsed_flags("superres", f"--workdir={workdir}", *args), superres.train_and_evaluate
        )
    assert out["train"]["end_step"] == 4
    m = read_json(workdir, "eval_metrics.json")
    dataset = "imagenet_resized/32x32:validation"
    assert m["superres"] == {
        "factor": 2,
        "low_resolution": 16,
        "resolution": 32,
        "downsample": "area",
        "upsample": "cubic",
    }
    r = m["results"]
    assert m["checkpoint_step"] == 4 and m["num_images"] == 4
    for value in (r["psnr"]["value"], r["ssim"]["value"], r["baseline"]["psnr"]):
        assert math.isfinite(value)
    assert 0 < r["psnr"]["value"] < 60 and -1 <= r["ssim"]["value"] <= 1
    assert r["psnr"]["dataset"] == dataset and f"psnr[{dataset}]" in m["summary"]
    assert r["nfe"]["value"] > 0 and r["nfe"]["all_solves_succeeded"]
    assert r["fid"]["value"] is None and "Inception" in r["fid"]["skipped"]
    # two rows of low-res | sample | high-res, 32 x 32 each with 2-pixel padding
    grid = np.asarray(Image.open(os.path.join(workdir, evaluation.GRID_FILE)))
    assert grid.shape == (2 * 34 + 2, 3 * 34 + 2, 3)
    assert "wrote results to" in capsys.readouterr().out

    # a checkpoint trained for another factor is refused (its input means something else)
    with pytest.raises(ConfigError, match="super-resolution {'factor': 2"):
        superres.train_and_evaluate(small_config(mode="eval", **{"superres.factor": 4}), workdir)

    # mode eval from the checkpoint: the same samples (same keys and data), the same scores;
    # FID of those samples through fmjax.metrics.fid.compute_fid (faked: the real
    # Inception-v3 is too slow here; fmjax's FID tests cover it)
    calls = {}

    def fake_compute_fid(sample_fn, ref_images_iter, weights_path, num_samples, **kw):
        calls["samples"], calls["num"] = np.asarray(sample_fn(0)), num_samples
        calls["ref"] = next(iter(ref_images_iter))["image"]
        return 12.5

    monkeypatch.setattr(fid, "compute_fid", fake_compute_fid)
    weights = tmp_path / "inception.npz"
    weights.write_bytes(b"")
    config = small_config(
        **{"mode": "eval", "eval.fid_inception_weights": str(weights), "eval.fid_num_samples": 4}
    )
    with tfds.testing.mock_data(num_examples=16):
        again = superres.train_and_evaluate(config, str(workdir))["eval"]
    summary = {k: v for k, v in m["summary"].items() if not k.startswith("fid")}
    assert {k: again["summary"][k] for k in summary} == pytest.approx(summary)
    assert again["results"]["fid"]["value"] == 12.5 and calls["num"] == 4
    assert calls["samples"].shape == calls["ref"].shape == (4, 32, 32, 3)


def test_the_step_conditions_on_the_low_resolution_image():
    # the loss is the library's CFM loss of the conditional field with cond = the condition
    # of each image; with perturbed weights the output depends on cond, so a wrong or missing
    # condition changes the number
    setup = superres.build(small_config())
    params = setup.state_shapes.params
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(
        lambda p: jnp.asarray(0.3 * rng.standard_normal(p.shape), jnp.float32), params
    )
    x1 = jax.random.uniform(jax.random.key(3), (4, 32, 32, 3), minval=-1.0, maxval=1.0)
    k_cfm = jax.random.split(jax.random.key(0), 3)[0]

    def field(t, x, cond):
        return setup.model.apply(params, t, x, cond, train=False)

    @jax.jit
    def losses():
        loss = step_lib.loss_fn(setup, params, jax.random.key(0), {"image": x1})
        cfm = functools.partial(fmjax.losses.cfm_loss, field, setup.path, k_cfm, x1)
        return loss, cfm(cond=superres_lib.condition(x1, 2)), cfm(cond=jnp.zeros_like(x1))

    loss, right, zeros = (float(v) for v in losses())
    assert loss == pytest.approx(right, rel=1e-6)
    assert abs(loss - zeros) > 1e-4 * loss  # 100 x the tolerance above


@pytest.mark.parametrize(
    "override,match",
    [
        ({"superres.factor": 3}, "superres.factor=3 must divide data.resolution=32"),
        ({"superres.factor": 1}, "superres.factor must be an integer >= 2"),
        ({"superres.upsample": "lanczos"}, "superres.upsample must be one of"),
        ({"data.resolution": 256}, "holds 32x32 images, but resolution 256 was asked for"),
        ({"model.num_classes": 10}, "model.num_classes (class labels) is not supported"),
        ({"train.sample_every": 5}, "train.sample_every is not supported"),
        ({"train.coupling": "ot"}, "train.coupling is not supported"),
        ({"mode": "sweep"}, "mode must be one of ('train', 'eval', 'train_and_eval')"),
    ],
)
def test_bad_superres_configs_are_refused(override, match):
    with pytest.raises(ConfigError) as err:
        superres.build(small_config(**override))
    assert match in str(err.value)


def test_a_bad_config_is_one_line_on_the_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main_lib.run(
            parsed_flags("superres", f"--workdir={tmp_path}", "--config.superres.factor=3"),
            superres.train_and_evaluate,
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bad config: superres.factor=3") and len(err.splitlines()) == 1
