"""experiments.toy2d_pairs: flow matching between two 2-D data sets, per coupling."""

import json

import pytest

from experiments import toy2d_pairs


def test_tiny_study_writes_every_coupling(tmp_path):
    out = toy2d_pairs.main(
        [
            "--steps=10",
            "--batch=32",
            "--hidden=16",
            "--samples=32",
            "--couplings=independent,ot",
            "--sweep-steps=1,2,4",
            "--sweep-tols=0.01",
            "--sweep-solvers=euler",
            f"--workdir={tmp_path}",
        ]
    )
    with open(tmp_path / "metrics.json") as f:
        assert json.load(f)["runs"].keys() == out["runs"].keys() == {"independent", "ot"}
    for name, rec in out["runs"].items():
        assert rec["straightness"] >= 0 and rec["transport_cost"] > 0
        euler = [r for r in rec["sweep"] if r["solver"] == "euler"]
        assert [r["steps"] for r in euler] == [1, 2, 4]
        assert all(r["nfe"] == r["steps"] for r in euler)
        assert (tmp_path / f"nfe_quality_{name}.png").stat().st_size > 0


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--target=moons", "unknown density 'moons'"),
        ("--couplings=ot,greedy", "greedy"),
        ("--sweep-steps=8,16", "must include 1, 2 and 4"),
    ],
)
def test_bad_arguments_exit_with_one_line(arg, message, capsys):
    with pytest.raises(SystemExit) as err:
        toy2d_pairs.main([arg])
    assert err.value.code == 2
    assert message in capsys.readouterr().err
