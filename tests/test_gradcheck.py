"""jaxnets.gradcheck: it passes correct backwards, catches wrong ones leaf by leaf, refuses
what it cannot check, and the examples/ layer script runs."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnets import gradcheck
from jaxnets import layers as L
from conftest import scaled_timeout  # noqa: E402  (tests/ is on sys.path under pytest)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "gelu_layer.py"


def test_rel_error_is_the_documented_formula():
    a, b = np.array([1.0, -3.0, 0.5]), np.array([1.5, -3.0, 0.0])
    assert gradcheck.rel_error(a, b) == pytest.approx(0.5 / (3.0 + 3.0))
    assert gradcheck.rel_error({"u": a, "v": a}, {"u": a, "v": b}) == pytest.approx(0.5 / 6.0)
    assert gradcheck.rel_error(np.zeros(3), np.full(3, 1e-12)) == pytest.approx(1e-12 / 1e-8)  # the floor


def test_wrong_backward_fails_on_the_wrong_leaf_only():
    x = np.random.default_rng(0).standard_normal((4, 3))
    params = L.linear_init(jax.random.PRNGKey(0), 3, 2, scheme="pytorch")
    wrong = lambda p, cache, dy: ({"w": cache.T @ dy, "b": 2 * dy.sum(0)}, dy @ p["w"].T)  # db doubled
    report = gradcheck.check(L.linear, wrong, x, params)
    assert not report.ok
    failed = {row.name for row in report.rows if not report.row_ok(row)}
    assert failed == {"params['b']"}
    row = next(r for r in report.rows if r.name == "params['b']")
    assert row.vjp_error == pytest.approx(1 / 3) and row.fd_error == pytest.approx(1 / 3, rel=1e-6)
    text = str(report)
    assert text.startswith("gradcheck: FAILED") and "FAIL" in text.splitlines()[2] and "max|a - b|" in text
    good = gradcheck.check(L.linear, L.linear_backward, x, params)
    assert good.ok and good.worst[0] < 1e-14 and good.worst[1] < 1e-8
    assert str(good).startswith("gradcheck: ok")


def test_float32_inputs_are_checked_in_float64():
    # Outside an x64 context, with float32 inputs: the check still runs in float64.
    x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 4)), jnp.float32)
    report = gradcheck.check(L.tanh, L.tanh_backward, x)
    assert report.ok and report.worst[1] < 1e-8, report  # float32 differences would be ~1e-3
    assert jnp.zeros(1).dtype == jnp.float32  # x64 was only enabled inside the check


def test_refuses_what_it_cannot_check():
    x = np.ones((2, 3))
    with pytest.raises(ValueError, match="forward returned float32 for float64 inputs"):
        gradcheck.check(lambda x: (x.astype(jnp.float32), x), lambda c, dy: dy, x)
    with pytest.raises(ValueError, match=r"forward\(x\) must return a pair"):
        gradcheck.check(lambda x: x * 2, lambda c, dy: 2 * dy, x)
    with pytest.raises(ValueError, match="gradient of 'params' has the structure"):
        gradcheck.check(L.linear, lambda p, c, dy: ({"w": c.T @ dy}, dy @ p["w"].T), x,
                        L.linear_init(jax.random.PRNGKey(0), 3, 2))
    with pytest.raises(ValueError, match="must be floating point, got a int"):
        gradcheck.check(L.relu, L.relu_backward, np.ones((2, 3), int))


def test_example_layer_script_runs_and_passes():
    proc = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=scaled_timeout(300))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("gradcheck: ok") == 2


def test_example_layer_script_exits_nonzero_when_a_check_fails():
    spec = importlib.util.spec_from_file_location("gelu_layer", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main() == 0
    correct = example.gelu_backward
    example.gelu_backward = lambda cache, dy: 1.01 * correct(cache, dy)  # a 1% slip
    assert example.main() == 1
