"""fmjax._jax_private: the private JAX attributes fmjax reads exist in the installed JAX."""

import jax
import pytest

from fmjax import _jax_private


def test_every_private_attribute_exists():
    gone = _jax_private.missing()
    if gone:
        pytest.fail(
            f"JAX {jax.__version__} lacks the private attribute(s) {gone} that fmjax reads in "
            "fmjax/_jax_private.py (use_cpu_devices, tune_cpu_allocator and the exact-"
            "divergence compiler options fall back to their safe behaviour); update that "
            "module for this JAX version."
        )


def test_answers_in_this_process():
    jax.numpy.ones(1).block_until_ready()  # this process's backend is running
    assert _jax_private.backends_started() is True
    assert _jax_private.at_top_level() is True
    inside = []
    jax.jit(lambda a: inside.append(_jax_private.at_top_level()) or a)(1.0)
    assert inside == [False]


def test_a_missing_attribute_is_reported(monkeypatch):
    monkeypatch.setattr(_jax_private, "REQUIRED", (("jax._src.core", "no_such_attribute"),))
    assert _jax_private.missing() == ["jax._src.core.no_such_attribute"]
