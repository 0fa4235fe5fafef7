"""W2D: side-by-side CPU benchmark of fmjax against Meta's ``flow_matching`` and ``torchcfm``.

All three frameworks run in ONE process on the same machine, on the workload of the 2-D
example of Meta's ``flow_matching`` library:

* data: the checkerboard ``x1 ~ U[-2, 2)``, ``x2 = u - 2b + (floor(x1) mod 2)``,
  ``u ~ U[0, 1)``, ``b ~ Bernoulli(1/2)``, then ``(x1, x2) / 0.45`` (entropy 3.6765 nats);
  fresh data every training step, drawn on each framework's own side (torch for the peers,
  with the example's ``inf_train_gen``; jax for fmjax, inside the jitted step);
* model: ``concat(x, t)`` -> Linear(3,512) -> 3 x Linear(512,512) -> Linear(512,2), SiLU
  after the first four (791,042 parameters);
* CondOT path with sigma_min = 0, ``t ~ U[0, 1]``, MSE to ``x1 - x0``, Adam(1e-3),
  batch 4096, float32, 2 threads (``torch.set_num_threads(2)``; XLA uses the 2 cores as is).
  The torch model uses ``nn.SiLU`` (the example writes ``sigmoid(x) * x`` by hand, which is
  slower) and, for the training loops, each peer's own example loop.

Rows (``--rows``):

* ``train``: training steps/s (fmjax also: first call = compile + one step), one jitted
  ``make_train_step`` call per step; an extra fmjax line (``--no-fused`` drops it) runs the
  same steps fused into one ``make_fused_train_steps`` call (a ``lax.scan``).
* ``sample``: 50,000 samples with midpoint (step 0.05, 40 NFE) and dopri5 (rtol=atol=1e-5):
  wall time and the true NFE (counted by a wrapper on the torch side; ``stats.nfe`` on the
  fmjax side, checked once against a ``jax.debug.callback`` counter).
* ``likelihood``: log-likelihood of 10,000 points: exact divergence + midpoint 0.05,
  Hutchinson (one Rademacher probe) + midpoint 0.05, exact divergence + dopri5 1e-5.
  ``flow_matching`` uses ``ODESolver.compute_likelihood``; torchcfm has no likelihood API,
  so its row is torchdiffeq's ``odeint`` on the augmented state ``[x, logp]`` with the
  divergence from autograd (2 backward passes for the exact trace in 2-D, one for
  Hutchinson), integrated from t=1 to t=0.
* ``quality``: each framework trains its own model for 3,000 steps, then the held-out NLL
  (exact divergence, dopri5 1e-5) of 20,000 points and an MMD^2 (sum of RBF kernels with
  fixed bandwidths, unbiased estimator, computed by the same jax code for all) between 20,000
  dopri5 samples and 20,000 fresh data points. ``--quality-seeds N`` trains N models per
  framework (different initializations and data streams) and adds their mean and standard
  deviation, so a ranking can be read against the spread between training runs.
* ``small``: W2D-small, Linear(3,64)-SELU-Linear(64,64)-SELU-Linear(64,64)-SELU-Linear(64,2)
  (8,706 parameters, torchcfm's example MLP), batch 256: training steps/s; 1,000 samples with
  Euler (100 steps) and with dopri5 1e-5; ONE sample with dopri5 1e-5 (latency); exact
  log-likelihood of 1,000 points with dopri5 1e-5.
* ``matmul``: the machine's fp32 matmul throughput (best of several 4096x4096 ``jnp.dot``,
  ``torch.mm`` for reference) and the fraction of it each framework's W2D training step
  reaches (FLOP/step = 3 x 2 x params x batch).

Rows ``sample``, ``likelihood`` and ``small`` use the SAME weights in all three frameworks
(the fmjax model of the ``quality`` row when that row ran first, else trained once, by fmjax
if it is there, else by torch; or loaded with ``--weights`` /
``--weights-small``, ``.npz`` files with ``kernel_i`` (in, out) and ``bias_i`` arrays, which
are written there when the file does not exist yet), and the same starting points / data
points, so the rows also report how far each framework's outputs are from the first one's.

Data parallel on the CPU cores: the script first calls ``fmjax.use_cpu_devices(N)``
(``--cpu-devices``, default one device per core) and adds an fmjax line, ``fmjax (N CPU
devices)``, that splits each batch over the N devices (``mesh=`` of ``fmjax.sample``,
``fmjax.log_likelihood`` and ``make_fused_train_steps``): XLA:CPU runs a small model's ops on
one core each, so a single device leaves the other cores idle. The plain ``fmjax`` lines use
device 0 only, as a one-device process does. Rows whose batch does not split (ONE sample)
have no such line. ``--cpu-devices 1`` drops them.

Timings: the median of ``--repeats`` runs (default 3) with min-max.  For fmjax the first
call (trace + compile + one run) is reported separately; the torch side is warmed up
untimed on a small input.  Within a case the frameworks are timed in interleaved rounds,
one turn of each per round with the starting framework rotating, because the machine's
speed drifts by tens of percent over minutes; a turn repeats the call for at least
``--min-turn`` seconds (default 0.5) and records the mean time per call, except in the
single-point latency case, where a turn is one call made after other frameworks' work.
Each fmjax line also gets its per-round ratio to the faster peer (median and min-max over
the rounds), in its notes and in a second table.

Usage::

    python benchmarks/w2d.py                       # the full run (2 cores: hours)
    python benchmarks/w2d.py --quick               # tiny sizes, a smoke check
    python benchmarks/w2d.py --only flow_matching,torchcfm --rows train,sample --repeats 5

Run it on an otherwise idle machine: the 1-minute load average is recorded with every row
(``loadavg_1m``); with other processes busy, torch with 2 threads slows down by up to 100x
on the small model (its two threads wait for each other at every op), XLA much less.

Writes a markdown table to stdout and the raw numbers to ``docs/benchmarks_w2d_raw.json``
(``--quick``: to a file in the temp directory unless ``--out`` is given).  A peer that is
not installed is skipped with a note.  Install the peers with the CPU build of torch::

    pip install torch==2.13.0   # the local +cpu wheel
    pip install flow_matching==1.0.10 torchdiffeq==0.2.5
    pip install --no-deps torchcfm==1.0.7 && pip install POT
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback

import numpy as np

# Run from a checkout without installing fmjax: put the repository root on the path.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

FRAMEWORKS = ("fmjax", "flow_matching", "torchcfm")
DP = "fmjax-dp"  # the fmjax side with a mesh over the CPU devices (--cpu-devices)
PEERS = ("flow_matching", "torchcfm")
ROWS = ("train", "sample", "likelihood", "quality", "small", "matmul")
CHECKERBOARD_SCALE = 0.45
MMD_BANDWIDTHS = (0.25, 0.5, 1.0, 2.0)  # RBF sigmas, in data units (cells are 2.22 wide)
SEED = 0

W2D = {"hidden": 512, "depth": 4, "activation": "silu"}
W2D_SMALL = {"hidden": 64, "depth": 3, "activation": "selu"}

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


# ----------------------------------------------------------------------------- helpers


def log(msg):
    print(f"[w2d {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pkg_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def available(framework):
    """(ok, reason) for a framework being importable."""
    mods = {
        "fmjax": ["jax", "fmjax", "optax"],
        "flow_matching": ["torch", "flow_matching", "torchdiffeq"],
        "torchcfm": ["torch", "torchcfm", "torchdiffeq"],
    }[framework]
    for m in mods:
        try:
            importlib.import_module(m)
        except Exception as e:  # noqa: BLE001 - any import failure means "skip"
            return False, f"{m} not importable ({type(e).__name__}: {e})"
    return True, ""


def bench(fn, repeats):
    """Run ``fn`` (which must return after the work is done) 1 + repeats times.

    Returns ``(first_call_s, [times], last_output)``; the first call is timed apart.
    """
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return first, times, out


def summarize(times):
    return {
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "samples": list(times),
    }


def interleave(fns, repeats, min_seconds=0.0):
    """Time ``fns`` (label -> callable) in ``repeats`` rounds, one turn of each per round.

    The machine's speed drifts by tens of percent over minutes, so timing one framework's
    repeats after another's compares different machines; in rounds every framework sees the
    same stretch of time. Round ``r`` starts at label ``r mod k`` (no fixed order). A turn
    calls the callable until ``min_seconds`` have passed (at least once) and records the
    mean time per call, so a 50 ms call and a 300 ms call are each averaged over a similar
    stretch of the machine's noise. With ``min_seconds=0`` a turn is one call, which follows
    another framework's work: a call of about a millisecond then measures what a request
    arriving after other work sees, not a hot loop of the same call.
    Returns ``(times, outputs, errors)``: label -> list of seconds per call, label -> last
    output, label -> exception text for a callable that raised (dropped from later rounds).
    """
    labels = list(fns)
    times = {label: [] for label in labels}
    outputs, errors = {}, {}
    for r in range(repeats):
        k = r % len(labels) if labels else 0
        for label in labels[k:] + labels[:k]:
            if label in errors:
                continue
            calls, t0 = 0, time.perf_counter()
            try:
                while True:
                    outputs[label] = fns[label]()
                    calls += 1
                    elapsed = time.perf_counter() - t0
                    if elapsed >= min_seconds:
                        break
            except Exception as e:  # noqa: BLE001 - one framework failing ends only its line
                traceback.print_exc(file=sys.stderr)
                errors[label] = f"{type(e).__name__}: {e}"
                continue
            times[label].append(elapsed / calls)
    return times, outputs, errors


def round_ratios(times, label, peers):
    """Per round: the fastest peer's time over ``label``'s time (>1: ``label`` is faster).

    ``times`` maps label -> per-round seconds from :func:`interleave`; a round in which a
    peer has no time (it failed) is left out. None when no peer has a time."""
    peers = [p for p in peers if times.get(p)]
    n = min([len(times.get(label, []))] + [len(times[p]) for p in peers]) if peers else 0
    if n == 0:
        return None
    return [min(times[p][i] for p in peers) / times[label][i] for i in range(n)]


def checkerboard_np(rng, n):
    """The same checkerboard, in numpy, for the evaluation sets shared by all frameworks."""
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


def _layer_order(name):
    digits = re.sub(r"\D", "", name)
    return (name == "out", int(digits) if digits else 0)


# ----------------------------------------------------------------------------- weights
# A weight set is a list of (kernel (in, out), bias (out,)) numpy float32 pairs, in order.


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


def flax_to_layers(variables):
    p = variables["params"]
    names = sorted(p.keys(), key=_layer_order)
    return [
        (np.asarray(p[n]["kernel"], np.float32), np.asarray(p[n]["bias"], np.float32))
        for n in names
    ]


def layers_to_flax(layers, template):
    import jax.numpy as jnp

    p = template["params"]
    names = sorted(p.keys(), key=_layer_order)
    if len(names) != len(layers):
        raise ValueError(f"flax model has {len(names)} Dense layers, weights {len(layers)}")
    new = {}
    for n, (k, b) in zip(names, layers, strict=True):
        if p[n]["kernel"].shape != k.shape:
            raise ValueError(f"{n}: kernel {p[n]['kernel'].shape} vs weights {k.shape}")
        new[n] = {"kernel": jnp.asarray(k), "bias": jnp.asarray(b)}
    return {**template, "params": new}


def torch_linears(net):
    import torch

    return [m for m in net.modules() if isinstance(m, torch.nn.Linear)]


def torch_to_layers(net):
    return [
        (m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy())
        for m in torch_linears(net)
    ]


def layers_to_torch(net, layers):
    import torch

    lins = torch_linears(net)
    if len(lins) != len(layers):
        raise ValueError(f"torch model has {len(lins)} Linear layers, weights {len(layers)}")
    with torch.no_grad():
        for m, (k, b) in zip(lins, layers, strict=True):
            m.weight.copy_(torch.from_numpy(np.array(k.T, np.float32)))
            m.bias.copy_(torch.from_numpy(np.array(b, np.float32)))


# ----------------------------------------------------------------------------- MMD


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


# ----------------------------------------------------------------------------- fmjax side


class FmjaxSide:
    name = "fmjax"

    def __init__(self, spec, mesh=None):
        import jax
        import jax.numpy as jnp

        import fmjax
        import fmjax.data.toy
        import fmjax.models

        self.jax, self.jnp, self.fmjax = jax, jnp, fmjax
        self.spec = spec
        self.mesh = mesh  # data parallel over the CPU devices (fmjax.use_cpu_devices)
        self.model = fmjax.models.MLP(
            hidden=spec["hidden"],
            depth=spec["depth"],
            activation=spec["activation"],
            time_embedding="raw",
        )
        self.path = fmjax.paths.CondOT(sigma_min=0.0)

    def init(self, seed):
        jax, jnp = self.jax, self.jnp
        return self.model.init(
            jax.random.PRNGKey(seed), jnp.zeros((1,), jnp.float32), jnp.zeros((1, 2), jnp.float32)
        )

    def params_from_layers(self, layers):
        return layers_to_flax(layers, self.init(0))

    def make_trainer(self, batch, seed, lr=1e-3):
        """(state, step, dummy_batch); fresh checkerboard data is drawn inside the step."""
        import optax

        import fmjax.train  # imported here: the sampling rows do not need it

        jax, fmjax = self.jax, self.fmjax
        model, path = self.model, self.path
        tx = optax.adam(lr)

        def loss_fn(params, key, _batch):
            k_data, k_loss = jax.random.split(key)
            x1 = fmjax.data.toy.checkerboard(k_data, batch)
            return fmjax.losses.cfm_loss(
                lambda t, x: model.apply(params, t, x), path, k_loss, x1, reduction="mean"
            )

        def loss_on_batch(params, key, x1):  # for the fused variant (data drawn by it)
            return fmjax.losses.cfm_loss(
                lambda t, x: model.apply(params, t, x), path, key, x1, reduction="mean"
            )

        self._loss_fn, self._tx = loss_on_batch, tx
        params = self.init(seed)
        state = fmjax.train.TrainState.create(params, tx, jax.random.PRNGKey(seed + 1))
        step = fmjax.train.make_train_step(loss_fn, tx, ema_decay=None)
        dummy = self.jnp.zeros((1,), self.jnp.float32)
        return state, step, dummy

    def train_timer(self, batch, steps, seed=SEED):
        """``(first_call_s, run)``: ``run()`` makes ``steps`` jitted steps, one call each,
        and returns the last loss; the first call (compile + one step) is made here."""
        jax = self.jax
        box = {}
        box["state"], step, dummy = self.make_trainer(batch, seed)

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

        jax, fmjax = self.jax, self.fmjax
        state, _, _ = self.make_trainer(batch, seed)
        if self.mesh is not None:
            state = fmjax.train.sharding.replicate(state, self.mesh)
        run_k = fmjax.train.make_fused_train_steps(
            self._loss_fn,
            self._tx,
            lambda key: fmjax.data.toy.checkerboard(key, batch),
            steps,
            ema_decay=None,
            mesh=self.mesh,
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
        state, step, dummy = self.make_trainer(batch, seed)
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, dummy)
        jax.block_until_ready(state.params)
        dt = time.perf_counter() - t0
        loss = float(metrics["loss"])
        return state.params, {"train_s": dt, "steps_per_s": steps / dt, "final_loss": loss}

    def field(self, params):
        return self.jax.tree_util.Partial(self.model.apply, params)

    # sampling / likelihood: return (output numpy, nfe int)
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


# ----------------------------------------------------------------------------- torch sides


def torch_checkerboard(batch_size, device="cpu"):
    """``inf_train_gen`` of Meta's flow_matching 2-D example, verbatim."""
    import torch

    x1 = torch.rand(batch_size, device=device) * 4 - 2
    x2_ = (
        torch.rand(batch_size, device=device)
        - torch.randint(high=2, size=(batch_size,), device=device) * 2
    )
    x2 = x2_ + (torch.floor(x1) % 2)
    data = 1.0 * torch.cat([x1[:, None], x2[:, None]], dim=1) / 0.45
    return data.float()


