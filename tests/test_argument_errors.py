"""Issue 12, parity: bad arguments raise what the built-in each backend stands in for raises,
checked against the built-ins themselves, and a failed call changes nothing."""

from __future__ import annotations

import numpy as np
import pytest

from dualsn import spec

torch = pytest.importorskip("torch", reason="torch is not installed")
paddle = pytest.importorskip("paddle", reason="Paddle is not installed")

import dualsn.paddle as dp  # noqa: E402
import dualsn.torch as dt  # noqa: E402

TORCH_BUILTIN = torch.nn.utils.parametrizations.spectral_norm
PADDLE_BUILTIN = paddle.nn.utils.spectral_norm


def torch_linear():
    return torch.nn.Linear(3, 4)


def paddle_linear():
    return paddle.nn.Linear(3, 4)


def torch_state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, sorted(module._parameters)


def paddle_state(layer):
    return {k: v.numpy().copy() for k, v in layer.state_dict().items()}, sorted(layer._parameters), len(layer._forward_pre_hooks)


def assert_torch_unchanged(module, before):
    after = torch_state(module)
    assert after[1] == before[1]
    assert after[0].keys() == before[0].keys()
    assert all(torch.equal(after[0][k], before[0][k]) for k in before[0])


def assert_paddle_unchanged(layer, before):
    after = paddle_state(layer)
    assert after[1:] == before[1:]
    assert after[0].keys() == before[0].keys()
    assert all(np.array_equal(after[0][k], before[0][k]) for k in before[0])


WRONG_TYPES = [
    ({"n_power_iterations": "1"}, "n_power_iterations"),
    ({"n_power_iterations": 1.5}, "n_power_iterations"),
    ({"eps": "x"}, "eps"),
    ({"name": 3}, "name"),
    ({"dim": "0"}, "dim"),
    ({"seed": "7"}, "seed"),
    ({"coeff": "1"}, "coeff"),
    ({"num_svs": 1.0}, "num_svs"),
]


@pytest.mark.parametrize("kwargs, argument", WRONG_TYPES)
def test_wrongly_typed_arguments_raise_type_error_in_both_frameworks(kwargs, argument):
    module, layer = torch_linear(), paddle_linear()
    before_t, before_p = torch_state(module), paddle_state(layer)
    with pytest.raises(TypeError, match=argument):
        dt.spectral_norm(module, **kwargs)
    with pytest.raises(TypeError, match=argument):
        dp.spectral_norm(layer, **kwargs)
    assert_torch_unchanged(module, before_t)
    assert_paddle_unchanged(layer, before_p)


@pytest.mark.parametrize("kwargs", [{"n_power_iterations": "1"}, {"eps": "x"}])
def test_the_builtins_raise_type_error_too(kwargs):
    with pytest.raises(TypeError):
        TORCH_BUILTIN(torch_linear(), **kwargs)
    with pytest.raises(TypeError):
        PADDLE_BUILTIN(paddle_linear(), **kwargs)(paddle.ones([1, 3]))


@pytest.mark.parametrize(
    "kwargs, argument",
    [({"n_power_iterations": 0}, "n_power_iterations"), ({"eps": -1.0}, "eps"), ({"seed": -1}, "seed"),
     ({"compat": "tf"}, "compat"), ({"coeff": 0.0}, "coeff")],
)
def test_bad_values_raise_value_error_not_type_error(kwargs, argument):
    for framework, make in ((dt, torch_linear), (dp, paddle_linear)):
        with pytest.raises(ValueError, match=argument) as caught:
            framework.spectral_norm(make(), **kwargs)
        assert not isinstance(caught.value, TypeError)


def test_dim_out_of_range_raises_what_each_builtin_raises():
    with pytest.raises(IndexError):
        TORCH_BUILTIN(torch_linear(), dim=5)
    with pytest.raises(ValueError):
        PADDLE_BUILTIN(paddle_linear(), dim=5)
    module, layer = torch_linear(), paddle_linear()
    before_t, before_p = torch_state(module), paddle_state(layer)
    with pytest.raises(IndexError, match="dim"):
        dt.spectral_norm(module, dim=5)
    with pytest.raises(ValueError, match="dim"):
        dp.spectral_norm(layer, dim=5)
    assert_torch_unchanged(module, before_t)
    assert_paddle_unchanged(layer, before_p)


def test_unknown_parameter_raises_what_each_builtin_raises():
    with pytest.raises(ValueError):
        TORCH_BUILTIN(torch_linear(), name="nope")
    with pytest.raises(KeyError):
        PADDLE_BUILTIN(paddle_linear(), name="nope")
    with pytest.raises(ValueError, match="nope"):
        dt.spectral_norm(torch_linear(), name="nope")
    with pytest.raises(KeyError) as caught:
        dp.spectral_norm(paddle_linear(), name="nope")
    assert str(caught.value).startswith("Expected name")  # a message, not a quoted repr


def test_a_module_of_the_other_framework_gets_a_type_error_naming_the_right_function():
    with pytest.raises(TypeError, match=r"dualsn\.torch\.spectral_norm"):
        dp.spectral_norm(torch_linear())
    with pytest.raises(TypeError, match=r"dualsn\.paddle\.spectral_norm"):
        dt.spectral_norm(paddle_linear())
    with pytest.raises(TypeError, match=r"dualsn\.torch\.sigma"):
        dp.sigma(torch_linear())
    with pytest.raises(TypeError, match=r"dualsn\.paddle\.remove_spectral_norm"):
        dt.remove_spectral_norm(paddle_linear())


@pytest.mark.parametrize("num_svs", [4, 5])
def test_num_svs_above_the_rank_bound_is_refused(num_svs):
    # a 4 x 3 W-matrix has at most 3 singular values
    module, layer = torch_linear(), paddle_linear()
    before_t, before_p = torch_state(module), paddle_state(layer)
    with pytest.raises(ValueError, match="num_svs"):
        dt.spectral_norm(module, num_svs=num_svs)
    with pytest.raises(ValueError, match="num_svs"):
        dp.spectral_norm(layer, num_svs=num_svs)
    assert_torch_unchanged(module, before_t)
    assert_paddle_unchanged(layer, before_p)


def test_num_svs_at_the_rank_bound_gives_the_exact_singular_values():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3))
    layer = paddle_linear()
    layer.weight.set_value(w.T.astype("float32"))
    dp.spectral_norm(layer, num_svs=3, seed=0)
    for _ in range(200):
        layer(paddle.ones([1, 3]))
    exact = np.linalg.svd(w, compute_uv=False)
    np.testing.assert_allclose(np.abs(dp.singular_values(layer)), exact, rtol=1e-4)


def int_weight_layer():
    layer = paddle_linear()
    one = paddle.nn.initializer.Constant(1)
    layer.weight = layer.create_parameter([3, 4], dtype="int32", default_initializer=one)
    return layer


def test_paddle_integer_weight_is_refused_at_registration_unlike_the_builtin():
    PADDLE_BUILTIN(int_weight_layer())  # the built-in accepts it, and fails only later
    layer = int_weight_layer()
    before = paddle_state(layer)
    with pytest.raises(TypeError, match="floating point"):
        dp.spectral_norm(layer)
    assert_paddle_unchanged(layer, before)


def test_errors_are_also_value_errors_for_existing_handlers():
    """Wrong types were ValueError before: ``except ValueError`` still catches them."""
    assert issubclass(spec.ArgumentTypeError, ValueError)
    assert issubclass(spec.DimOutOfRangeError, (IndexError, ValueError))
    assert issubclass(spec.ParameterNotFoundError, KeyError)
