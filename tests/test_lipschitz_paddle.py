"""dualsn.paddle's Lipschitz toolkit (issue 7) against dualsn.spec's numpy reference, exact
SVDs and explicit convolution matrices: ``coeff``, ``atol``/``rtol``, ``track_sigma``,
``num_svs`` / :func:`singular_values`, the kept sigma read by :func:`sigma`, and
:func:`spectral_norm_conv`."""

from __future__ import annotations

import numpy as np
import pytest

paddle = pytest.importorskip("paddle")

import dualsn  # noqa: E402
import dualsn.paddle as dsn  # noqa: E402
from dualsn import spec  # noqa: E402
from dualsn import reference as numpy_ref  # noqa: E402
from _numeric import random_array  # noqa: E402

F64 = "float64"


@pytest.fixture(autouse=True)
def _clean_seed_stream():
    dualsn.manual_seed(None)
    yield
    dualsn.manual_seed(None)


def npy(t) -> np.ndarray:
    return np.array(t.numpy(), copy=True)


def plain_normalized_weight(*args):
    """dsn.normalized_weight on the plain path (autograd derives the whole gradient)."""
    with dsn.plain_path():
        return dsn.normalized_weight(*args)


def with_singular_values(h, w, values, rng) -> np.ndarray:
    """An h x w matrix with the given leading singular values (the rest 0.1 and below)."""
    k = min(h, w)
    s = np.concatenate([values, np.linspace(0.1, 0.01, k - len(values))])
    a, _ = np.linalg.qr(rng.standard_normal((h, k)))
    b, _ = np.linalg.qr(rng.standard_normal((w, k)))
    return (a * s) @ b.T


class Holder(paddle.nn.Layer):
    """A layer holding one weight of any shape and dtype; its forward returns the (normalized)
    weight, so a loss on the output differentiates W -> W_sn directly."""

    def __init__(self, w: np.ndarray):
        super().__init__()
        self.weight = paddle.create_parameter(
            list(w.shape), str(w.dtype), default_initializer=paddle.nn.initializer.Constant(0.0)
        )
        self.weight.set_value(w)

    def forward(self):
        return self.weight


def reference_for(w, dim, sp, seed, training=True):
    """numpy_ref.ReferenceSN from the seeded draws dualsn uses (u, v, and the extra pairs)."""
    h, n = spec.matrix_shape(w.shape, dim)
    u0, v0 = spec.init_uv(h, n, seed, w.dtype, sp.eps)
    extra = {}
    if sp.num_svs > 1:
        eu, ev = spec.init_extra_uv(h, n, sp.num_svs - 1, seed, w.dtype, sp.eps)
        extra = dict(extra_u0=eu, extra_v0=ev)
    return numpy_ref.ReferenceSN(w, dim, sp, u0, v0, training=training, **extra)


def real_loss(out, upstream):
    prod = paddle.conj(upstream) * out if paddle.is_complex(out) else upstream * out
    return paddle.real(prod.sum()) if paddle.is_complex(prod) else prod.sum()


