"""The ImageNet-32 experiment end to end with the tiny preset.

* in-process ``train_and_evaluate`` on ``tfds.testing.mock_data`` (the mock patches TFDS in
  this process only), then ``mode='eval'`` from the checkpoint;
* the command line in a subprocess on a small dataset in the official downsampled-ImageNet
  npz format (source ``imagenet32_npz``), so nothing needs mocking across processes;
* clear errors: a missing dataset, a mistyped config key, a global batch not divisible by
  the device count, and the stop on a non-finite loss (the last good checkpoint is kept).
"""

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from absl import flags
from conftest import ROOT, XLA_CACHE, use_compile_cache
from flax import linen as nn

import fmjax
import fmjax.metrics.nll
import fmjax.train
from experiments import images
from experiments.configs import cifar10 as cifar10_config
from experiments.configs import imagenet32 as imagenet32_config
from experiments.images import main as main_lib
from experiments.images import setup as setup_lib
from experiments.images import step as step_lib
from experiments.images.evaluation import evaluate as evaluate_setup
from experiments.images.evaluators import bpd as bpd_lib
from fmjax.data.images import DatasetNotFoundError
from fmjax.metrics import fid
from fmjax.models import unet
from fmjax.train import NonFiniteLossError
from fmjax.train.checkpoint import CheckpointManager
from fmjax.train.logging import MetricWriter, image_grid

use_compile_cache()
pytestmark = pytest.mark.usefixtures("float32")

# The tiny preset made smaller still (one resolution level, 16 channels) to keep compiles short.
SMALL = {
    "model.ch": 16,
    "model.ch_mult": (1,),
    "model.attn_resolutions": (),
    "train.num_steps": 4,
    "train.checkpoint_every": 2,
    "train.log_every": 1,
    "train.sample_every": 4,
    "train.progress": False,
    "eval.num_dequant": 2,
    "eval.global_batch_size": 4,
    "eval.num_batches": 1,
    "eval.nfe_num_samples": 4,
    "eval.sample_batch_size": 4,
    "data.global_batch_size": 4,
    "data.read_threads": 1,
}


def _config(preset="tiny", **extra):
    c = imagenet32_config.get_config(preset)
    for dotted, value in {**SMALL, **extra}.items():
        *group, name = dotted.split(".")
        (c[group[0]] if group else c)[name] = value
    return c


def _flag(dotted, value):
    if isinstance(value, tuple):
        value = "(" + ",".join(map(str, value)) + ("," if len(value) == 1 else "") + ")"
    return f"--config.{dotted}={value}"


def _env(**extra):
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
        JAX_COMPILATION_CACHE_DIR=XLA_CACHE,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1",
    )
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


def _run(args, **kw):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False, **kw)


