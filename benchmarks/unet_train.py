"""Throughput of the image trainer: the UNet train step, dopri5 sampling, FLOPs and MFU.

    python benchmarks/unet_train.py --preset=tiny                      # CPU smoke numbers
    python benchmarks/unet_train.py --preset=imagenet32 --batch_per_device=128 \\
        --peak_tflops=989 --dtype=bfloat16                               # e.g. one H100
    python benchmarks/unet_train.py --preset=imagenet32 --flops_only    # count, don't run
    python benchmarks/unet_train.py --preset=imagenet32 --flops_only \
        --batch_per_device=1024 --microbatches=8                         # memory per device

Presets are the experiment configs (``experiments/configs/{imagenet32,cifar10}.py``,
``tiny`` = the imagenet32 ``tiny`` preset). Reports, as a markdown table and JSON
(``--out``):

* ``train step``: the real jitted, data-parallel step of ``experiments.images`` (CFM
  loss, Adam with the paper's schedule, EMA; state donated) on device-resident random data:
  median step time over ``--steps`` timed steps after ``--warmup``, images/s in total and
  per device;
* FLOPs per step from XLA's cost analysis of the compiled step
  (``jax.jit(step).lower(...).compile().cost_analysis()``; the lowered, uncompiled HLO's
  analysis if the compile is skipped or fails) and of one UNet forward pass per image, and
  the model FLOP utilisation ``flops_per_step / step_time / (peak * devices)`` against
  ``--peak_tflops`` per device (default: the measured fp32 matmul throughput of this
  machine, which says how close to its best the step is, not a vendor peak);
* ``sampling``: one dopri5 solve (rtol = atol = ``--sample_tol``) of ``--sample_batch``
  images with the UNet: wall time (compile excluded), NFE, images/s.

The compiled step's memory per device (XLA's buffer assignment: temporaries, i.e. mostly
activations, and arguments, i.e. state and batch) is reported too; ``--microbatches``
(gradient accumulation, ``train.microbatches``) trades step time for less of it.

``--flops_only`` lowers and compiles (or only lowers, ``--no_compile``) the step of a large
preset from abstract shapes without allocating its state or running it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax
import jax.numpy as jnp
import numpy as np

import fmjax
from experiments import images
from experiments.configs import cifar10, imagenet32
from experiments.images.setup import IMAGE_SHAPE, rounded_up
from experiments.images.step import build_train_step
from fmjax.train import sharding as sharding_lib


def get_config(preset: str):
    if preset == "tiny":
        return imagenet32.get_config("tiny")
    if preset == "imagenet32":
        return imagenet32.get_config()
    if preset == "cifar10":
        return cifar10.get_config()
    raise SystemExit(f"unknown preset {preset!r}: tiny | imagenet32 | cifar10")


def _flops(compiled_or_lowered) -> float | None:
    try:
        ca = compiled_or_lowered.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends have none
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca:
        return None
    f = ca.get("flops")
    return float(f) if f is not None and f > 0 else None


def _memory(compiled) -> tuple[float, float] | None:
    """(temporaries, arguments) of the compiled step in GiB per device, from XLA's
    ``memory_analysis``, or None where the backend gives none."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends have none
        return None
    if m is None:
        return None
    return m.temp_size_in_bytes / 2**30, m.argument_size_in_bytes / 2**30


