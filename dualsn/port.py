"""Move weights, and spectral-norm state, between PyTorch and PaddlePaddle models.

:func:`load_state_dict` is *target-driven*: it walks every parameter and buffer of the target
model (a ``torch.nn.Module`` or a ``paddle.nn.Layer``), finds the matching entry of the source
state dict, and converts it for the target layer's type:

* ``Linear`` weights are transposed between torch's ``[out, in]`` and ``paddle.nn.Linear``'s
  ``[in, out]`` (``paddle.compat.nn.Linear`` keeps torch's layout and is not transposed);
* BatchNorm ``running_mean`` / ``running_var`` <-> ``_mean`` / ``_variance`` (torch's
  ``num_batches_tracked`` has no Paddle counterpart: dropped going to Paddle, the target's own
  value kept coming from Paddle); InstanceNorm ``weight`` <-> ``scale``; PReLU ``weight`` <->
  ``_weight``; Bilinear bias ``[out]`` <-> ``[1, out]``; LayerNorm ``weight``/``bias`` of
  ``normalized_shape`` <-> flattened; Conv, ConvTranspose, GroupNorm and Embedding share their
  layouts;
* spectral-norm state in any flavour on either side - dualsn (any preset), the torch
  parametrization (``parametrizations.weight.original`` / ``.0._u`` / ``.0._v``), the older
  torch hook and the Paddle hook (``weight_orig`` / ``weight_u`` / ``weight_v``). u and v cross
  unchanged: dualsn's dim semantics make the W-matrix the same matrix in both frameworks (a
  ``paddle.nn.Linear`` is normalized along dim 1 of its ``[in, out]`` weight). A 1-D weight
  normalized exactly (no u, v; the torch preset) and one normalized as an (n x 1) matrix (the
  other presets) convert into each other: u, v are dropped, or set to their fixed point
  ``u = W / ||W||``, ``v = [1]``;
* the state of dualsn's opt-in features: the extra pairs of ``num_svs > 1`` (torch
  ``.0._u_extra`` / ``.0._v_extra`` <-> Paddle ``weight_u_extra`` / ``weight_v_extra``; rows
  of W-matrix-space vectors like u, v, so unchanged) and the ``track_sigma`` buffer (``.0._sigma``
  <-> ``weight_sigma``). A ``_sigma`` the target tracks and the source does not is computed
  from the loaded state (the backend's ``sigma``); one the target does not track is dropped
  (it is recomputed by every forward). ``spectral_norm_conv``'s u, v (and extra rows) have
  the activation shapes of one output / input sample, the same in both frameworks, and cross
  unchanged; a convolution norm never pairs with a matrix norm (the "dim" check refuses it).

Loading is transactional: every pair is checked first (missing, unexpected, shape, dtype) and
one :class:`PortError` lists every problem; when it is raised the target is unchanged.

:func:`torch_to_paddle` and :func:`paddle_to_torch` port between two live models, where each
source Linear's layout (and each spectral norm's dim) is known exactly. For a raw state dict,
:func:`load_state_dict` assumes each framework's native Linear and lets the target's layer type
decide; shape checks catch a mismatch.

:func:`load_checkpoint` reads ``.pt`` / ``.pth`` (``torch.load(weights_only=True)``) and
``.pdparams`` files (a restricted unpickler: nothing from the file is executed) without running
code from them; :func:`save_checkpoint` writes atomically.

This module imports neither framework at import time.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np

__all__ = [
    "load_state_dict",
    "torch_to_paddle",
    "paddle_to_torch",
    "port_model",
    "load_checkpoint",
    "save_checkpoint",
    "detect_format",
    "framework_of",
    "Entry",
    "PortReport",
    "PortError",
    "CheckpointError",
]

FRAMEWORKS = ("torch", "paddle")

TORCH_SUFFIXES = (".pt", ".pth")
PADDLE_SUFFIXES = (".pdparams",)


class PortError(ValueError):
    """A state dict does not fit the target. ``problems`` lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"cannot load the state dict: {len(self.problems)} problem(s); the target was not "
            f"changed:\n{lines}"
        )


class CheckpointError(ValueError):
    """A checkpoint file is not a state dict this module can read safely."""


@dataclass(frozen=True)
class Entry:
    """How one tensor of the target was (or will be) filled.

    ``sn`` is ``""`` for a plain tensor, else the role of the tensor in the spectral norm on
    ``param``: ``"original"`` (W), ``"u"``, ``"v"``, ``"u_extra"``, ``"v_extra"`` (the extra
    pairs of ``num_svs``) or ``"sigma"`` (``track_sigma``). ``source_key`` is None when no
    source tensor is read (``note`` says why).
    """

    key: str
    source_key: str | None
    shape: tuple[int, ...]
    transposed: bool = False
    sn: str = ""
    param: str = ""
    note: str = ""


