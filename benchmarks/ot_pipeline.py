"""The image trainer's wait for data with and without minibatch OT, at the paper's batch.

    python benchmarks/ot_pipeline.py [--batch 1024] [--steps 6] [--data-dir DIR]

Trains ``experiments.imagenet32`` (the ``tiny`` UNet preset, so a CPU can run it) at global
batch ``--batch`` on official-layout npz data (random pixels written to a temporary folder
unless ``--data-dir`` is given) three ways, each for ``--steps`` steps after one compiled warm-up
step:

* ``independent``: no coupling;
* ``ot host``: exact minibatch OT in the input pipeline (``train.pairing=host``,
  ``fmjax.data.pairing``): the pairing of the next batches runs in grain's reader threads
  while the device computes the current step;
* ``ot device``: exact minibatch OT in the jitted step (``train.pairing=device``): a host
  callback the step waits for.

Reports steps/s and the training loop's wait for its next batch per step (the trainer's
``data_wait_per_step_ms``: reading, pairing when the pipeline pairs, placing on the devices;
an upper bound on the device's idle time). JSON to ``benchmarks/results/ot_pipeline.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
for p in (HERE, os.path.dirname(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import harness  # noqa: E402
import numpy as np  # noqa: E402

log = harness.logger("ot_pipeline")

KINDS = {
    "independent": {"train.coupling": "independent"},
    "ot host": {"train.coupling": "ot", "train.pairing": "host"},
    "ot device": {"train.coupling": "ot", "train.pairing": "device"},
}


def write_npz(folder, n, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for name, count in (("train_data_batch_1", n), ("val_data", 16)):
        np.savez(
            os.path.join(folder, f"{name}.npz"),
            data=rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            labels=rng.integers(1, 1001, count),
        )


def config(data_dir, batch, steps, overrides):
    from experiments.configs import imagenet32

    c = imagenet32.get_config("tiny")
    values = {
        "data.source": "imagenet32_npz",
        "data.data_dir": data_dir,
        "data.global_batch_size": batch,
        "train.num_steps": steps,
        "train.warmup_steps": 0,
        "train.checkpoint_every": 1000,
        "train.sample_every": 0,
        "train.log_every": steps,
        "train.progress": False,
        **overrides,
    }
    for dotted, value in values.items():
        group, name = dotted.split(".")
        c[group][name] = value
    return c


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=harness.results_path("ot_pipeline.json"))
    args = ap.parse_args(argv)
    import jax

    from experiments import images

    tmp = tempfile.mkdtemp(prefix="ot_pipeline_")
    # the timed run loads the warm-up run's compiled step instead of compiling it again
    jax.config.update("jax_compilation_cache_dir", os.path.join(tmp, "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    data_dir = args.data_dir or os.path.join(tmp, "data")
    if args.data_dir is None:
        write_npz(data_dir, 4 * args.batch)
    records = []
    for kind, overrides in KINDS.items():
        workdir = os.path.join(tmp, kind.replace(" ", "_"))
        # one step first (compile), then the timed steps resume from its checkpoint
        images.train(config(data_dir, args.batch, 1, overrides), workdir)
        _, s = images.train(config(data_dir, args.batch, 1 + args.steps, overrides), workdir)
        rec = {
            "kind": kind,
            "batch": args.batch,
            "steps": s["steps_run"],
            "steps_per_s": s["steps_per_s"],
            "step_ms": 1e3 / s["steps_per_s"],
            "data_wait_per_step_ms": s["data_wait_per_step_ms"],
            "data_wait_fraction": s["data_wait_s"] / s["train_seconds"],
            "loadavg_1m": harness.loadavg(),
        }
        records.append(rec)
        log(f"{kind}: {rec['step_ms']:.0f} ms/step, wait {rec['data_wait_per_step_ms']:.0f} ms")
    harness.write_json(
        args.out, {"machine": harness.machine_info(), "args": vars(args), "records": records}
    )
    print("| coupling | ms per step | data wait per step (ms) | wait share of the step |")
    print("|---|---|---|---|")
    for r in records:
        print(
            f"| {r['kind']} | {r['step_ms']:.0f} | {r['data_wait_per_step_ms']:.0f} | "
            f"{100 * r['data_wait_fraction']:.1f} % |"
        )
    return records


if __name__ == "__main__":
    main()
