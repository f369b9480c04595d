"""PyTorch backend of dualsn.

``spectral_norm(module)`` with the default ``compat="torch"`` is a drop-in for
``torch.nn.utils.parametrizations.spectral_norm``: same random draw, same registration
iterations, same per-forward arithmetic, same state-dict keys
(``parametrizations.<name>.original``, ``parametrizations.<name>.0._u`` / ``._v``). Other
presets (``"torch_legacy"``, ``"paddle"``) change the algorithm as ``dualsn.spec`` says,
while keeping the parametrization mechanism.

The algorithm's rules all come from :mod:`dualsn.spec`; this module only maps them onto
``torch.nn.utils.parametrize``.
"""

from __future__ import annotations

import importlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations as _parametrizations
from torch.nn.utils import parametrize

# The module, not the function ``torch.nn.utils.spectral_norm`` that shadows it.
_legacy = importlib.import_module("torch.nn.utils.spectral_norm")

from dualsn import spec as _spec

__all__ = [
    "SpectralNorm",
    "spectral_norm",
    "remove_spectral_norm",
    "sigma",
    "is_spectral_norm",
    "get_spectral_norm",
    "spectral_norm_forward",
    "power_iteration_",
]


# ---------------------------------------------------------------------------------------------
# The math. Kept as free functions so that a fused implementation can replace them.