def _write_npz_dataset(folder, n_train=16, n_val=8, seed=0):
    """A tiny dataset in the official downsampled-ImageNet npz format."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train_data_batch_1", n_train), ("val_data", n_val)):
        np.savez(
            os.path.join(folder, f"{name}.npz"),
            data=rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            labels=rng.integers(1, 1001, n),
        )


def _json(*path):
    with open(os.path.join(*map(str, path))) as f:
        return json.load(f)


def _jsonl(*path):
    with open(os.path.join(*map(str, path))) as f:
        return [json.loads(ln) for ln in f]


def _check_eval_metrics(m, dataset, nfe=True):
    assert m["dataset"]["name"] == dataset
    bpd = m["results"]["bpd"]
    assert bpd["dataset"] == dataset and math.isfinite(bpd["value"]) and bpd["value"] > 0
    assert bpd["num_dequant"] == 2 and bpd["num_examples"] == 4
    assert (m["results"]["nfe"]["value"] > 0) if nfe else ("nfe" not in m["results"])
    assert m["results"]["fid"]["value"] is None and "Inception" in m["results"]["fid"]["skipped"]
    # every reported number names its dataset
    for r in m["results"].values():
        assert dataset.split(":")[0] in r["dataset"]
    assert all(dataset.split(":")[0] in k for k in m["summary"])


# ----------------------------------------------------------------------------- end to end


def test_train_and_evaluate_on_mock_data_then_eval_mode(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    # BPD also at step 2 during training; keep the last checkpoint plus the best by eval BPD
    config = _config(
        **{"train.eval_every": 2, "train.best_metric": "eval_bpd", "train.keep_checkpoints": 1}
    )
    with tfds.testing.mock_data(num_examples=16):
        out = images.train_and_evaluate(config, workdir)
    assert out["train"]["end_step"] == 4 and out["train"]["dataset"] == "imagenet_resized/32x32"
    m = _json(workdir, "eval_metrics.json")
    _check_eval_metrics(m, "imagenet_resized/32x32:validation")
    assert m["checkpoint_step"] == 4
    # logs
    recs = _jsonl(workdir, "metrics.jsonl")
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["steps_per_s"] > 0 for r in recs if "loss" in r)
    assert os.path.exists(os.path.join(workdir, "samples", "samples_ema_00000004.png"))
    assert _json(workdir, "config.json")["train"]["num_steps"] == 4
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
    config = _config(
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
    # the raw (not EMA) parameters are another evaluation: its own totals file, not the EMA
    # number under the "raw" label (the file was once keyed by the step alone)
    with tfds.testing.mock_data(num_examples=16):
        raw = images.train_and_evaluate(
            _config(**{"mode": "eval", "eval.use_ema": False}), workdir
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
            images.train_and_evaluate(_config(**{"mode": "eval", **extra}), workdir)
        with (
            tfds.testing.mock_data(num_examples=16),
            pytest.raises(images.ConfigError, match=match),
        ):
            images.train_and_evaluate(_config(**{"train.num_steps": 6, **extra}), workdir)


def test_ve_path_samples_and_scores_from_its_wide_source(tmp_path):
    # VE starts from N(0, sigma_max^2 I). A fresh UNet's output layer is zero, so v = 0: the
    # samples are the source noise, and the bits/dim of data in [-1, 1] are the source's,
    # 7 + (log(2 pi) / 2 + log 50) / ln 2 = 13.9696 (the data's |y|^2 / (2 * 50^2) adds < 1e-4)
    config = _config(**{"path.name": "ve", "mode": "eval"})
    setup = images.build(config)
    assert setup.source_std == pytest.approx(50.0)
    state = setup.init_state()
    mesh = fmjax.train.sharding.make_mesh()
    solver = images.Solver("dopri5", 1e-5, 1e-5)
    imgs, _ = setup.sample(state.params, jax.random.key(0), 4, mesh, solver)
    assert imgs.shape == (4, 32, 32, 3) and np.std(imgs) == pytest.approx(50.0, rel=0.03)
    with tfds.testing.mock_data(num_examples=16):
        m = images.evaluate(config, str(tmp_path / "run"), state=state)
    expected = 7 + (0.5 * math.log(2 * math.pi) + math.log(50.0)) / math.log(2.0)
    assert m["results"]["bpd"]["value"] == pytest.approx(expected, abs=2e-4)
    assert m["results"]["nfe"]["value"] > 0


class _ExactGaussianModel(nn.Module):
    """The exact prediction of ``path`` for data ``N(0, s^2 I)``: with ``x_t = sigma_t x0 +
    alpha_t x1`` and ``v_t = sigma_t^2 + alpha_t^2 s^2``, ``E[x0 | x] = sigma_t x / v_t``,
    ``E[x1 | x] = alpha_t s^2 x / v_t``, score ``-x / v_t``, velocity
    ``(sigma_t sigma_t' + alpha_t alpha_t' s^2) x / v_t``. Takes the UNet's arguments."""

    gaussian_path: object
    prediction: str
    s: float

    @nn.compact
    def __call__(self, t, x, y=None, train=False):
        self.param("unused", nn.initializers.zeros, ())
        a, sig, da, dsig = (c.reshape(-1, 1, 1, 1) for c in self.gaussian_path.coefficients(t))
        var = sig**2 + a**2 * self.s**2
        scale = {
            "eps": sig,
            "x1": a * self.s**2,
            "score": -1.0,
            "velocity": sig * dsig + a * da * self.s**2,
        }[self.prediction]
        return scale / var * x