@dataclass
class PortReport:
    """What :func:`load_state_dict` did: one :class:`Entry` per target tensor, plus the
    missing and unexpected keys it tolerated (only with ``strict=False``)."""

    source: str
    target: str
    entries: list[Entry] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Framework adapters: the little each framework has to answer. Frameworks are looked up in
# sys.modules only: a model of a framework implies that the framework is imported.


def framework_of(model) -> str:
    """``"torch"`` for a ``torch.nn.Module``, ``"paddle"`` for a ``paddle.nn.Layer``."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        return "torch"
    paddle = sys.modules.get("paddle")
    if paddle is not None and isinstance(model, paddle.nn.Layer):
        return "paddle"
    raise TypeError(
        f"Expected a torch.nn.Module or a paddle.nn.Layer, but got {type(model).__name__}"
    )


# Parameter and buffer names that differ between the frameworks, by layer kind (torch's name
# -> Paddle's). Torch's names are the canonical ones.
_PADDLE_NAMES = {
    "batchnorm": {"running_mean": "_mean", "running_var": "_variance"},
    "instancenorm": {"weight": "scale"},
    "prelu": {"weight": "_weight"},
}

# Tensors of a layer kind whose shapes differ between the frameworks while their values are
# stored in the same order (a reshape converts them): Paddle's Bilinear bias is [1, out], its
# LayerNorm keeps weight and bias flattened.
_RESHAPED = {"bilinear": ("bias",), "layernorm": ("weight", "bias")}

# Linear layouts.
OUT_IN = "out_in"  # torch.nn.Linear, paddle.compat.nn.Linear
IN_OUT = "in_out"  # paddle.nn.Linear
_NATIVE_LINEAR = {"torch": OUT_IN, "paddle": IN_OUT}


def _rename(name: str, kind: str, source_fw: str, target_fw: str) -> str:
    """The name a tensor called ``name`` in a ``target_fw`` layer has in a ``source_fw`` one."""
    if source_fw == target_fw:
        return name
    table = _PADDLE_NAMES.get(kind, {})
    if target_fw == "paddle":
        table = {p: t for t, p in table.items()}
    return table.get(name, name)


class _Torch:
    name = "torch"

    def __init__(self):
        import torch

        self.torch = torch

    def state(self, model) -> dict:
        # keep_vars: the Parameters and buffers themselves, so copies land in place.
        return model.state_dict(keep_vars=True)

    def layers(self, model) -> dict:
        return dict(model.named_modules())

    def kind(self, layer) -> tuple[str, str | None]:
        nn = self.torch.nn
        if isinstance(layer, nn.Linear):
            return "linear", OUT_IN
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

    def sn_info(self, layer, name: str):
        """(dim, eps) of the spectral norm on ``layer.<name>``, any flavour, or None. dim is
        None for a convolution operator norm (``spectral_norm_conv``)."""
        plists = getattr(layer, "parametrizations", None)
        if plists is not None and name in plists:
            for p in plists[name]:
                if hasattr(p, "dim") and hasattr(p, "eps"):
                    return _dim_or_none(p.dim), float(p.eps)
        return _hook_sn_info(layer, name)

    def assign(self, tensor, array: np.ndarray) -> None:
        if not array.flags.writeable:
            array = array.copy()  # torch.from_numpy warns about read-only arrays
        with self.torch.no_grad():
            tensor.copy_(self.torch.from_numpy(array))

    def refresh(self, layer) -> None:
        """Recompute ``layer.<name>`` of the older torch hook, which caches it as a plain
        attribute, so it reflects the loaded state before the next forward. (dualsn's caches
        see the in-place copies through the tensors' version counters.)"""
        for hook in list(layer._forward_pre_hooks.values()):
            if type(hook).__name__ == "SpectralNorm" and hasattr(hook, "compute_weight"):
                with self.torch.no_grad():
                    setattr(layer, hook.name, hook.compute_weight(layer, do_power_iteration=False))

    def store_sigma(self, layer, name: str, tensor) -> None:
        """Write sigma of the loaded state (u^H M v, no iteration) into ``tensor``, the
        ``_sigma`` buffer of dualsn's spectral norm on ``layer.<name>``."""
        import dualsn.torch as dsn

        plist, index, sn = dsn._find(layer, name)
        with self.torch.no_grad():
            tensor.copy_(sn.sigma(dsn._sn_input(plist, index)))


class _Paddle:
    name = "paddle"

    def __init__(self):
        import paddle

        self.paddle = paddle

    def state(self, model) -> dict:
        return model.state_dict()  # the live tensors

    def layers(self, model) -> dict:
        return dict(model.named_sublayers(include_self=True))

    def _classes(self, *dotted: str) -> tuple[type, ...]:
        found = []
        for path in dotted:
            obj = self.paddle
            for part in path.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    break
            if isinstance(obj, type):
                found.append(obj)
        return tuple(found)

    def kind(self, layer) -> tuple[str, str | None]:
        if isinstance(layer, self._classes("nn.Linear")):
            return "linear", IN_OUT
        if isinstance(layer, self._classes("compat.nn.Linear")):
            return "linear", OUT_IN
        if isinstance(layer, self._classes("nn.Bilinear")):
            return "bilinear", None
        if isinstance(layer, self._classes("nn.LayerNorm")):
            return "layernorm", None
        if isinstance(layer, self._classes("nn.layer.norm._BatchNormBase", "nn.BatchNorm")):
            return "batchnorm", None
        if isinstance(layer, self._classes("nn.layer.norm._InstanceNormBase")):
            return "instancenorm", None
        if isinstance(layer, self._classes("nn.PReLU")):
            return "prelu", None
        return "other", None

    def sn_info(self, layer, name: str):
        return _hook_sn_info(layer, name)

    def assign(self, tensor, array: np.ndarray) -> None:
        # reshape: ascontiguousarray turns a 0-d array (a tracked sigma) into shape (1,)
        tensor.set_value(np.ascontiguousarray(array).reshape(np.shape(array)))

    def refresh(self, layer) -> None:
        """Recompute ``layer.<name>``, which the Paddle hooks (dualsn's and the built-in)
        keep as a plain attribute, so it reflects the loaded state before the next forward,
        and drop what dualsn's hook kept from the old state (eval cache, last sigma):
        ``set_value`` may change entries its sampled checks do not look at."""
        for hook in list(layer._forward_pre_hooks.values()):
            if hasattr(hook, "compute_weight") and isinstance(getattr(hook, "name", None), str):
                if hasattr(hook, "invalidate"):
                    hook.invalidate()
                with self.paddle.no_grad():
                    setattr(layer, hook.name, hook.compute_weight(layer, do_power_iteration=False))

    def store_sigma(self, layer, name: str, tensor) -> None:
        """Write sigma of the loaded state (u^H M v, no iteration) into ``tensor``, the
        ``<name>_sigma`` buffer of dualsn's spectral norm on ``layer.<name>``."""
        import dualsn.paddle as dsn

        value = dsn.get_spectral_norm(layer, name).sigma(layer)
        tensor.set_value(np.asarray(value).astype(_dtype_name(tensor)).reshape(_shape(tensor)))


def _dim_or_none(dim) -> int | None:
    """A spectral norm's dim; None for a convolution operator norm, which has no dim."""
    return None if dim is None else int(dim)


def _describe_dim(dim: int | None) -> str:
    return "as a convolution operator (spectral_norm_conv)" if dim is None else f"along dim {dim}"


def _hook_sn_info(layer, name: str):
    """(dim, eps) from a forward-pre-hook spectral norm on ``name`` (the older torch hook, the
    Paddle built-in, dualsn's Paddle hooks), or None; dim is None for a convolution norm."""
    for hook in getattr(layer, "_forward_pre_hooks", {}).values():
        if getattr(hook, "name", None) == name and hasattr(hook, "dim"):
            eps = getattr(hook, "eps", None)
            if eps is None and hasattr(hook, "spec"):
                eps = hook.spec.eps
            return _dim_or_none(hook.dim), float(eps if eps is not None else 1e-12)
    return None


def _adapter(framework: str):
    return _Torch() if framework == "torch" else _Paddle()


# ---------------------------------------------------------------------------------------------
# Tensor helpers that work on torch tensors, paddle tensors and numpy arrays alike.


def _is_tensor(x) -> bool:
    return isinstance(x, (np.ndarray, np.generic)) or (
        type(x).__module__.split(".")[0] in FRAMEWORKS and hasattr(x, "shape") and hasattr(x, "dtype")
    )


def _shape(x) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def _dtype_name(x) -> str:
    """``"float32"`` etc. for any of the three kinds of tensor."""
    if isinstance(x, (np.ndarray, np.generic)):
        return x.dtype.name
    return str(x.dtype).rpartition(".")[2]


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, (np.ndarray, np.generic)):
        return np.asarray(x)
    if type(x).__module__.startswith("torch"):
        return x.detach().cpu().resolve_conj().resolve_neg().numpy()
    return x.numpy()


