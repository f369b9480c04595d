"""dualsn.torch's Lipschitz toolkit against exact numbers: the numpy reference in dualsn.spec
(step by step), exact SVDs, and explicit convolution matrices.

Features: ``coeff`` (soft bound), ``atol``/``rtol`` (iterate until sigma settles), ``num_svs``
(several singular values), ``track_sigma`` (sigma in the state dict) and the kept sigma read
by ``sigma()``, and ``spectral_norm_conv`` (the operator norm of a convolution).
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils import parametrizations as builtin_param  # noqa: E402

import dualsn  # noqa: E402
import dualsn.torch as dt  # noqa: E402
from dualsn import spec  # noqa: E402
from dualsn import reference as numpy_ref  # noqa: E402
from _numeric import random_array  # noqa: E402

PRESETS = tuple(spec.PRESETS)


# ---------------------------------------------------------------------------------------------
# Helpers


class Holder(nn.Module):
    """A module whose only parameter is ``weight``: lets a test pick any shape and dtype."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(torch.as_tensor(weight).clone())


def with_singular_values(shape, dim, values, dtype=np.float64, seed=0):
    """A weight whose W-matrix has exactly the singular values ``values`` (then smaller ones,
    halving), with random singular vectors."""
    h, w = spec.matrix_shape(shape, dim)
    r = min(h, w)
    s = list(values)[:r]
    while len(s) < r:
        s.append(s[-1] / 2)
    q1, _ = np.linalg.qr(random_array((h, h), dtype, seed))
    q2, _ = np.linalg.qr(random_array((w, w), dtype, seed + 1))
    mat = (q1[:, :r] * np.asarray(s)) @ q2[:, :r].conj().T
    return spec.from_matrix(mat.astype(dtype), shape, dim)


def np_(t):
    return None if t is None else t.detach().numpy().copy()


def state(module, name="weight"):
    """(unnormalized weight, SpectralNorm) of a dualsn-normalized module."""
    return module.parametrizations[name].original, dt.get_spectral_norm(module, name)


def reference(w_np, dim, sp, seed, training=True):
    """numpy_ref.ReferenceSN started from the seeded draw dualsn uses."""
    if sp.is_exact_vector(w_np.ndim):
        return numpy_ref.ReferenceSN(w_np, dim, sp, training=training)
    h, w = spec.matrix_shape(w_np.shape, dim)
    u0, v0 = spec.init_uv(h, w, seed, w_np.dtype, sp.eps)
    extra = {}
    if sp.num_svs > 1:
        eu, ev = spec.init_extra_uv(h, w, sp.num_svs - 1, seed, w_np.dtype, sp.eps)
        extra = {"extra_u0": eu, "extra_v0": ev}
    return numpy_ref.ReferenceSN(w_np, dim, sp, u0, v0, training=training, **extra)


def assert_state_equals_reference(sn, ref, rtol=1e-12):
    """u, v and the extra pairs of ``sn`` equal the reference's (reshaped flat for convs)."""
    if ref.u is None:
        assert sn._u is None
        return
    np.testing.assert_allclose(np_(sn._u).reshape(-1), ref.u, rtol=rtol, atol=1e-14)
    np.testing.assert_allclose(np_(sn._v).reshape(-1), ref.v, rtol=rtol, atol=1e-14)
    if ref.extra_u is not None:
        k = ref.extra_u.shape[0]
        np.testing.assert_allclose(np_(sn._u_extra).reshape(k, -1), ref.extra_u, rtol=rtol * 100, atol=1e-12)
        np.testing.assert_allclose(np_(sn._v_extra).reshape(k, -1), ref.extra_v, rtol=rtol * 100, atol=1e-12)


def snapshot(module):
    return (
        type(module),
        hasattr(module, "parametrizations"),
        {k: v.clone() for k, v in module.state_dict().items()},
        [id(p) for p in module.parameters()],
    )


def assert_same_snapshot(a, b):
    assert a[0] is b[0] and a[1] == b[1] and a[3] == b[3]
    assert list(a[2]) == list(b[2])
    for k in a[2]:
        assert torch.equal(a[2][k], b[2][k])


@pytest.fixture(autouse=True)
def no_manual_seed():
    dualsn.manual_seed(None)
    yield
    dualsn.manual_seed(None)


# Shapes and dims covering the three layouts of WeightMatrix (dim 0; dim last; dim in between).
SHAPES = [((6, 5), 0), ((3, 4, 2, 2), 1), ((3, 2, 5), -1)]


# ---------------------------------------------------------------------------------------------
# 1. coeff: W / max(1, sigma / coeff)


