"""Where spectral norms live on a module: lookup (:func:`_find`, :func:`get_spectral_norm`),
the checks on the tensor to normalize, registration and removal as torch parametrizations,
pickling of parametrized modules, and which layers default to ``dim=1``.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn
from torch.nn.utils import parametrizations as _parametrizations
from torch.nn.utils import parametrize

from dualsn import options as _options
from dualsn import spec as _spec
from dualsn.torch._sn import SpectralNorm

# The module, not the function ``torch.nn.utils.spectral_norm`` that shadows it.
_legacy = importlib.import_module("torch.nn.utils.spectral_norm")


# ---------------------------------------------------------------------------------------------
# Pickling. parametrize gives each parametrized module a class of its own, made on the fly,
# whose __getstate__ refuses to pickle ("only supported through state_dict()"). A module
# carrying dualsn's spectral norm pickles instead as: its original class, the names of its
# parametrized tensors and its __dict__; unpickling makes a bare instance, lets parametrize
# give it a fresh class and properties, and restores the __dict__ (parametrizations
# included). So torch.save(model) and copy / multiprocessing pickles work.


def _rebuild_parametrized(base_cls: type, names: tuple[str, ...]) -> nn.Module:
    module = base_cls.__new__(base_cls)
    parametrize._inject_new_class(module)
    for name in names:
        parametrize._inject_property(module, name)
    _make_picklable(module)
    return module


def _reduce_parametrized(module: nn.Module, protocol):
    base_cls = type(module).__bases__[0]
    names = tuple(module.parametrizations.keys())
    return _rebuild_parametrized, (base_cls, names), module.__dict__.copy()


def _make_picklable(module: nn.Module) -> None:
    """Let the parametrized ``module`` be pickled (its class is its own: see above)."""
    if hasattr(parametrize, "_inject_new_class") and hasattr(parametrize, "_inject_property"):
        type(module).__reduce_ex__ = _reduce_parametrized


# ---------------------------------------------------------------------------------------------
# Lookup


def _find(module: nn.Module, name: str):
    """(parametrization list, index, SpectralNorm) of dualsn's SN on ``name``, or None."""
    if not isinstance(name, str) or not parametrize.is_parametrized(module, name):
        return None
    plist = module.parametrizations[name]
    for index, p in enumerate(plist):
        if isinstance(p, SpectralNorm):
            return plist, index, p
    return None


def get_spectral_norm(module: nn.Module, name: str = "weight") -> SpectralNorm | None:
    """The :class:`SpectralNorm` parametrization on ``module.<name>``, or None."""
    found = _find(module, name)
    return None if found is None else found[2]


