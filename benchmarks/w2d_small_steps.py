"""W2D-small training steps on the CPU devices: per-step and fused variants side by side.

The ablations behind the W2D-small training analysis in ``docs/benchmarks.md``, all in one
process with ``fmjax.use_cpu_devices(N)`` (default one device per core):

* per-step ``make_train_step`` on one device, on the mesh in the global view (XLA's tuple
  all-reduce of the gradient arrays) and on the mesh with ``shard_loss=True`` (one flat
  all-reduce);
* fused ``make_fused_train_steps`` (``--fused-steps`` per call) on one device and on the
  mesh, each with ``predraw`` off and on.

Fresh checkerboard data every step (drawn on the host side for the per-step lines, ahead of
the timing; drawn on device by the fused lines). The variants are timed in interleaved rounds
(one turn of at least ``--min-turn`` seconds of each per round), median of ``--rounds``
(min-max) in steps/s::

    python benchmarks/w2d_small_steps.py --rounds 7
"""

from __future__ import annotations

import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]

from harness import add_min_turn, interleave, summarize
from w2d_fmjax import cfm_loss, checkerboard_fn, mlp
from w2d_workload import W2D_SMALL


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-devices", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--fused-steps", type=int, default=200)
    ap.add_argument("--per-step-steps", type=int, default=50)
    add_min_turn(ap, what="variant")
    args = ap.parse_args(argv)

    import fmjax

    n = fmjax.use_cpu_devices(args.cpu_devices or fmjax.cpu.num_cores())
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding, PartitionSpec

    import fmjax.train
    from fmjax.train import sharding

    batch = args.batch
    model = mlp(W2D_SMALL)
    loss_fn = cfm_loss(model, fmjax.paths.CondOT(sigma_min=0.0))
    data_fn = checkerboard_fn(batch)
    tx = optax.adam(1e-3)

    params = model.init(jax.random.key(0), jnp.zeros((1,)), jnp.zeros((1, 2)))
    dev0 = jax.devices()[0]
    mesh = sharding.make_mesh() if n > 1 else None
    rows = None if mesh is None else NamedSharding(mesh, PartitionSpec("data"))

    def new_state(on_mesh):
        state = fmjax.train.TrainState.create(params, tx, jax.random.key(1))
        return sharding.replicate(state, mesh) if on_mesh else jax.device_put(state, dev0)

    k = args.per_step_steps
    xs_host = [data_fn(jax.random.key(100 + i)) for i in range(k)]
    fns, steps_per_call = {}, {}

    def per_step(label, on_mesh, **kw):
        step = fmjax.train.make_train_step(loss_fn, tx, mesh=mesh if on_mesh else None, **kw)
        xs = [jax.device_put(x, rows if on_mesh else dev0) for x in xs_host]
        box = {"state": new_state(on_mesh)}

        def run():
            state = box["state"]
            for x in xs:
                state, _ = step(state, x)
            box["state"] = jax.block_until_ready(state)

        run()  # compile
        fns[label], steps_per_call[label] = run, k

    def fused(label, on_mesh, predraw):
        run_k = fmjax.train.make_fused_train_steps(
            loss_fn, tx, data_fn, args.fused_steps, mesh=mesh if on_mesh else None, predraw=predraw
        )
        box = {"state": new_state(on_mesh)}

        def run():
            box["state"], _ = run_k(box["state"])
            jax.block_until_ready(box["state"].params)

        run()
        fns[label], steps_per_call[label] = run, args.fused_steps

    per_step("per-step, one device", False)
    if mesh is not None:
        per_step(f"per-step, {n} devices, global view", True)
        per_step(f"per-step, {n} devices, shard_loss=True", True, shard_loss=True)
    for predraw in (False, True):
        fused(f"fused x{args.fused_steps}, one device, predraw={predraw}", False, predraw)
        if mesh is not None:
            fused(f"fused x{args.fused_steps}, {n} devices, predraw={predraw}", True, predraw)

    times, _, errors = interleave(fns, args.rounds, args.min_turn)
    print(
        f"W2D-small training, batch {batch}, {n} CPU device(s), {args.rounds} rounds, "
        f"jax {jax.__version__}\n"
    )
    print("| variant | steps/s, median | min-max |\n|---|---|---|")
    for label, ts in times.items():
        if label in errors:
            print(f"| {label} | ERROR {errors[label]} | |")
            continue
        rates = summarize([steps_per_call[label] / t for t in ts])
        print(f"| {label} | {rates['median']:.0f} | {rates['min']:.0f}-{rates['max']:.0f} |")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