@pytest.mark.parametrize(
    "path_name,prediction,t_range",
    [
        ("vp", "eps", (0.0, 1.0 - 1e-5)),  # DDPM's parameterisation
        ("cond_ot", "eps", (1e-3, 1.0)),  # alpha_0 = 0: solved from t0 = t_margin
        ("cond_ot", "score", (1e-3, 1.0)),
        ("cosine", "x1", (0.0, 0.999)),  # sigma_1 = 0: solved up to 1 - t_margin
        ("cosine", "velocity", (0.0, 1.0)),
    ],
)
def test_x1_eps_score_models_sample_and_score_as_their_closed_form(
    tmp_path, path_name, prediction, t_range
):
    # The exact predictor of N(0, s^2 I) data on each path, evaluated by the experiment: the
    # flow over [t0, t1] scales x linearly, x_{t1} = x_{t0} sqrt(v_{t1} / v_{t0}), so the
    # samples are the source noise times that factor, and an image y gets log p =
    # log N(y; 0, v_{t1}) + log N(x_{t0}; 0, s0^2) - log N(x_{t0}; 0, v_{t0}) with s0 the
    # source std the solve starts from (Hutchinson is exact: the Jacobian is c(t) I).
    # Reading the prediction as a velocity, or solving over [0, 1], fails both checks.
    s, n = 0.5, 4
    config = _config(
        **{
            "path.name": path_name,
            "train.prediction": prediction,
            "mode": "eval",
            "eval.rtol": 1e-6,
            "eval.atol": 1e-6,
        }
    )
    setup = images.build(config)
    path = setup.path
    model = _ExactGaussianModel(gaussian_path=path, prediction=prediction, s=s)
    setup = dataclasses.replace(setup, model=model)
    params = model.init(jax.random.key(0), jnp.zeros((1,)), jnp.zeros((1, 32, 32, 3)))
    state = fmjax.train.TrainState.create(params, optax.adam(1e-3), jax.random.key(1))
    t0, t1 = t_range
    var = {
        t: float(np.asarray(sig**2 + a**2 * s**2))
        for t in t_range
        for a, sig, _, _ in [path.coefficients(jnp.float32(t))]
    }
    s0 = setup.source_std
    mesh = fmjax.train.sharding.make_mesh()
    solver = images.Solver("dopri5", 1e-6, 1e-6)
    imgs, stats = setup.sample(params, jax.random.key(0), n, mesh, solver)
    x0 = s0 * jax.random.normal(jax.random.key(0), (n, 32, 32, 3))
    np.testing.assert_allclose(imgs, x0 * math.sqrt(var[t1] / var[t0]), rtol=1e-4, atol=1e-5)
    assert bool(np.all(stats.success))

    with tfds.testing.mock_data(num_examples=16):
        m = evaluate_setup(setup, mesh, str(tmp_path / "run"), state=state)
        batch = next(iter(bpd_lib.eval_batches(setup, mesh)()))
    assert m["prediction"] == prediction and m["t_range"] == pytest.approx(list(t_range))
    x = np.asarray(batch["image"], np.float64)
    keys = fmjax.metrics.nll.example_keys(jax.random.key(config.seed + 1), np.arange(n))
    u = np.asarray(
        fmjax.metrics.nll.dequantization_noise(keys, x.shape[1:], 2, 2 / 256), np.float64
    )
    y = x[:, None] + u  # (n, K, 32, 32, 3)
    x_t0 = y * math.sqrt(var[t0] / var[t1])

    def log_normal(z, v):
        return -0.5 * np.sum(z**2, axis=(2, 3, 4)) / v - 0.5 * 3072 * math.log(2 * math.pi * v)

    logp = log_normal(y, var[t1]) + log_normal(x_t0, s0**2) - log_normal(x_t0, var[t0])
    logp = np.logaddexp(logp[:, 0], logp[:, 1]) - math.log(2)
    expected = np.mean(-logp / (3072 * math.log(2)) + 7)
    assert m["results"]["bpd"]["value"] == pytest.approx(expected, abs=1e-4)


