"""The names dualsn.paddle gained to mirror dualsn.torch (issue 11): weight_grad, the closed-form
gradient the grad hooks apply, and the public power_iteration_ with torch's signature."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

paddle = pytest.importorskip("paddle")

import dualsn.paddle as dsn  # noqa: E402
from dualsn import spec  # noqa: E402
from dualsn import reference as numpy_ref  # noqa: E402
from _numeric import random_array  # noqa: E402

# (weight shape, dim): the three WeightMatrix layouts ("rows", "cols", "batched")
LAYOUTS = [((5, 7), 0), ((4, 3, 3, 2), 0), ((7, 5), 1), ((2, 3, 5), 2), ((3, 5, 2, 2), 1)]


def npy(t) -> np.ndarray:
    return t.numpy().copy()


def real_part(t):
    return paddle.real(t) if paddle.is_complex(t) else t


def assert_close(actual, desired, rtol=1e-12) -> None:
    """Equal to ``rtol`` of the largest magnitude (entries near zero not over-weighted)."""
    desired = np.asarray(desired)
    np.testing.assert_allclose(actual, desired, rtol=0, atol=rtol * np.abs(desired).max())


def warmed_state(shape, dim, dtype, seed):
    """W and (u, v) after a few power iterations of the numpy reference, so that sigma is near
    the largest singular value (about 1 for these weights)."""
    rng = np.random.default_rng(seed)
    w = random_array(shape, dtype, rng)
    w = w / np.linalg.norm(spec.to_matrix(w, dim), 2)
    h, n = spec.matrix_shape(shape, dim)
    u, v = spec.init_uv(h, n, seed, dtype)
    u, v = numpy_ref.power_iteration(spec.to_matrix(w, dim), u, v, 5, "uv", 1e-12)
    return w, u, v, rng


def autograd_of_plain_twin(w, u, v, g, dim, sp) -> np.ndarray:
    """dL/dW of L = Re<G, W_sn> by Paddle's autograd through the plain path."""
    weight = paddle.to_tensor(w, stop_gradient=False)
    with dsn.plain_path():
        w_sn = dsn.normalized_weight(weight, paddle.to_tensor(u), paddle.to_tensor(v), dim, sp, False)
    (grad,) = paddle.grad(real_part((paddle.conj(paddle.to_tensor(g)) * w_sn).sum()), [weight])
    return npy(grad)


# coeff: none, an active soft bound (sigma ~ 1 > 0.5), an inactive one (sigma < 3)
SPECS = {
    "plain": spec.make_spec("torch"),
    "coeff active": spec.make_spec("torch", coeff=0.5),
    "coeff inactive": spec.make_spec("torch", coeff=3.0),
}


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("dtype", ["float64", "complex128"])
@pytest.mark.parametrize("shape, dim", LAYOUTS)
def test_weight_grad_equals_autograd_of_the_plain_twin_and_the_reference(shape, dim, dtype, spec_name):
    sp = SPECS[spec_name]
    w, u, v, rng = warmed_state(shape, dim, dtype, seed=3)
    g = random_array(shape, dtype, rng)
    sigma = numpy_ref.sigma(spec.to_matrix(w, dim), u, v)
    assert (np.real(sigma) > 0.5) and (np.real(sigma) < 3.0)  # the bounds above are as named
    got = dsn.weight_grad(paddle.to_tensor(g), paddle.to_tensor(w), sigma.item(),  # a Python number
                          paddle.to_tensor(u), paddle.to_tensor(v), dim, sp)
    reference = numpy_ref.normalized_weight_grad(g, w, u, v, dim, sp)
    assert_close(npy(got), reference)
    assert_close(npy(got), autograd_of_plain_twin(w, u, v, g, dim, sp))
    if spec_name == "coeff inactive":
        np.testing.assert_array_equal(npy(got), g)  # W_sn = W: the gradient passes unchanged
    else:
        assert not np.allclose(npy(got), g / np.conj(sp.divisor(sigma)))  # the rank-1 term is there