def torch_net(spec):
    """nn.Sequential Linear(3,h) act ... Linear(h,2) on concat(x, t)."""
    import torch

    act = {"silu": torch.nn.SiLU, "selu": torch.nn.SELU}[spec["activation"]]
    h, depth = spec["hidden"], spec["depth"]
    layers = [torch.nn.Linear(3, h), act()]
    for _ in range(depth - 1):
        layers += [torch.nn.Linear(h, h), act()]
    layers += [torch.nn.Linear(h, 2)]
    return torch.nn.Sequential(*layers)


def torch_gaussian_log_prob(x):
    import torch

    return -0.5 * torch.sum(x * x, dim=1) - x.shape[1] * 0.5 * math.log(2 * math.pi)


class TorchSide:
    """Shared torch plumbing; subclasses define the model call, training loop and solvers."""

    name = "torch"

    def __init__(self, spec):
        import torch
        import torchdiffeq

        self.torch, self.torchdiffeq = torch, torchdiffeq
        self.spec = spec
        self.nfe = 0

    def new_net(self, seed):
        self.torch.manual_seed(seed)
        return self.make_net()

    def make_net(self):
        return torch_net(self.spec)

    def params_from_layers(self, layers):
        net = self.new_net(0)
        layers_to_torch(net, layers)
        net.eval()
        return net

    def train_timer(self, batch, steps, seed=SEED):
        """``(None, run)``: ``run()`` makes ``steps`` steps of the peer's own loop and
        returns the last loss; two untimed warm-up steps are made here."""
        torch = self.torch
        net = self.new_net(seed)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        step = self.make_step(net, opt, batch)

        def run_n(n):
            for _ in range(n):
                loss = step()
            return float(loss)

        run_n(2)
        return None, lambda: run_n(steps)

    def train(self, batch, steps, seed=SEED):
        torch = self.torch
        net = self.new_net(seed)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        step = self.make_step(net, opt, batch)
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step()
        dt = time.perf_counter() - t0
        net.eval()
        return net, {"train_s": dt, "steps_per_s": steps / dt, "final_loss": float(loss)}

    # generic torchdiffeq plumbing (the torchcfm way; flow_matching overrides with ODESolver)
    def velocity(self, net, t, x):
        self.nfe += 1
        return net(torch_cat_xt(self.torch, x, t))

    def odeint_kwargs(self, solver, step_size, steps, tol):
        if solver == "dopri5":
            return {"method": "dopri5", "rtol": tol, "atol": tol}
        if steps is not None:
            step_size = 1.0 / steps
        return {"method": solver, "options": {"step_size": step_size}}

    def sample(self, net, x0, solver, step_size=None, steps=None, tol=1e-5):
        torch = self.torch
        self.nfe = 0
        x0 = torch.as_tensor(np.asarray(x0))
        t_span = torch.tensor([0.0, 1.0])
        with torch.no_grad():
            traj = self.torchdiffeq.odeint(
                lambda t, x: self.velocity(net, t, x),
                x0,
                t_span,
                **self.odeint_kwargs(solver, step_size, steps, tol),
            )
        return traj[-1], self.nfe

    def log_likelihood(self, net, x1, divergence, solver, step_size=None, tol=1e-5, seed=SEED):
        """torchdiffeq on [x, delta_logp] from t=1 to t=0; divergence by autograd."""
        torch = self.torch
        self.nfe = 0
        x1 = torch.as_tensor(np.asarray(x1))
        torch.manual_seed(seed)
        z = (torch.randn_like(x1) < 0) * 2.0 - 1.0  # Rademacher probe, fixed over the solve
        exact = divergence == "exact"

        def aug(t, state):
            x = state[0]
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                v = self.velocity(net, t, x)
                if exact:
                    div = torch.zeros(x.shape[0])
                    d = x.shape[1]
                    for i in range(d):
                        g = torch.autograd.grad(v[:, i].sum(), x, retain_graph=i < d - 1)[0]
                        div = div + g[:, i]
                else:
                    g = torch.autograd.grad((v * z).sum(), x)[0]
                    div = (g * z).sum(dim=1)
            return v.detach(), div.detach()

        state0 = (x1, torch.zeros(x1.shape[0]))
        with torch.no_grad():
            xs, deltas = self.torchdiffeq.odeint(
                aug,
                state0,
                torch.tensor([1.0, 0.0]),
                **self.odeint_kwargs(solver, step_size, None, tol),
            )
        logp = torch_gaussian_log_prob(xs[-1]) + deltas[-1]
        return logp, self.nfe


