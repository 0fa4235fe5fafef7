"""The image experiment configs: the paper's recipes, and every bad value a ConfigError
before any data is read or anything compiled."""

import optax
import pytest
from conftest import use_compile_cache
from image_runs import (
    small_config,
)

from experiments import images
from experiments.configs import cifar10 as cifar10_config
from experiments.configs import imagenet32 as imagenet32_config
from experiments.configs import imagenet64 as imagenet64_config
from experiments.images import setup as setup_lib
from fmjax.models import unet_presets

use_compile_cache()
pytestmark = pytest.mark.usefixtures("float32")


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
    assert _unet_fields(setup_lib.build_model(c)) == _unet_fields(unet_presets.imagenet32_paper())
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
    assert _unet_fields(setup_lib.build_model(k)) == _unet_fields(unet_presets.cifar10_paper())
    assert k.data.source == "cifar10" and k.data.global_batch_size == 256
    assert (k.train.num_steps, k.train.learning_rate, k.train.warmup_steps) == (
        391_000,
        5e-4,
        45_000,
    )
    assert cifar10_config.get_config("tiny").data.global_batch_size == 8

    g = imagenet64_config.get_config()
    assert _unet_fields(setup_lib.build_model(g)) == _unet_fields(unet_presets.imagenet64_paper())
    assert (g.data.source, g.data.resolution, g.data.global_batch_size) == (
        "imagenet_resized/64x64",
        64,
        2048,
    )
    assert (g.train.num_steps, g.train.learning_rate) == (157_000, 1e-4)
    assert (c.data.resolution, k.data.resolution) == (32, 32)
    tiny64 = images.build(imagenet64_config.get_config("tiny"))  # the model traced at 64x64
    assert tiny64.image_shape == (64, 64, 3)
    assert tiny64.state_shapes.params["params"]["conv_in"]["kernel"].shape == (3, 3, 3, 32)
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
        ({"data.resolution": 0}, "data.resolution must be a positive integer; got 0"),
        (
            {"data.resolution": 64},
            r"data.resolution: source 'imagenet_resized/32x32' holds 32x32 images, but "
            r"resolution 64 was asked for \(sources at 64x64: downsampled_imagenet/64x64, ",
        ),
        ({"data.source": "imagenet64_npz"}, "holds 64x64 images, but resolution 32"),
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
        # a negative rate would ascend; the others would fail after training
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
        ({"train.coupling": "entropic"}, r"train.coupling='entropic' is the sb_cfm path's own"),
        (
            {"path.name": "sb_cfm", "train.prediction": "eps"},
            r"train.prediction: the sb_cfm interpolant trains velocity models only",
        ),
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
        images.train_and_evaluate(small_config(**extra), str(tmp_path / "run"))


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
        images.build(small_config(**extra))
