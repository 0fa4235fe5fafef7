"""Tests for the ADM UNet (fmjax.models.unet). Fast: one real init, a few small compiles."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.models.unet import UNet
from fmjax.models.unet_presets import cifar10_paper, count_params, imagenet32_paper, tiny

B, H, W, C = 2, 32, 32, 3
NUM_CLASSES = 5


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _inputs(b=B, h=H, w=W, c=C, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(b, h, w, c)), jnp.float32)
    t = jnp.asarray(rng.uniform(size=(b,)), jnp.float32)
    return t, x


def _random_params(module, x, y=None, seed=0):
    """Params with every leaf re-randomised (no zero init left), without compiling init.

    Shapes come from ``jax.eval_shape``; values are LeCun-scaled normals for kernels and
    tables and N(0, 0.1^2) for biases / norm scales, drawn with numpy.
    """
    shapes = jax.eval_shape(
        lambda k: module.init(k, jnp.zeros((x.shape[0],)), x, y), jax.random.key(0)
    )
    rng = np.random.default_rng(seed)

    def draw(s):
        std = 1.0 / math.sqrt(math.prod(s.shape[:-1])) if len(s.shape) >= 2 else 0.1
        return jnp.asarray(rng.normal(size=s.shape) * std, s.dtype)

    return jax.tree_util.tree_map(draw, shapes)


def _compile(fn, *args):
    """``jax.jit(fn)`` compiled for ``args`` with cheap XLA:CPU compile options.

    The test graphs are tiny, so compile time dominates; skipping LLVM's expensive passes
    cuts it by ~2-3x on CPU. Falls back to a plain jit if the options are not understood.
    """
    lowered = jax.jit(fn).lower(*args)
    try:
        compiled = lowered.compile(compiler_options={"xla_llvm_disable_expensive_passes": True})
    except (jax.errors.JaxRuntimeError, TypeError, ValueError):  # pragma: no cover
        compiled = lowered.compile()
    return compiled


def _run(fn, *args):
    return _compile(fn, *args)(*args)


# --- independent parameter count from per-layer formulas (mirrors ADM's UNetModel) ----


def _conv(k, cin, cout):
    return k * k * cin * cout + cout


def _dense(cin, cout):
    return cin * cout + cout


def _gn(c):
    return 2 * c


def _resblock(cin, cout, emb, scale_shift=True):
    return (
        _gn(cin)
        + _conv(3, cin, cout)
        + _dense(emb, 2 * cout if scale_shift else cout)
        + _gn(cout)
        + _conv(3, cout, cout)
        + (_conv(1, cin, cout) if cin != cout else 0)
    )


def _attn(c):
    return _gn(c) + _dense(c, 3 * c) + _dense(c, c)


def adm_param_count(
    ch,
    ch_mult,
    num_res_blocks,
    attn_resolutions,
    image_size=32,
    in_ch=3,
    out_ch=None,
    num_classes=None,
    resblock_updown=True,
    scale_shift=True,
):
    out_ch = in_ch if out_ch is None else out_ch
    emb = 4 * ch
    total = _dense(ch, emb) + _dense(emb, emb)
    if num_classes is not None:
        total += (num_classes + 1) * emb
    c = ch * ch_mult[0]
    total += _conv(3, in_ch, c)
    skips = [c]
    res = image_size
    last = len(ch_mult) - 1
    for level, mult in enumerate(ch_mult):
        for _ in range(num_res_blocks):
            total += _resblock(c, ch * mult, emb, scale_shift)
            c = ch * mult
            if res in attn_resolutions:
                total += _attn(c)
            skips.append(c)
        if level != last:
            total += _resblock(c, c, emb, scale_shift) if resblock_updown else _conv(3, c, c)
            skips.append(c)
            res //= 2
    total += 2 * _resblock(c, c, emb, scale_shift) + _attn(c)
    for level, mult in reversed(list(enumerate(ch_mult))):
        for _ in range(num_res_blocks + 1):
            total += _resblock(c + skips.pop(), ch * mult, emb, scale_shift)
            c = ch * mult
            if res in attn_resolutions:
                total += _attn(c)
        if level != 0:
            total += _resblock(c, c, emb, scale_shift) if resblock_updown else _conv(3, c, c)
            res *= 2
    assert not skips
    return total + _gn(c) + _conv(3, c, out_ch)


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_init():
    """A real init of the tiny preset (with its output); the only real init in this file."""
    model = tiny()
    t, x = _inputs()
    out, params = _run(model.init_with_output, jax.random.key(0, impl="rbg"), t, x)
    return model, params, out


# A one-level model (cheap to compile) for the behavioural tests: t, y, null class, dropout.
_MICRO = {"ch": 16, "ch_mult": (1,), "num_res_blocks": 1, "attn_resolutions": (8,)}
_MICRO["num_head_channels"] = 8

# Class-conditional micro model with dropout and fully random params. One batch of 8 rows
# exercises t, y and the null class at once (rows are independent: GroupNorm is per sample).
#   row: 0     1     2     3     4     5     6     7
#   x:   x0    x1    x0    x1    x0    x1    x0    x1
#   t:   .1    .1    .9    .9    .1    .1    .1    .1
#   y:   0     3     0     3     2     K     K     1
_T = [0.1, 0.1, 0.9, 0.9, 0.1, 0.1, 0.1, 0.1]
_Y = [0, 3, 0, 3, 2, NUM_CLASSES, NUM_CLASSES, 1]


@pytest.fixture(scope="module")
def cond_run():
    model = UNet(**_MICRO, num_classes=NUM_CLASSES, dropout=0.2)
    _, x2 = _inputs(h=8, w=8)
    x = jnp.concatenate([x2] * 4)
    t, y = jnp.asarray(_T, jnp.float32), jnp.asarray(_Y, jnp.int32)
    params = _random_params(model, x, y, seed=1)

    def run(train, key):
        return model.apply(params, t, x, y, train=train, rngs={"dropout": key})

    key_1, key_2 = jax.random.key(1, impl="rbg"), jax.random.key(2, impl="rbg")
    ev = _compile(lambda k: run(False, k), key_1)
    tr = _compile(lambda k: run(True, k), key_1)
    outs = {
        "eval_1": ev(key_1),
        "eval_2": ev(key_2),
        "train_1": tr(key_1),
        "train_2": tr(key_2),
        # Scalar t = 0.1 and y=None (= null class) for (x0, x1): same as rows 6 and 5.
        "implicit": _run(lambda p: model.apply(p, jnp.float32(0.1), x2), params),
    }
    return model, params, {k: np.asarray(v) for k, v in outs.items()}


def _differs(a, b, rel=1e-3):
    return np.abs(a - b).max() > rel * np.abs(a).max()


# --------------------------------------------------------------------------------------
# Shapes, dtypes, initialisation
# --------------------------------------------------------------------------------------


def test_tiny_shape_dtype_and_zero_init(tiny_init):
    _, params, out = tiny_init
    chex.assert_shape(out, (B, H, W, C))
    chex.assert_type(out, jnp.float32)
    # ADM zero-initialises the output conv: a fresh model is exactly the zero field.
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    assert not np.any(np.asarray(params["params"]["conv_out"]["kernel"]))
    # ... but not everything is zero (the network is not degenerate).
    assert np.any(np.asarray(params["params"]["conv_in"]["kernel"]))
    for leaf in jax.tree_util.tree_leaves(params):
        chex.assert_type(leaf, jnp.float32)


def test_bf16_compute_fp32_params_and_output(tiny_init):
    _, params_fp32, _ = tiny_init
    model = tiny(dtype=jnp.bfloat16)
    t, x = _inputs()
    shapes = jax.eval_shape(model.init, jax.random.key(0), t, x)
    # fp32 params, same structure as with fp32 compute.
    chex.assert_trees_all_equal_shapes_and_dtypes(shapes, params_fp32)
    out = jax.eval_shape(model.apply, shapes, t, x)
    assert out.shape == (B, H, W, C) and out.dtype == jnp.float32
    # The bulk of the computation really is bf16.
    hlo = jax.jit(model.apply).lower(shapes, t, x).as_text()
    assert "bf16" in hlo


def test_bf16_forward_runs_and_is_close_to_fp32():
    """Numerics of bf16 compute on a one-level model (cheap to compile)."""
    m32, m16 = UNet(**_MICRO), UNet(**_MICRO, dtype=jnp.bfloat16)
    t, x = _inputs(h=8, w=8)
    params = _random_params(m32, x, seed=3)
    o32, o16 = _run(lambda p: (m32.apply(p, t, x), m16.apply(p, t, x)), params)
    chex.assert_type(o16, jnp.float32)
    chex.assert_tree_all_finite(o16)
    o32, o16 = np.asarray(o32), np.asarray(o16)
    assert np.abs(o32 - o16).max() < 0.1 * np.abs(o32).max()


def test_out_channels_override():
    model = tiny(out_channels=6)
    _, x = _inputs()
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((B,)), x)
    assert shapes["params"]["conv_out"]["kernel"].shape == (3, 3, 32, 6)
    out = jax.eval_shape(model.apply, shapes, jnp.zeros((B,)), x)
    assert out.shape == (B, H, W, 6) and out.dtype == jnp.float32


# --------------------------------------------------------------------------------------
# Conditioning on t and y, dropout
# --------------------------------------------------------------------------------------


def test_output_depends_on_t(cond_run):
    out = cond_run[2]["eval_1"]
    assert np.all(np.isfinite(out)) and np.abs(out).max() > 0
    assert _differs(out[0], out[2]) and _differs(out[1], out[3])  # t = .1 vs .9


def test_output_depends_on_class_label_and_null_class(cond_run):
    _, params, outs = cond_run
    out = outs["eval_1"]
    assert _differs(out[0], out[4]) and _differs(out[1], out[7])  # y = 0 vs 2, 3 vs 1
    assert _differs(out[0], out[6]) and _differs(out[1], out[5])  # y = 0 vs null, 3 vs null
    assert params["params"]["label_emb"]["embedding"].shape == (NUM_CLASSES + 1, 4 * 16)


def test_dropout_only_in_train_mode(cond_run):
    outs = cond_run[2]
    np.testing.assert_array_equal(outs["eval_1"], outs["eval_2"])  # rng ignored in eval
    assert np.abs(outs["train_1"] - outs["train_2"]).max() > 1e-4
    assert np.abs(outs["train_1"] - outs["eval_1"]).max() > 1e-4


def test_scalar_t_broadcasts_and_y_none_is_null_class(cond_run):
    outs = cond_run[2]
    assert np.abs(outs["implicit"]).max() > 0
    np.testing.assert_allclose(outs["implicit"], outs["eval_1"][[6, 5]], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# Parameter counts
# --------------------------------------------------------------------------------------


def test_tiny_param_count_by_hand():
    """Itemised by hand for tiny(): ch=32, ch_mult=(1, 2), 1 res block, attention at 16."""
    emb = 128
    by_hand = {
        "time_embed_0": 32 * emb + emb,
        "time_embed_1": emb * emb + emb,
        "conv_in": 3 * 3 * 3 * 32 + 32,
        # resblock cin->cout: GN(cin) + conv3(cin,cout) + dense(emb, 2 cout) + GN(cout)
        #                     + conv3(cout,cout) [+ 1x1 skip conv if cin != cout]
        "down_0_res_0": 64 + 9248 + 8256 + 64 + 9248,  # 32 -> 32
        "down_0_downsample": 26880,  # resblock 32 -> 32
        "down_1_res_0": 64 + 18496 + 16512 + 128 + 36928 + 2112,  # 32 -> 64
        "down_1_attn_0": 128 + 12480 + 4160,  # GN(64) + qkv + proj_out
        "mid_res_0": 128 + 36928 + 16512 + 128 + 36928,  # 64 -> 64
        "mid_attn": 16768,
        "mid_res_1": 90624,
        "up_1_res_0": 256 + 73792 + 16512 + 128 + 36928 + 8256,  # 64 + 64 (skip) -> 64
        "up_1_attn_0": 16768,
        "up_1_res_1": 192 + 55360 + 16512 + 128 + 36928 + 6208,  # 64 + 32 -> 64
        "up_1_attn_1": 16768,
        "up_1_upsample": 90624,  # resblock 64 -> 64
        "up_0_res_0": 192 + 27680 + 8256 + 64 + 9248 + 3104,  # 64 + 32 -> 32
        "up_0_res_1": 128 + 18464 + 8256 + 64 + 9248 + 2080,  # 32 + 32 -> 32
        "out_norm": 2 * 32,
        "conv_out": 3 * 3 * 32 * 3 + 3,
    }
    shapes = jax.eval_shape(
        tiny().init, jax.random.key(0), jnp.zeros((1,)), jnp.zeros((1, H, W, C))
    )
    per_module = {
        name: sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(sub))
        for name, sub in shapes["params"].items()
    }
    assert per_module == by_hand
    assert sum(by_hand.values()) == 827_491
    assert count_params(tiny()) == 827_491
    assert adm_param_count(32, (1, 2), 1, (16,)) == 827_491


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": NUM_CLASSES},
        {"resblock_updown": False, "use_scale_shift_norm": False, "out_channels": 4},
        {"ch_mult": (1, 2, 2), "num_res_blocks": 2, "attn_resolutions": (16, 8)},
    ],
)
def test_tiny_variants_param_count_formula(kwargs):
    model = tiny(**kwargs)
    expected = adm_param_count(
        32,
        model.ch_mult,
        model.num_res_blocks,
        model.attn_resolutions,
        out_ch=model.out_channels,
        num_classes=model.num_classes,
        resblock_updown=model.resblock_updown,
        scale_shift=model.use_scale_shift_norm,
    )
    assert count_params(model, with_labels=model.num_classes is not None) == expected


def test_paper_preset_param_counts():
    n_in32 = count_params(imagenet32_paper())
    n_in32_cond = count_params(imagenet32_paper(num_classes=1000), with_labels=True)
    n_cifar = count_params(cifar10_paper())
    print(f"\nimagenet32_paper: {n_in32:,} params ({n_in32 / 1e6:.2f}M)")
    print(f"imagenet32_paper(num_classes=1000): {n_in32_cond:,} params")
    print(f"cifar10_paper: {n_cifar:,} params ({n_cifar / 1e6:.2f}M)")
    assert 200e6 < n_in32 < 350e6
    assert n_in32 == adm_param_count(256, (1, 2, 2, 2), 3, (16, 8))
    assert n_in32_cond == n_in32 + 1001 * 1024
    assert n_cifar == adm_param_count(256, (1, 2, 2, 2), 2, (16,))


def test_adm_imagenet64_matches_published_count():
    """External anchor: ADM's class-conditional ImageNet-64 model has 295.90M parameters
    (as tabulated in Karras et al. 2022, EDM). Config: ch=192, ch_mult=(1, 2, 3, 4), 3 res
    blocks, attention at 32/16/8, 64 channels per head, 1000 classes, learned sigma (6 output
    channels). Our table has one extra (null-class) row of 4 * 192 entries."""
    model = UNet(
        ch=192,
        ch_mult=(1, 2, 3, 4),
        num_res_blocks=3,
        attn_resolutions=(32, 16, 8),
        num_head_channels=64,
        num_classes=1000,
        out_channels=6,
    )
    n = count_params(model, (1, 64, 64, 3), with_labels=True) - 4 * 192
    assert round(n / 1e6, 2) == 295.90, n


# --------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------


def test_bad_inputs_raise(tiny_init):
    model, params, _ = tiny_init
    t, x = _inputs()
    with pytest.raises(ValueError, match="rank 4"):
        model.apply(params, t, x[0])
    with pytest.raises(ValueError, match="divisible by 2"):
        model.apply(params, t, x[:, :31])
    with pytest.raises(ValueError, match="divisible by 8"):
        cifar10_paper().init(jax.random.key(0), t, x[:, :20, :20])
    with pytest.raises(ValueError, match="num_classes"):
        model.apply(params, t, x, jnp.array([0, 1]))
    with pytest.raises(ValueError, match="3 channels"):
        model.apply(params, t, x[..., :1])
    with pytest.raises(ValueError, match="t must be"):
        model.apply(params, jnp.zeros((3,)), x)
    cond = tiny(num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="y must have shape"):
        cond.init(jax.random.key(0), t, x, jnp.array([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        cond.init(jax.random.key(0), t, x, jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="num_classes"):
        count_params(tiny(), with_labels=True)


def test_attention_placement_cannot_silently_change_with_the_input_size():
    # attn_resolutions are read off the input: an entry that never occurs, or params made at
    # another size (attention at other blocks), ran without error and without attention
    t16, x16 = _inputs(h=16, w=16)
    t32, x32 = _inputs(h=32, w=32)
    with pytest.raises(ValueError, match=r"\[16\] never occur for an input of height 28"):
        jax.eval_shape(lambda: tiny().init(jax.random.key(0), t32, x32[:, :28, :28]))
    model = UNet(
        ch=16, ch_mult=(1, 1, 1), num_res_blocks=1, attn_resolutions=(8,), num_head_channels=8
    )
    params = _random_params(model, x16)
    assert {k for k in params["params"] if "_attn_" in k} == {
        "down_1_attn_0",
        "up_1_attn_0",
        "up_1_attn_1",
    }
    jax.eval_shape(lambda p: model.apply(p, t16, x16), params)  # its own size: fine
    with pytest.raises(ValueError, match="initialised at another input size"):
        jax.eval_shape(lambda p: model.apply(p, t32, x32), params)  # attention at level 2


def test_labels_outside_the_table_give_nan_negative_ones_included():
    # -1 once read the null class (K) and -2 class K - 1: a silently other conditioning
    model = UNet(**_MICRO, num_classes=NUM_CLASSES)
    _, x = _inputs(b=4, h=8, w=8)
    y = jnp.array([-1, -2, NUM_CLASSES, 0], jnp.int32)
    params = _random_params(model, x, y, seed=3)
    out = np.asarray(_run(lambda p: model.apply(p, jnp.full((4,), 0.5), x, y), params))
    assert np.isnan(out[:2]).all() and np.isfinite(out[2:]).all()
