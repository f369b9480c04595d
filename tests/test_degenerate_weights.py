"""Degenerate weights (issue 12 §2), with real values, in both frameworks and every preset.

The rules (``dualsn.spec``): a zero sigma (all-zero or underflowed W) divides by eps, so the
normalized weight is W / eps (0 for W = 0) and its gradient G / eps, where all three built-ins
give NaN; pair 0's u, v restart from ``spec.recovery_uv(h, w, seed)`` whenever a step's norm
underflows, so the iteration recovers once W is non-zero again; norms never overflow (weights
up to 1e30 in float32, 1e300 in float64); a NaN/Inf in W makes a training forward (and the
registration iterations) raise FloatingPointError naming the parameter and the layer class,
before u, v change, while eval forwards pass the NaN through.

Every test runs on the fast path and inside ``plain_path()`` (the plain path must give the same
results). The expected values come from numpy: ``numpy_ref.ReferenceSN`` run on the same sequence,
``spec.recovery_uv``, and the exact singular values of an SVD in float64.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")
import paddle.nn.functional as PF  # noqa: E402
import torch.nn.functional as TF  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

import dualsn  # noqa: E402
from backends._paddle_common import default_dtype as paddle_dtype  # noqa: E402
import dualsn.paddle as dp  # noqa: E402
import dualsn.torch as dt  # noqa: E402
from dualsn import spec  # noqa: E402
from dualsn import reference as numpy_ref  # noqa: E402

PRESETS = tuple(spec.PRESETS)  # "torch", "torch_legacy", "paddle"
DTYPES = ("float32", "float64")
KINDS = ("linear", "conv2d")
SEED = 7
EPS = 1e-12
TOL = {"float32": 1e-5, "float64": 1e-10}

# kind -> (torch-layout weight shape (out first), W-matrix (h, w), input shape)
SHAPES = {
    "linear": ((4, 6), (4, 6), (3, 6)),
    "conv2d": ((3, 2, 3, 3), (3, 18), (2, 2, 5, 5)),
}

# Every test runs on both paths of both backends: the fast path and plain_path(). (The
# gaps these tests found first, in the torch plain path, in Paddle's approximate float ==,
# in Paddle's exact-1-D sigma(), and after a restart from the recovery vectors, are fixed.)
TORCH_PATHS = ("fast", "plain")
PADDLE_PATHS = ("fast", "plain")


@pytest.fixture(autouse=True)
def _clean_state():
    dualsn.manual_seed(None)
    yield
    dualsn.manual_seed(None)
    assert dt._plain.ENABLED is False and dp._plain.ENABLED is False, "a test left plain_path switched on"


# ---------------------------------------------------------------------------------------------
# Helpers


def on_path(path: str):
    """The context of ``path``: both backends' plain path, or nothing."""
    stack = contextlib.ExitStack()
    if path == "plain":
        stack.enter_context(dt.plain_path())
        stack.enter_context(dp.plain_path())
    return stack


def rng_array(shape, seed: int, dtype: str = "float64") -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def spectrum_weight(kind: str, seed: int, top: float = 4.0) -> np.ndarray:
    """A random float64 weight (torch layout) whose W-matrix has singular values top, top / 2,
    top / 4, ...: random singular vectors, a gap that makes 20 iterations converge fully."""
    rng = np.random.default_rng(seed)
    shape, (h, w), _ = SHAPES[kind]
    k = min(h, w)
    left = np.linalg.qr(rng.standard_normal((h, h)))[0][:, :k]
    right = np.linalg.qr(rng.standard_normal((w, w)))[0][:, :k]
    matrix = left @ np.diag(top / 2.0 ** np.arange(k)) @ right.T
    return matrix.reshape(shape)


def top_singular_value(matrix: np.ndarray) -> float:
    return float(np.linalg.svd(np.asarray(matrix, dtype=np.float64), compute_uv=False)[0])


def w_matrix(weight: np.ndarray) -> np.ndarray:
    """The W-matrix of a torch-layout weight (dim 0)."""
    return weight.reshape(weight.shape[0], -1)


# torch -----------------------------------------------------------------------------------------


def torch_layer(kind: str, dtype: str, weight: np.ndarray) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.Linear(6, 4) if kind == "linear" else nn.Conv2d(2, 3, 3)
    layer = layer.to(getattr(torch, dtype))
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(np.asarray(weight, dtype=dtype)))
    return layer


def torch_apply(kind: str, x, weight, bias):
    return TF.linear(x, weight, bias) if kind == "linear" else TF.conv2d(x, weight, bias)


def torch_original(layer: nn.Module):
    return layer.parametrizations.weight.original


def torch_set(layer: nn.Module, weight: np.ndarray) -> None:
    original = torch_original(layer)
    with torch.no_grad():
        original.copy_(torch.from_numpy(np.asarray(weight, dtype=str(original.dtype).split(".")[1])))


def torch_uv(layer: nn.Module):
    sn = dt.get_spectral_norm(layer)
    return sn._u.detach().numpy().copy(), sn._v.detach().numpy().copy()


