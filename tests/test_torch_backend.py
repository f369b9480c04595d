"""dualsn.torch against the torch built-ins, the numpy reference in dualsn.spec, and exact SVD."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn.utils import parametrizations as builtin_param  # noqa: E402
from torch.nn.utils import spectral_norm as builtin_legacy  # noqa: E402

import dualsn  # noqa: E402
import dualsn.torch as dt  # noqa: E402
from dualsn.torch import _cache  # noqa: E402
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


def layer(kind):
    """A float64 layer of the given kind, weights from torch's RNG."""
    if kind == "linear":
        return nn.Linear(5, 7).double()
    if kind == "conv2d":
        return nn.Conv2d(3, 4, 3).double()
    if kind == "convT2d":
        return nn.ConvTranspose2d(3, 4, 3).double()
    if kind == "vector":
        m = nn.LayerNorm(6).double()
        with torch.no_grad():
            m.weight.normal_()
        return m
    raise ValueError(kind)


def layer_input(kind, seed):
    g = torch.Generator().manual_seed(seed)
    shape = {"linear": (2, 5), "conv2d": (2, 3, 6, 6), "convT2d": (2, 3, 5, 5), "vector": (2, 6)}[kind]
    return torch.randn(shape, generator=g, dtype=torch.float64)


def sn_state(module, name="weight"):
    """(original, u, v) of a dualsn or built-in parametrization."""
    plist = module.parametrizations[name]
    return plist.original, getattr(plist[0], "_u", None), getattr(plist[0], "_v", None)


def np_(t):
    return None if t is None else t.detach().numpy().copy()


def assert_nearly_equal(actual, expected, rtol=None):
    """Equal up to rounding: max|actual - expected| <= rtol * max|expected|.

    Where the built-ins compute sigma as vdot(u, W v), dualsn reads it off the last power
    iteration norm (the same number, rounded differently), and its gradient is a closed form
    instead of autograd's chain: results agree with the built-ins in all but the last bits.
    Default rtol: 1e-13 for double precision, 1e-6 for single.
    """
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if rtol is None:
        rtol = 1e-13 if expected.dtype in (torch.float64, torch.complex128) else 1e-6
    scale = expected.detach().abs().max()
    assert (actual.detach() - expected.detach()).abs().max() <= rtol * scale


def snapshot(module):
    """Everything a failed call must leave unchanged."""
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
    """Each test starts and ends without a dualsn.manual_seed stream."""
    dualsn.manual_seed(None)
    yield
    dualsn.manual_seed(None)


# ---------------------------------------------------------------------------------------------
# compat="torch" is the parametrization built-in, bit for bit


@pytest.mark.parametrize("kind", ["linear", "conv2d", "convT2d", "vector"])
@pytest.mark.parametrize("train_at_registration", [True, False])
@pytest.mark.parametrize("n_iter", [1, 3])
def test_torch_preset_equals_parametrization_builtin(kind, train_at_registration, n_iter):
    torch.manual_seed(0)
    ref, ours = layer(kind), layer(kind)
    ours.load_state_dict(ref.state_dict())
    ref.train(train_at_registration)
    ours.train(train_at_registration)
    torch.manual_seed(1)
    builtin_param.spectral_norm(ref, n_power_iterations=n_iter)
    torch.manual_seed(1)
    dt.spectral_norm(ours, n_power_iterations=n_iter)

    def assert_same_state():
        s_ref, s_ours = ref.state_dict(), ours.state_dict()
        assert list(s_ref) == list(s_ours)
        for k in s_ref:
            if kind == "convT2d":
                # dim=1: dualsn multiplies block by block instead of copying W into the
                # W-matrix's layout, so u and v are rounded differently too
                assert_nearly_equal(s_ours[k], s_ref[k])
            else:
                # the power iteration is the built-in's, operation for operation
                assert torch.equal(s_ref[k], s_ours[k]), k

    assert_same_state()
    if kind == "convT2d":
        assert ours.parametrizations.weight[0].dim == 1
    ref.train()
    ours.train()
    for step in range(3):
        x = layer_input(kind, step)
        out_ref, out_ours = ref(x), ours(x)
        assert_nearly_equal(out_ours, out_ref)
        (out_ref**2).sum().backward()
        (out_ours**2).sum().backward()
        assert_nearly_equal(sn_state(ours)[0].grad, sn_state(ref)[0].grad)
        assert_same_state()
    ref.eval()
    ours.eval()
    x = layer_input(kind, 10)
    assert_nearly_equal(ours(x), ref(x))
    assert_nearly_equal(ours.weight, ref.weight)
    assert_same_state()


# ---------------------------------------------------------------------------------------------
# compat="torch_legacy" is torch.nn.utils.spectral_norm


