"""The PyTorch adapter: everything the tools (port, report, cli, demo) ask of PyTorch.

The tools reach it through :func:`dualsn.adapters.adapter` (``adapter("torch")``) and never
import torch or a private name of :mod:`dualsn.torch` themselves. ``dualsn/paddle/adapter.py``
has exactly the same public names, with the same meaning; the code differs only where the
frameworks do. Importing this module imports torch; :mod:`dualsn.torch` is imported by the
functions that need it.

Models and their state (``dualsn.port``):

* ``is_model(obj)``: whether ``obj`` is a model of this framework (a ``torch.nn.Module``).
* ``state(model)``: the live tensors by state-dict key (copies land in place).
* ``layers(model)``: every layer by its dotted prefix (``""``: the model itself).
* ``layer_kind(layer)``: (kind, Linear layout): kind one of ``"linear"``, ``"bilinear"``,
  ``"layernorm"``, ``"batchnorm"``, ``"instancenorm"``, ``"prelu"``, ``"other"``; the layout
  ``"out_in"`` or ``"in_out"`` for a Linear, else None.
* ``sn_info(layer, name)``: (dim, eps) of the spectral norm on ``layer.<name>`` (any
  flavour), or None; dim None for a convolution operator norm.
* ``sn_preset(layer, name)``: the preset of that spectral norm, or None.
* ``assign(tensor, array)``: copy a numpy array into a live tensor, in place.
* ``refresh(layer)``: make what a layer caches from its weights reflect loaded state.
* ``store_sigma(layer, name, tensor)``: write sigma of the loaded state into the tracked
  sigma buffer ``tensor`` of dualsn's spectral norm on ``layer.<name>``.

Tensors:

* ``to_numpy(tensor)``: a numpy array of the tensor's values (a view where possible).
* ``is_meta(tensor)``: whether the tensor has no storage at all (torch's meta device).
* ``missing_data(tensor)``: why the tensor holds no data to load (the end of a sentence
  about it), or None.
* ``dense_numpy(tensor)``: the values of a tensor that holds data, densified (sparse
  layouts), as numpy.
* ``float_numpy(tensor)``: a numpy copy in at least float32 (numpy has no bfloat16).

Diagnostics (``dualsn.report``):

* ``spectral_norms(model)``: every spectral norm in the model (dualsn's and the built-ins),
  as :class:`dualsn.adapter_common.SpectralNormState`, in the order of the model's layers.

Running models (``dualsn.cli``, ``dualsn.demo``):

* ``forward(model, inputs)``: the model's eval-mode output on numpy inputs, no gradients.
* ``seed(value)``: seed the framework's random generator (initial weights).
* ``sn_layer_names(model)``: the prefixes of the layers that carry dualsn's spectral norm.
* ``sigmas(model, names)``: sigma of the spectral norm of each named layer, as floats.
* ``HingeTrainer(model, lr)``: plain SGD on a conditional discriminator with the hinge loss;
  ``step(real, y_real, fake, y_fake)`` returns (loss, the outputs on real then fake, numpy).
"""

from __future__ import annotations

import importlib

import numpy as np
import torch
from torch import nn

from dualsn import diagnostics as _diagnostics
from dualsn import keys as _keys
from dualsn import spec as _spec
from dualsn.torch._api import sigma
from dualsn.torch._registry import is_spectral_norm
from dualsn.torch._registry import _find, _sn_input
from dualsn.torch._sn import SpectralNorm
from dualsn.adapter_common import (SpectralNormState, conv_geometry, dim_or_none, dotted_name, hook_sn_info,
                                   hook_sn_preset)

__all__ = [
    "NAME", "is_model", "state", "layers", "layer_kind", "sn_info", "sn_preset", "assign", "refresh", "store_sigma",
    "to_numpy", "is_meta", "missing_data", "dense_numpy", "float_numpy", "spectral_norms", "forward", "seed",
    "sn_layer_names", "sigmas", "HingeTrainer",
    "report",
]

NAME = "torch"


# ---------------------------------------------------------------------------------------------
# Models and their state


def is_model(obj) -> bool:
    return isinstance(obj, nn.Module)