def weight_to_matrix(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """The W-matrix: ``dim`` moved to the front, the other axes flattened.

    A 1-D weight (only reached in the spec's "matrix" vector mode) is an (n x 1) matrix.
    """
    if weight.ndim == 1:
        return weight.unsqueeze(1)
    if dim != 0:
        weight = weight.permute(dim, *(d for d in range(weight.ndim) if d != dim))
    return weight.flatten(1)


@torch.no_grad()
def power_iteration_(
    weight_mat: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n: int, order: str, eps: float
) -> None:
    """Run ``n`` power iterations in ``order``, writing the results into ``u`` and ``v``.

    The writes are in place (``out=``) on purpose: module replicas (DataParallel) share the
    buffers' storage with the original module, so this is how their updates survive.
    """
    weight_mat_h = weight_mat.H
    for _ in range(n):
        if order == "uv":
            F.normalize(torch.mv(weight_mat, v), dim=0, eps=eps, out=u)
            F.normalize(torch.mv(weight_mat_h, u), dim=0, eps=eps, out=v)
        else:
            F.normalize(torch.mv(weight_mat_h, u), dim=0, eps=eps, out=v)
            F.normalize(torch.mv(weight_mat, v), dim=0, eps=eps, out=u)


def spectral_norm_forward(
    weight: torch.Tensor,
    u: torch.Tensor | None,
    v: torch.Tensor | None,
    dim: int,
    spec: _spec.Spec,
    training: bool,
) -> torch.Tensor:
    """The normalized weight for one forward (the whole per-forward computation).

    Training mode first runs ``spec.n_power_iterations`` iterations on the ``u``, ``v``
    buffers in place. Gradients flow into ``weight`` only; u and v are constants.
    """
    if spec.is_exact_vector(weight.ndim):
        return F.normalize(weight, dim=0, eps=spec.eps)
    weight_mat = weight_to_matrix(weight, dim)
    if training:
        power_iteration_(weight_mat, u, v, spec.n_power_iterations, spec.order, spec.eps)
    # Clone so that a later forward, which updates the buffers in place, does not change
    # tensors this forward's graph saved for backward (loss = D(real) - D(fake)).
    u = u.clone(memory_format=torch.contiguous_format)
    v = v.clone(memory_format=torch.contiguous_format)
    sigma = torch.vdot(u, torch.mv(weight_mat, v))
    return weight / sigma


# ---------------------------------------------------------------------------------------------
# The parametrization


def _seeded_uv(h: int, w: int, seed: int, like: torch.Tensor, eps: float):
    """u, v from ``spec.init_uv`` in the weight's dtype and device."""
    u0, v0 = _spec.init_uv(h, w, seed, _spec.init_dtype(str(like.dtype)), eps)
    return tuple(torch.from_numpy(a).to(device=like.device, dtype=like.dtype) for a in (u0, v0))


class SpectralNorm(nn.Module):
    """Parametrization ``W -> W / sigma(W)``, registered by :func:`spectral_norm`.

    Attributes ``spec`` (the :class:`dualsn.spec.Spec`) and ``dim`` (non-negative) describe
    the algorithm. Buffers ``_u`` and ``_v`` hold the singular-vector estimates; they are
    None (and absent from the state dict) for a weight the spec normalizes exactly.

    The constructor only draws u and v; :func:`spectral_norm` runs the registration
    iterations.
    """

    def __init__(self, weight: torch.Tensor, dim: int, spec: _spec.Spec, seed: int | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.dim = dim
        u = v = None
        if not spec.is_exact_vector(weight.ndim):
            with torch.no_grad():
                h, w = weight_to_matrix(weight, dim).shape
                if seed is not None:
                    u, v = _seeded_uv(h, w, seed, weight, spec.eps)
                else:
                    # The torch built-ins' draw: u's normals, then v's, from torch's RNG.
                    u = F.normalize(weight.new_empty(h).normal_(0, 1), dim=0, eps=spec.eps)
                    v = F.normalize(weight.new_empty(w).normal_(0, 1), dim=0, eps=spec.eps)
        self.register_buffer("_u", u)
        self.register_buffer("_v", v)

    # Names the torch built-in's parametrization exposes, for tools that read them.
    @property
    def n_power_iterations(self) -> int:
        return self.spec.n_power_iterations

    @property
    def eps(self) -> float:
        return self.spec.eps

    def iterate(self, weight: torch.Tensor, n: int) -> None:
        """``n`` power iterations on ``weight``'s W-matrix (no-op without u, v)."""
        if self._u is not None and n > 0:
            power_iteration_(
                weight_to_matrix(weight, self.dim), self._u, self._v, n, self.spec.order, self.spec.eps
            )

    def sigma(self, weight: torch.Tensor) -> torch.Tensor:
        """sigma of ``weight`` from the current state, without iterating or recording grad."""
        with torch.no_grad():
            if self._u is None:
                return torch.linalg.vector_norm(weight).clamp_min(self.spec.eps)
            return torch.vdot(self._u, torch.mv(weight_to_matrix(weight, self.dim), self._v))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return spectral_norm_forward(weight, self._u, self._v, self.dim, self.spec, self.training)

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        # Assigning module.<name> = X stores X itself as the unnormalized weight.
        return value

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"dim={self.dim}, n_power_iterations={s.n_power_iterations}, eps={s.eps}, "
            f"order={s.order!r}, vector_mode={s.vector_mode!r}"
        )


# ---------------------------------------------------------------------------------------------
# Lookup helpers


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


def _has_any_spectral_norm(module: nn.Module, name: str) -> bool:
    """dualsn's, or either torch built-in's, spectral norm on ``name``."""
    if is_spectral_norm(module, name):
        return True
    if parametrize.is_parametrized(module, name):
        builtin = _parametrizations._SpectralNorm
        if any(isinstance(p, builtin) for p in module.parametrizations[name]):
            return True
    hooks = module._forward_pre_hooks.values()
    return any(isinstance(h, _legacy.SpectralNorm) and h.name == name for h in hooks)


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


# ---------------------------------------------------------------------------------------------
# Public API


def spectral_norm(
    module: nn.Module,
    name: str = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int | None = None,
    *,
    compat: str = "torch",
    seed: int | None = None,
) -> nn.Module:
    """Apply spectral normalization to ``module.<name>`` and return ``module``.

    Args:
        module: the module holding the parameter (or buffer).
        name: the parameter's name.
        n_power_iterations: power iterations per training-mode evaluation of the weight.
        eps: the floor of every norm.
        dim: the output-features axis; default 1 for transposed convolutions, else 0.
        compat: a :data:`dualsn.spec.PRESETS` key; ``"torch"`` reproduces
            ``torch.nn.utils.parametrizations.spectral_norm`` exactly.
        seed: draw u, v from :func:`dualsn.spec.init_uv` with this seed (identical in every
            framework). Without it the :func:`dualsn.manual_seed` stream is used if set,
            else torch's RNG, exactly as the built-in draws.

    Like the built-in, ``module.<name>`` is recomputed on every access, and every access in
    training mode runs the power iteration. Everything is validated before the module is
    touched: a failed call leaves it as it was.
    """
    sn_spec = _spec.make_spec(compat, n_power_iterations, eps)
    _spec.check_seed(seed)
    if not isinstance(module, nn.Module):
        raise TypeError(f"Expected module to be a torch.nn.Module, but got {type(module).__name__}")
    if not isinstance(name, str):
        raise ValueError(f"Expected name to be a str, but got name={name!r}")
    if _has_any_spectral_norm(module, name):
        raise RuntimeError(f"Cannot register two spectral norms on the same parameter {name!r}")
    is_tensor = (
        module._parameters.get(name) is not None
        or module._buffers.get(name) is not None
        or parametrize.is_parametrized(module, name)
    )
    if not is_tensor:
        raise ValueError(
            f"Expected name to be a parameter or buffer of {type(module).__name__}, "
            f"but it has none called name={name!r}"
        )
    weight = getattr(module, name)
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"Parameter {name!r} is uninitialized; run a forward pass of the lazy module "
            "before applying spectral norm"
        )
    if not (weight.is_floating_point() or weight.is_complex()):
        raise NotImplementedError(
            f"Spectral norm needs a floating-point or complex parameter, but {name!r} has "
            f"dtype {weight.dtype}"
        )
    _spec.check_weight_shape(tuple(weight.shape), name)
    dim = _spec.canonical_dim(
        _spec.default_dim(_is_dim_1_layer(module), weight.ndim) if dim is None else dim, weight.ndim
    )

    # Validation is over; from here on the module changes.
    s = _spec.next_seed(seed)
    parametrization = SpectralNorm(weight, dim, sn_spec, s)
    parametrization.iterate(weight, sn_spec.registration_iterations(module.training))
    # unsafe=True: register_parametrization would otherwise evaluate the parametrization once
    # (one more iteration in training mode); registration_iterations already counts that.
    parametrize.register_parametrization(module, name, parametrization, unsafe=True)
    return module


