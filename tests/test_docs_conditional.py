"""docs/conditional.md's examples run as written and print what the page says: the learned
posterior of the simulation-based-inference example against its closed form, and the
guided samples of the class-conditional example, also solved per example with the labels
given to the solve."""

import re

from conftest import run_markdown_examples


def test_conditional_guide_examples():
    text = run_markdown_examples("conditional.md", 3)
    mean, std = map(float, re.search(r"posterior mean (\S+) .*, std (\S+) ", text).groups())
    logp, exact = map(float, re.search(r"x_obs = 1\) (\S+) \(exact (\S+)\)", text).groups())
    assert abs(mean - 0.5) < 0.05 and abs(std - 0.5**0.5) < 0.05, text
    assert abs(logp - exact) < 0.05, text
    rows = {
        float(w): (float(frac), float(m))
        for w, frac, m in re.findall(
            r"w = (\S+): class-0 samples at x < 0: (\S+), mean x (\S+)", text
        )
    }
    assert set(rows) == {0.0, 1.0, 3.0}, text
    assert 0.3 < rows[0.0][0] < 0.7  # the null class: both modes
    assert rows[1.0][0] > 0.97 and abs(rows[1.0][1] + 2.0) < 0.2  # its class
    assert rows[3.0][0] >= rows[1.0][0] and rows[3.0][1] < rows[1.0][1] - 0.2  # guided
    # conditions given to a per-example solve: each row its own steps, on its label's side
    nfe = [int(n) for n in re.search(r"per-example NFE \[(.*?)\]", text).group(1).split(",")]
    assert len(nfe) == 8 and all(n > 0 for n in nfe) and len(set(nfe)) > 1, text
    assert "each sample on its label's side: True" in text, text
