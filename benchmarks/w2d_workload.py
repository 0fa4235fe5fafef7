"""The W2D workload: model sizes, run sizes, the checkerboard data and the shared weights.

Common to every framework side of ``w2d.py`` (and to ``adaptive_stepping.py`` and
``w2d_small_steps.py``). A weight set is a list of ``(kernel (in, out), bias (out,))``
numpy float32 pairs, in layer order; :func:`save_layers` / :func:`load_layers` keep one in an
``.npz`` file with ``kernel_i`` and ``bias_i`` arrays.
"""

from __future__ import annotations

import math
import os

import numpy as np

SEED = 0
CHECKERBOARD_SCALE = 0.45

W2D = {"hidden": 512, "depth": 4, "activation": "silu"}
W2D_SMALL = {"hidden": 64, "depth": 3, "activation": "selu"}
SPECS = {"W2D": W2D, "W2D-small": W2D_SMALL}

FULL = {
    "train_batch": 4096,
    "train_steps": 20,  # timed steps per repeat
    "sample_n": 50_000,
    "lik_n": 10_000,
    "step_size": 0.05,
    "tol": 1e-5,
    "quality_steps": 3000,
    "quality_nll_n": 20_000,
    "quality_mmd_n": 20_000,
    "weights_steps": 3000,  # shared W2D weights when not loaded / reused
    "small_batch": 256,
    "small_train_steps": 200,
    "small_weights_steps": 3000,
    "small_sample_n": 1000,
    "small_euler_steps": 100,
    "small_lik_n": 1000,
    "matmul_n": 4096,
    "matmul_repeats": 5,
    "torch_warm_n": 256,
}
QUICK = {
    "train_batch": 256,
    "train_steps": 3,
    "sample_n": 1000,
    "lik_n": 200,
    "step_size": 0.05,
    "tol": 1e-5,
    "quality_steps": 30,
    "quality_nll_n": 500,
    "quality_mmd_n": 500,
    "weights_steps": 30,
    "small_batch": 256,
    "small_train_steps": 20,
    "small_weights_steps": 100,
    "small_sample_n": 100,
    "small_euler_steps": 100,
    "small_lik_n": 100,
    "matmul_n": 1024,
    "matmul_repeats": 3,
    "torch_warm_n": 16,
}


def checkerboard_np(rng, n):
    """The checkerboard, in numpy, for the evaluation sets shared by all frameworks."""
    x1 = rng.random(n, dtype=np.float32) * 4.0 - 2.0
    u = rng.random(n, dtype=np.float32)
    b = rng.integers(0, 2, n).astype(np.float32)
    x2 = u - 2.0 * b + np.mod(np.floor(x1), 2.0)
    return (np.stack([x1, x2], axis=1) / CHECKERBOARD_SCALE).astype(np.float32)


def checkerboard_entropy():
    # density 1/8 per unit cell on 8 cells of a 4x4 board, scaled by 1/0.45 in each dim:
    # p = (1/8) * 0.45^2 on the support, entropy = log(8 / 0.45^2)
    return math.log(8.0 / CHECKERBOARD_SCALE**2)


def num_params(hidden, depth, d=2):
    n = (d + 1) * hidden + hidden
    n += (depth - 1) * (hidden * hidden + hidden)
    n += hidden * d + d
    return n


def train_flop_per_step(hidden, depth, batch):
    return 3 * 2 * num_params(hidden, depth) * batch


def to_numpy(x):
    """A torch tensor or a jax / numpy array as a numpy array."""
    return np.asarray(x.detach().numpy() if hasattr(x, "detach") else x)


# ----------------------------------------------------------------------------- weights


def save_layers(path, layers):
    arrays = {}
    for i, (k, b) in enumerate(layers):
        arrays[f"kernel_{i}"] = k
        arrays[f"bias_{i}"] = b
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, **arrays)


def load_layers(path):
    with np.load(path) as z:
        n = len([k for k in z.files if k.startswith("kernel_")])
        return [
            (z[f"kernel_{i}"].astype(np.float32), z[f"bias_{i}"].astype(np.float32))
            for i in range(n)
        ]


def check_layers(layers, hidden, depth):
    shapes = [k.shape for k, _ in layers]
    want = [(3, hidden)] + [(hidden, hidden)] * (depth - 1) + [(hidden, 2)]
    if shapes != want:
        raise ValueError(f"weights have kernel shapes {shapes}; the model needs {want}")
