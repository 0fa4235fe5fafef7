"""One CPU device per core: ``fmjax.use_cpu_devices`` and data-parallel solves and fused steps.

The pytest process already runs JAX with one CPU device, so the multi-device checks run in
one fresh subprocess that calls ``fmjax.use_cpu_devices(4)`` itself.
"""

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import run_python

import fmjax
from fmjax import cpu, train

WORKER = r"""
import json, re, warnings
import fmjax
n = fmjax.use_cpu_devices(4)
import jax, jax.numpy as jnp, numpy as np, optax
from fmjax import train
from fmjax.train import sharding

res = {"returned": n, "devices": len(jax.devices())}
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    res["late_same"] = fmjax.use_cpu_devices(4)
    res["late_other"] = fmjax.use_cpu_devices(2)
res["late_warnings"] = [str(x.message) for x in w]

mesh = sharding.make_mesh()
# a field whose examples interact with nothing but their own row, nonlinear in x and t
W = jnp.array([[0.7, -1.2], [0.4, 0.9]])
def v(t, x):
    return jnp.tanh(x @ W) * (1.0 + t[:, None]) - 0.3 * x
x0 = np.random.default_rng(0).standard_normal((64, 2)).astype(np.float32)
solves = {
    "sample_dopri5": lambda m: fmjax.sample(v, x0, solver="dopri5", rtol=1e-6, atol=1e-6, mesh=m),
    "sample_euler": lambda m: fmjax.sample(v, x0, solver="euler", steps=20, mesh=m),
    "lik_exact": lambda m: fmjax.log_likelihood(v, x0, solver="dopri5", mesh=m),
    "lik_exact_max_norm": lambda m: fmjax.log_likelihood(v, x0, solver="dopri5",
                                                         error_norm="max", mesh=m),
    "lik_hutch": lambda m: fmjax.log_likelihood(v, x0, divergence="hutchinson",
                                                key=jax.random.key(3), solver="heun",
                                                steps=10, mesh=m),
}
# classifier-free guidance: one call of the conditional field on the interleaved 2B rows
labels = np.arange(64) % 3
def vc(t, x, y):
    return v(t, x) + 0.2 * y[:, None]
guided = fmjax.guidance.classifier_free(vc, labels, -1, 2.5)
solves["sample_guided"] = lambda m: fmjax.sample(guided, x0, solver="dopri5", mesh=m)
# conditions given to the solve go with their rows over the mesh
late = fmjax.guidance.classifier_free(vc, None, -1, 2.5)
solves["sample_guided_cond"] = lambda m: fmjax.sample(late, x0, cond=labels, solver="dopri5",
                                                      mesh=m)
solves["lik_exact_cond"] = lambda m: fmjax.log_likelihood(vc, x0, cond=labels, solver="dopri5",
                                                          mesh=m)
# ... which keeps the rows of a sharded batch on their devices: no collective in the field
xs0 = fmjax.batching.place_batch(x0, mesh)
ys = fmjax.batching.place_batch(jnp.asarray(labels), mesh)
hlo = jax.jit(lambda f, t, x: f(t, x)).lower(
    fmjax.guidance.classifier_free(vc, ys, -1, 2.5), jnp.zeros(64), xs0).compile().as_text()
res["guided_collectives"] = sorted(set(re.findall(
    r"all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter", hlo)))
for name, fn in solves.items():
    y1, s1 = fn(None)
    y4, s4 = fn(mesh)
    res[name] = {"nfe": [int(s1.nfe), int(s4.nfe)],
                 "maxdiff": float(np.max(np.abs(np.asarray(y1) - np.asarray(y4)))),
                 "scale": float(np.max(np.abs(np.asarray(y1)))),
                 "devices": [len(y1.sharding.device_set), len(y4.sharding.device_set)]}
try:
    fmjax.sample(v, x0[:6], solver="euler", steps=2, mesh=mesh)
except ValueError as e:
    res["indivisible"] = str(e)

# fused steps: a key-free per-row-mean loss gives the 1-device result; aux is the mean over
# devices of each device's value; each device gets its own key
def loss_fn(p, key, batch):
    u = jax.random.uniform(key)
    return jnp.mean(jnp.square(batch @ p["w"] - 1.0)), {"u": u, "row0": batch[0, 0]}
def data_fn(key):
    return jax.random.normal(key, (8, 2)) + jnp.arange(8.0)[:, None]
tx = optax.sgd(0.05)
p0 = {"w": jnp.array([0.5, -0.3])}
state = train.TrainState.create(p0, tx, jax.random.key(0))
one = train.make_fused_train_steps(loss_fn, tx, data_fn, 3, donate=False)
four = train.make_fused_train_steps(loss_fn, tx, data_fn, 3, donate=False, mesh=mesh)
s1, m1 = one(state)
s4, m4 = four(sharding.replicate(state, mesh))
last_key = jax.random.fold_in(state.rng, 2)
batch = data_fn(train.step_keys(state.rng, 2)[1])
res["fused"] = {
    "w": [np.asarray(s1.params["w"]).tolist(), np.asarray(s4.params["w"]).tolist()],
    "loss": [float(m1["loss"]), float(m4["loss"])],
    "u4": float(m4["u"]),
    "u_expected": float(np.mean([jax.random.uniform(jax.random.fold_in(last_key, i))
                                 for i in range(4)])),
    "u1": float(m1["u"]), "u1_expected": float(jax.random.uniform(last_key)),
    "row0": float(m4["row0"]), "row0_expected": float(jnp.mean(batch[::2, 0])),
    "replicated": bool(s4.params["w"].sharding.is_fully_replicated),
    "devices": len(s4.params["w"].sharding.device_set),
}
bad = train.make_fused_train_steps(loss_fn, tx, lambda k: jnp.ones((6, 2)), 1, mesh=mesh)
try:
    bad(sharding.replicate(state, mesh))
except ValueError as e:
    res["fused_indivisible"] = str(e)

# per-step training: the global view and shard_loss=True against one device, one step
x = data_fn(jax.random.key(9))
one_step = train.make_train_step(loss_fn, tx, donate=False)
s1, m1 = one_step(state, x)
rep = sharding.replicate(state, mesh)
xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
sg, mg = train.make_train_step(loss_fn, tx, donate=False, mesh=mesh)(rep, xs)
ss, ms = train.make_train_step(loss_fn, tx, donate=False, mesh=mesh, shard_loss=True)(rep, xs)
key0 = jax.random.fold_in(state.rng, 0)
res["per_step"] = {
    "w": [np.asarray(a.params["w"]).tolist() for a in (s1, sg, ss)],
    "loss": [float(a["loss"]) for a in (m1, mg, ms)],
    "u": [float(a["u"]) for a in (m1, mg, ms)],
    "u_shard_expected": float(np.mean([jax.random.uniform(jax.random.fold_in(key0, i))
                                       for i in range(4)])),
    "u_one_expected": float(jax.random.uniform(key0)),
    "row0_shard": float(ms["row0"]), "row0_shard_expected": float(jnp.mean(x[::2, 0])),
    # result types of the shard_loss step's all-reduces ("f32[n]" or a "(...)" tuple)
    "all_reduces": [ln.split("=", 1)[1].split(" all-reduce(")[0].strip() for ln in
                    train.make_train_step(loss_fn, tx, donate=False, mesh=mesh,
                                          shard_loss=True).lower(rep, xs).compile()
                    .as_text().splitlines() if " all-reduce(" in ln],
}

# gradient accumulation on the mesh: 8 rows, 2 per device, 2 microbatches
def collectives(step):
    hlo = step.lower(rep, xs).compile().as_text()
    return sorted(re.findall(r"all-gather|all-reduce|all-to-all|collective-permute|"
                             r"reduce-scatter", hlo))
mb_global = train.make_train_step(loss_fn, tx, donate=False, mesh=mesh, microbatches=2)
mb_shard = train.make_train_step(loss_fn, tx, donate=False, mesh=mesh, shard_loss=True,
                                 microbatches=2)
res["microbatched"] = {
    "w": [np.asarray(f(rep, xs)[0].params["w"]).tolist() for f in (mb_global, mb_shard)],
    "loss": [float(f(rep, xs)[1]["loss"]) for f in (mb_global, mb_shard)],
    "collectives": [collectives(f) for f in (mb_global, mb_shard)],
}
try:
    train.make_train_step(loss_fn, tx, donate=False, mesh=mesh, shard_loss=True,
                          microbatches=4)(rep, xs)
except ValueError as e:
    res["microbatched"]["indivisible"] = str(e)

# a mesh from jax.make_mesh (JAX's default Explicit axes), the state placed with
# sharding.replicate or by hand: the same steps as on sharding.make_mesh()'s Auto axes
emesh = jax.make_mesh((4,), ("data",))
P = jax.sharding.PartitionSpec
by_hand = lambda: jax.device_put(state, jax.sharding.NamedSharding(emesh, P()))
fused_e = train.make_fused_train_steps(loss_fn, tx, data_fn, 3, donate=False, mesh=emesh)
xe = jax.device_put(x, jax.sharding.NamedSharding(emesh, P("data")))
res["explicit_mesh"] = {
    "axis_types": str(emesh.axis_types),
    "fused": [np.asarray(fused_e(st)[0].params["w"]).tolist()
              for st in (sharding.replicate(state, emesh), by_hand())],
    "fused_auto": np.asarray(s4.params["w"]).tolist(),
    "shard_loss": np.asarray(train.make_train_step(
        loss_fn, tx, donate=False, mesh=emesh, shard_loss=True)(by_hand(), xe)[0]
        .params["w"]).tolist(),
    "shard_loss_auto": np.asarray(ss.params["w"]).tolist(),
}
# an x0 / x1 already sharded on those Explicit axes, no mesh= (adaptive solves crashed in
# the error norm's reduction)
xe0 = jax.device_put(x0, jax.sharding.NamedSharding(emesh, P("data")))
pre = {"sample": lambda x: fmjax.sample(v, x, solver="dopri5", rtol=1e-6, atol=1e-6),
       "sample_max": lambda x: fmjax.sample(v, x, solver="dopri5", error_norm="max"),
       "lik": lambda x: fmjax.log_likelihood(v, x, solver="dopri5")}
res["explicit_presharded"] = {
    name: {"maxdiff": float(np.max(np.abs(np.asarray(fn(x0)[0]) - np.asarray(fn(xe0)[0])))),
           "nfe": [int(fn(x0)[1].nfe), int(fn(xe0)[1].nfe)],
           "devices": len(fn(xe0)[0].sharding.device_set)}
    for name, fn in pre.items()}
print("RESULT " + json.dumps(res))
"""