def test_the_loss_regresses_the_configured_prediction():
    # A fresh UNet predicts 0 (its output layer is zero), so the loss is the mean square of
    # the target: the images themselves for x1, the source noise for eps (1 in expectation,
    # +-0.013 over these 12,288 values), x1 - (1 - sigma_min) x0 for the velocity
    images_ = jax.random.uniform(jax.random.key(3), (4, 32, 32, 3), minval=-1.0, maxval=1.0)
    mean_sq = float(jnp.mean(images_**2))
    losses = {}
    for prediction in ("x1", "eps", "velocity"):
        setup = images.build(_config(**{"train.prediction": prediction}))
        params = jax.jit(setup.init_state)().params
        loss_fn = jax.jit(functools.partial(step_lib.loss_fn, setup))
        losses[prediction] = float(loss_fn(params, jax.random.key(0), {"image": images_}))
        # the library's CFM loss on the same key: the same draws, the same number
        k_cfm = jax.random.split(jax.random.key(0), 3)[0]
        expected = fmjax.losses.cfm_loss(
            lambda t, x, p=params, m=setup.model: m.apply(p, t, x, train=False),
            setup.path,
            k_cfm,
            images_,
            prediction=prediction,
        )
        assert losses[prediction] == pytest.approx(float(expected), rel=1e-6)
    assert losses["x1"] == pytest.approx(mean_sq, rel=1e-5)
    assert losses["eps"] == pytest.approx(1.0, abs=0.05)
    assert losses["velocity"] == pytest.approx(1.0 + mean_sq, abs=0.05)


def test_guided_image_samples_mix_the_labelled_and_the_null_class_fields():
    n, w, tol = 4, 2.0, {"solver": "dopri5", "rtol": 1e-3, "atol": 1e-3}
    setup = images.build(_config(**{"model.num_classes": 3, "eval.guidance_scale": w}))
    model = setup.model
    params = jax.jit(setup.init_state)().params
    # a fresh UNet's output layer is zero (v = 0): perturb every weight so v depends on y
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    params = tree.unflatten(
        [
            p + 0.05 * jax.random.normal(k, p.shape, p.dtype)
            for p, k in zip(leaves, keys, strict=True)
        ]
    )
    mesh = fmjax.train.sharding.make_mesh()
    imgs, _ = setup.sample(params, jax.random.key(0), n, mesh, images.Solver("dopri5", 1e-3, 1e-3))
    y, null = jnp.arange(n) % 3, jnp.full((n,), 3)

    def guided(t, x):
        return (1 - w) * model.apply(params, t, x, null, train=False) + w * model.apply(
            params, t, x, y, train=False
        )

    x0 = jax.random.normal(jax.random.key(0), (n, 32, 32, 3))
    expected, _ = fmjax.sample(guided, x0, **tol)
    np.testing.assert_allclose(imgs, expected, atol=2e-3)
    # the labelled and null fields differ, so the test tells guided from conditional samples
    apply = jax.jit(lambda y: model.apply(params, jnp.zeros((n,)), x0, y, train=False))
    assert np.max(np.abs(apply(y) - apply(null))) > 0.1


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


def test_cli_end_to_end_on_npz_data(tmp_path):
    data = str(tmp_path / "npz")
    _write_npz_dataset(data)
    workdir = str(tmp_path / "run")
    cmd = [
        sys.executable,
        "-m",
        "experiments.imagenet32",
        "--config=experiments/configs/imagenet32.py:tiny",
        f"--workdir={workdir}",
        "--config.data.source=imagenet32_npz",
        f"--config.data.data_dir={data}",
        *(_flag(k, v) for k, v in SMALL.items()),
        _flag("train.num_steps", 2),
        _flag("train.sample_every", 0),
        # class-conditional on the npz labels, NFE of classifier-free guided samples
        _flag("model.num_classes", 1000),
        _flag("eval.guidance_scale", 1.5),
    ]
    out = _run(cmd, env=_env(), timeout=400)
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"wrote results to {workdir}" in out.stdout
    m = _json(workdir, "eval_metrics.json")
    _check_eval_metrics(m, "imagenet32_npz:val_data")
    assert m["results"]["nfe"]["guidance_scale"] == 1.5
    cfg = _json(workdir, "config.json")
    assert cfg["data"]["source"] == "imagenet32_npz" and cfg["train"]["num_steps"] == 2
    assert cfg["model"]["num_classes"] == 1000 and cfg["eval"]["guidance_scale"] == 1.5
    assert cfg["model"]["ch_mult"] == [1]


