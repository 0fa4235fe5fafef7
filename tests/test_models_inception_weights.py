"""The FID Inception weights (fmjax.models.inception_weights): the npz layout against
torchvision's Inception-v3, the npz round trip and errors, and the pytorch-fid conversion."""

import numpy as np
import pytest
from flax import traverse_util

from fmjax.models import inception_weights as weights


@pytest.fixture(scope="module")
def params():
    return weights.init_random_params(0)


def test_layout_matches_torchvision_inception_v3():
    shapes = weights.param_shapes()
    assert len(shapes) == 94 * 5
    # torchvision's inception_v3 has 27,161,264 parameters; without AuxLogits (3,326,696)
    # and fc (2,049,000) that leaves 21,785,568 (conv kernels + batch-norm gamma/beta).
    trainable = sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith(("/mean", "/var")))
    assert trainable == 21_785_568
    assert shapes["Conv2d_1a_3x3/kernel"] == (3, 3, 3, 32)
    assert shapes["Mixed_6b/branch7x7_2/kernel"] == (1, 7, 128, 128)
    assert shapes["Mixed_7c/branch3x3dbl_3b/kernel"] == (3, 1, 384, 384)
    assert shapes["Mixed_7c/branch_pool/var"] == (192,)


def test_weights_round_trip_and_errors(params, tmp_path):
    path = tmp_path / "inception_fid.npz"
    weights.save_weights(path, params)
    with np.load(path, allow_pickle=False) as z:
        assert str(z["__layout__"]) == weights.LAYOUT_VERSION
        assert {k: z[k].shape for k in z.files if k != "__layout__"} == weights.param_shapes()
        assert all(z[k].dtype == np.float32 for k in z.files if k != "__layout__")
    loaded = weights.load_weights(path)
    flat_a = traverse_util.flatten_dict(params["params"], sep="/")
    flat_b = traverse_util.flatten_dict(loaded["params"], sep="/")
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[k]), flat_b[k])
    # Missing weights: a clear error, and the reason the trainer prints as "FID skipped: ...".
    for missing in (None, tmp_path / "nope.npz"):
        with pytest.raises(weights.FIDWeightsNotFoundError, match="convert_pytorch_fid_weights"):
            weights.load_weights(missing)
        assert "Nothing is downloaded" in weights.fid_skip_reason(missing)
    assert weights.fid_skip_reason(path) is None
    assert issubclass(weights.FIDWeightsNotFoundError, FileNotFoundError)
    # Not the layout: refused.
    bad = dict(traverse_util.flatten_dict(params["params"], sep="/"))
    bad.pop("Mixed_5b/branch1x1/kernel")
    np.savez(tmp_path / "bad.npz", __layout__=np.array(weights.LAYOUT_VERSION), **bad)
    with pytest.raises(ValueError, match="missing"):
        weights.load_weights(tmp_path / "bad.npz")
    np.savez(tmp_path / "other.npz", w=np.zeros(3))
    with pytest.raises(ValueError, match="__layout__"):
        weights.load_weights(tmp_path / "other.npz")


# ----------------------------------------------------------------------------- vs PyTorch


def _torch_state_dict(torch, params):
    """The flat layout written back in pytorch-fid's (torchvision) naming."""
    sd = {}
    for k, v in traverse_util.flatten_dict(params["params"], sep="/").items():
        unit, field = k.rsplit("/", 1)
        prefix = unit.replace("/", ".")
        v = np.asarray(v)
        name = {
            "kernel": "conv.weight",
            "scale": "bn.weight",
            "bias": "bn.bias",
            "mean": "bn.running_mean",
            "var": "bn.running_var",
        }[field]
        sd[f"{prefix}.{name}"] = torch.from_numpy(
            np.ascontiguousarray(v.transpose(3, 2, 0, 1) if field == "kernel" else v)
        )
        if field == "var":
            sd[f"{prefix}.bn.num_batches_tracked"] = torch.tensor(0)
    sd["fc.weight"] = torch.zeros(1008, 2048)
    sd["fc.bias"] = torch.zeros(1008)
    return sd


def test_convert_pytorch_fid_state_dict(params, tmp_path):
    torch = pytest.importorskip("torch")
    sd = _torch_state_dict(torch, params)
    torch.save(sd, tmp_path / "pt_inception.pth")
    out = weights.convert_pytorch_fid_weights(tmp_path / "pt_inception.pth", tmp_path / "w.npz")
    loaded = weights.load_weights(out)
    for k, v in traverse_util.flatten_dict(params["params"], sep="/").items():
        np.testing.assert_array_equal(
            np.asarray(v), traverse_util.flatten_dict(loaded["params"], sep="/")[k]
        )
    # torchvision's ImageNet Inception (with AuxLogits) is refused with a hint.
    sd["AuxLogits.conv0.conv.weight"] = torch.zeros(128, 768, 1, 1)
    torch.save(sd, tmp_path / "tv.pth")
    with pytest.raises(ValueError, match="AuxLogits"):
        weights.convert_pytorch_fid_weights(tmp_path / "tv.pth", tmp_path / "tv.npz")
    with pytest.raises(weights.FIDWeightsNotFoundError):
        weights.convert_pytorch_fid_weights(tmp_path / "none.pth", tmp_path / "none.npz")