@pytest.fixture(scope="module")
def worker():
    out = run_python(WORKER, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def test_use_cpu_devices_before_and_after_start(worker):
    assert worker["returned"] == 4 and worker["devices"] == 4
    assert worker["late_same"] == 4 and worker["late_other"] == 4
    (msg,) = worker["late_warnings"]  # only the call asking for a different count warns
    assert "use_cpu_devices(2)" in msg and "4 device(s)" in msg


@pytest.mark.parametrize(
    "name",
    [
        "sample_dopri5",
        "sample_euler",
        "lik_exact",
        "lik_exact_max_norm",
        "lik_hutch",
        "sample_guided",
        "sample_guided_cond",
        "lik_exact_cond",
    ],
)
def test_sharded_solve_equals_one_device_solve(worker, name):
    r = worker[name]
    assert r["nfe"][0] == r["nfe"][1]  # batch-wide step control: the same step sequence
    assert r["maxdiff"] <= 1e-5 * max(1.0, r["scale"]), r
    assert r["devices"] == [1, 4]
    assert "6" in worker["indivisible"] and "divisible by the 4 devices" in worker["indivisible"]


def test_guided_field_needs_no_collectives_on_a_sharded_batch(worker):
    # concatenating [x; x] instead would all-gather and permute the rows between devices
    assert worker["guided_collectives"] == []


def test_fused_steps_on_a_mesh(worker):
    f = worker["fused"]
    np.testing.assert_allclose(f["w"][1], f["w"][0], rtol=1e-5)  # per-row-mean loss
    np.testing.assert_allclose(f["loss"][1], f["loss"][0], rtol=1e-5)
    assert abs(f["u1"] - f["u1_expected"]) < 1e-7  # one device: the step's key
    assert abs(f["u4"] - f["u_expected"]) < 1e-6  # mean over the 4 devices' own keys
    assert abs(f["u4"] - f["u1"]) > 1e-4
    assert abs(f["row0"] - f["row0_expected"]) < 1e-5  # rows 0, 2, 4, 6 start the shards
    assert f["replicated"] and f["devices"] == 4
    assert "divisible by the 4 devices" in worker["fused_indivisible"]


def test_steps_and_solves_accept_arrays_on_explicit_mesh_axes(worker):
    r = worker["explicit_mesh"]
    assert "Explicit" in r["axis_types"]
    for w in r["fused"]:
        np.testing.assert_array_equal(w, r["fused_auto"])
    np.testing.assert_array_equal(r["shard_loss"], r["shard_loss_auto"])
    for name, p in worker["explicit_presharded"].items():
        assert p["maxdiff"] < 1e-5 and p["nfe"][0] == p["nfe"][1], name
        assert p["devices"] == 4, name


def test_per_step_training_on_a_mesh(worker):
    """The global-view step equals one device for any loss; ``shard_loss=True`` equals it for
    a per-row-mean loss, with each device's own key, and all-reduces one flat vector."""
    r = worker["per_step"]
    np.testing.assert_allclose(r["w"][1], r["w"][0], rtol=1e-6)
    np.testing.assert_allclose(r["w"][2], r["w"][0], rtol=1e-5)
    np.testing.assert_allclose(r["loss"][1:], [r["loss"][0]] * 2, rtol=1e-5)
    assert abs(r["u"][0] - r["u_one_expected"]) < 1e-7
    assert abs(r["u"][1] - r["u_one_expected"]) < 1e-7  # global view: the step's key
    assert abs(r["u"][2] - r["u_shard_expected"]) < 1e-6  # mean over the devices' keys
    assert abs(r["row0_shard"] - r["row0_shard_expected"]) < 1e-5
    # the shard_map step's one all-reduce is a single flat array, not a tuple of arrays
    (result_type,) = r["all_reduces"]
    assert result_type.startswith("f32[") and "(" not in result_type, result_type


def test_microbatched_steps_on_a_mesh(worker):
    """Gradient accumulation on 4 devices: the one-device whole-batch update (a key-free
    per-row-mean loss); the strided microbatches keep every row on its device (no
    collective but the gradient all-reduce), and with ``shard_loss`` that all-reduce runs
    once per step, after the device has accumulated its microbatches."""
    r, one = worker["microbatched"], worker["per_step"]
    for w, loss in zip(r["w"], r["loss"], strict=True):
        np.testing.assert_allclose(w, one["w"][0], rtol=1e-5)
        np.testing.assert_allclose(loss, one["loss"][0], rtol=1e-5)
    global_view, shard_loss = r["collectives"]
    assert set(global_view) == {"all-reduce"}, global_view
    assert shard_loss == ["all-reduce"], shard_loss
    assert "microbatches=4 must divide" in r["indivisible"] and "(2, 2)" in r["indivisible"]


def test_num_cores_and_bad_arguments():
    assert 1 <= cpu.num_cores() <= (os.cpu_count() or 1)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises((ValueError, TypeError)):
            fmjax.use_cpu_devices(bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the running backend has this count: no warning
        assert fmjax.use_cpu_devices(len(jax.devices("cpu"))) == len(jax.devices("cpu"))
    with pytest.warns(RuntimeWarning, match="before the first JAX computation"):
        assert fmjax.use_cpu_devices(len(jax.devices("cpu")) + 1) == len(jax.devices("cpu"))


def test_mesh_arguments_are_checked_on_one_device():
    mesh = train.sharding.make_mesh()
    x = jnp.ones((4, 2))
    y, _ = fmjax.sample(lambda t, x: -x, x, solver="euler", steps=4, mesh=mesh)
    np.testing.assert_allclose(y, np.full((4, 2), 0.75**4), rtol=1e-6)
    other = jax.make_mesh((1,), ("batch",))
    with pytest.raises(ValueError, match="'data' axis"):
        fmjax.sample(lambda t, x: -x, x, solver="euler", steps=4, mesh=other)
    with pytest.raises(TypeError, match="Mesh"):
        fmjax.log_likelihood(lambda t, x: -x, x, solver="euler", steps=4, mesh="data")
    with pytest.raises(ValueError, match="data"):
        train.make_fused_train_steps(
            lambda p, k, b: jnp.sum(p), optax.sgd(0.1), lambda k: x, 1, mesh=other
        )
    loss = lambda p, k, b: jnp.sum(p)
    with pytest.raises(ValueError, match="'data' axis"):
        train.make_train_step(loss, optax.sgd(0.1), mesh=other)
    with pytest.raises(ValueError, match="pass mesh= as well"):
        train.make_train_step(loss, optax.sgd(0.1), shard_loss=True)
    with pytest.raises(ValueError, match="shard_loss must be True or False"):
        train.make_train_step(loss, optax.sgd(0.1), mesh=mesh, shard_loss="yes")
