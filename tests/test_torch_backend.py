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
from dualsn import spec  # noqa: E402

PRESETS = tuple(spec.PRESETS)


# ---------------------------------------------------------------------------------------------
# Helpers


class Holder(nn.Module):
    """A module whose only parameter is ``weight``: lets a test pick any shape and dtype."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(torch.as_tensor(weight).clone())


def random_array(shape, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape)
    if np.dtype(dtype).kind == "c":
        w = w + 1j * rng.standard_normal(shape)
    return w.astype(dtype)


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
            assert torch.equal(s_ref[k], s_ours[k]), k

    assert_same_state()
    if kind == "convT2d":
        assert ours.parametrizations.weight[0].dim == 1
    ref.train()
    ours.train()
    for step in range(3):
        x = layer_input(kind, step)
        out_ref, out_ours = ref(x), ours(x)
        assert torch.equal(out_ref, out_ours)
        (out_ref**2).sum().backward()
        (out_ours**2).sum().backward()
        assert torch.equal(sn_state(ref)[0].grad, sn_state(ours)[0].grad)
        assert_same_state()
    ref.eval()
    ours.eval()
    x = layer_input(kind, 10)
    assert torch.equal(ref(x), ours(x))
    assert torch.equal(ref.weight, ours.weight)
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
    for step in range(3):
        x = layer_input(kind, step)
        out_ref, out_ours = ref(x), ours(x)
        assert torch.equal(out_ours, out_ref)
        out_ref.sum().backward()
        out_ours.sum().backward()
        assert torch.equal(sn_state(ours)[0].grad, ref.weight_orig.grad)
        assert torch.equal(ref.weight_u, u) and torch.equal(ref.weight_v, v)
    ref.eval()
    ours.eval()
    x = layer_input(kind, 10)
    assert torch.equal(ours(x), ref(x))
    assert torch.equal(ref.weight_u, u) and torch.equal(ref.weight_v, v)


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
    ref = spec.ReferenceSN(w_np, dim, sp, u0, v0, training=train_at_registration)

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
    ref = spec.ReferenceSN(w_np, 0, sp, *spec.init_uv(h, w, 2, np.float64, eps))
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
    ref = spec.ReferenceSN(w_np, 0, lin.parametrizations.weight[0].spec, *spec.init_uv(3, 5, 9, np.float64))
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
        assert torch.equal(ref(x), ours(x))
    # and back: dualsn state into a fresh built-in module
    ours(layer_input(kind, 3))
    ref2 = builtin_param.spectral_norm(layer(kind))
    ref2.load_state_dict(ours.state_dict())
    x = layer_input(kind, 4)
    assert torch.equal(ref2(x), ours(x))


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
        float(np.real(spec.ReferenceSN(np_(original), 0, sp, np_(u), np_(v), training=False).sigma(np_(original)))),
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
    (lambda: dt.spectral_norm(nn.Linear(4, 3)), {}, RuntimeError, "weight"),
    (lambda: builtin_param.spectral_norm(nn.Linear(4, 3)), {}, RuntimeError, "weight"),
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
