"""Checks of the conformance machinery itself (no framework needed): the numpy layers the
reference uses, the tolerance rule, the case table, the golden files, the driver registry and
the programmatic API."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

import backends
from backends import numpy_layers
from backends.base import Config, Driver, LayerSpec
from conformance import cases, golden, runner, tolerances
from conformance.sequences import SEQUENCES
from dualsn import spec
from dualsn import reference as numpy_ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIND_CASES = {case.config.layer.kind: case for case in reversed(cases.CASES)}


# --- the numpy layers ------------------------------------------------------------------------


def _loop_conv(x, w):
    """Cross-correlation by explicit loops (the definition)."""
    n, _, *size = x.shape
    o, c, *kern = w.shape
    out_size = [s - k + 1 for s, k in zip(size, kern)]
    out = np.zeros([n, o] + out_size)
    for p in itertools.product(*map(range, out_size)):
        window = x[(slice(None), slice(None)) + tuple(slice(a, a + k) for a, k in zip(p, kern))]
        axes = list(range(1, w.ndim))  # sum over channels and kernel offsets
        out[(slice(None), slice(None)) + p] = np.tensordot(window, w, axes=(axes, axes))
    return out


def _loop_conv_transpose(x, w):
    """Transposed conv by scattering every input position through the kernel (the definition)."""
    n, _, *size = x.shape
    _, o, *kern = w.shape
    out = np.zeros([n, o] + [s + k - 1 for s, k in zip(size, kern)])
    for q in itertools.product(*map(range, size)):
        for k in itertools.product(*map(range, kern)):
            p = tuple(a + b for a, b in zip(q, k))
            xq = x[(slice(None), slice(None)) + q]
            wk = w[(slice(None), slice(None)) + k]
            out[(slice(None), slice(None)) + p] += xq @ wk
    return out


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "convtranspose"])
def test_numpy_convolutions_match_their_definition(nd, transposed):
    rng = np.random.default_rng(nd)
    x = rng.standard_normal((2, 3) + (4,) * nd)
    w = rng.standard_normal((3, 2) + (2,) * nd)  # conv: [O=3, C=2]; transposed: [In=3, Out=2]
    if transposed:
        np.testing.assert_allclose(numpy_layers.conv_transpose(x, w), _loop_conv_transpose(x, w), rtol=1e-12, atol=1e-12)
    else:
        x = x[:, :2]
        np.testing.assert_allclose(numpy_layers.conv(x, w), _loop_conv(x, w), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(KIND_CASES))
def test_numpy_layer_gradients_match_finite_differences(kind):
    layer = KIND_CASES[kind].config.layer
    rng = np.random.default_rng(0)
    weight = rng.standard_normal(layer.weight_shape)
    bias = None if layer.bias_shape is None else rng.standard_normal(layer.bias_shape)
    if layer.integer_input:
        inputs = [rng.integers(0, layer.sizes[0], size=s) for s in layer.input_shapes()]
    else:
        inputs = [rng.standard_normal(s) for s in layer.input_shapes()]
    r = rng.standard_normal(layer.output_shape())

    def loss(w, b, xs):
        return float(np.sum(numpy_layers.forward(layer, w, b, xs) * r))

    def numeric(array, f):
        g = np.zeros_like(array)
        for i in np.ndindex(array.shape):
            old = array[i]
            array[i] = old + 1e-6
            up = f()
            array[i] = old - 1e-6
            down = f()
            array[i] = old
            g[i] = (up - down) / 2e-6
        return g

    g_w, g_b, g_xs = numpy_layers.vjp(layer, weight, bias, inputs, r)
    np.testing.assert_allclose(g_w, numeric(weight, lambda: loss(weight, bias, inputs)), atol=1e-7)
    if bias is not None:
        np.testing.assert_allclose(g_b, numeric(bias, lambda: loss(weight, bias, inputs)), atol=1e-7)
    float_inputs = [x for x in inputs if x.dtype.kind == "f"]
    assert len(g_xs) == len(float_inputs)
    for x, g_x in zip(float_inputs, g_xs):
        np.testing.assert_allclose(g_x, numeric(x, lambda: loss(weight, bias, inputs)), atol=1e-7)


# --- tolerances --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", sorted(tolerances.RTOL))
def test_compare_applies_the_stated_tolerance(dtype):
    rtol = tolerances.RTOL[dtype]
    expected = [("a", np.array([2.0, -4.0])), ("zero", np.zeros(3))]
    near = [("a", np.array([2.0, -4.0 + 0.5 * rtol * 4.0])), ("zero", np.zeros(3))]
    far = [("a", np.array([2.0, -4.0 + 2.0 * rtol * 4.0])), ("zero", np.zeros(3))]
    moved = [("a", expected[0][1]), ("zero", np.array([0.0, 1e-20, 0.0]))]
    assert tolerances.compare(near, expected, dtype) == []
    assert len(tolerances.compare(far, expected, dtype)) == 1
    assert len(tolerances.compare(moved, expected, dtype)) == 1  # exact zeros stay exact
    assert tolerances.compare(expected[:1], expected, dtype)  # missing entry
    assert tolerances.compare([("a", np.zeros(3)), expected[1]], expected, dtype)  # shape
    assert tolerances.compare([("a", np.array([np.nan, -4.0])), expected[1]], expected, dtype)


# --- the case table ----------------------------------------------------------------------------


def test_case_table_covers_the_required_axes():
    configs = [c.config for c in cases.CASES]
    kinds = {c.layer.kind for c in configs}
    assert kinds == {
        "linear", "linear_compat", "conv1d", "conv2d", "conv3d", "convtranspose1d",
        "convtranspose2d", "convtranspose3d", "embedding", "bilinear", "vector",
    }
    assert {c.dtype for c in configs} == {"float32", "float64"}
    assert {1, 3} <= {c.n_power_iterations for c in configs}
    assert {c.eps for c in configs} == {1e-12, 1e-4}
    assert any(c.dim is None for c in configs)
    assert any(c.dim is not None and c.dim >= 0 for c in configs)
    assert any(c.dim is not None and c.dim < 0 for c in configs)
    features = {name for c in configs for name, _ in c.features}
    assert {"coeff", "atol", "rtol", "max_iterations", "num_svs"} <= features
    assert any(c.track_sigma and not c.operator_norm for c in configs)
    operator = [c for c in configs if c.operator_norm]
    assert {c.layer.kind for c in operator} == {"conv1d", "conv2d"}
    assert {c.dtype for c in operator} == {"float32", "float64"}
    assert any(c.track_sigma for c in operator) and any(c.feature_kwargs.get("coeff") for c in operator)
    assert 25 <= len(cases.CASES) <= 60


@pytest.mark.parametrize("case", [c for c in cases.CASES if c.sigma_max], ids=lambda c: c.id)
def test_tiny_weight_cases_really_depend_on_eps(case):
    """With the case's eps the registration state differs from eps=1e-12 (eps is active)."""
    config = case.config
    weight = cases.params(case)["weight"]
    h, w = config.matrix_shape()
    states = []
    for eps in (config.eps, 1e-12):
        s = spec.make_spec("torch_legacy", config.n_power_iterations, eps)
        u0, v0 = spec.init_uv(h, w, case.seed, case.dtype, eps)
        ref = numpy_ref.ReferenceSN(weight, config.canonical_dim, s, u0, v0)
        ref.forward(weight, training=True)
        states.append(ref.u)
    assert np.linalg.norm(states[0]) < 0.99  # u no longer unit: N(x) divided by eps
    assert abs(np.linalg.norm(states[1]) - 1) < 1e-5