def test_weight_grad_of_a_zero_sigma_is_g_over_eps():
    """sigma == 0 (an all-zero W): the divisor is floored to eps, a constant: G / eps."""
    sp = spec.make_spec("torch", eps=1e-3)
    rng = np.random.default_rng(5)
    w = np.zeros((4, 6))
    g = rng.standard_normal((4, 6))
    u, v = spec.init_uv(4, 6, 1, "float64")
    got = npy(dsn.weight_grad(paddle.to_tensor(g), paddle.to_tensor(w), 0.0, paddle.to_tensor(u),
                              paddle.to_tensor(v), 0, sp))
    assert_close(got, g / 1e-3)
    assert_close(got, numpy_ref.normalized_weight_grad(g, w, u, v, 0, sp))
    assert_close(got, autograd_of_plain_twin(w, u, v, g, 0, sp))


@pytest.mark.parametrize("coeff", [None, 0.5])
@pytest.mark.parametrize("shape, dim", LAYOUTS)
def test_the_grad_hook_applies_weight_grad(shape, dim, coeff):
    """The fast path's gradient (autograd's scale by 1 / d, then the hook's rank-1 term) is
    weight_grad, to the last bit; sigma may be given as a 0-D tensor."""
    sp = spec.make_spec("torch", coeff=coeff)
    w, u, v, rng = warmed_state(shape, dim, "float64", seed=7)
    g = paddle.to_tensor(random_array(shape, "float64", rng))
    weight = paddle.to_tensor(w, stop_gradient=False)
    u_t, v_t = paddle.to_tensor(u), paddle.to_tensor(v)
    w_sn = dsn.normalized_weight(weight, u_t, v_t, dim, sp, False)
    (hooked,) = paddle.grad((g * w_sn).sum(), [weight])
    with paddle.no_grad():
        sigma = paddle.dot(u_t, dsn.WeightMatrix(weight, dim).mv(v_t))  # u^H W v, as the hook has it
    got = dsn.weight_grad(g, weight.detach(), sigma, u_t, v_t, dim, sp)
    np.testing.assert_array_equal(npy(got), npy(hooked))


def test_power_iteration_has_torchs_signature():
    params = list(inspect.signature(dsn.power_iteration_).parameters)
    assert params == ["weight", "dim", "u", "v", "n", "order", "eps"]
    assert "power_iteration_" in dsn.__all__ and "weight_grad" in dsn.__all__


@pytest.mark.parametrize("order", ["uv", "vu"])
@pytest.mark.parametrize("shape, dim", LAYOUTS)
def test_power_iteration_writes_u_v_in_place_and_returns_sigma(shape, dim, order):
    rng = np.random.default_rng(11)
    w = rng.standard_normal(shape)
    h, n = spec.matrix_shape(shape, dim)
    u0, v0 = spec.init_uv(h, n, 2, "float64")
    u, v = paddle.to_tensor(u0), paddle.to_tensor(v0)
    u_id, v_id = id(u), id(v)
    sigma = dsn.power_iteration_(paddle.to_tensor(w), dim, u, v, 4, order, 1e-12)
    w_mat = spec.to_matrix(w, dim)
    u_ref, v_ref = numpy_ref.power_iteration(w_mat, u0, v0, 4, order, 1e-12)
    assert (id(u), id(v)) == (u_id, v_id)
    np.testing.assert_allclose(npy(u), u_ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(npy(v), v_ref, rtol=1e-12, atol=1e-14)
    assert isinstance(sigma, float)
    assert sigma == pytest.approx(float(numpy_ref.sigma(w_mat, u_ref, v_ref)), rel=1e-12)
    assert dsn.power_iteration_(paddle.to_tensor(w), dim, u, v, 0, order, 1e-12) is None
    np.testing.assert_allclose(npy(u), u_ref, rtol=1e-12, atol=1e-14)  # n == 0: untouched
