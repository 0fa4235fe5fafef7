"""The image trainer on an accelerator, in one short run: train step, sampling, bits/dim.

    bash benchmarks/gpu_check.sh                  # on a lent GPU / TPU: the paper's model
    python benchmarks/gpu_check.py --smoke        # CPU, tiny sizes, seconds (the tests)

Parts, in this order, each recorded in the JSON (``--out``, default ``$OUT/gpu_check.json``
where ``$OUT`` is set, else ``benchmarks/results/gpu_check.json``) as soon as it ends, so a
run stopped early keeps what it measured; a part that fails records its error and the
others still run; parts not started within ``--budget_s`` seconds are recorded as skipped:

1. ``train``: the paper's ImageNet-32 UNet (``experiments/configs/imagenet32.py``, default
   preset: 228M parameters) train step of ``experiments.images`` (CFM loss, Adam, EMA,
   donated state) in float32 and in bfloat16 (``model.dtype``: compute dtype; parameters
   stay float32) on ``--batch`` images per device: step time (median of ``--steps``),
   images/s, compile time, XLA's memory per device, model FLOPs per step from XLA's cost
   analysis of the lowered step (the model's dots and convolutions, before XLA turns them
   into library calls) and of the compiled one, and the model FLOP utilisation against the
   chip's peak (:data:`PEAK_TFLOPS`, keyed by ``device_kind``: the TF32 tensor-core peak for
   float32 at the default precision on NVIDIA, bfloat16's for bfloat16 and on TPUs). Which
   attention XLA runs is read from the compiled HLO: the custom-call targets (cuDNN fused
   attention ``__cudnn$fmha*``, cuBLAS ``__cublas$gemm``, cuDNN convolutions), counted.
2. ``sample``: one dopri5 solve (rtol = atol = ``--tol``, the paper's 1e-5) of
   ``--sample_batch`` images, at each matmul precision of ``--precisions``: NFE, seconds,
   images/s, the model evaluations per second, and how far the samples of the other
   precisions are from the first's.
3. ``bpd``: bits/dim of ``--bpd_batch`` images (one dequantization sample, Hutchinson
   divergence, dopri5 at ``--tol``), at each precision: NFE, seconds, images/s, and the
   bits/dim's change between precisions.

The sampled field is a fresh UNet whose all-zero arrays (ADM's zero-initialised output
layers, biases) are drawn from N(0, 0.02^2): a non-trivial field (a fresh UNet's is zero),
so the NFE is that of this random field, not of a trained model; throughput per model
evaluation is what carries over. ``--smoke`` starts from a state of zeros instead of the
UNet's initialisation (which costs more on a CPU than the tiny model's steps), so there
every parameter is drawn.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

#: Dense peak TFLOP/s per device (as JAX counts devices) by device kind: bf16 (tensor
#: cores / MXU), tf32 (NVIDIA tensor cores: float32 matmuls at the default precision) and
#: fp32 (no tensor cores: ``highest``), from the vendors' datasheets. TPUs multiply
#: float32 at the default precision in one bfloat16 pass: their bf16 peak applies. The
#: first key that occurs in ``device_kind`` wins (most specific first).
PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0},
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM ("H100 80GB HBM3")
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H800": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L4": {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "TPU v6 lite": {"bf16": 918.0},
    "TPU v5 lite": {"bf16": 197.0},
    "TPU v5p": {"bf16": 459.0},
    "TPU v5": {"bf16": 459.0},
    "TPU v4": {"bf16": 275.0},
    "TPU v3": {"bf16": 61.5},  # per core: a JAX device on v3
    "TPU v2": {"bf16": 22.5},
}


def peak_for(device_kind: str) -> tuple[str | None, dict | None]:
    """``(key, peaks)`` of :data:`PEAK_TFLOPS` for ``device_kind`` (None, None if unknown)."""
    for key, peaks in PEAK_TFLOPS.items():
        if key.lower() in device_kind.lower():
            return key, peaks
    return None, None


def compute_peak(peaks: dict | None, dtype: str, backend: str) -> tuple[float | None, str]:
    """The peak a step of ``dtype`` at the default precision runs against, and its name."""
    if not peaks:
        return None, "unknown"
    if dtype == "bfloat16" or backend == "tpu" or "tf32" not in peaks:
        return peaks["bf16"], "bf16"
    return peaks["tf32"], "tf32"


def custom_calls(hlo_text: str) -> dict[str, int]:
    """Custom-call targets of compiled HLO text, counted."""
    return dict(Counter(re.findall(r'custom_call_target="([^"]+)"', hlo_text)))


def attention_implementation(calls: dict[str, int], backend: str) -> str:
    """What ran the attention, from the compiled step's custom calls."""
    fused = sorted(k for k in calls if "fmha" in k.lower() or "flash" in k.lower())
    if fused:
        return "cuDNN fused attention (" + ", ".join(fused) + ")"
    if backend == "gpu":
        return "XLA: separate matmuls (cuBLAS/Triton) and softmax fusions, no fused attention"
    return f"XLA on {backend}: dot_general + softmax (no fused attention kernel)"


