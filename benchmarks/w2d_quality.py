"""The quality row of the W2D benchmark: each framework trains its own model, then the
held-out NLL (exact divergence, dopri5) and an MMD^2 between its samples and fresh data.

The MMD^2 (:func:`mmd2_unbiased`) is computed by the same jax code for every framework.
"""

from __future__ import annotations

import functools
import math
import time

import numpy as np
from w2d_workload import SEED, checkerboard_entropy, checkerboard_np, to_numpy

MMD_BANDWIDTHS = (0.25, 0.5, 1.0, 2.0)  # RBF sigmas, in data units (cells are 2.22 wide)

_MMD_FN = {}


def mmd2_unbiased(x, y, bandwidths=MMD_BANDWIDTHS, block=1000, chunk=512):
    """Unbiased MMD^2 with k = sum_s exp(-|a-b|^2 / (2 s^2)); numpy in, float out.

    A jitted jax function returns float32 partial sums over ``chunk`` kernel entries each;
    they are added up in float64 on the host (one float32 sum over the 4e8 pairs of 20k x 20k
    would bias MMD^2 by ~1e-4).  Inputs are padded with far-away points (kernel exactly 0).
    """
    import jax
    import jax.numpy as jnp

    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.float32)
    inv = jnp.asarray([1.0 / (2.0 * s * s) for s in bandwidths], jnp.float32)

    if "f" not in _MMD_FN:

        @jax.jit
        def partial_sums(a_blocks, b_chunks, inv):
            def one(a):  # a: (block, 2) -> (num_chunks, block, num_bandwidths)
                d2 = (a[None, :, None, 0] - b_chunks[:, None, :, 0]) ** 2 + (
                    a[None, :, None, 1] - b_chunks[:, None, :, 1]
                ) ** 2
                return jnp.stack([jnp.sum(jnp.exp(-d2 * w), axis=2) for w in inv], -1)

            return jax.lax.map(one, a_blocks)

        _MMD_FN["f"] = partial_sums
    f = _MMD_FN["f"]

    def pad(z, multiple, value):
        n = -(-z.shape[0] // multiple) * multiple
        return np.concatenate([z, np.full((n - z.shape[0], 2), value, np.float32)])

    def total(a, b):
        a = pad(a, block, 1e4).reshape(-1, block, 2)
        b = pad(b, chunk, -1e4).reshape(-1, chunk, 2)
        return np.asarray(f(a, b, inv), np.float64).sum()

    n, m = x.shape[0], y.shape[0]
    nk = len(bandwidths)
    kxx = (total(x, x) - n * nk) / (n * (n - 1))  # the diagonal k(x_i, x_i) = 1 per bandwidth
    kyy = (total(y, y) - m * nk) / (m * (m - 1))
    kxy = total(x, y) / (n * m)
    return float(kxx + kyy - 2.0 * kxy)


def run_quality(runner):
    """The quality row on ``runner`` (a ``w2d_runner.Runner``): a reference line (the true
    entropy, the MMD^2 of two data sets), a line per framework and training seed, and with
    several seeds their mean and standard deviation."""
    c = runner.cfg
    held_out = checkerboard_np(np.random.default_rng(SEED + 5), c["quality_nll_n"])
    data_a = checkerboard_np(np.random.default_rng(SEED + 6), c["quality_mmd_n"])
    data_b = checkerboard_np(np.random.default_rng(SEED + 8), c["quality_mmd_n"])
    x0 = np.random.default_rng(SEED + 9).standard_normal((c["quality_mmd_n"], 2))
    x0 = x0.astype(np.float32)
    t0 = time.perf_counter()
    floor = mmd2_unbiased(data_b, data_a)
    mmd_s = time.perf_counter() - t0
    runner.record(
        row="quality",
        case="reference: data vs data",
        framework="-",
        unit="",
        mmd2=floor,
        mmd_s=mmd_s,
        nll=checkerboard_entropy(),
        note="true entropy and the MMD^2 of two independent data sets",
    )
    evaluate = functools.partial(evaluate_model, runner, held_out, data_a, x0)
    n_seeds = c["quality_seeds"]
    case = f"after {c['quality_steps']} steps"
    for fw in runner.frameworks:
        per_seed = []

        def go(fw=fw, seed_i=0, per_seed=per_seed):
            rec = evaluate(fw, seed_i)
            per_seed.append(rec)
            label = case if n_seeds == 1 else f"{case}, training seed {seed_i}"
            runner.record(row="quality", case=label, framework=fw, unit="", **rec)

        for i in range(n_seeds):
            runner.guarded("quality", case, fw, functools.partial(go, seed_i=i))
        if n_seeds > 1 and per_seed:
            runner.record(
                row="quality",
                case=f"{case}, mean of {len(per_seed)} training seeds",
                framework=fw,
                unit="",
                **seed_summary(per_seed),
            )


def evaluate_model(runner, held_out, data_a, x0, fw, seed_i):
    """Trains ``fw``'s model with training seed ``seed_i``; its NLL, MMD^2 and timings."""
    c, tol = runner.cfg, runner.cfg["tol"]
    side = runner.side(fw, "W2D")
    # seed_i = 0 is the seed of every earlier single-seed run
    params, tr = side.train(c["train_batch"], c["quality_steps"], seed=SEED + 11 + 100 * seed_i)
    runner.quality_models.setdefault(fw, params)
    t1 = time.perf_counter()
    logp, nfe_l = side.log_likelihood(params, held_out, "exact", "dopri5", tol=tol)
    nll_s = time.perf_counter() - t1
    t1 = time.perf_counter()
    xs, nfe_s = side.sample(params, x0, "dopri5", tol=tol)
    sample_s = time.perf_counter() - t1
    logp, xs = to_numpy(logp), to_numpy(xs)
    return dict(
        nll=float(-np.mean(logp)),
        nll_sem=float(np.std(logp) / math.sqrt(len(logp))),
        nll_nfe=nfe_l,
        nll_s=nll_s,
        mmd2=mmd2_unbiased(xs, data_a),
        sample_nfe=nfe_s,
        sample_s=sample_s,
        **tr,
    )


def seed_summary(per_seed):
    """Mean and sample standard deviation over the training seeds' records."""
    nll = np.array([r["nll"] for r in per_seed])
    mmd = np.array([r["mmd2"] for r in per_seed])
    return dict(
        nll=float(nll.mean()),
        nll_seed_sd=float(nll.std(ddof=1)) if len(nll) > 1 else None,
        mmd2=float(mmd.mean()),
        mmd2_seed_sd=float(mmd.std(ddof=1)) if len(mmd) > 1 else None,
        nll_nfe=float(np.mean([r["nll_nfe"] for r in per_seed])),
        sample_nfe=float(np.mean([r["sample_nfe"] for r in per_seed])),
        note="+- between seeds is the sample standard deviation",
    )
