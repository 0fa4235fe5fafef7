"""The ImageNet-32 experiment end to end with the tiny preset.

* in-process ``train_and_evaluate`` on ``tfds.testing.mock_data`` (the mock patches TFDS in
  this process only), then ``mode='eval'`` from the checkpoint; CIFAR-10 with microbatches;
* the trainer's stops: a missing dataset, eval settings that cannot work (before training),
  labels outside the model's classes, a non-finite loss (the last good checkpoint is kept).
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import use_compile_cache
from image_runs import (
    SMALL,
    check_eval_metrics,
    read_json,
    read_jsonl,
    small_config,
    write_image_folder,
    write_npz_dataset,
)

import fmjax
import fmjax.metrics.nll
import fmjax.train
from experiments import images
from experiments.configs import cifar10 as cifar10_config
from experiments.images import step as step_lib
from fmjax.data.images import DatasetNotFoundError
from fmjax.metrics import fid
from fmjax.train import NonFiniteLossError
from fmjax.train.checkpoint import CheckpointManager
from fmjax.train.logging import MetricWriter, image_grid

use_compile_cache()
pytestmark = pytest.mark.usefixtures("float32")


def test_train_and_evaluate_on_mock_data_then_eval_mode(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    # BPD also at step 2 during training; keep the last checkpoint plus the best by eval BPD
    config = small_config(
        **{"train.eval_every": 2, "train.best_metric": "eval_bpd", "train.keep_checkpoints": 1}
    )
    with tfds.testing.mock_data(num_examples=16):
        out = images.train_and_evaluate(config, workdir)
    assert out["train"]["end_step"] == 4 and out["train"]["dataset"] == "imagenet_resized/32x32"
    m = read_json(workdir, "eval_metrics.json")
    check_eval_metrics(m, "imagenet_resized/32x32:validation")
    assert m["checkpoint_step"] == 4
    # logs
    recs = read_jsonl(workdir, "metrics.jsonl")
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["steps_per_s"] > 0 for r in recs if "loss" in r)
    assert os.path.exists(os.path.join(workdir, "samples", "samples_ema_00000004.png"))
    assert read_json(workdir, "config.json")["train"]["num_steps"] == 4
    ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), best_metric="eval_bpd")
    assert ckpt.all_steps() == [2, 4] and ckpt.best_step() == 2 and ckpt.latest_step() == 4
    assert ckpt.metadata(2)["metrics"]["eval_bpd"] == pytest.approx(
        next(r for r in recs if "eval_bpd" in r)["eval_bpd"]
    )
    ckpt.close()
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        pass
    else:
        events = os.listdir(os.path.join(workdir, "tb"))
        assert events and events[0].startswith("events.out.tfevents.")
        with open(os.path.join(workdir, "tb", events[0]), "rb") as f:
            assert b"loss" in f.read()

    # eval mode from the checkpoint (the BPD totals of that step are reused from its file),
    # with FID wired to fmjax.metrics.fid.compute_fid (faked here: the real Inception-v3 at
    # 299x299 is too slow for this test; fmjax's own FID tests cover it)
    calls = {}

    def fake_compute_fid(sample_fn, ref_images_iter, weights_path, num_samples, **kw):
        calls["samples"] = np.asarray(sample_fn(0))
        calls["ref"] = next(iter(ref_images_iter))
        calls.update(weights=weights_path, num=num_samples, **kw)
        return 12.5

    monkeypatch.setattr(fid, "compute_fid", fake_compute_fid)
    weights = tmp_path / "inception.npz"
    config = small_config(
        **{"mode": "eval", "eval.fid_inception_weights": str(weights), "eval.fid_num_samples": 4}
    )
    with pytest.raises(fid.FIDWeightsNotFoundError, match="inception.npz"):
        images.train_and_evaluate(config, workdir)
    weights.write_bytes(b"")
    with tfds.testing.mock_data(num_examples=16):
        again = images.train_and_evaluate(config, workdir)["eval"]
    assert again["checkpoint_step"] == 4
    assert again["results"]["bpd"]["value"] == pytest.approx(m["results"]["bpd"]["value"])
    assert again["results"]["bpd"]["resumed"]
    assert again["results"]["fid"]["value"] == 12.5
    assert again["summary"]["fid[imagenet_resized/32x32]"] == 12.5
    assert calls["samples"].shape == (4, 32, 32, 3) and calls["num"] == 4
    assert calls["ref"]["image"].shape == (4, 32, 32, 3)
    assert calls["weights"] == str(weights)
    # sweep mode from the same checkpoint: FID (faked) and ODE error against NFE
    sweep_config = small_config(
        **{
            "mode": "sweep",
            "eval.fid_inception_weights": str(weights),
            "eval.sweep_samples": 4,
            "eval.sweep_solvers": ("euler",),
            "eval.sweep_steps": (1, 2),
            "eval.sweep_tols": (1e-2,),
        }
    )
    with tfds.testing.mock_data(num_examples=16):
        swept = images.train_and_evaluate(sweep_config, workdir)["sweep"]
    assert swept["checkpoint_step"] == 4 and swept["num_samples"] == 4
    assert swept["straightness"] > 0 and swept["transport_cost"] > 0
    recs = read_json(workdir, "sweep_metrics.json")["sweep"]
    assert [(r["solver"], r.get("steps"), r.get("tol")) for r in recs] == [
        ("euler", 1, None),
        ("euler", 2, None),
        ("dopri5", None, 1e-2),
        ("dopri5", None, sweep_config.eval.rtol),
    ]
    assert [r["nfe"] for r in recs[:2]] == [1, 2] and all(r["fid"] == 12.5 for r in recs)
    assert recs[-1]["ode_error"] == 0 and recs[0]["ode_error"] > 0
    assert calls["num"] == 4 and calls["samples"].shape == (4, 32, 32, 3)
    assert os.path.exists(os.path.join(workdir, "nfe_quality.png"))
    # the raw (not EMA) parameters are another evaluation: its own totals file, not the EMA
    # number under the "raw" label
    with tfds.testing.mock_data(num_examples=16):
        raw = images.train_and_evaluate(
            small_config(**{"mode": "eval", "eval.use_ema": False}), workdir
        )["eval"]
    assert raw["params"] == "raw" and not raw["results"]["bpd"]["resumed"]
    assert raw["results"]["bpd"]["value"] != again["results"]["bpd"]["value"]
    assert (
        len([f for f in os.listdir(os.path.join(workdir, "eval")) if f.startswith("bpd_step4_")])
        == 2
    )
    # a velocity model read as another prediction, or on another path, is refused: in eval
    # mode and on resume (both before any data or compile)
    for extra, match in (
        ({"train.prediction": "eps"}, r"train.prediction='velocity' \(this config: 'eps'\)"),
        ({"path.name": "vp"}, r"path cond_ot \{'sigma_min': 1e-05\}"),
    ):
        with pytest.raises(images.ConfigError, match=match):
            images.train_and_evaluate(small_config(**{"mode": "eval", **extra}), workdir)
        with (
            tfds.testing.mock_data(num_examples=16),
            pytest.raises(images.ConfigError, match=match),
        ):
            images.train_and_evaluate(small_config(**{"train.num_steps": 6, **extra}), workdir)
    # so is a model trained at 32x32 evaluated at 64x64 (its attention at other levels)
    other = {"mode": "eval", "data.source": "folder", "data.resolution": 64}
    with pytest.raises(images.ConfigError, match=r"data.resolution=32 \(this config: 64\)"):
        images.train_and_evaluate(small_config(**other), workdir)


def test_folder_of_jpegs_with_classes_trains(tmp_path):
    """Source 'folder' through the experiment: the mock-data run's model and batches (so its
    compiled step is reused), JPEG files in class sub-folders, 4 steps and their checkpoint
    (the folder's eval split through the pipelines: tests/test_data_folder.py)."""
    data = str(tmp_path / "photos")
    write_image_folder(data, 12, 4, ext="jpg", classes=("cats", "dogs"), size=(48, 40))
    config = small_config(
        **{"mode": "train", "data.source": "folder", "data.data_dir": data, "train.sample_every": 0}
    )
    out = images.train_and_evaluate(config, str(tmp_path / "run"))
    assert out["train"]["end_step"] == 4 and out["train"]["dataset"] == "folder"
    ckpt = CheckpointManager(str(tmp_path / "run" / "checkpoints"))
    assert ckpt.latest_step() == 4 and ckpt.metadata(4)["config"]["data"]["source"] == "folder"
    ckpt.close()


def test_cifar10_trains_on_mock_data_with_microbatches(tmp_path, monkeypatch):
    c = cifar10_config.get_config("tiny")
    for dotted, value in {
        **SMALL,
        "train.num_steps": 2,
        "train.sample_every": 0,
        "train.microbatches": 2,
    }.items():
        group, name = dotted.split(".")
        c[group][name] = value
    c.mode = "train"
    made, original = [], step_lib.make_train_step

    def recording_make_train_step(*args, **kw):
        made.append(kw)
        return original(*args, **kw)

    monkeypatch.setattr(step_lib, "make_train_step", recording_make_train_step)
    with tfds.testing.mock_data(num_examples=8):
        out = images.train_and_evaluate(c, str(tmp_path))
    assert out["train"]["dataset"] == "cifar10" and out["train"]["end_step"] == 2
    assert np.isfinite(out["train"]["final_loss"])
    assert "eval" not in out
    # the 4 images of each step in 2 parts of 2, accumulated on the device, one all-reduce
    (kw,) = made
    assert kw["microbatches"] == 2 and kw["shard_loss"] is True


def test_missing_dataset_in_process(tmp_path):
    config = small_config()
    config.data.data_dir = str(tmp_path / "empty")
    with pytest.raises(DatasetNotFoundError, match="imagenet_resized/32x32"):
        images.train_and_evaluate(config, str(tmp_path / "run"))
    config.mode = "eval"
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        images.train_and_evaluate(config, str(tmp_path / "run2"))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    data = str(tmp_path / "npz")
    write_npz_dataset(data)
    workdir = str(tmp_path / "run")
    config = small_config(
        **{
            "data.source": "imagenet32_npz",
            "data.data_dir": data,
            "train.learning_rate": 1e30,
            "train.warmup_steps": 0,
            "train.checkpoint_every": 1,
            "train.num_steps": 5,
            "train.sample_every": 0,
            "model.dtype": "float32",
        }
    )
    config.mode = "train"
    with pytest.raises(NonFiniteLossError, match="last good checkpoint is step 1") as err:
        images.train_and_evaluate(config, workdir)
    assert "non-finite loss" in str(err.value)
    ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"))
    assert ckpt.all_steps() == [1]
    abstract = images.build(config).abstract_state(fmjax.train.sharding.make_mesh())
    state, _ = ckpt.restore(abstract)
    ckpt.close()
    assert all(
        bool(jnp.all(jnp.isfinite(x)))
        for x in jax.tree_util.tree_leaves((state.params, state.ema_params, state.opt_state))
    )


def test_eval_settings_fail_before_training(tmp_path):
    # an eval split that does not exist: found before any training step
    data = str(tmp_path / "npz")
    write_npz_dataset(data)
    c = small_config(
        **{"data.source": "imagenet32_npz", "data.data_dir": data, "eval.split": "valdation"}
    )
    with pytest.raises(DatasetNotFoundError, match="valdation"):
        images.train_and_evaluate(c, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_labels_outside_num_classes_stop_training_with_a_config_error(tmp_path):
    # ImageNet labels (0..999) with model.num_classes=10: NaN class embeddings, reported as
    # a non-finite loss "lower the learning rate"
    data = str(tmp_path / "npz")
    write_npz_dataset(data)
    c = small_config(
        **{
            "data.source": "imagenet32_npz",
            "data.data_dir": data,
            "model.num_classes": 10,
            "mode": "train",
        }
    )
    with pytest.raises(images.ConfigError, match="model.num_classes=10, but imagenet32_npz"):
        images.train_and_evaluate(c, str(tmp_path / "run"))


def test_metric_writer_and_image_grid(tmp_path):
    g = image_grid(np.zeros((5, 4, 4, 3), np.float32), padding=1)
    assert g.shape == (2 * 5 + 1, 3 * 5 + 1, 3) and g.dtype == np.uint8
    w = MetricWriter(str(tmp_path), tensorboard=False)
    for s in range(1, 6):
        w.write_scalars(s, {"loss": 1.0 / s})
    w.close()
    w = MetricWriter(str(tmp_path), tensorboard=False, resume_step=3)  # a resumed run
    w.write_scalars(4, {"loss": 0.0})
    path = w.write_images(4, "grid", np.zeros((4, 8, 8, 3)))
    w.close()
    recs = read_jsonl(tmp_path, "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and recs[-1]["loss"] == 0.0
    assert os.path.getsize(path) > 0
