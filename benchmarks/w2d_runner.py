"""The rows of the W2D benchmark: what each times, on which inputs, and the records it keeps.

:class:`Runner` makes the framework sides, the shared weights and the inputs, times the
frameworks of a case in interleaved rounds (``harness.interleave``) and keeps one record (a
dict, one line of the table and of the raw JSON) per framework and case. The quality row is
``w2d_quality.run_quality``.
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import time
import traceback

import numpy as np
from harness import interleave, loadavg, logger, matmul_times, round_ratios, summarize
from w2d_quality import run_quality
from w2d_sides import DP, FRAMEWORKS, PEERS, available, make_side
from w2d_workload import (
    SEED,
    SPECS,
    check_layers,
    checkerboard_np,
    load_layers,
    save_layers,
    to_numpy,
    train_flop_per_step,
)

log = logger("w2d")


def case(label, kind, inputs, warm_n, **kw):
    """A solve case: ``kind`` 'sample' or 'lik', the keyword arguments of the side's call,
    and the number of points the peers are warmed up on."""
    return (label, kind, inputs, kw, warm_n)


class Runner:
    def __init__(self, args, cfg, frameworks):
        self.args, self.cfg, self.frameworks = args, cfg, frameworks
        self.records = []
        self.sides = {}
        self.shared = {}  # spec name -> layers
        self.weights_source = {}  # spec name -> where its shared weights came from
        self.quality_models = {}  # framework -> trained W2D params (for reuse as shared)
        self.matmul_gflops = None

    def side(self, fw, spec_name):
        key = (fw, spec_name)
        if key not in self.sides:
            self.sides[key] = make_side(fw, SPECS[spec_name])
        return self.sides[key]

    def dp_label(self):
        """The fmjax data-parallel variant's name, or None when it does not run."""
        n = self.args.cpu_devices
        return f"fmjax ({n} CPU devices)" if n > 1 and "fmjax" in self.frameworks else None

    def fw_label(self, fw):
        return self.dp_label() if fw == DP else fw

    def record(self, **kw):
        kw["loadavg_1m"] = loadavg()  # other processes on the machine skew timings
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
        spec = SPECS[spec_name]
        path = self.args.weights if spec_name == "W2D" else self.args.weights_small
        if path and os.path.exists(path):
            layers = load_layers(path)
            check_layers(layers, spec["hidden"], spec["depth"])
            log(f"{spec_name}: loaded shared weights from {path}")
            self.shared[spec_name] = layers
            return layers
        if spec_name == "W2D" and self.quality_models:
            fw, params = next(iter(self.quality_models.items()))
            layers = self.side(fw, spec_name).to_layers(params)
            src = f"the {fw} model of the quality row ({self.cfg['quality_steps']} steps)"
        else:
            layers, src = self.train_shared(spec_name)
        check_layers(layers, spec["hidden"], spec["depth"])
        self.shared[spec_name] = layers
        self.weights_source[spec_name] = src
        if path:
            save_layers(path, layers)
            log(f"{spec_name}: wrote shared weights to {path}")
        return layers

    def train_shared(self, spec_name):
        """(layers, source): trained by the first framework that can (fmjax first)."""
        steps = self.cfg["weights_steps" if spec_name == "W2D" else "small_weights_steps"]
        batch = self.cfg["train_batch" if spec_name == "W2D" else "small_batch"]
        for cand in FRAMEWORKS:
            if not available(cand)[0]:
                continue
            log(f"{spec_name}: training shared weights with {cand}, {steps} steps")
            try:
                side = self.side(cand, spec_name)
                params, _ = side.train(batch, steps, seed=SEED + 7)
            except Exception as e:  # noqa: BLE001 - fall back to the next framework
                log(f"{spec_name}: training with {cand} failed ({type(e).__name__}: {e})")
                continue
            return side.to_layers(params), f"{cand}, {steps} steps of batch {batch}"
        raise RuntimeError("no framework could train the shared weights")

    # --- timing ---------------------------------------------------------------------

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
        spec = SPECS[spec_name]
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
        """cases: list of :func:`case` tuples.

        Per case every framework is prepared (fmjax: first call, timed; peers: warm-up on
        ``warm_n`` points), then all are timed in interleaved rounds."""
        layers = self.shared_layers(spec_name)
        for label, kind, inputs, kw, warm_n in cases:
            fws = list(self.frameworks)
            if self.dp_label() and inputs.shape[0] % self.args.cpu_devices == 0:
                fws.insert(fws.index("fmjax") + 1, DP)
            prepared = {}
            for fw in fws:
                prepare = functools.partial(
                    self.prepare_solve, prepared, spec_name, layers, fw, kind, inputs, kw, warm_n
                )
                self.guarded(row, label, self.fw_label(fw), prepare)
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
                    row, label, kind, kw, inputs, fw, p, times[fw], results[fw], outs, ratios
                )

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

    def record_solve(self, row, label, kind, kw, inputs, fw, prep, times, result, outs, ratios):
        """Records one framework's solve; ``outs`` keeps the outputs of the case so far, to
        report how far each is from the first framework's."""
        out, nfe = result
        res = summarize(times)
        first, extra = prep["first"], dict(prep["extra"])
        extra["compile_s_est"] = None if first is None else max(0.0, first - res["median"])
        out = to_numpy(out)
        diff = None if not outs else float(np.max(np.abs(out - next(iter(outs.values())))))
        outs[fw] = out
        if kind == "lik":
            extra["mean_logp"] = float(np.mean(out))
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
            **ratios.get(fw, {}),
        )

    # --- the rows -------------------------------------------------------------------

    def run_sample(self):
        c = self.cfg
        x0 = np.random.default_rng(SEED + 1).standard_normal((c["sample_n"], 2))
        x0 = x0.astype(np.float32)
        n, h, tol, w = c["sample_n"], c["step_size"], c["tol"], c["torch_warm_n"]
        self.run_solve_cases(
            "sample",
            "W2D",
            [
                case(f"sample {n} midpoint h={h}", "sample", x0, w, solver="midpoint", step_size=h),
                case(f"sample {n} dopri5 tol={tol:g}", "sample", x0, w, solver="dopri5", tol=tol),
            ],
        )

    def run_likelihood(self):
        c = self.cfg
        x1 = checkerboard_np(np.random.default_rng(SEED + 2), c["lik_n"])
        n, h, tol, w = c["lik_n"], c["step_size"], c["tol"], c["torch_warm_n"]
        mid = {"solver": "midpoint", "step_size": h}
        self.run_solve_cases(
            "likelihood",
            "W2D",
            [
                case(f"loglik {n} exact midpoint h={h}", "lik", x1, w, divergence="exact", **mid),
                case(
                    f"loglik {n} hutchinson(1) midpoint h={h}",
                    "lik",
                    x1,
                    w,
                    divergence="hutchinson",
                    **mid,
                ),
                case(
                    f"loglik {n} exact dopri5 tol={tol:g}",
                    "lik",
                    x1,
                    w,
                    divergence="exact",
                    solver="dopri5",
                    tol=tol,
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
        dopri5 = {"solver": "dopri5", "tol": tol}
        self.run_solve_cases(
            "small",
            "W2D-small",
            [
                case(
                    f"small sample {n} euler {ns} steps", "sample", x0, 4, solver="euler", steps=ns
                ),
                case(f"small sample {n} dopri5 tol={tol:g}", "sample", x0, 4, **dopri5),
                case(f"small sample 1 dopri5 tol={tol:g} (latency)", "sample", x0_one, 1, **dopri5),
                case(
                    f"small loglik {x1.shape[0]} exact dopri5 tol={tol:g}",
                    "lik",
                    x1,
                    4,
                    divergence="exact",
                    **dopri5,
                ),
            ],
        )

    def run_matmul(self):
        n, reps = self.cfg["matmul_n"], self.cfg["matmul_repeats"]
        self.matmul_gflops = self.record_matmul(f"jnp.dot {n}x{n}", "jax", n, reps)
        try:
            self.record_matmul(f"torch.mm {n}x{n}", "torch", n, reps)
        except ImportError:
            pass

    def record_matmul(self, what, backend, n, reps):
        """Records the fp32 matmul rate of ``backend``; returns the best, in GFLOP/s."""
        flop = 2.0 * n**3
        times = matmul_times(n, reps, backend)
        best = flop / min(times) / 1e9
        self.record(
            row="matmul",
            case=f"{what} fp32 (best of {reps})",
            framework=backend,
            unit="GFLOP/s",
            median=flop / statistics.median(times) / 1e9,
            min=flop / max(times) / 1e9,
            max=best,
            best=best,
        )
        return best

    def add_fractions(self):
        if not self.matmul_gflops:
            return
        for r in self.records:
            if r.get("unit") == "steps/s" and "gflops" in r:
                r["fraction_of_matmul"] = r["gflops"] / self.matmul_gflops

    def run(self):
        rows = self.args.rows
        if "matmul" in rows:
            self.guarded("matmul", "matmul", "jax", self.run_matmul)
        if "train" in rows:
            self.run_train("W2D", self.cfg["train_batch"], self.cfg["train_steps"], "train")
        if "quality" in rows:
            run_quality(self)
        if "sample" in rows:
            self.guarded("sample", "shared weights", "-", self.run_sample)
        if "likelihood" in rows:
            self.guarded("likelihood", "shared weights", "-", self.run_likelihood)
        if "small" in rows:
            self.guarded("small", "W2D-small", "-", self.run_small)
        self.add_fractions()