def assert_state_equals_reference(layer, ref, rtol=1e-10):
    np.testing.assert_allclose(npy(layer.weight_u), ref.u, rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(npy(layer.weight_v), ref.v, rtol=rtol, atol=1e-12)
    if ref.extra_u is not None:
        np.testing.assert_allclose(npy(layer.weight_u_extra), ref.extra_u, rtol=rtol, atol=1e-10)
        np.testing.assert_allclose(npy(layer.weight_v_extra), ref.extra_v, rtol=rtol, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# coeff: the soft bound W / max(1, sigma / coeff)


@pytest.mark.parametrize("compat", ["torch", "paddle"])
@pytest.mark.parametrize("coeff", [0.7, 50.0])
def test_coeff_forwards_equal_reference(compat, coeff):
    """Training and eval forwards, step by step: the normalized weight is W / divisor(sigma),
    u, v and sigma are the reference's, whether the bound is active (0.7) or not (50)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 7))
    layer = dsn.spectral_norm(Holder(w), compat=compat, coeff=coeff, seed=3)
    sp = spec.make_spec(compat, coeff=coeff)
    ref = reference_for(w, 0, sp, 3)
    for training in (True, True, False, True):
        layer.train() if training else layer.eval()
        out = npy(layer())
        np.testing.assert_allclose(out, ref.forward(w, training), rtol=1e-12, atol=1e-14)
        assert_state_equals_reference(layer, ref)
        assert dsn.sigma(layer) == pytest.approx(ref.sigma(w), rel=1e-12)
    if coeff > np.linalg.norm(w, 2):
        np.testing.assert_array_equal(out, w)  # inactive: W passes as it is


def test_coeff_bounds_the_spectral_norm_at_coeff():
    """After convergence the normalized weight's largest singular value is coeff exactly
    (active bound), and a weight whose norm is below coeff is left unchanged."""
    rng = np.random.default_rng(1)
    w = with_singular_values(6, 9, [3.0, 1.5], rng)
    layer = dsn.spectral_norm(Holder(w), coeff=0.9, n_power_iterations=30, seed=0)
    for _ in range(3):
        out = npy(layer())
    assert np.linalg.norm(out, 2) == pytest.approx(0.9, rel=1e-10)
    small = dsn.spectral_norm(Holder(w / 10), coeff=0.9, n_power_iterations=30, seed=0)
    np.testing.assert_array_equal(npy(small()), w / 10)


GRAD_CASES = [
    # (shape, dim, dtype)
    ((5, 7), 0, F64),
    ((5, 7), 1, F64),  # the transposed ("cols") layout
    ((3, 4, 2, 2), 1, F64),  # batched layout
    ((4, 6), 0, "complex128"),
    ((6,), 0, F64),  # exact 1-D normalization
]


@pytest.mark.parametrize("active", [True, False])
@pytest.mark.parametrize("shape, dim, dtype", GRAD_CASES)
def test_coeff_gradient_equals_reference(shape, dim, dtype, active):
    """dL/dW through the hooked gradient equals numpy_ref.normalized_weight_grad (with coeff);
    inactive: G itself."""
    rng = np.random.default_rng(2)
    w = random_array(shape, dtype, rng)
    norm = np.linalg.norm(spec.to_matrix(w, dim), 2) if len(shape) > 1 else np.linalg.norm(w)
    coeff = norm / 3 if active else norm * 3
    layer = dsn.spectral_norm(Holder(w), dim=dim, coeff=coeff, n_power_iterations=3, seed=4)
    sp = spec.make_spec("torch", 3, coeff=coeff)
    ref = reference_for(w, dim, sp, 4)
    g = random_array(shape, dtype, rng)
    out = layer()
    ref.forward(w, True)
    real_loss(out, paddle.to_tensor(g)).backward()
    expected = ref.weight_grad(g, w)
    np.testing.assert_allclose(npy(layer.weight_orig.grad), expected, rtol=1e-10, atol=1e-12)
    if not active:
        np.testing.assert_allclose(npy(layer.weight_orig.grad), g, rtol=0, atol=0)


@pytest.mark.parametrize("shape, dim, dtype", [c for c in GRAD_CASES if c[2] == F64])
def test_coeff_second_derivatives_equal_autograd_of_the_plain_formula(shape, dim, dtype):
    """create_graph=True through the hooked gradient (active bound) equals Paddle's autograd
    of the plain formula W / where(sigma > coeff, sigma / coeff, 1), first and second order.
    (Real weights only: Paddle's real() has no second derivative to compare with.)"""
    rng = np.random.default_rng(5)
    w = random_array(shape, dtype, rng)
    layer = dsn.spectral_norm(Holder(w), dim=dim, coeff=0.2, seed=1)
    hook = dsn.get_spectral_norm(layer)
    weight, u, v = hook.state(layer)
    h_up = paddle.to_tensor(random_array(shape, dtype, rng))
    k_up = paddle.to_tensor(random_array(shape, dtype, rng))
    results = []
    for fn in (dsn.normalized_weight, plain_normalized_weight):
        (g,) = paddle.grad(real_loss(fn(weight, u, v, hook.dim, hook.spec, False), h_up), [weight], create_graph=True)
        (g2,) = paddle.grad(real_loss(g, k_up), [weight])
        results.append((npy(g), npy(g2)))
    for fused, plain in zip(*results):
        np.testing.assert_allclose(fused, plain, rtol=1e-9, atol=1e-11)


def test_coeff_double_forward_then_backward():
    """D(real) - D(fake): two training forwards, one backward, each forward's gradient with its
    own u, v (the reference of both steps)."""
    rng = np.random.default_rng(6)
    w = rng.standard_normal((4, 6))
    layer = dsn.spectral_norm(Holder(w), coeff=0.5, compat="paddle", seed=2)
    ref = reference_for(w, 0, spec.make_spec("paddle", coeff=0.5), 2)
    g1, g2 = rng.standard_normal((2, 4, 6))
    out1 = layer()
    ref.forward(w, True)
    expected = ref.weight_grad(g1, w)
    out2 = layer()
    ref.forward(w, True)
    expected = expected - ref.weight_grad(g2, w)
    (real_loss(out1, paddle.to_tensor(g1)) - real_loss(out2, paddle.to_tensor(g2))).backward()
    np.testing.assert_allclose(npy(layer.weight_orig.grad), expected, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# atol / rtol: iterate until sigma settles


@pytest.mark.parametrize(
    "compat, n, tolerances, max_iterations",
    [
        ("torch", 1, dict(atol=1e-6), 100),
        ("paddle", 1, dict(rtol=1e-9), 100),
        ("torch_legacy", 3, dict(atol=1e-4, rtol=1e-4), 100),
        ("torch", 2, dict(atol=0.0), 7),  # never settles: stops at max_iterations
    ],
)
def test_tolerance_iteration_counts_and_state_equal_reference(compat, n, tolerances, max_iterations):
    """Iteration counts (``last_iterations``), u, v and the normalized weight equal
    numpy_ref.training_iterations' forward by forward."""
    rng = np.random.default_rng(7)
    w = with_singular_values(8, 6, [2.0, 1.9], rng)  # a small gap: many iterations
    kw = dict(tolerances, max_iterations=max_iterations)
    layer = dsn.spectral_norm(Holder(w), n_power_iterations=n, compat=compat, seed=5, **kw)
    ref = reference_for(w, 0, spec.make_spec(compat, n, **kw), 5)
    hook = dsn.get_spectral_norm(layer)
    counts = []
    for training in (True, True, True, False, True):
        layer.train() if training else layer.eval()
        out = npy(layer())
        np.testing.assert_allclose(out, ref.forward(w, training), rtol=1e-11)
        assert hook.last_iterations == ref.last_iterations
        assert_state_equals_reference(layer, ref, rtol=1e-9)
        counts.append(hook.last_iterations)
    assert counts[3] == 0  # eval: no iteration
    assert all(max(2, n) <= c <= max_iterations for c in counts[:3] + counts[4:])
    if tolerances == dict(atol=0.0):
        assert counts[0] == max_iterations
    elif n == 1:  # tight tolerances and a small spectral gap: the first forward iterates long
        assert counts[0] > 10


def test_tolerance_changes_nothing_at_registration():
    """Registration runs the preset's fixed registration iterations, tolerance or not."""
    w = np.random.default_rng(8).standard_normal((5, 5))
    a = dsn.spectral_norm(Holder(w), seed=1, rtol=1e-3)
    b = dsn.spectral_norm(Holder(w), seed=1)
    np.testing.assert_array_equal(npy(a.weight_u), npy(b.weight_u))
    np.testing.assert_array_equal(npy(a.weight_v), npy(b.weight_v))


# ---------------------------------------------------------------------------------------------
# The kept sigma and track_sigma


def test_sigma_after_a_forward_needs_no_pass_over_w(monkeypatch):
    """Once sigma() has been read, it returns the last forward's sigma (equal to the
    reference's u^T W v) without computing anything while W, u, v are unchanged, and
    recomputes after W changes. Before the first read, training forwards keep nothing
    (as in torch): that read computes u^T W v."""
    rng = np.random.default_rng(9)
    w = rng.standard_normal((6, 4))
    layer = dsn.spectral_norm(Holder(w), seed=2)
    ref = reference_for(w, 0, spec.make_spec("torch"), 2)
    hook = dsn.get_spectral_norm(layer)
    layer()
    ref.forward(w, True)
    assert hook._record is None  # nothing kept until sigma() is read
    assert dsn.sigma(layer) == pytest.approx(ref.sigma(w), rel=1e-13)  # computed
    layer()
    ref.forward(w, True)
    with monkeypatch.context() as m:
        m.setattr(dsn._iteration, "_sigma_value", lambda *a: pytest.fail("sigma recomputed"))
        assert dsn.sigma(layer) == pytest.approx(ref.sigma(w), rel=1e-13)
    layer.eval()
    with paddle.no_grad():
        layer()  # an eval forward computes sigma on its cache miss, and keeps it
        with monkeypatch.context() as m:
            m.setattr(dsn._iteration, "_sigma_value", lambda *a: pytest.fail("sigma recomputed"))
            assert dsn.sigma(layer) == pytest.approx(ref.sigma(w), rel=1e-13)
            layer()  # a cache hit
    w2 = w * 2
    layer.weight_orig.set_value(w2)  # set_value: no inplace version bump, seen by the contents
    assert dsn.sigma(layer) == pytest.approx(ref.sigma(w2), rel=1e-13)


@pytest.mark.parametrize("shape", [(5, 3), (4,)])
def test_track_sigma_buffer_in_state_dict(shape):
    rng = np.random.default_rng(10)
    w = rng.standard_normal(shape)
    plain = dsn.spectral_norm(Holder(w), seed=1)
    assert "weight_sigma" not in plain.state_dict()
    layer = dsn.spectral_norm(Holder(w), seed=1, track_sigma=True, coeff=0.5)
    expected_keys = {"weight_orig", "weight_sigma"} | ({"weight_u", "weight_v"} if len(shape) > 1 else set())
    assert set(layer.state_dict()) == expected_keys
    ref = reference_for(w, 0, spec.make_spec("torch", coeff=0.5), 1)
    assert float(layer.state_dict()["weight_sigma"]) == pytest.approx(ref.sigma(w), rel=1e-13)
    for training in (True, True, False):
        layer.train() if training else layer.eval()
        layer()
        ref.forward(w, training)
        assert float(layer.weight_sigma) == pytest.approx(ref.sigma(w), rel=1e-12)
        assert float(layer.weight_sigma) == pytest.approx(dsn.sigma(layer), rel=1e-12)
    # a checkpoint round trip restores it
    twin = dsn.spectral_norm(Holder(w), seed=7, track_sigma=True, coeff=0.5)
    missing, unexpected = twin.set_state_dict(layer.state_dict())
    assert not missing and not unexpected
    assert float(twin.weight_sigma) == float(layer.weight_sigma)


def test_track_sigma_complex_weight():
    rng = np.random.default_rng(11)
    w = random_array((4, 3), "complex128", rng)
    layer = dsn.spectral_norm(Holder(w), seed=3, track_sigma=True)
    ref = reference_for(w, 0, spec.make_spec("torch"), 3)
    layer()
    ref.forward(w, True)
    assert layer.weight_sigma.dtype == paddle.complex128
    np.testing.assert_allclose(npy(layer.weight_sigma), ref.sigma(w), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# num_svs: several singular values


@pytest.mark.parametrize("compat", ["torch", "paddle"])
@pytest.mark.parametrize("shape, dim, dtype", [((6, 8), 0, F64), ((4, 3, 3), 1, F64), ((5, 4), 1, "complex128")])
def test_num_svs_steps_equal_reference(compat, shape, dim, dtype):
    """Every pair, after registration and each training forward, equals numpy_ref.power_step's
    Gram-Schmidt iteration; singular_values are the reference's u_i^H W v_i."""
    rng = np.random.default_rng(12)
    w = random_array(shape, dtype, rng)
    layer = dsn.spectral_norm(Holder(w), dim=dim, compat=compat, num_svs=3, seed=6)
    ref = reference_for(w, dim, spec.make_spec(compat, num_svs=3), 6)
    assert_state_equals_reference(layer, ref)
    for training in (True, True, False, True):
        layer.train() if training else layer.eval()
        np.testing.assert_allclose(npy(layer()), ref.forward(w, training), rtol=1e-11)
        assert_state_equals_reference(layer, ref, rtol=1e-9)
        np.testing.assert_allclose(dsn.singular_values(layer), np.real(ref.singular_values(w)), rtol=1e-9)


def test_num_svs_converge_to_the_svd():
    rng = np.random.default_rng(13)
    values = [3.0, 2.0, 1.2, 0.6]
    w = with_singular_values(9, 7, values, rng)
    layer = dsn.spectral_norm(Holder(w), num_svs=4, n_power_iterations=100, seed=0)
    layer()
    np.testing.assert_allclose(dsn.singular_values(layer), values, rtol=1e-8)
    assert dsn.singular_values(layer)[0] == dsn.sigma(layer)
    # the extra pairs never change the normalization
    plain = dsn.spectral_norm(Holder(w), n_power_iterations=100, seed=0)
    np.testing.assert_array_equal(npy(plain()), npy(layer.weight))


def test_num_svs_unseeded_buffers():
    paddle.seed(3)
    layer = dsn.spectral_norm(paddle.nn.Linear(6, 5), num_svs=3, compat="paddle")
    assert set(layer.state_dict()) == {"weight_orig", "bias", "weight_u", "weight_v", "weight_u_extra", "weight_v_extra"}
    assert layer.weight_u_extra.shape == [2, 5] and layer.weight_v_extra.shape == [2, 6]
    np.testing.assert_allclose(np.linalg.norm(npy(layer.weight_u_extra), axis=1), 1.0, rtol=1e-6)
    for _ in range(200):
        layer(paddle.randn([2, 6]))
    us = np.vstack([npy(layer.weight_u), npy(layer.weight_u_extra)])
    np.testing.assert_allclose(us @ us.T, np.eye(3), atol=1e-5)
    exact = np.linalg.svd(npy(layer.weight_orig).T, compute_uv=False)[:3]
    np.testing.assert_allclose(dsn.singular_values(layer), exact, rtol=1e-4)
    assert len(dsn.singular_values(dsn.spectral_norm(paddle.nn.Linear(3, 2)))) == 1


def test_remove_drops_every_feature_buffer():
    rng = np.random.default_rng(14)
    w = rng.standard_normal((5, 6))
    layer = dsn.spectral_norm(Holder(w), num_svs=2, track_sigma=True, coeff=0.4, seed=1)
    layer()
    ref = reference_for(w, 0, spec.make_spec("torch", num_svs=2, coeff=0.4), 1)
    ref.forward(w, True)
    dsn.remove_spectral_norm(layer)
    assert set(layer.state_dict()) == {"weight"}
    assert not layer._buffers and not layer._forward_pre_hooks
    np.testing.assert_allclose(npy(layer.weight), ref.forward(w, False), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Errors


class Plain(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.weight = self.create_parameter([3, 4])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(coeff=0.0), ValueError, "coeff"),
        (dict(coeff=-1.0), ValueError, "coeff"),
        (dict(coeff=float("inf")), ValueError, "coeff"),
        (dict(atol=-1e-3), ValueError, "atol"),
        (dict(rtol="1e-3"), ValueError, "rtol"),
        (dict(max_iterations=0), ValueError, "max_iterations"),
        (dict(atol=1e-3, n_power_iterations=5, max_iterations=3), ValueError, "max_iterations"),
        (dict(num_svs=0), ValueError, "num_svs"),
        (dict(num_svs=2.0), ValueError, "num_svs"),
        (dict(track_sigma=1), ValueError, "track_sigma"),
    ],
)
def test_bad_feature_arguments_leave_the_layer_unchanged(kwargs, error, match):
    layer = Plain()
    before = {k: npy(v) for k, v in layer.state_dict().items()}
    with pytest.raises(error, match=match):
        dsn.spectral_norm(layer, **kwargs)
    after = {k: npy(v) for k, v in layer.state_dict().items()}
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)
    assert not layer._forward_pre_hooks and not layer._buffers
    # the manual_seed stream is not consumed by a failed call
    dualsn.manual_seed(0)
    first = spec.next_seed()
    dualsn.manual_seed(0)
    with pytest.raises(error):
        dsn.spectral_norm(Plain(), **kwargs)
    assert spec.next_seed() == first


# ---------------------------------------------------------------------------------------------
# spectral_norm_conv: the operator norm of the convolution


def explicit_conv_matrix(layer, weight: np.ndarray, input_shape) -> np.ndarray:
    """The convolution of one sample (no bias) as a matrix: the layer's own conv applied to
    every basis vector of the input space (channels first, as input_shape), with ``weight``
    as its kernel."""
    n = int(np.prod(input_shape))
    basis = np.eye(n).reshape(n, *input_shape)
    g = layer._conv_args
    channel_last = g["kwargs"]["data_format"] in ("NLC", "NHWC", "NDHWC")
    if channel_last:
        basis = np.moveaxis(basis, 1, -1)
    out = npy(g["fn"](paddle.to_tensor(basis), paddle.to_tensor(weight), None, **g["kwargs"]))
    if channel_last:
        out = np.moveaxis(out, -1, 1)
    return out.reshape(n, -1).T


def conv_layer(cls, input_shape, **kwargs):
    """A float64 conv layer with a kernel drawn from a fixed seed, and the arguments of its own
    forward (for explicit matrices)."""
    paddle.set_default_dtype(F64)
    try:
        layer = cls(**kwargs)
    finally:
        paddle.set_default_dtype("float32")
    layer.weight.set_value(np.random.default_rng(sum(input_shape)).standard_normal(layer.weight.shape))
    fn = {paddle.nn.Conv1D: paddle.nn.functional.conv1d, paddle.nn.Conv2D: paddle.nn.functional.conv2d,
          paddle.nn.Conv3D: paddle.nn.functional.conv3d}[cls]
    layer._conv_args = dict(fn=fn, kwargs=dict(
        stride=layer._stride, padding=layer._padding, dilation=layer._dilation, groups=layer._groups,
        data_format=layer._data_format,
    ))
    return layer


CONVS = [
    # (class, input_shape (channels first), layer kwargs)
    (paddle.nn.Conv1D, (2, 11), dict(in_channels=2, out_channels=3, kernel_size=4, stride=3, padding=[1, 2])),
    (paddle.nn.Conv2D, (2, 7, 6), dict(in_channels=2, out_channels=3, kernel_size=3, stride=2, padding=1)),
    (paddle.nn.Conv2D, (4, 6, 5), dict(in_channels=4, out_channels=2, kernel_size=3, dilation=2, groups=2,
                                       padding=2)),
    (paddle.nn.Conv2D, (2, 8, 7), dict(in_channels=2, out_channels=3, kernel_size=3, stride=2, padding="SAME")),
    (paddle.nn.Conv2D, (1, 6, 6), dict(in_channels=1, out_channels=2, kernel_size=3, dilation=2, padding="same")),
    (paddle.nn.Conv2D, (3, 5, 6), dict(in_channels=3, out_channels=2, kernel_size=(2, 3), padding="VALID",
                                       stride=(1, 2))),
    (paddle.nn.Conv3D, (1, 3, 4, 5), dict(in_channels=1, out_channels=2, kernel_size=2, stride=2, padding=[0, 1, 1, 0, 0, 1])),
]
CONV_IDS = ["1d-asym", "2d-stride", "2d-dilated-groups", "2d-SAME-stride", "2d-same-dilated", "2d-valid", "3d"]


def nhwc_case():
    """A channel-last Conv2D: input_shape stays channels first."""
    layer = conv_layer(paddle.nn.Conv2D, (2, 5, 5), in_channels=2, out_channels=3, kernel_size=3, padding=1,
                       data_format="NHWC")
    return layer


@pytest.mark.parametrize("cls, input_shape, kwargs", CONVS, ids=CONV_IDS)
def test_conv_steps_equal_reference_on_the_explicit_matrix(cls, input_shape, kwargs):
    """The power iteration, the normalized kernel and sigma, forward by forward, are
    numpy_ref.ReferenceSN's on the explicit convolution matrix (u0, v0: init_uv, flattened)."""
    layer = conv_layer(cls, input_shape, **kwargs)
    w = npy(layer.weight)
    m = explicit_conv_matrix(layer, w, input_shape)
    sp = spec.conv_spec(coeff=1.5, num_svs=2)
    dsn.spectral_norm_conv(layer, input_shape, coeff=1.5, num_svs=2, seed=9)
    hook = dsn.get_spectral_norm(layer)
    assert tuple(layer.weight_v.shape) == tuple(input_shape)
    assert tuple(layer.weight_u.shape) == hook.output_shape and m.shape[0] == np.prod(hook.output_shape)
    u0, v0 = spec.init_uv(*m.shape, 9, F64, sp.eps)
    eu, ev = spec.init_extra_uv(*m.shape, 1, 9, F64, sp.eps)
    ref = numpy_ref.ReferenceSN(m, 0, sp, u0, v0, extra_u0=eu, extra_v0=ev)
    x = paddle.randn([1, *input_shape], dtype=F64)
    for training in (True, True, False, True):
        layer.train() if training else layer.eval()
        layer(x)
        ref.forward(m, training)
        expected_sigma = ref.sigma(m)
        np.testing.assert_allclose(npy(layer.weight_u).ravel(), ref.u, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(npy(layer.weight_v).ravel(), ref.v, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(npy(layer.weight_u_extra).reshape(1, -1), ref.extra_u, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(npy(layer.weight_v_extra).reshape(1, -1), ref.extra_v, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(npy(layer.weight), w / sp.divisor(expected_sigma), rtol=1e-11)
        assert dsn.sigma(layer) == pytest.approx(expected_sigma, rel=1e-11)
        np.testing.assert_allclose(dsn.singular_values(layer), ref.singular_values(m), rtol=1e-9)


@pytest.mark.parametrize("case", range(len(CONVS) + 1), ids=CONV_IDS + ["2d-NHWC"])
def test_conv_sigma_converges_to_the_operator_norm(case):
    """After enough iterations sigma is the largest singular value of the explicit matrix,
    and with coeff the normalized convolution's operator norm is coeff."""
    if case < len(CONVS):
        cls, input_shape, kwargs = CONVS[case]
        layer = conv_layer(cls, input_shape, **kwargs)
    else:
        layer, input_shape = nhwc_case(), (2, 5, 5)
    w = npy(layer.weight)
    exact = np.linalg.svd(explicit_conv_matrix(layer, w, input_shape), compute_uv=False)
    coeff = exact[0] / 2
    dsn.spectral_norm_conv(layer, input_shape, seed=1, coeff=coeff, rtol=1e-14, atol=0.0, max_iterations=5000)
    layer.train()
    channels_last = [0, 2, 3, 1] if case == len(CONVS) else None
    x = paddle.randn([1, *input_shape], dtype=F64)
    layer(x.transpose(channels_last) if channels_last else x)
    assert dsn.sigma(layer) == pytest.approx(exact[0], rel=1e-8)
    normalized = explicit_conv_matrix(layer, npy(layer.weight), input_shape)
    assert np.linalg.svd(normalized, compute_uv=False)[0] == pytest.approx(coeff, rel=1e-8)


def test_reshaped_kernel_sigma_is_not_the_operator_norm():
    """Why spectral_norm_conv exists: the kernel's reshaped-matrix sigma differs from the
    convolution's operator norm."""
    cls, input_shape, kwargs = CONVS[1]
    layer = conv_layer(cls, input_shape, **kwargs)
    w = npy(layer.weight)
    operator_norm = np.linalg.svd(explicit_conv_matrix(layer, w, input_shape), compute_uv=False)[0]
    kernel_norm = np.linalg.norm(w.reshape(w.shape[0], -1), 2)
    assert abs(operator_norm - kernel_norm) > 0.05 * kernel_norm


@pytest.mark.parametrize("active", [True, False])
def test_conv_gradient_equals_reference(active):
    """dL/dW = (coeff G - <W_sn, G> dsigma/dW) / sigma with dsigma/dW_k = u^T M(E_k) v (sigma is
    linear in the kernel), or G where the bound is inactive."""
    cls, input_shape, kwargs = CONVS[2]
    layer = conv_layer(cls, input_shape, **kwargs)
    w = npy(layer.weight)
    exact = np.linalg.svd(explicit_conv_matrix(layer, w, input_shape), compute_uv=False)[0]
    coeff = exact / 2 if active else exact * 2
    dsn.spectral_norm_conv(layer, input_shape, n_power_iterations=3, coeff=coeff, seed=2)
    rng = np.random.default_rng(15)
    g = rng.standard_normal(w.shape)
    layer.train()
    layer(paddle.randn([1, *input_shape], dtype=F64))
    out = layer.weight
    (paddle.to_tensor(g) * out).sum().backward()
    u, v = npy(layer.weight_u).ravel(), npy(layer.weight_v).ravel()
    basis = np.eye(w.size).reshape(w.size, *w.shape)
    dsigma = np.array([u @ explicit_conv_matrix(layer, e, input_shape) @ v for e in basis]).reshape(w.shape)
    sigma = u @ explicit_conv_matrix(layer, w, input_shape) @ v
    if active:
        w_sn = w * coeff / sigma
        expected = (coeff * g - np.sum(w_sn * g) * dsigma) / sigma
    else:
        expected = g
    np.testing.assert_allclose(npy(layer.weight_orig.grad), expected, rtol=1e-9, atol=1e-12)


def test_conv_remove_and_state():
    cls, input_shape, kwargs = CONVS[1]
    layer = conv_layer(cls, input_shape, **kwargs)
    w = npy(layer.weight)
    dsn.spectral_norm_conv(layer, input_shape, seed=4, track_sigma=True)
    assert set(layer.state_dict()) == {"weight_orig", "bias", "weight_u", "weight_v", "weight_sigma"}
    x = paddle.randn([1, *input_shape], dtype=F64)
    for _ in range(3):
        layer(x)
    s = dsn.sigma(layer)
    assert float(layer.weight_sigma) == pytest.approx(s, rel=1e-12)
    expected = w / s
    dsn.remove_spectral_norm(layer)
    assert set(layer.state_dict()) == {"weight", "bias"}
    np.testing.assert_allclose(npy(layer.weight), expected, rtol=1e-12)
    assert not layer.weight.stop_gradient
    with pytest.raises(ValueError, match="not found"):
        dsn.sigma(layer)


def test_conv_seed_and_unseeded_draws():
    cls, input_shape, kwargs = CONVS[0]
    layer = conv_layer(cls, input_shape, **kwargs)
    dsn.spectral_norm_conv(layer, input_shape, seed=8)
    hook = dsn.get_spectral_norm(layer)
    u0, v0 = spec.init_uv(int(np.prod(hook.output_shape)), int(np.prod(input_shape)), 8, F64)
    m = explicit_conv_matrix(layer, npy(layer.weight_orig), input_shape)
    ref = numpy_ref.ReferenceSN(m, 0, spec.conv_spec(), u0, v0, training=True, seed=8)  # the warm-up
    np.testing.assert_allclose(npy(layer.weight_u).ravel(), ref.u, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(npy(layer.weight_v).ravel(), ref.v, rtol=1e-10, atol=1e-13)
    sigma_exact = np.linalg.svd(m, compute_uv=False)[0]
    assert dsn.sigma(layer) == pytest.approx(sigma_exact, rel=1e-2)  # right from registration
    paddle.seed(0)
    other = dsn.spectral_norm_conv(conv_layer(cls, input_shape, **kwargs), input_shape)
    assert np.linalg.norm(npy(other.weight_v)) == pytest.approx(1.0)
    assert "SpectralNormConvHook" in repr(dsn.get_spectral_norm(other))


def test_conv_float32_layer_default_dtype():
    layer = paddle.nn.Conv2D(2, 4, 3, padding=1)
    dsn.spectral_norm_conv(layer, [2, 6, 6], seed=0, rtol=1e-6)
    out = layer(paddle.randn([3, 2, 6, 6]))
    assert out.shape == [3, 4, 6, 6] and layer.weight.dtype == paddle.float32
    assert dsn.get_spectral_norm(layer).last_iterations >= 2


@pytest.mark.parametrize(
    "make, input_shape, error, match",
    [
        (lambda: paddle.nn.Linear(3, 4), (3,), TypeError, "Conv1D, Conv2D or Conv3D"),
        (lambda: paddle.nn.Conv2DTranspose(2, 3, 3), (2, 5, 5), TypeError, "Conv1D, Conv2D or Conv3D"),
        (lambda: paddle.nn.Conv2D(2, 3, 3), (3, 5, 5), ValueError, "input_shape"),
        (lambda: paddle.nn.Conv2D(2, 3, 3), (2, 5), ValueError, "input_shape"),
        (lambda: paddle.nn.Conv2D(2, 3, 3), (2, 5, 0), ValueError, "input_shape"),
        (lambda: paddle.nn.Conv2D(2, 3, 3), "2x5x5", ValueError, "input_shape"),
        (lambda: paddle.nn.Conv2D(2, 3, 3, dilation=2), (2, 4, 9), ValueError, "large enough"),
        (lambda: paddle.nn.Conv2D(2, 3, 3, padding=1, padding_mode="reflect"), (2, 5, 5), NotImplementedError,
         "padding_mode"),
    ],
)
def test_conv_errors_leave_the_layer_unchanged(make, input_shape, error, match):
    layer = make()
    keys = list(layer.state_dict())
    with pytest.raises(error, match=match):
        dsn.spectral_norm_conv(layer, input_shape, seed=0)
    assert list(layer.state_dict()) == keys and not layer._forward_pre_hooks and not layer._buffers


def test_conv_second_registration_and_coeff_errors():
    layer = dsn.spectral_norm_conv(paddle.nn.Conv1D(2, 3, 3), (2, 8), seed=0)
    with pytest.raises(RuntimeError, match="two"):
        dsn.spectral_norm_conv(layer, (2, 8))
    with pytest.raises(ValueError, match="coeff"):
        dsn.spectral_norm_conv(paddle.nn.Conv1D(2, 3, 3), (2, 8), coeff=-2.0)


# ---------------------------------------------------------------------------------------------
# Static graphs


def test_to_static_eval_with_coeff_matches_dygraph():
    paddle.seed(0)
    model = paddle.nn.Sequential(dsn.spectral_norm(paddle.nn.Linear(6, 5), coeff=0.3, seed=1))
    x = paddle.randn([2, 6])
    model(x)
    model.eval()
    expected = npy(model(x))
    static = paddle.jit.to_static(model, full_graph=True)
    np.testing.assert_allclose(npy(static(x)), expected, rtol=1e-6)


def test_to_static_training_with_tolerance_is_refused():
    """The iteration count is host-side: a static graph cannot run it, and says so."""
    paddle.seed(0)
    model = paddle.nn.Sequential(dsn.spectral_norm(paddle.nn.Linear(6, 5), rtol=1e-4, seed=1))
    static = paddle.jit.to_static(model, full_graph=True)
    with pytest.raises(NotImplementedError, match="dynamic mode"):
        static(paddle.randn([2, 6]))


# ---------------------------------------------------------------------------------------------
# Copies and checkpoints carry every feature's state


def test_deepcopy_and_checkpoint_of_a_conv_with_features(tmp_path):
    import copy

    cls, input_shape, kwargs = CONVS[1]
    layer = conv_layer(cls, input_shape, **kwargs)
    dsn.spectral_norm_conv(layer, input_shape, seed=0, num_svs=2, track_sigma=True, coeff=0.5, rtol=1e-8)
    x = paddle.randn([1, *input_shape], dtype=F64)
    layer(x)
    twin = copy.deepcopy(layer)
    for m in (layer, twin):
        m(x)
    np.testing.assert_array_equal(npy(twin.weight), npy(layer.weight))
    assert dsn.singular_values(twin) == dsn.singular_values(layer)
    paddle.save(layer.state_dict(), str(tmp_path / "sn.pdparams"))
    fresh = dsn.spectral_norm_conv(conv_layer(cls, input_shape, **kwargs), input_shape, seed=5, num_svs=2,
                                   track_sigma=True, coeff=0.5, rtol=1e-8)
    missing, unexpected = fresh.set_state_dict(paddle.load(str(tmp_path / "sn.pdparams")))
    assert not missing and not unexpected
    assert dsn.singular_values(fresh) == pytest.approx(dsn.singular_values(layer), rel=1e-12)
    assert float(fresh.weight_sigma) == float(layer.weight_sigma)