def _split_key(key: str) -> tuple[str, str]:
    """(layer prefix, local name): the torch parametrization's entries stay together."""
    if key.startswith("parametrizations."):
        return "", key
    index = key.find(".parametrizations.")
    if index >= 0:
        return key[:index], key[index + 1 :]
    prefix, _, local = key.rpartition(".")
    return prefix, local


_PARAMETRIZED = re.compile(r"parametrizations\.([^.]+)\.(?:original|(\d+)\.([^.]+))$")

STATE_ROLES = ("u", "v", "u_extra", "v_extra", "sigma")
"""Spectral-norm state besides W, by role: torch keeps role r as ``.<i>._<r>``, the hooks as
``<name>_<r>``. ``u_extra``/``v_extra`` (``num_svs``) and ``sigma`` (``track_sigma``) are
dualsn's; the built-ins have u and v only."""

_EXTRA_ROLES = ("u_extra", "v_extra")


def _sn_keys(locals_: Mapping[str, str], param: str) -> dict[str, str]:
    """The keys of the spectral-norm state on ``param`` among one layer's local names
    (local name -> full key), by role ``original`` or one of :data:`STATE_ROLES`; {} if
    there is none."""
    found: dict[str, str] = {}
    original = f"parametrizations.{param}.original"
    if original in locals_:
        found["original"] = locals_[original]
        for local, key in locals_.items():
            m = _PARAMETRIZED.match(local)
            if m and m.group(1) == param and m.group(3) and m.group(3)[1:] in STATE_ROLES:
                found[m.group(3)[1:]] = key
    elif param + "_orig" in locals_:
        found["original"] = locals_[param + "_orig"]
        for role in STATE_ROLES:
            if f"{param}_{role}" in locals_:
                found[role] = locals_[f"{param}_{role}"]
    return found


