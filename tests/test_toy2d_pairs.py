"""experiments.toy2d_pairs: flow matching between two 2-D data sets, per coupling, with
SB-CFM, a reflow round and one-step distillation."""

import json

import pytest

from experiments import toy2d_pairs


def test_tiny_study_writes_every_run(tmp_path):
    out = toy2d_pairs.main(
        [
            "--steps=10",
            "--batch=32",
            "--hidden=16",
            "--samples=32",
            "--couplings=independent,ot,sb_cfm",
            "--sb-sigma=0.3",
            "--reflow=1",
            "--reflow-steps=10",
            "--reflow-pairs=64",
            "--distill-steps=10",
            "--sweep-steps=1,2,4",
            "--sweep-tols=0.01",
            "--sweep-solvers=euler",
            f"--workdir={tmp_path}",
        ]
    )
    with open(tmp_path / "metrics.json") as f:
        on_disk = json.load(f)["runs"]
    names = ["independent", "ot", "sb_cfm", "reflow_1", "distilled"]
    assert list(on_disk) == list(out["runs"]) == names
    for name, rec in out["runs"].items():
        assert rec["straightness"] >= 0 and rec["transport_cost"] > 0
        euler = [r for r in rec["sweep"] if r["solver"] == "euler"]
        assert [r["steps"] for r in euler] == [1, 2, 4]
        assert all(r["nfe"] == r["steps"] for r in euler)
        assert (tmp_path / f"nfe_quality_{name}.png").stat().st_size > 0
    assert out["runs"]["sb_cfm"]["sigma"] == 0.3
    for name in ("reflow_1", "distilled"):  # trained from the previous field: a new one
        rec = out["runs"][name]
        assert rec["steps"] == 10 and rec["pair_seconds"] > 0 and rec["train_seconds"] > 0
    straightness = [rec["straightness"] for rec in out["runs"].values()]
    assert len(set(straightness)) == len(straightness)
    assert (tmp_path / "euler_runs.png").stat().st_size > 0


@pytest.mark.parametrize(
    "args, message",
    [
        ("--target=moons", "unknown density 'moons'"),
        ("--couplings=ot,greedy", "greedy"),
        ("--sweep-steps=8,16", "must include 1, 2 and 4"),
        ("--couplings=sb_cfm --sb-sigma=-1", "sigma"),
        ("--reflow=-1", "--reflow"),
        ("--distill-steps=-1", "--distill-steps"),
        ("--reflow-pairs=0", "--reflow-pairs"),
        ("--couplings=ot --reflow=1", "add independent to --couplings"),
    ],
)
def test_bad_arguments_exit_with_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as err:
        toy2d_pairs.main(args.split())
    assert err.value.code == 2
    assert message in capsys.readouterr().err
