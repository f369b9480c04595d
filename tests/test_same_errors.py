"""Bad arguments give the same exception type and the same message in both frameworks: every
check lives in dualsn.options (issue 11)."""

import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

import dualsn.paddle as dp  # noqa: E402
import dualsn.torch as dt  # noqa: E402
from dualsn import options  # noqa: E402

BAD = [
    dict(n_power_iterations="1"),
    dict(n_power_iterations=0),
    dict(eps="x"),
    dict(eps=-1.0),
    dict(compat="bogus"),
    dict(compat=3),
    dict(seed=-1),
    dict(seed=1.5),
    dict(track_sigma=1),
    dict(coeff=0.0),
    dict(atol=-1.0),
    dict(rtol="x"),
    dict(max_iterations=0),
    dict(num_svs=0),
    dict(num_svs=5),
    dict(dim=2),
    dict(dim=-3),
    dict(dim=1.0),
    dict(name=3),
]


def _error(call):
    with pytest.raises(Exception) as caught:
        call()
    return caught.value


@pytest.mark.parametrize("kwargs", BAD, ids=lambda k: ",".join(f"{a}={b!r}" for a, b in k.items()))
def test_same_type_and_message(kwargs):
    # torch's Linear(4, 3) weight is [3, 4], Paddle's [4, 3] with default dim 1: the same
    # 3 x 4 W-matrix, so shape-dependent messages (num_svs, dim) agree too.
    t = _error(lambda: dt.spectral_norm(torch.nn.Linear(4, 3), **kwargs))
    p = _error(lambda: dp.spectral_norm(paddle.nn.Linear(4, 3), **kwargs))
    assert type(t) is type(p)
    assert str(t) == str(p)
    assert isinstance(t, ValueError)  # every bad argument is also a ValueError


def test_integer_weight_same_error():
    t_layer, p_layer = torch.nn.Linear(4, 3), paddle.nn.Linear(4, 3)
    t_layer.weight = torch.nn.Parameter(torch.zeros(3, 4, dtype=torch.int64), requires_grad=False)
    p_layer.weight = paddle.create_parameter([4, 3], "int64", default_initializer=paddle.nn.initializer.Constant(1))
    t = _error(lambda: dt.spectral_norm(t_layer))
    p = _error(lambda: dp.spectral_norm(p_layer))
    assert type(t) is type(p) is options.WeightDtypeError
    assert isinstance(t, NotImplementedError) and isinstance(t, TypeError)
    assert str(t).replace("torch.", "").replace("paddle.", "") == str(p).replace("torch.", "").replace("paddle.", "")


def test_unknown_name_same_error():
    """Same type and wording; what may be named differs: torch normalizes buffers too, Paddle's
    hook (like Paddle's built-in) parameters only."""
    t = _error(lambda: dt.spectral_norm(torch.nn.Linear(4, 3), name="nope"))
    p = _error(lambda: dp.spectral_norm(paddle.nn.Linear(4, 3), name="nope"))
    assert type(t) is type(p) is options.ParameterNotFoundError
    assert str(t) == str(options.parameter_not_found("nope", "Linear", "parameter or buffer", ["weight", "bias"]))
    assert str(p) == str(options.parameter_not_found("nope", "Linear", "parameter", ["weight", "bias"]))
