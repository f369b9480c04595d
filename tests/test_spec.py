"""The spec and its numpy reference, checked against exact linear algebra (no framework)."""

import numpy as np
import pytest

from dualsn import spec
from dualsn import reference as numpy_ref
from _numeric import random_array as random_weight


def top_singular_value(weight, dim):
    return np.linalg.svd(spec.to_matrix(weight, dim), compute_uv=False)[0]


def test_presets_encode_the_builtins():
    torch_preset = spec.PRESETS["torch"]
    assert (torch_preset.order, torch_preset.vector_mode) == ("uv", "exact")
    assert torch_preset.registration_iterations(training=True) == 16
    assert torch_preset.replace(n_power_iterations=3).registration_iterations(training=True) == 18
    assert torch_preset.registration_iterations(training=False) == 15
    for name in ("torch_legacy", "paddle"):
        preset = spec.PRESETS[name]
        assert (preset.order, preset.vector_mode) == ("vu", "matrix")
        assert preset.registration_iterations(training=True) == 0


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"compat": "tf"}, "compat"),
        ({"n_power_iterations": 0}, "n_power_iterations"),
        ({"n_power_iterations": 1.5}, "n_power_iterations"),
        ({"eps": 0.0}, "eps"),
        ({"eps": -1e-3}, "eps"),
        ({"eps": float("nan")}, "eps"),
    ],
)
def test_make_spec_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        spec.make_spec(**kwargs)


@pytest.mark.parametrize(
    "shape, dim, expected",
    [((4, 3), 0, (4, 3)), ((4, 3), 1, (3, 4)), ((4, 3), -1, (3, 4)), ((2, 3, 5, 7), 1, (3, 70)), ((6,), 0, (6, 1))],
)
def test_matrix_shape(shape, dim, expected):
    assert spec.matrix_shape(shape, dim) == expected
    weight = random_weight(shape)
    matrix = spec.to_matrix(weight, dim)
    assert matrix.shape == expected
    np.testing.assert_array_equal(spec.from_matrix(matrix, shape, dim), weight)


def test_to_matrix_moves_dim_to_the_front():
    weight = random_weight((2, 3, 4))
    np.testing.assert_array_equal(spec.to_matrix(weight, 2)[1], weight[:, :, 1].reshape(-1))


@pytest.mark.parametrize("dim", [2, -3, 5])
def test_dim_out_of_range_is_an_index_error(dim):
    with pytest.raises(IndexError, match=r"\[-2, 1\]"):
        spec.matrix_shape((4, 3), dim)


@pytest.mark.parametrize("shape", [(), (0, 3), (3, 0, 2)])
def test_weights_without_entries_are_rejected(shape):
    with pytest.raises(ValueError, match="weight"):
        spec.check_weight_shape(shape)


@pytest.mark.parametrize("dtype", ["float32", "float64", "complex64", "complex128"])
def test_init_uv_is_seeded_normalized_and_typed(dtype):
    u, v = spec.init_uv(5, 7, seed=11, dtype=dtype)
    u2, v2 = spec.init_uv(5, 7, seed=11, dtype=dtype)
    assert u.dtype == np.dtype(dtype) and v.dtype == np.dtype(dtype)
    assert u.shape == (5,) and v.shape == (7,)
    np.testing.assert_array_equal(u, u2)
    np.testing.assert_array_equal(v, v2)
    assert np.linalg.norm(u) == pytest.approx(1.0, rel=1e-6)
    assert np.linalg.norm(v) == pytest.approx(1.0, rel=1e-6)
    assert not np.allclose(spec.init_uv(5, 7, seed=12, dtype=dtype)[0], u)


def test_init_uv_float32_is_the_rounded_float64_draw():
    u64, v64 = spec.init_uv(9, 4, seed=3, dtype="float64")
    u32, v32 = spec.init_uv(9, 4, seed=3, dtype="float32")
    np.testing.assert_array_equal(u32, u64.astype(np.float32))
    np.testing.assert_array_equal(v32, v64.astype(np.float32))


def test_manual_seed_gives_each_registration_its_own_repeatable_seed():
    try:
        spec.manual_seed(5)
        first = [spec.next_seed() for _ in range(3)]
        spec.manual_seed(5)
        second = [spec.next_seed() for _ in range(3)]
        assert first == second
        assert len(set(first)) == 3
        assert spec.next_seed(42) == 42  # an explicit seed wins over the stream
        spec.manual_seed(None)
        assert spec.next_seed() is None
    finally:
        spec.manual_seed(None)


@pytest.mark.parametrize("bad", [-1, 1.5, "7", True])
def test_bad_seeds_are_rejected(bad):
    with pytest.raises(ValueError, match="seed"):
        spec.manual_seed(bad)


