"""The command line of the image experiments: a run in a subprocess on a small dataset in the
official downsampled-ImageNet npz format (nothing to mock across processes), and one
``error: ...`` line, no traceback, for a missing dataset, a mistyped config key, a bad
value and a global batch that does not split over the devices."""

import sys
import types

import pytest
from conftest import use_compile_cache
from image_runs import (
    SMALL,
    check_eval_metrics,
    config_flag,
    parsed_flags,
    read_json,
    run_here,
    subprocess_env,
    write_npz_dataset,
)

import fmjax
import fmjax.metrics.nll
import fmjax.train
from experiments.images import main as main_lib

use_compile_cache()
pytestmark = pytest.mark.usefixtures("float32")


def test_cli_end_to_end_on_npz_data(tmp_path):
    data = str(tmp_path / "npz")
    write_npz_dataset(data)
    workdir = str(tmp_path / "run")
    cmd = [
        sys.executable,
        "-m",
        "experiments.imagenet32",
        "--config=experiments/configs/imagenet32.py:tiny",
        f"--workdir={workdir}",
        "--config.data.source=imagenet32_npz",
        f"--config.data.data_dir={data}",
        *(config_flag(k, v) for k, v in SMALL.items()),
        config_flag("train.num_steps", 2),
        config_flag("train.sample_every", 0),
        # class-conditional on the npz labels, NFE of classifier-free guided samples
        config_flag("model.num_classes", 1000),
        config_flag("eval.guidance_scale", 1.5),
        # SB-CFM: the noisy interpolant with its entropic plan (within classes), evaluated
        # by its probability-flow ODE
        config_flag("path.name", "sb_cfm"),
        config_flag("path.sb_cfm.sigma", 0.5),
        config_flag("train.coupling", "entropic"),
    ]
    out = run_here(cmd, env=subprocess_env(), timeout=400)
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"wrote results to {workdir}" in out.stdout
    m = read_json(workdir, "eval_metrics.json")
    check_eval_metrics(m, "imagenet32_npz:val_data")
    assert m["results"]["nfe"]["guidance_scale"] == 1.5
    cfg = read_json(workdir, "config.json")
    assert cfg["data"]["source"] == "imagenet32_npz" and cfg["train"]["num_steps"] == 2
    assert cfg["model"]["num_classes"] == 1000 and cfg["eval"]["guidance_scale"] == 1.5
    assert cfg["model"]["ch_mult"] == [1]
    assert cfg["path"]["name"] == "sb_cfm" and cfg["train"]["coupling"] == "entropic"


def test_cli_global_batch_that_does_not_split_over_four_devices(tmp_path):
    out = run_here(
        [
            sys.executable,
            "-m",
            "experiments.imagenet32",
            "--config=experiments/configs/imagenet32.py:tiny",
            f"--workdir={tmp_path}/run",
            "--config.data.global_batch_size=6",
        ],
        timeout=120,
        env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"),
    )
    assert out.returncode != 0
    assert "bad config" in out.stderr and "global batch size (6)" in out.stderr
    assert "divisible by 4" in out.stderr and "Traceback" not in out.stderr


def _parsed(*args):
    """Fresh flags of the command line, parsed from ``args`` (in this process)."""
    return parsed_flags("imagenet32", *args)


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


def _run_main(capsys, *args, status=2):
    """``main.run`` in this process on ``args``: its one ``error: ...`` line."""
    with pytest.raises(SystemExit) as exit_info:
        main_lib.run(_parsed(*args))
    return _one_error_line(capsys, exit_info, status)


def test_cli_errors_are_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "run"
    err = _run_main(
        capsys, f"--workdir={workdir}", f"--config.data.data_dir={tmp_path}/nothing_here", status=1
    )
    assert "dataset not found" in err and "imagenet_resized/32x32" in err
    err = _run_main(capsys, f"--workdir={workdir}", "--config.train.ema_decay=1.5")
    assert "error: bad config: train.ema_decay must be a finite number in [0, 1); got 1.5" in err
    err = _run_main(capsys, f"--workdir={workdir}", "--config.data.resolution=64")
    assert "error: bad config: data.resolution: source 'imagenet_resized/32x32' holds 32x32" in err
    # an image folder that cannot be read as a dataset: found before training
    photos = tmp_path / "photos"
    for name in ("loose.png", "cats/x.png"):
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        (photos / name).write_bytes(b"")
    folder_args = ["--config.data.source=folder", f"--config.data.data_dir={photos}"]
    err = _run_main(capsys, f"--workdir={workdir}", *folder_args, status=1)
    assert "error: bad image data: " in err and "'loose.png'" in err and "both directly" in err
    # 4 devices (a stand-in for the mesh: the checks read its shape; the subprocess test above
    # has real ones): a global batch of 6, then an eval batch of 6, found before training
    four = types.SimpleNamespace(shape={"data": 4}, size=4)
    monkeypatch.setattr(fmjax.train.sharding, "make_mesh", lambda: four)
    err = _run_main(capsys, f"--workdir={workdir}", "--config.data.global_batch_size=6")
    assert "error: bad config: the global batch size (6)" in err and "divisible by 4" in err
    err = _run_main(
        capsys,
        f"--workdir={workdir}",
        "--config.data.global_batch_size=8",
        "--config.eval.global_batch_size=6",
    )
    assert "error: bad config: the eval global batch size (6)" in err
    assert not workdir.exists()