def test_cli_missing_dataset_and_indivisible_batch(tmp_path):
    base = [
        sys.executable,
        "-m",
        "experiments.imagenet32",
        "--config=experiments/configs/imagenet32.py:tiny",
        f"--workdir={tmp_path}/run",
        f"--config.data.data_dir={tmp_path}/nothing_here",
    ]
    out = _run(base, env=_env(), timeout=120)
    assert out.returncode != 0
    assert "dataset not found" in out.stderr and "imagenet_resized/32x32" in out.stderr
    assert "Traceback" not in out.stderr
    # 4 devices, global batch 6
    out = _run(
        base + ["--config.data.global_batch_size=6"],
        timeout=120,
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"),
    )
    assert out.returncode != 0
    assert "bad config" in out.stderr and "global batch size (6)" in out.stderr
    assert "divisible by 4" in out.stderr and "Traceback" not in out.stderr
    # the eval batch too, before training (it was found after training and checkpointing)
    out = _run(
        base + ["--config.data.global_batch_size=8", "--config.eval.global_batch_size=6"],
        timeout=120,
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"),
    )
    assert out.returncode != 0 and "eval global batch size (6)" in out.stderr
    assert not os.path.exists(os.path.join(str(tmp_path), "run", "checkpoints"))
    out = _run(base + ["--config.train.ema_decay=1.5"], timeout=120, env=_env())
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert (
        "error: bad config: train.ema_decay must be a finite number in [0, 1); got 1.5"
        in out.stderr
    )


def _parsed(*args):
    """Fresh flags of the command line, parsed from ``args`` (in this process)."""
    config = main_lib.config_path("imagenet32") + ":tiny"
    argv = ["imagenet32", f"--config={config}", "--notune_cpu_allocator", *args]
    fv = flags.FlagValues()
    main_lib.define_flags(main_lib.config_path("imagenet32"), fv, argv)
    main_lib.parse(argv, fv)
    return fv


def _one_error_line(capsys, exit_info, status=2):
    assert exit_info.value.code == status
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "arg,match",
    [
        (
            "--config.train.num_stepz=5",
            "error: bad config: unknown config field --config.train.num_stepz "
            "(did you mean --config.train.num_steps",
        ),
        ("--config.train.num_steps=abc", "error: bad config: "),
        ("--config=experiments/configs/imagenet32.py:huge", "unknown imagenet32 preset 'huge'"),
    ],
)
def test_cli_bad_flags_are_one_error_line(capsys, arg, match):
    with pytest.raises(SystemExit) as exit_info:
        _parsed("--workdir=/nonexistent", arg)
    assert match in _one_error_line(capsys, exit_info)