@pytest.mark.parametrize("compat", PRESETS)
@pytest.mark.parametrize("shape, dim", SHAPES)
def test_coeff_active_bounds_the_spectral_norm_at_coeff(compat, shape, dim):
    """Converged, the normalized weight's largest singular value is exactly coeff, while
    sigma() still reports the weight's own."""
    w_np = with_singular_values(shape, dim, [3.0, 1.5, 1.0], seed=1)
    m = dt.spectral_norm(Holder(w_np), dim=dim, compat=compat, coeff=0.8, seed=2)
    original, sn = state(m)
    sn.iterate(original, 100)
    m.eval()
    top = np.linalg.svd(spec.to_matrix(np_(m.weight), spec.canonical_dim(dim, len(shape))), compute_uv=False)[0]
    assert top == pytest.approx(0.8, rel=1e-12)
    assert dt.sigma(m) == pytest.approx(3.0, rel=1e-12)


@pytest.mark.parametrize("compat", PRESETS)
@pytest.mark.parametrize("shape, dim", SHAPES + [((6,), 0)])
def test_coeff_inactive_leaves_weight_and_gradient_unchanged(compat, shape, dim):
    """sigma <= coeff: the normalized weight is W itself, and the gradient passes through."""
    w_np = random_array(shape, seed=4)
    m = dt.spectral_norm(Holder(w_np), dim=dim, compat=compat, coeff=100.0, seed=2)
    original, _ = state(m)
    for training in (True, False):
        m.train(training)
        w_sn = m.weight
        assert torch.equal(w_sn, original)
        original.grad = None
        g = torch.from_numpy(random_array(shape, seed=5))
        (g * w_sn).sum().backward()
        assert torch.equal(original.grad, g)