@pytest.mark.parametrize("order", spec.ORDERS)
@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
def test_power_iteration_converges_to_the_largest_singular_value(order, dtype):
    weight = random_weight((6, 4, 3), dtype)
    dim = 1
    h, w = spec.matrix_shape(weight.shape, dim)
    u0, v0 = spec.init_uv(h, w, seed=0, dtype=dtype)
    sn = numpy_ref.ReferenceSN(weight, dim, spec.make_spec("torch", 200).replace(order=order), u0, v0)
    exact = top_singular_value(weight, dim)
    assert abs(sn.sigma(weight)) == pytest.approx(exact, rel=1e-9)
    w_sn = sn.forward(weight, training=False)
    assert top_singular_value(w_sn, dim) == pytest.approx(1.0, rel=1e-9)


def test_the_two_orders_differ_before_convergence():
    weight = random_weight((8, 8))
    u0, v0 = spec.init_uv(8, 8, seed=1, dtype="float64")
    uv = numpy_ref.ReferenceSN(weight, 0, spec.PRESETS["torch"].replace(warmup_iterations=0, registration_forward=False), u0, v0)
    vu = numpy_ref.ReferenceSN(weight, 0, spec.PRESETS["paddle"], u0, v0)
    uv.forward(weight, training=True)
    vu.forward(weight, training=True)
    assert np.abs(uv.u - vu.u).max() > 1e-3


def test_registration_runs_the_preset_count():
    weight = random_weight((5, 7))
    u0, v0 = spec.init_uv(5, 7, seed=2, dtype="float64")
    preset = spec.PRESETS["torch"]
    registered = numpy_ref.ReferenceSN(weight, 0, preset, u0, v0, training=True)
    expected_u, expected_v = numpy_ref.power_iteration(weight, u0, v0, 16, "uv", preset.eps)
    np.testing.assert_array_equal(registered.u, expected_u)
    np.testing.assert_array_equal(registered.v, expected_v)


def test_eps_floors_the_norm():
    tiny = np.full(4, 1e-9)
    np.testing.assert_allclose(spec.normalize(tiny, eps=1e-4), tiny / 1e-4)
    np.testing.assert_allclose(spec.normalize(tiny, eps=1e-12), tiny / np.linalg.norm(tiny))


def numeric_grad(loss, weight, step=1e-6):
    """Central differences, with torch's complex convention dL/dRe + i dL/dIm."""
    grad = np.zeros_like(weight)
    for index in np.ndindex(weight.shape):
        for unit in ((1.0, 1j) if np.iscomplexobj(weight) else (1.0,)):
            delta = np.zeros_like(weight)
            delta[index] = step * unit
            slope = (loss(weight + delta) - loss(weight - delta)) / (2 * step)
            grad[index] += slope * unit
    return grad


@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
@pytest.mark.parametrize("shape, dim, compat", [((4, 3), 0, "torch"), ((2, 3, 2), 1, "paddle"), ((5,), 0, "torch"), ((5,), 0, "paddle")])
def test_weight_gradient_matches_finite_differences(dtype, shape, dim, compat):
    weight = random_weight(shape, dtype, seed=4)
    preset = spec.make_spec(compat)
    h, w = spec.matrix_shape(shape, dim)
    u0, v0 = spec.init_uv(h, w, seed=5, dtype=dtype)
    sn = numpy_ref.ReferenceSN(weight, dim, preset, u0, v0)
    upstream = random_weight(shape, dtype, seed=6)

    def loss(candidate):  # u, v held constant, as in autograd
        w_sn = candidate / sn.sigma(candidate)
        return np.real(np.vdot(upstream, w_sn))

    np.testing.assert_allclose(sn.weight_grad(upstream, weight), numeric_grad(loss, weight), rtol=1e-6, atol=1e-8)


def test_reference_state_round_trip():
    weight = random_weight((3, 4))
    u0, v0 = spec.init_uv(3, 4, seed=0, dtype="float64")
    sn = numpy_ref.ReferenceSN(weight, 0, spec.PRESETS["paddle"], u0, v0)
    saved = sn.state()
    sn.forward(weight, training=True)
    assert not np.array_equal(sn.u, saved["u"])
    sn.load_state(saved)
    np.testing.assert_array_equal(sn.u, saved["u"])
    assert numpy_ref.ReferenceSN(np.ones(3), 0, spec.PRESETS["torch"]).state() == {}


def test_default_dim_is_0_for_vectors_even_on_dim_1_layers():
    assert spec.default_dim(True, 4) == 1
    assert spec.default_dim(False, 4) == 0
    assert spec.default_dim(True, 1) == 0  # e.g. the bias of a transposed convolution


@pytest.mark.parametrize(
    "name, expected",
    [("torch.float32", "float32"), ("paddle.float64", "float64"), ("torch.bfloat16", "float32"),
     ("paddle.bfloat16", "float32"), ("torch.complex64", "complex64"), ("float16", "float16")],
)
def test_init_dtype_maps_framework_dtype_names(name, expected):
    assert spec.init_dtype(name) == np.dtype(expected)


# --- Opt-in features beyond the built-ins: coeff, tolerance stop, several singular values.


