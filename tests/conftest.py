import os
import re
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_platforms", "cpu")

import pytest


@pytest.fixture(scope="module")
def x64():
    """Float64 for the tests of one module (numerical identities at 1e-8), restored after:
    a process-wide switch would leak into every other module under pytest-xdist."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


# Shared by the image-trainer tests: the repo root (for subprocesses) and an on-disk XLA
# compile cache, since most of their time is compiling the same tiny UNet steps.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XLA_CACHE = os.path.join(tempfile.gettempdir(), "fmjax-test-xla-cache")


def run_python(code, timeout):
    """Run ``code`` in a fresh CPU-only Python process from the repo root (the repo on its
    path, no XLA_FLAGS inherited); returns the ``CompletedProcess`` with text output."""
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_markdown_examples(page, num_blocks, timeout=600):
    """Run the ```python blocks of ``docs/<page>`` one after another as one script (see
    :func:`run_python`); checks their count and the exit status, returns the stdout."""
    with open(os.path.join(ROOT, "docs", page)) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.DOTALL)
    assert len(blocks) == num_blocks, f"{page}: {len(blocks)} python blocks"
    out = run_python("\n".join(blocks), timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def use_compile_cache():
    jax.config.update("jax_compilation_cache_dir", XLA_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


@pytest.fixture(scope="module")
def float32():
    """Train in float32 as real runs do, whatever another module set (restored after)."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    yield
    jax.config.update("jax_enable_x64", before)