@pytest.mark.parametrize("kind", ["linear", "conv2d", "convT2d", "vector"])
@pytest.mark.parametrize("n_iter", [1, 2])
def test_torch_legacy_preset_equals_legacy_hook(kind, n_iter):
    torch.manual_seed(0)
    ref, ours = layer(kind), layer(kind)
    ours.load_state_dict(ref.state_dict())
    torch.manual_seed(1)
    builtin_legacy(ref, n_power_iterations=n_iter)
    torch.manual_seed(1)
    dt.spectral_norm(ours, n_power_iterations=n_iter, compat="torch_legacy")
    _, u, v = sn_state(ours)
    # No registration iterations: u, v are the built-in's draws.
    assert torch.equal(ref.weight_u, u) and torch.equal(ref.weight_v, v)

    def assert_same_uv():
        if kind == "convT2d":  # block-wise products for dim=1: rounded differently
            assert_nearly_equal(u, ref.weight_u)
            assert_nearly_equal(v, ref.weight_v)
        else:
            assert torch.equal(ref.weight_u, u) and torch.equal(ref.weight_v, v)

    for step in range(3):
        x = layer_input(kind, step)
        out_ref, out_ours = ref(x), ours(x)
        assert_nearly_equal(out_ours, out_ref)
        out_ref.sum().backward()
        out_ours.sum().backward()
        assert_nearly_equal(sn_state(ours)[0].grad, ref.weight_orig.grad)
        assert_same_uv()
    ref.eval()
    ours.eval()
    x = layer_input(kind, 10)
    assert_nearly_equal(ours(x), ref(x))
    assert_same_uv()


# ---------------------------------------------------------------------------------------------
# Every preset against the numpy reference


CASES = [((7, 5), 0), ((4, 3, 2, 2), 1), ((3, 2, 4), -1), ((6,), 0)]


def plain_normalized(weight, u, v, dim, sp):
    """W / sigma as a plain torch function of W (u, v constants), for autograd."""
    if sp.is_exact_vector(weight.ndim):
        return weight / torch.linalg.vector_norm(weight).clamp_min(sp.eps)
    perm = spec.permutation(weight.ndim, dim)
    mat = weight.permute(*perm).reshape(weight.shape[perm[0]], -1)
    return weight / torch.vdot(u, mat @ v)