# --- golden files ------------------------------------------------------------------------------


def test_golden_files_are_complete_and_compact():
    total = 0
    for preset in spec.PRESETS:
        total += os.path.getsize(golden.path(preset))
        for case in cases.CASES:
            if backends.load("reference").unsupported(case.config, preset):
                assert golden.trace(case.id, "registration", preset) is None
                continue
            for sequence in SEQUENCES:
                assert golden.trace(case.id, sequence, preset) is not None, (case.id, sequence, preset)
    assert total < 2 * 1024 * 1024


def test_golden_detects_a_changed_case(monkeypatch):
    case = cases.CASES[0]
    changed = cases.Case(case.id, Config(case.config.layer, case.config.dim, 2, case.config.eps, case.dtype))
    monkeypatch.setitem(cases.CASES_BY_ID, case.id, changed)
    assert golden.trace(case.id, "registration", "torch") is None


# --- the registry and the API --------------------------------------------------------------


@pytest.mark.parametrize("name", backends.names())
def test_registry_matches_the_drivers(name):
    driver = backends.load(name)
    info = backends.DRIVERS[name]
    if driver.unavailable():
        pytest.skip(driver.unavailable())
    assert (driver.name, driver.presets, driver.init_from_spec) == (info.name, info.presets, info.init_from_spec)


def test_a_driver_without_its_framework_is_reported_unavailable(monkeypatch):
    info = backends.DriverInfo("ghost", "backends.ghost", ("torch",), ("no_such_framework_dualsn",), True)
    monkeypatch.setitem(backends.DRIVERS, "ghost", info)
    driver = backends.load("ghost")
    assert "no_such_framework_dualsn is not installed" in driver.unavailable()
    try:
        # __wrapped__: bypass the trace cache, so nothing about "ghost" outlives this test
        kind, reason = runner.driver_trace.__wrapped__("ghost", cases.CASES[0].id, "registration", "torch")
        assert kind == runner.SKIP and "no_such_framework_dualsn" in reason
    finally:
        backends._cache.pop("ghost", None)


def test_base_driver_refuses_presets_it_lacks():
    class Only(Driver):
        name, presets = "only", ("paddle",)

    config = cases.CASES[0].config
    assert Only().unsupported(config, "paddle") is None
    assert "torch" in Only().unsupported(config, "torch")


