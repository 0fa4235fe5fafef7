"""Minibatch-OT pairing in the input pipeline (fmjax.data.pairing): optimal against brute
force, noise tied to the global example position (any process layout, exact resume)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from test_data_images import indexed_tfds, train_iterator

from fmjax.data.pairing import DrawSource, PairBatch

B = 6  # 6! = 720 permutations: brute force


def _batches(k, pairing, process_index=0, process_count=1, source_std=2.0):
    it = train_iterator(
        global_batch_size=B,
        seed=5,
        pairing=pairing,
        source_std=source_std,
        process_index=process_index,
        process_count=process_count,
    )
    return [next(it) for _ in range(k)], it


def _cost(x0, x1):
    return float(np.sum((x0.reshape(len(x0), -1) - x1.reshape(len(x1), -1)) ** 2))


def _rows(x):
    return sorted(map(tuple, x.reshape(len(x), -1)[:, :8].round(5).tolist()))


@pytest.fixture(scope="module")
def runs():
    with indexed_tfds(18):
        # every label differs (label i), so pairing within labels keeps the noise as drawn
        drawn, _ = _batches(3, PairBatch(by_label=True))
        paired, it = _batches(3, PairBatch())
        plain, _ = _batches(3, None)
        halves = [_batches(3, PairBatch(), p, 2)[0] for p in range(2)]
        state = it.get_state()
        after = [next(it) for _ in range(2)]
        resumed_it = train_iterator(
            global_batch_size=B, seed=5, pairing=PairBatch(), source_std=2.0
        )
        resumed_it.set_state(state)
        resumed = [next(resumed_it) for _ in range(2)]
    return drawn, paired, plain, halves, after, resumed


def test_each_batch_is_paired_optimally(runs):
    drawn, paired, plain, _, _, _ = runs
    for d, p, q in zip(drawn, paired, plain, strict=True):
        # the data and labels are those of the pipeline without pairing
        np.testing.assert_array_equal(p["image"], q["image"])
        np.testing.assert_array_equal(p["label"], q["label"])
        np.testing.assert_array_equal(d["image"], q["image"])
        assert set(q) == {"image", "label"}
        # x0 is a permutation of the drawn noise, the best one of all 720
        assert _rows(p["x0"]) == _rows(d["x0"])
        best = min(_cost(d["x0"][list(s)], p["image"]) for s in itertools.permutations(range(B)))
        np.testing.assert_allclose(_cost(p["x0"], p["image"]), best, rtol=1e-6)
        assert _cost(p["x0"], p["image"]) <= _cost(d["x0"], p["image"]) + 1e-3
        assert p["x0"].dtype == np.float32 and p["x0"].shape == p["image"].shape


def test_noise_has_the_source_std_and_is_tied_to_the_example_position(runs):
    drawn, _, _, halves, _, _ = runs
    x0 = np.concatenate([d["x0"] for d in drawn])
    assert abs(x0.std() - 2.0) < 0.03 and abs(x0.mean()) < 0.03
    # two processes pair their halves of each global batch: together, the same noise rows
    for g, d in enumerate(drawn):
        both = np.concatenate([halves[0][g]["x0"], halves[1][g]["x0"]])
        assert _rows(both) == _rows(d["x0"])
        np.testing.assert_array_equal(
            np.concatenate([halves[0][g]["image"], halves[1][g]["image"]]), d["image"]
        )


def test_resume_gives_the_same_paired_batches(runs):
    _, _, _, _, after, resumed = runs
    for a, r in zip(after, resumed, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], r[key])


def test_pair_batch_errors():
    with pytest.raises(ValueError, match="solver must be one of"):
        PairBatch(solver="auction")
    with pytest.raises(ValueError, match="'x0'"):
        PairBatch()({"image": np.zeros((2, 3))})
    out = DrawSource(0.5)({"image": np.zeros((4, 4))}, np.random.default_rng(0))
    assert out["x0"].shape == (4, 4) and out["x0"].dtype == np.float32