def torch_weight(layer: nn.Module) -> np.ndarray:
    """The normalized weight, read without iterating (eval mode, restored)."""
    training = layer.training
    layer.eval()
    with torch.no_grad():
        out = layer.weight.detach().numpy().copy()
    layer.train(training)
    return out


# paddle ----------------------------------------------------------------------------------------


def to_paddle_layout(kind: str, weight: np.ndarray) -> np.ndarray:
    """paddle.nn.Linear stores [in, out]: the transpose of torch's weight."""
    return np.ascontiguousarray(weight.T) if kind == "linear" else np.asarray(weight)


def paddle_layer(kind: str, dtype: str, weight: np.ndarray):
    paddle.seed(0)
    with paddle_dtype(dtype):
        layer = paddle.nn.Linear(6, 4) if kind == "linear" else paddle.nn.Conv2D(2, 3, 3)
    layer.weight.set_value(to_paddle_layout(kind, weight).astype(dtype))
    return layer


def paddle_apply(kind: str, x, weight, bias):
    return PF.linear(x, weight, bias) if kind == "linear" else PF.conv2d(x, weight, bias)


def paddle_set(layer, kind: str, weight: np.ndarray) -> None:
    dtype = str(layer.weight_orig.numpy().dtype)
    layer.weight_orig.set_value(to_paddle_layout(kind, weight).astype(dtype))


def paddle_uv(layer):
    return layer.weight_u.numpy().copy(), layer.weight_v.numpy().copy()


def paddle_weight(layer, kind: str) -> np.ndarray:
    """The normalized weight in torch layout, without iterating."""
    training = layer.training
    layer.eval()
    with paddle.no_grad():
        layer(paddle.to_tensor(np.zeros(SHAPES[kind][2], dtype=str(layer.weight_orig.numpy().dtype))))
    out = layer.weight.numpy().copy()
    layer.train() if training else layer.eval()
    return out.T if kind == "linear" else out


def reference(weight: np.ndarray, compat: str, dtype: str, seed: int = SEED, eps: float = EPS) -> numpy_ref.ReferenceSN:
    """numpy_ref.ReferenceSN registered (training mode) on ``weight`` (torch layout) from the seeded
    u, v, as both backends register with ``seed=``."""
    (h, w) = w_matrix(weight).shape
    u0, v0 = spec.init_uv(h, w, seed, dtype, eps)
    sn_spec = spec.make_spec(compat, eps=eps)
    return numpy_ref.ReferenceSN(np.asarray(weight, dtype=dtype), 0, sn_spec, u0, v0, training=True, seed=seed)


# ---------------------------------------------------------------------------------------------
# 1. An all-zero weight: W / eps = 0, gradient G / eps, u, v from recovery_uv