def test_run_api_and_matrix():
    ids = [cases.CASES[0].id, cases.CASES[-1].id]
    results = runner.run(drivers=["reference"], cases=ids, sequences=["registration", "gradients"])
    assert len(results) == 2 * 3 * 2  # cases x presets (vs golden) x sequences
    assert {r.status for r in results} == {runner.PASS}
    rows, cols, cells = runner.matrix(results)
    assert rows == ids and len(cols) == 3 and set(cells.values()) == {runner.PASS}
    text = runner.format_matrix(results)
    assert all(i in text for i in ids) and "reference:torch~golden" in text


def test_importing_the_suite_imports_no_framework():
    code = (
        "import sys, backends, conformance, conformance.golden; "
        "print(sorted(m for m in ('torch', 'paddle') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_layer_spec_shapes():
    assert LayerSpec("linear", (5, 4)).weight_shape == (4, 5)
    assert LayerSpec("convtranspose2d", (2, 3, 2), length=2).output_shape() == (2, 3, 3, 3)
    assert LayerSpec("bilinear", (3, 4, 2)).bias_shape == (2,)
    with pytest.raises(ValueError):
        LayerSpec("lstm", (1,))


# --- the reference's convolution operator norm ---------------------------------------------------

OPERATOR_CASES = [c for c in cases.CASES if c.config.operator_norm]


@pytest.mark.parametrize("case", OPERATOR_CASES, ids=lambda c: c.id)
def test_reference_conv_matrix_is_the_convolution(case):
    from backends.reference import conv_matrix

    layer = case.config.layer
    weight = cases.params(case)["weight"].astype(np.float64)
    x = np.random.default_rng(0).standard_normal(layer.input_shapes()[0])
    m = conv_matrix(layer, weight)
    assert m.shape == case.config.matrix_shape()
    expected = numpy_layers.conv(x, weight).reshape(len(x), -1)
    np.testing.assert_allclose(x.reshape(len(x), -1) @ m.T, expected, rtol=1e-12, atol=1e-12)
    # the power iteration on M converges to M's largest singular value (not the kernel's)
    s = spec.make_spec(spec.CONV_COMPAT, 300, case.config.eps)
    u0, v0 = spec.init_uv(*m.shape, case.seed, "float64")
    ref = numpy_ref.ReferenceSN(m, 0, s, u0, v0)
    ref.forward(m, training=True)
    top = np.linalg.svd(m, compute_uv=False)[0]
    assert abs(ref.sigma(m) - top) < 1e-9 * top
    assert abs(top - np.linalg.svd(spec.to_matrix(weight, 0), compute_uv=False)[0]) > 1e-3


@pytest.mark.parametrize("coeff", [None, 0.5, 50.0], ids=["plain", "active-bound", "inactive-bound"])
def test_reference_conv_operator_weight_grad_matches_finite_differences(coeff):
    from backends.reference import ConvOperatorSN

    layer = LayerSpec("conv2d", (2, 3, 2), length=3)
    rng = np.random.default_rng(1)
    weight = rng.standard_normal(layer.weight_shape) / 3
    g = rng.standard_normal(layer.weight_shape)
    s = spec.make_spec(spec.CONV_COMPAT, 20, 1e-12, coeff=coeff)
    h, w = Config(layer, operator_norm=True).matrix_shape()
    sn = ConvOperatorSN(layer, weight, s, *spec.init_uv(h, w, 7, "float64"), training=True)
    sn.forward(weight, training=True)  # u, v near the top singular pair: sigma about 1
    assert (s.divisor(sn.sigma(weight)) == 1.0) == (coeff == 50.0)  # the bound is active as named

    def loss(wt):  # u, v held constant, as the gradient assumes
        return float(np.sum(g * wt / s.divisor(sn.sigma(wt))))

    numeric = np.zeros_like(weight)
    for i in np.ndindex(weight.shape):
        step = np.zeros_like(weight)
        step[i] = 1e-6
        numeric[i] = (loss(weight + step) - loss(weight - step)) / 2e-6
    np.testing.assert_allclose(sn.weight_grad(g, weight), numeric, atol=1e-7)


@pytest.mark.parametrize("case", [c for c in cases.CASES if c.config.degenerate], ids=lambda c: c.id)
def test_zero_weight_cases_are_zero_and_run_on_dualsn_drivers_only(case):
    """All-zero weights: the reference normalizes them to zero with u, v at spec.recovery_uv,
    and the built-ins (which give NaN there) are not collected for them."""
    config = case.config
    weight = cases.params(case)["weight"]
    assert not np.any(weight)
    if not config.spec("torch").is_exact_vector(weight.ndim):
        h, w = config.matrix_shape()
        ref = numpy_ref.ReferenceSN(weight, config.canonical_dim, config.spec("torch_legacy"), *spec.init_uv(h, w, case.seed, case.dtype), seed=case.seed)
        np.testing.assert_array_equal(ref.forward(weight, training=True), np.zeros_like(weight))
        np.testing.assert_array_equal(ref.u, spec.recovery_uv(h, w, case.seed, case.dtype)[0])
    for name in ("torch_parametrizations", "torch_legacy", "paddle_builtin"):
        driver = backends.load(name)
        if driver.unavailable():
            continue  # its framework is not installed: nothing is collected for it anyway
        preset = backends.DRIVERS[name].presets[0]
        assert "degenerate" in driver.unsupported(config, preset)
