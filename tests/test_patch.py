"""dualsn.torch.patch / dualsn.paddle.patch: the frameworks' built-in spectral-norm functions
build dualsn's spectral norm while the patch is in force, and the exact originals come back."""

import importlib

import numpy as np
import paddle
import pytest
import torch

import dualsn
from dualsn import patching
import dualsn.paddle as psn
import dualsn.torch as tsn

_torch_utils = importlib.import_module("torch.nn.utils")
_torch_params = importlib.import_module("torch.nn.utils.parametrizations")
_torch_legacy = importlib.import_module("torch.nn.utils.spectral_norm")  # the module
_paddle_utils = importlib.import_module("paddle.nn.utils")
_paddle_hook = importlib.import_module("paddle.nn.utils.spectral_norm_hook")
_paddle_nn = importlib.import_module("paddle.nn")

# Every attribute a patch replaces, and the object each holds unpatched.
TORCH_SLOTS = [(_torch_params, "spectral_norm"), (_torch_utils, "spectral_norm"), (_torch_legacy, "spectral_norm")]
PADDLE_SLOTS = [(_paddle_utils, "spectral_norm"), (_paddle_hook, "spectral_norm"), (_paddle_nn, "spectral_norm")]
ORIGINALS = {(m.__name__, a): getattr(m, a) for m, a in TORCH_SLOTS + PADDLE_SLOTS}


def _all_original() -> bool:
    return all(getattr(m, a) is ORIGINALS[(m.__name__, a)] for m, a in TORCH_SLOTS + PADDLE_SLOTS)


@pytest.fixture(autouse=True)
def _no_patch_left_behind():
    """A failing test must not leave the built-ins patched for the tests after it."""
    assert _all_original()
    yield
    leftovers = list(patching._ACTIVE_PATCHES)
    for p in reversed(leftovers):
        p.undo()
    dualsn.manual_seed(None)
    assert not leftovers, f"patches left active: {leftovers}"
    assert _all_original()


# ---------------------------------------------------------------------------------------------
# Restoring the originals: context manager, undo, nesting, exceptions


@pytest.mark.parametrize("backend, slots", [(tsn, TORCH_SLOTS), (psn, PADDLE_SLOTS)], ids=["torch", "paddle"])
def test_context_manager_replaces_and_restores_identity(backend, slots):
    with backend.patch() as p:
        assert p.active
        for module, attr in slots:
            assert getattr(module, attr) is not ORIGINALS[(module.__name__, attr)], (module.__name__, attr)
    assert not p.active
    assert _all_original()


@pytest.mark.parametrize("backend", [tsn, psn], ids=["torch", "paddle"])
def test_plain_call_and_idempotent_undo(backend):
    p = backend.patch()
    assert not _all_original()
    p.undo()
    assert _all_original()
    p.undo()  # a second undo changes nothing
    assert _all_original()
    with p:  # exiting an undone patch's with changes nothing either
        pass
    assert _all_original()


def test_exception_inside_with_restores_and_propagates():
    with pytest.raises(RuntimeError, match="boom"):
        with tsn.patch(), psn.patch():
            raise RuntimeError("boom")
    assert _all_original()


def test_nested_patches_unwind_in_order_torch():
    with tsn.patch(compat="torch_legacy"):
        outer = _torch_params.spectral_norm
        with tsn.patch(compat="torch"):
            layer = _torch_params.spectral_norm(torch.nn.Linear(4, 3))
            assert tsn.get_spectral_norm(layer).spec.order == "uv"
        assert _torch_params.spectral_norm is outer
        layer = _torch_params.spectral_norm(torch.nn.Linear(4, 3))
        assert tsn.get_spectral_norm(layer).spec.order == "vu"
    assert _all_original()


def test_nested_patches_unwind_in_order_paddle():
    with psn.patch(compat="paddle"):
        outer = _paddle_utils.spectral_norm
        with psn.patch(compat="torch"):
            assert psn.get_spectral_norm(_paddle_utils.spectral_norm(paddle.nn.Linear(4, 3))).spec.order == "uv"
        assert _paddle_utils.spectral_norm is outer
        assert psn.get_spectral_norm(_paddle_utils.spectral_norm(paddle.nn.Linear(4, 3))).spec.order == "vu"
    assert _all_original()


