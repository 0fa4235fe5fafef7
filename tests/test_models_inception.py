"""The FID Inception network (fmjax.models.inception) with randomly initialised params: the
features' shape, the whole network against pytorch-fid's (a stored reference), and its conv
units, pools and resize against PyTorch."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT

from fmjax.metrics.fid import preprocess
from fmjax.models import inception
from fmjax.models.inception_weights import init_random_params


@pytest.fixture(scope="module")
def params():
    return init_random_params(0)


def test_inception_features_shape_at_299(params):
    x = np.random.default_rng(3).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    f = inception.inception_features(params, x)  # resized to 299x299
    assert f.shape == (2, 2048) and f.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(f))) and np.all(np.asarray(f) >= 0)  # after ReLU
    assert not np.allclose(np.asarray(f[0]), np.asarray(f[1]))
    with pytest.raises(ValueError, match="B, H, W, 3"):
        inception.inception_features(params, x[..., :1])


def test_features_match_pytorch_fids_network(params):
    # benchmarks/fid_parity.py --reference: pytorch-fid's own InceptionV3 (its resize of
    # [0, 1] inputs to 299 and scaling to [-1, 1]) with these params in its layout, on two
    # 8-bit images; fmjax reads them as a PNG's levels (the shape compiled above)
    with np.load(os.path.join(ROOT, "benchmarks", "results", "fid_parity_reference.npz")) as z:
        levels, ref = z["images"], z["features"]
    f = np.asarray(inception.inception_features(params, preprocess(levels)))
    assert levels.shape == (2, 32, 32, 3) and f.shape == ref.shape == (2, 2048)
    err = np.abs(f - ref).max()
    assert err <= 1e-5 * np.abs(ref).max(), err  # float32 round-off through 94 units
    assert np.abs(ref[0] - ref[1]).max() > 100 * err  # the images' features differ


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
    unit = inception.BasicConv(6, kernel, strides=stride, padding=padding)
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
        np.asarray(inception._avg_pool_valid(jnp.asarray(x))),
        back(F.avg_pool2d(xt, 3, stride=1, padding=1, count_include_pad=False)),
        rtol=1e-6,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        np.asarray(inception._max_pool_same(jnp.asarray(x))),
        back(F.max_pool2d(xt, 3, stride=1, padding=1)),
    )
    np.testing.assert_allclose(
        np.asarray(inception._max_pool_down(jnp.asarray(x))), back(F.max_pool2d(xt, 3, stride=2))
    )
    img = np.random.default_rng(7).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    ref = F.interpolate(
        torch.from_numpy(img).permute(0, 3, 1, 2),
        size=(299, 299),
        mode="bilinear",
        align_corners=False,
    )
    np.testing.assert_allclose(
        np.asarray(inception.resize_bilinear(jnp.asarray(img), 299)),
        back(ref),
        rtol=1e-5,
        atol=1e-5,
    )