def is_spectral_norm(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.<name>`` carries a dualsn spectral norm."""
    return _find(module, name) is not None


def _has_legacy_hook(module: nn.Module, name: str) -> bool:
    return any(isinstance(h, _legacy.SpectralNorm) and h.name == name for h in module._forward_pre_hooks.values())


def _has_any_spectral_norm(module: nn.Module, name: str) -> bool:
    """dualsn's, or either torch built-in's, spectral norm on ``name``."""
    if is_spectral_norm(module, name):
        return True
    if parametrize.is_parametrized(module, name):
        builtin = _parametrizations._SpectralNorm
        if any(isinstance(p, builtin) for p in module.parametrizations[name]):
            return True
    return _has_legacy_hook(module, name)


def _sn_input(plist, index: int) -> torch.Tensor:
    """The tensor the parametrization at ``index`` receives (what ``sigma`` is taken of)."""
    if plist.is_tensor:
        originals = [plist.original]
    else:
        originals = [getattr(plist, f"original{i}") for i in range(plist.ntensors)]
    if index == 0:
        return originals[0]
    x = plist[0](*originals)
    for k in range(1, index):
        x = plist[k](x)
    return x


def _is_dim_1_layer(module: nn.Module) -> bool:
    for dotted in _spec.DEFAULT_DIM_1_LAYERS["torch"]:
        module_name, cls_name = dotted.rsplit(".", 1)
        if isinstance(module, getattr(importlib.import_module(module_name), cls_name)):
            return True
    return False


def _check_is_module(module, function: str) -> None:
    """TypeError naming the right function when ``module`` is not a torch module."""
    if not isinstance(module, nn.Module):
        raise _options.wrong_model("torch", module, function)


def _require(module: nn.Module, name: str, function: str):
    """:func:`_find`'s (parametrization list, index, SpectralNorm), or the error ``function``
    raises without one."""
    _check_is_module(module, function)
    _spec.check_name(name)
    found = _find(module, name)
    if found is None:
        raise ValueError(f"Expected a dualsn spectral norm on name={name!r}, but {type(module).__name__} has none")
    return found


# ---------------------------------------------------------------------------------------------
# Registration and removal


def _target_weight(module: nn.Module, name: str, stackable: bool = False) -> torch.Tensor:
    """The tensor spectral norm would be put on, after every check that needs no algorithm
    parameter (errors as common to both entry points; nothing is changed).

    ``stackable``: a parametrization may go on top of others on ``name`` (compat "torch",
    as torch's own parametrization allows); hooks never stack, as in their built-ins.
    """
    _check_is_module(module, "spectral_norm")
    _spec.check_name(name)
    if _has_legacy_hook(module, name) or (not stackable and _has_any_spectral_norm(module, name)):
        raise RuntimeError(f"Cannot register two spectral norms on the same parameter {name!r}")
    is_tensor = (
        module._parameters.get(name) is not None
        or module._buffers.get(name) is not None
        or parametrize.is_parametrized(module, name)
    )
    if not is_tensor:
        present = [*module._parameters, *module._buffers]
        raise _options.parameter_not_found(name, type(module).__name__, "parameter or buffer", present)
    weight = getattr(module, name)
    # torch: lazy modules (nn.LazyLinear, ...); Paddle has no lazy layers.
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"Parameter {name!r} is uninitialized; run a forward pass of the lazy module "
            "before applying spectral norm"
        )
    _options.check_weight_dtype(name, weight.dtype, weight.is_floating_point() or weight.is_complex())
    _spec.check_weight_shape(tuple(weight.shape), name)
    return weight


def _register(module: nn.Module, name: str, weight: torch.Tensor, parametrization: SpectralNorm) -> nn.Module:
    """Registration proper, once everything is validated: the registration iterations, the
    parametrization, the kept sigma."""
    parametrization.owner = f"{name!r} in {type(module).__name__}"
    spec = parametrization.spec
    iterations = spec.registration_iterations(module.training)
    # The built-in's registration check evaluates module.<name> once more, and on a stacked
    # parametrization that runs the spectral norms below this one again (training mode):
    # its last iterations see that new weight. So do these.
    stacked = spec.registration_forward and module.training and parametrize.is_parametrized(module, name)
    check = spec.n_power_iterations if stacked else 0
    try:
        parametrization.iterate(weight, iterations - check)
        if check:
            weight = getattr(module, name)
            parametrization.iterate(weight, check)
    except FloatingPointError as error:
        raise FloatingPointError(f"spectral norm of {parametrization.owner}: {error}") from None
    # unsafe=True: register_parametrization would otherwise evaluate the parametrization once
    # (one more iteration in training mode); registration_iterations already counts that.
    parametrize.register_parametrization(module, name, parametrization, unsafe=True)
    if parametrization.track_sigma:
        parametrization._publish(weight, parametrization.sigma(weight))
    _make_picklable(module)
    return module


def _remove(module: nn.Module, name: str, plist, sn: SpectralNorm) -> nn.Module:
    """Removal proper, once it is allowed: ``module.<name>`` becomes a fresh leaf holding the
    normalized weight (eval mode's, no iteration), a Parameter if the original was one."""
    original = plist.original
    with torch.no_grad():
        normalized = sn._compute(original, training=False)[0].detach().clone()
    was_parameter = isinstance(original, nn.Parameter)
    parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    delattr(module, name)
    if was_parameter:
        module.register_parameter(name, nn.Parameter(normalized, requires_grad=original.requires_grad))
    else:
        module.register_buffer(name, normalized)
    return module
