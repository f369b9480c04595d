"""dualsn.torch as a stand-in for ``torch.nn.utils.parametrizations.spectral_norm``.

PyTorch checks its parametrized spectral norm for: the parametrization's structure (trainable
``original``, ``_u``/``_v`` buffers, the weight neither a parameter nor a buffer), several
spectral norms on one module (stacked on ``weight``, one on ``bias``) removed with
``parametrize.remove_parametrizations``, gradients of two training forwards from reset u, v,
eval mode reusing the last training state, removal in eval mode keeping the output, state
dicts surviving removal and re-registration, ``dim`` of transposed convolutions, one plain
power-iteration step, and the value on a diagonal weight. The tests below hold dualsn to each
of these, with numbers: against the built-in itself (same u, v: copied over, or drawn from the
same torch seed), against numpy, and against hand-computed expectations.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402
from torch.nn.utils.parametrizations import spectral_norm as builtin_spectral_norm  # noqa: E402

import dualsn.torch as dt  # noqa: E402

# float64 results of the two implementations differ by rounding only (dualsn takes sigma from
# the last power-iteration norm, the built-in from a third product).
TIGHT = dict(rtol=1e-10, atol=1e-12)

STATE_KEYS = {
    "parametrizations.weight.original",
    "parametrizations.weight.0._u",
    "parametrizations.weight.0._v",
    "bias",
}


# ---------------------------------------------------------------------------------------------
# Helpers


def make_layer(kind: str, seed: int = 0) -> nn.Module:
    """A float64 layer with weights drawn from a fixed torch seed."""
    torch.manual_seed(seed)
    factories = {
        "linear": lambda: nn.Linear(5, 7),
        "small_linear": lambda: nn.Linear(3, 4),
        "conv2d": lambda: nn.Conv2d(3, 4, 3),
        "conv_transpose2d": lambda: nn.ConvTranspose2d(3, 4, (5, 6)),
    }
    return factories[kind]().double()


def make_input(kind: str, seed: int = 1) -> torch.Tensor:
    shapes = {
        "linear": (3, 5),
        "small_linear": (2, 3),
        "conv2d": (2, 3, 6, 6),
        "conv_transpose2d": (2, 3, 10, 12),
    }
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shapes[kind], generator=g, dtype=torch.float64)


def vectors(module: nn.Module, name: str = "weight"):
    """[(u, v), ...] of every spectral norm on ``module.<name>``, in registration order (None,
    None for an exactly normalized 1-D weight: the built-in then has no such attributes)."""
    return [(getattr(p, "_u", None), getattr(p, "_v", None)) for p in module.parametrizations[name]]


def copy_vectors(source: nn.Module, target: nn.Module, name: str = "weight") -> None:
    """Give ``target``'s spectral norms on ``name`` the u, v of ``source``'s (in place)."""
    with torch.no_grad():
        for (su, sv), (tu, tv) in zip(vectors(source, name), vectors(target, name)):
            if su is None:
                assert tu is None
                continue
            tu.copy_(su)
            tv.copy_(sv)


def twins(kind: str, registrations=("weight",)):
    """(dualsn module, built-in module): equal weights, the same spectral norms registered on
    each (``registrations``: parameter names, in order), dualsn's u, v copied from the
    built-in's so that both hold the same state."""
    ours, theirs = make_layer(kind), make_layer(kind)
    for name in registrations:
        dt.spectral_norm(ours, name)
        builtin_spectral_norm(theirs, name)
    for name in set(registrations):
        copy_vectors(theirs, ours, name)
    return ours, theirs


def w_matrix(weight: np.ndarray, dim: int) -> np.ndarray:
    """The W-matrix: axis ``dim`` first, the rest flattened."""
    moved = np.moveaxis(weight, dim, 0)
    return moved.reshape(moved.shape[0], -1)


def top_singular_value(weight: torch.Tensor, dim: int = 0) -> float:
    return float(np.linalg.svd(w_matrix(weight.detach().numpy(), dim), compute_uv=False)[0])


# ---------------------------------------------------------------------------------------------
# Structure