@pytest.mark.parametrize("backend", [tsn, psn], ids=["torch", "paddle"])
def test_undo_out_of_order(backend):
    """Plain calls undone oldest first: the later patch stays in force, then the originals."""
    first = backend.patch(compat="torch_legacy")
    second = backend.patch(compat="torch")
    installed = [getattr(m, a) for m, a in (TORCH_SLOTS if backend is tsn else PADDLE_SLOTS)]
    first.undo()
    assert [getattr(m, a) for m, a in (TORCH_SLOTS if backend is tsn else PADDLE_SLOTS)] == installed
    second.undo()
    assert _all_original()


# ---------------------------------------------------------------------------------------------
# What the patched functions build


def test_torch_default_presets_follow_each_builtin():
    p = tsn.patch()
    try:
        modern = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(5, 4))
        legacy = torch.nn.utils.spectral_norm(torch.nn.Linear(5, 4))
        legacy_module_fn = _torch_legacy.spectral_norm(torch.nn.Linear(5, 4))
    finally:
        p.undo()
    assert p.compat == {
        "torch.nn.utils.parametrizations.spectral_norm": "torch",
        "torch.nn.utils.spectral_norm": "torch_legacy",
    }
    modern_spec = tsn.get_spectral_norm(modern).spec
    assert (modern_spec.order, modern_spec.warmup_iterations) == ("uv", 15)
    for layer in (legacy, legacy_module_fn):
        spec = tsn.get_spectral_norm(layer).spec
        assert (spec.order, spec.warmup_iterations) == ("vu", 0)


def test_torch_given_compat_applies_to_both_builtins():
    with tsn.patch(compat="torch") as p:
        legacy = torch.nn.utils.spectral_norm(torch.nn.Linear(5, 4))
    assert set(p.compat.values()) == {"torch"}
    assert tsn.get_spectral_norm(legacy).spec.order == "uv"


def test_torch_patched_parametrization_reproduces_the_builtin():
    """compat "torch" without a seed draws u, v from torch's RNG as the built-in does: the
    patched call gives the built-in's numbers exactly."""
    torch.manual_seed(0)
    builtin = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(6, 5))
    torch.manual_seed(0)
    with tsn.patch():
        patched = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(6, 5))
    assert tsn.is_spectral_norm(patched) and not tsn.is_spectral_norm(builtin)
    np.testing.assert_array_equal(
        builtin.parametrizations.weight[0]._u.numpy(), patched.parametrizations.weight[0]._u.numpy()
    )
    x = torch.randn(3, 6)
    np.testing.assert_allclose(builtin(x).detach().numpy(), patched(x).detach().numpy(), rtol=1e-6, atol=1e-7)


def test_torch_builtin_arguments_are_forwarded():
    with tsn.patch():
        by_position = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(6, 5), "weight", 3, 1e-6, 1)
        by_keyword = torch.nn.utils.spectral_norm(
            module=torch.nn.Linear(6, 5), name="weight", n_power_iterations=2, eps=1e-8, dim=-1
        )
    sn = tsn.get_spectral_norm(by_position)
    assert (sn.spec.n_power_iterations, sn.spec.eps, sn.dim) == (3, 1e-6, 1)
    sn = tsn.get_spectral_norm(by_keyword)
    assert (sn.spec.n_power_iterations, sn.spec.eps, sn.dim) == (2, 1e-8, 1)


def test_torch_defaults_and_manual_seed_are_forwarded():
    weight = torch.randn(5, 6)

    def linear():
        layer = torch.nn.Linear(6, 5)
        with torch.no_grad():
            layer.weight.copy_(weight)
        return layer

    with tsn.patch(num_svs=2, track_sigma=True, seed=11):
        patched = torch.nn.utils.parametrizations.spectral_norm(linear())
    direct = tsn.spectral_norm(linear(), num_svs=2, track_sigma=True, seed=11)
    sn = tsn.get_spectral_norm(patched)
    assert (sn.spec.num_svs, sn.track_sigma) == (2, True)
    np.testing.assert_array_equal(sn._u.numpy(), tsn.get_spectral_norm(direct)._u.numpy())

    dualsn.manual_seed(7)
    with tsn.patch():
        patched = torch.nn.utils.parametrizations.spectral_norm(linear())
    dualsn.manual_seed(7)
    direct = tsn.spectral_norm(linear())
    np.testing.assert_array_equal(
        tsn.get_spectral_norm(patched)._u.numpy(), tsn.get_spectral_norm(direct)._u.numpy()
    )


