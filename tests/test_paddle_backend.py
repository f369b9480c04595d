"""dualsn.paddle against Paddle's built-in hook, the numpy reference in dualsn.spec, and SVD."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest

paddle = pytest.importorskip("paddle")

import dualsn  # noqa: E402
import dualsn.paddle as dsn  # noqa: E402
from dualsn import spec  # noqa: E402
from dualsn import reference as numpy_ref  # noqa: E402
from _numeric import random_array  # noqa: E402



def BUILTIN_SN(layer, *args, **kwargs):
    """paddle.nn.utils.spectral_norm, with its u, v in the weight's dtype (it creates them in
    Paddle's default dtype, so a float64 layer would otherwise get float32 u, v)."""
    with default_dtype(str(layer.weight.dtype).replace("paddle.", "")):
        return paddle.nn.utils.spectral_norm(layer, *args, **kwargs)

F64 = "float64"
F32 = "float32"


# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(autouse=True)
def _clean_seed_stream():
    """No test leaks a manual_seed stream into another."""
    dualsn.manual_seed(None)
    yield
    dualsn.manual_seed(None)


@contextlib.contextmanager
def default_dtype(dtype):
    old = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    try:
        yield
    finally:
        paddle.set_default_dtype(old)


def npy(t) -> np.ndarray:
    return t.numpy().copy()


def plain_normalized_weight(*args):
    """dsn.normalized_weight on the plain path (autograd derives the whole gradient)."""
    with dsn.plain_path():
        return dsn.normalized_weight(*args)


def assert_builtin_close(actual, desired) -> None:
    """dualsn vs the Paddle built-in running the same algorithm from the same state.

    Not bit for bit: dualsn takes sigma from the power iteration's last norm instead of a
    separate u^T (W v), normalizes and rescales by multiplying with a reciprocal instead of
    dividing, reads W^T through matmul's transpose flag instead of a transposed copy, and
    computes dL/dW by the closed-form rank-1 update instead of autograd, so the last bits
    differ. The tolerance is a few ulps of the array's scale: rtol 1e-13 in float64, 1e-6 in
    float32, relative to the largest magnitude (entries near zero are not over-weighted).
    """
    actual, desired = np.asarray(actual), np.asarray(desired)
    rtol = 1e-6 if desired.dtype in (np.float32, np.complex64) else 1e-13
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * np.abs(desired).max())


def tol(dtype) -> dict:
    """Tolerances for comparing paddle against numpy in the same precision."""
    if str(dtype) in ("float32", "complex64", "paddle.float32", "paddle.complex64"):
        return dict(rtol=2e-4, atol=2e-5)
    return dict(rtol=1e-9, atol=1e-11)


class VectorLayer(paddle.nn.Layer):
    """A layer whose only parameter is 1-D (y = x * w), real or complex."""

    def __init__(self, w: np.ndarray):
        super().__init__()
        self.weight = paddle.create_parameter(
            list(w.shape), str(w.dtype), default_initializer=paddle.nn.initializer.Constant(0.0)
        )
        self.weight.set_value(w)

    def forward(self, x):
        return x * self.weight


class MatLayer(paddle.nn.Layer):
    """y = x @ W^T with a weight of any dtype (paddle.nn.Linear cannot be complex)."""

    def __init__(self, w: np.ndarray):
        super().__init__()
        self.weight = paddle.create_parameter(
            list(w.shape), str(w.dtype), default_initializer=paddle.nn.initializer.Constant(0.0)
        )
        self.weight.set_value(w)

    def forward(self, x):
        return paddle.matmul(x, self.weight, transpose_y=True)


# kind -> (layer factory, input shape, default dim)
KINDS = {
    "linear": (lambda: paddle.nn.Linear(6, 4), (3, 6), 1),
    "conv2d": (lambda: paddle.nn.Conv2D(3, 4, 3), (2, 3, 5, 5), 0),
    "conv2d_transpose": (lambda: paddle.nn.Conv2DTranspose(3, 4, 3), (2, 3, 4, 4), 1),
    "vector": (lambda: paddle.nn.LayerNorm(5), (2, 5), 0),
}


def make_layer(kind: str, dtype: str, seed: int = 0):
    factory, in_shape, _ = KINDS[kind]
    paddle.seed(seed)
    with default_dtype(dtype):
        layer = factory()
    if kind == "vector":  # LayerNorm starts at ones: make the weight generic
        rng = np.random.default_rng(seed)
        layer.weight.set_value(rng.standard_normal(layer.weight.shape).astype(dtype))
    return layer, in_shape


def inputs(shape, dtype, count, seed=1):
    rng = np.random.default_rng(seed)
    return [paddle.to_tensor(rng.standard_normal(shape).astype(dtype)) for _ in range(count)]


def snapshot(layer) -> dict:
    """Everything a failed call must leave alone: parameters, buffers (objects and values),
    state_dict, hooks."""
    return {
        "params": [(k, id(p), npy(p)) for k, p in layer._parameters.items()],
        "buffers": [(k, id(b), None if b is None else npy(b)) for k, b in layer._buffers.items()],
        "non_persistable": set(layer._non_persistable_buffer_names_set),
        "state": {k: npy(v) for k, v in layer.state_dict().items()},
        "hooks": list(layer._forward_pre_hooks.items()),
    }