# ----------------------------------------------------------------------------- sizes


def settings(smoke: bool, args) -> dict:
    if smoke:
        return {
            "preset": "tiny, shrunk (smoke)",
            "batch": args.batch or 2,
            "steps": args.steps or 2,
            "sample_batch": args.sample_batch or 2,
            "bpd_batch": args.bpd_batch or 2,
            "tol": args.tol or 1e-2,
            "max_steps": args.max_steps,
        }
    return {
        "preset": "imagenet32 default (the paper's)",
        "batch": args.batch or 128,
        "steps": args.steps or 10,
        "sample_batch": args.sample_batch or 64,
        "bpd_batch": args.bpd_batch or 16,
        "tol": args.tol or 1e-5,
        "max_steps": args.max_steps,
    }


def make_config(smoke: bool, dtype: str, batch: int, mesh):
    from experiments.configs import imagenet32

    c = imagenet32.get_config("tiny" if smoke else "default")
    if smoke:  # the smallest UNet: one level, its middle block's attention only
        c.model.ch, c.model.ch_mult, c.model.attn_resolutions = 4, (1,), ()
        c.model.num_heads, c.model.num_head_channels = 1, None
    c.model.dtype = dtype
    c.mode = "train"
    c.train.progress = False
    c.data.global_batch_size = batch * mesh.size
    return c


def image_shape(setup) -> tuple[int, ...]:
    shape = getattr(setup, "image_shape", None)
    if shape is None:
        from experiments.images import setup as setup_lib

        shape = setup_lib.IMAGE_SHAPE
    return tuple(shape)


# ----------------------------------------------------------------------------- parts


def train_part(dtype: str, s: dict, smoke: bool, mesh, info: dict, state) -> tuple[dict, object]:
    """The train step of ``dtype`` from ``state`` (a state of the same shapes: the
    parameters are float32 whatever the compute dtype), which it donates; returns
    ``(record, (setup, new state))``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import unet_train

    from experiments import images
    from experiments.images.step import build_train_step
    from fmjax.train import sharding as sharding_lib

    setup = images.build(make_config(smoke, dtype, s["batch"], mesh), mesh)
    step = build_train_step(setup, mesh)
    abstract = setup.abstract_state(mesh)
    gbs = s["batch"] * mesh.size
    shape = image_shape(setup)
    data = sharding_lib.data_sharding(mesh)
    batch_shapes = {
        "image": jax.ShapeDtypeStruct((gbs, *shape), jnp.float32, sharding=data),
        "label": jax.ShapeDtypeStruct((gbs,), jnp.int32, sharding=data),
    }
    t = time.perf_counter()
    lowered = step.lower(abstract, batch_shapes)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    calls = custom_calls(compiled.as_text())
    out = {
        "dtype": dtype,
        "batch_per_device": s["batch"],
        "global_batch": gbs,
        "num_params": int(sum(x.size for x in jax.tree_util.tree_leaves(abstract.params))),
        "compile_seconds": compile_s,
        "model_flops_per_step": unet_train._flops(lowered),
        "compiled_flops_per_step": unet_train._flops(compiled),
        "custom_calls": calls,
        "attention": attention_implementation(calls, info["backend"]),
    }
    memory = unet_train._memory(compiled)
    if memory is not None:
        out["temp_gib_per_device"], out["argument_gib_per_device"] = memory
    rng = np.random.default_rng(0)
    host = {
        "image": rng.uniform(-1, 1, (gbs, *shape)).astype(np.float32),
        "label": rng.integers(0, 10, gbs).astype(np.int32),
    }
    batch = jax.device_put(host, data)
    state, m = compiled(state, batch)  # warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(s["steps"]):
        t = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    st = statistics.median(times)
    out.update(
        step_seconds_median=st,
        step_seconds_min=min(times),
        step_seconds_max=max(times),
        images_per_s=gbs / st,
        images_per_s_per_device=gbs / st / mesh.size,
        loss=float(m["loss"]),
    )
    peak, kind = compute_peak(info["peaks"], dtype, info["backend"])
    if peak is None and info["backend"] == "cpu":  # no vendor peak: this CPU's matmul rate
        if "measured_matmul_tflops" not in info:
            info["measured_matmul_tflops"] = unet_train.measure_matmul_tflops(512)
        peak, kind = info["measured_matmul_tflops"], "measured fp32 matmul"
    flops = out["model_flops_per_step"]
    if flops:
        achieved = flops / st / 1e12  # per device: the cost analysis is of one device's step
        out["achieved_tflops_per_device"] = achieved
        if peak:
            out.update(peak_tflops=peak, peak_kind=kind, mfu=achieved / peak)
    return out, (setup, state)


def state_from_shapes(abstract):
    """A state of zeros (typed keys: ``key(0)``) with ``abstract``'s shapes and shardings."""
    import jax
    import jax.numpy as jnp

    def make(a):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            x = jax.random.split(jax.random.key(0), a.shape) if a.shape else jax.random.key(0)
        else:
            x = jnp.zeros(a.shape, a.dtype)
        return jax.device_put(x, a.sharding)

    return jax.tree_util.tree_map(make, abstract)