def state(model) -> dict:
    # keep_vars: the Parameters and buffers themselves, so copies land in place.
    return model.state_dict(keep_vars=True)


def layers(model) -> dict:
    return dict(model.named_modules())


def layer_kind(layer) -> tuple[str, str | None]:
    if isinstance(layer, nn.Linear):
        return "linear", "out_in"
    if isinstance(layer, nn.Bilinear):
        return "bilinear", None
    if isinstance(layer, nn.LayerNorm):
        return "layernorm", None
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        return "batchnorm", None
    if isinstance(layer, nn.modules.instancenorm._InstanceNorm):
        return "instancenorm", None
    if isinstance(layer, nn.PReLU):
        return "prelu", None
    return "other", None


def _sn_parametrization(layer, name: str):
    """The spectral-norm parametrization (dualsn's or the built-in) on ``layer.<name>``, or None."""
    plists = getattr(layer, "parametrizations", None)
    if plists is not None and name in plists:
        for p in plists[name]:
            if hasattr(p, "dim") and hasattr(p, "eps"):
                return p
    return None


def sn_info(layer, name: str):
    """(dim, eps) of the spectral norm on ``layer.<name>``, any flavour, or None. dim is
    None for a convolution operator norm (``spectral_norm_conv``)."""
    p = _sn_parametrization(layer, name)
    if p is not None:
        return dim_or_none(p.dim), float(p.eps)
    return hook_sn_info(layer, name)


def sn_preset(layer, name: str) -> str | None:
    """The preset of the spectral norm on ``layer.<name>`` (see :func:`dualsn.port.presets_of`)."""
    p = _sn_parametrization(layer, name)
    if p is not None:
        spec = getattr(p, "spec", None)  # dualsn's; else the torch built-in
        return "torch" if spec is None else _spec.preset_for_order(spec.order, "torch")
    return hook_sn_preset(layer, name, "torch_legacy", "torch")


def assign(tensor, array: np.ndarray) -> None:
    if not array.flags.writeable:
        array = array.copy()  # torch.from_numpy warns about read-only arrays
    with torch.no_grad():
        tensor.copy_(torch.from_numpy(array))


def refresh(layer) -> None:
    """Recompute ``layer.<name>`` of the older torch hook, which caches it as a plain
    attribute, so it reflects the loaded state before the next forward. (dualsn's caches
    see the in-place copies through the tensors' version counters.)"""
    for hook in list(layer._forward_pre_hooks.values()):
        if type(hook).__name__ == "SpectralNorm" and hasattr(hook, "compute_weight"):
            with torch.no_grad():
                setattr(layer, hook.name, hook.compute_weight(layer, do_power_iteration=False))


def store_sigma(layer, name: str, tensor) -> None:
    """Write sigma of the loaded state (u^H M v, no iteration) into ``tensor``, the
    ``_sigma`` buffer of dualsn's spectral norm on ``layer.<name>``."""

    plist, index, sn = _find(layer, name)
    with torch.no_grad():
        tensor.copy_(sn.sigma(_sn_input(plist, index)))


# ---------------------------------------------------------------------------------------------
# Tensors


def to_numpy(tensor) -> np.ndarray:
    return tensor.detach().cpu().resolve_conj().resolve_neg().numpy()


def is_meta(tensor) -> bool:
    return getattr(getattr(tensor, "device", None), "type", None) == "meta"


def missing_data(tensor) -> str | None:
    return "is a meta tensor: it has no data to load" if is_meta(tensor) else None


def dense_numpy(tensor) -> np.ndarray:
    if tensor.layout != torch.strided:  # sparse: the dense values it stands for
        tensor = tensor.to_dense()
    return to_numpy(tensor)


def float_numpy(tensor) -> np.ndarray:
    tensor = tensor.detach()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()  # numpy has no bfloat16
    return to_numpy(tensor)


# ---------------------------------------------------------------------------------------------
# Diagnostics: every spectral norm of a model


def _dualsn_state(name, kind, p, x) -> SpectralNormState:
    geometry = getattr(p, "geometry", None)  # SpectralNormConv
    return SpectralNormState(
        name, kind, "dualsn", p.dim, p.spec, float_numpy(x),
        None if p._u is None else float_numpy(p._u),  # the stored u, v
        None if p._v is None else float_numpy(p._v),
        None if geometry is None else conv_geometry(geometry),
    )