def measure_matmul_tflops(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 matmul throughput of one device of this machine, in TFLOP/s."""
    a = jax.random.normal(jax.random.key(0), (n, n))
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument(
        "--batch_per_device",
        type=int,
        default=None,
        help="default: the preset's global batch / device count",
    )
    p.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16"])
    p.add_argument(
        "--microbatches",
        type=int,
        default=None,
        help="gradient accumulation parts per device (default: the preset's)",
    )
    p.add_argument("--steps", type=int, default=10, help="timed train steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    p.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="peak TFLOP/s per device for MFU (default: measured fp32 matmul)",
    )
    p.add_argument("--sample_batch", type=int, default=None)
    p.add_argument("--sample_tol", type=float, default=1e-5)
    p.add_argument("--no_sample", action="store_true")
    p.add_argument(
        "--flops_only",
        action="store_true",
        help="count the step's FLOPs from abstract shapes; run nothing",
    )
    p.add_argument(
        "--no_compile",
        action="store_true",
        help="with --flops_only: analyse the lowered HLO, skip XLA compilation",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()

    config = get_config(args.preset)
    if args.dtype:
        config.model.dtype = args.dtype
    mesh = sharding_lib.make_mesh()
    ndev = mesh.size
    per_dev = args.batch_per_device or max(1, config.data.global_batch_size // ndev)
    gbs = per_dev * ndev
    config.data.global_batch_size = gbs
    if args.microbatches is not None:
        config.train.microbatches = args.microbatches
    config.mode = "train"  # the trainer's checks of the batch over the devices, no eval's
    try:
        setup = images.build(config, mesh)
    except images.ConfigError as e:
        raise SystemExit(f"--microbatches: {e}") from None
    model = setup.model
    step = build_train_step(setup, mesh)
    abstract_state = setup.abstract_state(mesh)
    data = sharding_lib.data_sharding(mesh)
    batch_shapes = {
        "image": jax.ShapeDtypeStruct((gbs, *IMAGE_SHAPE), jnp.float32, sharding=data),
        "label": jax.ShapeDtypeStruct((gbs,), jnp.int32, sharding=data),
    }
    num_params = sum(
        int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract_state.params)
    )
    res = {
        "preset": args.preset,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "num_devices": ndev,
        "batch_per_device": per_dev,
        "global_batch": gbs,
        "dtype": config.model.dtype,
        "microbatches": int(config.train.microbatches),
        "num_params": num_params,
    }

    # FLOPs: the whole step (forward, backward, Adam, EMA) and one forward per image.
    t0 = time.perf_counter()
    lowered = step.lower(abstract_state, batch_shapes)
    compiled = None
    if not (args.flops_only and args.no_compile):
        compiled = lowered.compile()
    res["compile_seconds"] = time.perf_counter() - t0
    res["flops_per_step"] = _flops(compiled) if compiled is not None else None
    memory = _memory(compiled) if compiled is not None else None
    if memory is not None:  # XLA's buffer assignment for this backend, per device
        res["temp_gib_per_device"], res["argument_gib_per_device"] = memory
    res["flops_source"] = "compiled"
    if res["flops_per_step"] is None:
        res["flops_per_step"], res["flops_source"] = _flops(lowered), "lowered"
    if int(config.train.microbatches) > 1:
        # XLA's cost analysis counts a loop body once: count the same arithmetic in the
        # step without microbatches (lowered, not compiled)
        whole = copy.deepcopy(config)
        whole.train.microbatches = 1
        step1 = build_train_step(images.build(whole, mesh), mesh)
        res["flops_per_step"] = _flops(step1.lower(abstract_state, batch_shapes))
        res["flops_source"] = "lowered, the same step without microbatches"
    fwd = jax.jit(lambda p, t, x: model.apply(p, t, x)).lower(
        abstract_state.params,
        jax.ShapeDtypeStruct((1,), jnp.float32),
        jax.ShapeDtypeStruct((1, *IMAGE_SHAPE), jnp.float32),
    )
    res["forward_flops_per_image"] = _flops(fwd)
    if res["flops_per_step"]:
        res["flops_per_step_per_image"] = res["flops_per_step"] / (gbs / ndev)

    if not args.flops_only:
        replicated = sharding_lib.replicated_sharding(mesh)
        state = jax.jit(setup.init_state, out_shardings=replicated)()
        rng = np.random.default_rng(0)
        host = {
            "image": rng.uniform(-1, 1, (gbs, *IMAGE_SHAPE)).astype(np.float32),
            "label": rng.integers(0, 10, gbs).astype(np.int32),
        }
        batch = jax.device_put(host, data)
        run = compiled if compiled is not None else step
        for _ in range(max(1, args.warmup)):
            state, m = run(state, batch)
        jax.block_until_ready(m)
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            state, m = run(state, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
        st = statistics.median(times)
        res.update(
            step_seconds_median=st,
            step_seconds_min=min(times),
            step_seconds_max=max(times),
            images_per_s=gbs / st,
            images_per_s_per_device=gbs / st / ndev,
            loss=float(m["loss"]),
        )
        peak = args.peak_tflops
        res["peak_source"] = "given" if peak else "measured fp32 matmul (2048^3)"
        if peak is None:
            peak = measure_matmul_tflops()
        res["peak_tflops_per_device"] = peak
        if res["flops_per_step"]:
            achieved = res["flops_per_step"] / st / 1e12  # per device (partitioned HLO)
            res["achieved_tflops_per_device"] = achieved
            res["mfu"] = achieved / peak

        if not args.no_sample:
            nb = rounded_up(args.sample_batch or min(gbs, 64), mesh)
            params = state.ema_params
            solver = fmjax.SolverOptions("dopri5", rtol=args.sample_tol, atol=args.sample_tol)
            t = time.perf_counter()
            _, stats = setup.sample(params, jax.random.key(1), nb, mesh, solver)
            first = time.perf_counter() - t
            t = time.perf_counter()
            _, stats = setup.sample(params, jax.random.key(2), nb, mesh, solver)
            secs = time.perf_counter() - t
            res.update(
                sample_batch=nb,
                sample_tol=args.sample_tol,
                sample_first_call_seconds=first,
                sample_seconds=secs,
                sample_nfe=int(np.asarray(stats.nfe)),
                sample_images_per_s=nb / secs,
            )

    print_table(res)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return res


def print_table(r):
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    print("| quantity | value |\n|---|---|")
    for k, v in r.items():
        print(f"| {k} | {fmt(v)} |")


if __name__ == "__main__":
    del fmjax  # imported for the side effect of checking the package is importable
    main()