def random_field_params(params, seed: int = 0):
    """``params`` with every all-zero array drawn from N(0, 0.02^2) (see the docstring)."""
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [
        0.02 * jax.random.normal(k, x.shape, x.dtype) if not bool(jnp.any(x != 0)) else x
        for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, new)


def sample_part(setup, params, s: dict, precisions, mesh) -> dict:
    import jax
    import numpy as np

    import fmjax

    solver = fmjax.SolverOptions("dopri5", rtol=s["tol"], atol=s["tol"], max_steps=s["max_steps"])
    n, out, first = s["sample_batch"], {"batch": s["sample_batch"], "tol": s["tol"]}, None
    for p in precisions:
        with jax.default_matmul_precision(p):
            t = time.perf_counter()
            setup.sample(params, jax.random.key(1), n, mesh, solver)
            first_call = time.perf_counter() - t
            t = time.perf_counter()
            x, stats = setup.sample(params, jax.random.key(1), n, mesh, solver)
            secs = time.perf_counter() - t
        nfe = int(np.asarray(stats.nfe))
        rec = {
            "nfe": nfe,
            "success": bool(np.all(np.asarray(stats.success))),
            "first_call_seconds": first_call,
            "seconds": secs,
            "images_per_s": n / secs,
            "image_evaluations_per_s": n * nfe / secs,
        }
        if first is None:
            first = (p, x)
        else:
            rec[f"max_abs_diff_from_{first[0]}"] = float(np.max(np.abs(x - first[1])))
        out[p] = rec
    return out


def bpd_part(setup, params, s: dict, precisions) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fmjax.metrics import bpd as bpd_lib

    n = s["bpd_batch"]
    rng = np.random.default_rng(1)
    levels = rng.integers(0, 256, (n, *image_shape(setup)))
    x = jnp.asarray(levels * (2.0 / 256) - 1.0, jnp.float32)
    t0, t1 = setup.t_range
    v = setup.velocity(params)
    out, first = {"batch": n, "tol": s["tol"], "num_dequant": 1, "divergence": "hutchinson"}, None
    for p in precisions:
        kw = dict(
            num_dequant=1,
            source_std=setup.source_std,
            t0=t0,
            t1=t1,
            throw=False,
            solver="dopri5",
            rtol=s["tol"],
            atol=s["tol"],
            max_steps=s["max_steps"],
        )
        with jax.default_matmul_precision(p):
            t = time.perf_counter()
            jax.block_until_ready(bpd_lib.image_bpd(v, x, jax.random.key(2), **kw))
            first_call = time.perf_counter() - t
            t = time.perf_counter()
            bpd, nfe = jax.block_until_ready(bpd_lib.image_bpd(v, x, jax.random.key(2), **kw))
            secs = time.perf_counter() - t
        bpd = np.asarray(bpd, np.float64)
        rec = {
            "finite": bool(np.all(np.isfinite(bpd))),
            "bpd_mean": float(bpd.mean()),
            "nfe_mean": float(nfe),
            "first_call_seconds": first_call,
            "seconds": secs,
            "images_per_s": n / secs,
        }
        if first is None:
            first = (p, bpd)
        else:
            rec[f"max_abs_bpd_diff_from_{first[0]}"] = float(np.max(np.abs(bpd - first[1])))
        out[p] = rec
    return out


# ----------------------------------------------------------------------------- driver


