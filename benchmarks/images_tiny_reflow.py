"""Reflow rounds of the tiny image model on real photo crops: straightness and few-step error.

Makes (if missing) the photo-crop dataset of ``benchmarks/superres_tiny.py`` in the official
npz layout, trains (if missing) the base tiny UNet with flow matching, then ``--rounds``
reflow rounds (``--config.reflow.teacher_workdir`` = the previous round), each on
``--pairs`` pairs for ``--steps`` steps from the teacher's weights, and measures every
model with ``--config.mode=sweep`` (straightness, transport cost and the Euler ODE error
against dopri5 from the same 64 noise draws). A step already done (a checkpoint, a sweep
file) is not redone, so an interrupted study resumes. Writes
``benchmarks/results/images_tiny_reflow.json``::

    python benchmarks/images_tiny_reflow.py [--workdir=/tmp/images_reflow] [--rounds=2]
        [--pairs=512] [--steps=100] [--base=DIR] [--data=DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from superres_tiny import photo_crops  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = [
    "--config.mode=sweep",
    "--config.eval.sweep_samples=64",
    "--config.eval.sweep_solvers=('euler',)",
    "--config.eval.sweep_steps=(1,2,4,8,16)",
    "--config.eval.sweep_tols=(0.01,)",
]


def _run(args: list[str], log: str) -> None:
    cmd = [sys.executable, "-m", "experiments.imagenet32", *args]
    with open(log, "w") as f:
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=f, stderr=subprocess.STDOUT)


def _read(*path):
    with open(os.path.join(*path)) as f:
        return json.load(f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/images_reflow")
    p.add_argument("--data", default="", help="the npz folder ('' : <workdir>/data)")
    p.add_argument("--base", default="", help="the base run ('' : <workdir>/base)")
    p.add_argument("--base-steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--pairs", type=int, default=512)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument(
        "--out", default=os.path.join(ROOT, "benchmarks/results/images_tiny_reflow.json")
    )
    a = p.parse_args()
    data = a.data or os.path.join(a.workdir, "data")
    if not os.path.exists(os.path.join(data, "val_data.npz")):
        os.makedirs(data, exist_ok=True)
        train, val = photo_crops(2048, 64)
        for name, rows in (("train_data_batch_1", train), ("val_data", val)):
            np.savez(os.path.join(data, name + ".npz"), data=rows, labels=np.ones(len(rows), int))
    common = [
        "--config=experiments/configs/imagenet32.py:tiny",
        "--config.data.source=imagenet32_npz",
        f"--config.data.data_dir={data}",
        "--config.data.global_batch_size=32",
        "--config.train.sample_every=0",
        "--config.train.progress=False",
    ]
    base = a.base or os.path.join(a.workdir, "base")
    runs = [("base", base, [f"--config.train.num_steps={a.base_steps}"], [])]
    prev = base
    for k in range(1, a.rounds + 1):
        w = os.path.join(a.workdir, f"round{k}")
        reflow = [
            f"--config.reflow.teacher_workdir={prev}",
            f"--config.reflow.num_pairs={a.pairs}",
            "--config.reflow.batch_size=256",
            "--config.reflow.rtol=1e-3",
            "--config.reflow.atol=1e-3",
        ]
        runs.append((f"round{k}", w, [f"--config.train.num_steps={a.steps}"], reflow))
        prev = w
    out = {"args": vars(a), "runs": {}}
    for name, w, steps, reflow in runs:
        os.makedirs(w, exist_ok=True)
        if not os.path.exists(os.path.join(w, "train_summary.json")):
            _run([*common, *steps, *reflow, "--config.mode=train", f"--workdir={w}"],
                 os.path.join(w, "train.log"))  # fmt: skip
        if not os.path.exists(os.path.join(w, "sweep_metrics.json")):
            _run([*common, *steps, *SWEEP, f"--workdir={w}"], os.path.join(w, "sweep.log"))
        s = _read(w, "sweep_metrics.json")
        euler = {r["steps"]: r["ode_error"] for r in s["sweep"] if r["solver"] == "euler"}
        rec = {
            "straightness": s["straightness"],
            "transport_cost": s["transport_cost"],
            "ode_error_euler": euler,
            "sweep_metrics": s,
            "train_summary": _read(w, "train_summary.json"),
        }
        out["runs"][name] = rec
        print(
            f"{name}: straightness {rec['straightness']:.2f}, transport cost "
            f"{rec['transport_cost']:.0f}, Euler ODE error 1/4/16 steps "
            f"{euler[1]:.2f} / {euler[4]:.2f} / {euler[16]:.2f}",
            flush=True,
        )
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