# Longest suffixes first: "weight_u_extra" is the u_extra of "weight", not the u of "weight_u_extra".
_HOOK_SUFFIXES = tuple(sorted(
    [("_orig", "original")] + [("_" + r, r) for r in STATE_ROLES], key=lambda pair: -len(pair[0])
))


def _sn_param_of(local: str, locals_: Mapping[str, str]) -> tuple[str, str] | None:
    """(param, role) when ``local`` is spectral-norm state in a layer, else None."""
    m = _PARAMETRIZED.match(local)
    if m:
        if m.group(2) is None:
            return m.group(1), "original"
        if m.group(3)[1:] in STATE_ROLES and m.group(3).startswith("_"):
            return m.group(1), m.group(3)[1:]
        return None
    for suffix, role in _HOOK_SUFFIXES:
        if local.endswith(suffix) and local[: -len(suffix)] + "_orig" in locals_:
            return local[: -len(suffix)], role
    return None


def _group(keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """prefix -> {local name: full key}."""
    groups: dict[str, dict[str, str]] = {}
    for key in keys:
        prefix, local = _split_key(key)
        groups.setdefault(prefix, {})[local] = key
    return groups


def _join(prefix: str, local: str) -> str:
    return f"{prefix}.{local}" if prefix else local


# ---------------------------------------------------------------------------------------------
# Planning: decide, for every target tensor, where it comes from and how, and collect every
# problem, before anything is written.


@dataclass
class _Step:
    entry: Entry
    target: Any  # the live target tensor
    reshape: bool = False  # see _RESHAPED
    synth_from: str | None = None  # u, v (extra rows) of a matrix-mode 1-D norm, from an exact norm's W
    eps: float = 1e-12
    sigma_of: tuple[Any, str] | None = None  # (layer, param): a _sigma computed after loading


class _Planner:
    """Decides, for every target tensor, which source tensor fills it and how, and collects
    every problem on the way. Reads both sides; writes nothing."""

    def __init__(self, target, state_dict: Mapping[str, Any], source: str, source_layouts, source_dims):
        self.target_fw = framework_of(target)
        self.adapter = _adapter(self.target_fw)
        self.target_state = self.adapter.state(target)
        self.layers = self.adapter.layers(target)
        self.state_dict = state_dict
        self.source = source
        self.source_layouts = source_layouts  # prefix -> Linear layout; None: native layouts
        self.source_dims = source_dims  # (prefix, param) -> spectral-norm dim; None: unknown
        self.steps: list[_Step] = []
        self.problems: list[str] = []
        self.missing: list[tuple[str, str]] = []  # (key, message)
        self.consumed: set[str] = set()

        source_groups = _group(state_dict)
        for prefix, t_locals in _group(self.target_state).items():
            self._layer(prefix, t_locals, source_groups.get(prefix, {}))
        self.unexpected = [(k, f"unexpected in the source: {k!r}") for k in state_dict if k not in self.consumed]

    def _layer(self, prefix: str, t_locals: dict[str, str], s_locals: dict[str, str]) -> None:
        layer = self.layers.get(prefix)
        kind, t_layout = self.adapter.kind(layer) if layer is not None else ("other", None)
        if self.source_layouts is None:
            s_layout = _NATIVE_LINEAR[self.source]
        else:  # a layer that is no Linear in the source model keeps the target's layout
            s_layout = self.source_layouts.get(prefix, t_layout)
        for local, key in t_locals.items():
            self._tensor(prefix, layer, kind, t_layout != s_layout, local, key, t_locals, s_locals)
        self._leftovers(kind, t_locals, s_locals)

    def _tensor(self, prefix, layer, kind, layouts_differ, local, key, t_locals, s_locals) -> None:
        tensor = self.target_state[key]
        if not _is_tensor(tensor):  # e.g. a torch module's get_extra_state()
            self.problems.append(f"{key!r} in the target is a {type(tensor).__name__}, not a tensor")
            return
        shape = _shape(tensor)
        sn = _sn_param_of(local, t_locals)
        info = self.adapter.sn_info(layer, sn[0]) if (sn and layer is not None) else None
        if sn is not None and info is None and not _PARAMETRIZED.match(local):
            sn = None  # a buffer that merely ends in _u / _v / _orig
        param, role = sn if sn else (local, "")
        s_param = _rename(param, kind, self.source, self.target_fw)
        transposed = (kind == "linear" and param == "weight" and role in ("", "original")
                      and layouts_differ and len(shape) == 2)

        s_sn = _sn_keys(s_locals, s_param)
        if role == "":
            source_key = s_locals.get(s_param)
        elif role == "original":  # from spectral-norm state, or from a plain weight
            source_key = s_sn.get("original", s_locals.get(s_param))
        else:
            source_key = s_sn.get(role)
        if source_key is None:
            self._no_source(prefix, kind, local, key, tensor, param, s_param, role, info, s_sn)
            return

        self.consumed.add(source_key)
        value = self.state_dict[source_key]
        if not _is_tensor(value):
            self.problems.append(f"{source_key!r} is a {type(value).__name__}, not a tensor")
            return
        s_shape = _shape(value)
        expected = tuple(reversed(s_shape)) if transposed and len(s_shape) == 2 else s_shape
        reshape = (param in _RESHAPED.get(kind, ()) and role in ("", "original")
                   and self.source != self.target_fw and s_shape != shape
                   and int(np.prod(s_shape)) == int(np.prod(shape)))
        if reshape:
            expected = shape
        if expected != shape:
            how = " after transposing" if transposed else ""
            self.problems.append(
                f"shape mismatch for {key!r}: the target has {list(shape)}, the source "
                f"{source_key!r} gives {list(expected)}{how}"
            )
        self._check_dtype(key, tensor, source_key, value)
        if role == "original" and info and self.source_dims and (prefix, s_param) in self.source_dims:
            s_dim = self.source_dims[(prefix, s_param)]
            if info[0] != ((1 - s_dim) if (transposed and s_dim is not None) else s_dim):
                self.problems.append(
                    f"spectral norm of {_join(prefix, param)!r} is taken {_describe_dim(info[0])} in "
                    f"the target but {_describe_dim(s_dim)} in the source"
                    f"{' (a transposed Linear weight)' if transposed else ''}: u and v would not fit"
                )
        note = f"reshaped {list(s_shape)} -> {list(shape)}" if reshape else ""
        entry = Entry(key, source_key, shape, transposed, role, param if role else "", note)
        self.steps.append(_Step(entry, tensor, reshape=reshape))

    def _check_dtype(self, key, tensor, source_key, value) -> None:
        t_dtype, s_dtype = _dtype_name(tensor), _dtype_name(value)
        if "bfloat16" in (t_dtype, s_dtype):
            self.problems.append(f"{key!r}: bfloat16 is not supported (numpy has no bfloat16)")
        elif t_dtype != s_dtype:
            self.problems.append(
                f"dtype mismatch for {key!r}: the target has {t_dtype}, the source {source_key!r} "
                f"has {s_dtype}"
            )

    def _no_source(self, prefix, kind, local, key, tensor, param, s_param, role, info, s_sn) -> None:
        """A target tensor with no source tensor: kept, computed, or missing."""
        shape = _shape(tensor)
        if kind == "batchnorm" and local == "num_batches_tracked" and self.source == "paddle":
            self.steps.append(_Step(Entry(key, None, shape, note="kept: Paddle has no counterpart"), tensor))
            return
        if role in ("u", "v", *_EXTRA_ROLES) and "original" in s_sn and "u" not in s_sn and info:
            # The source normalizes the 1-D weight exactly (no u, v); the target treats it as an
            # (n x 1) matrix: start it at that norm's fixed point u = W / ||W||, v = [1]. The
            # extra pairs' fixed point is zero: an (n x 1) matrix has no second singular value.
            w_key = s_sn["original"]
            w = self.state_dict[w_key]
            n = _shape(w)[0] if _is_tensor(w) and len(_shape(w)) == 1 else None
            k = shape[0] if role in _EXTRA_ROLES else None  # extra rows: (k, n) and (k, 1)
            fits = {"u": (n,), "v": (1,), "u_extra": (k, n), "v_extra": (k, 1)}[role]
            if n is not None and shape == fits and _dtype_name(w) == _dtype_name(tensor):
                entry = Entry(key, None, shape, sn=role, param=param,
                              note=f"fixed point of the exact norm of {w_key}")
                self.steps.append(_Step(entry, tensor, synth_from=w_key, eps=info[1]))
                return
        if role == "sigma" and "original" in s_sn and info:
            # The target tracks sigma and the source does not: sigma of the loaded state.
            entry = Entry(key, None, shape, sn=role, param=param, note="computed: sigma of the loaded state")
            self.steps.append(_Step(entry, tensor, sigma_of=(self.layers[prefix], param)))
            return
        hint = ""
        if role in STATE_ROLES:
            hint = f" (the source has no spectral-norm state on {_join(prefix, s_param)!r})"
        elif role == "" and s_sn:
            hint = f" (the source has spectral norm on {_join(prefix, s_param)!r}; the target has none)"
        self.missing.append((key, f"missing in the source: {key!r}{hint}"))

    def _leftovers(self, kind, t_locals, s_locals) -> None:
        """Source tensors of this layer that are rightly left out (the rest is unexpected)."""
        for local, s_key in s_locals.items():
            if s_key in self.consumed:
                continue
            s_sn = _sn_param_of(local, s_locals)
            if kind == "batchnorm" and local == "num_batches_tracked" and self.target_fw == "paddle":
                self.consumed.add(s_key)  # Paddle's BatchNorm has no step counter
            elif s_sn and s_sn[1] in STATE_ROLES:
                t_sn = _sn_keys(t_locals, _rename(s_sn[0], kind, self.target_fw, self.source))
                if not t_sn:
                    continue  # no spectral norm there in the target: unexpected
                if s_sn[1] == "sigma":
                    # a tracked sigma the target does not track: every forward recomputes it
                    self.consumed.add(s_key)
                elif "u" not in t_sn and _is_1d_state(s_sn[1], _shape(self.state_dict[s_key])):
                    # u, v (extra rows) of an (n x 1) matrix norm where the target normalizes
                    # the same 1-D weight exactly and keeps no u, v.
                    self.consumed.add(s_key)


def _is_1d_state(role: str, shape: tuple[int, ...]) -> bool:
    """Whether state of ``role`` and ``shape`` can belong to an (n x 1) matrix norm of a 1-D
    weight: u, v are vectors, the extra rows (k, n) and (k, 1) matrices."""
    return len(shape) == (2 if role in _EXTRA_ROLES else 1)


def _source_array(step: _Step, state_dict) -> np.ndarray:
    if step.synth_from is not None:
        w = _to_numpy(state_dict[step.synth_from])
        if step.entry.sn in _EXTRA_ROLES:
            return np.zeros(step.entry.shape, dtype=w.dtype)
        if step.entry.sn == "v":
            return np.ones(1, dtype=w.dtype)
        return (w / np.maximum(np.linalg.norm(w), np.asarray(step.eps, dtype=w.real.dtype))).astype(w.dtype)
    array = _to_numpy(state_dict[step.entry.source_key])
    if step.entry.transposed:
        array = array.T
    if step.reshape:
        array = array.reshape(step.entry.shape)
    return array


def _load(target, state_dict, source, strict, progress, source_layouts=None, source_dims=None):
    if source not in FRAMEWORKS:
        raise ValueError(f"Expected source to be one of {FRAMEWORKS}, but got source={source!r}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"Expected state_dict to be a mapping, but got {type(state_dict).__name__}")
    plan = _Planner(target, state_dict, source, source_layouts, source_dims)
    problems = plan.problems
    if strict:
        problems = [m for _, m in plan.missing] + [u for _, u in plan.unexpected] + problems
    if problems:
        raise PortError(problems)

    # Everything fits: from here on nothing can fail short of running out of memory.
    report = PortReport(source=source, target=plan.target_fw)
    report.missing = [k for k, _ in plan.missing]
    report.unexpected = [k for k, _ in plan.unexpected]
    for step in progress(plan.steps) if progress is not None else plan.steps:
        if step.entry.source_key is not None or step.synth_from is not None:
            plan.adapter.assign(step.target, _source_array(step, state_dict))
        report.entries.append(step.entry)
    for layer in plan.layers.values():
        plan.adapter.refresh(layer)
    for step in plan.steps:  # after every other tensor: sigma of the loaded W, u, v
        if step.sigma_of is not None:
            plan.adapter.store_sigma(*step.sigma_of, step.target)
    return report


def _infer_source(state_dict) -> str:
    kinds = {type(v).__module__.split(".")[0] for v in state_dict.values()} & set(FRAMEWORKS)
    if len(kinds) == 1:
        return kinds.pop()
    raise ValueError(
        "Cannot tell which framework wrote this state dict (its values are not all torch or all "
        "paddle tensors): pass source='torch' or source='paddle'"
    )


def load_state_dict(
    target,
    state_dict: Mapping[str, Any],
    *,
    source: str | None = None,
    strict: bool = True,
    progress: Callable[[list], Iterable] | None = None,
) -> PortReport:
    """Load ``state_dict``, written by the framework ``source``, into ``target``.

    ``target`` is a ``torch.nn.Module`` or a ``paddle.nn.Layer``; ``state_dict`` maps names to
    torch tensors, paddle tensors or numpy arrays (e.g. from :func:`load_checkpoint`).
    ``source`` is ``"torch"`` or ``"paddle"`` (inferred from the tensors when omitted; required
    for numpy arrays). Every target tensor is filled in place, converted for the target layer's
    type (see the module docstring). A source Linear weight is taken to be in its framework's
    native layout (torch ``[out, in]``, ``paddle.nn.Linear`` ``[in, out]``).

    With ``strict`` (the default) a target tensor missing from the source, or a source tensor
    with no place in the target, is an error; without it they are left alone and listed in the
    report. A shape or dtype mismatch is always an error. Errors are collected first and
    raised together as one :class:`PortError`; the target is then unchanged.

    ``progress`` optionally wraps the list of copy steps (e.g. ``tqdm``). Returns a
    :class:`PortReport`.
    """
    if source is None:
        source = _infer_source(state_dict)
    return _load(target, state_dict, source, strict, progress)


def _linear_layouts(model) -> dict[str, str]:
    fw = framework_of(model)
    adapter = _adapter(fw)
    layouts = {}
    for prefix, layer in adapter.layers(model).items():
        kind, layout = adapter.kind(layer)
        if kind == "linear":
            layouts[prefix] = layout
    return layouts


def _sn_dims(model) -> dict[tuple[str, str], int]:
    """(layer prefix, param) -> dim of every spectral norm in ``model``."""
    adapter = _adapter(framework_of(model))
    layers = adapter.layers(model)
    dims = {}
    for prefix, locals_ in _group(adapter.state(model)).items():
        layer = layers.get(prefix)
        for local in locals_:
            sn = _sn_param_of(local, locals_)
            if sn and sn[1] == "original" and layer is not None:
                info = adapter.sn_info(layer, sn[0])
                if info is not None:
                    dims[(prefix, sn[0])] = info[0]
    return dims


def _port(source_model, target, expect_source: str, expect_target: str, strict, progress):
    if framework_of(source_model) != expect_source:
        raise TypeError(f"Expected the source to be a {expect_source} model")
    if framework_of(target) != expect_target:
        raise TypeError(f"Expected the target to be a {expect_target} model")
    state = _adapter(expect_source).state(source_model)
    return _load(
        target, state, expect_source, strict, progress,
        source_layouts=_linear_layouts(source_model), source_dims=_sn_dims(source_model),
    )


def port_model(source_model, target, *, strict: bool = True, progress=None) -> PortReport:
    """Copy the state of ``source_model`` into ``target``, each a torch or a Paddle model of
    the same architecture (the frameworks may be the same: then only spectral-norm flavours
    are converted). See :func:`torch_to_paddle`."""
    source = framework_of(source_model)
    return _port(source_model, target, source, framework_of(target), strict, progress)


def torch_to_paddle(module, layer, *, strict: bool = True, progress=None) -> PortReport:
    """Copy the state of the torch ``module`` into the Paddle ``layer`` (same architecture).

    Like :func:`load_state_dict`, but each source Linear's layout and each spectral norm's dim
    are read from ``module``, so nothing is assumed.
    """
    return _port(module, layer, "torch", "paddle", strict, progress)


def paddle_to_torch(layer, module, *, strict: bool = True, progress=None) -> PortReport:
    """Copy the state of the Paddle ``layer`` into the torch ``module`` (same architecture).

    Like :func:`load_state_dict`, but each source Linear's layout (``paddle.nn.Linear`` or
    ``paddle.compat.nn.Linear``) and each spectral norm's dim are read from ``layer``.
    """
    return _port(layer, module, "paddle", "torch", strict, progress)


# ---------------------------------------------------------------------------------------------
# Checkpoint files.


def detect_format(path: str | os.PathLike) -> str:
    """``"torch"`` or ``"paddle"``: by suffix (.pt/.pth, .pdparams), else by content.

    Raises CheckpointError when the content contradicts the suffix or fits neither.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(4)
    is_zip = head.startswith(b"PK\x03\x04")
    is_pickle = head[:1] == b"\x80"
    suffix = os.path.splitext(path)[1].lower()
    if suffix in TORCH_SUFFIXES:
        if not (is_zip or is_pickle):
            raise CheckpointError(f"{path}: not a torch checkpoint (neither a zip archive nor a pickle)")
        return "torch"
    if suffix in PADDLE_SUFFIXES:
        if not is_pickle:
            what = "a zip archive (a torch checkpoint?)" if is_zip else "not a pickle"
            raise CheckpointError(f"{path}: not a Paddle .pdparams checkpoint: it is {what}")
        return "paddle"
    if is_zip:
        return "torch"
    if is_pickle:
        return "paddle"
    raise CheckpointError(
        f"{path}: unknown checkpoint format (expected a torch .pt/.pth or a Paddle .pdparams file)"
    )


def _multiarray():
    core = getattr(np, "_core", None) or np.core  # numpy >= 2 / numpy 1.x
    return core.multiarray


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """Exactly what ``paddle.save`` writes for a state dict (protocols 2-4): numpy arrays
    (``_reconstruct``, ``ndarray``, ``dtype``), numpy scalars, and ``_codecs.encode``, with
    which protocol 2 spells bytes. numpy 1.x files name ``numpy.core``, numpy 2 ``numpy._core``."""
    import _codecs
    import collections

    ma = _multiarray()
    allowed = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _codecs.encode,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = ma._reconstruct
        allowed[(module, "scalar")] = ma.scalar
    # numpy >= 1.25 pickles dtypes as numpy.dtypes.Float32DType etc. in some protocols.
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        for name in dir(dtypes):
            if name.endswith("DType"):
                allowed[("numpy.dtypes", name)] = getattr(dtypes, name)
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles containers, numpy arrays and scalars; refuses every other global, so no
    callable named by the file is ever looked up, let alone run."""

    _allowed = None

    def find_class(self, module: str, name: str):
        if _RestrictedUnpickler._allowed is None:
            _RestrictedUnpickler._allowed = _allowed_globals()
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: a .pdparams state dict holds only containers, "
                "numpy arrays and scalars"
            ) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id: not a Paddle state dict")


def _load_pdparams(path: str) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:  # truncated or garbled files
        raise CheckpointError(f"{path}: not a readable .pdparams pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    obj = dict(obj)
    obj.pop("StructuredToParameterName@@", None)  # paddle.save's table of parameter names
    # paddle.save with protocol 2 or 3 splits arrays over 1 GiB into slices.
    unpack = obj.pop("UnpackBigParamInfor@@", None)  # sic, Paddle's spelling
    if isinstance(unpack, dict):
        for key, info in unpack.items():
            parts = [obj.pop(part) for part in info["slices"]]
            obj[key] = np.concatenate(parts).reshape(info["OriginShape"])
    return obj


def _load_torch(path: str) -> dict:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading a torch checkpoint needs torch installed") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: torch.load(weights_only=True) refused it: {e}") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a state dict from a torch ``.pt``/``.pth`` or a Paddle ``.pdparams`` file.

    No code from the file runs: torch files go through ``torch.load(weights_only=True)``,
    Paddle files through an unpickler that admits only containers, numpy arrays and scalars.
    Returns ``{name: tensor}`` (torch tensors, or numpy arrays for Paddle files); the
    framework is :func:`detect_format`. Raises FileNotFoundError, or CheckpointError for a file
    that is not a state dict or names anything else.
    """
    path = os.fspath(path)
    fmt = detect_format(path)
    state = _load_torch(path) if fmt == "torch" else _load_pdparams(path)
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: key {key!r} is not a string: not a state dict")
        if not _is_tensor(value) or _dtype_name(value) == "object":
            raise CheckpointError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor: not a flat "
                "state dict"
            )
    return state


def save_checkpoint(
    state_dict: Mapping[str, Any], path: str | os.PathLike, framework: str, *, overwrite: bool = False
) -> None:
    """Write ``state_dict`` as a ``framework`` checkpoint (``"torch"``: ``torch.save``;
    ``"paddle"``: what ``paddle.save`` writes for a state dict: a protocol-4 pickle of numpy
    arrays plus its parameter-name table).

    Atomic: written to a temporary file in the same directory, then moved over ``path``, so
    ``path`` never holds a partial file. Refuses an existing ``path`` unless ``overwrite``.
    """
    if framework not in FRAMEWORKS:
        raise ValueError(f"Expected framework to be one of {FRAMEWORKS}, but got framework={framework!r}")
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if framework == "torch":
        import torch

        data = {
            k: v.detach().cpu() if type(v).__module__.startswith("torch") else torch.from_numpy(
                np.array(_to_numpy(v)))
            for k, v in state_dict.items()
        }
    else:
        data = {k: np.array(_to_numpy(v)) for k, v in state_dict.items()}
        data["StructuredToParameterName@@"] = {k: k for k in state_dict}

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            if framework == "torch":
                torch.save(data, f)
            else:
                pickle.dump(data, f, protocol=4)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
