"""The fmjax side of the W2D benchmark: model, training loops, sampling and likelihood.

Public fmjax API only: ``fmjax.models.MLP`` (raw time input, so the model is the peers'
``concat(x, t)`` MLP), ``fmjax.paths.CondOT(sigma_min=0)``, ``fmjax.losses.cfm_loss``,
``fmjax.train.make_train_step`` / ``make_fused_train_steps``, ``fmjax.sample`` and
``fmjax.log_likelihood``. Fresh checkerboard data are drawn inside the jitted steps.
"""

from __future__ import annotations

import re
import time

import numpy as np
from w2d_workload import SEED


def mlp(spec):
    """The W2D MLP of ``spec`` (hidden, depth, activation) as an ``fmjax.models.MLP``."""
    import fmjax.models

    return fmjax.models.MLP(
        hidden=spec["hidden"],
        depth=spec["depth"],
        activation=spec["activation"],
        time_embedding="raw",
    )


def cfm_loss(model, path):
    """``loss(params, key, x1)``: the mean CFM loss of ``model`` on the batch ``x1``."""
    import fmjax

    def loss(params, key, x1):
        return fmjax.losses.cfm_loss(
            lambda t, x: model.apply(params, t, x), path, key, x1, reduction="mean"
        )

    return loss


def checkerboard_fn(batch):
    """``key -> (batch, 2)`` checkerboard points, drawn by jax (inside the jitted step)."""
    import fmjax.data.toy

    return lambda key: fmjax.data.toy.checkerboard(key, batch)


def layer_order(name):
    """Sort key of a flax Dense name: ``Dense_0``, ``Dense_1``, ... then ``out``."""
    digits = re.sub(r"\D", "", name)
    return (name == "out", int(digits) if digits else 0)


def flax_to_layers(variables):
    p = variables["params"]
    names = sorted(p.keys(), key=layer_order)
    return [
        (np.asarray(p[n]["kernel"], np.float32), np.asarray(p[n]["bias"], np.float32))
        for n in names
    ]


def layers_to_flax(layers, template):
    import jax.numpy as jnp

    p = template["params"]
    names = sorted(p.keys(), key=layer_order)
    if len(names) != len(layers):
        raise ValueError(f"flax model has {len(names)} Dense layers, weights {len(layers)}")
    new = {}
    for n, (k, b) in zip(names, layers, strict=True):
        if p[n]["kernel"].shape != k.shape:
            raise ValueError(f"{n}: kernel {p[n]['kernel'].shape} vs weights {k.shape}")
        new[n] = {"kernel": jnp.asarray(k), "bias": jnp.asarray(b)}
    return {**template, "params": new}