def assert_same_snapshot(a: dict, b: dict) -> None:
    assert [(k, i) for k, i, _ in a["params"]] == [(k, i) for k, i, _ in b["params"]]
    for (_, _, x), (_, _, y) in zip(a["params"], b["params"]):
        np.testing.assert_array_equal(x, y)
    assert [(k, i) for k, i, _ in a["buffers"]] == [(k, i) for k, i, _ in b["buffers"]]
    assert a["non_persistable"] == b["non_persistable"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        np.testing.assert_array_equal(a["state"][k], b["state"][k])
    assert a["hooks"] == b["hooks"]


# ---------------------------------------------------------------------------------------------
# compat="paddle" is the built-in (to the last bits, see assert_builtin_close)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("kind", list(KINDS))
def test_paddle_preset_equals_builtin(kind, dtype):
    builtin, in_shape = make_layer(kind, dtype)
    ours = copy.deepcopy(builtin)
    BUILTIN_SN(builtin)
    dsn.spectral_norm(ours, compat="paddle", seed=11)
    w = builtin.weight_orig.shape
    h, wd = spec.matrix_shape(w, KINDS[kind][2])
    u0, v0 = spec.init_uv(h, wd, 11, dtype)
    # The paddle preset runs no iteration at registration, and neither does the built-in.
    np.testing.assert_array_equal(npy(ours.weight_u), u0)
    np.testing.assert_array_equal(npy(ours.weight_v), v0)
    builtin.weight_u.set_value(u0)
    builtin.weight_v.set_value(v0)
    assert list(builtin.state_dict()) == list(ours.state_dict())

    xs = inputs(in_shape, dtype, 4)
    for x in xs[:3]:
        out_b, out_o = builtin(x), ours(x)
        assert_builtin_close(npy(out_o), npy(out_b))
        assert_builtin_close(npy(ours.weight), npy(builtin.weight))
        assert_builtin_close(npy(ours.weight_u), npy(builtin.weight_u))
        assert_builtin_close(npy(ours.weight_v), npy(builtin.weight_v))
        (out_b * out_b).sum().backward()
        (out_o * out_o).sum().backward()
        assert_builtin_close(npy(ours.weight_orig.grad), npy(builtin.weight_orig.grad))
    builtin.eval()
    ours.eval()
    u_before, builtin_u_before = npy(ours.weight_u), npy(builtin.weight_u)
    assert_builtin_close(npy(ours(xs[3])), npy(builtin(xs[3])))
    np.testing.assert_array_equal(npy(ours.weight_u), u_before)  # eval: no iteration
    np.testing.assert_array_equal(npy(builtin.weight_u), builtin_u_before)


def test_paddle_preset_explicit_dim_equals_builtin():
    builtin, in_shape = make_layer("conv2d", F64)
    ours = copy.deepcopy(builtin)
    BUILTIN_SN(builtin, dim=2, n_power_iterations=3, eps=1e-6)
    dsn.spectral_norm(ours, dim=-2, n_power_iterations=3, eps=1e-6, compat="paddle", seed=4)
    assert dsn.get_spectral_norm(ours).dim == 2
    builtin.weight_u.set_value(npy(ours.weight_u))
    builtin.weight_v.set_value(npy(ours.weight_v))
    for x in inputs(in_shape, F64, 2):
        assert_builtin_close(npy(ours(x)), npy(builtin(x)))
        assert_builtin_close(npy(ours.weight_u), npy(builtin.weight_u))


# ---------------------------------------------------------------------------------------------
# Every preset equals the numpy reference


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("compat", list(spec.PRESETS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_presets_equal_reference(kind, compat, dtype, training):
    layer, in_shape = make_layer(kind, dtype)
    if not training:
        layer.eval()
    w_np = npy(layer.weight)
    dim = KINDS[kind][2]
    sp = spec.make_spec(compat, n_power_iterations=2)
    dsn.spectral_norm(layer, n_power_iterations=2, compat=compat, seed=5)
    exact = sp.is_exact_vector(w_np.ndim)
    if exact:
        ref = numpy_ref.ReferenceSN(w_np, dim, sp, training=training)
        assert not hasattr(layer, "weight_u") and not hasattr(layer, "weight_v")
    else:
        h, w = spec.matrix_shape(w_np.shape, dim)
        ref = numpy_ref.ReferenceSN(w_np, dim, sp, *spec.init_uv(h, w, 5, dtype), training=training)

    def check_state():
        if not exact:
            np.testing.assert_allclose(npy(layer.weight_u), ref.u, **tol(dtype))
            np.testing.assert_allclose(npy(layer.weight_v), ref.v, **tol(dtype))
        assert dsn.sigma(layer) == pytest.approx(float(ref.sigma(w_np)), rel=tol(dtype)["rtol"])
        np.testing.assert_allclose(npy(layer.weight), w_np / ref.sigma(w_np), **tol(dtype))

    # The normalized weight is in place from registration on (the built-in leaves W there).
    check_state()
    layer.train()
    rng = np.random.default_rng(2)
    for x in inputs(in_shape, dtype, 3):
        layer(x)
        ref.forward(w_np, training=True)
        check_state()
        g = rng.standard_normal(w_np.shape).astype(dtype)
        layer.weight_orig.clear_gradient()
        (layer.weight * paddle.to_tensor(g)).sum().backward()
        np.testing.assert_allclose(npy(layer.weight_orig.grad), ref.weight_grad(g, w_np), **tol(dtype))
    layer.eval()
    state = {k: npy(v) for k, v in layer.state_dict().items()}
    layer(inputs(in_shape, dtype, 1)[0])
    ref.forward(w_np, training=False)
    for key, value in state.items():  # eval runs no iteration: the state keeps its bits
        np.testing.assert_array_equal(npy(layer.state_dict()[key]), value)
    check_state()


def test_registration_iterations_follow_the_mode():
    """torch preset: 15 + n iterations at registration in training mode, 15 in eval."""
    w = np.random.default_rng(0).standard_normal((5, 7))
    for training in (True, False):
        layer = MatLayer(w)
        layer.train() if training else layer.eval()
        dsn.spectral_norm(layer, n_power_iterations=3, seed=9)
        u, v = spec.init_uv(5, 7, 9, F64)
        n = 15 + 3 if training else 15
        u, v = numpy_ref.power_iteration(w, u, v, n, "uv", 1e-12)
        np.testing.assert_allclose(npy(layer.weight_u), u, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(npy(layer.weight_v), v, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("compat", list(spec.PRESETS))
def test_sigma_converges_to_largest_singular_value(compat):
    layer, in_shape = make_layer("conv2d", F64)
    # A W-matrix with known singular values: a clear gap, so 200 iterations converge.
    rng = np.random.default_rng(0)
    left = np.linalg.qr(rng.standard_normal((4, 4)))[0]
    right = np.linalg.qr(rng.standard_normal((27, 4)))[0]
    w_mat = left @ np.diag([3.0, 1.5, 1.0, 0.5]) @ right.T
    layer.weight.set_value(spec.from_matrix(w_mat, tuple(layer.weight.shape), 0))
    top = np.linalg.svd(w_mat, compute_uv=False)[0]
    assert top == pytest.approx(3.0, rel=1e-12)
    dsn.spectral_norm(layer, n_power_iterations=10, compat=compat, seed=1)
    x = inputs(in_shape, F64, 1)[0]
    for _ in range(20):
        layer(x)
    assert dsn.sigma(layer) == pytest.approx(top, rel=1e-9)
    normalized = spec.to_matrix(npy(layer.weight), 0)
    assert np.linalg.svd(normalized, compute_uv=False)[0] == pytest.approx(1.0, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Complex weights


@pytest.mark.parametrize("dtype", ["complex128", "complex64"])
@pytest.mark.parametrize("compat", list(spec.PRESETS))
@pytest.mark.parametrize("shape", [(4, 6), (5,)])
def test_complex_weights_equal_reference(shape, compat, dtype):
    rng = np.random.default_rng(3)
    w_np = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    layer = (MatLayer if len(shape) == 2 else VectorLayer)(w_np)
    sp = spec.make_spec(compat)
    dsn.spectral_norm(layer, compat=compat, seed=8)
    if sp.is_exact_vector(len(shape)):
        ref = numpy_ref.ReferenceSN(w_np, 0, sp)
    else:
        h, w = spec.matrix_shape(shape, 0)
        u0, v0 = spec.init_uv(h, w, 8, dtype)
        ref = numpy_ref.ReferenceSN(w_np, 0, sp, u0, v0)
        if compat == "paddle":  # no registration iteration: the seeded draw itself
            np.testing.assert_array_equal(npy(layer.weight_u), u0)
    x = paddle.to_tensor((rng.standard_normal((2, shape[-1])) + 0j).astype(dtype))
    for _ in range(3):
        layer(x)
        ref.forward(w_np, training=True)
        if ref.u is not None:
            np.testing.assert_allclose(npy(layer.weight_u), ref.u, **tol(dtype))
            np.testing.assert_allclose(npy(layer.weight_v), ref.v, **tol(dtype))
        np.testing.assert_allclose(npy(layer.weight), w_np / ref.sigma(w_np), **tol(dtype))
        assert dsn.sigma(layer) == pytest.approx(float(np.real(ref.sigma(w_np))), rel=1e-4)
        g = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
        layer.weight_orig.clear_gradient()
        # Re<G, W_sn> has gradient G w.r.t. W_sn (dL/dRe + i dL/dIm).
        paddle.real((layer.weight * paddle.conj(paddle.to_tensor(g))).sum()).backward()
        np.testing.assert_allclose(npy(layer.weight_orig.grad), ref.weight_grad(g, w_np), **tol(dtype))


def test_complex_sigma_converges_to_svd():
    rng = np.random.default_rng(4)
    w_np = rng.standard_normal((6, 5)) + 1j * rng.standard_normal((6, 5))
    layer = MatLayer(w_np)
    dsn.spectral_norm(layer, n_power_iterations=100, seed=2)
    layer(paddle.to_tensor(np.ones((1, 5), dtype=np.complex128)))
    assert dsn.sigma(layer) == pytest.approx(np.linalg.svd(w_np, compute_uv=False)[0], rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Seeds, default dims, layouts


@pytest.mark.parametrize("dtype", [F32, F64])
def test_seed_gives_init_uv_bits(dtype):
    layer, _ = make_layer("conv2d", dtype)
    dsn.spectral_norm(layer, compat="paddle", seed=123)
    u0, v0 = spec.init_uv(4, 27, 123, dtype)
    assert npy(layer.weight_u).dtype == np.dtype(dtype)
    np.testing.assert_array_equal(npy(layer.weight_u), u0)
    np.testing.assert_array_equal(npy(layer.weight_v), v0)


def test_manual_seed_stream():
    dualsn.manual_seed(7)
    expected = [spec.next_seed(), spec.next_seed()]
    dualsn.manual_seed(7)
    first, _ = make_layer("linear", F64)
    with pytest.raises(IndexError):  # a failed call does not use up a seed
        dsn.spectral_norm(first, dim=5, compat="paddle")
    dsn.spectral_norm(first, compat="paddle")
    second, _ = make_layer("conv2d", F64)
    dsn.spectral_norm(second, compat="paddle")
    for layer, s in zip((first, second), expected):
        h, w = spec.matrix_shape(layer.weight_orig.shape, dsn.get_spectral_norm(layer).dim)
        u0, v0 = spec.init_uv(h, w, s, F64)
        np.testing.assert_array_equal(npy(layer.weight_u), u0)
        np.testing.assert_array_equal(npy(layer.weight_v), v0)
    # An explicit seed wins over the stream and does not advance it.
    dualsn.manual_seed(7)
    third, _ = make_layer("linear", F64)
    dsn.spectral_norm(third, compat="paddle", seed=99)
    np.testing.assert_array_equal(npy(third.weight_u), spec.init_uv(4, 6, 99, F64)[0])
    fourth, _ = make_layer("linear", F64)
    dsn.spectral_norm(fourth, compat="paddle")
    np.testing.assert_array_equal(npy(fourth.weight_u), npy(first.weight_u))


@pytest.mark.parametrize("dtype", [F32, F64])
def test_no_seed_draws_from_paddle_rng(dtype):
    layer, _ = make_layer("linear", dtype)
    paddle.seed(2024)
    dsn.spectral_norm(layer, compat="paddle")
    paddle.seed(2024)
    u = paddle.nn.functional.normalize(paddle.randn([4], dtype=dtype), axis=0)
    v = paddle.nn.functional.normalize(paddle.randn([6], dtype=dtype), axis=0)
    np.testing.assert_array_equal(npy(layer.weight_u), npy(u))
    np.testing.assert_array_equal(npy(layer.weight_v), npy(v))


def test_no_seed_complex_draws_real_then_imaginary_parts():
    layer = MatLayer(np.ones((3, 2), dtype=np.complex64))
    paddle.seed(7)
    dsn.spectral_norm(layer, compat="paddle")
    paddle.seed(7)
    parts = [npy(paddle.randn([n], dtype=F32)) for n in (3, 3, 2, 2)]
    u, v = parts[0] + 1j * parts[1], parts[2] + 1j * parts[3]
    np.testing.assert_allclose(npy(layer.weight_u), u / np.linalg.norm(u), rtol=1e-6)
    np.testing.assert_allclose(npy(layer.weight_v), v / np.linalg.norm(v), rtol=1e-6)


def test_default_dims():
    cases = [
        (paddle.nn.Linear(3, 4), 1),
        (paddle.nn.Conv1D(2, 3, 3), 0),
        (paddle.nn.Conv2D(2, 3, 3), 0),
        (paddle.nn.Conv1DTranspose(2, 3, 3), 1),
        (paddle.nn.Conv2DTranspose(2, 3, 3), 1),
        (paddle.nn.Conv3DTranspose(2, 3, 3), 1),
        (paddle.nn.Embedding(5, 3), 0),
    ]
    if hasattr(paddle, "compat") and hasattr(paddle.compat.nn, "Linear"):
        cases.append((paddle.compat.nn.Linear(3, 4), 0))
    for layer, dim in cases:
        dsn.spectral_norm(layer, compat="paddle", seed=0)
        hook = dsn.get_spectral_norm(layer)
        assert hook.dim == dim, type(layer).__name__
        # u has one entry per output feature: 4 for the Linears, 3 for convs
        assert layer.weight_u.shape[0] == layer.weight_orig.shape[dim]


@pytest.mark.parametrize("compat", list(spec.PRESETS))
def test_linear_layouts_share_u_v_with_torch_layout(compat):
    """paddle.nn.Linear ([in, out], dim 1) and a torch-layout weight ([out, in], dim 0) have
    the same W-matrix, so the same seed gives the same u, v, sigma and outputs."""
    rng = np.random.default_rng(6)
    w_torch = rng.standard_normal((4, 6))  # torch layout: [out, in]
    with default_dtype(F64):
        lin = paddle.nn.Linear(6, 4, bias_attr=False)
    lin.weight.set_value(w_torch.T)
    mat = MatLayer(w_torch)  # y = x @ W^T, torch's Linear
    dsn.spectral_norm(lin, compat=compat, seed=3)
    dsn.spectral_norm(mat, compat=compat, seed=3)
    sp = spec.make_spec(compat)
    ref = numpy_ref.ReferenceSN(w_torch, 0, sp, *spec.init_uv(4, 6, 3, F64))
    x = paddle.to_tensor(rng.standard_normal((3, 6)))
    for _ in range(3):
        out_lin, out_mat = lin(x), mat(x)
        ref.forward(w_torch, training=True)
        for layer in (lin, mat):
            np.testing.assert_allclose(npy(layer.weight_u), ref.u, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(npy(layer.weight_v), ref.v, rtol=1e-12, atol=1e-14)
            assert dsn.sigma(layer) == pytest.approx(ref.sigma(w_torch), rel=1e-12)
        expected = npy(x) @ (w_torch / ref.sigma(w_torch)).T
        np.testing.assert_allclose(npy(out_lin), expected, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(npy(out_mat), expected, rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# Training semantics


def test_double_forward_then_backward():
    """D(real) - D(fake): two training forwards, one backward; u, v buffers keep identity."""
    layer, _ = make_layer("linear", F64)
    w_np = npy(layer.weight)  # [in, out]; W-matrix is w_np.T
    sp = spec.make_spec("torch")
    dsn.spectral_norm(layer, seed=1)
    ref = numpy_ref.ReferenceSN(w_np, 1, sp, *spec.init_uv(4, 6, 1, F64))
    u_obj, v_obj = layer.weight_u, layer.weight_v
    real, fake = inputs((3, 6), F64, 2)
    y_real = layer(real)
    ref.forward(w_np, True)
    state_real = ref.state()
    y_fake = layer(fake)
    ref.forward(w_np, True)
    (y_real.mean() - y_fake.mean()).backward()
    assert layer.weight_u is u_obj and layer._buffers["weight_u"] is u_obj
    assert layer.weight_v is v_obj

    def grad_of_mean(x):  # d mean(x @ W_sn + b) / d W_sn
        return np.repeat(npy(x).sum(0)[:, None], 4, axis=1) / (3 * 4)

    expected = numpy_ref.normalized_weight_grad(
        grad_of_mean(real), w_np, state_real["u"], state_real["v"], 1, sp
    ) - ref.weight_grad(grad_of_mean(fake), w_np)
    np.testing.assert_allclose(npy(layer.weight_orig.grad), expected, rtol=1e-9, atol=1e-12)


def test_state_dict_round_trip_mid_training(tmp_path):
    a, in_shape = make_layer("conv2d", F32)
    b = copy.deepcopy(a)
    dsn.spectral_norm(a, seed=1)
    dsn.spectral_norm(b, seed=2)  # different u, v: the load must overwrite them
    xs = inputs(in_shape, F32, 4)
    for x in xs[:2]:
        a(x)
    path = str(tmp_path / "sn.pdparams")
    paddle.save(a.state_dict(), path)
    assert set(a.state_dict()) == {"weight_orig", "weight_u", "weight_v", "bias"}
    u_obj = b.weight_u
    b.set_state_dict(paddle.load(path))
    assert b.weight_u is u_obj  # loaded in place
    for x in xs[2:]:
        np.testing.assert_array_equal(npy(b(x)), npy(a(x)))
        np.testing.assert_array_equal(npy(b.weight_u), npy(a.weight_u))
        np.testing.assert_array_equal(npy(b.weight_v), npy(a.weight_v))


@pytest.mark.parametrize("kind", ["linear", "conv2d_transpose", "vector"])
def test_native_builtin_checkpoints_load_both_ways(kind):
    native, in_shape = make_layer(kind, F64)
    ours = copy.deepcopy(native)
    BUILTIN_SN(native)
    dsn.spectral_norm(ours, compat="paddle", seed=3)
    xs = inputs(in_shape, F64, 5)
    for x in xs[:2]:
        native(x)
    ours.set_state_dict(native.state_dict())
    for x in xs[2:4]:
        assert_builtin_close(npy(ours(x)), npy(native(x)))
        assert_builtin_close(npy(ours.weight_u), npy(native.weight_u))
    # and back: a dualsn checkpoint in the built-in
    back, _ = make_layer(kind, F64, seed=9)
    BUILTIN_SN(back)
    back.set_state_dict(ours.state_dict())
    assert_builtin_close(npy(back(xs[4])), npy(ours(xs[4])))


# ---------------------------------------------------------------------------------------------
# remove_spectral_norm, sigma, introspection


@pytest.mark.parametrize("kind", ["conv2d", "vector"])
@pytest.mark.parametrize("training", [True, False])
def test_remove_spectral_norm(kind, training):
    layer, in_shape = make_layer(kind, F64)
    keys = list(layer.state_dict())
    dsn.spectral_norm(layer, seed=1)
    xs = inputs(in_shape, F64, 3)
    layer(xs[0])
    layer(xs[1])
    w = npy(layer.weight_orig)
    sig = dsn.sigma(layer)
    state = {k: npy(v) for k, v in layer.state_dict().items()}
    layer.train() if training else layer.eval()
    assert dsn.remove_spectral_norm(layer) is layer
    # W / sigma with the u, v as they were: no iteration, even in training mode
    np.testing.assert_allclose(npy(layer.weight), w / sig, rtol=1e-13)
    if "weight_u" in state:
        ref_sigma = numpy_ref.sigma(spec.to_matrix(w, 0), state["weight_u"], state["weight_v"])
        assert sig == pytest.approx(ref_sigma, rel=1e-13)
    assert isinstance(layer.weight, paddle.base.framework.EagerParamBase)
    assert not layer.weight.stop_gradient
    assert set(layer.state_dict()) == set(keys)
    assert not layer._forward_pre_hooks and not layer._buffers
    assert not dsn.is_spectral_norm(layer)
    out = layer(xs[2])
    out.sum().backward()
    assert layer.weight.grad is not None
    with pytest.raises(ValueError, match="not found"):
        dsn.remove_spectral_norm(layer)
    dsn.spectral_norm(layer, seed=1)  # can be applied again
    assert dsn.is_spectral_norm(layer)


def test_hook_reports_its_configuration():
    layer, _ = make_layer("conv2d_transpose", F32)
    assert dsn.get_spectral_norm(layer) is None and not dsn.is_spectral_norm(layer)
    dsn.spectral_norm(layer, n_power_iterations=2, eps=1e-8, compat="torch_legacy", seed=0)
    hook = dsn.get_spectral_norm(layer)
    assert isinstance(hook, dsn.SpectralNormHook)
    assert (hook.name, hook.dim, hook.spec) == ("weight", 1, spec.make_spec("torch_legacy", 2, 1e-8))
    assert dsn.get_spectral_norm(layer, "bias") is None
    layer.bias.set_value(np.arange(1.0, 5.0, dtype=F32))  # Paddle starts biases at zero
    dsn.spectral_norm(layer, name="bias", seed=0)  # 1-D bias, exact normalize
    bias_hook = dsn.get_spectral_norm(layer, "bias")
    assert bias_hook.name == "bias" and bias_hook.exact
    b = npy(layer.bias_orig)
    assert dsn.sigma(layer, "bias") == pytest.approx(np.linalg.norm(b), rel=1e-6)
    np.testing.assert_allclose(npy(layer.bias), b / np.linalg.norm(b), rtol=1e-6)


def test_sigma_of_zero_vector_is_eps():
    layer = VectorLayer(np.zeros(3))
    dsn.spectral_norm(layer, eps=1e-5)
    assert dsn.sigma(layer) == 1e-5
    np.testing.assert_array_equal(npy(layer.weight), np.zeros(3))


# ---------------------------------------------------------------------------------------------
# Bad input: clear error, layer unchanged


class IntLayer(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.weight = paddle.create_parameter(
            [3, 4], "int32", default_initializer=paddle.nn.initializer.Constant(1)
        )


class ConflictLayer(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.weight = paddle.create_parameter([3, 4], "float32")
        self.register_buffer("weight_u", paddle.zeros([3]))


BAD_CALLS = [
    (dict(dim=2), IndexError, "dim"),
    (dict(dim=-3), IndexError, "dim"),
    (dict(n_power_iterations=0), ValueError, "n_power_iterations"),
    (dict(n_power_iterations=-1), ValueError, "n_power_iterations"),
    (dict(n_power_iterations=1.5), ValueError, "n_power_iterations"),
    (dict(n_power_iterations=True), ValueError, "n_power_iterations"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(eps=-1e-3), ValueError, "eps"),
    (dict(compat="jax"), ValueError, "compat"),
    (dict(name="nope"), ValueError, "nope"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed="a"), ValueError, "seed"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_CALLS)
def test_bad_arguments_leave_layer_unchanged(kwargs, error, match):
    layer, _ = make_layer("linear", F32)
    before = snapshot(layer)
    with pytest.raises(error, match=match):
        dsn.spectral_norm(layer, **kwargs)
    assert_same_snapshot(before, snapshot(layer))


def test_buffer_name_is_not_a_parameter():
    layer = ConflictLayer()
    before = snapshot(layer)
    with pytest.raises(ValueError, match="no parameter called 'weight_u'"):
        dsn.spectral_norm(layer, name="weight_u")
    assert_same_snapshot(before, snapshot(layer))


@pytest.mark.parametrize("first", ["dualsn", "builtin"])
def test_second_spectral_norm_raises(first):
    layer, _ = make_layer("linear", F32)
    if first == "dualsn":
        dsn.spectral_norm(layer)
    else:
        BUILTIN_SN(layer)
    before = snapshot(layer)
    with pytest.raises(RuntimeError, match="two spectral_norm"):
        dsn.spectral_norm(layer, compat="paddle")
    assert_same_snapshot(before, snapshot(layer))


@pytest.mark.parametrize(
    "make, error, match",
    [
        (IntLayer, TypeError, "floating point or complex"),
        (lambda: MatLayer(np.zeros((0, 3))), ValueError, "zero-size"),
        (ConflictLayer, ValueError, "weight_u"),
    ],
)
def test_unsupported_weights_leave_layer_unchanged(make, error, match):
    layer = make()
    before = snapshot(layer)
    with pytest.raises(error, match=match):
        dsn.spectral_norm(layer)
    assert_same_snapshot(before, snapshot(layer))


def test_remove_and_sigma_without_spectral_norm():
    layer, _ = make_layer("linear", F32)
    BUILTIN_SN(layer)  # the built-in's state is not dualsn's to remove
    before = snapshot(layer)
    with pytest.raises(ValueError, match="not found"):
        dsn.remove_spectral_norm(layer)
    with pytest.raises(ValueError, match="not found"):
        dsn.sigma(layer)
    assert_same_snapshot(before, snapshot(layer))


# ---------------------------------------------------------------------------------------------
# The fast paths: W-matrix views, the fused gradient, the eval cache, the buffer pool


class Conv2DTransposeLike(paddle.nn.Layer):
    """A [in, out, kh, kw] weight whose dim 1 is a middle axis (the "batched" layout), any dtype."""

    def __init__(self, w: np.ndarray):
        super().__init__()
        self.weight = paddle.create_parameter(
            list(w.shape), str(w.dtype), default_initializer=paddle.nn.initializer.Constant(0.0)
        )
        self.weight.set_value(w)


# (weight shape, dim, WeightMatrix kind)
LAYOUTS = [
    ((5, 7), 0, "rows"),
    ((4, 3, 3, 2), 0, "rows"),
    ((7, 5), 1, "cols"),
    ((2, 3, 5), 2, "cols"),
    ((3, 5, 2, 2), 1, "batched"),
    ((6,), 0, "rows"),  # a 1-D weight as an (n x 1) matrix (matrix vector mode)
]


def real_part(t):
    """Re(t); paddle.real has no kernel for real tensors."""
    return paddle.real(t) if paddle.is_complex(t) else t


@pytest.mark.parametrize("dtype", [F64, "complex128"])
@pytest.mark.parametrize("shape, dim, kind", LAYOUTS)
def test_weight_matrix_products_match_numpy(shape, dim, kind, dtype):
    rng = np.random.default_rng(0)
    w = random_array(shape, dtype, rng)
    mat = dsn.WeightMatrix(paddle.to_tensor(w), dim)
    assert mat.kind == kind
    w_mat = spec.to_matrix(w, dim)
    h, n = w_mat.shape
    u, v = random_array(h, dtype, rng), random_array(n, dtype, rng)
    np.testing.assert_allclose(npy(mat.mv(paddle.to_tensor(v))), w_mat @ v, rtol=1e-12)
    np.testing.assert_allclose(npy(mat.mhv(paddle.to_tensor(u))), w_mat.conj().T @ u, rtol=1e-12)
    left, right = mat.outer_factors(paddle.to_tensor(u), paddle.to_tensor(v))
    rank_one = npy(paddle.matmul(left, right).reshape(list(shape)))
    np.testing.assert_allclose(rank_one, spec.from_matrix(np.outer(u, v.conj()), shape, dim), rtol=1e-12)


def test_weight_matrix_is_a_view_of_the_weight():
    """No copy of W for any layout: the view shares the weight's memory."""
    for shape, dim, _ in LAYOUTS:
        w = paddle.to_tensor(np.ones(shape))
        assert dsn.WeightMatrix(w, dim).view._is_shared_buffer_with(w)


def _layer_for(shape, dtype, rng):
    w = random_array(shape, dtype, rng)
    layer = MatLayer(w) if len(shape) == 2 else VectorLayer(w) if len(shape) == 1 else Conv2DTransposeLike(w)
    return layer, w


def _fused_and_unfused_grads(shape, dim, compat, dtype, create_graph):
    """dL/dW of L = Re<H, W_sn> through the fused PyLayer and through autograd of the plain
    formula, from the same u, v; with create_graph, also d/dW of Re<K, dL/dW>."""
    rng = np.random.default_rng(1)
    layer, w = _layer_for(shape, dtype, rng)
    dsn.spectral_norm(layer, dim=dim, compat=compat, seed=3)
    hook = dsn.get_spectral_norm(layer)
    weight, u, v = hook.state(layer)
    h_up = paddle.to_tensor(random_array(shape, dtype, rng))
    k_up = paddle.to_tensor(random_array(shape, dtype, rng))
    results = []
    for fn in (dsn.normalized_weight, plain_normalized_weight):
        w_sn = fn(weight, u, v, hook.dim, hook.spec, False)
        loss = real_part((paddle.conj(h_up) * w_sn).sum())
        (g,) = paddle.grad(loss, [weight], create_graph=create_graph)
        out = [npy(g)]
        if create_graph:
            (g2,) = paddle.grad(real_part((paddle.conj(k_up) * g).sum()), [weight])
            out.append(npy(g2))
        results.append(out)
    return results, hook


@pytest.mark.parametrize("dtype", [F64, F32, "complex128"])
@pytest.mark.parametrize("shape, dim, kind", LAYOUTS)
def test_fused_gradient_equals_autograd_of_unfused_formula(shape, dim, kind, dtype):
    compat = "paddle" if len(shape) == 1 else "torch"  # 1-D: the matrix vector mode
    (fused, unfused), hook = _fused_and_unfused_grads(shape, dim, compat, dtype, create_graph=False)
    assert not hook.exact
    np.testing.assert_allclose(fused[0], unfused[0], **tol(dtype))


@pytest.mark.parametrize("dtype", [F64, F32, "complex128"])
@pytest.mark.parametrize("shape, dim, kind", LAYOUTS)
def test_fused_gradient_equals_reference(shape, dim, kind, dtype):
    compat = "paddle" if len(shape) == 1 else "torch"
    rng = np.random.default_rng(2)
    layer, w = _layer_for(shape, dtype, rng)
    dsn.spectral_norm(layer, dim=dim, compat=compat, seed=4)
    g = random_array(shape, dtype, rng)
    w_sn = layer.weight  # computed at registration, through the fused PyLayer
    real_part((w_sn * paddle.conj(paddle.to_tensor(g))).sum()).backward()
    expected = numpy_ref.normalized_weight_grad(
        g, w, npy(layer.weight_u), npy(layer.weight_v), dim, spec.make_spec(compat)
    )
    np.testing.assert_allclose(npy(layer.weight_orig.grad), expected, **tol(dtype))


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("shape, dim, kind", LAYOUTS[:5] + [((6,), 0, "exact")])
def test_fused_second_derivatives_equal_autograd(shape, dim, kind, dtype):
    """create_graph=True: the fused backward is differentiable again, like the plain ops.
    (Real weights only: Paddle's real() has no second derivative to compare with.)"""
    (fused, unfused), hook = _fused_and_unfused_grads(shape, dim, "torch", dtype, create_graph=True)
    assert hook.exact == (kind == "exact")
    np.testing.assert_allclose(fused[0], unfused[0], **tol(dtype))
    np.testing.assert_allclose(fused[1], unfused[1], **tol(dtype))


@pytest.mark.parametrize("eps, scale", [(1e-2, 1.0), (1e-2, 0.05), (0.5, 0.1)])
@pytest.mark.parametrize("dtype", [F64, F32])
def test_exact_vector_gradient_equals_reference(eps, scale, dtype):
    """||W|| above eps (projection) and below it (G / eps); Paddle's own p_norm gradient is
    off by about eps / ||W|| here, which these eps values would show."""
    rng = np.random.default_rng(5)
    w = (scale * rng.standard_normal(5) / np.sqrt(5)).astype(dtype)
    layer = VectorLayer(w)
    dsn.spectral_norm(layer, eps=eps)
    g = rng.standard_normal(5).astype(dtype)
    (layer.weight * paddle.to_tensor(g)).sum().backward()
    sp = spec.make_spec("torch", eps=eps)
    expected = numpy_ref.normalized_weight_grad(g, w, None, None, 0, sp)
    np.testing.assert_allclose(npy(layer.weight_orig.grad), expected, **tol(dtype))
    np.testing.assert_allclose(npy(layer.weight), numpy_ref.ReferenceSN(w, 0, sp).forward(w, True), **tol(dtype))


def test_sigma_read_off_the_iteration_holds_below_eps():
    """sigma = u^H W v exactly even when the last norm was clamped to eps."""
    rng = np.random.default_rng(6)
    w = 1e-9 * rng.standard_normal((4, 5))
    for compat in ("torch", "paddle"):
        layer = MatLayer(w)
        dsn.spectral_norm(layer, eps=1e-6, compat=compat, seed=2)
        sp = spec.make_spec(compat, eps=1e-6)
        ref = numpy_ref.ReferenceSN(w, 0, sp, *spec.init_uv(4, 5, 2, F64))
        layer(paddle.ones([1, 5], dtype=F64))
        ref.forward(w, training=True)
        np.testing.assert_allclose(npy(layer.weight), w / ref.sigma(w), rtol=1e-12)
        assert dsn.sigma(layer) == pytest.approx(ref.sigma(w), rel=1e-12)


def test_gradient_penalty_through_a_normalized_layer():
    """d/dW of ||d out / d x||^2 (WGAN-GP style): the input gradient's graph goes through the
    fused weight, whose backward then runs once for the total loss."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((3, 4))
    layers = [MatLayer(w), MatLayer(w)]
    for layer in layers:
        dsn.spectral_norm(layer, seed=1)
    x_np = rng.standard_normal((2, 4))
    grads = []
    for i, layer in enumerate(layers):
        x = paddle.to_tensor(x_np, stop_gradient=False)
        if i == 0:
            out = layer(x)
        else:  # the same forward with the plain formula, for autograd to differentiate
            layer.weight = plain_normalized_weight(
                layer.weight_orig, layer.weight_u, layer.weight_v, 0, spec.make_spec("torch"), True
            )
            out = paddle.matmul(x, layer.weight, transpose_y=True)
        (gx,) = paddle.grad(out.sum(), [x], create_graph=True)
        (out.mean() + (gx**2).sum()).backward()
        grads.append(npy(layer.weight_orig.grad))
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-12, atol=1e-14)


# -- eval cache ---------------------------------------------------------------------------


def big_linear(seed=0, n_in=300, n_out=400):
    """A paddle.nn.Linear above the eval cache's full-compare size (sampled fingerprint)."""
    paddle.seed(seed)
    with default_dtype(F64):
        layer = paddle.nn.Linear(n_in, n_out)
    assert n_in * n_out > dsn._cache._FULL_CHECK_SIZE
    dsn.spectral_norm(layer, seed=seed)
    return layer


def fresh_value(layer) -> np.ndarray:
    with paddle.no_grad():
        return npy(dsn.get_spectral_norm(layer).compute_weight(layer, do_power_iteration=False))


def eval_forward(layer, x):
    layer.eval()
    with paddle.no_grad():
        out = layer(x)
    return out, layer.weight


def test_eval_cache_reuses_the_normalized_weight(read_path):
    layer = big_linear()
    x = paddle.randn([2, 300], dtype=F64)
    _, first = eval_forward(layer, x)
    out, second = eval_forward(layer, x)
    assert second is first  # no recomputation
    np.testing.assert_array_equal(npy(second), fresh_value(layer))
    np.testing.assert_allclose(npy(out), npy(x) @ fresh_value(layer) + npy(layer.bias), rtol=1e-12)


def state_with(layer, **changes) -> dict:
    """The layer's state dict as numpy arrays, with some entries replaced."""
    return {**{k: npy(v) for k, v in layer.state_dict().items()}, **changes}


MUTATIONS = {
    # Changes to W, u, v (or the cached value) made under no_grad between two eval forwards.
    # The first two bump an inplace version; set_value and set_state_dict do not, so only
    # the content comparison sees them.
    "in-place add_": lambda l: l.weight_orig.add_(paddle.full(l.weight_orig.shape, 1e-3, F64)),
    "setitem one entry": lambda l: l.weight_orig.__setitem__((3, 5), 7.0),
    "set_value": lambda l: l.weight_orig.set_value(npy(l.weight_orig) * 1.5),
    "set_state_dict W": lambda l: l.set_state_dict(
        state_with(l, weight_orig=npy(l.weight_orig)[::-1].copy())
    ),
    "set_state_dict u": lambda l: l.set_state_dict(state_with(l, weight_u=-npy(l.weight_u))),
    "v.set_value": lambda l: l.weight_v.set_value(np.roll(npy(l.weight_v), 1)),
    "new parameter object": lambda l: setattr(
        l, "weight_orig", paddle.create_parameter(l.weight_orig.shape, F64)
    ),
    "cached output changed in place": lambda l: l.weight.scale_(2.0),
}


@pytest.fixture(params=["numpy view", "paddle gather"])
def read_path(request, monkeypatch):
    """The cache reads its samples through a numpy view of the tensors' memory (CPU), or,
    where there is none (other devices, dtypes numpy lacks), through paddle.gather."""
    if request.param == "paddle gather":
        monkeypatch.setattr(dsn._cache, "_host_view", lambda t: None)
    return request.param


@pytest.mark.parametrize("name", list(MUTATIONS) + ["optimizer step", "training forward"])
def test_eval_cache_sees_changes(name, read_path):
    layer = big_linear()
    x = paddle.randn([2, 300], dtype=F64)
    _, cached = eval_forward(layer, x)
    if name == "optimizer step":
        layer.train()
        layer(x).sum().backward()  # the gradient first, then a cached eval, then the step
        eval_forward(layer, x)
        paddle.optimizer.SGD(0.1, parameters=[layer.weight_orig]).step()
    elif name == "training forward":
        layer.train()
        layer(x)  # moves u, v
    else:
        with paddle.no_grad():
            MUTATIONS[name](layer)
    out, value = eval_forward(layer, x)
    np.testing.assert_array_equal(npy(value), fresh_value(layer))
    np.testing.assert_allclose(npy(out), npy(x) @ fresh_value(layer) + npy(layer.bias), rtol=1e-12)
    assert value is not cached


def test_eval_cache_small_weight_is_compared_in_full():
    layer = MatLayer(np.arange(12.0).reshape(3, 4) + 1)
    dsn.spectral_norm(layer, seed=0)
    layer.eval()
    x = paddle.ones([1, 4], dtype=F64)
    with paddle.no_grad():
        layer(x)
        w = npy(layer.weight_orig)
        w[2, 3] += 1.0
        layer.weight_orig.set_value(w)  # one entry, no version bump
        layer(x)
    np.testing.assert_array_equal(npy(layer.weight), fresh_value(layer))


def test_invalidate_cache_after_an_unsampled_write(read_path):
    """A set_value that changes only entries outside the sample is the documented blind spot;
    invalidate_cache() is the way out."""
    layer = big_linear()
    x = paddle.randn([1, 300], dtype=F64)
    _, cached = eval_forward(layer, x)
    sampled = set(dsn.get_spectral_norm(layer)._cache.index.tolist())
    flat_index = next(i for i in range(1, 1000) if i not in sampled)
    w = npy(layer.weight_orig)
    w.reshape(-1)[flat_index] += 1.0
    layer.weight_orig.set_value(w)
    assert eval_forward(layer, x)[1] is cached  # not seen: the blind spot
    dsn.invalidate_cache(layer)
    _, value = eval_forward(layer, x)
    assert value is not cached
    np.testing.assert_array_equal(npy(value), fresh_value(layer))
    with pytest.raises(ValueError, match="not found"):
        dsn.invalidate_cache(layer, "bias")


def test_eval_forward_with_grad_is_not_cached_and_differentiates():
    layer = big_linear(n_in=300, n_out=250)
    sp = spec.make_spec("torch")
    x = paddle.randn([2, 300], dtype=F64)
    eval_forward(layer, x)  # fills the cache
    layer.eval()
    out = layer(x)  # grad enabled, W requires grad: a fresh, differentiable weight
    assert not layer.weight.stop_gradient
    g = np.random.default_rng(0).standard_normal(out.shape)
    (out * paddle.to_tensor(g)).sum().backward()
    w = npy(layer.weight_orig)  # [in, out]; dim 1
    expected = numpy_ref.normalized_weight_grad(npy(x).T @ g, w, npy(layer.weight_u), npy(layer.weight_v), 1, sp)
    np.testing.assert_allclose(npy(layer.weight_orig.grad), expected, rtol=1e-10, atol=1e-13)
    # a weight that does not require grad needs no graph: cached again
    layer.weight_orig.stop_gradient = True
    layer(x)
    first = layer.weight
    layer(x)
    assert layer.weight is first


def test_deepcopy_leaves_the_cache_behind():
    layer = big_linear()
    x = paddle.randn([1, 300], dtype=F64)
    eval_forward(layer, x)
    twin = copy.deepcopy(layer)
    assert dsn.get_spectral_norm(twin)._cache is None
    with paddle.no_grad():
        twin.weight_orig.set_value(npy(twin.weight_orig) * 2.0)
    np.testing.assert_array_equal(npy(eval_forward(twin, x)[1]), fresh_value(twin))
    np.testing.assert_array_equal(npy(eval_forward(layer, x)[1]), fresh_value(layer))


# -- no memory reuse ------------------------------------------------------------------------


def test_training_forwards_never_write_into_earlier_weights():
    """Each training forward's normalized weight is a new tensor: a detached alias (or a
    numpy view) kept across later forwards keeps its values (issue 10: memory handed to the
    user is never written again)."""
    layer = big_linear()
    layer.train()
    x = paddle.randn([2, 300], dtype=F64)
    kept = []
    for _ in range(4):
        layer(x).sum().backward()
        kept.append((layer.weight.detach(), np.from_dlpack(layer.weight.detach()), npy(layer.weight)))
    for alias, view, value in kept:
        np.testing.assert_array_equal(npy(alias), value)
        np.testing.assert_array_equal(view, value)
    assert len({alias.data_ptr() for alias, _, _ in kept}) == len(kept)


# -- the gradient hooks --------------------------------------------------------------------


def test_user_hooks_and_retained_grads_see_the_plain_gradient():
    """The correction is written into the gradient of a private view of W, never into the
    gradient of layer.weight that users can observe."""
    layer = big_linear()
    x = paddle.randn([2, 300], dtype=F64)
    out = layer(x)
    w_sn = layer.weight
    w_sn.retain_grads()
    seen = []
    w_sn.register_hook(lambda g: seen.append(g) or g)
    g_out = np.random.default_rng(0).standard_normal(out.shape)
    (out * paddle.to_tensor(g_out)).sum().backward()
    plain = npy(x).T @ g_out  # dL/d(layer.weight)
    np.testing.assert_allclose(npy(w_sn.grad), plain, rtol=1e-12)
    np.testing.assert_allclose(npy(seen[0]), plain, rtol=1e-12)
    expected = numpy_ref.normalized_weight_grad(
        plain, npy(layer.weight_orig), npy(layer.weight_u), npy(layer.weight_v), 1, spec.make_spec("torch")
    )
    np.testing.assert_allclose(npy(layer.weight_orig.grad), expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kind", ["linear", "vector"])
def test_the_hook_sees_only_the_normalization_gradient(kind):
    """W used elsewhere too (a penalty on W itself): only the normalization's share of the
    gradient is corrected, now and in later steps (no hook stays behind on W)."""
    layer, in_shape = make_layer(kind, F64)
    dsn.spectral_norm(layer, seed=1)
    w = npy(layer.weight_orig)
    dim = KINDS[kind][2]
    sp = spec.make_spec("torch")
    rng = np.random.default_rng(1)
    for _ in range(2):
        layer.weight_orig.clear_gradient()
        h, k = rng.standard_normal(w.shape), rng.standard_normal(w.shape)
        layer(inputs(in_shape, F64, 1)[0])
        loss = (layer.weight * paddle.to_tensor(h)).sum() + (layer.weight_orig * paddle.to_tensor(k)).sum()
        loss.backward()
        uv = (None, None) if kind == "vector" else (npy(layer.weight_u), npy(layer.weight_v))
        expected = numpy_ref.normalized_weight_grad(h, w, *uv, dim, sp) + k
        np.testing.assert_allclose(npy(layer.weight_orig.grad), expected, rtol=1e-10, atol=1e-13)
    layer.weight_orig.clear_gradient()
    (layer.weight_orig * paddle.to_tensor(k)).sum().backward()
    np.testing.assert_array_equal(npy(layer.weight_orig.grad), k)


@pytest.mark.parametrize("kind", ["linear", "conv2d_transpose", "vector"])
def test_retained_graph_can_be_differentiated_twice(kind):
    """backward(retain_graph=True) then backward() again: the gradient doubles (a PyLayer
    would crash here in Paddle 3.3, which is why the gradient goes through hooks)."""
    layer, in_shape = make_layer(kind, F64)
    dsn.spectral_norm(layer, seed=2)
    loss = (layer(inputs(in_shape, F64, 1)[0]) ** 2).sum()
    loss.backward(retain_graph=True)
    once = npy(layer.weight_orig.grad)
    loss.backward()
    np.testing.assert_allclose(npy(layer.weight_orig.grad), 2 * once, rtol=1e-12)


def test_three_forwards_then_one_backward_equal_the_plain_path():
    """Graphs not yet differentiated keep their own weights once layer.weight has moved on
    (the first forward's weight object is gone before the third forward)."""
    grads = []
    for plain in (False, True):
        layer = big_linear(seed=3)
        rng = np.random.default_rng(4)
        xs = [paddle.to_tensor(rng.standard_normal((2, 300))) for _ in range(3)]
        with dsn.plain_path(plain):
            outs = [layer(x) for x in xs]
            sum((o * o).sum() for o in outs).backward()
        grads.append(npy(layer.weight_orig.grad))
    assert np.linalg.norm(grads[0] - grads[1]) <= 1e-12 * np.linalg.norm(grads[1])


def test_buffers_follow_a_cast_of_the_layer():
    """After layer.to(dtype) the training forward writes float64 results, not into the old
    float32 buffers, and the gradient matches the reference."""
    paddle.seed(0)
    with default_dtype(F32):
        layer = paddle.nn.Linear(300, 400)
    dsn.spectral_norm(layer, seed=0)
    x = paddle.randn([2, 300], dtype=F32)
    for _ in range(2):
        layer(x).sum().backward()
    layer.to(dtype=F64)
    layer.clear_gradients()
    assert layer.weight_orig.dtype == paddle.float64 and layer.weight_u.dtype == paddle.float64
    w = npy(layer.weight_orig)
    out = layer(x.astype(F64))
    assert layer.weight.dtype == paddle.float64
    out.sum().backward()
    u, v = npy(layer.weight_u), npy(layer.weight_v)
    sigma = u @ w.T @ v
    np.testing.assert_allclose(npy(layer.weight), w / sigma, rtol=1e-12)
    g = np.repeat(npy(x).astype(F64).sum(0)[:, None], 400, axis=1)
    expected = numpy_ref.normalized_weight_grad(g, w, u, v, 1, spec.make_spec("torch"))
    np.testing.assert_allclose(npy(layer.weight_orig.grad), expected, rtol=1e-10, atol=1e-13)
