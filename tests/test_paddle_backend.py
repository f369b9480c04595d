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
# compat="paddle" is the built-in, exactly


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("kind", list(KINDS))
def test_paddle_preset_equals_builtin_exactly(kind, dtype):
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
        np.testing.assert_array_equal(npy(out_o), npy(out_b))
        np.testing.assert_array_equal(npy(ours.weight), npy(builtin.weight))
        np.testing.assert_array_equal(npy(ours.weight_u), npy(builtin.weight_u))
        np.testing.assert_array_equal(npy(ours.weight_v), npy(builtin.weight_v))
        (out_b * out_b).sum().backward()
        (out_o * out_o).sum().backward()
        np.testing.assert_array_equal(npy(ours.weight_orig.grad), npy(builtin.weight_orig.grad))
    builtin.eval()
    ours.eval()
    u_before = npy(ours.weight_u)
    np.testing.assert_array_equal(npy(ours(xs[3])), npy(builtin(xs[3])))
    np.testing.assert_array_equal(npy(ours.weight_u), u_before)
    np.testing.assert_array_equal(npy(builtin.weight_u), u_before)


def test_paddle_preset_explicit_dim_equals_builtin():
    builtin, in_shape = make_layer("conv2d", F64)
    ours = copy.deepcopy(builtin)
    BUILTIN_SN(builtin, dim=2, n_power_iterations=3, eps=1e-6)
    dsn.spectral_norm(ours, dim=-2, n_power_iterations=3, eps=1e-6, compat="paddle", seed=4)
    assert dsn.get_spectral_norm(ours).dim == 2
    builtin.weight_u.set_value(npy(ours.weight_u))
    builtin.weight_v.set_value(npy(ours.weight_v))
    for x in inputs(in_shape, F64, 2):
        np.testing.assert_array_equal(npy(ours(x)), npy(builtin(x)))
        np.testing.assert_array_equal(npy(ours.weight_u), npy(builtin.weight_u))


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
        ref = spec.ReferenceSN(w_np, dim, sp, training=training)
        assert not hasattr(layer, "weight_u") and not hasattr(layer, "weight_v")
    else:
        h, w = spec.matrix_shape(w_np.shape, dim)
        ref = spec.ReferenceSN(w_np, dim, sp, *spec.init_uv(h, w, 5, dtype), training=training)

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
        u, v = spec.power_iteration(w, u, v, n, "uv", 1e-12)
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
        ref = spec.ReferenceSN(w_np, 0, sp)
    else:
        h, w = spec.matrix_shape(shape, 0)
        u0, v0 = spec.init_uv(h, w, 8, dtype)
        ref = spec.ReferenceSN(w_np, 0, sp, u0, v0)
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
    ref = spec.ReferenceSN(w_torch, 0, sp, *spec.init_uv(4, 6, 3, F64))
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
    ref = spec.ReferenceSN(w_np, 1, sp, *spec.init_uv(4, 6, 1, F64))
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

    expected = spec.normalized_weight_grad(
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
        np.testing.assert_array_equal(npy(ours(x)), npy(native(x)))
        np.testing.assert_array_equal(npy(ours.weight_u), npy(native.weight_u))
    # and back: a dualsn checkpoint in the built-in
    back, _ = make_layer(kind, F64, seed=9)
    BUILTIN_SN(back)
    back.set_state_dict(ours.state_dict())
    np.testing.assert_array_equal(npy(back(xs[4])), npy(ours(xs[4])))


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
        ref_sigma = spec.sigma(spec.to_matrix(w, 0), state["weight_u"], state["weight_v"])
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