def remove_spectral_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Remove dualsn's spectral norm from ``module.<name>`` and return ``module``.

    ``module.<name>`` becomes a plain, fresh leaf Parameter (a buffer if it was one) holding
    W / sigma with the current u, v: no power iteration runs, in either mode. Being a new
    tensor, it must be given to the optimizer again. ValueError if there is no dualsn
    spectral norm on ``name``; RuntimeError if other parametrizations share it.
    """
    found = _find(module, name)
    if found is None:
        raise ValueError(f"Expected a dualsn spectral norm on name={name!r}, but {type(module).__name__} has none")
    plist, _, sn = found
    if len(plist) != 1:
        raise RuntimeError(
            f"Cannot remove the spectral norm from {name!r} while other parametrizations are "
            "registered on it; remove those first (torch.nn.utils.parametrize.remove_parametrizations)"
        )
    original = plist.original
    with torch.no_grad():
        normalized = spectral_norm_forward(original, sn._u, sn._v, sn.dim, sn.spec, training=False)
        normalized = normalized.detach().clone()
    was_parameter = isinstance(original, nn.Parameter)
    parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    delattr(module, name)
    if was_parameter:
        module.register_parameter(name, nn.Parameter(normalized, requires_grad=original.requires_grad))
    else:
        module.register_buffer(name, normalized)
    return module


def sigma(module: nn.Module, name: str = "weight") -> float:
    """The current sigma of ``module.<name>``'s spectral norm, as a float (real part).

    No power iteration runs. For a weight normalized exactly it is max(||W||, eps).
    """
    found = _find(module, name)
    if found is None:
        raise ValueError(f"Expected a dualsn spectral norm on name={name!r}, but {type(module).__name__} has none")
    plist, index, sn = found
    with torch.no_grad():
        return float(sn.sigma(_sn_input(plist, index)).real.item())