def torch_cat_xt(torch, x, t):
    """concat(x, t) with t a scalar tensor (ODE solvers) or (B,) (training)."""
    t = torch.as_tensor(t, dtype=x.dtype)
    if t.ndim == 0:
        t = t.repeat(x.shape[0])
    return torch.cat([x, t[:, None]], dim=-1)


class FlowMatchingSide(TorchSide):
    """Meta's flow_matching: AffineProbPath(CondOTScheduler()) + ODESolver."""

    name = "flow_matching"

    def __init__(self, spec):
        super().__init__(spec)
        from flow_matching.path import AffineProbPath
        from flow_matching.path.scheduler import CondOTScheduler
        from flow_matching.solver import ODESolver
        from flow_matching.utils import ModelWrapper

        self.path = AffineProbPath(scheduler=CondOTScheduler())
        self.ODESolver = ODESolver
        side = self

        class CountingWrapper(ModelWrapper):
            """The example's WrappedModel, counting forward calls (true NFE)."""

            def forward(self, x, t, **extras):
                side.nfe += 1
                return self.model(torch_cat_xt(side.torch, x, t))

        self.Wrapper = CountingWrapper

    def make_step(self, net, opt, batch):
        torch, path = self.torch, self.path

        def step():  # the training loop of the flow_matching 2-D example
            opt.zero_grad()
            x_1 = torch_checkerboard(batch)
            x_0 = torch.randn_like(x_1)
            t = torch.rand(x_1.shape[0])
            path_sample = path.sample(t=t, x_0=x_0, x_1=x_1)
            pred = net(torch_cat_xt(torch, path_sample.x_t, path_sample.t))
            loss = torch.pow(pred - path_sample.dx_t, 2).mean()
            loss.backward()
            opt.step()
            return loss.detach()

        return step

    def sample(self, net, x0, solver, step_size=None, steps=None, tol=1e-5):
        torch = self.torch
        self.nfe = 0
        solver_obj = self.ODESolver(velocity_model=self.Wrapper(net))
        x0 = torch.as_tensor(np.asarray(x0))
        if solver == "dopri5":
            x = solver_obj.sample(x_init=x0, step_size=None, method="dopri5", atol=tol, rtol=tol)
        else:
            if steps is not None:
                step_size = 1.0 / steps
            x = solver_obj.sample(x_init=x0, step_size=step_size, method=solver)
        return x, self.nfe

    def log_likelihood(self, net, x1, divergence, solver, step_size=None, tol=1e-5, seed=SEED):
        torch = self.torch
        self.nfe = 0
        solver_obj = self.ODESolver(velocity_model=self.Wrapper(net))
        x1 = torch.as_tensor(np.asarray(x1))
        torch.manual_seed(seed)
        kw = {
            "x_1": x1,
            "log_p0": torch_gaussian_log_prob,
            "exact_divergence": divergence == "exact",
        }
        if solver == "dopri5":
            kw.update(step_size=None, method="dopri5", atol=tol, rtol=tol)
        else:
            kw.update(step_size=step_size, method=solver)
        _, logp = solver_obj.compute_likelihood(**kw)
        return logp.detach(), self.nfe