def _builtin_state(name, kind, p, x) -> SpectralNormState:
    s = _spec.make_spec("torch", p.n_power_iterations, p.eps)
    has_uv = x.ndim > 1
    return SpectralNormState(
        name, kind, "built-in", p.dim if has_uv else 0, s, float_numpy(x),
        float_numpy(p._u) if has_uv else None, float_numpy(p._v) if has_uv else None,
    )


def _parametrized(prefix: str, module, kind: str) -> list[SpectralNormState]:
    """The spectral norms among ``module``'s parametrizations (dualsn's, torch's built-in)."""
    from torch.nn.utils import parametrizations

    found = []
    for pname, plist in module.parametrizations.items():
        # The tensor a spectral norm sees is the output of the parametrizations before it.
        with torch.no_grad():
            x = plist.original if plist.is_tensor else None
            for p in plist:
                if x is None:  # a first parametrization taking several tensors
                    x = p(*[getattr(plist, f"original{i}") for i in range(plist.ntensors)])
                    continue
                if isinstance(p, SpectralNorm):
                    found.append(_dualsn_state(dotted_name(prefix, pname), kind, p, x))
                elif isinstance(p, parametrizations._SpectralNorm):
                    found.append(_builtin_state(dotted_name(prefix, pname), kind, p, x))
                else:
                    x = p(x)
                    continue
                # At most one spectral norm per tensor, and evaluating it could iterate.
                break
    return found


def _legacy_hooks(prefix: str, module, kind: str) -> list[SpectralNormState]:
    """The older ``torch.nn.utils.spectral_norm`` hooks on ``module``."""
    legacy = importlib.import_module("torch.nn.utils.spectral_norm").SpectralNorm
    found = []
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, legacy):
            s = _spec.make_spec("torch_legacy", hook.n_power_iterations, hook.eps)
            found.append(SpectralNormState(
                dotted_name(prefix, hook.name), kind, "built-in", hook.dim, s,
                float_numpy(getattr(module, _keys.hook_key(hook.name))),
                float_numpy(getattr(module, hook.name + "_u")),
                float_numpy(getattr(module, hook.name + "_v")),
                label="torch_legacy, built-in",
            ))
    return found


def spectral_norms(model) -> list[SpectralNormState]:
    from torch.nn.utils import parametrize

    found = []
    for prefix, module in model.named_modules():
        kind = type(module).__name__
        if parametrize.is_parametrized(module):
            # Registering a parametrization swaps the class for a subclass "Parametrized<cls>".
            kind = type(module).__mro__[1].__name__
            found += _parametrized(prefix, module, kind)
        found += _legacy_hooks(prefix, module, kind)
    return found


# ---------------------------------------------------------------------------------------------
# Running models


def forward(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(*[torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])


def seed(value: int) -> None:
    torch.manual_seed(value)


def sn_layer_names(model) -> list[str]:

    return [n for n, m in model.named_modules() if is_spectral_norm(m)]


def sigmas(model, names: list[str]) -> list[float]:

    modules = dict(model.named_modules())
    return [sigma(modules[n]) for n in names]


class HingeTrainer:
    """A discriminator with its optimizer (plain SGD): one hinge-loss update per step."""

    def __init__(self, model, lr: float) -> None:
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=lr)

    def step(self, real, y_real, fake, y_fake):
        self.model.train()
        d_real = self.model(torch.from_numpy(real), torch.from_numpy(y_real))
        d_fake = self.model(torch.from_numpy(fake), torch.from_numpy(y_fake))
        loss = torch.relu(1 - d_real).mean() + torch.relu(1 + d_fake).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item(), np.concatenate([d_real.detach().numpy(), d_fake.detach().numpy()])


def report(model):
    """The per-layer sigma report of ``model``, a :class:`dualsn.diagnostics.SNReport` (see
    :func:`dualsn.report.report`); changes nothing."""
    return _diagnostics.build_report(NAME, spectral_norms(model))
