"""FID: the Frechet distance against scipy, the FID Inception network (randomly initialised
params in the documented npz layout), the npz round trip and the pytorch-fid conversion."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from scipy import linalg

from fmjax.metrics import fid


def random_stats(rng, d, rank=None, ridge=0.0):
    a = rng.normal(size=(d, rank or 2 * d))
    sigma = a @ a.T / a.shape[1] + ridge * np.eye(d)
    return rng.normal(size=d), sigma


def direct_fid(mu1, s1, mu2, s2):
    covmean = linalg.sqrtm(s1 @ s2)
    return float(
        np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean))
    )


# ----------------------------------------------------------------------------- distance


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_matches_scipy(method):
    rng = np.random.default_rng(0)
    mu1, s1 = random_stats(rng, 16)
    mu2, s2 = random_stats(rng, 16)
    ref = direct_fid(mu1, s1, mu2, s2)
    assert fid.frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(ref, rel=1e-9)
    # Symmetric.
    assert fid.frechet_distance(mu2, s2, mu1, s1, method=method) == pytest.approx(ref, rel=1e-9)
    # Identical statistics: 0.
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1, method=method)) < 1e-9
    # A translation of the same Gaussian: ||mu1 - mu2||^2.
    shift = rng.normal(size=16)
    assert fid.frechet_distance(mu1, s1, mu1 + shift, s1, method=method) == pytest.approx(
        float(shift @ shift), rel=1e-7, abs=1e-9
    )


def test_frechet_distance_nearly_singular():
    rng = np.random.default_rng(1)
    mu1, s1 = random_stats(rng, 24, rank=6, ridge=1e-12)  # rank 6 in 24 dims
    mu2, s2 = random_stats(rng, 24, rank=6, ridge=1e-12)
    ref = direct_fid(mu1, s1, mu2, s2)
    a = fid.frechet_distance(mu1, s1, mu2, s2)
    b = fid.frechet_distance(mu1, s1, mu2, s2, method="eigh")
    assert np.isfinite(a) and np.isfinite(b)
    assert a == pytest.approx(ref, rel=1e-5) and b == pytest.approx(ref, rel=1e-5)
    # Exactly singular (fewer samples than dimensions), like FID on a small sample.
    f1 = rng.normal(size=(5, 12))
    f2 = rng.normal(size=(5, 12)) + 0.5
    st1, st2 = fid.statistics(f1), fid.statistics(f2)
    a = fid.frechet_distance(*st1, *st2)
    b = fid.frechet_distance(*st1, *st2, method="eigh")
    assert np.isfinite(a) and a == pytest.approx(b, rel=1e-4)


def test_statistics_and_bad_input():
    f = np.random.default_rng(2).normal(size=(50, 4))
    mu, sigma = fid.statistics(f)
    np.testing.assert_allclose(mu, f.mean(0))
    np.testing.assert_allclose(sigma, np.cov(f.T))
    assert mu.dtype == np.float64
    with pytest.raises(ValueError, match="N >= 2"):
        fid.statistics(f[:1])
    with pytest.raises(ValueError, match="same D"):
        fid.frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])
    with pytest.raises(ValueError, match="method"):
        fid.frechet_distance(mu, sigma, mu, sigma, method="svd")


# ----------------------------------------------------------------------------- network


@pytest.fixture(scope="module")
def params():
    return fid.init_random_params(0)


def test_layout_matches_torchvision_inception_v3():
    shapes = fid.param_shapes()
    assert len(shapes) == 94 * 5
    # torchvision's inception_v3 has 27,161,264 parameters; without AuxLogits (3,326,696)
    # and fc (2,049,000) that leaves 21,785,568 (conv kernels + batch-norm gamma/beta).
    trainable = sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith(("/mean", "/var")))
    assert trainable == 21_785_568
    assert shapes["Conv2d_1a_3x3/kernel"] == (3, 3, 3, 32)
    assert shapes["Mixed_6b/branch7x7_2/kernel"] == (1, 7, 128, 128)
    assert shapes["Mixed_7c/branch3x3dbl_3b/kernel"] == (3, 1, 384, 384)
    assert shapes["Mixed_7c/branch_pool/var"] == (192,)


def test_inception_features_shape_at_299(params):
    x = np.random.default_rng(3).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    f = fid.inception_features(params, x)  # resized to 299x299
    assert f.shape == (2, 2048) and f.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(f))) and np.all(np.asarray(f) >= 0)  # after ReLU
    assert not np.allclose(np.asarray(f[0]), np.asarray(f[1]))
    with pytest.raises(ValueError, match="B, H, W, 3"):
        fid.inception_features(params, x[..., :1])


def test_weights_round_trip_and_errors(params, tmp_path):
    path = tmp_path / "inception_fid.npz"
    fid.save_weights(path, params)
    with np.load(path, allow_pickle=False) as z:
        assert str(z["__layout__"]) == fid.LAYOUT_VERSION
        assert {k: z[k].shape for k in z.files if k != "__layout__"} == fid.param_shapes()
        assert all(z[k].dtype == np.float32 for k in z.files if k != "__layout__")
    loaded = fid.load_weights(path)
    flat_a = traverse_util.flatten_dict(params["params"], sep="/")
    flat_b = traverse_util.flatten_dict(loaded["params"], sep="/")
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[k]), flat_b[k])
    # Missing weights: a clear error, and the reason the trainer prints as "FID skipped: ...".
    for missing in (None, tmp_path / "nope.npz"):
        with pytest.raises(fid.FIDWeightsNotFoundError, match="convert_pytorch_fid_weights"):
            fid.load_weights(missing)
        assert "Nothing is downloaded" in fid.fid_skip_reason(missing)
    assert fid.fid_skip_reason(path) is None
    assert issubclass(fid.FIDWeightsNotFoundError, FileNotFoundError)
    # Not the layout: refused.
    bad = dict(traverse_util.flatten_dict(params["params"], sep="/"))
    bad.pop("Mixed_5b/branch1x1/kernel")
    np.savez(tmp_path / "bad.npz", __layout__=np.array(fid.LAYOUT_VERSION), **bad)
    with pytest.raises(ValueError, match="missing"):
        fid.load_weights(tmp_path / "bad.npz")
    np.savez(tmp_path / "other.npz", w=np.zeros(3))
    with pytest.raises(ValueError, match="__layout__"):
        fid.load_weights(tmp_path / "other.npz")


def test_compute_fid(params, tmp_path, monkeypatch):
    # The 2048-d matrix square root takes tens of seconds on 2 CPU cores; the distance itself
    # is tested above, so here it runs on the first 8 feature dimensions (fewer than the 12
    # samples: full rank).
    real = fid.frechet_distance

    def frechet_8(mu1, s1, mu2, s2, **kw):
        assert mu1.shape == mu2.shape == (2048,) and s1.shape == s2.shape == (2048, 2048)
        return real(mu1[:8], s1[:8, :8], mu2[:8], s2[:8, :8], **kw)

    monkeypatch.setattr(fid, "frechet_distance", frechet_8)
    rng = np.random.default_rng(4)
    ref = (2 * rng.integers(0, 256, (12, 32, 32, 3)) / 256 - 1).astype(np.float32)
    calls = []

    def same(i):
        calls.append(i)
        return ref[4 * i : 4 * i + 4]

    def ref_iter():  # eval-style dict batches with a padded, masked last batch
        for s in range(0, 12, 5):
            img = ref[s : s + 5]
            mask = np.ones(5, bool)
            mask[len(img) :] = False
            img = np.concatenate([img, np.full((5 - len(img), 32, 32, 3), -1, np.float32)])
            yield {"image": img, "mask": mask}

    kw = {"feature_batch_size": 4, "resize_to": 75, "params": params}
    stats = tmp_path / "ref_stats.npz"
    d0 = fid.compute_fid(same, ref_iter(), None, 12, save_ref_stats=stats, **kw)
    assert calls == [0, 1, 2]
    assert abs(d0) < 1e-8  # the same 12 images
    noisy = fid.compute_fid(
        lambda i: np.clip(same(i) + 0.3 * rng.normal(size=(4, 32, 32, 3)), -1, 1),
        None,
        None,
        12,
        ref_stats=stats,
        **kw,
    )
    assert noisy > 1e-5  # (features of a random network are small)
    # No weights: the clear error, raised before any sample is drawn.
    calls.clear()
    with pytest.raises(fid.FIDWeightsNotFoundError):
        fid.compute_fid(same, ref_iter(), tmp_path / "missing.npz", 12)
    assert calls == []


def test_preprocess_quantizes_like_an_8bit_file():
    k = np.arange(256)
    levels = (2 * k / 256 - 1).astype(np.float32)
    np.testing.assert_allclose(fid.preprocess(levels), 2 * k / 255 - 1, atol=1e-6)
    np.testing.assert_allclose(fid.preprocess(np.array([-3.0, 3.0])), [-1.0, 1.0])


def test_preprocess_takes_integer_levels_and_warns_about_other_float_ranges():
    k = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    # 8-bit levels as integers are the image-file convention (they were clipped to ~1.0)
    np.testing.assert_array_equal(fid.preprocess(k), fid.preprocess(2 * (k / 256.0) - 1.0))
    with pytest.raises(ValueError, match=r"8-bit levels in \[0, 255\]; got values in \[0, 300\]"):
        fid.preprocess(np.array([[0, 300]], np.int32))
    for bad in (k / 255.0, k.astype(np.float32)):  # [0, 1] and [0, 255] floats
        with pytest.warns(UserWarning, match=r"expects model-space images in \[-1, 1\]"):
            fid.preprocess(bad)


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
    out = fid.convert_pytorch_fid_weights(tmp_path / "pt_inception.pth", tmp_path / "w.npz")
    loaded = fid.load_weights(out)
    for k, v in traverse_util.flatten_dict(params["params"], sep="/").items():
        np.testing.assert_array_equal(
            np.asarray(v), traverse_util.flatten_dict(loaded["params"], sep="/")[k]
        )
    # torchvision's ImageNet Inception (with AuxLogits) is refused with a hint.
    sd["AuxLogits.conv0.conv.weight"] = torch.zeros(128, 768, 1, 1)
    torch.save(sd, tmp_path / "tv.pth")
    with pytest.raises(ValueError, match="AuxLogits"):
        fid.convert_pytorch_fid_weights(tmp_path / "tv.pth", tmp_path / "tv.npz")
    with pytest.raises(fid.FIDWeightsNotFoundError):
        fid.convert_pytorch_fid_weights(tmp_path / "none.pth", tmp_path / "none.npz")


@pytest.mark.parametrize(
    "kernel,stride,padding", [((1, 7), 1, (0, 3)), ((3, 3), 2, (0, 0)), ((3, 1), 1, (1, 0))]
)
def test_conv_unit_matches_torch_conv_bn_relu(kernel, stride, padding):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 6, kernel, stride=stride, padding=padding, bias=False)
    bn = torch.nn.BatchNorm2d(6, eps=0.001)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    bn.eval()
    x = np.random.default_rng(5).normal(size=(2, 11, 13, 5)).astype(np.float32)
    with torch.no_grad():
        ref = torch.relu(bn(conv(torch.from_numpy(x).permute(0, 3, 1, 2)))).permute(0, 2, 3, 1)
    # The converter's per-unit mapping: OIHW -> HWIO, bn weight/bias/running stats.
    p = {
        "kernel": conv.weight.detach().numpy().transpose(2, 3, 1, 0),
        "scale": bn.weight.detach().numpy(),
        "bias": bn.bias.detach().numpy(),
        "mean": bn.running_mean.numpy(),
        "var": bn.running_var.numpy(),
    }
    unit = fid.BasicConv(6, kernel, strides=stride, padding=padding)
    out = unit.apply({"params": p}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(out), ref.numpy(), rtol=1e-5, atol=1e-5)


def test_pools_and_resize_match_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = np.random.default_rng(6).normal(size=(2, 9, 10, 4)).astype(np.float32)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)

    def back(t):
        return t.permute(0, 2, 3, 1).numpy()

    np.testing.assert_allclose(
        np.asarray(fid._avg_pool_valid(jnp.asarray(x))),
        back(F.avg_pool2d(xt, 3, stride=1, padding=1, count_include_pad=False)),
        rtol=1e-6,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        np.asarray(fid._max_pool_same(jnp.asarray(x))),
        back(F.max_pool2d(xt, 3, stride=1, padding=1)),
    )
    np.testing.assert_allclose(
        np.asarray(fid._max_pool_down(jnp.asarray(x))), back(F.max_pool2d(xt, 3, stride=2))
    )
    img = np.random.default_rng(7).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    ref = F.interpolate(
        torch.from_numpy(img).permute(0, 3, 1, 2),
        size=(299, 299),
        mode="bilinear",
        align_corners=False,
    )
    np.testing.assert_allclose(
        np.asarray(fid.resize_bilinear(jnp.asarray(img), 299)), back(ref), rtol=1e-5, atol=1e-5
    )


def test_no_torch_needed_to_import(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from fmjax.metrics import fid\n"
        "assert 'torch' not in sys.modules and fid.fid_skip_reason(None)\n"
        "try:\n"
        "    fid.convert_pytorch_fid_weights('a.pth', 'b.npz')\n"
        "except ImportError as e:\n"
        "    assert 'needs PyTorch' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no ImportError')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