def default_out() -> str:
    if os.environ.get("OUT"):
        return os.path.join(os.environ["OUT"], "gpu_check.json")
    return os.path.join(HERE, "results", "gpu_check.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU-sized: tiny UNet, a few steps")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_check.json)")
    p.add_argument("--batch", type=int, default=None, help="train images per device (128)")
    p.add_argument("--steps", type=int, default=None, help="timed train steps (10)")
    p.add_argument("--sample_batch", type=int, default=None, help="images sampled (64)")
    p.add_argument("--bpd_batch", type=int, default=None, help="images scored (16)")
    p.add_argument("--tol", type=float, default=None, help="dopri5 rtol = atol (1e-5)")
    p.add_argument("--max_steps", type=int, default=200, help="dopri5 step budget per solve")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--precisions", default="highest,default", help="matmul precisions")
    p.add_argument("--parts", default="train,sample,bpd")
    p.add_argument("--budget_s", type=float, default=360.0, help="start no part after this")
    args = p.parse_args(argv)
    for name in ("batch", "steps", "sample_batch", "bpd_batch", "max_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be >= 1; got {value}")
    for name, allowed in (
        ("dtypes", ("float32", "bfloat16")),
        ("precisions", ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")),
        ("parts", ("train", "sample", "bpd")),
    ):
        values = [v for v in getattr(args, name).split(",") if v]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            p.error(f"--{name}: unknown {bad or 'empty list'}; choose from {allowed}")
        setattr(args, name, values)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    import harness
    import jax

    from fmjax.train import sharding as sharding_lib

    out_path = args.out or default_out()
    s = settings(args.smoke, args)
    dev = jax.devices()[0]
    key, peaks = peak_for(dev.device_kind)
    info = {"backend": jax.default_backend(), "peaks": peaks}
    res = {
        "smoke": args.smoke,
        "device_kind": dev.device_kind,
        "backend": info["backend"],
        "num_devices": jax.device_count(),
        "peak_table_key": key,
        "peak_tflops": peaks,
        "settings": s,
        "versions": harness.versions(["jax", "jaxlib", "flax", "optax", "diffrax"]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmarks/gpu_check.py " + " ".join(argv or sys.argv[1:]),
        "parts": {},
    }
    mesh = sharding_lib.make_mesh()

    def save():
        res["total_seconds"] = time.perf_counter() - start
        harness.write_json(out_path, res)

    def part(name, fn):
        if time.perf_counter() - start > args.budget_s:
            res["parts"][name] = {"skipped": f"past --budget_s={args.budget_s:g} s"}
            print(f"[gpu_check] {name}: skipped (time budget)", flush=True)
            save()
            return None
        t, cpu = time.perf_counter(), time.process_time()
        try:
            value = fn()
        except Exception as err:  # noqa: BLE001 - recorded, the other parts still run
            res["parts"][name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
            print(f"[gpu_check] {name}: FAILED {type(err).__name__}: {err}", flush=True)
            save()
            return None
        rec = value[0] if isinstance(value, tuple) else value
        rec["part_seconds"] = time.perf_counter() - t
        rec["part_cpu_seconds"] = time.process_time() - cpu  # this process, all threads
        res["parts"][name] = rec
        print(f"[gpu_check] {name}: {json.dumps(rec, default=str)[:600]}", flush=True)
        save()
        return value

    from experiments import images

    # one initial state for every part (the float32 model; its shapes serve bfloat16 too)
    setup = images.build(make_config(args.smoke, "float32", s["batch"], mesh), mesh)
    if args.smoke:  # zeros of the state's shapes: the tiny UNet's init costs more than a step
        state = state_from_shapes(setup.abstract_state(mesh))
    else:
        replicated = sharding_lib.replicated_sharding(mesh)
        state = jax.jit(setup.init_state, out_shardings=replicated)()
    if "train" in args.parts:
        for dtype in args.dtypes:
            got = part(
                f"train_{dtype}",
                lambda d=dtype, st=state: train_part(d, s, args.smoke, mesh, info, st),
            )
            if got is not None:
                state = got[1][1]  # the donated state's successor
    if {"sample", "bpd"} & set(args.parts):
        params = random_field_params(state.params)
        if "sample" in args.parts:
            part("sample", lambda: sample_part(setup, params, s, args.precisions, mesh))
        if "bpd" in args.parts:
            part("bpd", lambda: bpd_part(setup, params, s, args.precisions))
    if "measured_matmul_tflops" in info:
        res["measured_matmul_tflops"] = info["measured_matmul_tflops"]
    save()
    print(f"[gpu_check] wrote {out_path} ({res['total_seconds']:.0f} s)", flush=True)
    return res


if __name__ == "__main__":
    main()