def test_cli_bad_values_are_one_error_line_before_any_work(tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "run"
    fv = _parsed(f"--workdir={workdir}", "--config.train.ema_decay=1.5")
    with pytest.raises(SystemExit) as exit_info:
        main_lib.run(fv)
    err = _one_error_line(capsys, exit_info)
    assert "error: bad config: train.ema_decay must be a finite number in [0, 1); got 1.5" in err
    # a global batch of 6 over 4 devices (a stand-in for the mesh: the check reads its shape)
    four = types.SimpleNamespace(shape={"data": 4}, size=4)
    monkeypatch.setattr(fmjax.train.sharding, "make_mesh", lambda: four)
    fv = _parsed(f"--workdir={workdir}", "--config.data.global_batch_size=6")
    with pytest.raises(SystemExit) as exit_info:
        main_lib.run(fv)
    err = _one_error_line(capsys, exit_info)
    assert "error: bad config: the global batch size (6)" in err and "divisible by 4" in err
    assert not workdir.exists()


def test_missing_dataset_in_process(tmp_path):
    config = _config()
    config.data.data_dir = str(tmp_path / "empty")
    with pytest.raises(DatasetNotFoundError, match="imagenet_resized/32x32"):
        images.train_and_evaluate(config, str(tmp_path / "run"))
    config.mode = "eval"
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        images.train_and_evaluate(config, str(tmp_path / "run2"))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    data = str(tmp_path / "npz")
    _write_npz_dataset(data)
    workdir = str(tmp_path / "run")
    config = _config(
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


# ----------------------------------------------------------------------------- configs


def _unet_fields(m):
    names = (
        "ch",
        "ch_mult",
        "num_res_blocks",
        "attn_resolutions",
        "num_heads",
        "num_head_channels",
        "dropout",
        "num_classes",
        "resblock_updown",
        "use_scale_shift_norm",
        "dtype",
    )
    return {n: getattr(m, n) for n in names}


def test_default_configs_are_the_papers_recipe():
    c = imagenet32_config.get_config()
    assert _unet_fields(setup_lib.build_model(c)) == _unet_fields(unet.imagenet32_paper())
    assert c.data.source == "imagenet_resized/32x32" and c.data.global_batch_size == 1024
    assert c.train.num_steps == 250_000 and c.train.warmup_steps == 20_000
    assert (c.train.adam_b1, c.train.adam_b2, c.train.adam_eps) == (0.9, 0.999, 1e-8)
    assert c.model.dtype == "float32" and c.eval.num_dequant == 15
    assert c.train.microbatches == 1  # the whole global batch per forward pass
    assert c.eval.rtol == c.eval.atol == 1e-5 and c.eval.solver == "dopri5"
    sched = setup_lib.make_schedule(c)
    assert float(sched(0)) == 0.0
    assert float(sched(10_000)) == pytest.approx(0.5e-4)
    assert float(sched(20_000)) == pytest.approx(1e-4)
    assert float(sched(135_000)) == pytest.approx((1e-4 + 1e-8) / 2, rel=1e-4)
    assert float(sched(250_000)) == pytest.approx(1e-8)
    tx, _ = setup_lib.make_optimizer(c)
    assert isinstance(tx, optax.GradientTransformation)

    k = cifar10_config.get_config()
    assert _unet_fields(setup_lib.build_model(k)) == _unet_fields(unet.cifar10_paper())
    assert k.data.source == "cifar10" and k.data.global_batch_size == 256
    assert (k.train.num_steps, k.train.learning_rate, k.train.warmup_steps) == (
        391_000,
        5e-4,
        45_000,
    )
    assert cifar10_config.get_config("tiny").data.global_batch_size == 8
    with pytest.raises(ValueError, match="unknown imagenet32 preset"):
        imagenet32_config.get_config("huge")
    bad = imagenet32_config.get_config("tiny")
    bad.mode = "trian"
    with pytest.raises(ValueError, match="mode"):
        images.train_and_evaluate(bad, "/nonexistent")


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"mode": "trian"}, "mode must be one of"),
        ({"train.ema_decay": 1.0}, "train.ema_decay"),
        ({"train.warmup_steps": -1}, "train.warmup_steps"),
        ({"data.source": "imagenet64"}, "data.source: Unknown image source"),
        ({"data.global_batch_size": 0}, "data.global_batch_size must be a positive integer; got 0"),
        ({"model.dtype": "float8"}, "model.dtype"),
        ({"train.sample_solver": "euler"}, "train.sample_solver must be an adaptive solver"),
        ({"train.sample_tol": -1e-3}, "train.sample_tol: rtol must be a finite number >= 0"),
        ({"eval.solver": "rk45"}, "eval.solver must be an adaptive solver"),
        ({"eval.rtol": 0.0, "eval.atol": 0.0}, "eval.rtol / eval.atol: rtol and atol cannot both"),
        ({"train.sample_every": -1}, "train.sample_every must be a non-negative integer; got -1"),
        ({"eval.sample_batch_size": 0}, "eval.sample_batch_size must be a positive integer"),
        ({"eval.fid_num_samples": 1}, "eval.fid_num_samples must be an integer >= 2; got 1"),
        ({"model.num_classes": 0}, "model.num_classes must be a positive integer; got 0"),
        ({"eval.checkpoint_step": -5}, "eval.checkpoint_step must be a non-negative integer"),
        ({"path.name": "condot"}, r"path.name must be one of \('cond_ot', "),
        ({"path.name": "ve", "path.ve": {"sigma_min": 0.01, "sigma_max": 0.001}}, "path.ve: "),
        (
            {"path.name": "polynomial", "path.polynomial": {"n": -1.0, "eps": 1e-5}},
            "path.polynomial: polynomial exponent n must be > 0",
        ),
        # these trained without complaint (a negative rate ascends) or failed after training
        ({"train.learning_rate": -1e-3}, r"train.learning_rate must be a finite number in \(0,"),
        ({"train.adam_b1": 1.5}, r"train.adam_b1 must be a finite number in \[0, 1\)"),
        ({"model.dropout": 1.5}, r"model.dropout must be a finite number in \[0, 1\)"),
        ({"train.grad_clip_norm": -1.0}, r"train.grad_clip_norm must be a finite number in \[0,"),
        ({"train.loss_reduction": "avg"}, r"train.loss_reduction must be one of \('mean', 'sum'\)"),
        ({"eval.probe": "gauss"}, r"eval.probe must be one of \('rademacher', 'gaussian'\)"),
        ({"eval.guidance_scale": 2.0}, r"eval.guidance_scale=2.0 needs a class-conditional model"),
        (
            {"eval.guidance_scale": 2.0, "model.num_classes": 10, "model.class_dropout": 0.0},
            r"class_dropout > 0 \(got num_classes=10, class_dropout=0.0\)",
        ),
        ({"eval.guidance_scale": float("nan")}, r"eval.guidance_scale must be a finite number"),
        ({"train.prediction": "noise"}, r"train.prediction must be one of \('velocity', 'x1', "),
        ({"eval.t_margin": 0.0}, r"eval.t_margin must be a finite number in \(0, 0.5\)"),
        ({"train.microbatches": 0}, "train.microbatches must be a positive integer; got 0"),
        (
            {"train.microbatches": 3},
            (
                r"train.microbatches=3 must divide each device's rows of the global batch "
                r"\(data.global_batch_size=4 over 1 device\(s\): 4"
            ),
        ),
        (
            {"eval.fid_reference_stats": "/nonexistent/ref.npz"},
            "eval.fid_reference_stats: no file '/nonexistent/ref.npz'",
        ),
    ],
)
def test_bad_config_values_raise_config_errors_before_any_data(tmp_path, extra, match):
    # ConfigError is a ValueError; the command line prints it without a traceback
    with pytest.raises(images.ConfigError, match=match):
        images.train_and_evaluate(_config(**extra), str(tmp_path / "run"))


