"""The differential harness as tests: fast path == plain path in each framework, and torch ==
Paddle, per step of whole training runs (see :mod:`conformance.differential`).

Ids read ``<model>/<pattern>/<preset>/<dtype>/<framework>``, where framework is "torch" or
"paddle" (that backend's fast path vs its plain path) or "torch~paddle" (the two fast paths).
The random stacks are drawn by hypothesis, derandomized so that CI runs the same examples;
their preset is drawn with the model, and a failure prints the drawn model and names the rest.
A check skips only when a framework it needs is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conformance import differential
from conformance.diff_models import PRESETS, random_stack
from conformance.differential import CHECKS, DTYPES, STACK_PATTERNS

STACK_EXAMPLES = 12

# Paddle's BatchNorm2D warns on every training forward that it tracks running statistics; the
# models here normalize with batch statistics (see backends/_paddle_models.py): noise.
pytestmark = pytest.mark.filterwarnings("ignore:When training, we now always track:UserWarning")


def _assert(result: differential.DiffResult) -> None:
    if result.status == differential.SKIP:
        pytest.skip(result.detail)
    if result.status == differential.FAIL:
        pytest.fail(f"{result.id}: {result.detail}", pytrace=False)


def _fixed_params():
    return [
        pytest.param(model, pattern, preset, dtype, framework, id=f"{model}/{pattern}/{preset}/{dtype}/{framework}")
        for model, pattern in differential.fixed_cells()
        for preset in PRESETS
        for dtype in DTYPES
        for framework in CHECKS
    ]


@pytest.mark.parametrize("model, pattern, preset, dtype, framework", _fixed_params())
def test_fixed_model(model, pattern, preset, dtype, framework):
    _assert(differential.check(differential.fixed_model(model, preset), pattern, dtype, framework))


@st.composite
def stacks(draw):
    return random_stack(lambda options: draw(st.sampled_from(options)))


@pytest.mark.parametrize("framework", CHECKS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", STACK_PATTERNS)
@settings(
    max_examples=STACK_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI is reproducible
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(spec=stacks())
def test_random_stack(spec, pattern, dtype, framework):
    _assert(differential.check(spec, pattern, dtype, framework))


# -- the harness itself ---------------------------------------------------------------------


def test_fixed_cells_cover_every_pattern_and_avoid_paddle_conv_transpose_double_backward():
    cells = differential.fixed_cells()
    assert {pattern for _, pattern in cells} == set(differential.PATTERNS)
    for model, pattern in cells:
        kinds = {layer.kind for layer in differential.fixed_model(model, "torch").layers}
        if pattern in differential.DOUBLE_BACKWARD:
            assert "convtranspose2d" not in kinds
    disc = differential.fixed_model("sngan_discriminator", "torch")
    assert {"conv2d", "batchnorm2d", "convtranspose2d", "linear", "embedding", "scale"} <= {l.kind for l in disc.layers}
    assert any(l.stride == 2 for l in disc.layers)


def test_float32_models_use_smooth_activations():
    # float32 through a kink can flip discretely between two correct computations (issue 10)
    for model, _ in differential.fixed_cells():
        spec = differential.fixed_model(model, "torch")
        assert spec.for_dtype("float32").activation in ("silu", "softplus", "tanh")
        assert spec.for_dtype("float64").activation == "leaky_relu"


def test_trace_error_uses_the_gradient_floor_and_flags_structure():
    from conformance.diff_patterns import Trace

    def trace(bias_grad, weight_grad=(3.0, 4.0), extra=()):
        step = {"grad/l.weight": np.array(weight_grad), "grad/l.bias": np.array(bias_grad)}
        step.update(extra)
        return Trace([step], [], {})

    # a ~0 bias gradient (rounding noise in front of BatchNorm) is measured against 1e-3 * ||G||
    worst = differential.trace_error(trace([2e-9]), trace([1e-9]))
    assert worst.quantity == "grad/l.bias"
    assert worst.error == pytest.approx(1e-9 / (1e-3 * np.linalg.norm([3.0, 4.0, 1e-9])))
    # a real gradient is relative to its own norm
    worst = differential.trace_error(trace([1.0], weight_grad=(3.0, 4.0 + 5e-6)), trace([1.0]))
    assert worst.error == pytest.approx(1e-6) and worst.quantity == "grad/l.weight"
    assert differential.trace_error(trace([1.0], extra={"u/l": np.ones(2)}), trace([1.0])).error == np.inf
    assert differential.trace_error(trace([np.nan]), trace([1.0])).error == np.inf


def test_run_quick_returns_named_rows():
    results = differential.run(quick=True, frameworks=["torch"])
    assert results and all(r.framework == "torch" for r in results)
    assert {r.dtype for r in results} == set(DTYPES)
    for r in results:
        assert r.status in (differential.PASS, differential.SKIP), r.detail
        assert r.id.count("/") == 4


def test_a_broken_fast_gradient_is_caught(monkeypatch):
    """The comparison is not vacuous: a torch fast path whose gradient lacks the rank-1 term
    (the gradient of sigma) must fail against the plain path."""
    pytest.importorskip("torch", reason="torch is not installed")
    import dualsn.torch as dsn

    monkeypatch.setattr(dsn._grad, "weight_grad", lambda grad, weight, sigma, *args, **kwargs: grad / sigma)
    spec = differential.fixed_model("resnet", "torch")
    differential.clear_cache()  # runs are cached per model and pattern: run afresh
    try:
        result = differential.check(spec, "real_minus_fake", "float64", "torch")
    finally:
        differential.clear_cache()  # and no trace of the broken path may serve a later check
    assert result.status == differential.FAIL
    assert "torch fast vs torch plain: err" in result.detail and "grad/" in result.detail
