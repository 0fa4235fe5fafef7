"""The flow family on the toy2d checkerboard: figures and raw results for docs/results.md
from the ``metrics.json`` of toy2d runs (see docs/results.md, "The flow family", for the
commands that make them).

    python benchmarks/toy2d_family.py --fm out/fm_reflow --ml out/ml --sb out/sb \
        [--level 4.5]

Writes ``docs/toy2d_family_nll_vs_time.png`` (held-out NLL against training seconds, FM and
ML, and SB-CFM if given) and ``docs/toy2d_family_reflow.png`` (MMD against Euler steps per
reflow round), copies each run's metrics to ``benchmarks/results/toy2d_family_<name>.json``
and prints the numbers the section quotes.
"""

import argparse
import json
import os
import shutil
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:0] = [_ROOT]


def _load(workdir):
    with open(os.path.join(workdir, "metrics.json")) as f:
        return json.load(f)


def _reached(curve, level):
    for rec in curve:
        if rec["nll_nats"] <= level:
            return rec["train_seconds"], rec["step"]
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fm", required=True, help="workdir of the FM run (with reflow rounds)")
    parser.add_argument("--ml", required=True, help="workdir of the objective=ml run")
    parser.add_argument("--sb", help="workdir of the sb_cfm run")
    parser.add_argument("--level", type=float, default=4.5, help="NLL level (nats) to reach")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {"fm_reflow": args.fm, "ml": args.ml}
    if args.sb:
        runs["sb_cfm"] = args.sb
    metrics = {name: _load(w) for name, w in runs.items()}
    for name, w in runs.items():
        shutil.copy(
            os.path.join(w, "metrics.json"),
            os.path.join(_HERE, "results", f"toy2d_family_{name}.json"),
        )

    labels = {"fm_reflow": "flow matching (CondOT)", "ml": "maximum likelihood", "sb_cfm": "SB-CFM"}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, m in metrics.items():
        curve = m.get("nll_curve", [])
        if curve:
            xs = [r["train_seconds"] for r in curve]
            ys = [r["nll_nats"] for r in curve]
            ax.plot(xs, ys, "o-", ms=3, label=labels[name])
        reached = _reached(curve, args.level)
        print(f"{name}: reaches {args.level} nats at (seconds, step) {reached}")
        print(
            f"  curve: {[(round(r['train_seconds'], 1), round(r['nll_nats'], 3)) for r in curve]}"
        )
    ent = metrics["fm_reflow"].get("true_entropy_nats")
    if ent:
        ax.axhline(ent, color="gray", ls=":", label="data entropy")
    ax.set_xscale("log")
    ax.set_xlabel("training seconds (2 shared CPU cores)")
    ax.set_ylabel("held-out NLL (nats, 1,000 points)")
    ax.set_ylim(top=min(12.0, ax.get_ylim()[1]))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("checkerboard: held-out NLL against training time")
    fig.tight_layout()
    fig.savefig(os.path.join(_ROOT, "docs", "toy2d_family_nll_vs_time.png"), dpi=100)
    plt.close(fig)

    ml = metrics["ml"]
    print(
        "ml NFE per step: forward", ml.get("train_nfe_forward"), "backward",
        ml.get("train_nfe_backward"), "steps/s", ml["train_steps_per_s"],
        "final NLL", ml["nll_nats"],
    )  # fmt: skip
    fm = metrics["fm_reflow"]
    shutil.copy(
        os.path.join(args.fm, "reflow_rounds.png"),
        os.path.join(_ROOT, "docs", "toy2d_family_reflow.png"),
    )
    print("fm steps/s", fm["train_steps_per_s"])
    rounds = fm.get("reflow_rounds")
    if rounds:
        for r in rounds:
            print(
                f"round {r['round']}: straightness {r['straightness']:.4g} transport "
                f"{r['transport_cost']:.4g} mmd_euler {r['mmd_euler']} dopri5 "
                f"{r['mmd_dopri5']:.4g} ({r['nfe_dopri5']}) "
                f"pairs {r.get('pair_seconds')} train {r.get('train_seconds')}"
            )
    if args.sb:
        for name in ("fm_reflow", "sb_cfm"):
            m = metrics[name]
            print(name, {k: m.get(k) for k in ("nll_nats", "mmd", "nfe_sample", "train_seconds")})


if __name__ == "__main__":
    main()
