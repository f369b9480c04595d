"""Property tests: random shapes, dims, iteration counts, eps and dtypes.

Both backends must equal the numpy reference, and a call with bad arguments must leave the
layer exactly as it was.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dualsn import spec
from dualsn import reference as numpy_ref

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

import dualsn.paddle as dsn_paddle  # noqa: E402
import dualsn.torch as dsn_torch  # noqa: E402

TOLERANCE = {"float32": 2e-5, "float64": 1e-10}
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class TorchHolder(torch.nn.Module):
    def __init__(self, weight: np.ndarray):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.from_numpy(weight.copy()))

    def forward(self):
        return self.weight


class PaddleHolder(paddle.nn.Layer):
    def __init__(self, weight: np.ndarray):
        super().__init__()
        self.weight = self.create_parameter(list(weight.shape), dtype=str(weight.dtype))
        self.weight.set_value(weight)

    def forward(self):
        return self.weight


@st.composite
def problems(draw):
    ndim = draw(st.integers(1, 5))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    dim = draw(st.integers(-ndim, ndim - 1))
    return {
        "shape": shape,
        "dim": dim,
        "n_power_iterations": draw(st.integers(1, 4)),
        "eps": draw(st.sampled_from([1e-12, 1e-6, 1e-2])),
        "dtype": draw(st.sampled_from(["float32", "float64"])),
        "compat": draw(st.sampled_from(sorted(spec.PRESETS))),
        "seed": draw(st.integers(0, 2**32 - 1)),
        "scale": draw(st.sampled_from([1.0, 1e-3])),
    }


def assert_close(actual, expected, tolerance, backend):
    """Max-abs difference relative to the reference's largest finite entry. A weight whose
    norm sits far below eps drives u, v (and sigma) to zero, so W / sigma may be infinite:
    infinities must then sit at the same places with the same signs."""
    finite = np.isfinite(expected)
    scale = max(np.abs(expected[finite]).max(initial=0.0), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tolerance * scale, err_msg=backend)


def torch_state(module, w_sn):
    # Reading module.weight again in training mode would run another power iteration.
    sn = dsn_torch.get_spectral_norm(module)
    u = None if sn._u is None else sn._u.numpy()
    v = None if sn._v is None else sn._v.numpy()
    return u, v, w_sn.detach().numpy()


def paddle_state(layer, w_sn):
    u = getattr(layer, "weight_u", None)
    v = getattr(layer, "weight_v", None)
    return (None if u is None else u.numpy(), None if v is None else v.numpy(), w_sn.numpy())


@SETTINGS
@given(problems())
def test_both_backends_equal_the_reference(problem):
    rng = np.random.default_rng(problem["seed"] % 1000)
    weight = (problem["scale"] * rng.standard_normal(problem["shape"])).astype(problem["dtype"])
    kwargs = dict(
        n_power_iterations=problem["n_power_iterations"],
        eps=problem["eps"],
        dim=problem["dim"],
        compat=problem["compat"],
        seed=problem["seed"],
    )
    preset = spec.make_spec(problem["compat"], problem["n_power_iterations"], problem["eps"])
    h, w = spec.matrix_shape(weight.shape, problem["dim"])
    u0, v0 = spec.init_uv(h, w, problem["seed"], problem["dtype"], problem["eps"])
    reference = numpy_ref.ReferenceSN(weight, problem["dim"], preset, u0, v0, training=True, seed=problem["seed"])

    torch_module = dsn_torch.spectral_norm(TorchHolder(weight), **kwargs)
    paddle_layer = dsn_paddle.spectral_norm(PaddleHolder(weight), **kwargs)
    tolerance = TOLERANCE[problem["dtype"]]

    for training in (True, True, False):
        expected = reference.forward(weight, training)
        torch_module.train(training)
        paddle_layer.train()
        if not training:
            paddle_layer.eval()
        torch_states = torch_state(torch_module, torch_module())
        paddle_states = paddle_state(paddle_layer, paddle_layer())
        for backend, (u, v, w_sn) in (("torch", torch_states), ("paddle", paddle_states)):
            assert_close(w_sn, expected, tolerance, backend)
            if reference.u is not None:
                assert_close(u, reference.u, tolerance, backend)
                assert_close(v, reference.v, tolerance, backend)
            else:
                assert u is None and v is None, backend


def bad_arguments():
    return st.one_of(
        st.fixed_dictionaries({"dim": st.integers(2, 6) | st.integers(-8, -3)}),
        st.fixed_dictionaries({"n_power_iterations": st.integers(-3, 0)}),
        st.fixed_dictionaries({"eps": st.sampled_from([0.0, -1e-12, -1.0])}),
        st.fixed_dictionaries({"compat": st.sampled_from(["tf", "TORCH", "", "jax"])}),
        st.fixed_dictionaries({"name": st.sampled_from(["wieght", "bias_", "w"])}),
    )


@SETTINGS
@given(bad_arguments())
def test_bad_arguments_never_change_a_layer(bad):
    torch_module = torch.nn.Linear(3, 4)
    before = {k: v.clone() for k, v in torch_module.state_dict().items()}
    with pytest.raises((IndexError, ValueError)) as torch_error:
        dsn_torch.spectral_norm(torch_module, **bad)
    assert next(iter(bad)) in str(torch_error.value) or "name" in bad
    assert type(torch_module) is torch.nn.Linear and not hasattr(torch_module, "parametrizations")
    assert before.keys() == torch_module.state_dict().keys()
    for key, value in torch_module.state_dict().items():
        assert torch.equal(before[key], value)

    paddle_layer = paddle.nn.Linear(3, 4)
    before = {k: v.numpy().copy() for k, v in paddle_layer.state_dict().items()}
    with pytest.raises((IndexError, ValueError)):
        dsn_paddle.spectral_norm(paddle_layer, **bad)
    assert not paddle_layer._forward_pre_hooks
    assert before.keys() == paddle_layer.state_dict().keys()
    for key, value in paddle_layer.state_dict().items():
        np.testing.assert_array_equal(before[key], value.numpy())