def converged_reference(weight, dim, **features):
    h, w = spec.matrix_shape(weight.shape, dim)
    u0, v0 = spec.init_uv(h, w, seed=3, dtype=weight.dtype)
    preset = spec.make_spec("torch", 300, **features)
    extra = {}
    if preset.num_svs > 1:
        rng = np.random.default_rng(9)
        extra = {
            "extra_u0": rng.standard_normal((preset.num_svs - 1, h)),
            "extra_v0": rng.standard_normal((preset.num_svs - 1, w)),
        }
    return numpy_ref.ReferenceSN(weight, dim, preset, u0, v0, **extra)


@pytest.mark.parametrize("coeff", [0.5, 0.97, 50.0])
def test_coeff_bounds_the_norm_softly(coeff):
    weight = random_weight((6, 5), seed=7)
    sn = converged_reference(weight, 0, coeff=coeff)
    w_sn = sn.forward(weight, training=True)
    exact = top_singular_value(weight, 0)
    if exact > coeff:
        assert top_singular_value(w_sn, 0) == pytest.approx(coeff, rel=1e-9)
    else:
        np.testing.assert_array_equal(w_sn, weight)  # below the bound the weight is untouched


def test_bound_inactive_is_where_the_divisor_is_one():
    """Spec.bound_inactive, the rule the backends' gradients and the reference share:
    Re(sigma) <= coeff (the divisor is then 1), active from the next number above coeff,
    never without coeff."""
    sp = spec.make_spec("torch", coeff=2.0)
    for sigma, inactive in [(1.0, True), (2.0, True), (-3.0, True), (2.5, False), (1.5 + 9j, True), (2.5 - 1j, False)]:
        assert sp.bound_inactive(sigma) is inactive
        assert (sp.divisor(sigma) == 1.0) is inactive
    assert not sp.bound_inactive(np.nextafter(2.0, 3.0))
    assert not spec.make_spec("torch").bound_inactive(0.0)


@pytest.mark.parametrize("coeff", [0.5, 50.0])
@pytest.mark.parametrize("shape", [(4, 3), (5,)])
def test_coeff_gradient_matches_finite_differences(coeff, shape):
    weight = random_weight(shape, seed=8)
    sn = converged_reference(weight, 0, coeff=coeff)
    upstream = random_weight(shape, seed=9)

    def loss(candidate):
        return np.vdot(upstream, candidate / sn.spec.divisor(sn.sigma(candidate))).real

    np.testing.assert_allclose(sn.weight_grad(upstream, weight), numeric_grad(loss, weight), rtol=1e-6, atol=1e-8)


def test_tolerance_stop_iterates_until_sigma_settles():
    weight = random_weight((8, 8), seed=10)
    u0, v0 = spec.init_uv(8, 8, seed=0, dtype="float64")
    preset = spec.make_spec("paddle", atol=0.0, rtol=1e-8, max_iterations=500)
    sn = numpy_ref.ReferenceSN(weight, 0, preset, u0, v0)
    sn.forward(weight, training=True)
    count = sn.last_iterations
    assert 2 <= count < 500
    # Replaying the iterations one by one: the last two estimates settled, the two before did not.
    estimates = []
    us, vs = [u0], [v0]
    for _ in range(count):
        us, vs, estimate = numpy_ref.power_step(weight, us, vs, "vu", preset.eps)
        estimates.append(estimate)
    assert preset.settled(estimates[-2], estimates[-1])
    if count > 2:
        assert not preset.settled(estimates[-3], estimates[-2])
    np.testing.assert_array_equal(sn.u, us[0])
    assert abs(sn.sigma(weight)) == pytest.approx(top_singular_value(weight, 0), rel=1e-6)


def test_tolerance_stop_respects_max_iterations():
    weight = random_weight((8, 8), seed=10)
    u0, v0 = spec.init_uv(8, 8, seed=0, dtype="float64")
    sn = numpy_ref.ReferenceSN(weight, 0, spec.make_spec("paddle", atol=0.0, max_iterations=3), u0, v0)
    sn.forward(weight, training=True)
    assert sn.last_iterations == 3


def test_several_singular_values_match_the_svd():
    weight = random_weight((7, 3, 2), seed=11)
    sn = converged_reference(weight, 1, num_svs=3)
    exact = np.linalg.svd(spec.to_matrix(weight, 1), compute_uv=False)[:3]
    np.testing.assert_allclose(np.abs(sn.singular_values(weight)), exact, rtol=1e-6)
    plain = converged_reference(weight, 1)
    np.testing.assert_array_equal(sn.forward(weight, False), plain.forward(weight, False))


@pytest.mark.parametrize(
    "features, argument",
    [({"coeff": 0.0}, "coeff"), ({"coeff": -1.0}, "coeff"), ({"atol": -1e-3}, "atol"), ({"rtol": float("inf")}, "rtol"),
     ({"max_iterations": 0}, "max_iterations"), ({"num_svs": 0}, "num_svs")],
)
def test_feature_arguments_are_validated(features, argument):
    with pytest.raises(ValueError, match=argument):
        spec.make_spec("torch", **features)