class FmjaxSide:
    name = "fmjax"

    def __init__(self, spec, mesh=None):
        import jax
        import jax.numpy as jnp

        import fmjax

        self.jax, self.jnp, self.fmjax = jax, jnp, fmjax
        self.spec = spec
        self.mesh = mesh  # data parallel over the CPU devices (fmjax.use_cpu_devices)
        self.model = mlp(spec)
        self.path = fmjax.paths.CondOT(sigma_min=0.0)
        self.loss_on_batch = cfm_loss(self.model, self.path)

    def init(self, seed):
        jax, jnp = self.jax, self.jnp
        return self.model.init(
            jax.random.PRNGKey(seed), jnp.zeros((1,), jnp.float32), jnp.zeros((1, 2), jnp.float32)
        )

    def params_from_layers(self, layers):
        return layers_to_flax(layers, self.init(0))

    def to_layers(self, params):
        return flax_to_layers(params)

    def make_trainer(self, batch, seed, lr=1e-3):
        """(state, step, dummy_batch, tx); fresh checkerboard data is drawn inside the step."""
        import optax

        import fmjax.train  # imported here: the sampling rows do not need it

        jax = self.jax
        tx = optax.adam(lr)
        draw, loss_on_batch = checkerboard_fn(batch), self.loss_on_batch

        def loss_fn(params, key, _batch):
            k_data, k_loss = jax.random.split(key)
            return loss_on_batch(params, k_loss, draw(k_data))

        params = self.init(seed)
        state = fmjax.train.TrainState.create(params, tx, jax.random.PRNGKey(seed + 1))
        step = fmjax.train.make_train_step(loss_fn, tx, ema_decay=None)
        dummy = self.jnp.zeros((1,), self.jnp.float32)
        return state, step, dummy, tx

    def train_timer(self, batch, steps, seed=SEED):
        """``(first_call_s, run)``: ``run()`` makes ``steps`` jitted steps, one call each,
        and returns the last loss; the first call (compile + one step) is made here."""
        jax = self.jax
        box = {}
        box["state"], step, dummy, _ = self.make_trainer(batch, seed)

        def run_n(n):
            state = box["state"]
            for _ in range(n):
                state, metrics = step(state, dummy)
            jax.block_until_ready(state.params)
            box["state"] = state
            return float(metrics["loss"])

        t0 = time.perf_counter()
        run_n(1)
        return time.perf_counter() - t0, lambda: run_n(steps)

    def fused_train_timer(self, batch, steps, seed=SEED):
        """``make_fused_train_steps``: ``run()`` makes ``steps`` steps in one compiled
        lax.scan call; the first call (compile + ``steps`` steps) is made here."""
        import fmjax.train

        jax = self.jax
        state, _, _, tx = self.make_trainer(batch, seed)
        if self.mesh is not None:
            state = fmjax.train.sharding.replicate(state, self.mesh)
        run_k = fmjax.train.make_fused_train_steps(
            self.loss_on_batch, tx, checkerboard_fn(batch), steps, ema_decay=None, mesh=self.mesh
        )
        box = {"state": state}

        def run():
            box["state"], metrics = run_k(box["state"])
            jax.block_until_ready(box["state"].params)
            return float(metrics["loss"])

        t0 = time.perf_counter()
        run()
        return time.perf_counter() - t0, run

    def train(self, batch, steps, seed=SEED):
        jax = self.jax
        state, step, dummy, _ = self.make_trainer(batch, seed)
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, dummy)
        jax.block_until_ready(state.params)
        dt = time.perf_counter() - t0
        loss = float(metrics["loss"])
        return state.params, {"train_s": dt, "steps_per_s": steps / dt, "final_loss": loss}

    def field(self, params):
        return self.jax.tree_util.Partial(self.model.apply, params)

    # sampling / likelihood: return (output, nfe int)
    def sample(self, params, x0, solver, step_size=None, steps=None, tol=1e-5):
        if solver == "dopri5":
            kw = {"rtol": tol, "atol": tol}
        elif steps is not None:
            kw = {"steps": steps}
        else:
            kw = {"step_size": step_size}
        kw["solver"] = solver
        x, stats = self.fmjax.sample(self.field(params), self.jnp.asarray(x0), mesh=self.mesh, **kw)
        x = self.jax.block_until_ready(x)
        return x, int(np.asarray(stats.nfe))

    def log_likelihood(self, params, x1, divergence, solver, step_size=None, tol=1e-5, seed=SEED):
        kw = {"divergence": divergence, "solver": solver}
        if solver == "dopri5":
            kw.update(rtol=tol, atol=tol)
        else:
            kw.update(step_size=step_size)
        if divergence == "hutchinson":
            kw.update(key=self.jax.random.PRNGKey(seed), num_probes=1)
        logp, stats = self.fmjax.log_likelihood(
            self.field(params), self.jnp.asarray(x1), mesh=self.mesh, **kw
        )
        logp = self.jax.block_until_ready(logp)
        return logp, int(np.asarray(stats.nfe))

    def counted_nfe(self, fn_name, params, *args, **kwargs):
        """True NFE of one (untimed) call, counted by a jax.debug.callback in the field."""
        jax = self.jax
        count = [0]

        def bump():
            count[0] += 1

        model = self.model

        def counted_apply(p, t, x):
            jax.debug.callback(bump)
            return model.apply(p, t, x)

        saved = self.field
        self.field = lambda p: jax.tree_util.Partial(counted_apply, p)
        try:
            getattr(self, fn_name)(params, *args, **kwargs)
            jax.effects_barrier()
        finally:
            self.field = saved
        return count[0]