def test_parametrization_structure_matches_builtin():
    m = dt.spectral_norm(make_layer("linear"))
    plist = m.parametrizations.weight
    sn = plist[0]

    assert type(sn) is dt.SpectralNorm
    # the unnormalized weight is the one trainable tensor behind m.weight
    assert "original" in plist._parameters
    assert isinstance(plist.original, nn.Parameter) and plist.original.requires_grad
    # u and v are buffers, sized by the W-matrix (7 x 5)
    assert set(sn._buffers) - sn._non_persistent_buffers_set == {"_u", "_v"}  # the state
    assert sn._non_persistent_buffers_set == {"_u_recovery", "_v_recovery"}  # constants of dualsn's own
    assert sn._u.shape == (7,) and sn._v.shape == (5,)
    torch.testing.assert_close(torch.linalg.vector_norm(sn._u).item(), 1.0, **TIGHT)
    torch.testing.assert_close(torch.linalg.vector_norm(sn._v).item(), 1.0, **TIGHT)
    # m.weight is computed: neither a parameter nor a buffer of m, with original's geometry
    assert "weight" not in m._parameters and "weight" not in m._buffers
    assert not isinstance(m.weight, nn.Parameter)
    assert m.weight.shape == plist.original.shape
    assert m.weight.stride() == plist.original.stride()
    assert {n: p.shape for n, p in m.named_parameters()} == {
        "parametrizations.weight.original": (7, 5),
        "bias": (7,),
    }


@pytest.mark.parametrize("training_forwards", [0, 3])
def test_state_dict_keys_are_the_builtins(training_forwards):
    ours, theirs = twins("small_linear")
    x = make_input("small_linear")
    for _ in range(training_forwards):
        ours(x)
        theirs(x)
    assert set(ours.state_dict()) == STATE_KEYS
    assert set(theirs.state_dict()) == STATE_KEYS


# ---------------------------------------------------------------------------------------------
# Values against the built-in, numpy and hand computation


@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv_transpose2d"])
def test_training_run_matches_builtin(kind):
    """Same weights and u, v: every forward, u, v and gradient agree through SGD steps."""
    ours, theirs = twins(kind)
    x = make_input(kind)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.05)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.05)
    for _ in range(4):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            model(x).square().mean().backward()
        torch.testing.assert_close(ours(x), theirs(x), **TIGHT)
        for (u, v), (bu, bv) in zip(vectors(ours), vectors(theirs)):
            torch.testing.assert_close(u, bu, **TIGHT)
            torch.testing.assert_close(v, bv, **TIGHT)
        torch.testing.assert_close(
            ours.parametrizations.weight.original.grad, theirs.parametrizations.weight.original.grad, **TIGHT
        )
        opt_ours.step()
        opt_theirs.step()
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), **TIGHT)