@pytest.mark.parametrize("compat", PRESETS)
@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
@pytest.mark.parametrize("shape, dim", SHAPES + [((6,), 0)])
@pytest.mark.parametrize("active", [True, False])
@pytest.mark.parametrize("tensor_scalars", [False, True])
def test_coeff_forward_and_gradient_equal_reference(compat, dtype, shape, dim, active, tensor_scalars, monkeypatch):
    """Training forwards, then an eval one: the normalized weight and dL/dW equal the
    reference's (numpy_ref.normalized_weight_grad, coeff-aware), bound active or not.

    ``tensor_scalars`` forces the gradient path used off the CPU (no .item())."""
    if tensor_scalars:
        monkeypatch.setattr(dt._dtypes, "_is_compiling", lambda: True)
    w_np = random_array(shape, dtype, seed=6)
    top = np.linalg.svd(spec.to_matrix(w_np, spec.canonical_dim(dim, len(shape))), compute_uv=False)[0]
    coeff = float(top * (0.5 if active else 2.0))
    sp = spec.make_spec(compat, n_power_iterations=2, coeff=coeff)
    m = dt.spectral_norm(Holder(w_np), n_power_iterations=2, dim=dim, compat=compat, coeff=coeff, seed=7)
    ref = reference(w_np, dim, sp, 7)
    original, sn = state(m)
    for step, training in enumerate((True, True, False)):
        m.train(training)
        w_sn = m.weight
        expected = ref.forward(w_np, training)
        np.testing.assert_allclose(np_(w_sn), expected, rtol=1e-12, atol=1e-15)
        assert (np.real(ref.sigma(w_np)) > coeff) == active
        g_np = random_array(shape, dtype, seed=10 + step)
        original.grad = None
        (torch.from_numpy(g_np).conj() * w_sn).real.sum().backward()
        np.testing.assert_allclose(np_(original.grad), ref.weight_grad(g_np, w_np), rtol=1e-10, atol=1e-13)
        assert_state_equals_reference(sn, ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("active", [True, False])
def test_coeff_double_backward(dtype, active):
    """create_graph=True with coeff: gradcheck, gradgradcheck, and the Hessian-vector product
    of the unfused expression W / where(Re sigma > coeff, sigma / coeff, 1)."""
    torch.manual_seed(0)
    shape, dim = (2, 3, 2), 1
    weight = torch.randn(shape, dtype=dtype, requires_grad=True)
    mat = weight.detach().permute(1, 0, 2).reshape(3, -1)
    left, s, right = torch.linalg.svd(mat)
    # near the top singular vectors, so Re(sigma) > 0 and the bound's side is clear
    u = F.normalize(left[:, 0] + 0.1 * torch.randn(3, dtype=dtype), dim=0)
    v = F.normalize(right[0].conj() + 0.1 * torch.randn(4, dtype=dtype), dim=0)
    sigma = torch.vdot(u, mat @ v)
    coeff = float(sigma.real) * (0.5 if active else 2.0)
    sp = spec.make_spec("torch", coeff=coeff)

    def fused(x):
        return dt.spectral_norm_forward(x, u, v, dim, sp, training=False)

    def plain(x):
        s_x = torch.vdot(u, x.permute(1, 0, 2).reshape(3, -1) @ v)
        return x / torch.where(s_x.real > coeff, s_x / coeff, torch.ones_like(s_x))

    assert torch.autograd.gradcheck(fused, (weight,))
    assert torch.autograd.gradgradcheck(fused, (weight,))
    g, t = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    hvps = []
    for f in (fused, plain):
        (gw,) = torch.autograd.grad((g.conj() * f(weight)).real.sum(), weight, create_graph=True)
        hvps.append(torch.autograd.grad((t.conj() * gw).real.sum(), weight)[0])
    torch.testing.assert_close(hvps[0], hvps[1], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# 2. atol / rtol: iterate until sigma settles


TOLERANCES = [{"atol": 1e-9}, {"rtol": 1e-10}, {"atol": 1e-12, "rtol": 1e-8}]


@pytest.mark.parametrize("compat", PRESETS)
@pytest.mark.parametrize("tolerance", TOLERANCES)
@pytest.mark.parametrize("n_iter", [1, 3])
@pytest.mark.parametrize("num_svs", [1, 3])
@pytest.mark.parametrize("shape, dim", [((6, 5), 0), ((3, 4, 2, 2), 1)])
def test_tolerance_iteration_counts_and_state_equal_reference(compat, tolerance, n_iter, num_svs, shape, dim):
    """Each training forward runs as many iterations as the reference (``last_iterations``)
    and leaves the same u, v (extra pairs included); eval forwards run none."""
    sp = spec.make_spec(compat, n_iter, **tolerance, num_svs=num_svs)
    w_np = with_singular_values(shape, dim, [3.0, 2.6, 2.0, 1.0], seed=8)
    m = dt.spectral_norm(
        Holder(w_np), n_power_iterations=n_iter, dim=dim, compat=compat, seed=9, num_svs=num_svs, **tolerance
    )
    ref = reference(w_np, dim, sp, 9)
    original, sn = state(m)
    counts = []
    for _ in range(4):
        np.testing.assert_allclose(np_(m.weight), ref.forward(w_np, True), rtol=1e-12)
        assert sn.last_iterations == ref.last_iterations
        counts.append(sn.last_iterations)
        assert_state_equals_reference(sn, ref)
    # the tolerance stopped where a fixed count would not have
    assert max(counts) > max(2, n_iter) and all(c >= max(2, n_iter) for c in counts)
    m.eval()
    u_before = sn._u.clone()
    np.testing.assert_allclose(np_(m.weight), ref.forward(w_np, False), rtol=1e-12)
    assert sn.last_iterations == 0 and torch.equal(sn._u, u_before)


@pytest.mark.parametrize("compat", PRESETS)
def test_tolerance_stops_at_max_iterations(compat):
    """Two nearly equal top singular values: the estimate does not settle within
    max_iterations, which caps the count, as in the reference."""
    w_np = with_singular_values((5, 4), 0, [1.0, 0.999, 0.5], seed=3)
    sp = spec.make_spec(compat, 1, rtol=1e-15, max_iterations=5)
    m = dt.spectral_norm(Holder(w_np), compat=compat, rtol=1e-15, max_iterations=5, seed=4)
    ref = reference(w_np, 0, sp, 4)
    original, sn = state(m)
    for _ in range(3):
        m.weight
        ref.forward(w_np, True)
        assert sn.last_iterations == ref.last_iterations == 5
        assert_state_equals_reference(sn, ref)


# ---------------------------------------------------------------------------------------------
# 3. track_sigma, and the sigma that sigma() reads


@pytest.mark.parametrize("compat", PRESETS)
@pytest.mark.parametrize("shape, dim", [((6, 5), 0), ((6,), 0)])
def test_track_sigma_buffer(compat, shape, dim):
    """``_sigma`` is in the state dict (parametrizations.weight.0._sigma), equals the
    reference's sigma after registration and every forward, and survives a state-dict trip."""
    w_np = random_array(shape, seed=11)
    sp = spec.make_spec(compat, 2)
    m = dt.spectral_norm(Holder(w_np), n_power_iterations=2, dim=dim, compat=compat, seed=12, track_sigma=True)
    ref = reference(w_np, dim, sp, 12)
    original, sn = state(m)
    key = "parametrizations.weight.0._sigma"
    assert key in m.state_dict()
    assert float(m.state_dict()[key]) == pytest.approx(float(np.real(ref.sigma(w_np))), rel=1e-13)
    for training in (True, True, False):
        m.train(training)
        m.weight
        ref.forward(w_np, training)
        expected = float(np.real(ref.sigma(w_np)))
        assert float(sn._sigma) == pytest.approx(expected, rel=1e-13)
        assert dt.sigma(m) == pytest.approx(expected, rel=1e-13)
    saved = io.BytesIO()
    torch.save(m.state_dict(), saved)
    other = dt.spectral_norm(
        Holder(np.zeros(shape)), n_power_iterations=2, dim=dim, compat=compat, seed=1, track_sigma=True
    )
    other.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    assert torch.equal(state(other)[1]._sigma, sn._sigma)


def test_no_track_sigma_keeps_the_builtin_state_dict():
    """Without track_sigma no new key: the state dict is the torch built-in's."""
    torch.manual_seed(0)
    ours = dt.spectral_norm(nn.Linear(5, 4), coeff=2.0, atol=1e-6)
    theirs = builtin_param.spectral_norm(nn.Linear(5, 4))
    assert list(ours.state_dict()) == list(theirs.state_dict())


def test_sigma_reads_the_kept_value_and_sees_every_change(monkeypatch):
    """After the first sigma() read, forwards keep their sigma and sigma() returns it without
    a product; a change to W (tracked, or through .data) or to u, v makes it compute again."""
    w_np = random_array((6, 5), seed=13)
    m = dt.spectral_norm(Holder(w_np), seed=14)
    original, sn = state(m)
    m.weight
    assert sn._record is None  # nothing kept until sigma() is read: training forwards stay lean
    calls = []
    compute = sn._sigma_of
    monkeypatch.setattr(sn, "_sigma_of", lambda w: calls.append(1) or compute(w))

    def expected():
        return float(numpy_ref.sigma(np_(original), np_(sn._u), np_(sn._v)))

    assert dt.sigma(m) == pytest.approx(expected(), rel=1e-13) and len(calls) == 1
    m.weight  # training forward: keeps its sigma
    assert sn.last_sigma is not None
    assert dt.sigma(m) == pytest.approx(expected(), rel=1e-13) and len(calls) == 1
    assert dt.sigma(m) == float(sn.last_sigma)
    with torch.no_grad():
        original.mul_(2.0)  # tracked by the version counter
    assert dt.sigma(m) == pytest.approx(expected(), rel=1e-13) and len(calls) == 2
    original.data.mul_(0.5)  # not tracked: found by the sampled values
    assert dt.sigma(m) == pytest.approx(expected(), rel=1e-13) and len(calls) == 3
    sn.iterate(original, 1)  # u, v change
    assert dt.sigma(m) == pytest.approx(expected(), rel=1e-13) and len(calls) == 4
    m.eval()
    m.weight  # eval forward: sigma kept in the eval cache
    assert dt.sigma(m) == pytest.approx(expected(), rel=1e-13) and len(calls) == 5


# ---------------------------------------------------------------------------------------------
# 4. num_svs: several singular values


@pytest.mark.parametrize("compat", PRESETS)
@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
@pytest.mark.parametrize("shape, dim", SHAPES)
def test_num_svs_converges_to_the_top_singular_values(compat, dtype, shape, dim):
    w_np = with_singular_values(shape, dim, [4.0, 3.0, 2.0, 1.0], dtype, seed=15)
    m = dt.spectral_norm(Holder(w_np), dim=dim, compat=compat, num_svs=3, seed=16)
    original, sn = state(m)
    sn.iterate(original, 150)
    exact = np.linalg.svd(spec.to_matrix(w_np, spec.canonical_dim(dim, len(shape))), compute_uv=False)
    np.testing.assert_allclose(dt.singular_values(m), exact[:3], rtol=1e-10)


@pytest.mark.parametrize("compat", PRESETS)
@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
@pytest.mark.parametrize("shape, dim", SHAPES)
@pytest.mark.parametrize("train_at_registration", [True, False])
def test_num_svs_equals_reference_step_by_step(compat, dtype, shape, dim, train_at_registration):
    """Extra pairs drawn by spec.init_extra_uv from the same seed and iterated with
    Gram-Schmidt exactly as numpy_ref.power_step; the normalized weight is num_svs=1's."""
    sp = spec.make_spec(compat, 2, num_svs=3)
    w_np = random_array(shape, dtype, seed=17)
    kwargs = {"n_power_iterations": 2, "dim": dim, "compat": compat, "seed": 18}
    m = dt.spectral_norm(Holder(w_np).train(train_at_registration), num_svs=3, **kwargs)
    single = dt.spectral_norm(Holder(w_np).train(train_at_registration), **kwargs)
    ref = reference(w_np, dim, sp, 18, training=train_at_registration)
    original, sn = state(m)
    h, w = spec.matrix_shape(shape, dim)
    assert sn._u_extra.shape == (2, h) and sn._v_extra.shape == (2, w)
    assert_state_equals_reference(sn, ref)
    for training in (True, True, False):
        m.train(training)
        single.train(training)
        w_sn = m.weight
        np.testing.assert_allclose(np_(w_sn), ref.forward(w_np, training), rtol=1e-12)
        assert torch.equal(w_sn, single.weight)  # pair 0 is the plain iteration
        assert_state_equals_reference(sn, ref)
        np.testing.assert_allclose(dt.singular_values(m), np.real(ref.singular_values(w_np)), rtol=1e-10, atol=1e-13)
    assert dt.singular_values(single) == [dt.sigma(single)]


def test_num_svs_unseeded_draws_u_v_like_the_builtin():
    """Without a seed u, v are the torch built-in's draw; the extra pairs are drawn after them
    (unit rows), updated in place, and kept float32 for half-precision weights."""
    torch.manual_seed(0)
    theirs = builtin_param.spectral_norm(nn.Linear(5, 4).double())
    torch.manual_seed(0)
    ours = dt.spectral_norm(nn.Linear(5, 4).double(), num_svs=3)
    _, sn = state(ours)
    builtin = theirs.parametrizations.weight[0]
    assert torch.equal(sn._u, builtin._u) and torch.equal(sn._v, builtin._v)
    torch.testing.assert_close(torch.linalg.vector_norm(sn._u_extra, dim=1), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(torch.linalg.vector_norm(sn._v_extra, dim=1), torch.ones(2, dtype=torch.float64))
    pointers = (sn._u_extra.data_ptr(), sn._v_extra.data_ptr())
    before = sn._u_extra.clone()
    ours(torch.randn(2, 5, dtype=torch.float64))
    assert (sn._u_extra.data_ptr(), sn._v_extra.data_ptr()) == pointers
    assert not torch.equal(sn._u_extra, before)
    ours.to(torch.bfloat16)
    assert sn._u_extra.dtype == sn._v_extra.dtype == torch.float32
    ours(torch.randn(2, 5).to(torch.bfloat16))
    assert len(dt.singular_values(ours)) == 3


def test_num_svs_on_an_exactly_normalized_vector():
    """A 1-D weight normalized exactly has no u, v: one singular value, its norm."""
    w = random_array((6,), seed=19)
    m = dt.spectral_norm(Holder(w), num_svs=3, track_sigma=True)
    assert not any("extra" in k for k in m.state_dict())
    assert dt.singular_values(m) == pytest.approx([np.linalg.norm(w)], rel=1e-14)


def test_features_survive_deepcopy_and_pickle():
    torch.manual_seed(0)
    m = dt.spectral_norm(nn.Linear(5, 4).double(), coeff=0.5, rtol=1e-6, num_svs=2, track_sigma=True, seed=1)
    m(torch.randn(3, 5, dtype=torch.float64))
    for other in (copy.deepcopy(m), torch.load(io.BytesIO(_saved(m)), weights_only=False)):
        assert other.state_dict().keys() == m.state_dict().keys()
        for k, t in m.state_dict().items():
            assert torch.equal(other.state_dict()[k], t)
        x = torch.randn(3, 5, dtype=torch.float64)
        torch.testing.assert_close(other(x), copy.deepcopy(m)(x), rtol=0, atol=0)


def _saved(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# 5. spectral_norm_conv: the operator norm of the convolution


CONVS = {
    "1d stride 2 pad 1": (lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1), (2, 9)),
    "2d pad 1": (lambda: nn.Conv2d(2, 3, 3, padding=1), (2, 5, 5)),
    "2d stride 2, input not fitting": (lambda: nn.Conv2d(2, 4, 3, stride=2), (2, 7, 6)),
    "2d dilation 2": (lambda: nn.Conv2d(2, 2, 3, dilation=2, padding=2), (2, 6, 5)),
    "2d groups 2": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (4, 6, 5)),
    "2d same, even kernel": (lambda: nn.Conv2d(2, 3, (2, 4), padding="same"), (2, 5, 6)),
    "2d valid": (lambda: nn.Conv2d(1, 2, 2, padding="valid"), (1, 4, 4)),
    "2d mixed stride/padding": (lambda: nn.Conv2d(2, 3, (3, 2), stride=(2, 3), padding=(0, 2)), (2, 8, 7)),
    "3d": (lambda: nn.Conv3d(2, 2, 2, stride=(1, 2, 1), padding=1), (2, 3, 4, 3)),
}


def make_conv(case, dtype=torch.float64, seed=0):
    """A conv layer of ``case`` with weights from a numpy seed, and its input shape."""
    make, input_shape = CONVS[case]
    conv = make().to(dtype)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(random_array(tuple(conv.weight.shape), np.float64, seed)))
    return conv, input_shape


def conv_matrix(conv, kernel, input_shape):
    """The explicit matrix of x -> conv(x, kernel) (no bias): the convolution applied to each
    basis vector of the input space, as a column."""
    n = math.prod(input_shape)
    basis = torch.eye(n, dtype=kernel.dtype).reshape(n, *input_shape)
    fn = getattr(F, f"conv{len(input_shape) - 1}d")
    with torch.no_grad():
        out = fn(basis, kernel, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return out.reshape(n, -1).T.numpy()


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("case", list(CONVS))
def test_conv_sigma_is_the_exact_operator_norm(case):
    """Converged, sigma and the second estimate are the two largest singular values of the
    explicit convolution matrix, and the transposed convolution is its exact adjoint."""
    conv, input_shape = make_conv(case, seed=1)
    matrix = conv_matrix(conv, conv.weight, input_shape)
    dt.spectral_norm_conv(conv, input_shape, num_svs=2, seed=2)
    original, sn = state(conv)
    assert sn._u.shape == sn.output_shape and sn._v.shape == input_shape
    assert sn.output_shape == tuple(conv(torch.zeros(1, *input_shape, dtype=torch.float64)).shape[1:])
    op = dt.ConvOperator(original.detach(), sn.geometry)
    y = random_array(matrix.shape[0], seed=3)
    np.testing.assert_allclose(np_(op.mv_h(torch.from_numpy(y))), matrix.T @ y, rtol=1e-12, atol=1e-13)
    sn.iterate(original, 1000)
    exact = np.linalg.svd(matrix, compute_uv=False)
    np.testing.assert_allclose(dt.singular_values(conv), exact[:2], rtol=1e-7)
    assert dt.sigma(conv) <= exact[0] * (1 + 1e-12)


@pytest.mark.parametrize("case", ["2d stride 2, input not fitting", "2d groups 2", "3d"])
@pytest.mark.parametrize("coeff", [None, 0.3])
@pytest.mark.parametrize("num_svs", [1, 2])
def test_conv_equals_reference_on_the_explicit_matrix(case, coeff, num_svs):
    """Step by step, u, v (flattened) and sigma are numpy_ref.ReferenceSN's on the explicit matrix
    with spec.conv_spec (order vu, spec.CONV_WARMUP_ITERATIONS at registration), from
    init_uv(out_numel, in_numel, seed); the normalized kernel is W / divisor(sigma), and dL/dW is G / d - <W_sn, G> k dsigma/dW
    with dsigma/dW[j] = u^T M(e_j) v read off explicit matrices of basis kernels."""
    conv, input_shape = make_conv(case, seed=4)
    matrix = conv_matrix(conv, conv.weight, input_shape)
    sp = spec.conv_spec(3, coeff=coeff, num_svs=num_svs)
    dt.spectral_norm_conv(conv, input_shape, n_power_iterations=3, coeff=coeff, num_svs=num_svs, seed=5)
    rows, cols = matrix.shape
    u0, v0 = spec.init_uv(rows, cols, 5, np.float64)
    extra = {}
    if num_svs > 1:
        eu, ev = spec.init_extra_uv(rows, cols, num_svs - 1, 5, np.float64)
        extra = {"extra_u0": eu, "extra_v0": ev}
    ref = numpy_ref.ReferenceSN(matrix, 0, sp, u0, v0, training=True, **extra)
    original, sn = state(conv)
    assert_state_equals_reference(sn, ref)
    w_np = np_(original)
    kernels = np.eye(w_np.size).reshape(w_np.size, *w_np.shape)
    basis_matrices = [conv_matrix(conv, torch.from_numpy(k), input_shape) for k in kernels]
    x = torch.from_numpy(random_array((2, *input_shape), seed=6))
    for step, training in enumerate((True, True, False)):
        conv.train(training)
        original.grad = None
        w_sn = conv.weight
        ref.forward(matrix, training)
        assert_state_equals_reference(sn, ref, rtol=1e-10)
        s = float(ref.sigma(matrix))
        assert dt.sigma(conv) == pytest.approx(s, rel=1e-12)
        d = sp.divisor(s)
        np.testing.assert_allclose(np_(w_sn), w_np / d, rtol=1e-12)
        if coeff is not None:
            assert s > coeff  # the bound is active: its gradient is exercised
        g_np = random_array(w_np.shape, seed=20 + step)
        (torch.from_numpy(g_np) * w_sn).sum().backward()
        dsigma = np.array([ref.u @ b @ ref.v for b in basis_matrices]).reshape(w_np.shape)
        # numpy_ref.normalized_weight_grad's formula with dsigma/dW for u v^T (the bound is active)
        expected = g_np / d - np.vdot(w_np / d, g_np) / s * dsigma
        np.testing.assert_allclose(np_(original.grad), expected, rtol=1e-9, atol=1e-12)
    # in eval mode (no iteration) the layer's output is the convolution with that kernel
    conv_fn = F.conv2d if len(input_shape) == 3 else F.conv3d
    expected_out = conv_fn(x, torch.from_numpy(w_np / d), conv.bias, conv.stride, conv.padding, conv.dilation,
                           conv.groups)
    np.testing.assert_allclose(np_(conv(x)), np_(expected_out), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["2d pad 1", "1d stride 2 pad 1"])
def test_conv_coeff_bounds_the_operator_norm(case):
    conv, input_shape = make_conv(case, seed=7)
    top = np.linalg.svd(conv_matrix(conv, conv.weight, input_shape), compute_uv=False)[0]
    bounded, _ = make_conv(case, seed=7)
    dt.spectral_norm_conv(bounded, input_shape, coeff=0.5 * top, atol=1e-14, max_iterations=3000, seed=8)
    bounded.weight  # training forward: iterates until sigma settles
    original, sn = state(bounded)
    assert sn.last_iterations > 2
    bounded.eval()
    normalized = np.linalg.svd(conv_matrix(bounded, bounded.weight, input_shape), compute_uv=False)[0]
    assert normalized == pytest.approx(0.5 * top, rel=1e-6)
    loose, _ = make_conv(case, seed=7)
    dt.spectral_norm_conv(loose, input_shape, coeff=2 * top, seed=8)
    assert torch.equal(loose.weight, state(loose)[0])


@pytest.mark.parametrize("coeff", [None, 0.2])
def test_conv_gradcheck(coeff):
    """The eval-mode map W -> W / d(W) (u, v fixed) against numerical differentiation, twice."""
    conv, input_shape = make_conv("2d groups 2", seed=9)
    dt.spectral_norm_conv(conv, input_shape, n_power_iterations=5, coeff=coeff, seed=10)
    original, sn = state(conv)
    sn.iterate(original, 20)
    sn.eval()
    assert coeff is None or dt.sigma(conv) > coeff
    weight = original.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(sn, (weight,))
    assert torch.autograd.gradgradcheck(sn, (weight,))


def test_conv_state_remove_and_track_sigma():
    """State-dict keys with the activation shapes, track_sigma, then removal: a plain
    parameter holding W / divisor(sigma), no spectral-norm state left."""
    conv, input_shape = make_conv("2d pad 1", seed=11)
    dt.spectral_norm_conv(conv, input_shape, n_power_iterations=2, coeff=0.4, seed=12, track_sigma=True)
    keys = conv.state_dict()
    assert keys["parametrizations.weight.0._u"].shape == (3, 5, 5)
    assert keys["parametrizations.weight.0._v"].shape == input_shape
    conv(torch.zeros(1, *input_shape, dtype=torch.float64))
    original, sn = state(conv)
    u, v, w_np = np_(sn._u).reshape(-1), np_(sn._v).reshape(-1), np_(original)
    s = float(u @ conv_matrix(conv, original, input_shape) @ v)
    assert float(sn._sigma) == pytest.approx(s, rel=1e-12) and dt.sigma(conv) == pytest.approx(s, rel=1e-12)
    dt.remove_spectral_norm(conv)
    assert not torch.nn.utils.parametrize.is_parametrized(conv)
    assert isinstance(conv.weight, nn.Parameter) and conv.weight.requires_grad
    np.testing.assert_allclose(np_(conv.weight), w_np / max(1.0, s / 0.4), rtol=1e-12)
    assert sorted(conv.state_dict()) == ["bias", "weight"]


def test_conv_unseeded_draw_and_complex_weights():
    """Without a seed u, v come from torch's RNG (unit vectors); complex kernels iterate with
    the conjugate transposed convolution and reach the exact operator norm."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1).to(torch.complex128)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(random_array(tuple(conv.weight.shape), np.complex128, 13)))
    dt.spectral_norm_conv(conv, (2, 4, 4))
    original, sn = state(conv)
    assert float(torch.linalg.vector_norm(sn._u)) == pytest.approx(1.0, rel=1e-14)
    sn.iterate(original, 400)
    exact = np.linalg.svd(conv_matrix(conv, original, (2, 4, 4)), compute_uv=False)[0]
    assert dt.sigma(conv) == pytest.approx(exact, rel=1e-9)


def test_reshaped_kernel_sigma_is_not_the_operator_norm():
    """What spectral_norm_conv is for: the reshaped-kernel sigma of spectral_norm (every
    built-in's) is the largest singular value of the (out, in * k * k) kernel matrix, not
    the convolution's Lipschitz constant."""
    conv, input_shape = make_conv("2d pad 1", seed=14)
    kernel_sigma = np.linalg.svd(np_(conv.weight).reshape(3, -1), compute_uv=False)[0]
    operator_norm = np.linalg.svd(conv_matrix(conv, conv.weight, input_shape), compute_uv=False)[0]
    dt.spectral_norm(conv, seed=15)
    original, sn = state(conv)
    sn.iterate(original, 200)
    assert dt.sigma(conv) == pytest.approx(kernel_sigma, rel=1e-10)
    assert abs(operator_norm / kernel_sigma - 1) > 0.1


# ---------------------------------------------------------------------------------------------
# Bad input: the right error, the argument named, nothing changed


BAD_FEATURES = [
    ({"coeff": 0.0}, ValueError, "coeff"),
    ({"coeff": -1.0}, ValueError, "coeff"),
    ({"coeff": float("nan")}, ValueError, "coeff"),
    ({"coeff": True}, ValueError, "coeff"),
    ({"atol": -1e-3}, ValueError, "atol"),
    ({"rtol": float("inf")}, ValueError, "rtol"),
    ({"max_iterations": 0}, ValueError, "max_iterations"),
    ({"max_iterations": 2.5}, ValueError, "max_iterations"),
    ({"atol": 1e-3, "n_power_iterations": 5, "max_iterations": 3}, ValueError, "max_iterations"),
    ({"num_svs": 0}, ValueError, "num_svs"),
    ({"num_svs": True}, ValueError, "num_svs"),
    ({"track_sigma": 1}, ValueError, "track_sigma"),
]


@pytest.mark.parametrize("kwargs, error, argument", BAD_FEATURES)
@pytest.mark.parametrize("conv", [False, True])
def test_bad_feature_arguments_raise_and_change_nothing(kwargs, error, argument, conv):
    module = nn.Conv2d(2, 3, 3)
    before = snapshot(module)
    dualsn.manual_seed(1)
    first = spec.next_seed()
    dualsn.manual_seed(1)
    with pytest.raises(error, match=argument):
        if conv:
            dt.spectral_norm_conv(module, (2, 5, 5), **kwargs)
        else:
            dt.spectral_norm(module, **kwargs)
    assert_same_snapshot(before, snapshot(module))
    assert spec.next_seed() == first  # the failed call consumed no seed


BAD_CONV_CALLS = [
    (lambda: nn.Linear(4, 3), (4,), {}, TypeError, "Conv"),
    (lambda: nn.ConvTranspose2d(2, 3, 3), (2, 5, 5), {}, TypeError, "Conv"),
    (lambda: nn.Conv2d(2, 3, 3), (3, 5, 5), {}, ValueError, "input_shape"),
    (lambda: nn.Conv2d(2, 3, 3), (2, 5), {}, ValueError, "input_shape"),
    (lambda: nn.Conv2d(2, 3, 3), (1, 2, 5, 5), {}, ValueError, "input_shape"),
    (lambda: nn.Conv2d(2, 3, 3), (2, 0, 5), {}, ValueError, "input_shape"),
    (lambda: nn.Conv2d(2, 3, 3), (2, 5.0, 5), {}, ValueError, "input_shape"),
    (lambda: nn.Conv2d(2, 3, 3), (2, True, 5), {}, ValueError, "input_shape"),
    (lambda: nn.Conv2d(2, 3, 3), "2x5x5", {}, ValueError, "input_shape"),
    (lambda: nn.Conv2d(2, 3, 3), (2, 2, 5), {}, ValueError, "input_shape"),  # smaller than the kernel
    (lambda: nn.Conv2d(2, 3, 3, dilation=3), (2, 6, 6), {}, ValueError, "input_shape"),
    (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 5, 5), {}, NotImplementedError, "padding_mode"),
    (lambda: nn.Conv2d(2, 3, 3), (2, 5, 5), {"name": "kernel"}, ValueError, "name"),
    (lambda: nn.Conv2d(2, 3, 3), (2, 5, 5), {"name": "bias"}, ValueError, "kernel shape"),
    (lambda: nn.Conv2d(2, 3, 3), (2, 5, 5), {"n_power_iterations": 0}, ValueError, "n_power_iterations"),
    (lambda: nn.Conv2d(2, 3, 3), (2, 5, 5), {"seed": -1}, ValueError, "seed"),
    (lambda: dt.spectral_norm(nn.Conv2d(2, 3, 3)), (2, 5, 5), {}, RuntimeError, "weight"),
    (lambda: dt.spectral_norm_conv(nn.Conv2d(2, 3, 3), (2, 5, 5)), (2, 5, 5), {}, RuntimeError, "weight"),
]


@pytest.mark.parametrize("make, input_shape, kwargs, error, argument", BAD_CONV_CALLS)
def test_bad_conv_calls_raise_and_change_nothing(make, input_shape, kwargs, error, argument):
    module = make()
    before = snapshot(module)
    with pytest.raises(error, match=argument):
        dt.spectral_norm_conv(module, input_shape, **kwargs)
    assert_same_snapshot(before, snapshot(module))


def test_remove_and_read_conv_spectral_norm_like_any_other():
    """is_spectral_norm / get_spectral_norm / sigma / remove find the conv flavour too, and a
    module without one raises ValueError."""
    conv = dt.spectral_norm_conv(nn.Conv1d(2, 2, 3), (2, 6), seed=1)
    assert dt.is_spectral_norm(conv) and isinstance(dt.get_spectral_norm(conv), dt.SpectralNormConv)
    assert len(dt.singular_values(conv)) == 1
    dt.remove_spectral_norm(conv)
    for function in (dt.sigma, dt.singular_values, dt.remove_spectral_norm):
        with pytest.raises(ValueError, match="name"):
            function(conv)