def test_paddle_default_compat_is_torch_and_every_home_is_patched():
    with psn.patch() as p:
        layers = [
            paddle.nn.utils.spectral_norm(paddle.nn.Linear(5, 4)),
            _paddle_hook.spectral_norm(paddle.nn.Linear(5, 4)),
            paddle.nn.spectral_norm(paddle.nn.Linear(5, 4)),
        ]
    assert p.compat == {"paddle.nn.utils.spectral_norm": "torch"}
    for layer in layers:
        spec = psn.get_spectral_norm(layer).spec
        assert (spec.order, spec.warmup_iterations) == ("uv", 15)


def test_paddle_builtin_arguments_are_forwarded():
    with psn.patch(compat="paddle"):
        # PaConvert writes the layer as a keyword.
        by_keyword = paddle.nn.utils.spectral_norm(layer=paddle.nn.Linear(6, 5), n_power_iterations=2)
        by_position = paddle.nn.utils.spectral_norm(paddle.nn.Linear(6, 5), "weight", 3, 1e-6, 0)
        compat_linear = paddle.nn.utils.spectral_norm(layer=paddle.compat.nn.Linear(6, 5))
    hook = psn.get_spectral_norm(by_keyword)
    assert (hook.spec.order, hook.spec.n_power_iterations, hook.spec.eps, hook.dim) == ("vu", 2, 1e-12, 1)
    hook = psn.get_spectral_norm(by_position)
    assert (hook.spec.n_power_iterations, hook.spec.eps, hook.dim) == (3, 1e-6, 0)
    # paddle.compat.nn.Linear keeps torch's [out, in] weight: dim 0, as the built-in picks.
    assert psn.get_spectral_norm(compat_linear).dim == 0


def test_paddle_defaults_and_seed_match_a_direct_registration():
    weight = np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32)

    def linear():
        layer = paddle.nn.Linear(6, 5)
        layer.weight.set_value(weight)
        return layer

    with psn.patch(seed=4, coeff=0.9):
        patched = paddle.nn.utils.spectral_norm(linear())
    direct = psn.spectral_norm(linear(), seed=4, coeff=0.9)
    assert psn.get_spectral_norm(patched).spec.coeff == 0.9
    np.testing.assert_array_equal(patched.weight_u.numpy(), direct.weight_u.numpy())
    x = paddle.to_tensor(np.ones((2, 6), np.float32))
    np.testing.assert_array_equal(patched(x).numpy(), direct(x).numpy())


def test_names_bound_before_the_patch_keep_the_builtin():
    """Documented limitation: `from paddle.nn.utils import spectral_norm` run before the patch
    holds the built-in itself; the patch replaces module attributes only."""
    from paddle.nn.utils import spectral_norm as bound_early

    with psn.patch():
        layer = bound_early(paddle.nn.Linear(4, 3))
        from paddle.nn.utils import spectral_norm as bound_inside

        assert psn.is_spectral_norm(bound_inside(paddle.nn.Linear(4, 3)))
    assert not psn.is_spectral_norm(layer)


# ---------------------------------------------------------------------------------------------
# Errors: refused before anything is patched


@pytest.mark.parametrize("backend", [tsn, psn], ids=["torch", "paddle"])
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"compat": "nope"}, ValueError, "compat='nope'"),
        ({"compat": 3}, TypeError, "compat"),
        ({"dim": 1}, TypeError, r"\['dim'\]"),
        ({"name": "bias"}, TypeError, r"\['name'\]"),
        ({"num_svs": 0}, ValueError, "num_svs"),
        ({"seed": -1}, ValueError, "seed"),
        ({"track_sigma": "yes"}, ValueError, "track_sigma"),
    ],
)
def test_bad_arguments_refused_before_patching(backend, kwargs, error, match):
    with pytest.raises(error, match=match):
        backend.patch(**kwargs)
    assert _all_original()
    assert patching._ACTIVE_PATCHES == []