@pytest.mark.parametrize("n_power_iterations", [1, 3])
def test_training_forward_is_the_textbook_power_step(n_power_iterations):
    """u <- N(W v), v <- N(W^T u), n times, then W / (u . W v), written out in numpy."""
    m = dt.spectral_norm(make_layer("linear"), n_power_iterations=n_power_iterations)
    sn = m.parametrizations.weight[0]
    w = m.parametrizations.weight.original.detach().numpy().copy()
    b = m.bias.detach().numpy()
    v = sn._v.numpy().copy()
    for _ in range(n_power_iterations):
        u = w @ v
        u /= np.linalg.norm(u)
        v = w.T @ u
        v /= np.linalg.norm(v)
    sigma = u @ w @ v
    x = make_input("linear")

    out = m(x)

    np.testing.assert_allclose(out.detach().numpy(), x.numpy() @ (w / sigma).T + b, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(sn._u.numpy(), u, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(sn._v.numpy(), v, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dt.sigma(m), sigma, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64, torch.complex128])
def test_diagonal_weight_is_divided_by_its_largest_magnitude(dtype):
    if dtype.is_complex:
        diagonal = torch.tensor([0.3 + 0.4j, -1.2 + 0.5j, 0.1 - 0.2j], dtype=dtype)  # |.| 0.5, 1.3, 0.22
    else:
        diagonal = torch.tensor([0.5, -2.0, 0.25], dtype=dtype)
    expected = torch.diag(diagonal / diagonal.abs().max())
    weights = {}
    for register in (dt.spectral_norm, builtin_spectral_norm):
        m = nn.Linear(3, 3, dtype=dtype)
        with torch.no_grad():
            m.weight = nn.Parameter(torch.diag(diagonal))
            torch.manual_seed(7)  # the same draw of u, v for both
            register(m)
            weights[register] = m.weight.detach().clone()
    tol = dict(rtol=1e-6, atol=1e-6) if dtype in (torch.float32, torch.complex64) else TIGHT
    torch.testing.assert_close(weights[dt.spectral_norm], expected, **tol)
    torch.testing.assert_close(weights[dt.spectral_norm], weights[builtin_spectral_norm], **tol)


@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
@pytest.mark.parametrize("shape, dim", [((6, 4), 0), ((3, 5), 0), ((4, 3, 2, 2), 1), ((2, 3, 4), 2)])
def test_converged_sigma_is_the_largest_singular_value(shape, dim, dtype):
    rng = np.random.default_rng(3)
    w = rng.standard_normal(shape)
    if dtype is np.complex128:
        w = w + 1j * rng.standard_normal(shape)
    m = nn.Module()
    m.weight = nn.Parameter(torch.from_numpy(w.astype(dtype)))
    dt.spectral_norm(m, dim=dim)
    with torch.no_grad():
        for _ in range(300):
            normalized = m.weight
    exact = np.linalg.svd(w_matrix(w, dim), compute_uv=False)
    np.testing.assert_allclose(dt.sigma(m), exact[0], rtol=1e-9)
    np.testing.assert_allclose(
        np.linalg.svd(w_matrix(normalized.numpy(), dim), compute_uv=False), exact / exact[0], rtol=1e-9, atol=1e-12
    )


def test_conv_transpose_normalizes_along_output_channels():
    """ConvTranspose weights are (in, out, kh, kw): the default dim is 1, so u has one entry per
    output channel, as in the built-in."""
    ours, theirs = twins("conv_transpose2d")
    plist = ours.parametrizations.weight
    sn = plist[0]
    assert sn.dim == 1
    assert sn._u.shape == plist.original[0, :, 0, 0].shape == (4,)
    assert sn._v.shape == (3 * 5 * 6,)
    assert theirs.parametrizations.weight[0]._u.shape == sn._u.shape
    x = make_input("conv_transpose2d")
    assert ours(x).shape == (2, 4, 14, 17)
    with torch.no_grad():
        for _ in range(300):
            ours.weight
    np.testing.assert_allclose(dt.sigma(ours), top_singular_value(plist.original, dim=1), rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# Gradients


def _double_forward(module, x, saved):
    """Reset u, v to ``saved``, then two training forwards; their sum."""
    sn = module.parametrizations.weight[0]
    with torch.no_grad():
        sn._u.copy_(saved[0])
        sn._v.copy_(saved[1])
    return module(x) + module(x)


def _mixed_forwards(module, x, saved):
    """Reset u, v, then train, eval, train, eval forwards; their sum (ends in training mode)."""
    sn = module.parametrizations.weight[0]
    with torch.no_grad():
        sn._u.copy_(saved[0])
        sn._v.copy_(saved[1])
    total = 0
    for training in (True, False, True, False):
        module.train(training)
        total = total + module(x)
    module.train()
    return total


def _after_one_sgd_step(module, x):
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    opt.zero_grad()
    module(x).sum().backward()
    opt.step()


@pytest.mark.parametrize("weight_requires_grad", [True, False])
def test_gradcheck_of_double_forward_from_reset_vectors(weight_requires_grad):
    """In the input: in training mode u, v move with W (a finite difference in W would see
    that, the gradient treats them as constants, as the built-in does)."""
    m = make_layer("small_linear")
    m.weight.requires_grad_(weight_requires_grad)
    dt.spectral_norm(m)
    x = make_input("small_linear")
    _after_one_sgd_step(m, x)
    sn = m.parametrizations.weight[0]
    saved = (sn._u.clone(), sn._v.clone())
    _double_forward(m, x.clone().requires_grad_(), saved).sum().backward()  # reaches every parameter
    if weight_requires_grad:
        assert m.parametrizations.weight.original.grad is not None

    inputs = (x.clone().requires_grad_(),)
    assert torch.autograd.gradcheck(lambda x: _double_forward(m, x, saved), inputs)
    assert torch.autograd.gradcheck(lambda x: _mixed_forwards(m, x, saved), inputs, check_batched_grad=True)


def test_eval_gradcheck_in_the_weight_with_batched_grad():
    """check_batched_grad runs the backward under vmap: no .item() on a batched gradient."""
    m = dt.spectral_norm(make_layer("small_linear"))
    x = make_input("small_linear")
    m(x)
    m.eval()
    original = m.parametrizations.weight.original
    assert torch.autograd.gradcheck(lambda w: m(x), (original,), check_batched_grad=True)


def test_double_forward_gradients_match_builtin():
    ours, theirs = twins("small_linear")
    x = make_input("small_linear")
    saved = tuple(t.clone() for t in vectors(theirs)[0])
    grads = []
    for model in (ours, theirs):
        xi = x.clone().requires_grad_()
        _double_forward(model, xi, saved).square().sum().backward()
        grads.append((xi.grad, model.parametrizations.weight.original.grad, model.bias.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TIGHT)


# ---------------------------------------------------------------------------------------------
# Eval mode and removal


@pytest.mark.parametrize("weight_requires_grad", [True, False])
def test_eval_reproduces_last_training_output_and_freezes_vectors(weight_requires_grad):
    m = make_layer("small_linear")
    m.weight.requires_grad_(weight_requires_grad)
    dt.spectral_norm(m)
    x = make_input("small_linear")
    m(x)
    last_train = m(x)
    u, v = (t.clone() for t in vectors(m)[0])

    m.eval()
    first_eval = m(x)
    torch.testing.assert_close(first_eval, last_train, **TIGHT)
    assert torch.equal(m(x), first_eval)
    assert torch.equal(m(x), first_eval)
    assert torch.equal(vectors(m)[0][0], u)
    assert torch.equal(vectors(m)[0][1], v)


@pytest.mark.parametrize("training_forwards", [1, 3])
def test_torch_removal_in_eval_keeps_the_output(training_forwards):
    m = dt.spectral_norm(make_layer("small_linear"))
    x = make_input("small_linear")
    for _ in range(training_forwards):
        before = m(x).detach()
    u, v = (t.clone() for t in vectors(m)[0])

    m.eval()
    parametrize.remove_parametrizations(m, "weight")  # leave_parametrized=True: W / sigma stays

    assert type(m) is nn.Linear and not hasattr(m, "parametrizations")
    assert isinstance(m._parameters["weight"], nn.Parameter) and m.weight.requires_grad
    torch.testing.assert_close(m(x), before, **TIGHT)
    # no power iteration ran: the weight is W / (u . W v) for the last u, v
    w = make_layer("small_linear").weight.detach()  # original weights (no optimizer step ran)
    torch.testing.assert_close(m.weight.detach(), w / (u @ w @ v), **TIGHT)


def test_torch_removal_in_training_mode_matches_builtin():
    """In training mode remove_parametrizations evaluates the weight once more (one more
    iteration), in the built-in as in dualsn."""
    ours, theirs = twins("linear")
    x = make_input("linear")
    ours(x)
    theirs(x)
    parametrize.remove_parametrizations(ours, "weight")
    parametrize.remove_parametrizations(theirs, "weight")
    torch.testing.assert_close(ours.weight, theirs.weight, **TIGHT)
    torch.testing.assert_close(ours(x), theirs(x), **TIGHT)


def test_stacked_on_weight_and_one_on_bias_then_removed_with_torch():
    ours, theirs = twins("linear", registrations=("weight", "weight", "bias"))
    x = make_input("linear")

    stack = ours.parametrizations.weight
    assert len(stack) == 2 and all(type(p) is dt.SpectralNorm for p in stack)
    bias_sn = ours.parametrizations.bias[0]
    assert type(bias_sn) is dt.SpectralNorm and bias_sn._u is None and bias_sn._v is None
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {
        "parametrizations.weight.original",
        "parametrizations.weight.0._u",
        "parametrizations.weight.0._v",
        "parametrizations.weight.1._u",
        "parametrizations.weight.1._v",
        "parametrizations.bias.original",
    }
    for _ in range(2):
        torch.testing.assert_close(ours(x), theirs(x), **TIGHT)
    for (u, v), (bu, bv) in zip(vectors(ours), vectors(theirs)):
        torch.testing.assert_close(u, bu, **TIGHT)
        torch.testing.assert_close(v, bv, **TIGHT)
    # a 1-D weight is normalized exactly
    b = ours.parametrizations.bias.original.detach()
    torch.testing.assert_close(ours.bias, b / torch.linalg.vector_norm(b), **TIGHT)

    # remove the bias's: the weight keeps both of its spectral norms
    for model in (ours, theirs):
        parametrize.remove_parametrizations(model, "bias")
    assert "bias" in ours._parameters
    torch.testing.assert_close(ours.bias.detach(), b / torch.linalg.vector_norm(b), **TIGHT)
    assert parametrize.is_parametrized(ours, "weight") and "weight" not in ours._parameters
    assert len(ours.parametrizations.weight) == 2

    # remove the weight's, both at once
    for model in (ours, theirs):
        parametrize.remove_parametrizations(model, "weight")
    assert not parametrize.is_parametrized(ours) and not hasattr(ours, "parametrizations")
    assert type(ours) is nn.Linear and "weight" in ours._parameters
    torch.testing.assert_close(ours.weight, theirs.weight, **TIGHT)
    torch.testing.assert_close(ours(x), theirs(x), **TIGHT)


# ---------------------------------------------------------------------------------------------
# State dicts


def test_non_strict_loading_takes_what_is_there():
    donor = dt.spectral_norm(make_layer("small_linear", seed=5))
    donor(make_input("small_linear"))
    state = copy.deepcopy(donor.state_dict())
    state["nonsense"] = "nonsense"
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "nonsense"'):
        dt.spectral_norm(make_layer("small_linear")).load_state_dict(state, strict=True)

    m = dt.spectral_norm(make_layer("small_linear"))
    original_before = m.parametrizations.weight.original.detach().clone()
    del state["parametrizations.weight.original"], state["parametrizations.weight.0._v"]
    m.load_state_dict(state, strict=False)
    sn, donor_sn = m.parametrizations.weight[0], donor.parametrizations.weight[0]
    assert torch.equal(sn._u, donor_sn._u)  # loaded
    assert not torch.equal(sn._v, donor_sn._v)  # absent: kept
    assert torch.equal(m.parametrizations.weight.original, original_before)
    assert torch.equal(m.bias, donor.bias)


def _record(module: nn.Module, state, x):
    """Load ``state``, then eval, train, train, eval forwards without grad: their outputs."""
    module.load_state_dict(state)
    outs = []
    with torch.no_grad():
        for training in (False, True, True, False):
            module.train(training)
            outs.append(module(x))
    return outs


@pytest.mark.parametrize("training_forwards", [0, 3])
def test_state_dict_survives_removal_and_reregistration(training_forwards):
    m = dt.spectral_norm(make_layer("small_linear"))
    x = make_input("small_linear")
    for _ in range(training_forwards):
        m(x)
    state = copy.deepcopy(m.state_dict())

    runs = []
    for _ in range(2):
        m = dt.spectral_norm(parametrize.remove_parametrizations(m, "weight"))
        runs.append(_record(m, state, x))
    for a, b in zip(*runs):
        assert torch.equal(a, b)

    # the built-in, loading the same state dict, computes the same outputs
    reference = _record(builtin_spectral_norm(make_layer("small_linear", seed=9)), state, x)
    for a, b in zip(runs[0], reference):
        torch.testing.assert_close(a, b, **TIGHT)


@pytest.mark.parametrize("training", [True, False])
def test_stacked_registration_reproduces_the_builtin(training):
    """Two spectral norms on weight and one on bias, from the same torch RNG draws: the
    built-in's registration check re-evaluates the stacked weight (one more iteration of the
    first norm in training mode), and dualsn's registration does the same."""
    modules = []
    for register in (torch.nn.utils.parametrizations.spectral_norm, dt.spectral_norm):
        torch.manual_seed(3)
        m = nn.Linear(5, 4).double().train(training)
        for name in ("weight", "weight", "bias"):
            register(m, name)
        modules.append(m)
    builtin, ours = modules
    for i in range(2):
        for buffer in ("_u", "_v"):
            a = getattr(builtin.parametrizations.weight[i], buffer)
            b = getattr(ours.parametrizations.weight[i], buffer)
            torch.testing.assert_close(b, a, rtol=1e-13, atol=1e-15)
    with torch.no_grad():
        torch.testing.assert_close(ours.weight, builtin.weight, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(ours.bias, builtin.bias, rtol=1e-13, atol=1e-15)