def test_eval_settings_fail_before_training(tmp_path):
    # an eval split that does not exist: found before any training step (it was found
    # after training and checkpointing)
    data = str(tmp_path / "npz")
    _write_npz_dataset(data)
    c = _config(
        **{"data.source": "imagenet32_npz", "data.data_dir": data, "eval.split": "valdation"}
    )
    with pytest.raises(DatasetNotFoundError, match="valdation"):
        images.train_and_evaluate(c, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_labels_outside_num_classes_stop_training_with_a_config_error(tmp_path):
    # ImageNet labels (0..999) with model.num_classes=10: NaN class embeddings, reported as
    # a non-finite loss "lower the learning rate"
    data = str(tmp_path / "npz")
    _write_npz_dataset(data)
    c = _config(
        **{
            "data.source": "imagenet32_npz",
            "data.data_dir": data,
            "model.num_classes": 10,
            "mode": "train",
        }
    )
    with pytest.raises(images.ConfigError, match="model.num_classes=10, but imagenet32_npz"):
        images.train_and_evaluate(c, str(tmp_path / "run"))


@pytest.mark.parametrize(
    "extra,match",
    [
        (
            {
                "model.ch_mult": (1, 2),
                "model.attn_resolutions": (16,),
                "model.num_heads": 3,
                "model.num_head_channels": None,
            },
            "model: attention at 32 channels is not divisible",
        ),
        ({"model.ch_mult": (1,) * 7}, "model: UNet with ch_mult"),
    ],
)
def test_model_fields_that_do_not_fit_the_images_are_config_errors(extra, match):
    with pytest.raises(images.ConfigError, match=match):
        images.build(_config(**extra))


def test_class_conditional_bf16_loss_and_clipping():
    c = _config(**{"model.num_classes": 10, "model.dtype": "bfloat16", "train.grad_clip_norm": 1.0})
    setup = images.build(c)
    assert setup.model.dtype == jnp.bfloat16 and setup.model.num_classes == 10
    state = setup.state_shapes  # traced, not compiled: keeps the test fast
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.params))
    assert len(state.opt_state) == 2  # chain(clip_by_global_norm, adam)
    batch = {"image": jnp.zeros((4, 32, 32, 3)), "label": jnp.arange(4, dtype=jnp.int32)}
    loss_fn = functools.partial(step_lib.loss_fn, setup)
    loss = jax.eval_shape(loss_fn, state.params, jax.random.key(0), batch)
    assert loss.shape == () and loss.dtype == jnp.float32
    bad = _config(**{"model.num_classes": 10, "data.source": "downsampled_imagenet/32x32"})
    with pytest.raises(ValueError, match="no labels"):
        images.train_and_evaluate(bad, "/nonexistent")


# ----------------------------------------------------------------------------- logging


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
    recs = _jsonl(tmp_path, "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and recs[-1]["loss"] == 0.0
    assert os.path.getsize(path) > 0
