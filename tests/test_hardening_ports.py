"""Issue 12, section 4: ports are transactional.

Every source value is converted (byte order, strides, sparse layout) or refused in the plan
phase, before the first write; a failing port leaves every target tensor bit-identical and lists
every problem; NaN/Inf values and all-zero u/v are refused unless asked for; a spectral norm
taken along the other axis of a square weight is detected from u and v and refused.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")
pytestmark = pytest.mark.filterwarnings("ignore:When training, we now always track")

import dualsn.paddle as dpaddle  # noqa: E402
import dualsn.torch as dtorch  # noqa: E402
from dualsn import port  # noqa: E402
from dualsn.examples import sngan  # noqa: E402
from _numeric import rel  # noqa: E402

FACTORIES = {"torch": sngan.torch_discriminator, "paddle": sngan.paddle_discriminator}


def other(fw: str) -> str:
    return "paddle" if fw == "torch" else "torch"


def numpy_state(model) -> dict[str, np.ndarray]:
    state = port._adapter(port.framework_of(model)).state(model)
    return {k: np.array(port._to_numpy(v)) for k, v in state.items()}


def assert_bit_identical(after: dict, before: dict) -> None:
    assert after.keys() == before.keys()
    for key in before:
        assert after[key].dtype == before[key].dtype, key
        assert after[key].tobytes() == before[key].tobytes(), key


def trained_source(fw: str):
    """A discriminator whose u, v are past their initial draw (three training forwards)."""
    model = FACTORIES[fw]()
    model.train()
    for seed in range(3):
        x, y = sngan.discriminator_inputs(4, seed)
        if fw == "torch":
            with torch.no_grad():
                model(torch.from_numpy(x), torch.from_numpy(y))
        else:
            with paddle.no_grad():
                model(paddle.to_tensor(x), paddle.to_tensor(y))
    return model


def last_key(state) -> str:
    """The source key of the target's LAST tensor: the class embedding's v, in both frameworks."""
    key = list(state)[-1]
    assert key.startswith("embed.") and key.endswith(("_v", "weight_v")), key
    return key


# ---------------------------------------------------------------------------------------------
# Values that need converting, in the last layer: converted in the plan phase, then loaded


CONVERSIONS = {
    "big-endian": lambda a: a.astype(a.dtype.newbyteorder(">")),
    "negative-strides": lambda a: a[::-1].copy()[::-1],
    "strided": lambda a: np.repeat(a, 3)[::3],
    "read-only": lambda a: np.frombuffer(a.tobytes(), dtype=a.dtype).reshape(a.shape),
}


@pytest.mark.parametrize("target_fw", ["torch", "paddle"])
@pytest.mark.parametrize("kind", list(CONVERSIONS))
def test_numpy_values_are_converted_before_any_write(target_fw, kind):
    source = trained_source(other(target_fw))
    state = numpy_state(source)
    key = last_key(state)
    expected = state[key].copy()
    state[key] = CONVERSIONS[kind](state[key])
    np.testing.assert_array_equal(state[key], expected)
    target = FACTORIES[target_fw]()
    report = port.load_state_dict(target, state, source=other(target_fw))
    entry = report.entries[-1]
    assert entry.source_key == key
    loaded = numpy_state(target)[entry.key]
    assert loaded.dtype == np.float32 and loaded.tobytes() == expected.tobytes()


@pytest.mark.parametrize("target_fw", ["torch", "paddle"])
def test_a_sparse_torch_tensor_is_densified(target_fw):
    source = trained_source("torch")
    state = dict(source.state_dict())
    key = "embed.parametrizations.weight.original"  # the last layer's weight
    dense = state[key].detach().clone()
    state[key] = dense.to_sparse()
    target = FACTORIES[target_fw]()
    report = port.load_state_dict(target, state, source="torch")
    entry = next(e for e in report.entries if e.source_key == key)
    np.testing.assert_array_equal(numpy_state(target)[entry.key], dense.numpy())


def test_a_sparse_paddle_tensor_is_densified():
    layer = paddle.nn.Linear(3, 2)
    state = dict(layer.state_dict())
    dense = state["weight"].numpy()
    state["weight"] = paddle.to_tensor(dense).to_sparse_coo(2)
    target = torch.nn.Linear(3, 2)
    port.load_state_dict(target, state, source="paddle")
    np.testing.assert_array_equal(target.weight.detach().numpy(), dense.T)


# ---------------------------------------------------------------------------------------------
# Values that cannot be converted: refused in the plan phase, the target bit-identical


def _meta_like(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


@pytest.mark.parametrize("target_fw", ["torch", "paddle"])
def test_a_meta_tensor_in_the_last_layer_changes_nothing(target_fw):
    source = trained_source("torch")
    state = dict(source.state_dict())
    key = last_key(state)
    state[key] = _meta_like(state[key])
    target = FACTORIES[target_fw]()
    before = numpy_state(target)
    with pytest.raises(port.PortError) as info:
        port.load_state_dict(target, state, source="torch")
    assert info.value.problems == [f"{key!r} is a meta tensor: it has no data to load"]
    assert_bit_identical(numpy_state(target), before)


@pytest.mark.parametrize("target_fw", ["torch", "paddle"])
def test_every_problem_is_listed_and_nothing_is_written(target_fw):
    source = trained_source("torch")
    state = {k: v.detach().clone() for k, v in source.state_dict().items()}
    first_w = "blocks.0.conv1.parametrizations.weight.original"
    middle_u = "blocks.1.conv2.parametrizations.weight.0._u"
    last = last_key(state)
    state[first_w][0, 0, 0, 0] = float("nan")
    state["linear.bias"][0] = float("inf")
    state[middle_u].zero_()
    state[last] = _meta_like(state[last])
    target = FACTORIES[target_fw]()
    before = numpy_state(target)
    with pytest.raises(port.PortError) as info:
        port.load_state_dict(target, state, source="torch")
    problems = info.value.problems
    assert len(problems) == 4, problems
    text = str(info.value)
    assert f"{first_w!r}: 1 of 864 values are NaN or Inf" in text
    assert "'linear.bias': 1 of 1 values are NaN or Inf" in text
    assert f"{middle_u!r}: u is all zeros" in text
    assert f"{last!r} is a meta tensor" in text
    assert "allow_degenerate=True" in text
    assert_bit_identical(numpy_state(target), before)


def test_an_object_array_is_refused():
    source = trained_source("paddle")
    state = numpy_state(source)
    key = last_key(state)
    state[key] = np.array(list(state[key]), dtype=object)
    target = sngan.torch_discriminator()
    before = numpy_state(target)
    with pytest.raises(port.PortError, match="dtype mismatch for 'embed.parametrizations.weight.0._v'"):
        port.load_state_dict(target, state, source="paddle")
    assert_bit_identical(numpy_state(target), before)


def test_an_uninitialized_paddle_source_is_refused():
    with paddle.LazyGuard():  # parameters with shapes but no data yet
        layer = paddle.nn.Linear(3, 2)
    target = torch.nn.Linear(3, 2)
    before = numpy_state(target)
    with pytest.raises(port.PortError) as info:
        port.load_state_dict(target, layer.state_dict(), source="paddle")
    assert info.value.problems == ["'weight' is a Paddle tensor without data", "'bias' is a Paddle tensor without data"]
    assert_bit_identical(numpy_state(target), before)


# ---------------------------------------------------------------------------------------------
# NaN / Inf and all-zero u, v: refused by default, loaded when asked for


@pytest.mark.parametrize("target_fw", ["torch", "paddle"])
def test_nonfinite_values_are_refused_unless_allowed(target_fw):
    source = trained_source(other(target_fw))
    state = numpy_state(source)
    key = last_key(state)
    state[key][1] = np.nan
    target = FACTORIES[target_fw]()
    before = numpy_state(target)
    with pytest.raises(port.PortError) as info:
        port.load_state_dict(target, state, source=other(target_fw))
    assert info.value.problems == [
        f"{key!r}: 1 of {state[key].size} values are NaN or Inf; refused (pass allow_degenerate=True, "
        "or --allow-degenerate on the command line, to load it anyway)"]
    assert_bit_identical(numpy_state(target), before)
    report = port.load_state_dict(target, state, source=other(target_fw), allow_degenerate=True)
    loaded = numpy_state(target)[report.entries[-1].key]
    assert np.isnan(loaded[1]) and np.array_equal(np.delete(loaded, 1), np.delete(state[key], 1))


@pytest.mark.parametrize("role", ["u", "v"])
def test_all_zero_u_or_v_is_refused_unless_allowed(role):
    source = trained_source("torch")
    state = numpy_state(source)
    key = f"linear.parametrizations.weight.0._{role}"
    state[key] = np.zeros_like(state[key])
    target = sngan.paddle_discriminator()
    with pytest.raises(port.PortError) as info:
        port.load_state_dict(target, state, source="torch")
    assert info.value.problems == [
        f"{key!r}: {role} is all zeros, which the power iteration never leaves; refused (pass "
        "allow_degenerate=True, or --allow-degenerate on the command line, to load it anyway)"]
    port.load_state_dict(target, state, source="torch", allow_degenerate=True)
    assert not np.any(getattr(target.linear, f"weight_{role}").numpy())


def test_the_live_path_refuses_nonfinite_weights_too():
    source, target = sngan.torch_discriminator(), sngan.paddle_discriminator()
    with torch.no_grad():
        source.linear.parametrizations.weight.original[0, 0] = float("inf")
    before = numpy_state(target)
    with pytest.raises(port.PortError, match="1 of 32 values are NaN or Inf"):
        port.torch_to_paddle(source, target)
    assert_bit_identical(numpy_state(target), before)
    port.torch_to_paddle(source, target, allow_degenerate=True)
    assert np.isinf(target.linear.weight_orig.numpy()[0, 0])


# ---------------------------------------------------------------------------------------------
# A spectral norm along the other axis of a square weight


def trained_square_torch(n=8, seed=0):
    torch.manual_seed(seed)
    module = dtorch.spectral_norm(torch.nn.Linear(n, n), seed=seed)  # dim 0 of [out, in]: rows = outputs
    module.train()
    for _ in range(3):
        module(torch.randn(4, n))
    return module.eval()


def trained_square_paddle(n=8, seed=0, dim=0):
    paddle.seed(seed)
    layer = dpaddle.spectral_norm(paddle.nn.Linear(n, n), dim=dim, seed=seed)
    layer.train()
    for _ in range(3):
        layer(paddle.randn([4, n]))
    return layer


def eval_out(model, x):
    model.eval()
    if port.framework_of(model) == "torch":
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()
    with paddle.no_grad():
        return model(paddle.to_tensor(x)).numpy()


X8 = np.random.default_rng(5).standard_normal((3, 8)).astype(np.float32)


@pytest.mark.parametrize(
    "make_target",
    [lambda: dpaddle.spectral_norm(paddle.nn.Linear(8, 8), dim=0, seed=1),
     lambda: paddle.nn.utils.spectral_norm(paddle.nn.Linear(8, 8), dim=0)],
    ids=["dualsn-dim0", "paddle-builtin-dim0"],
)
def test_a_square_weight_normalized_along_the_other_axis_is_refused(make_target):
    source = trained_square_torch()
    state = numpy_state(source)
    target = make_target()
    before = numpy_state(target)
    with pytest.raises(port.PortError) as info:
        port.load_state_dict(target, state, source="torch")
    (problem,) = info.value.problems
    assert problem.startswith(
        "spectral norm of 'weight': the source's u and v fit the transposed W-matrix")
    assert "along dim 0 of its [in, out] weight (rows: input features)" in problem
    assert "register it with dim=1 (rows: output features)" in problem
    assert_bit_identical(numpy_state(target), before)


def test_the_same_checkpoint_loads_into_the_matching_axis():
    source = trained_square_torch()
    target = dpaddle.spectral_norm(paddle.nn.Linear(8, 8), seed=1)  # dualsn's default: dim 1
    port.load_state_dict(target, numpy_state(source), source="torch")
    assert rel(eval_out(target, X8), eval_out(source, X8)) < 1e-5


def test_the_other_direction_is_refused_too():
    source = trained_square_paddle(dim=0)  # rows: input features
    target = dtorch.spectral_norm(torch.nn.Linear(8, 8), seed=1)  # rows: output features
    before = numpy_state(target)
    with pytest.raises(port.PortError) as info:
        port.load_state_dict(target, numpy_state(source), source="paddle")
    assert "along dim 0 of its [out, in] weight (rows: output features)" in str(info.value)
    assert "register it with dim=1 (rows: input features)" in str(info.value)
    assert_bit_identical(numpy_state(target), before)
    matching = dtorch.spectral_norm(torch.nn.Linear(8, 8), dim=1, seed=1)
    port.load_state_dict(matching, numpy_state(source), source="paddle")
    assert rel(eval_out(matching, X8), eval_out(source, X8)) < 1e-5


def test_u_and_v_that_fit_both_orientations_are_not_refused():
    # A symmetric weight: u and v fit W and W^T alike, and loading them is right either way.
    source = trained_square_torch()
    with torch.no_grad():
        w = source.parametrizations.weight.original
        w.copy_(w + w.T)
        source.train()
        source(torch.randn(2, 8))
    target = dpaddle.spectral_norm(paddle.nn.Linear(8, 8), dim=0, seed=1)
    port.load_state_dict(target, numpy_state(source), source="torch")
    assert rel(eval_out(target, X8), eval_out(source, X8)) < 1e-5


def test_the_live_path_explains_a_dim_mismatch():
    module = dtorch.spectral_norm(torch.nn.Linear(4, 4), seed=0)
    layer = dpaddle.spectral_norm(paddle.nn.Linear(4, 4), dim=0, seed=0)
    with pytest.raises(port.PortError) as info:
        port.torch_to_paddle(module, layer)
    (problem,) = info.value.problems
    assert problem == (
        "spectral norm of 'weight' normalizes a different matrix in the target than in the source: "
        "the target takes it along dim 0 of its [in, out] weight (rows: input features), the source "
        "along dim 0 of its [out, in] weight (rows: output features), so u and v would not fit; "
        "register the target's with dim=1 (rows: output features)"
    )


def test_a_meta_target_is_refused_not_silently_skipped():
    with torch.device("meta"):
        target = torch.nn.Linear(3, 2)
    with pytest.raises(port.PortError) as info:
        port.load_state_dict(target, paddle.nn.Linear(3, 2).state_dict())
    assert len(info.value.problems) == 2
    assert all("in the target is a meta tensor" in p and "to_empty" in p for p in info.value.problems)
