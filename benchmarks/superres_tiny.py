"""The super-resolution tiny preset on real photo crops, against the bicubic baseline.

Makes a small dataset in the official downsampled-ImageNet npz layout from the photograph
that matplotlib ships (``grace_hopper.jpg``, 600 x 512; train crops from its left 70 %,
validation crops from its right 30 %, so no validation pixel is trained on), then runs
``python -m experiments.superres --config=experiments/configs/superres.py:tiny`` on it and
saves ``eval_metrics.json``'s numbers to ``benchmarks/results/superres_tiny.json``::

    python benchmarks/superres_tiny.py [--workdir=/tmp/superres_tiny] [--steps=300]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import matplotlib.cbook
import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def photo_crops(n_train: int, n_val: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """32 x 32 crops of the photo at half size, ``(N, 3072)`` uint8 channel-major."""
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        img = Image.open(f).convert("RGB")
    img = np.asarray(img.resize((img.width // 2, img.height // 2), Image.Resampling.BOX))
    h, w, _ = img.shape
    split = int(0.7 * w)
    rng = np.random.default_rng(seed)

    def crops(n, x_lo, x_hi):
        ys = rng.integers(0, h - 32 + 1, n)
        xs = rng.integers(x_lo, x_hi - 32 + 1, n)
        out = np.stack([img[y : y + 32, x : x + 32] for y, x in zip(ys, xs, strict=True)])
        return out.transpose(0, 3, 1, 2).reshape(n, 3072)  # channel-major rows

    return crops(n_train, 0, split), crops(n_val, split, w)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/superres_tiny")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/superres_tiny.json"))
    args = p.parse_args()
    data = os.path.join(args.workdir, "data")
    os.makedirs(data, exist_ok=True)
    train, val = photo_crops(2048, 64)
    for name, rows in (("train_data_batch_1", train), ("val_data", val)):
        np.savez(os.path.join(data, name + ".npz"), data=rows, labels=np.ones(len(rows), int))
    run = os.path.join(args.workdir, "run")
    cmd = [
        sys.executable,
        "-m",
        "experiments.superres",
        "--config=experiments/configs/superres.py:tiny",
        f"--workdir={run}",
        "--config.data.source=imagenet32_npz",
        f"--config.data.data_dir={data}",
        f"--config.train.num_steps={args.steps}",
        "--config.train.progress=False",
        "--config.eval.global_batch_size=64",
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    with open(os.path.join(run, "eval_metrics.json")) as f:
        m = json.load(f)
    with open(os.path.join(run, "train_summary.json")) as f:
        t = json.load(f)
    r = m["results"]
    record = {
        "command": " ".join(cmd[1:]),
        "data": "grace_hopper.jpg (matplotlib) at half size: 2048 train / 64 val 32x32 crops",
        "superres": m["superres"],
        "num_images": m["num_images"],
        "psnr": r["psnr"]["value"],
        "ssim": r["ssim"]["value"],
        "bicubic_psnr": r["baseline"]["psnr"],
        "bicubic_ssim": r["baseline"]["ssim"],
        "nfe": r["nfe"]["value"],
        "solver": {k: r["nfe"][k] for k in ("solver", "rtol", "atol")},
        "train_steps": t["end_step"],
        "final_loss": t["final_loss"],
        "train_seconds": t["train_seconds"],
        "eval_seconds": m["eval_seconds"],
        "wall_seconds": time.perf_counter() - t0,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