@pytest.mark.parametrize("path", TORCH_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compat", PRESETS)
@pytest.mark.parametrize("kind", KINDS)
def test_zero_weight_torch(kind, compat, dtype, path):
    shape, (h, w), x_shape = SHAPES[kind]
    x = torch.from_numpy(rng_array(x_shape, 1, dtype))
    r_shape = torch_apply(kind, x, torch.zeros(shape, dtype=x.dtype), None).shape
    r = torch.from_numpy(rng_array(tuple(r_shape), 2, dtype))
    layer = torch_layer(kind, dtype, np.zeros(shape))
    bias = layer.bias.detach().clone()
    # G = dL/dW_sn at W_sn = 0, from the layer's functional form
    w0 = torch.zeros(shape, dtype=x.dtype, requires_grad=True)
    (torch_apply(kind, x, w0, bias) * r).sum().backward()
    expected_grad = (w0.grad / EPS).numpy()
    rec_u, rec_v = spec.recovery_uv(h, w, SEED, dtype, EPS)
    init_u, init_v = spec.init_uv(h, w, SEED, dtype, EPS)

    with on_path(path):
        dt.spectral_norm(layer, compat=compat, seed=SEED)
        # "torch" runs 15 + 1 iterations at registration: they met W = 0 and restarted
        u, v = torch_uv(layer)
        start = (rec_u, rec_v) if compat == "torch" else (init_u, init_v)
        assert np.array_equal(u, start[0]) and np.array_equal(v, start[1])
        for training in (False, True, True, False):
            layer.train(training)
            original = torch_original(layer)
            original.grad = None
            out = layer(x)
            assert torch.count_nonzero(layer.weight) == 0  # exactly zero, no NaN
            torch.testing.assert_close(out, torch_apply(kind, x, torch.zeros_like(original), bias), rtol=0, atol=0)
            (out * r).sum().backward()
            grad = original.grad.numpy()
            assert np.isfinite(grad).all()
            np.testing.assert_allclose(grad, expected_grad, rtol=TOL[dtype], atol=0)
            u, v = torch_uv(layer)
            if training or compat == "torch":
                assert np.array_equal(u, rec_u) and np.array_equal(v, rec_v)
        assert dt.sigma(layer) == 0.0


@pytest.mark.parametrize("path", PADDLE_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compat", PRESETS)
@pytest.mark.parametrize("kind", KINDS)
def test_zero_weight_paddle(kind, compat, dtype, path):
    shape, (h, w), x_shape = SHAPES[kind]
    x = paddle.to_tensor(rng_array(x_shape, 1, dtype))
    layer = paddle_layer(kind, dtype, np.zeros(shape))
    p_shape = to_paddle_layout(kind, np.zeros(shape)).shape
    bias = layer.bias.detach().clone()
    r_shape = paddle_apply(kind, x, paddle.zeros(p_shape, dtype=dtype), None).shape
    r = paddle.to_tensor(rng_array(tuple(r_shape), 2, dtype))
    w0 = paddle.zeros(p_shape, dtype=dtype)
    w0.stop_gradient = False
    (paddle_apply(kind, x, w0, bias) * r).sum().backward()
    expected_grad = w0.grad.numpy() / EPS
    rec_u, rec_v = spec.recovery_uv(h, w, SEED, dtype, EPS)
    init_u, init_v = spec.init_uv(h, w, SEED, dtype, EPS)

    with on_path(path):
        dp.spectral_norm(layer, compat=compat, seed=SEED)
        u, v = paddle_uv(layer)
        start = (rec_u, rec_v) if compat == "torch" else (init_u, init_v)
        assert np.array_equal(u, start[0]) and np.array_equal(v, start[1])
        for training in (False, True, True, False):
            layer.train() if training else layer.eval()
            layer.weight_orig.clear_gradient(False)
            out = layer(x)
            assert not np.any(layer.weight.numpy())  # exactly zero, no NaN
            np.testing.assert_array_equal(out.numpy(), paddle_apply(kind, x, paddle.zeros(p_shape, dtype=dtype), bias).numpy())
            (out * r).sum().backward()
            grad = layer.weight_orig.grad.numpy()
            assert np.isfinite(grad).all()
            np.testing.assert_allclose(grad, expected_grad, rtol=TOL[dtype], atol=0)
            u, v = paddle_uv(layer)
            if training or compat == "torch":
                assert np.array_equal(u, rec_u) and np.array_equal(v, rec_v)
        assert dp.sigma(layer) == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compat", PRESETS)
def test_zero_weight_recovery_vectors_are_bit_equal_across_frameworks(compat, dtype):
    """Both frameworks hold the very bits of recovery_uv; a layer without a seed uses seed 0."""
    for seed, expected in ((SEED, spec.recovery_uv(4, 6, SEED, dtype)), (None, spec.recovery_uv(4, 6, 0, dtype))):
        t = dt.spectral_norm(torch_layer("linear", dtype, np.zeros((4, 6))), compat=compat, seed=seed)
        p = dp.spectral_norm(paddle_layer("linear", dtype, np.zeros((4, 6))), compat=compat, seed=seed)
        t(torch.zeros(1, 6, dtype=getattr(torch, dtype)))
        p(paddle.zeros([1, 6], dtype=dtype))
        for a, b, c in zip(torch_uv(t), paddle_uv(p), expected):
            assert a.dtype == b.dtype == np.dtype(dtype)
            assert a.tobytes() == b.tobytes() == c.tobytes()
    assert spec.recovery_uv(4, 6, None, dtype)[0].tobytes() == spec.recovery_uv(4, 6, 0, dtype)[0].tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_builtins_give_nan_on_a_zero_weight(kind, dtype):
    """The "before": every built-in divides 0 by 0 on the weight dualsn maps to 0."""
    shape, _, x_shape = SHAPES[kind]
    zeros = np.zeros(shape)
    x = rng_array(x_shape, 1, dtype)

    param = torch.nn.utils.parametrizations.spectral_norm(torch_layer(kind, dtype, zeros))
    assert torch.isnan(param.weight).all()
    assert torch.isnan(param(torch.from_numpy(x))).all()

    legacy = torch.nn.utils.spectral_norm(torch_layer(kind, dtype, zeros))
    assert torch.isnan(legacy(torch.from_numpy(x))).all()
    assert torch.isnan(legacy.weight).all()

    with paddle_dtype(dtype):
        builtin = paddle.nn.utils.spectral_norm(paddle_layer(kind, dtype, zeros), dim=1 if kind == "linear" else 0)
        out = builtin(paddle.to_tensor(x))
    assert np.isnan(builtin.weight.numpy()).all()
    assert np.isnan(out.numpy()).all()

    # dualsn on the same weight: zero, finite
    ours_t = dt.spectral_norm(torch_layer(kind, dtype, zeros), seed=SEED)
    ours_p = dp.spectral_norm(paddle_layer(kind, dtype, zeros), seed=SEED)
    assert torch.count_nonzero(ours_t.weight) == 0 and torch.isfinite(ours_t(torch.from_numpy(x))).all()
    ours_p(paddle.to_tensor(x))
    assert not np.any(ours_p.weight.numpy())


# ---------------------------------------------------------------------------------------------
# 2. Recovery: zero for a while, then a real weight


ZERO_FORWARDS, LIVE_FORWARDS = 3, 50


def recovery_sequence(kind: str, compat: str, dtype: str):
    """(the live weight, ReferenceSN after registering at zero, 3 training forwards at zero and
    50 on the live weight)."""
    shape = SHAPES[kind][0]
    live = spectrum_weight(kind, 11).astype(dtype)
    ref = reference(np.zeros(shape, dtype), compat, dtype)
    for _ in range(ZERO_FORWARDS):
        ref.forward(np.zeros(shape, dtype), True)
    for _ in range(LIVE_FORWARDS):
        ref.forward(live, True)
    return live, ref


def check_recovered(u, v, sigma, normalized, live, ref, dtype) -> None:
    tol = TOL[dtype]
    exact = top_singular_value(w_matrix(live))
    np.testing.assert_allclose(ref.sigma(live), exact, rtol=1e-5)  # the reference recovered
    np.testing.assert_allclose(sigma, exact, rtol=1e-5)
    np.testing.assert_allclose(u, ref.u, rtol=tol, atol=tol)
    np.testing.assert_allclose(v, ref.v, rtol=tol, atol=tol)
    np.testing.assert_allclose(top_singular_value(w_matrix(normalized)), 1.0, rtol=1e-5)


@pytest.mark.parametrize("path", TORCH_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compat", PRESETS)
@pytest.mark.parametrize("kind", KINDS)
def test_recovery_after_zero_torch(kind, compat, dtype, path):
    shape, _, x_shape = SHAPES[kind]
    live, ref = recovery_sequence(kind, compat, dtype)
    x = torch.from_numpy(rng_array(x_shape, 1, dtype))
    with on_path(path):
        layer = dt.spectral_norm(torch_layer(kind, dtype, np.zeros(shape)), compat=compat, seed=SEED)
        for _ in range(ZERO_FORWARDS):
            layer(x)
        torch_set(layer, live)
        for _ in range(LIVE_FORWARDS):
            out = layer(x)
        assert torch.isfinite(out).all()
        check_recovered(*torch_uv(layer), dt.sigma(layer), torch_weight(layer), live, ref, dtype)


@pytest.mark.parametrize("path", PADDLE_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compat", PRESETS)
@pytest.mark.parametrize("kind", KINDS)
def test_recovery_after_zero_paddle(kind, compat, dtype, path):
    shape, _, x_shape = SHAPES[kind]
    live, ref = recovery_sequence(kind, compat, dtype)
    x = paddle.to_tensor(rng_array(x_shape, 1, dtype))
    with on_path(path):
        layer = dp.spectral_norm(paddle_layer(kind, dtype, np.zeros(shape)), compat=compat, seed=SEED)
        for _ in range(ZERO_FORWARDS):
            layer(x)
        paddle_set(layer, kind, live)
        for _ in range(LIVE_FORWARDS):
            out = layer(x)
        assert np.isfinite(out.numpy()).all()
        check_recovered(*paddle_uv(layer), dp.sigma(layer), paddle_weight(layer, kind), live, ref, dtype)


# ---------------------------------------------------------------------------------------------
# 3. A whole model trains from zero


STEPS = 30


def regression_data(dtype: str):
    """(x, a linear target of slope 0.8, within reach of a 1-Lipschitz model, the first
    layer's bias). The bias is non-zero: with zero weights *and* biases every gradient of a
    tanh MLP is zero, spectral norm or not (Paddle initializes biases to zero)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 4))
    a = rng.standard_normal((4, 1))
    bias = rng.uniform(-0.5, 0.5, 16)
    return x.astype(dtype), (x @ (0.8 * a / np.linalg.norm(a))).astype(dtype), bias.astype(dtype)


def check_training(losses, normalized_weights) -> None:
    """Finite losses that fall. Step 1 sees W_sn = 0 (the output is the bias); its Adam step
    makes W non-zero, and W_sn jumps from 0 to spectral norm 1: loss 2 is higher. From there
    the loss decreases, to a quarter of the start."""
    assert np.isfinite(losses).all(), losses
    assert np.all(np.diff(losses[1:16]) < 0), losses
    assert losses[-1] < 0.25 * losses[0] and min(losses) < 0.2 * losses[0], losses
    for w in normalized_weights:  # non-zero, finite, spectral norm 1
        assert np.isfinite(w).all() and np.count_nonzero(w) == w.size
        np.testing.assert_allclose(top_singular_value(w), 1.0, rtol=0.05)


def train_torch_mlp(compat: str, dtype: str):
    """(losses, normalized weights) of 30 Adam steps of a 2-layer SN MLP whose weights start
    at zero."""
    x, y, bias = (torch.from_numpy(a) for a in regression_data(dtype))
    layers = [nn.Linear(4, 16), nn.Linear(16, 1)]
    model = nn.Sequential(layers[0], nn.Tanh(), layers[1]).to(getattr(torch, dtype))
    for i, layer in enumerate(layers):
        with torch.no_grad():
            layer.weight.zero_()
            layer.bias.copy_(bias if i == 0 else torch.zeros(1))
        dt.spectral_norm(layer, compat=compat, seed=SEED + i)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert all(torch.count_nonzero(torch_original(layer)) > 0 for layer in layers)
    return losses, [torch_weight(layer) for layer in layers]


def train_paddle_mlp(compat: str, dtype: str):
    """:func:`train_torch_mlp` in Paddle (weights [in, out]: returned transposed)."""
    x, y, bias = regression_data(dtype)
    x, y = paddle.to_tensor(x), paddle.to_tensor(y)
    with paddle_dtype(dtype):
        layers = [paddle.nn.Linear(4, 16), paddle.nn.Linear(16, 1)]
    model = paddle.nn.Sequential(layers[0], paddle.nn.Tanh(), layers[1])
    for i, layer in enumerate(layers):
        layer.weight.set_value(np.zeros(layer.weight.shape, dtype))
        layer.bias.set_value(bias if i == 0 else np.zeros(1, dtype))
        dp.spectral_norm(layer, compat=compat, seed=SEED + i)
    opt = paddle.optimizer.Adam(learning_rate=1e-2, parameters=model.parameters())
    losses = []
    for _ in range(STEPS):
        loss = (model(x) - y).square().mean()
        loss.backward()
        assert all(np.isfinite(p.grad.numpy()).all() for p in model.parameters())
        opt.step()
        opt.clear_grad()
        losses.append(float(loss))
    assert all(np.count_nonzero(layer.weight_orig.numpy()) > 0 for layer in layers)
    model.eval()  # the normalized weights of the final W, without iterating
    with paddle.no_grad():
        model(x)
    return losses, [layer.weight.numpy().T for layer in layers]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compat", PRESETS)
def test_mlp_trains_from_zero_torch(compat, dtype):
    check_training(*train_torch_mlp(compat, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compat", PRESETS)
def test_mlp_trains_from_zero_paddle(compat, dtype):
    check_training(*train_paddle_mlp(compat, dtype))


@pytest.mark.parametrize("compat", PRESETS)
def test_mlp_from_zero_trains_alike_in_both_frameworks(compat):
    """float64, the same data, biases, seeds and optimizer: the same losses and weights."""
    t_losses, t_weights = train_torch_mlp(compat, "float64")
    p_losses, p_weights = train_paddle_mlp(compat, "float64")
    np.testing.assert_allclose(p_losses, t_losses, rtol=1e-8)
    for a, b in zip(p_weights, t_weights):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# 4. No overflow: 1e30 in float32, 1e300 in float64


HUGE = {"float32": 1e30, "float64": 1e300}
TINY = {"float32": 1e-30, "float64": 1e-300}


def scaled(base: np.ndarray, scale: float, dtype: str):
    """(W = scale * base in ``dtype``, its exact largest singular value: SVD in float64 of
    W / scale, scaled back)."""
    weight = (base * scale).astype(dtype)
    unscaled = weight.astype(np.float64) / scale
    exact = (np.linalg.svd(w_matrix(unscaled), compute_uv=False)[0] if unscaled.ndim > 1 else np.linalg.norm(unscaled))
    return weight, exact * scale


def check_huge(sigma, normalized, exact) -> None:
    assert np.isfinite(sigma)
    np.testing.assert_allclose(sigma / exact, 1.0, rtol=1e-5)
    assert np.isfinite(normalized).all()
    np.testing.assert_allclose(top_singular_value(w_matrix(normalized)), 1.0, rtol=1e-5)


@pytest.mark.parametrize("path", TORCH_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_huge_weight_keeps_exact_sigma_torch(kind, dtype, path):
    weight, exact = scaled(spectrum_weight(kind, 3), HUGE[dtype], dtype)
    x = torch.from_numpy(rng_array(SHAPES[kind][2], 1, dtype))
    with on_path(path):
        layer = dt.spectral_norm(torch_layer(kind, dtype, weight), compat="torch", seed=SEED)
        for _ in range(3):
            layer(x)
        check_huge(dt.sigma(layer), torch_weight(layer), exact)


@pytest.mark.parametrize("path", PADDLE_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_huge_weight_keeps_exact_sigma_paddle(kind, dtype, path):
    weight, exact = scaled(spectrum_weight(kind, 3), HUGE[dtype], dtype)
    x = paddle.to_tensor(rng_array(SHAPES[kind][2], 1, dtype))
    with on_path(path):
        layer = dp.spectral_norm(paddle_layer(kind, dtype, weight), compat="torch", seed=SEED)
        for _ in range(3):
            layer(x)
        check_huge(dp.sigma(layer), paddle_weight(layer, kind), exact)


@pytest.mark.parametrize("path", TORCH_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_1d_weight_is_normalized_exactly_torch(dtype, path):
    bias, norm = scaled(rng_array(4, 9), HUGE[dtype], dtype)
    layer = torch_layer("linear", dtype, np.ones((4, 6)))
    with torch.no_grad():
        layer.bias.copy_(torch.from_numpy(bias))
    with on_path(path):
        dt.spectral_norm(layer, name="bias", compat="torch")
        layer(torch.zeros(1, 6, dtype=layer.weight.dtype))
        np.testing.assert_allclose(dt.sigma(layer, "bias") / norm, 1.0, rtol=1e-6)
        normalized = layer.bias.detach().numpy()
    assert np.isfinite(normalized).all()
    np.testing.assert_allclose(np.linalg.norm(normalized.astype(np.float64)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(normalized, bias.astype(np.float64) / norm, rtol=TOL[dtype])


@pytest.mark.parametrize("path", PADDLE_PATHS)
@pytest.mark.parametrize(
    "dtype", ["float32", "float64"]
)
def test_huge_1d_weight_is_normalized_exactly_paddle(dtype, path):
    bias, norm = scaled(rng_array(4, 9), HUGE[dtype], dtype)
    layer = paddle_layer("linear", dtype, np.ones((4, 6)))
    layer.bias.set_value(bias)
    with on_path(path):
        dp.spectral_norm(layer, name="bias", compat="torch")
        layer(paddle.zeros([1, 6], dtype=dtype))
        normalized = layer.bias.numpy()
        assert np.isfinite(normalized).all()
        np.testing.assert_allclose(np.linalg.norm(normalized.astype(np.float64)), 1.0, rtol=1e-6)
        np.testing.assert_allclose(normalized, bias.astype(np.float64) / norm, rtol=TOL[dtype])
        np.testing.assert_allclose(dp.sigma(layer, "bias") / norm, 1.0, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# 5. Underflow: 1e-30 in float32, 1e-300 in float64


def tiny_sequence(kind: str, compat: str, dtype: str, eps: float, forwards: int = 5, scale=None):
    """(W = TINY * random, its exact sigma, ReferenceSN after registration and ``forwards``
    training forwards, the normalized weight of the last)."""
    weight, exact = scaled(spectrum_weight(kind, 3), TINY[dtype] if scale is None else scale, dtype)
    ref = reference(weight, compat, dtype, eps=eps)
    for _ in range(forwards):
        expected = ref.forward(weight, True)
    return weight, exact, ref, expected


def check_tiny(u, v, normalized, weight, exact, ref, expected, eps, dtype) -> None:
    """The backend matches ReferenceSN, whichever case that is: W / eps where sigma underflowed
    to zero (eps larger than the weight's norms), else a spectral norm of 1."""
    tol = TOL[dtype]
    assert np.isfinite(normalized).all() and np.isfinite(u).all() and np.isfinite(v).all()
    if spec.make_spec(eps=eps).sigma_floored(ref.sigma(weight)):
        np.testing.assert_array_equal(expected, weight / np.asarray(eps, dtype=dtype))
    else:
        np.testing.assert_allclose(ref.sigma(weight), exact, rtol=1e-5)
        np.testing.assert_allclose(top_singular_value(w_matrix(expected)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(normalized, expected, rtol=tol, atol=0)
    # u, v are not unit vectors where eps clamps their norms: tolerances relative to their size
    np.testing.assert_allclose(u, ref.u, rtol=tol, atol=tol * np.abs(ref.u).max())
    np.testing.assert_allclose(v, ref.v, rtol=tol, atol=tol * np.abs(ref.v).max())


# default eps (1e-12): larger than W's norms, so sigma underflows to 0 and W / eps results;
# an eps below them: the power iteration normalizes, and W / sigma has spectral norm 1.
SMALL_EPS = {"float32": 1e-40, "float64": 1e-305}


@pytest.mark.parametrize("path", TORCH_PATHS)
@pytest.mark.parametrize("eps_kind", ["default", "small"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compat", PRESETS)
@pytest.mark.parametrize("kind", KINDS)
def test_tiny_weight_follows_the_reference_torch(kind, compat, dtype, eps_kind, path):
    eps = EPS if eps_kind == "default" else SMALL_EPS[dtype]
    weight, exact, ref, expected = tiny_sequence(kind, compat, dtype, eps)
    x = torch.from_numpy(rng_array(SHAPES[kind][2], 1, dtype))
    with on_path(path):
        layer = dt.spectral_norm(torch_layer(kind, dtype, weight), compat=compat, seed=SEED, eps=eps)
        for _ in range(5):
            out = layer(x)
        assert torch.isfinite(out).all()
        check_tiny(*torch_uv(layer), torch_weight(layer), weight, exact, ref, expected, eps, dtype)


PADDLE_TINY_CASES = [
    ("default", "fast"),
    ("default", "plain"),
    ("small", "fast"),
    ("small", "plain"),
]


@pytest.mark.parametrize("eps_kind, path", PADDLE_TINY_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compat", PRESETS)
@pytest.mark.parametrize("kind", KINDS)
def test_tiny_weight_follows_the_reference_paddle(kind, compat, dtype, eps_kind, path):
    eps = EPS if eps_kind == "default" else SMALL_EPS[dtype]
    weight, exact, ref, expected = tiny_sequence(kind, compat, dtype, eps)
    x = paddle.to_tensor(rng_array(SHAPES[kind][2], 1, dtype))
    with on_path(path):
        layer = dp.spectral_norm(paddle_layer(kind, dtype, weight), compat=compat, seed=SEED, eps=eps)
        for _ in range(5):
            out = layer(x)
        assert np.isfinite(out.numpy()).all()
        check_tiny(*paddle_uv(layer), paddle_weight(layer, kind), weight, exact, ref, expected, eps, dtype)


# A subnormal W (1e-40 in float32, 1e-310 in float64): every step's norm underflows, u, v are
# the recovery vectors, and the forward divides by sigma = u^H W v of those (1.35e-41 in
# float32: ||W_sn|| = 29.6), not by the r^2 / max(r, eps) read off a norm that no longer
# belongs to them. Paddle divides where 1 / sigma would overflow the dtype.
SUBNORMAL = {"float32": 1e-40, "float64": 1e-310}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("framework", ["torch", "paddle"])
def test_subnormal_weight_training_forward_follows_the_reference(framework, dtype):
    weight, _, ref, expected = tiny_sequence("linear", "torch", dtype, EPS, scale=SUBNORMAL[dtype])
    x = rng_array(SHAPES["linear"][2], 1, dtype)
    if framework == "torch":
        layer = dt.spectral_norm(torch_layer("linear", dtype, weight), seed=SEED)
        for _ in range(4):
            layer(torch.from_numpy(x))
        with torch.no_grad():
            normalized = layer.weight.numpy()  # in training mode: the 5th training forward
        u, v = torch_uv(layer)
    else:
        layer = dp.spectral_norm(paddle_layer("linear", dtype, weight), seed=SEED)
        for _ in range(5):
            layer(paddle.to_tensor(x))
        u, v = paddle_uv(layer)
        normalized = layer.weight.numpy().T  # the last training forward's
    np.testing.assert_array_equal(u, ref.u)  # the recovery vectors: these agree
    np.testing.assert_array_equal(v, ref.v)
    np.testing.assert_allclose(normalized, expected, rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "framework", ["torch", "paddle"]
)
def test_subnormal_weight_eval_forward_follows_the_reference(framework, dtype):
    weight, _, ref, _ = tiny_sequence("linear", "torch", dtype, EPS, scale=SUBNORMAL[dtype])
    expected = ref.forward(weight, False)
    x = rng_array(SHAPES["linear"][2], 1, dtype)
    if framework == "torch":
        layer = dt.spectral_norm(torch_layer("linear", dtype, weight), seed=SEED)
        for _ in range(5):
            layer(torch.from_numpy(x))
        normalized = torch_weight(layer)
    else:
        layer = dp.spectral_norm(paddle_layer("linear", dtype, weight), seed=SEED)
        for _ in range(5):
            layer(paddle.to_tensor(x))
        normalized = paddle_weight(layer, "linear")
    assert np.isfinite(normalized).all()
    np.testing.assert_allclose(normalized, expected, rtol=TOL[dtype])


# ---------------------------------------------------------------------------------------------
# 6. NaN / Inf in W


BAD = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
TORCH_NAMES = {"linear": "Linear", "conv2d": "Conv2d"}
PADDLE_NAMES = {"linear": "Linear", "conv2d": "Conv2D"}


def with_bad_entry(weight: np.ndarray, bad: str) -> np.ndarray:
    out = np.array(weight, copy=True)
    out.reshape(-1)[5] = BAD[bad]
    return out


@pytest.mark.parametrize("path", TORCH_PATHS)
@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("compat", PRESETS)
@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_weight_raises_in_training_torch(kind, compat, bad, path):
    live = spectrum_weight(kind, 3)
    x = torch.from_numpy(rng_array(SHAPES[kind][2], 1, "float32"))
    with on_path(path):
        layer = dt.spectral_norm(torch_layer(kind, "float32", live), compat=compat, seed=SEED)
        layer(x)
        torch_set(layer, with_bad_entry(live, bad))
        u, v = torch_uv(layer)
        with pytest.raises(FloatingPointError, match=rf"^spectral norm of 'weight' in {TORCH_NAMES[kind]}: .*NaN or Inf"):
            layer(x)
        after = torch_uv(layer)
        assert after[0].tobytes() == u.tobytes() and after[1].tobytes() == v.tobytes()
        layer.eval()
        assert not torch.isfinite(layer(x)).all()  # eval passes the NaN through, as the built-ins do
        assert all(a.tobytes() == b.tobytes() for a, b in zip(torch_uv(layer), (u, v)))
        # fixed: training goes on from the same u, v
        layer.train()
        torch_set(layer, live)
        layer(x)
        assert np.isfinite(torch_uv(layer)[0]).all() and torch.isfinite(layer(x)).all()


@pytest.mark.parametrize("path", PADDLE_PATHS)
@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("compat", PRESETS)
@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_weight_raises_in_training_paddle(kind, compat, bad, path):
    live = spectrum_weight(kind, 3)
    x = paddle.to_tensor(rng_array(SHAPES[kind][2], 1, "float32"))
    with on_path(path):
        layer = dp.spectral_norm(paddle_layer(kind, "float32", live), compat=compat, seed=SEED)
        layer(x)
        paddle_set(layer, kind, with_bad_entry(live, bad))
        u, v = paddle_uv(layer)
        with pytest.raises(FloatingPointError, match=rf"^spectral norm of 'weight' in {PADDLE_NAMES[kind]}: .*NaN or Inf"):
            layer(x)
        after = paddle_uv(layer)
        assert after[0].tobytes() == u.tobytes() and after[1].tobytes() == v.tobytes()
        layer.eval()
        assert not np.isfinite(layer(x).numpy()).all()
        assert all(a.tobytes() == b.tobytes() for a, b in zip(paddle_uv(layer), (u, v)))
        layer.train()
        paddle_set(layer, kind, live)
        layer(x)
        assert np.isfinite(paddle_uv(layer)[0]).all() and np.isfinite(layer(x).numpy()).all()


@pytest.mark.parametrize("path", TORCH_PATHS)
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_1d_weight_raises_in_training_torch(bad, path):
    layer = torch_layer("linear", "float32", np.ones((4, 6)))
    x = torch.zeros(1, 6)
    with on_path(path):
        dt.spectral_norm(layer, name="bias", compat="torch")
        with torch.no_grad():
            layer.parametrizations.bias.original[2] = BAD[bad]
        with pytest.raises(FloatingPointError, match=r"^spectral norm of 'bias' in Linear: "):
            layer(x)
        layer.eval()
        layer(x)


@pytest.mark.parametrize("path", PADDLE_PATHS)
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_1d_weight_raises_in_training_paddle(bad, path):
    layer = paddle_layer("linear", "float32", np.ones((4, 6)))
    x = paddle.zeros([1, 6])
    with on_path(path):
        dp.spectral_norm(layer, name="bias", compat="torch")
        bias = layer.bias_orig.numpy()
        bias[2] = BAD[bad]
        layer.bias_orig.set_value(bias)
        with pytest.raises(FloatingPointError, match=r"^spectral norm of 'bias' in Linear: "):
            layer(x)
        layer.eval()
        layer(x)


@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_weight_at_registration_torch(kind):
    """compat "torch" iterates at registration: it raises and the module stays as it was. The
    presets without warm-up do not iterate there: their first training forward raises."""
    weight = with_bad_entry(spectrum_weight(kind, 3), "nan")
    layer = torch_layer(kind, "float32", weight)
    param, state = layer.weight, {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(FloatingPointError, match=rf"^spectral norm of 'weight' in {TORCH_NAMES[kind]}: "):
        dt.spectral_norm(layer, seed=SEED)
    assert not parametrize.is_parametrized(layer) and not hasattr(layer, "parametrizations")
    assert layer._parameters["weight"] is param and not layer._forward_pre_hooks
    assert set(layer.state_dict()) == set(state)
    for key, value in state.items():  # bit for bit, the NaN included
        assert layer.state_dict()[key].numpy().tobytes() == value.numpy().tobytes()
    for compat in ("torch_legacy", "paddle"):
        other = dt.spectral_norm(torch_layer(kind, "float32", weight), compat=compat, seed=SEED)
        with pytest.raises(FloatingPointError, match="NaN or Inf"):
            other(torch.from_numpy(rng_array(SHAPES[kind][2], 1, "float32")))


@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_weight_at_registration_paddle(kind):
    weight = with_bad_entry(spectrum_weight(kind, 3), "nan")
    layer = paddle_layer(kind, "float32", weight)
    param = layer.weight
    with pytest.raises(FloatingPointError, match=rf"^spectral norm of 'weight' in {PADDLE_NAMES[kind]}: "):
        dp.spectral_norm(layer, seed=SEED)
    assert list(layer._parameters) == ["weight", "bias"] and layer._parameters["weight"] is param
    assert not layer._buffers and not layer._forward_pre_hooks
    assert not dp.is_spectral_norm(layer)
    assert set(layer.state_dict()) == {"weight", "bias"}
    np.testing.assert_array_equal(layer.weight.numpy(), to_paddle_layout(kind, weight).astype("float32"))
    for compat in ("torch_legacy", "paddle"):
        other = dp.spectral_norm(paddle_layer(kind, "float32", weight), compat=compat, seed=SEED)
        with pytest.raises(FloatingPointError, match="NaN or Inf"):
            other(paddle.to_tensor(rng_array(SHAPES[kind][2], 1, "float32")))


def test_reference_raises_too():
    """The oracle's rule (spec.check_finite_sigma in ReferenceSN.forward), state untouched."""
    live = spectrum_weight("linear", 3)
    ref = reference(live, "torch_legacy", "float64")
    u, v = ref.u.copy(), ref.v.copy()
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        ref.forward(with_bad_entry(live, "nan"), True)
    assert ref.u.tobytes() == u.tobytes() and ref.v.tobytes() == v.tobytes()
    assert np.isnan(ref.forward(with_bad_entry(live, "nan"), False)).any()
