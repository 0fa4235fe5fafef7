"""The README's library example runs as written (it is the first code a user copies)."""

import math
import os
import re

from conftest import ROOT, run_python


def _library_example():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme.split("## The library in 15 lines", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_library_example_runs():
    code = _library_example()
    assert "fmjax.sample" in code and "fmjax.log_likelihood" in code
    out = run_python(code, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    loss, nfe, mean_logp = out.stdout.split()[-3:]
    # an untrained model: a positive finite loss, an adaptive solve's NFE, a finite log p
    assert float(loss) > 0 and int(nfe) > 0 and math.isfinite(float(mean_logp))