class TorchCFMSide(TorchSide):
    """torchcfm: ConditionalFlowMatcher(sigma=0) + torchdiffeq.odeint (its examples' way)."""

    name = "torchcfm"

    def __init__(self, spec):
        super().__init__(spec)
        from torchcfm.conditional_flow_matching import ConditionalFlowMatcher

        self.fm = ConditionalFlowMatcher(sigma=0.0)

    def make_net(self):
        if self.spec == W2D_SMALL:  # torchcfm's own example MLP is exactly W2D-small
            from torchcfm.models import MLP

            return MLP(dim=2, time_varying=True, w=64)
        return torch_net(self.spec)

    def make_step(self, net, opt, batch):
        torch, fm = self.torch, self.fm

        def step():  # the training loop of torchcfm's 2-D examples
            opt.zero_grad()
            x0 = torch.randn(batch, 2)
            x1 = torch_checkerboard(batch)
            t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
            vt = net(torch.cat([xt, t[:, None]], dim=-1))
            loss = torch.mean((vt - ut) ** 2)
            loss.backward()
            opt.step()
            return loss.detach()

        return step


SIDES = {"fmjax": FmjaxSide, "flow_matching": FlowMatchingSide, "torchcfm": TorchCFMSide}


# ----------------------------------------------------------------------------- the runner