@pytest.mark.parametrize("compat", PRESETS)
@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
@pytest.mark.parametrize("shape, dim", CASES)
@pytest.mark.parametrize("train_at_registration", [True, False])
def test_every_preset_equals_reference(compat, dtype, shape, dim, train_at_registration):
    sp = spec.make_spec(compat, n_power_iterations=2)
    w_np = random_array(shape, dtype, seed=3)
    m = Holder(torch.from_numpy(w_np)).train(train_at_registration)
    dt.spectral_norm(m, dim=dim, n_power_iterations=2, compat=compat, seed=11)
    sn = dt.get_spectral_norm(m)
    assert dt.is_spectral_norm(m) and sn.spec == sp and sn.dim == spec.canonical_dim(dim, len(shape))

    h, w = spec.matrix_shape(shape, dim)
    u0, v0 = spec.init_uv(h, w, 11, dtype, sp.eps)
    ref = numpy_ref.ReferenceSN(w_np, dim, sp, u0, v0, training=train_at_registration)

    def assert_state():
        if ref.u is None:
            assert sn._u is None and sn._v is None
        else:
            np.testing.assert_allclose(np_(sn._u), ref.u, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(np_(sn._v), ref.v, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(dt.sigma(m), np.real(ref.sigma(w_np)), rtol=1e-12)

    assert_state()
    m.train()
    original = m.parametrizations.weight.original
    for step in range(3):
        w_sn = m.weight  # every access in training mode is one forward
        expected = ref.forward(w_np, training=True)
        np.testing.assert_allclose(np_(w_sn), expected, rtol=1e-12, atol=1e-14)
        assert_state()
        g_np = random_array(shape, dtype, seed=100 + step)
        g = torch.from_numpy(g_np)
        original.grad = None
        (g.conj() * w_sn).real.sum().backward()
        expected_grad = ref.weight_grad(g_np, w_np)
        np.testing.assert_allclose(np_(original.grad), expected_grad, rtol=1e-10, atol=1e-13)
        # the same gradient from torch autograd of a plain function of W
        w_leaf = torch.from_numpy(w_np).requires_grad_()
        u_t = None if ref.u is None else torch.from_numpy(ref.u)
        v_t = None if ref.v is None else torch.from_numpy(ref.v)
        (g.conj() * plain_normalized(w_leaf, u_t, v_t, sn.dim, sp)).real.sum().backward()
        torch.testing.assert_close(original.grad, w_leaf.grad, rtol=1e-10, atol=1e-13)
    m.eval()
    np.testing.assert_allclose(np_(m.weight), ref.forward(w_np, training=False), rtol=1e-12, atol=1e-14)
    assert_state()


@pytest.mark.parametrize("compat", PRESETS)
@pytest.mark.parametrize("shape", [(4, 3), (5,)])
def test_eps_floors_every_norm(compat, shape):
    """A weight far below eps: every normalization divides by eps, as the reference does."""
    eps = 1e-3
    sp = spec.make_spec(compat, eps=eps)
    w_np = 1e-6 * random_array(shape, seed=4)
    m = Holder(torch.from_numpy(w_np))
    dt.spectral_norm(m, eps=eps, compat=compat, seed=2)
    h, w = spec.matrix_shape(shape, 0)
    ref = numpy_ref.ReferenceSN(w_np, 0, sp, *spec.init_uv(h, w, 2, np.float64, eps))
    for _ in range(2):
        np.testing.assert_allclose(np_(m.weight), ref.forward(w_np, True), rtol=1e-12)
    assert dt.sigma(m) == pytest.approx(float(ref.sigma(w_np)), rel=1e-12)


@pytest.mark.parametrize("compat", PRESETS)
@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
def test_sigma_converges_to_largest_singular_value(compat, dtype):
    # A W-matrix with a clear gap (3 vs 1.5) so 60 iterations converge to machine precision.
    h, w = 4, 18
    q1 = np.linalg.qr(random_array((h, h), dtype, 1))[0]
    q2 = np.linalg.qr(random_array((w, h), dtype, 2))[0]
    mat = (q1 * np.array([3.0, 1.5, 1.0, 0.5])) @ q2.conj().T
    shape = (3, h, 2, 3)  # a ConvTranspose-style weight, output features on dim 1
    w_np = spec.from_matrix(mat, shape, 1).astype(dtype)
    exact = np.linalg.svd(spec.to_matrix(w_np, 1), compute_uv=False)[0]
    m = Holder(torch.from_numpy(w_np)).eval()
    dt.spectral_norm(m, dim=1, n_power_iterations=20, compat=compat, seed=0)
    m.train()
    for _ in range(3):
        m.weight
    assert dt.sigma(m) == pytest.approx(exact, rel=1e-12)
    m.eval()
    w_sn = spec.to_matrix(np_(m.weight), 1)
    assert np.linalg.svd(w_sn, compute_uv=False)[0] == pytest.approx(1.0, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Seeds


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.complex64])
@pytest.mark.parametrize("compat", ["torch_legacy", "paddle"])
def test_seed_gives_init_uv_bits(dtype, compat):
    # These presets run no registration iteration, so u, v are the initial draw.
    m = Holder(torch.from_numpy(random_array((4, 3, 2), dtype)))
    dt.spectral_norm(m, compat=compat, seed=1234)
    _, u, v = sn_state(m)
    u0, v0 = spec.init_uv(4, 6, 1234, dtype, 1e-12)
    assert u.dtype == m.parametrizations.weight.original.dtype
    assert np_(u).tobytes() == u0.tobytes() and np_(v).tobytes() == v0.tobytes()


def test_seed_does_not_touch_torch_rng():
    lin = nn.Linear(4, 3)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    dt.spectral_norm(lin, seed=3)
    assert torch.equal(torch.rand(3), expected)


def test_manual_seed_pairs_layers_of_equivalent_models():
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Conv1d(6, 2, 3))

    dualsn.manual_seed(42)
    seeds = [spec.next_seed() for _ in range(3)]
    models = []
    for _ in range(2):
        dualsn.manual_seed(42)
        mod = model().eval()
        for sub in mod:
            # paddle: no registration iteration; the 1-D LayerNorm weight is normalized exactly
            dt.spectral_norm(sub, compat="torch" if sub.weight.ndim == 1 else "paddle")
        models.append(mod)
    a, b = models
    for sub_a, sub_b in zip(a, b):
        assert set(sub_a.state_dict()) == set(sub_b.state_dict())
        for k, val in sub_a.state_dict().items():
            assert torch.equal(val, sub_b.state_dict()[k])
    assert sn_state(a[1])[1] is None
    # The k-th registration uses the stream's k-th seed, even when (a[1]) it draws nothing.
    for sub, s in ((a[0], seeds[0]), (a[2], seeds[2])):
        _, u, v = sn_state(sub)
        u0, v0 = spec.init_uv(u.numel(), v.numel(), s, np.float32)
        assert np_(u).tobytes() == u0.tobytes() and np_(v).tobytes() == v0.tobytes()
    # Without a stream, torch's RNG is back.
    dualsn.manual_seed(None)
    torch.manual_seed(3)
    c = dt.spectral_norm(nn.Linear(5, 6), compat="paddle")
    torch.manual_seed(3)
    d = builtin_legacy(nn.Linear(5, 6))
    assert torch.equal(sn_state(c)[1], d.weight_u)


# ---------------------------------------------------------------------------------------------
# Training patterns and state dicts


