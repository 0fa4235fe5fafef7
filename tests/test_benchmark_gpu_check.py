"""benchmarks/gpu_check.py: its peak table, its reading of compiled HLO, its flags, and its
``--smoke`` run on the CPU (every part, the JSON written under $OUT)."""

import json
import math
import os
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # the scripts import their siblings

import gpu_check  # noqa: E402

pytestmark = pytest.mark.usefixtures("float32")


def test_peak_table_picks_the_most_specific_device_kind():
    assert gpu_check.peak_for("NVIDIA H100 80GB HBM3") == ("H100", gpu_check.PEAK_TFLOPS["H100"])
    assert gpu_check.peak_for("NVIDIA H100 PCIe")[0] == "H100 PCIe"
    assert gpu_check.peak_for("NVIDIA H200")[1]["bf16"] == pytest.approx(989.4)
    assert gpu_check.peak_for("NVIDIA A100-SXM4-80GB")[1]["tf32"] == 156.0
    assert gpu_check.peak_for("TPU v5 lite")[0] == "TPU v5 lite"  # not "TPU v5"
    assert gpu_check.peak_for("cpu") == (None, None)
    h100 = gpu_check.PEAK_TFLOPS["H100"]
    # float32 at the default precision runs on TF32 tensor cores; TPUs multiply it in bf16
    assert gpu_check.compute_peak(h100, "float32", "gpu") == (494.7, "tf32")
    assert gpu_check.compute_peak(h100, "bfloat16", "gpu") == (989.4, "bf16")
    assert gpu_check.compute_peak({"bf16": 275.0}, "float32", "tpu") == (275.0, "bf16")
    assert gpu_check.compute_peak(None, "float32", "cpu") == (None, "unknown")


def test_custom_calls_name_the_attention_kernel():
    hlo = (
        '%a = custom-call(%x), custom_call_target="__cudnn$fmhaSoftmax"\n'
        '%b = custom-call(%y), custom_call_target="__cublas$gemm"\n'
        '%c = custom-call(%z), custom_call_target="__cublas$gemm"\n'
    )
    calls = gpu_check.custom_calls(hlo)
    assert calls == {"__cudnn$fmhaSoftmax": 1, "__cublas$gemm": 2}
    assert "cuDNN fused attention" in gpu_check.attention_implementation(calls, "gpu")
    plain = gpu_check.attention_implementation({"__cublas$gemm": 2}, "gpu")
    assert plain.startswith("XLA") and "no fused attention" in plain


@pytest.mark.parametrize(
    "argv,message",
    [(["--dtypes", "fp8"], "fp8"), (["--precisions", ""], "empty"), (["--batch", "0"], ">= 1")],
)
def test_bad_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(argv)
    assert message in capsys.readouterr().err


def test_smoke_run_measures_every_part(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    # one dtype and one precision keep it to a few compiles (the smoke default runs both)
    res = gpu_check.main(
        ["--smoke", "--steps", "1", "--dtypes", "bfloat16", "--precisions", "highest"]
    )
    with open(tmp_path / "gpu_check.json") as f:
        saved = json.load(f)
    assert saved["parts"].keys() == res["parts"].keys()
    parts = saved["parts"]
    assert set(parts) == {"train_bfloat16", "sample", "bpd"}, parts
    r = parts["train_bfloat16"]
    assert r["dtype"] == "bfloat16" and r["global_batch"] == 2 and math.isfinite(r["loss"])
    assert r["step_seconds_median"] > 0 and r["images_per_s"] > 0
    assert r["model_flops_per_step"] > 0 and 0 < r["mfu"]  # vs the measured matmul rate
    assert r["attention"].startswith("XLA on cpu")
    s = parts["sample"]["highest"]
    assert s["success"] and s["nfe"] > 0 and s["image_evaluations_per_s"] > 0
    b = parts["bpd"]["highest"]
    assert b["finite"] and math.isfinite(b["bpd_mean"]) and b["bpd_mean"] > 0 and b["nfe_mean"] > 0
    assert saved["smoke"] and saved["backend"] == "cpu" and saved["peak_table_key"] is None