class Runner:
    def __init__(self, args, cfg, frameworks):
        self.args, self.cfg, self.frameworks = args, cfg, frameworks
        self.records = []
        self.sides = {}
        self.shared = {}  # spec name -> layers
        self.quality_models = {}  # framework -> trained W2D params (for reuse as shared)

    def side(self, fw, spec_name):
        key = (fw, spec_name)
        if key not in self.sides:
            spec = W2D if spec_name == "W2D" else W2D_SMALL
            if fw == DP:
                import fmjax.train

                self.sides[key] = FmjaxSide(spec, mesh=fmjax.train.sharding.make_mesh())
            else:
                self.sides[key] = SIDES[fw](spec)
        return self.sides[key]

    def dp_label(self):
        """The fmjax data-parallel variant's name, or None when it does not run."""
        n = self.args.cpu_devices
        return f"fmjax ({n} CPU devices)" if n > 1 and "fmjax" in self.frameworks else None

    def record(self, **kw):
        kw["loadavg_1m"] = os.getloadavg()[0]  # other processes on the machine skew timings
        self.records.append(kw)
        if "error" in kw:
            log(f"{kw['row']}/{kw['case']}/{kw['framework']}: ERROR {kw['error']}")
        else:
            med = kw.get("median")
            log(
                f"{kw['row']}/{kw['case']}/{kw['framework']}: "
                f"{med if med is None else f'{med:.4g}'} {kw.get('unit', '')} "
                f"nfe={kw.get('nfe')} first={kw.get('first_call_s')}"
            )

    def guarded(self, row, case, fw, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - record it and go on with the other rows
            traceback.print_exc(file=sys.stderr)
            self.record(row=row, case=case, framework=fw, error=f"{type(e).__name__}: {e}")

    # --- shared weights -------------------------------------------------------------

    def shared_layers(self, spec_name):
        if spec_name in self.shared:
            return self.shared[spec_name]
        spec = W2D if spec_name == "W2D" else W2D_SMALL
        path = self.args.weights if spec_name == "W2D" else self.args.weights_small
        if path and os.path.exists(path):
            layers = load_layers(path)
            check_layers(layers, spec["hidden"], spec["depth"])
            log(f"{spec_name}: loaded shared weights from {path}")
            self.shared[spec_name] = layers
            return layers
        if spec_name == "W2D" and self.quality_models:
            fw, params = next(iter(self.quality_models.items()))
            layers = flax_to_layers(params) if fw == "fmjax" else torch_to_layers(params)
            src = f"the {fw} model of the quality row ({self.cfg['quality_steps']} steps)"
        else:
            steps = self.cfg["weights_steps" if spec_name == "W2D" else "small_weights_steps"]
            batch = self.cfg["train_batch" if spec_name == "W2D" else "small_batch"]
            layers, trainer = None, None
            for cand in ("fmjax", "flow_matching", "torchcfm"):
                if not available(cand)[0]:
                    continue
                log(f"{spec_name}: training shared weights with {cand}, {steps} steps")
                try:
                    params, _ = self.side(cand, spec_name).train(batch, steps, seed=SEED + 7)
                except Exception as e:  # noqa: BLE001 - fall back to the next framework
                    log(f"{spec_name}: training with {cand} failed ({type(e).__name__}: {e})")
                    continue
                trainer = cand
                layers = flax_to_layers(params) if cand == "fmjax" else torch_to_layers(params)
                break
            if layers is None:
                raise RuntimeError("no framework could train the shared weights")
            src = f"{trainer}, {steps} steps of batch {batch}"
        check_layers(layers, spec["hidden"], spec["depth"])
        self.shared[spec_name] = layers
        self.weights_source = getattr(self, "weights_source", {})
        self.weights_source[spec_name] = src
        if path:
            save_layers(path, layers)
            log(f"{spec_name}: wrote shared weights to {path}")
        return layers

    # --- rows -----------------------------------------------------------------------

    def peer_ratios(self, times):
        """key -> {"ratio_*"}: each fmjax line's per-round ratio to the faster peer."""
        peers = [fw for fw in PEERS if fw in times]
        out = {}
        for key in times:
            ratios = None if key in PEERS else round_ratios(times, key, peers)
            if ratios:
                out[key] = {f"ratio_{k}": v for k, v in summarize(ratios).items()}
        return out

    def run_train(self, spec_name, batch, steps, row):
        case = f"train {spec_name} batch {batch}"
        lines = []  # (side key, label, timer method)
        for fw in self.frameworks:
            lines.append((fw, fw, "train_timer"))
            if fw == "fmjax" and not self.args.no_fused:
                lines.append((fw, f"fmjax (fused x{steps})", "fused_train_timer"))
                if self.dp_label() and batch % self.args.cpu_devices == 0:
                    lines.append((DP, f"{self.dp_label()}, fused x{steps}", "fused_train_timer"))
        timers = {}  # label -> (first_call_s, run)

        def prepare(key, label, method):
            timers[label] = getattr(self.side(key, spec_name), method)(batch, steps)

        for key, label, method in lines:
            self.guarded(row, case, label, functools.partial(prepare, key, label, method))
        times, losses, errors = interleave(
            {k: v[1] for k, v in timers.items()}, self.args.repeats, self.args.min_turn
        )
        ratios = self.peer_ratios(times)
        spec = W2D if spec_name == "W2D" else W2D_SMALL
        flop = train_flop_per_step(spec["hidden"], spec["depth"], batch)
        for label, (first, _) in timers.items():
            if label in errors:
                self.record(row=row, case=case, framework=label, error=errors[label])
                continue
            rates = summarize([steps / t for t in times[label]])
            self.record(
                row=row,
                case=case,
                framework=label,
                unit="steps/s",
                first_call_s=first,
                flop_per_step=flop,
                gflops=flop * rates["median"] / 1e9,
                loss=losses[label],
                **rates,
                **ratios.get(label, {}),
            )

    def run_solve_cases(self, row, spec_name, cases):
        """cases: list of (case label, kind 'sample'|'lik', inputs, kwargs, warm_n).

        Per case every framework is prepared (fmjax: first call, timed; peers: warm-up on
        ``warm_n`` points), then all are timed in interleaved rounds."""
        layers = self.shared_layers(spec_name)
        for label, kind, inputs, kw, warm_n in cases:
            fws = list(self.frameworks)
            if self.dp_label() and inputs.shape[0] % self.args.cpu_devices == 0:
                fws.insert(fws.index("fmjax") + 1, DP)
            prepared = {}
            for fw in fws:
                self.guarded(
                    row,
                    label,
                    self.fw_label(fw),
                    functools.partial(
                        self.prepare_solve,
                        prepared,
                        spec_name,
                        layers,
                        fw,
                        kind,
                        inputs,
                        kw,
                        warm_n,
                    ),
                )
            turn = 0.0 if "(latency)" in label else self.args.min_turn
            times, results, errors = interleave(
                {fw: p["fn"] for fw, p in prepared.items()}, self.args.repeats, turn
            )
            ratios = self.peer_ratios(times)
            outs = {}
            for fw, p in prepared.items():
                if fw in errors:
                    self.record(row=row, case=label, framework=self.fw_label(fw), error=errors[fw])
                    continue
                self.record_solve(
                    row,
                    label,
                    kind,
                    kw,
                    inputs,
                    fw,
                    p,
                    times[fw],
                    results[fw],
                    outs,
                    ratios.get(fw, {}),
                )

    def _compare(self, outs, fw, out):
        """max |out - first framework's out| (numpy)."""
        out = np.asarray(out.detach().numpy() if hasattr(out, "detach") else out)
        if not outs:
            outs[fw] = out
            return None
        ref = next(iter(outs.values()))
        outs[fw] = out
        return float(np.max(np.abs(out - ref)))

    def fw_label(self, fw):
        return self.dp_label() if fw == DP else fw

    def prepare_solve(self, prepared, spec_name, layers, fw, kind, inputs, kw, warm_n):
        side = self.side(fw, spec_name)
        params = side.params_from_layers(layers)
        method = side.sample if kind == "sample" else side.log_likelihood
        first, extra = None, {}
        if fw in ("fmjax", DP):
            t0 = time.perf_counter()
            method(params, inputs, **kw)
            first = time.perf_counter() - t0
        else:
            warm_x = (
                np.zeros((warm_n, 2), np.float32)
                if kind == "sample"
                else checkerboard_np(np.random.default_rng(1), warm_n)
            )
            method(params, warm_x, **kw)
        if fw == "fmjax" and not self.args.no_nfe_check:  # (DP: the same NFE, tested)
            extra["nfe_counted"] = side.counted_nfe(
                "sample" if kind == "sample" else "log_likelihood", params, inputs, **kw
            )
        prepared[fw] = {
            "fn": functools.partial(method, params, inputs, **kw),
            "first": first,
            "extra": extra,
        }

    def record_solve(self, row, label, kind, kw, inputs, fw, prep, times, result, outs, ratio):
        out, nfe = result
        res = summarize(times)
        first, extra = prep["first"], dict(prep["extra"])
        extra["compile_s_est"] = None if first is None else max(0.0, first - res["median"])
        diff = self._compare(outs, fw, out)
        if kind == "lik":
            extra["mean_logp"] = float(np.mean(outs[fw]))
            extra["max_abs_diff_logp_vs_first"] = diff
            if kw.get("divergence") == "hutchinson" and diff is not None:
                extra["note"] = "own random probes: logp differs per framework"
        else:
            extra["max_abs_diff_x_vs_first"] = diff
        self.record(
            row=row,
            case=label,
            framework=self.fw_label(fw),
            unit="s",
            nfe=nfe,
            first_call_s=first,
            n=int(inputs.shape[0]),
            **res,
            **extra,
            **ratio,
        )

    def run_sample(self):
        c = self.cfg
        rng = np.random.default_rng(SEED + 1)
        x0 = rng.standard_normal((c["sample_n"], 2)).astype(np.float32)
        n, h, tol, w = c["sample_n"], c["step_size"], c["tol"], c["torch_warm_n"]
        self.run_solve_cases(
            "sample",
            "W2D",
            [
                (
                    f"sample {n} midpoint h={h}",
                    "sample",
                    x0,
                    {"solver": "midpoint", "step_size": h},
                    w,
                ),
                (
                    f"sample {n} dopri5 tol={tol:g}",
                    "sample",
                    x0,
                    {"solver": "dopri5", "tol": tol},
                    w,
                ),
            ],
        )

    def run_likelihood(self):
        c = self.cfg
        x1 = checkerboard_np(np.random.default_rng(SEED + 2), c["lik_n"])
        n, h, tol, w = c["lik_n"], c["step_size"], c["tol"], c["torch_warm_n"]
        self.run_solve_cases(
            "likelihood",
            "W2D",
            [
                (
                    f"loglik {n} exact midpoint h={h}",
                    "lik",
                    x1,
                    {"divergence": "exact", "solver": "midpoint", "step_size": h},
                    w,
                ),
                (
                    f"loglik {n} hutchinson(1) midpoint h={h}",
                    "lik",
                    x1,
                    {"divergence": "hutchinson", "solver": "midpoint", "step_size": h},
                    w,
                ),
                (
                    f"loglik {n} exact dopri5 tol={tol:g}",
                    "lik",
                    x1,
                    {"divergence": "exact", "solver": "dopri5", "tol": tol},
                    w,
                ),
            ],
        )

    def run_small(self):
        c = self.cfg
        self.run_train("W2D-small", c["small_batch"], c["small_train_steps"], "small")
        rng = np.random.default_rng(SEED + 3)
        n, tol, ns = c["small_sample_n"], c["tol"], c["small_euler_steps"]
        x0 = rng.standard_normal((n, 2)).astype(np.float32)
        x0_one = rng.standard_normal((1, 2)).astype(np.float32)
        x1 = checkerboard_np(np.random.default_rng(SEED + 4), c["small_lik_n"])
        self.run_solve_cases(
            "small",
            "W2D-small",
            [
                (
                    f"small sample {n} euler {ns} steps",
                    "sample",
                    x0,
                    {"solver": "euler", "steps": ns},
                    4,
                ),
                (
                    f"small sample {n} dopri5 tol={tol:g}",
                    "sample",
                    x0,
                    {"solver": "dopri5", "tol": tol},
                    4,
                ),
                (
                    f"small sample 1 dopri5 tol={tol:g} (latency)",
                    "sample",
                    x0_one,
                    {"solver": "dopri5", "tol": tol},
                    1,
                ),
                (
                    f"small loglik {x1.shape[0]} exact dopri5 tol={tol:g}",
                    "lik",
                    x1,
                    {"divergence": "exact", "solver": "dopri5", "tol": tol},
                    4,
                ),
            ],
        )

    def run_quality(self):
        c = self.cfg
        tol = c["tol"]
        held_out = checkerboard_np(np.random.default_rng(SEED + 5), c["quality_nll_n"])
        data_a = checkerboard_np(np.random.default_rng(SEED + 6), c["quality_mmd_n"])
        data_b = checkerboard_np(np.random.default_rng(SEED + 8), c["quality_mmd_n"])
        x0 = (
            np.random.default_rng(SEED + 9)
            .standard_normal((c["quality_mmd_n"], 2))
            .astype(np.float32)
        )
        t0 = time.perf_counter()
        floor = mmd2_unbiased(data_b, data_a)
        mmd_s = time.perf_counter() - t0
        self.record(
            row="quality",
            case="reference: data vs data",
            framework="-",
            unit="",
            mmd2=floor,
            mmd_s=mmd_s,
            nll=checkerboard_entropy(),
            note="true entropy and the MMD^2 of two independent data sets",
        )
        n_seeds = c["quality_seeds"]
        for fw in self.frameworks:
            case = f"after {c['quality_steps']} steps"
            per_seed = []

            def go(fw=fw, seed_i=0, case=case, per_seed=per_seed):
                side = self.side(fw, "W2D")
                # seed_i = 0 is the seed of every earlier single-seed run
                params, tr = side.train(
                    c["train_batch"], c["quality_steps"], seed=SEED + 11 + 100 * seed_i
                )
                self.quality_models.setdefault(fw, params)
                t1 = time.perf_counter()
                logp, nfe_l = side.log_likelihood(params, held_out, "exact", "dopri5", tol=tol)
                nll_s = time.perf_counter() - t1
                t1 = time.perf_counter()
                xs, nfe_s = side.sample(params, x0, "dopri5", tol=tol)
                sample_s = time.perf_counter() - t1
                logp = np.asarray(logp.detach().numpy() if hasattr(logp, "detach") else logp)
                xs = np.asarray(xs.detach().numpy() if hasattr(xs, "detach") else xs)
                rec = dict(
                    nll=float(-np.mean(logp)),
                    nll_sem=float(np.std(logp) / math.sqrt(len(logp))),
                    nll_nfe=nfe_l,
                    nll_s=nll_s,
                    mmd2=mmd2_unbiased(xs, data_a),
                    sample_nfe=nfe_s,
                    sample_s=sample_s,
                    **tr,
                )
                per_seed.append(rec)
                label = case if n_seeds == 1 else f"{case}, training seed {seed_i}"
                self.record(row="quality", case=label, framework=fw, unit="", **rec)

            for i in range(n_seeds):
                self.guarded("quality", case, fw, functools.partial(go, seed_i=i))
            if n_seeds > 1 and per_seed:
                nll = np.array([r["nll"] for r in per_seed])
                mmd = np.array([r["mmd2"] for r in per_seed])
                self.record(
                    row="quality",
                    case=f"{case}, mean of {len(per_seed)} training seeds",
                    framework=fw,
                    unit="",
                    nll=float(nll.mean()),
                    nll_seed_sd=float(nll.std(ddof=1)) if len(nll) > 1 else None,
                    mmd2=float(mmd.mean()),
                    mmd2_seed_sd=float(mmd.std(ddof=1)) if len(mmd) > 1 else None,
                    nll_nfe=float(np.mean([r["nll_nfe"] for r in per_seed])),
                    sample_nfe=float(np.mean([r["sample_nfe"] for r in per_seed])),
                    note="+- between seeds is the sample standard deviation",
                )

    def run_matmul(self):
        n, reps = self.cfg["matmul_n"], self.cfg["matmul_repeats"]
        flop = 2.0 * n**3
        import jax
        import jax.numpy as jnp

        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
        dot = jax.jit(jnp.dot)
        dot(a, b).block_until_ready()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            dot(a, b).block_until_ready()
            times.append(time.perf_counter() - t0)
        self.matmul_gflops = flop / min(times) / 1e9
        self.record(
            row="matmul",
            case=f"jnp.dot {n}x{n} fp32 (best of {reps})",
            framework="jax",
            unit="GFLOP/s",
            median=flop / statistics.median(times) / 1e9,
            min=flop / max(times) / 1e9,
            max=self.matmul_gflops,
            best=self.matmul_gflops,
        )
        try:
            import torch

            ta, tb = torch.randn(n, n), torch.randn(n, n)
            torch.mm(ta, tb)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                torch.mm(ta, tb)
                times.append(time.perf_counter() - t0)
            self.record(
                row="matmul",
                case=f"torch.mm {n}x{n} fp32 (best of {reps})",
                framework="torch",
                unit="GFLOP/s",
                median=flop / statistics.median(times) / 1e9,
                min=flop / max(times) / 1e9,
                max=flop / min(times) / 1e9,
                best=flop / min(times) / 1e9,
            )
        except ImportError:
            pass

    def add_fractions(self):
        peak = getattr(self, "matmul_gflops", None)
        if not peak:
            return
        for r in self.records:
            if r.get("unit") == "steps/s" and "gflops" in r:
                r["fraction_of_matmul"] = r["gflops"] / peak

    def run(self):
        rows = self.args.rows
        if "matmul" in rows:
            self.guarded("matmul", "matmul", "jax", self.run_matmul)
        if "train" in rows:
            self.run_train("W2D", self.cfg["train_batch"], self.cfg["train_steps"], "train")
        if "quality" in rows:
            self.run_quality()
        if "sample" in rows:
            self.guarded("sample", "shared weights", "-", self.run_sample)
        if "likelihood" in rows:
            self.guarded("likelihood", "shared weights", "-", self.run_likelihood)
        if "small" in rows:
            self.guarded("small", "W2D-small", "-", self.run_small)
        self.add_fractions()


# ----------------------------------------------------------------------------- output


def fmt(x, digits=4):
    if x is None:
        return ""
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 1e4 or abs(x) < 1e-3:
            return f"{x:.3e}"
        return f"{x:.{digits}g}"
    return str(x)


def markdown(records, meta):
    loads = [r["loadavg_1m"] for r in records if "loadavg_1m" in r]
    lines = [
        (
            f"W2D benchmark ({'quick' if meta['quick'] else 'full'}), {meta['date']}, "
            f"{meta['cpu']}, {meta['nproc']} cores, repeats={meta['repeats']}, 1-min load average "
            f"{meta['loadavg_start']:.2f} at start, max {max(loads, default=0.0):.2f} at a row's "
            f"end"
        ),
        "",
        "| row | case | framework | median | min-max | unit | NFE | first call (s) | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        notes = []
        if "error" in r:
            notes.append(f"ERROR {r['error']}")
        for k, label in (
            ("compile_s_est", "compile~"),
            ("nfe_counted", "counted NFE"),
            ("max_abs_diff_x_vs_first", "max|dx|"),
            ("mean_logp", "mean logp"),
            ("max_abs_diff_logp_vs_first", "max|dlogp|"),
            ("gflops", "GFLOP/s"),
            ("fraction_of_matmul", "of matmul"),
            ("loss", "loss"),
            ("nll", "NLL"),
            ("nll_sem", "+-"),
            ("nll_seed_sd", "seed sd"),
            ("mmd2", "MMD^2"),
            ("mmd2_seed_sd", "seed sd"),
            ("nll_nfe", "NLL NFE"),
            ("sample_nfe", "sample NFE"),
            ("steps_per_s", "train steps/s"),
            ("train_s", "train s"),
            ("final_loss", "final loss"),
            ("note", ""),
        ):
            if r.get(k) is not None:
                v = r[k]
                if k == "fraction_of_matmul":
                    notes.append(f"{100 * v:.1f}% {label}")
                else:
                    notes.append(f"{label} {fmt(v)}".strip())
        if r.get("ratio_median") is not None:
            notes.insert(0, f"vs faster peer {ratio_text(r)}")
        mm = "" if r.get("min") is None else f"{fmt(r['min'])}-{fmt(r['max'])}"
        lines.append(
            f"| {r['row']} | {r['case']} | {r['framework']} | {fmt(r.get('median'))} "
            f"| {mm} | {r.get('unit', '')} | {fmt(r.get('nfe'))} "
            f"| {fmt(r.get('first_call_s'))} | {'; '.join(notes)} |"
        )
    ratio_rows = [r for r in records if r.get("ratio_median") is not None]
    if ratio_rows:
        lines += [
            "",
            (
                "Per-round ratios: the faster peer's time over the fmjax line's time in "
                "the same round (> 1: fmjax is faster), median (min-max) over the rounds."
            ),
            "",
            "| row | case | fmjax line | ratio | rounds |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['row']} | {r['case']} | {r['framework']} | {ratio_text(r)} "
            f"| {len(r['ratio_samples'])} |"
            for r in ratio_rows
        ]
    return "\n".join(lines)


def ratio_text(r):
    return f"{r['ratio_median']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke check)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--only",
        default=",".join(FRAMEWORKS),
        help="comma-separated subset of " + ",".join(FRAMEWORKS),
    )
    ap.add_argument(
        "--rows", default=",".join(ROWS), help="comma-separated subset of " + ",".join(ROWS)
    )
    ap.add_argument(
        "--out",
        default=None,
        help="raw JSON output (default docs/benchmarks_w2d_raw.json; --quick: the temp directory)",
    )
    ap.add_argument(
        "--weights",
        default=None,
        help="W2D shared weights .npz: loaded if it exists, else written there",
    )
    ap.add_argument("--weights-small", default=None, help="the same for W2D-small")
    ap.add_argument("--quality-steps", type=int, default=None, help="override (3000)")
    ap.add_argument(
        "--quality-seeds",
        type=int,
        default=1,
        help="training runs (seeds) per framework in the quality row; with more "
        "than one, a line per seed and their mean and standard deviation",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument(
        "--no-fused",
        action="store_true",
        help="skip the extra fmjax row with make_fused_train_steps (lax.scan)",
    )
    ap.add_argument(
        "--no-nfe-check",
        action="store_true",
        help="skip the untimed fmjax NFE count by jax.debug.callback",
    )
    ap.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        help="fmjax.use_cpu_devices(N) first, and extra fmjax lines that split "
        "each batch over the N CPU devices (default: one per core; 1: none)",
    )
    ap.add_argument(
        "--min-turn",
        type=float,
        default=0.5,
        help="seconds each framework's turn in a round lasts at least (calls "
        "repeated, mean per call); 0: one call per turn",
    )
    ap.add_argument(
        "--tune-allocator",
        action="store_true",
        help="call fmjax.tune_cpu_allocator() first (process-wide: the PyTorch "
        "peers in this process get it too)",
    )
    args = ap.parse_args(argv)

    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in args.rows if r not in ROWS]
    only = [f.strip() for f in args.only.split(",") if f.strip()]
    bad += [f for f in only if f not in FRAMEWORKS]
    if bad:
        ap.error(f"unknown row(s)/framework(s): {bad}")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if not args.min_turn >= 0:
        ap.error(f"--min-turn must be >= 0 seconds; got {args.min_turn}")
    cfg = dict(QUICK if args.quick else FULL)
    if args.quality_steps is not None:
        cfg["quality_steps"] = args.quality_steps
    if args.quality_seeds < 1:
        ap.error(f"--quality-seeds must be >= 1; got {args.quality_seeds}")
    cfg["quality_seeds"] = args.quality_seeds
    if args.out is None:
        args.out = (
            os.path.join(tempfile.gettempdir(), "benchmarks_w2d_quick.json")
            if args.quick
            else os.path.join(
                os.path.dirname(__file__), os.pardir, "docs", "benchmarks_w2d_raw.json"
            )
        )

    import fmjax  # starts no JAX backend: the two settings below must come before one

    if args.cpu_devices is None:
        args.cpu_devices = fmjax.cpu_devices.num_cores()
    if args.cpu_devices < 1:
        ap.error("--cpu-devices must be >= 1")
    args.cpu_devices = fmjax.use_cpu_devices(args.cpu_devices)
    tuned_allocator = False
    if args.tune_allocator:
        tuned_allocator = fmjax.tune_cpu_allocator()
    frameworks, skipped = [], {}
    for fw in only:
        ok, why = available(fw)
        if ok:
            frameworks.append(fw)
        else:
            skipped[fw] = why
            print(f"NOTE: skipping {fw}: {why}")
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        pass

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "quick": args.quick,
        "repeats": args.repeats,
        "config": cfg,
        "frameworks": frameworks,
        "skipped": skipped,
        "rows": args.rows,
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "torch_threads": args.threads,
        "tuned_allocator": tuned_allocator,
        "cpu_devices": args.cpu_devices,
        "min_turn_s": args.min_turn,
        "versions": {
            p: pkg_version(p)
            for p in (
                "fmjax",
                "jax",
                "jaxlib",
                "flax",
                "optax",
                "diffrax",
                "torch",
                "flow_matching",
                "torchcfm",
                "torchdiffeq",
                "numpy",
            )
        },
        "W2D": dict(
            **W2D,
            params=num_params(W2D["hidden"], W2D["depth"]),
            train_flop_per_step=train_flop_per_step(
                W2D["hidden"], W2D["depth"], cfg["train_batch"]
            ),
        ),
        "W2D_small": dict(**W2D_SMALL, params=num_params(W2D_SMALL["hidden"], W2D_SMALL["depth"])),
        "true_entropy_nats": checkerboard_entropy(),
        "mmd_bandwidths": list(MMD_BANDWIDTHS),
    }
    meta["loadavg_start"] = os.getloadavg()[0]
    if meta["loadavg_start"] > 0.5:
        print(
            f"WARNING: 1-min load average {meta['loadavg_start']:.2f} before the start: other "
            "processes compete for the cores and skew the timings (torch with 2 threads "
            "suffers most: its threads wait for each other at every op)."
        )
    log(f"frameworks {frameworks}, rows {args.rows}, {'quick' if args.quick else 'full'}")
    runner = Runner(args, cfg, frameworks)
    t0 = time.perf_counter()
    runner.run()
    meta["total_s"] = time.perf_counter() - t0
    meta["weights_source"] = getattr(runner, "weights_source", {})
    if args.weights:
        meta["weights_file"] = args.weights
    table = markdown(runner.records, meta)
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {"meta": meta, "records": runner.records, "table": table}, f, indent=1, default=float
        )
    print(f"\nraw numbers: {os.path.abspath(args.out)}")
    return 0 if not any("error" in r for r in runner.records) else 1


if __name__ == "__main__":
    sys.exit(main())