@pytest.mark.parametrize("compat", PRESETS)
def test_two_forwards_one_backward(compat):
    """loss = D(real) - D(fake): both forwards iterate u, v in place; backward still works."""
    torch.manual_seed(0)
    lin = nn.Linear(5, 3).double()
    w_np = np_(lin.weight)
    dt.spectral_norm(lin, compat=compat, seed=9)
    lin.train()
    ref = numpy_ref.ReferenceSN(w_np, 0, lin.parametrizations.weight[0].spec, *spec.init_uv(3, 5, 9, np.float64))
    x1, x2 = layer_input("linear", 1), layer_input("linear", 2)
    u_buffer = lin.parametrizations.weight[0]._u
    u_address = u_buffer.data_ptr()
    loss = lin(x1).sum() - lin(x2).sum()
    loss.backward()
    ones = np.ones((2, 3))
    ref.forward(w_np, True)
    grad = ref.weight_grad(ones.T @ np_(x1), w_np)
    ref.forward(w_np, True)
    grad -= ref.weight_grad(ones.T @ np_(x2), w_np)
    np.testing.assert_allclose(np_(lin.parametrizations.weight.original.grad), grad, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(np_(lin.parametrizations.weight[0]._u), ref.u, rtol=1e-12)
    # updated in place: the buffer object and its storage are the ones registered (DataParallel)
    assert lin.parametrizations.weight[0]._u is u_buffer and u_buffer.data_ptr() == u_address


def test_state_dict_keys():
    lin = dt.spectral_norm(nn.Linear(3, 2))
    assert sorted(lin.state_dict()) == sorted(
        ["bias", "parametrizations.weight.original", "parametrizations.weight.0._u", "parametrizations.weight.0._v"]
    )
    norm = dt.spectral_norm(nn.LayerNorm(4))
    assert sorted(norm.state_dict()) == ["bias", "parametrizations.weight.original"]
    legacy = dt.spectral_norm(nn.LayerNorm(4), compat="torch_legacy")
    assert "parametrizations.weight.0._u" in legacy.state_dict()


@pytest.mark.parametrize("compat", PRESETS)
def test_save_and_load_mid_training(compat):
    torch.manual_seed(0)
    a = dt.spectral_norm(nn.Conv2d(2, 3, 3).double(), compat=compat, n_power_iterations=2)
    for step in range(2):
        a(layer_input("conv2d", step)[:, :2])
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = dt.spectral_norm(nn.Conv2d(2, 3, 3).double(), compat=compat, n_power_iterations=2, seed=1)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    for step in range(2, 4):
        x = layer_input("conv2d", step)[:, :2]
        assert torch.equal(a(x), b(x))
    assert torch.equal(sn_state(a)[1], sn_state(b)[1])


@pytest.mark.parametrize("kind", ["linear", "convT2d", "vector"])
def test_builtin_and_dualsn_state_dicts_interchange(kind):
    torch.manual_seed(0)
    ref = builtin_param.spectral_norm(layer(kind))
    ours = dt.spectral_norm(layer(kind), seed=5)
    ref(layer_input(kind, 0))
    ours.load_state_dict(ref.state_dict())
    for step in range(1, 3):
        x = layer_input(kind, step)
        assert_nearly_equal(ours(x), ref(x))
    # and back: dualsn state into a fresh built-in module
    ours(layer_input(kind, 3))
    ref2 = builtin_param.spectral_norm(layer(kind))
    ref2.load_state_dict(ours.state_dict())
    x = layer_input(kind, 4)
    assert_nearly_equal(ours(x), ref2(x))


# ---------------------------------------------------------------------------------------------
# Removal and sigma


@pytest.mark.parametrize("compat", PRESETS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kind", ["linear", "vector"])
def test_remove_leaves_plain_normalized_parameter(compat, training, kind):
    torch.manual_seed(0)
    m = dt.spectral_norm(layer(kind), compat=compat)
    m(layer_input(kind, 0))
    m.train(training)
    original, u, v = (None if t is None else t.detach().clone() for t in sn_state(m))
    sp = m.parametrizations.weight[0].spec
    expected = plain_normalized(original, u, v, 0, sp)
    assert dt.sigma(m) == pytest.approx(
        float(np.real(numpy_ref.ReferenceSN(np_(original), 0, sp, np_(u), np_(v), training=False).sigma(np_(original)))),
        rel=1e-14,
    )
    dt.remove_spectral_norm(m)
    assert type(m) is type(layer(kind))
    assert not hasattr(m, "parametrizations") and not dt.is_spectral_norm(m)
    assert isinstance(m.weight, nn.Parameter) and m.weight.is_leaf and m.weight.requires_grad
    assert sorted(m.state_dict()) == ["bias", "weight"]
    assert torch.equal(m.weight, expected)  # computed with the u, v as they were: no iteration
    m(layer_input(kind, 1)).sum().backward()
    assert m.weight.grad is not None
    # a spectral norm can be applied again
    dt.spectral_norm(m)
    assert dt.is_spectral_norm(m)


def test_remove_keeps_other_parametrizations():
    class Double(nn.Module):
        def forward(self, x):
            return 2 * x

    lin = nn.Linear(3, 2)
    torch.nn.utils.parametrize.register_parametrization(lin, "bias", Double())
    dt.spectral_norm(lin)
    dt.remove_spectral_norm(lin)
    assert torch.nn.utils.parametrize.is_parametrized(lin, "bias")
    assert not torch.nn.utils.parametrize.is_parametrized(lin, "weight")
    assert isinstance(lin.weight, nn.Parameter)


# ---------------------------------------------------------------------------------------------
# Bad input: the right error, the argument named, nothing changed


class IntWeight(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.register_buffer("weight", torch.ones(3, 2, dtype=dtype))


BAD_CALLS = [
    (lambda: nn.Linear(4, 3), {"dim": 2}, IndexError, "dim"),
    (lambda: nn.Linear(4, 3), {"dim": -3}, IndexError, "dim"),
    (lambda: nn.Linear(4, 3), {"n_power_iterations": 0}, ValueError, "n_power_iterations"),
    (lambda: nn.Linear(4, 3), {"n_power_iterations": -2}, ValueError, "n_power_iterations"),
    (lambda: nn.Linear(4, 3), {"n_power_iterations": 1.5}, ValueError, "n_power_iterations"),
    (lambda: nn.Linear(4, 3), {"eps": 0.0}, ValueError, "eps"),
    (lambda: nn.Linear(4, 3), {"eps": -1e-3}, ValueError, "eps"),
    (lambda: nn.Linear(4, 3), {"compat": "tensorflow"}, ValueError, "compat"),
    (lambda: nn.Linear(4, 3), {"seed": -1}, ValueError, "seed"),
    (lambda: nn.Linear(4, 3), {"name": "kernel"}, ValueError, "name"),
    (lambda: nn.Linear(0, 3), {}, ValueError, "weight"),
    (lambda: IntWeight(torch.int64), {}, NotImplementedError, "dtype"),
    (lambda: IntWeight(torch.bool), {}, NotImplementedError, "dtype"),
    # hooks do not stack, as in their built-ins (the "torch" preset's parametrizations do)
    (lambda: dt.spectral_norm(nn.Linear(4, 3)), {"compat": "torch_legacy"}, RuntimeError, "weight"),
    (lambda: dt.spectral_norm(nn.Linear(4, 3)), {"compat": "paddle"}, RuntimeError, "weight"),
    (lambda: builtin_param.spectral_norm(nn.Linear(4, 3)), {"compat": "paddle"}, RuntimeError, "weight"),
    (lambda: builtin_legacy(nn.Linear(4, 3)), {}, RuntimeError, "weight"),
]


@pytest.mark.parametrize("make, kwargs, error, argument", BAD_CALLS)
def test_bad_input_raises_and_changes_nothing(make, kwargs, error, argument):
    module = make()
    before = snapshot(module)
    dualsn.manual_seed(1)
    with pytest.raises(error, match=argument):
        dt.spectral_norm(module, **kwargs)
    assert_same_snapshot(before, snapshot(module))
    # the failed call consumed no seed from the manual_seed stream
    dualsn.manual_seed(1)
    first = spec.next_seed()
    dualsn.manual_seed(1)
    with pytest.raises(error):
        dt.spectral_norm(module, **kwargs)
    assert spec.next_seed() == first


@pytest.mark.parametrize("function", [dt.remove_spectral_norm, dt.sigma])
def test_remove_and_sigma_without_spectral_norm(function):
    for module in (nn.Linear(3, 2), builtin_param.spectral_norm(nn.Linear(3, 2))):
        before = snapshot(module)
        with pytest.raises(ValueError, match="name"):
            function(module)
        assert_same_snapshot(before, snapshot(module))
    assert dt.get_spectral_norm(nn.Linear(3, 2)) is None


def test_remove_with_stacked_parametrization_raises():
    class Double(nn.Module):
        def forward(self, x):
            return 2 * x

    lin = dt.spectral_norm(nn.Linear(3, 2))
    torch.nn.utils.parametrize.register_parametrization(lin, "weight", Double())
    before = snapshot(lin)
    with pytest.raises(RuntimeError, match="weight"):
        dt.remove_spectral_norm(lin)
    assert_same_snapshot(before, snapshot(lin))


def test_deepcopy_keeps_state():
    lin = dt.spectral_norm(nn.Linear(4, 3).double())
    clone = copy.deepcopy(lin)
    x = layer_input("linear", 0)[:, :4]
    assert torch.equal(lin(x), clone(x))


# ---------------------------------------------------------------------------------------------
# The fused implementation: W-matrix views, closed-form gradient, sigma from the last norm


@pytest.mark.parametrize("shape, dim, layout", [((5, 3, 2), 0, "mat"), ((3, 2, 5), 2, "mat"), ((3, 5, 2, 2), 1, "blocks"), ((6,), 0, "mat")])
def test_weight_matrix_is_a_view_and_computes_the_products(shape, dim, layout):
    w_np = random_array(shape, np.complex128, seed=1)
    weight = torch.from_numpy(w_np)
    mat = dt.WeightMatrix(weight, dim)
    view = mat.mat if layout == "mat" else mat.blocks
    assert view is not None and view.data_ptr() == weight.data_ptr()  # no copy of W
    h, w = spec.matrix_shape(shape, dim)
    m_np = spec.to_matrix(w_np, dim)
    u, v = random_array(h, np.complex128, 2), random_array(w, np.complex128, 3)
    np.testing.assert_allclose(np_(mat.mv(torch.from_numpy(v))), m_np @ v, rtol=1e-13)
    np.testing.assert_allclose(np_(mat.mv_h(torch.from_numpy(u))), m_np.conj().T @ u, rtol=1e-13)
    g = random_array(shape, np.complex128, 4)
    fused = mat.add_rank1(torch.from_numpy(g), torch.from_numpy(u), torch.from_numpy(v), 0.5, -2.0 + 1j)
    expected = 0.5 * g + (-2.0 + 1j) * spec.from_matrix(np.outer(u, v.conj()), shape, dim)
    np.testing.assert_allclose(np_(fused), expected, rtol=1e-13)
    np.testing.assert_allclose(np_(mat.rank1(torch.from_numpy(u), torch.from_numpy(v))),
                               spec.from_matrix(np.outer(u, v.conj()), shape, dim), rtol=1e-13)


@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
@pytest.mark.parametrize("shape, dim", [((7, 5), 0), ((4, 3, 2, 2), 1), ((3, 2, 4), -1), ((6,), 0)])
@pytest.mark.parametrize("tensor_scalars", [False, True])
def test_fused_weight_grad_equals_reference(dtype, shape, dim, tensor_scalars, monkeypatch):
    """weight_grad for a general (complex) sigma: the spec's formula, and autograd of W / (u^H W v).

    ``tensor_scalars`` forces the path used off the CPU (scalars kept in tensors, no .item())."""
    if tensor_scalars:
        monkeypatch.setattr(dt._dtypes, "_is_compiling", lambda: True)
    dim = spec.canonical_dim(dim, len(shape))
    sp = spec.make_spec("torch_legacy")
    w_np, g_np = random_array(shape, dtype, 5), random_array(shape, dtype, 6)
    h, w = spec.matrix_shape(shape, dim)
    u_np, v_np = random_array(h, dtype, 7), random_array(w, dtype, 8)  # not singular vectors
    weight, u, v = (torch.from_numpy(a) for a in (w_np, u_np, v_np))
    sigma = torch.vdot(u, torch.from_numpy(spec.to_matrix(w_np, dim)) @ v)
    grad = dt.weight_grad(torch.from_numpy(g_np), weight, sigma, u, v, dim, sp)
    expected = numpy_ref.normalized_weight_grad(g_np, w_np, u_np, v_np, dim, sp)
    np.testing.assert_allclose(np_(grad), expected, rtol=1e-12, atol=1e-14)
    leaf = weight.clone().requires_grad_()
    (torch.from_numpy(g_np).conj() * plain_normalized(leaf, u, v, dim, sp)).real.sum().backward()
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("shape, dim", [((4, 3), 0), ((2, 3, 2), 1), ((3, 4), 1)])
def test_fused_function_double_backward(dtype, shape, dim):
    """create_graph=True: the gradient is itself differentiable (gradgradcheck), and its
    derivative is the unfused expression's (a Hessian-vector product)."""
    torch.manual_seed(0)
    sp = spec.make_spec("torch")
    h, w = spec.matrix_shape(shape, dim)
    u = torch.nn.functional.normalize(torch.randn(h, dtype=dtype), dim=0)
    v = torch.nn.functional.normalize(torch.randn(w, dtype=dtype), dim=0)
    weight = torch.randn(shape, dtype=dtype, requires_grad=True)

    def fused(x):
        return dt.spectral_norm_forward(x, u, v, dim, sp, training=False)

    assert torch.autograd.gradcheck(fused, (weight,))
    assert torch.autograd.gradgradcheck(fused, (weight,))
    g, t = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    hvps = []
    for f in (fused, lambda x: plain_normalized(x, u, v, dim, sp)):
        (gw,) = torch.autograd.grad((g.conj() * f(weight)).real.sum(), weight, create_graph=True)
        hvps.append(torch.autograd.grad((t.conj() * gw).real.sum(), weight)[0])
    torch.testing.assert_close(hvps[0], hvps[1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("compat", PRESETS)
@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
def test_eval_mode_gradient_with_unconverged_vectors(compat, dtype):
    """Eval with autograd: sigma = u^H W v with the stored u, v (complex when they are not
    converged), gradient through the fused function, for the reference's formula."""
    sp = spec.make_spec(compat)
    shape, dim = (4, 3, 2), 1
    w_np = random_array(shape, dtype, seed=9)
    m = Holder(torch.from_numpy(w_np)).eval()
    dt.spectral_norm(m, dim=dim, compat=compat, seed=3)
    h, w = spec.matrix_shape(shape, dim)
    ref = numpy_ref.ReferenceSN(w_np, dim, sp, *spec.init_uv(h, w, 3, dtype), training=False)
    for _ in range(2):  # the second time sigma comes from the cache
        w_sn = m.weight
        assert w_sn.requires_grad
        np.testing.assert_allclose(np_(w_sn), ref.forward(w_np, training=False), rtol=1e-12)
        original = m.parametrizations.weight.original
        original.grad = None
        g_np = random_array(shape, dtype, seed=10)
        (torch.from_numpy(g_np).conj() * w_sn).real.sum().backward()
        np.testing.assert_allclose(np_(original.grad), ref.weight_grad(g_np, w_np), rtol=1e-10, atol=1e-13)


def test_float32_and_bfloat16_follow_the_builtin():
    for dtype, rtol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        torch.manual_seed(0)
        ref = nn.Linear(64, 32).to(dtype)
        ours = copy.deepcopy(ref)
        torch.manual_seed(1)
        builtin_param.spectral_norm(ref)
        torch.manual_seed(1)
        dt.spectral_norm(ours)
        x = torch.randn(3, 64, dtype=dtype)
        for _ in range(2):
            out_ref, out_ours = ref(x), ours(x)
            assert_nearly_equal(out_ours, out_ref, rtol)
            out_ref.square().sum().backward()
            out_ours.square().sum().backward()
            assert_nearly_equal(sn_state(ours)[0].grad, sn_state(ref)[0].grad, rtol)
            # dualsn keeps u, v of a bfloat16 weight in float32 (docs/training.md)
            assert_nearly_equal(sn_state(ours)[1].to(dtype), sn_state(ref)[1], rtol)


def test_channels_last_weight():
    torch.manual_seed(0)
    ref = nn.Conv2d(3, 4, 3).double().to(memory_format=torch.channels_last)
    ours = copy.deepcopy(ref)
    torch.manual_seed(1)
    builtin_param.spectral_norm(ref)
    torch.manual_seed(1)
    dt.spectral_norm(ours)
    x = layer_input("conv2d", 0)
    out_ref, out_ours = ref(x), ours(x)
    assert_nearly_equal(out_ours, out_ref)
    out_ref.sum().backward()
    out_ours.sum().backward()
    assert_nearly_equal(sn_state(ours)[0].grad, sn_state(ref)[0].grad)


# ---------------------------------------------------------------------------------------------
# The eval-mode cache


def eval_model(compat="torch", kind="conv2d"):
    torch.manual_seed(0)
    m = dt.spectral_norm(layer(kind), compat=compat)
    m(layer_input(kind, 0))  # one training step moves u, v
    return m.eval()


def expected_eval_weight(m):
    """W / (u^H W v) from the module's current state, computed independently in numpy."""
    plist = m.parametrizations.weight
    sn = plist[0]
    w_np = np_(plist.original)
    return w_np / numpy_ref.sigma(spec.to_matrix(w_np, sn.dim), np_(sn._u), np_(sn._v))


def cached_weight(m):
    with torch.no_grad():
        return m.weight


@pytest.mark.parametrize("compat", PRESETS)
def test_eval_cache_reuses_the_normalized_weight(compat):
    m = eval_model(compat)
    first = cached_weight(m)
    np.testing.assert_allclose(np_(first), expected_eval_weight(m), rtol=1e-13)
    assert cached_weight(m) is first  # a hit: nothing recomputed
    x = layer_input("conv2d", 1)
    with torch.no_grad():
        out = m(x)
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, first, m.bias), rtol=0, atol=0)
    # a frozen weight records no graph for W either: cached as well
    m.parametrizations.weight.original.requires_grad_(False)
    assert m.weight is first
    # turned off: recomputed every time
    m.parametrizations.weight[0].cache_eval = False
    again = cached_weight(m)
    assert again is not first and torch.equal(again, first)


def _bump_weight(m):
    with torch.no_grad():
        m.parametrizations.weight.original.mul_(1.5).add_(0.01)


def _data_write(m):  # untracked by the version counter (e.g. an EMA written through .data)
    p = m.parametrizations.weight.original
    p.data.mul_(0.9).add_(0.05 * torch.ones_like(p.data))


def _replace_data(m):
    p = m.parametrizations.weight.original
    p.data = p.data + 0.1  # a new tensor (new storage) in the same Parameter


def _optimizer_step(m):
    m.train()
    m(layer_input("conv2d", 2)).square().sum().backward()
    torch.optim.SGD(m.parameters(), lr=0.1).step()
    m.eval()


def _load_other_state(m):
    other = dt.spectral_norm(layer("conv2d"), seed=4)
    other(layer_input("conv2d", 3))
    m.load_state_dict(other.state_dict())


def _change_u(m):
    with torch.no_grad():
        m.parametrizations.weight[0]._u.neg_()


def _train_forward(m):
    m.train()
    m(layer_input("conv2d", 4))
    m.eval()


INVALIDATIONS = [_bump_weight, _data_write, _replace_data, _optimizer_step, _load_other_state, _change_u,
                 _train_forward]


@pytest.fixture(params=["numpy view", "torch take"])
def sample_path(request, monkeypatch):
    """The cache reads W's sample through a numpy view of its memory (a contiguous CPU W of
    a numpy dtype), or, where there is none (GPU, bfloat16, strides), with torch.take."""
    if request.param == "torch take":
        monkeypatch.setattr(_cache, "_host_flat", lambda weight: None)
    return request.param


@pytest.mark.parametrize("change", INVALIDATIONS, ids=lambda f: f.__name__.strip("_"))
def test_eval_cache_sees_every_change(change, sample_path):
    m = eval_model("paddle")  # no warm-up: a training forward still moves u, v visibly
    before = cached_weight(m)
    expected_before = expected_eval_weight(m)
    change(m)
    after = cached_weight(m)
    expected = expected_eval_weight(m)
    assert not np.allclose(expected, expected_before)  # the change does change the result
    np.testing.assert_allclose(np_(after), expected, rtol=1e-13)
    assert cached_weight(m) is after  # and the new result is cached in turn
    assert before is not after


def test_host_flat_is_a_view_of_the_weight_only_where_numpy_can_have_one():
    w = torch.arange(12.0, requires_grad=True).reshape(3, 4)
    flat = _cache._host_flat(w)
    assert flat.shape == (12,) and np.shares_memory(flat, w.detach().numpy())
    with torch.no_grad():
        w.view(-1)[5] = -1.0
    assert flat[5] == -1.0  # the memory itself, not a copy
    assert _cache._host_flat(w.t()) is None  # strided: torch.take's logical order instead
    assert _cache._host_flat(w.to(torch.bfloat16)) is None  # no numpy dtype
    assert _cache._host_flat(torch.ones(3, dtype=torch.complex64).conj()) is None  # a conjugate view
    # the bytes compared on a hit are those of the entries take() picks
    index = _cache._sample_index(w)
    sample = _cache._Sample(w, index)
    assert sample.values == torch.take(w, index).detach().numpy().tobytes()
    assert sample.unchanged(w)
    with torch.no_grad():
        w.view(-1)[index[3]] += 1.0
    assert not sample.unchanged(w)


def test_eval_cache_misses_u_written_through_data_alone_unless_turned_off():
    """The documented blind spot: u rewritten through ``.data`` (no version bump) while W
    stays as it is. ``cache_eval = False`` is the way out for such code."""
    m = eval_model("paddle")
    before = cached_weight(m)
    m.parametrizations.weight[0]._u.data.mul_(-1)
    assert cached_weight(m) is before
    m.parametrizations.weight[0].cache_eval = False
    np.testing.assert_allclose(np_(cached_weight(m)), expected_eval_weight(m), rtol=1e-13)
    np.testing.assert_allclose(np_(cached_weight(m)), -np_(before), rtol=1e-13)


def test_eval_cache_is_safe_against_changes_to_the_returned_tensor():
    m = eval_model()
    w = cached_weight(m)
    expected = expected_eval_weight(m)
    with torch.no_grad():
        w.zero_()
    np.testing.assert_allclose(np_(cached_weight(m)), expected, rtol=1e-13)


def test_eval_cache_dropped_by_train_moves_and_copies():
    m = eval_model()
    first = cached_weight(m)
    m.train().eval()
    assert cached_weight(m) is not first
    clone = copy.deepcopy(m)
    assert clone.parametrizations.weight[0]._cache is None
    np.testing.assert_allclose(np_(cached_weight(clone)), expected_eval_weight(m), rtol=1e-13)
    m.float()
    w32 = cached_weight(m)
    assert w32.dtype == torch.float32
    np.testing.assert_allclose(np_(w32), expected_eval_weight(m), rtol=1e-6)


def test_eval_cache_with_graph_returns_a_graph():
    m = eval_model()
    cached = cached_weight(m)
    w_sn = m.weight  # grad enabled and W requires grad: not the cached tensor
    assert w_sn is not cached and w_sn.requires_grad
    torch.testing.assert_close(w_sn.detach(), cached, rtol=1e-14, atol=0)
    w_sn.sum().backward()
    assert m.parametrizations.weight.original.grad is not None


def test_eval_cache_under_inference_mode():
    m = eval_model()
    x = layer_input("conv2d", 5)
    with torch.inference_mode():
        out1 = m(x)
        out2 = m(x)
    assert torch.equal(out1, out2)
    w = m.parametrizations.weight[0]._cache.out
    assert not w.is_inference()  # a normal tensor, reusable outside inference mode
    # reused where autograd records the input's graph: no "inference tensor" error
    x.requires_grad_(True)
    m.parametrizations.weight.original.requires_grad_(False)
    m(x).sum().backward()
    assert x.grad is not None
    np.testing.assert_allclose(np_(cached_weight(m)), expected_eval_weight(m), rtol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
@pytest.mark.parametrize("coeff", [None, 0.5, 50.0])
def test_host_divisor_gives_the_bits_of_the_tensor_select(dtype, coeff):
    """On the CPU, W / divisor(sigma) divides by spec.divisor of the host number; elsewhere by
    the tensor select _divisor. Same bits, for sigmas around the bound, zero (floored) and
    tiny ones; and the normalization of u, v by a host number gives F.normalize's bits."""
    from dualsn.torch._grad import _divided, _divisor
    from dualsn.torch._iteration import _normalize_into

    sp = spec.make_spec("torch", coeff=coeff)
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(37, 29, generator=gen).to(dtype)
    sigmas = [0.0, 1e-30, 0.3, 0.5, 0.7, 1.0, 3.7, 49.9, 50.0, 123.456]
    sigmas += torch.rand(40, generator=gen, dtype=torch.float64).mul(100).tolist()
    for value in sigmas:
        sigma = torch.tensor(value, dtype=dtype)
        assert torch.equal(_divided(weight, sigma, sp), weight / _divisor(sigma, sp)), value
    for scale in (1e-3, 1.0, 1e3):
        x = torch.randn(53, generator=gen).to(dtype) * scale
        out = torch.empty_like(x)
        _normalize_into(x, out, sp.eps)
        assert torch.equal(out, torch.nn.functional.normalize(x, dim=0, eps=sp.eps))
