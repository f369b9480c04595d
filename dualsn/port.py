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

Loading is transactional: every pair is checked first (missing, unexpected, shape, dtype, the
spectral norm's axis), every source value is converted to the array that will be copied (byte
order, strides, sparse layout) or refused (meta tensors, Python objects, and by default NaN/Inf
values and all-zero u, v), and one :class:`PortError` lists every problem; when it is raised
the target is unchanged. A nested checkpoint is narrowed to the state dict that fits the
target (:func:`select_state_dict`: ``key``, ``strip_prefix``, the ``module.``/``_orig_mod.``
prefixes), and nested state dicts are flattened with dotted keys (:func:`flatten_state_dict`).

Presets: each spectral norm's preset in the source (dualsn's record in the file, the live
source model, or the key layout: torch parametrization -> "torch", the older torch hook ->
"torch_legacy", Paddle's hook -> "paddle") is compared with the target's; a different
algorithm warns (:class:`PresetMismatchWarning`) or, with ``strict_presets``, is refused.
:func:`describe` reports the flavour, preset, dim and sigma of every spectral norm of a
checkpoint.

:func:`torch_to_paddle` and :func:`paddle_to_torch` port between two live models, where each
source Linear's layout (and each spectral norm's dim) is known exactly. For a raw state dict,
:func:`load_state_dict` assumes each framework's native Linear and lets the target's layer type
decide; shape checks catch a mismatch.

:func:`load_checkpoint` reads ``.pt`` / ``.pth`` (``torch.load(weights_only=True)``) and
``.pdparams`` files (a restricted unpickler: nothing from the file is executed) without running
code from them: regular files only, the format decided by the content, never more tensor data
than the file's size, nested containers returned as written. :func:`save_checkpoint` writes
atomically, never replaces a file created meanwhile unless told to, and honours the umask.

This module imports neither framework at import time.
"""

from __future__ import annotations

import _compat_pickle
import collections
import errno
import math
import os
import pickle
import re
import secrets
import stat
import sys
import time
import warnings
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
    "flatten_state_dict",
    "framework_of",
    "select_state_dict",
    "describe",
    "presets_of",
    "checkpoint_metadata",
    "Entry",
    "PortReport",
    "Selection",
    "PresetMismatch",
    "CheckpointDescription",
    "SNLayerDescription",
    "PortError",
    "CheckpointError",
    "PresetMismatchWarning",
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
    """A checkpoint file is not a state dict this module can read safely, or which of its
    state dicts to use is not clear (:func:`select_state_dict`)."""


class PresetMismatchWarning(UserWarning):
    """A port loaded spectral-norm state into a layer whose preset runs another algorithm than
    the one that produced it (e.g. a torch-parametrization checkpoint into a Paddle model built
    with ``compat="paddle"``): eval outputs agree, training does not continue step for step.
    ``mismatches`` lists them (:class:`PresetMismatch`)."""

    def __init__(self, message: str, mismatches: list["PresetMismatch"] | None = None):
        super().__init__(message)
        self.mismatches = list(mismatches or [])


@dataclass(frozen=True)
class PresetMismatch:
    """The spectral norm on ``layer`` (``"conv1.weight"``) has preset ``source`` in the source
    and ``target`` in the target; ``basis`` says how the source's preset is known
    (``"recorded by dualsn"``, ``"inferred from torch parametrization keys"``, ...)."""

    layer: str
    source: str
    target: str
    basis: str

    def __str__(self) -> str:
        return (f"spectral norm of {self.layer!r}: the source's preset is {self.source!r} ({self.basis}), "
                f"the target's {self.target!r}")


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
    missing and unexpected keys it tolerated (only with ``strict=False``), the preset
    mismatches it warned about, and for a nested checkpoint the entry it loaded (``key``) and
    the key prefix it stripped."""

    source: str
    target: str
    entries: list[Entry] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    preset_mismatches: list[PresetMismatch] = field(default_factory=list)
    key: str = ""  # the entry of a nested checkpoint that was loaded ("" : the whole mapping)
    stripped_prefix: str = ""  # the key prefix that was stripped ("module.", ...)


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

    def sn_preset(self, layer, name: str) -> str | None:
        """The preset of the spectral norm on ``layer.<name>`` (see :func:`presets_of`)."""
        plists = getattr(layer, "parametrizations", None)
        if plists is not None and name in plists:
            for p in plists[name]:
                if hasattr(p, "dim") and hasattr(p, "eps"):
                    spec = getattr(p, "spec", None)  # dualsn's; else the torch built-in
                    return "torch" if spec is None else _preset_of_spec(spec, "torch")
        return _hook_sn_preset(layer, name, "torch_legacy", "torch")

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

    def sn_preset(self, layer, name: str) -> str | None:
        return _hook_sn_preset(layer, name, "paddle", "paddle")

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


def _hook_sn_preset(layer, name: str, builtin: str, framework: str) -> str | None:
    """The preset of a forward-pre-hook spectral norm on ``name``: dualsn's hooks carry their
    spec; a built-in hook (the older torch one, Paddle's) is ``builtin``."""
    for hook in getattr(layer, "_forward_pre_hooks", {}).values():
        if getattr(hook, "name", None) == name and hasattr(hook, "dim"):
            spec = getattr(hook, "spec", None)
            return builtin if spec is None else _preset_of_spec(spec, framework)
    return None


PRESET_NAMES = ("torch", "torch_legacy", "paddle")
"""The presets a spectral norm is labelled with (:data:`dualsn.spec.PRESETS`). ``"torch_legacy"``
and ``"paddle"`` are the same algorithm: a port between them is no mismatch."""


def _preset_of_spec(spec, framework: str) -> str:
    """The preset whose power iteration ``spec`` runs: ``"torch"`` (u first), else the legacy
    order (v first), named after the framework (``"torch_legacy"`` in torch, ``"paddle"`` in
    Paddle; the same algorithm). What the state of a port depends on is the update order."""
    order = getattr(spec, "order", None)
    if order == "uv":
        return "torch"
    if order == "vu":
        return "torch_legacy" if framework == "torch" else "paddle"
    return "custom"


def _algorithm(preset: str) -> str:
    return "legacy" if preset in ("torch_legacy", "paddle") else preset


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


FLAVOURS = ("torch_parametrization", "torch_legacy", "paddle")
"""Key layouts of spectral-norm state: the torch parametrization (``parametrizations.<p>.original``,
``.0._u``, ``.0._v``; the torch built-in and dualsn.torch), and the hook layout (``<p>_orig``,
``<p>_u``, ``<p>_v``) in a torch checkpoint (the older torch hook) or a Paddle one (the Paddle
built-in and dualsn.paddle)."""

_INFERRED = {
    "torch_parametrization": ("torch", "inferred from torch parametrization keys"),
    "torch_legacy": ("torch_legacy", "inferred from the older torch hook's keys"),
    "paddle": ("paddle", "inferred from Paddle hook keys"),
}


def _flavour(original_key: str, framework: str) -> str:
    """The flavour (:data:`FLAVOURS`) of spectral-norm state whose W has ``original_key``."""
    if original_key.startswith("parametrizations.") or ".parametrizations." in original_key:
        return "torch_parametrization"
    return "torch_legacy" if framework == "torch" else "paddle"


def _inferred_preset(original_key: str, framework: str, u_shape=None) -> tuple[str, str]:
    """(preset, basis) of a spectral norm known only from its keys: the torch parametrization
    -> "torch", the older torch hook -> "torch_legacy", Paddle's hook -> "paddle". A u with
    more than one axis (an output activation) is dualsn's convolution operator norm, whose
    algorithm is fixed (:data:`dualsn.spec.CONV_COMPAT`, the legacy order) in any flavour."""
    if u_shape is not None and len(u_shape) > 1:
        return ("torch_legacy" if framework == "torch" else "paddle",
                "inferred: a convolution operator norm (spectral_norm_conv)")
    return _INFERRED[_flavour(original_key, framework)]


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
# Planning: decide, for every target tensor, where it comes from and how, convert every source
# value it needs, and collect every problem, before anything is written.


@dataclass
class _Step:
    entry: Entry
    target: Any  # the live target tensor
    reshape: bool = False  # see _RESHAPED
    synth_from: str | None = None  # u, v (extra rows) of a matrix-mode 1-D norm, from an exact norm's W
    eps: float = 1e-12
    sigma_of: tuple[Any, str] | None = None  # (layer, param): a _sigma computed after loading
    array: np.ndarray | None = None  # what the write phase copies into ``target``, prepared in the plan


DEGENERATE_HINT = (
    "refused (pass allow_degenerate=True, or --allow-degenerate on the command line, to load it anyway)"
)


class _Planner:
    """Decides, for every target tensor, which source tensor fills it and how, converts that
    source value to the array the write phase copies, and collects every problem on the way.
    Reads both sides; writes nothing."""

    def __init__(self, target, state_dict: Mapping[str, Any], source: str, source_layouts, source_dims,
                 allow_degenerate: bool = False, source_presets=None):
        self.target_fw = framework_of(target)
        self.adapter = _adapter(self.target_fw)
        self.target_state = self.adapter.state(target)
        self.layers = self.adapter.layers(target)
        self.state_dict = state_dict
        self.source = source
        self.source_layouts = source_layouts  # prefix -> Linear layout; None: native layouts
        self.source_dims = source_dims  # (prefix, param) -> spectral-norm dim; None: unknown
        self.allow_degenerate = allow_degenerate
        self.source_presets = {} if source_presets is None else source_presets  # "layer.param" -> (preset, basis)
        self.mismatches: list[PresetMismatch] = []
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
        first = len(self.steps)
        for local, key in t_locals.items():
            self._tensor(prefix, layer, kind, (t_layout, s_layout), local, key, t_locals, s_locals)
        self._leftovers(kind, t_locals, s_locals)
        if self.source_dims is None and layer is not None:  # a raw state dict: dims unknown
            self._check_orientations(prefix, layer, kind, t_layout, self.steps[first:])

    def _tensor(self, prefix, layer, kind, layouts, local, key, t_locals, s_locals) -> None:
        t_layout, s_layout = layouts
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
                      and t_layout != s_layout and len(shape) == 2)

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
        if _is_meta(tensor):
            self.problems.append(f"{key!r} in the target is a meta tensor, which has no storage to "
                                 "load into: materialize the model first, e.g. model.to_empty(device='cpu')")
            return
        problems_before = len(self.problems)
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
        if role == "original" and info and "original" in s_sn:
            self._compare_presets(prefix, layer, param, s_param, s_sn)
        if role == "original" and info and self.source_dims and (prefix, s_param) in self.source_dims:
            s_dim = self.source_dims[(prefix, s_param)]
            fitting = (1 - s_dim) if (transposed and s_dim is not None) else s_dim
            if info[0] != fitting:
                self.problems.append(_dim_mismatch(_join(prefix, param), kind, (t_layout, info[0]),
                                                   (s_layout, s_dim), fitting))
        note = f"reshaped {list(s_shape)} -> {list(shape)}" if reshape else ""
        entry = Entry(key, source_key, shape, transposed, role, param if role else "", note)
        step = _Step(entry, tensor, reshape=reshape)
        if len(self.problems) == problems_before:  # it fits: convert it now, before any write
            step.array = self._prepared(step, value)
        self.steps.append(step)

    def _compare_presets(self, prefix, layer, param, s_param, s_sn) -> None:
        """Record a :class:`PresetMismatch` when the source's spectral norm on this weight ran
        another algorithm than the target's will."""
        target = self.adapter.sn_preset(layer, param)
        name = _join(prefix, s_param)
        u = self.state_dict.get(s_sn["u"]) if "u" in s_sn else None
        u_shape = _shape(u) if _is_tensor(u) else None
        source, basis = self.source_presets.get(name) or _inferred_preset(s_sn["original"], self.source, u_shape)
        if target is not None and _algorithm(source) != _algorithm(target):
            self.mismatches.append(PresetMismatch(_join(prefix, param), source, target, basis))

    def _prepared(self, step: _Step, value) -> np.ndarray | None:
        """The array the write phase copies for ``step`` (in the target's layout), or None after
        recording why the source value cannot be loaded."""
        source_key = step.entry.source_key
        try:
            array = _source_numpy(value)
        except _Unloadable as e:
            self.problems.append(f"{source_key!r} {e}")
            return None
        except Exception as e:  # noqa: BLE001 - anything a framework raises while converting
            self.problems.append(f"{source_key!r} cannot be converted: {type(e).__name__}: {e}")
            return None
        why = None if self.allow_degenerate else _degenerate(array, step.entry.sn)
        if why is not None:
            self.problems.append(f"{source_key!r}: {why}; {DEGENERATE_HINT}")
            return None
        if step.entry.transposed:
            array = array.T
        if step.reshape:
            array = array.reshape(step.entry.shape)
        return array

    def _check_dtype(self, key, tensor, source_key, value) -> None:
        t_dtype, s_dtype = _dtype_name(tensor), _dtype_name(value)
        if "bfloat16" in (t_dtype, s_dtype):
            self.problems.append(f"{key!r}: bfloat16 is not supported (numpy has no bfloat16)")
        elif t_dtype != s_dtype:
            self.problems.append(
                f"dtype mismatch for {key!r}: the target has {t_dtype}, the source {source_key!r} "
                f"has {s_dtype}"
            )

    def _check_orientations(self, prefix, layer, kind, layout, steps: list[_Step]) -> None:
        """Refuse u, v that belong to the transposed W-matrix of a square weight: the source
        normalized it along its other axis, which no shape check can see. After a power
        iteration u = N(W v) (and v = N(W^H u)) hold for the matrix they were computed with."""
        loaded: dict[str, dict[str, np.ndarray]] = {}
        for step in steps:
            if step.entry.sn in ("original", "u", "v") and step.array is not None and step.synth_from is None:
                loaded.setdefault(step.entry.param, {})[step.entry.sn] = step.array
        for param, arrays in loaded.items():
            info = self.adapter.sn_info(layer, param)
            if len(arrays) < 3 or info is None or info[0] is None:
                continue
            fits = _orientation_fits(arrays["original"], info[0], arrays["u"], arrays["v"], info[1])
            if fits is not None and _transposed_fits_better(*fits):
                self.problems.append(_orientation_problem(_join(prefix, param), kind, layout, info[0], fits))

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
                step = _Step(entry, tensor, synth_from=w_key, eps=info[1])
                step.array = self._fixed_point(step, w)
                self.steps.append(step)
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

    def _fixed_point(self, step: _Step, w) -> np.ndarray | None:
        """u, v (extra rows) at the fixed point of the exact norm of the 1-D weight ``w``."""
        try:
            w = _source_numpy(w)
        except Exception as e:  # noqa: BLE001 - the weight's own step records the problem
            if not isinstance(e, _Unloadable):
                self.problems.append(f"{step.synth_from!r} cannot be converted: {type(e).__name__}: {e}")
            return None
        if step.entry.sn in _EXTRA_ROLES:
            return np.zeros(step.entry.shape, dtype=w.dtype)
        if step.entry.sn == "v":
            return np.ones(1, dtype=w.dtype)
        return (w / np.maximum(np.linalg.norm(w), np.asarray(step.eps, dtype=w.real.dtype))).astype(w.dtype)

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


# ---------------------------------------------------------------------------------------------
# Converting source values (plan phase): every conversion that can fail happens here.


class _Unloadable(ValueError):
    """A source value that holds no data the target could take (the message completes the key)."""


def _is_meta(x) -> bool:
    device = getattr(x, "device", None)
    return type(x).__module__.startswith("torch") and getattr(device, "type", None) == "meta"


def _torch_numpy(t) -> np.ndarray:
    if _is_meta(t):
        raise _Unloadable("is a meta tensor: it has no data to load")
    if t.layout != sys.modules["torch"].strided:  # sparse: the dense values it stands for
        t = t.to_dense()
    return t.detach().cpu().resolve_conj().resolve_neg().numpy()


def _paddle_numpy(t) -> np.ndarray:
    if not t._is_initialized():
        raise _Unloadable("is a Paddle tensor without data")
    if any(getattr(t, name, lambda: False)() for name in ("is_sparse_coo", "is_sparse_csr")):
        t = t.to_dense()
    if t.place.is_cpu_place():
        try:
            return np.from_dlpack(t.detach())  # no copy
        except Exception:  # noqa: BLE001 - dtypes DLPack lacks: the copying path below
            pass
    return t.numpy()


def _source_numpy(value) -> np.ndarray:
    """``value`` as a numpy array that the target's framework takes as it is: dense, in the
    machine's byte order, without negative strides. Views where possible, copies where needed."""
    framework = type(value).__module__.split(".")[0]
    if framework == "torch":
        array = _torch_numpy(value)
    elif framework == "paddle":
        array = _paddle_numpy(value)
    else:
        array = np.asarray(value)
    if array.dtype.hasobject:
        raise _Unloadable("holds Python objects, not numbers")
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if any(stride < 0 for stride in array.strides):
        array = np.ascontiguousarray(array)
    return array


def _count_nonfinite(array: np.ndarray, chunk: int = 1 << 20) -> int:
    flat = array.reshape(-1) if array.flags.c_contiguous else array.ravel(order="K")
    return sum(
        int(part.size - np.count_nonzero(np.isfinite(part)))
        for part in (flat[i:i + chunk] for i in range(0, flat.size, chunk))
    )


def _degenerate(array: np.ndarray, role: str) -> str | None:
    """Why a source value would load a broken layer (NaN/Inf values; an all-zero u or v, which
    the power iteration never leaves), or None."""
    if array.dtype.kind in "fc":
        bad = _count_nonfinite(array)
        if bad:
            return f"{bad} of {array.size} values are NaN or Inf"
    if role in ("u", "v") and array.size and not np.any(array):
        return f"{role} is all zeros, which the power iteration never leaves"
    return None


# ---------------------------------------------------------------------------------------------
# Which matrix a spectral norm normalizes: messages, and the orientation test for square weights


_LAYOUT_TEXT = {OUT_IN: "[out, in]", IN_OUT: "[in, out]"}

ORIENTATION_TOL = 1e-3
"""u, v that miss both u = N(W v) and v = N(W^H u) by less than this fit as loaded."""


def _rows(layout: str, dim: int) -> str:
    return "output features" if (layout == OUT_IN) == (dim == 0) else "input features"


def _axis_text(kind: str, layout: str | None, dim: int | None) -> str:
    """How a spectral norm takes a weight: "along dim 0 of its [in, out] weight (rows: ...)"."""
    if dim is None:
        return _describe_dim(dim)
    text = f"along dim {dim}"
    if kind == "linear" and layout in _LAYOUT_TEXT and dim in (0, 1):
        text += f" of its {_LAYOUT_TEXT[layout]} weight (rows: {_rows(layout, dim)})"
    return text


def _register_text(kind: str, layout: str | None, dim: int) -> str:
    if kind == "linear" and layout in _LAYOUT_TEXT and dim in (0, 1):
        return f"dim={dim} (rows: {_rows(layout, dim)})"
    return f"dim={dim}"


def _dim_mismatch(name: str, kind: str, target: tuple, source: tuple, fitting: int | None) -> str:
    """The live path's message: ``target`` and ``source`` are (Linear layout, dim)."""
    text = (f"spectral norm of {name!r} normalizes a different matrix in the target than in the "
            f"source: the target takes it {_axis_text(kind, *target)}, the source "
            f"{_axis_text(kind, *source)}, so u and v would not fit")
    if fitting is not None and target[1] is not None:
        text += f"; register the target's with {_register_text(kind, target[0], fitting)}"
    return text


def _orientation_fits(w, dim: int, u, v, eps: float) -> tuple[float, float] | None:
    """How well u, v fit the target's W-matrix M as loaded, and its transpose: the smaller
    residual of u = N(M v) and v = N(M^H u), for M and for M^T. None unless M is square."""
    w, u, v = (np.asarray(a) for a in (w, u, v))
    if w.ndim < 2 or u.ndim != 1 or v.ndim != 1:
        return None
    dtype = np.complex128 if np.iscomplexobj(w) else np.float64
    dim %= w.ndim
    m = np.moveaxis(w, dim, 0).reshape(w.shape[dim], -1).astype(dtype)
    if m.shape[0] != m.shape[1] or u.shape != (m.shape[0],) or v.shape != (m.shape[1],):
        return None
    u, v = u.astype(dtype), v.astype(dtype)

    def unit(x):
        return x / max(float(np.linalg.norm(x)), eps)

    def residual(mat):
        return min(float(np.linalg.norm(u - unit(mat @ v))), float(np.linalg.norm(v - unit(mat.conj().T @ u))))

    return residual(m), residual(m.T)


def _transposed_fits_better(as_loaded: float, transposed: float) -> bool:
    return as_loaded > ORIENTATION_TOL and transposed * 100 < as_loaded


def _orientation_problem(name: str, kind: str, layout: str | None, dim: int, fits) -> str:
    as_loaded, transposed = fits
    text = (f"spectral norm of {name!r}: the source's u and v fit the transposed W-matrix (residual "
            f"{transposed:.1e}, against {as_loaded:.1e} as loaded): the source normalized this square "
            f"weight along its other axis, while the target takes it {_axis_text(kind, layout, dim)}. "
            "Loaded as they are, sigma and the normalized weight would be wrong")
    if dim in (0, 1):
        text += f"; register it with {_register_text(kind, layout, 1 - dim)}, as the source did"
    return text


# ---------------------------------------------------------------------------------------------
# Loading


def _load(target, state_dict, source, strict, progress, allow_degenerate=False, source_layouts=None,
          source_dims=None, source_presets=None, strict_presets=False, stacklevel=4):
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"Expected state_dict to be a mapping, but got {type(state_dict).__name__}")
    if source not in FRAMEWORKS:
        raise ValueError(f"Expected source to be one of {FRAMEWORKS}, but got source={source!r}")
    try:
        state_dict = flatten_state_dict(state_dict)
    except ValueError as e:
        raise PortError([str(e)]) from None
    plan = _Planner(target, state_dict, source, source_layouts, source_dims, allow_degenerate, source_presets)
    problems = plan.problems
    if strict:
        problems = [m for _, m in plan.missing] + [u for _, u in plan.unexpected] + problems
    if strict_presets:
        problems = problems + [
            f"{m}: refused (strict_presets); build the target's spectral norm with compat={m.source!r}, "
            "or port without strict_presets to load it anyway" for m in plan.mismatches]
    if problems:
        raise PortError(problems)
    if plan.mismatches:  # before any write: a warnings filter that raises leaves the target unchanged
        warnings.warn(PresetMismatchWarning(_mismatch_message(plan.mismatches), plan.mismatches),
                      stacklevel=stacklevel)

    # Every value is converted and fits: from here on nothing can fail short of running out of
    # memory.
    report = PortReport(source=source, target=plan.target_fw)
    report.missing = [k for k, _ in plan.missing]
    report.unexpected = [k for k, _ in plan.unexpected]
    report.preset_mismatches = list(plan.mismatches)
    for step in progress(plan.steps) if progress is not None else plan.steps:
        if step.array is not None:
            plan.adapter.assign(step.target, step.array)
        report.entries.append(step.entry)
    for layer in plan.layers.values():
        plan.adapter.refresh(layer)
    for step in plan.steps:  # after every other tensor: sigma of the loaded W, u, v
        if step.sigma_of is not None:
            plan.adapter.store_sigma(*step.sigma_of, step.target)
    return report


def _mismatch_message(mismatches: list[PresetMismatch]) -> str:
    first = mismatches[0]
    return (f"{len(mismatches)} spectral norm(s) loaded into a different preset than the source's, so "
            "training will not continue step for step (eval outputs agree): "
            + "; ".join(str(m) for m in mismatches)
            + f". Build the target with compat={first.source!r} to continue the source's algorithm, or "
            "pass strict_presets=True (--strict-presets) to refuse such a port")


def _infer_source(state_dict: Mapping) -> str:
    try:
        values = flatten_state_dict(state_dict).values()
    except ValueError:  # _load reports why it cannot be flattened
        values = state_dict.values()
    kinds = {type(v).__module__.split(".")[0] for v in values} & set(FRAMEWORKS)
    if len(kinds) == 1:
        return kinds.pop()
    raise ValueError(
        "Cannot tell which framework wrote this state dict (its values are not all torch or all "
        "paddle tensors): pass source='torch' or source='paddle'"
    )


def _dotted(prefix: str, key) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def flatten_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with its nested mappings flattened: their keys are joined with ``.``
    (``{"netG": {"conv.weight": w}}`` -> ``{"netG.conv.weight": w}``; an integer key becomes
    its decimal string). Everything that is not a mapping (tensors, numbers, lists) is a value
    as it is, and a flat state dict comes back as a plain copy.

    :func:`load_checkpoint` returns nested checkpoints (a trainer's ``{"netG": ..., "epoch":
    3}``) as they were written; :func:`load_state_dict` flattens what it is given with this.
    Raises ValueError when two entries flatten to the same key, when a mapping is reached twice
    (shared or cyclic: its entries would repeat), or when mappings nest deeper than
    :data:`MAX_NESTING`.
    """
    flat: dict[str, Any] = {}
    seen: set[int] = set()

    def walk(mapping: Mapping, prefix: str, depth: int) -> None:
        where = repr(prefix) if prefix else "the top level"
        if id(mapping) in seen:
            raise ValueError(f"the mapping at {where} is reached twice (shared or cyclic): flattening "
                             "would repeat its entries")
        if depth > MAX_NESTING:
            raise ValueError(f"mappings nested more than {MAX_NESTING} levels deep (at {where})")
        seen.add(id(mapping))
        for key, value in mapping.items():
            name = _dotted(prefix, key)
            if isinstance(value, Mapping):
                walk(value, name, depth + 1)
            elif name in flat:
                raise ValueError(f"two entries flatten to the same key {name!r}")
            else:
                flat[name] = value

    walk(state, "", 0)
    return flat


# ---------------------------------------------------------------------------------------------
# Nested checkpoints: which state dict to load


WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
"""Key prefixes stripped automatically, but only when *every* key of the chosen state dict has
one and the target has no key with it: ``module.`` (``DataParallel`` /
``DistributedDataParallel``), ``_orig_mod.`` (``torch.compile``), ``model.`` (a PyTorch
Lightning module's ``self.model``). Chains (``module._orig_mod.``) are stripped in turn."""

_OPTIMIZER_KEYS = ("param_groups", "LR_Scheduler")  # torch's optimizer state, Paddle's


@dataclass
class Selection:
    """What :func:`select_state_dict` chose: ``state``, the flat state dict; ``key``, the
    dotted path of its entry in the checkpoint (``""``: the whole checkpoint);
    ``stripped``, the prefix taken off its keys (``""``: none)."""

    state: dict[str, Any]
    key: str = ""
    stripped: str = ""


def _is_optimizer(name: str, mapping: Mapping) -> bool:
    """An optimizer's state (its tensors are no model's): torch's and Paddle's state dicts,
    and entries named like one (``optimizer``, ``optimG``, ``G_optim``)."""
    return "optim" in name.rpartition(".")[2].lower() or any(k in mapping for k in _OPTIMIZER_KEYS)


def _tensor_mappings(checkpoint: Mapping) -> tuple[list[tuple[str, Mapping]], list[tuple[str, Mapping]]]:
    """(every mapping holding a tensor somewhere below it, root first; the *entries*: the
    mappings holding tensors directly, not inside another entry), outside optimizer states."""
    every: list[tuple[str, Mapping]] = []
    entries: list[tuple[str, Mapping]] = []
    seen: set[int] = set()

    def walk(mapping: Mapping, path: str, depth: int, in_entry: bool) -> bool:
        if id(mapping) in seen or depth > MAX_NESTING:
            return False
        seen.add(id(mapping))
        direct = any(_is_tensor(v) for v in mapping.values())
        slot = len(every)
        every.append((path, mapping))
        if direct and not in_entry:
            entries.append((path, mapping))
        below = False
        for key, value in mapping.items():
            name = _dotted(path, key)
            if isinstance(value, Mapping) and not _is_optimizer(name, value):
                below |= walk(value, name, depth + 1, in_entry or direct)
        if not (direct or below):
            del every[slot]
        return direct or below

    walk(checkpoint, "", 0, False)
    return every, entries


def _count_tensors(mapping: Mapping) -> int:
    try:
        return sum(_is_tensor(v) for v in flatten_state_dict(mapping).values())
    except ValueError:
        return 0


def _listing(found: list[tuple[str, Mapping]]) -> str:
    return ", ".join(f"{path or '(the whole checkpoint)'!r} ({_count_tensors(m)} tensors)" for path, m in found)


def _lookup(mapping: Mapping, name: str):
    """The key of ``mapping`` spelled ``name`` (an int key as its decimal string), or None."""
    if name in mapping:
        return name
    if name.lstrip("-").isdigit() and int(name) in mapping:
        return int(name)
    return None


def _entry_at(checkpoint: Mapping, key: str) -> dict[str, Any]:
    """The flat state dict at the dotted path ``key``: nested entries first (the longest key
    that matches, since keys may hold dots), then a dotted prefix of the flat keys below
    (``state_dict.model`` in a Lightning file, whose ``state_dict`` is flat)."""
    node, parts, i = checkpoint, key.split("."), 0
    while i < len(parts):
        if not isinstance(node, Mapping):
            raise CheckpointError(f"key {key!r}: {'.'.join(parts[:i])!r} is a {type(node).__name__}, not a mapping")
        for j in range(len(parts), i, -1):
            found = _lookup(node, ".".join(parts[i:j]))
            if found is not None:
                node, i = node[found], j
                break
        else:
            rest = ".".join(parts[i:]) + "."
            sub = {k[len(rest):]: v for k, v in flatten_state_dict(node).items() if k.startswith(rest)}
            if sub:
                return sub
            _, entries = _tensor_mappings(checkpoint)
            raise CheckpointError(f"key {key!r}: no such entry in the checkpoint; its state dicts: "
                                  f"{_listing(entries) or 'none'}")
    if not isinstance(node, Mapping):
        raise CheckpointError(f"key {key!r} is a {type(node).__name__}, not a state dict")
    return flatten_state_dict(node)


def _strip(state: dict[str, Any], prefix: str, where: str) -> dict[str, Any]:
    stripped = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
    if len(stripped) != len(state):
        raise CheckpointError(f"stripping {prefix!r} from the keys of {where} makes two keys the same")
    return stripped


def _prefixed(state: dict[str, Any], strip_prefix: str | None, target_keys, where: str) -> tuple[dict, str]:
    """``state`` with ``strip_prefix`` taken off the keys that have it (an error when none has
    it), then any :data:`WRAPPER_PREFIXES` that every key has and no target key has."""
    done = ""
    if strip_prefix:
        prefix = strip_prefix if strip_prefix.endswith(".") else strip_prefix + "."
        if not any(k.startswith(prefix) for k in state):
            example = next(iter(state), None)
            raise CheckpointError(f"strip_prefix {prefix!r}: no key of {where} starts with it"
                                  + (f" (a key: {example!r})" if example is not None else ""))
        state, done = _strip(state, prefix, where), prefix
    if target_keys is None:
        return state, done
    while state:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)
                       and not any(t.startswith(p) for t in target_keys)), None)
        if prefix is None:
            break
        state, done = _strip(state, prefix, where), done + prefix
    return state, done


def select_state_dict(checkpoint: Mapping[str, Any], *, key: str | None = None, strip_prefix: str | None = None,
                      target=None) -> Selection:
    """The state dict to load from ``checkpoint`` (e.g. :func:`load_checkpoint`'s result), flat.

    * ``key``: the dotted path of the entry (``"state_dict"``, ``"G_ema"``, ``"models.netG"``,
      ``"state_dict.model"``: a dotted prefix of flat keys works too).
    * Without ``key``, the mappings that hold tensors (outside optimizer states) are the
      candidates. With a ``target`` model, the one that has every layer of the target is
      chosen (a flat state dict, ``{"state_dict": ..., "optimizer": ...}``, ``{"netG": ...,
      "netD": ..., "epoch": 3}`` for a generator); when several do (``G`` and ``G_ema`` for a
      generator) or none does and there is more than one state dict, :class:`CheckpointError`
      lists the candidates. Without a target a checkpoint that holds tensors directly is its
      own state dict, and one entry is taken when it is the only one.
    * ``strip_prefix`` is taken off every key that has it (an error when none has it).
      :data:`WRAPPER_PREFIXES` (``module.``, ``_orig_mod.``, ``model.``) are stripped
      automatically when every key has one and the target has no key with it.

    Raises CheckpointError as said, and ValueError when the entry cannot be flattened
    (:func:`flatten_state_dict`).
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"Expected a mapping, but got {type(checkpoint).__name__}")
    target_keys = None
    if target is not None:
        target_keys = list(_adapter(framework_of(target)).state(target))
    if key is not None:
        if not isinstance(key, str) or not key:
            raise ValueError(f"Expected key to be a non-empty dotted path, but got key={key!r}")
        state, stripped = _prefixed(_entry_at(checkpoint, key), strip_prefix, target_keys, repr(key))
        return Selection(state, key, stripped)

    every, entries = _tensor_mappings(checkpoint)
    if target_keys is not None and every:
        layers = set(_group(target_keys))
        fitting = []
        for path, mapping in every:
            try:
                state, stripped = _prefixed(flatten_state_dict(mapping), strip_prefix, target_keys,
                                            repr(path) if path else "the checkpoint")
            except ValueError:  # CheckpointError included: this candidate cannot be the one
                continue
            if layers <= set(_group(state)):
                fitting.append(Selection(state, path, stripped))
        if len(fitting) == 1:
            return fitting[0]
        if len(fitting) > 1:
            raise CheckpointError(
                f"the checkpoint holds {len(fitting)} state dicts that fit the model: "
                f"{_listing([(f.key, f.state) for f in fitting])}; pick one with key=... (--key)")
    if not entries or entries[0][0] == "":
        chosen = ""
    elif len(entries) == 1:
        chosen = entries[0][0]
    else:
        fits = " none of them has every layer of the model;" if target_keys is not None else ""
        raise CheckpointError(f"the checkpoint holds {len(entries)} state dicts: {_listing(entries)};{fits} "
                              "pick one with key=... (--key)")
    state = flatten_state_dict(checkpoint) if chosen == "" else _entry_at(checkpoint, chosen)
    state, stripped = _prefixed(state, strip_prefix, target_keys, repr(chosen) if chosen else "the checkpoint")
    return Selection(state, chosen, stripped)


def load_state_dict(
    target,
    state_dict: Mapping[str, Any],
    *,
    source: str | None = None,
    strict: bool = True,
    progress: Callable[[list], Iterable] | None = None,
    allow_degenerate: bool = False,
    key: str | None = None,
    strip_prefix: str | None = None,
    strict_presets: bool = False,
    source_preset: str | Mapping[str, str] | None = None,
) -> PortReport:
    """Load ``state_dict``, written by the framework ``source``, into ``target``.

    ``target`` is a ``torch.nn.Module`` or a ``paddle.nn.Layer``; ``state_dict`` maps names to
    torch tensors, paddle tensors or numpy arrays (e.g. from :func:`load_checkpoint`). A nested
    checkpoint (a trainer's ``{"state_dict": ..., "optimizer": ...}``, ``{"netG": ...,
    "netD": ...}``, ``ema``/``G_ema`` entries, prefixed keys) is narrowed to one state dict
    first, by :func:`select_state_dict` with ``key`` and ``strip_prefix``; an ambiguous choice
    raises :class:`CheckpointError` listing the candidates. ``source`` is ``"torch"`` or
    ``"paddle"`` (inferred from the tensors when omitted; required for numpy arrays). Every
    target tensor is filled in place, converted for the target layer's type (see the module
    docstring). A source Linear weight is taken to be in its framework's native layout (torch
    ``[out, in]``, ``paddle.nn.Linear`` ``[in, out]``).

    With ``strict`` (the default) a target tensor missing from the source, or a source tensor
    with no place in the target, is an error; without it they are left alone and listed in the
    report. A shape or dtype mismatch is always an error, and so is a source value that cannot
    be converted (a meta tensor, Python objects) or u, v that belong to the transposed W-matrix
    of a square weight. Source values with NaN or Inf, and an all-zero u or v, are errors
    unless ``allow_degenerate``. Errors are collected first, every source value is converted
    before the first write, and all problems are raised together as one :class:`PortError`;
    the target is then unchanged.

    Presets: each source spectral norm's preset is the one dualsn recorded in the checkpoint
    (:func:`save_checkpoint`), else ``source_preset`` (one name for all, or ``{"conv.weight":
    name}``) when given, else inferred from its keys (torch parametrization -> ``"torch"``,
    the older torch hook -> ``"torch_legacy"``, Paddle's hook -> ``"paddle"``). A target
    spectral norm that runs another algorithm gets a :class:`PresetMismatchWarning` naming the
    layer and both presets (``torch_legacy`` and ``paddle`` are one algorithm); with
    ``strict_presets`` it is a problem of the :class:`PortError` instead. ``strict`` does not
    cover presets: loading across presets is a legitimate migration.

    ``progress`` optionally wraps the list of copy steps (e.g. ``tqdm``). Returns a
    :class:`PortReport`.
    """
    if not isinstance(state_dict, Mapping):
        return _load(target, state_dict, source, strict, progress, allow_degenerate)  # says why not
    try:
        selection = select_state_dict(state_dict, key=key, strip_prefix=strip_prefix, target=target)
    except CheckpointError:
        raise
    except ValueError as e:  # flattening: shared or cyclic mappings, colliding keys
        raise PortError([str(e)]) from None
    if source is None:
        recorded = checkpoint_metadata(state_dict)
        source = recorded["framework"] if recorded and recorded.get("framework") in FRAMEWORKS else \
            _infer_source(selection.state)
    presets = _source_presets(state_dict, selection, source_preset)
    report = _load(target, selection.state, source, strict, progress, allow_degenerate,
                   source_presets=presets, strict_presets=strict_presets)
    report.key, report.stripped_prefix = selection.key, selection.stripped
    return report


class _EveryLayer(dict):
    """source_presets for ``source_preset="name"``: the same (preset, basis) for every layer."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def get(self, key, default=None):
        return self.value


def _check_preset(name, what: str) -> str:
    if name not in PRESET_NAMES:
        raise ValueError(f"Expected {what} to be one of {PRESET_NAMES}, but got {name!r}")
    return name


def _source_presets(checkpoint, selection: "Selection", source_preset):
    """layer -> (preset, basis) the caller stated, or dualsn recorded, for the selected state."""
    if isinstance(source_preset, str):
        return _EveryLayer((_check_preset(source_preset, "source_preset"), "stated by source_preset"))
    if isinstance(source_preset, Mapping):
        return {k: (_check_preset(v, f"source_preset[{k!r}]"), "stated by source_preset")
                for k, v in source_preset.items()}
    if source_preset is not None:
        raise TypeError(f"Expected source_preset to be a str or a mapping, but got {type(source_preset).__name__}")
    meta = checkpoint_metadata(checkpoint)
    if meta is None or selection.key or selection.stripped:
        return None
    basis = f"recorded by dualsn {meta.get('version', '?')}"
    return {k: (v, basis) for k, v in meta.get("presets", {}).items()}


def _sn_params(model):
    """(adapter, layer, layer prefix, parameter name) of every spectral norm in ``model``."""
    adapter = _adapter(framework_of(model))
    layers = adapter.layers(model)
    for prefix, locals_ in _group(adapter.state(model)).items():
        layer = layers.get(prefix)
        for local in locals_:
            sn = _sn_param_of(local, locals_)
            if sn and sn[1] == "original" and layer is not None:
                yield adapter, layer, prefix, sn[0]


def presets_of(model) -> dict[str, str]:
    """``{"conv1.weight": preset}`` for every spectral norm in ``model`` (any flavour): dualsn's
    by its algorithm (``"torch"``; the legacy order is ``"torch_legacy"`` in torch and
    ``"paddle"`` in Paddle, one algorithm), the torch parametrization ``"torch"``, the older
    torch hook ``"torch_legacy"``, Paddle's hook ``"paddle"``. :func:`save_checkpoint` records
    this in the file."""
    found = {}
    for adapter, layer, prefix, param in _sn_params(model):
        preset = adapter.sn_preset(layer, param)
        if preset is not None:
            found[_join(prefix, param)] = preset
    return found


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
    dims = {}
    for adapter, layer, prefix, param in _sn_params(model):
        info = adapter.sn_info(layer, param)
        if info is not None:
            dims[(prefix, param)] = info[0]
    return dims


def _port(source_model, target, expect_source: str, expect_target: str, strict, progress, allow_degenerate,
          strict_presets=False):
    if framework_of(source_model) != expect_source:
        raise TypeError(f"Expected the source to be a {expect_source} model")
    if framework_of(target) != expect_target:
        raise TypeError(f"Expected the target to be a {expect_target} model")
    state = _adapter(expect_source).state(source_model)
    presets = {k: (v, "of the source model") for k, v in presets_of(source_model).items()}
    return _load(
        target, state, expect_source, strict, progress, allow_degenerate,
        source_layouts=_linear_layouts(source_model), source_dims=_sn_dims(source_model),
        source_presets=presets, strict_presets=strict_presets, stacklevel=5,
    )


def port_model(source_model, target, *, strict: bool = True, progress=None,
               allow_degenerate: bool = False, strict_presets: bool = False) -> PortReport:
    """Copy the state of ``source_model`` into ``target``, each a torch or a Paddle model of
    the same architecture (the frameworks may be the same: then only spectral-norm flavours
    are converted). See :func:`torch_to_paddle`."""
    source = framework_of(source_model)
    return _port(source_model, target, source, framework_of(target), strict, progress, allow_degenerate,
                 strict_presets)


def torch_to_paddle(module, layer, *, strict: bool = True, progress=None,
                    allow_degenerate: bool = False, strict_presets: bool = False) -> PortReport:
    """Copy the state of the torch ``module`` into the Paddle ``layer`` (same architecture).

    Like :func:`load_state_dict`, but each source Linear's layout, each spectral norm's dim
    and each spectral norm's preset are read from ``module``, so nothing is assumed. A target
    spectral norm with another preset warns (:class:`PresetMismatchWarning`), or with
    ``strict_presets`` is refused.
    """
    return _port(module, layer, "torch", "paddle", strict, progress, allow_degenerate, strict_presets)


def paddle_to_torch(layer, module, *, strict: bool = True, progress=None,
                    allow_degenerate: bool = False, strict_presets: bool = False) -> PortReport:
    """Copy the state of the Paddle ``layer`` into the torch ``module`` (same architecture).

    Like :func:`load_state_dict`, but each source Linear's layout (``paddle.nn.Linear`` or
    ``paddle.compat.nn.Linear``), each spectral norm's dim and its preset are read from
    ``layer``.
    """
    return _port(layer, module, "paddle", "torch", strict, progress, allow_degenerate, strict_presets)


# ---------------------------------------------------------------------------------------------
# Checkpoint files: reading. Only regular files; the format is decided by the content; nothing
# from the file runs; a file decodes to at most its own size of tensor data.

SIZE_SLACK = 64 * 1024
"""Bytes of tensor data a checkpoint may decode to beyond its own size. Pickled arrays and
torch's zip entries carry their bytes, so a real checkpoint decodes to less than its size; a
file that would decode to more (by using the same data again, or by asking for memory without
data) is refused before that memory is allocated."""

MAX_NESTING = 100
"""Containers nested deeper than this in a checkpoint are refused."""

_UNPACK = "UnpackBigParamInfor@@"  # sic, Paddle's spelling: arrays over 1 GiB split into slices
_PARAMETER_NAMES = "StructuredToParameterName@@"  # paddle.save's table of parameter names
_ZIP = b"PK\x03\x04"
_TORCH_LEGACY = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # torch.save's pre-1.6 magic number
_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
)


def _brief(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _open_regular(path, shown: str):
    """(binary file, size) for ``path``; CheckpointError for anything but a regular file.
    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "not a file")
            raise CheckpointError(f"{shown}: not a regular file ({kind}): only regular files are read")
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), info.st_size
    except BaseException:
        os.close(fd)
        raise


def _content_format(head: bytes) -> str | None:
    if head.startswith(_ZIP) or head.startswith(_TORCH_LEGACY):
        return "torch"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # a pickle, protocol 2-5
        return "paddle"
    return None


def _checked_format(head: bytes, shown: str) -> str:
    """The format of a file starting with ``head``; a .pt/.pth/.pdparams suffix that the
    content contradicts is an error."""
    found = _content_format(head)
    suffix = os.path.splitext(shown)[1].lower()
    if suffix in TORCH_SUFFIXES and found != "torch":
        if found is None:
            raise CheckpointError(f"{shown}: not a torch checkpoint (neither a zip archive nor a pickle)")
        raise CheckpointError(
            f"{shown}: not a torch checkpoint: it is a pickle that is not torch's (a Paddle .pdparams file?)")
    if suffix in PADDLE_SUFFIXES and found != "paddle":
        what = ("a zip archive (a torch checkpoint?)" if head.startswith(_ZIP) else
                "a torch checkpoint (legacy format)" if found == "torch" else "not a pickle")
        raise CheckpointError(f"{shown}: not a Paddle .pdparams checkpoint: it is {what}")
    if found is None:
        raise CheckpointError(
            f"{shown}: unknown checkpoint format (expected a torch .pt/.pth or a Paddle .pdparams file)")
    return found


def detect_format(path: str | bytes | os.PathLike) -> str:
    """``"torch"`` (a zip archive, or torch's legacy pickle format) or ``"paddle"`` (any other
    pickle), decided by the file's content, the same for str, bytes and PathLike paths.

    Raises FileNotFoundError, or CheckpointError for a file that is not a regular file, whose
    content fits neither format, or whose .pt/.pth/.pdparams suffix the content contradicts.
    """
    shown = os.fsdecode(path)
    file, _ = _open_regular(path, shown)
    with file:
        return _checked_format(file.read(len(_TORCH_LEGACY)), shown)


def _multiarray():
    core = getattr(np, "_core", None) or np.core  # numpy >= 2 / numpy 1.x
    return core.multiarray


class _BoundedReader:
    """The file as the unpickler reads it: a length the pickle declares is checked against the
    bytes left in the file before anything is read (or allocated) for it."""

    def __init__(self, file, size: int):
        self._file, self._left = file, size

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self._left
        if n > self._left:
            raise pickle.UnpicklingError(
                f"the pickle declares {n} bytes where the file has {self._left} left (truncated or forged)")
        data = self._file.read(n)
        if len(data) != n:
            raise pickle.UnpicklingError("the file shrank while it was read")
        self._left -= n
        return data

    def readline(self) -> bytes:
        line = self._file.readline(self._left)
        self._left -= len(line)
        return line


class _NdarrayName:
    """Stands for ``numpy.ndarray`` in a .pdparams pickle, where numpy writes an array as
    ``_reconstruct(ndarray, (0,), b"b")`` followed by its data. Nothing else may use it."""

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError(
            "refused numpy.ndarray called directly: a pickled array is rebuilt from its own bytes, "
            "never from a shape (or a buffer and strides) alone")

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _NdarrayName()


def _ordered_dict(*args, **kwargs):
    if args or kwargs:
        raise pickle.UnpicklingError(
            "refused collections.OrderedDict with arguments: a pickled OrderedDict is made empty, "
            "then filled")
    return collections.OrderedDict()


def _paddle_pair(pair):
    """``builtins.tuple`` as paddle.save uses it: a nested tensor is ``tuple((name, array))``."""
    if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)
            and isinstance(pair[1], np.ndarray)):
        raise pickle.UnpicklingError(
            "refused builtins.tuple on something else: builtins.tuple only rebuilds Paddle's "
            "(name, array) pairs")
    return pair


def _is_shape(shape) -> bool:
    return isinstance(shape, (tuple, list)) and all(
        isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 0 for n in shape)


class _RestrictedUnpickler(pickle._Unpickler):
    """Unpickles what ``paddle.save`` writes: containers, numpy arrays and scalars, and Paddle's
    (name, array) pairs for nested tensors. Every other global is refused, so no callable the
    file names is ever looked up, let alone run, and the allowed ones are wrappers that accept
    only numpy's and Paddle's own uses. Array data is counted as it is decoded: more than the
    file's size (+ SIZE_SLACK) is refused before it is allocated. The pure-Python unpickler
    reads each declared length through :class:`_BoundedReader` before allocating for it (the C
    one allocates first)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: _BoundedReader, size: int):
        super().__init__(file, encoding="latin1")  # latin1: Python 2 str of numpy data
        self._size = size
        self._decoded = {"array": 0, "bytes": 0}
        self._ma = _multiarray()
        self._allowed = {
            ("numpy", "ndarray"): _NDARRAY,
            ("numpy", "dtype"): self._dtype,
            ("_codecs", "encode"): self._encode,
            ("collections", "OrderedDict"): _ordered_dict,
            ("builtins", "tuple"): _paddle_pair,
        }
        for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x / 2
            self._allowed[(module, "_reconstruct")] = self._reconstruct
            self._allowed[(module, "scalar")] = self._scalar

    def find_class(self, module: str, name: str):
        if self.proto < 3:  # Python 2 names, as pickle's own find_class maps them
            module, name = _compat_pickle.NAME_MAPPING.get(
                (module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name))
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused global {_brief(module)}.{_brief(name)}: a .pdparams file holds only "
                "containers, numpy arrays and scalars"
            ) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id: not a Paddle state dict")

    def _charge(self, kind: str, nbytes: int) -> None:
        self._decoded[kind] += nbytes
        if self._decoded[kind] > self._size + SIZE_SLACK:
            raise pickle.UnpicklingError(
                f"its {kind} data decodes to more than the file's {self._size} bytes (+{SIZE_SLACK}): "
                "the file uses the same data again, which paddle.save never does; refused before "
                "allocating it")

    def _dtype(self, *args):
        dtype = np.dtype(*args)
        if dtype.hasobject:
            raise pickle.UnpicklingError(f"refused dtype {dtype}: Python objects are not tensor data")
        return dtype

    def _reconstruct(self, cls, shape, code):
        if cls is not _NDARRAY or shape != (0,) or code not in (b"b", "b"):
            raise pickle.UnpicklingError(
                f"refused _reconstruct{_brief(repr((cls, shape, code)))}: numpy pickles an array as "
                "_reconstruct(numpy.ndarray, (0,), b'b') followed by its data")
        return self._ma._reconstruct(np.ndarray, (0,), b"b")

    def _scalar(self, dtype, data=None):
        if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, (bytes, str)) \
                or len(data) != dtype.itemsize:
            raise pickle.UnpicklingError(
                f"refused scalar({_brief(repr(dtype))}, ...): a numpy scalar is its dtype and "
                "exactly that many bytes")
        self._charge("array", dtype.itemsize)
        return self._ma.scalar(dtype, data)

    def _encode(self, text, encoding="utf-8", errors="strict"):
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
            raise pickle.UnpicklingError(
                f"refused _codecs.encode(..., {_brief(repr(encoding))}): pickle protocol 2 spells "
                "bytes as _codecs.encode(text, 'latin1') only")
        self._charge("bytes", len(text))
        return text.encode("latin1")

    def _check_array_state(self, state) -> None:
        """numpy's array state (version, shape, dtype, fortran, data): data of exactly the
        size the shape needs, and no Python objects, checked before numpy allocates."""
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("refused an array state that is not numpy's")
        shape, dtype, _, data = state[-4:]
        if not isinstance(dtype, np.dtype) or dtype.hasobject:
            raise pickle.UnpicklingError(
                f"refused an array of dtype {_brief(str(dtype))}: Python objects are not tensor data")
        if not (isinstance(shape, tuple) and _is_shape(shape)) or not isinstance(data, (bytes, str)):
            raise pickle.UnpicklingError("refused an array state that is not numpy's")
        nbytes = math.prod(int(n) for n in shape) * dtype.itemsize
        if nbytes != len(data):
            raise pickle.UnpicklingError(
                f"refused an array of shape {_brief(str(shape))} and dtype {dtype} ({nbytes} bytes) "
                f"with {len(data)} bytes of data")
        self._charge("array", nbytes)

    def _load_build(self):
        inst, state = self.stack[-2], self.stack[-1]
        if isinstance(inst, np.ndarray):
            self._check_array_state(state)
        elif type(inst) is collections.OrderedDict:
            if not (isinstance(state, dict) and set(state) == {METADATA_ATTRIBUTE}):
                raise pickle.UnpicklingError(
                    f"refused to set the state of an OrderedDict: only dualsn's {METADATA_ATTRIBUTE!r} "
                    "record may be set on one")
        elif not isinstance(inst, np.dtype):
            raise pickle.UnpicklingError(
                f"refused to set the state of a {type(inst).__name__}: in a .pdparams file only "
                "numpy arrays and dtypes have one")
        pickle._Unpickler.load_build(self)

    def _refuse_buffer(self):
        raise pickle.UnpicklingError("refused an out-of-band buffer (pickle protocol 5): paddle.save "
                                     "never writes one")

    dispatch[pickle.BUILD[0]] = _load_build
    for _opcode in (pickle.BYTEARRAY8, pickle.NEXT_BUFFER, pickle.READONLY_BUFFER):
        dispatch[_opcode[0]] = _refuse_buffer
    del _opcode


def _slice_plan(top: dict, key, info, claimed: dict, arrays_seen: dict):
    """(slice names, arrays, shape) for one entry of a slice table, or its problems (list)."""
    if not isinstance(info, Mapping):
        return [f"{key!r}: its entry is a {type(info).__name__}, not a table"]
    names, shape = info.get("slices"), info.get("OriginShape")
    if names is None:
        return [f"{key!r}: no 'slices' list"]
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        return [f"{key!r}: 'slices' is not a list of names: {_brief(repr(names))}"]
    if shape is None:
        return [f"{key!r}: no 'OriginShape'"]
    if not _is_shape(shape):
        return [f"{key!r}: 'OriginShape' {_brief(repr(shape))} is not a shape"]
    if not isinstance(key, str) or key in top:
        return [f"{key!r} is both an entry and a sliced array" if isinstance(key, str)
                else f"{key!r}: the name of a sliced array must be a string"]
    problems, arrays = [], []
    for name in names:
        if name in claimed:
            problems.append(f"{key!r}: slice {name!r} is listed twice")
            continue
        claimed[name] = key
        value = top.get(name)
        if name not in top:
            problems.append(f"{key!r}: slice {name!r} is not in the file")
        elif not isinstance(value, np.ndarray) or value.ndim != 1:
            problems.append(f"{key!r}: slice {name!r} is not a 1-D array")
        elif arrays_seen.setdefault(id(value), name) != name:
            problems.append(f"{key!r}: slices {arrays_seen[id(value)]!r} and {name!r} are the same data")
        else:
            arrays.append(value)
    if problems:
        return problems
    if len({a.dtype for a in arrays}) > 1:
        return [f"{key!r}: slices of different dtypes ({', '.join(sorted({str(a.dtype) for a in arrays}))})"]
    total, need = sum(a.size for a in arrays), math.prod(int(n) for n in shape)
    if total != need:
        return [f"{key!r}: the slices hold {total} elements, 'OriginShape' {tuple(shape)} needs {need}"]
    return list(names), arrays, tuple(int(n) for n in shape)


def _join_slices(top: dict, shown: str) -> None:
    """Join the arrays paddle.save (protocols 2, 3) split into 1-D slices, after checking the
    whole table: every slice present, used once, and exactly as large as the shape needs."""
    table = top.pop(_UNPACK, None)
    if table is None:
        return
    what = f"{shown}: malformed {_UNPACK!r} table (paddle.save's record of arrays split into slices)"
    if not isinstance(table, Mapping):
        raise CheckpointError(f"{what}: it is a {type(table).__name__}, not a table")
    plans, problems, claimed, arrays_seen = {}, [], {}, {}
    for key, info in table.items():
        plan = _slice_plan(top, key, info, claimed, arrays_seen)
        if isinstance(plan, list):
            problems += plan
        else:
            plans[key] = plan
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))
    for key, (names, arrays, shape) in plans.items():
        for name in names:
            del top[name]
        top[key] = np.concatenate(arrays).reshape(shape)


def _load_pdparams(file, size: int, shown: str) -> dict:
    try:
        obj = _RestrictedUnpickler(_BoundedReader(file, size), size).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{shown}: {e}") from None
    except Exception as e:  # truncated or garbled files  # noqa: BLE001
        raise CheckpointError(
            f"{shown}: not a readable .pdparams pickle ({type(e).__name__}: {_brief(str(e))})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{shown}: holds a {type(obj).__name__}, not a state dict")
    top = collections.OrderedDict(obj) if isinstance(obj, collections.OrderedDict) else dict(obj)
    if METADATA_ATTRIBUTE in getattr(obj, "__dict__", {}):
        setattr(top, METADATA_ATTRIBUTE, obj.__dict__[METADATA_ATTRIBUTE])
    top.pop(_PARAMETER_NAMES, None)
    _join_slices(top, shown)
    return top


def _check_zip_size(file, size: int, shown: str) -> None:
    """Refuse a zip whose entries unpack to more than the file holds: torch stores its tensors
    uncompressed, so only a compressed bomb does."""
    import zipfile

    try:
        with zipfile.ZipFile(file) as archive:
            unpacked = sum(entry.file_size for entry in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{shown}: not a readable zip archive ({_brief(str(e))})") from None
    finally:
        file.seek(0)
    if unpacked > size + SIZE_SLACK:
        raise CheckpointError(
            f"{shown}: its zip entries unpack to {unpacked} bytes, more than the file's {size} "
            f"(+{SIZE_SLACK}): torch stores tensors uncompressed; refused")


def _load_torch(file, size: int, shown: str) -> dict:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{shown}: reading a torch checkpoint needs torch installed") from None
    if file.read(len(_ZIP)) == _ZIP:
        _check_zip_size(file, size, shown)
    file.seek(0)
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch refuses
        raise CheckpointError(f"{shown}: torch.load(weights_only=True) refused it: {_brief(str(e), 400)}") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{shown}: holds a {type(obj).__name__}, not a state dict")
    return obj


def _torch_view_problem(t) -> str | None:
    """Why a loaded torch tensor spans more memory than its storage holds (stride 0 or
    overlapping strides: materializing it would amplify the file), or None."""
    torch = sys.modules["torch"]
    if t.layout != torch.strided:
        return None
    logical, stored = t.numel() * t.element_size(), t.untyped_storage().nbytes()
    if logical > stored + SIZE_SLACK:
        return (f"spans {logical} bytes over {stored} bytes of storage (stride 0 or overlapping "
                "strides); refused")
    return None


class _TreeCheck:
    """Walks what a checkpoint decoded to (containers, tensors, plain values) and returns it
    rebuilt: Paddle's (name, array) pairs become arrays, shared containers stay shared. Refuses
    cycles, nesting deeper than MAX_NESTING, keys that are neither str nor int, arrays of
    Python objects and torch views larger than their storage."""

    def __init__(self, shown: str, framework: str):
        self.shown, self.framework = shown, framework
        self.done: dict[int, Any] = {}
        self.active: set[int] = set()

    def fail(self, message: str):
        raise CheckpointError(f"{self.shown}: {message}")

    def visit(self, obj, path: str = "", depth: int = 0):
        where = repr(path) if path else "the top level"
        if self.framework == "paddle" and isinstance(obj, tuple) and len(obj) == 2 \
                and isinstance(obj[0], str) and isinstance(obj[1], np.ndarray):
            obj = obj[1]  # a nested Paddle tensor
        if _is_tensor(obj):
            return self.tensor(obj, where)
        if not isinstance(obj, (Mapping, list, tuple)):
            return obj
        ident = id(obj)
        if ident in self.done:
            return self.done[ident]
        if ident in self.active:
            self.fail(f"the container at {where} contains itself: not a state dict")
        if depth >= MAX_NESTING:
            self.fail(f"containers nested more than {MAX_NESTING} levels deep (at {where})")
        self.active.add(ident)
        if isinstance(obj, Mapping):
            result = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
            for key, value in obj.items():
                if not isinstance(key, (str, int)) or isinstance(key, bool):
                    self.fail(f"key {_brief(repr(key))} at {where} is a {type(key).__name__}, "
                              "not a str or int")
                result[key] = self.visit(value, _dotted(path, key), depth + 1)
        else:
            items = [self.visit(value, _dotted(path, i), depth + 1) for i, value in enumerate(obj)]
            result = items if isinstance(obj, list) else tuple(items)
        self.active.discard(ident)
        self.done[ident] = result
        return result

    def tensor(self, obj, where: str):
        if _dtype_name(obj) == "object":
            self.fail(f"entry {where} is an array of Python objects, not tensor data")
        if type(obj).__module__.startswith("torch"):
            problem = _torch_view_problem(obj)
            if problem:
                self.fail(f"entry {where} {problem}")
        return obj


def load_checkpoint(path: str | bytes | os.PathLike) -> dict:
    """Read a torch (``.pt``/``.pth``) or Paddle (``.pdparams``) checkpoint.

    Only regular files are read (a FIFO or a device is refused at once); the format is
    :func:`detect_format`, decided by the content. No code from the file runs: torch files go
    through ``torch.load(weights_only=True)``, Paddle files through an unpickler that admits
    only what ``paddle.save`` writes (containers, numpy arrays and scalars, and its (name,
    array) pairs for nested tensors). A file never decodes to more tensor data than its own
    size (+ :data:`SIZE_SLACK`): that is checked before the memory is allocated.

    Returns the checkpoint as it was written: ``{name: tensor}`` for a state dict (torch
    tensors, or numpy arrays for Paddle files), or the nested containers of a trainer's file
    (``{"netG": {...}, "epoch": 3}``), with Paddle's nested tensors as numpy arrays, as
    ``paddle.load(path, return_numpy=True)`` gives them. :func:`flatten_state_dict` (which
    :func:`load_state_dict` applies) joins nested keys with dots. Raises FileNotFoundError, or
    CheckpointError for a file that is not a checkpoint or holds anything else.
    """
    shown = os.fsdecode(path)
    file, size = _open_regular(path, shown)
    with file:
        framework = _checked_format(file.read(len(_TORCH_LEGACY)), shown)
        file.seek(0)
        state = _load_torch(file, size, shown) if framework == "torch" else _load_pdparams(file, size, shown)
    meta = getattr(state, "__dict__", {}).get(METADATA_ATTRIBUTE)
    result = _TreeCheck(shown, framework).visit(state)
    meta = _checked_metadata(meta)
    if meta is not None and isinstance(result, collections.OrderedDict):
        setattr(result, METADATA_ATTRIBUTE, meta)
    return result


# ---------------------------------------------------------------------------------------------
# dualsn's record in a checkpoint file

METADATA_ATTRIBUTE = "_dualsn"
""":func:`save_checkpoint` writes the state dict as an ``OrderedDict`` with this attribute:
``{"format": 1, "version": dualsn's version, "framework": ..., "presets": {"conv.weight":
"torch", ...}, "dims": {"conv.weight": 0, ...}}`` (dims only when saved from a model; a
convolution operator norm's dim is ``"conv"``). It is pickled state, not a key: ``torch.load``
(also with ``weights_only=True``) and ``paddle.load`` restore or skip it, and
``load_state_dict``/``set_state_dict`` never see it, exactly as torch's own ``_metadata``."""

METADATA_FORMAT = 1


def _plain(value, depth: int = 0) -> bool:
    """Whether ``value`` is plain data (str, int, float, bool, None, and dicts/lists of them)."""
    if depth > 8:
        return False
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items())
    return False


def _checked_metadata(meta) -> dict | None:
    """dualsn's record as a plain dict, or None when there is none or it is malformed (a file
    is then read as if dualsn had not written it: its presets are inferred)."""
    if not isinstance(meta, Mapping) or not _plain(meta):
        return None
    meta = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in meta.items()}
    presets = meta.get("presets", {})
    if not isinstance(presets, dict) or not all(v in PRESET_NAMES + ("custom",) for v in presets.values()):
        return None
    dims = meta.get("dims", {})
    if not isinstance(dims, dict) or not all(d == "conv" or (isinstance(d, int) and not isinstance(d, bool))
                                             for d in dims.values()):
        return None
    return meta


def checkpoint_metadata(checkpoint) -> dict | None:
    """The record dualsn wrote into a checkpoint (:data:`METADATA_ATTRIBUTE`), as read by
    :func:`load_checkpoint`, or None (a file dualsn did not write, or a mapping that lost it)."""
    return _checked_metadata(getattr(checkpoint, "__dict__", {}).get(METADATA_ATTRIBUTE))


# ---------------------------------------------------------------------------------------------
# Describing a checkpoint: flavour, presets, spectral norms, sigma


@dataclass(frozen=True)
class SNLayerDescription:
    """One spectral norm in a checkpoint. ``name``: the weight it normalizes
    (``"conv1.weight"``); ``flavour``: :data:`FLAVOURS`; ``preset`` and ``preset_basis``
    (``"recorded by dualsn 0.1.0"`` or ``"inferred from ... keys"``); ``shape`` of W;
    ``dim`` (None: a convolution operator norm, or no axis fits u and v) and ``dim_basis``;
    ``sigma``: u^H M v from the stored W, u, v (M the W-matrix along ``dim``; ``||W||`` for a
    1-D weight normalized exactly; a convolution norm's tracked sigma, else None); ``keys``:
    role -> key in the checkpoint."""

    name: str
    flavour: str
    preset: str
    preset_basis: str
    shape: tuple[int, ...]
    dim: int | None
    dim_basis: str
    sigma: float | None
    keys: dict = field(default_factory=dict, compare=False)


@dataclass
class CheckpointDescription:
    """What :func:`describe` found. ``framework``: ``"torch"`` or ``"paddle"``; ``flavour``:
    one of :data:`FLAVOURS`, ``"mixed"`` or ``"none"`` (no spectral norm); ``layers``: one
    :class:`SNLayerDescription` per spectral norm; ``metadata``: dualsn's record, if the file
    has one; ``key``: the entry described (``""``: the whole checkpoint); ``tensors``: how many
    tensors it holds."""

    path: str | None
    framework: str
    flavour: str
    layers: list[SNLayerDescription]
    metadata: dict | None = None
    key: str = ""
    tensors: int = 0

    @property
    def presets(self) -> dict[str, str]:
        return {layer.name: layer.preset for layer in self.layers}

    def summary(self) -> str:
        where = (self.path or "state dict") + (f" [{self.key}]" if self.key else "")
        flavour = "no spectral norm" if self.flavour == "none" else f"flavour {self.flavour}"
        presets = sorted(set(self.presets.values()))
        how = ("recorded by dualsn" if self.metadata and "presets" in self.metadata else "inferred from the keys")
        text = f"{where}: {self.framework} checkpoint, {self.tensors} tensors, {flavour}"
        if self.layers:
            text += f", {len(self.layers)} spectral norm(s), preset {'/'.join(presets)} ({how})"
        return text

    def __str__(self) -> str:
        lines = [self.summary()]
        if not self.layers:
            return lines[0]
        rows = [("layer", "flavour", "preset", "dim", "shape", "sigma")]
        for layer in self.layers:
            rows.append((
                layer.name, layer.flavour,
                layer.preset + (" (recorded)" if layer.preset_basis.startswith("recorded") else ""),
                "conv" if layer.dim is None and layer.dim_basis.startswith("convolution") else
                ("?" if layer.dim is None else str(layer.dim) + ("?" if "ambiguous" in layer.dim_basis else "")),
                "x".join(str(n) for n in layer.shape),
                "-" if layer.sigma is None else f"{layer.sigma:.6g}",
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for i, row in enumerate(rows):
            lines.append("  ".join(c.rjust(w) if i and j >= 3 else c.ljust(w)
                                   for j, (c, w) in enumerate(zip(row, widths))).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        if any("ambiguous" in layer.dim_basis for layer in self.layers):
            lines.append("?: a square W-matrix whose u and v fit both axes (not iterated yet?): dim assumed")
        return "\n".join(lines)


def _wide(array: np.ndarray) -> np.ndarray:
    return array.astype(np.complex128 if np.iscomplexobj(array) else np.float64)


def _w_matrix(w: np.ndarray, dim: int) -> np.ndarray:
    return np.moveaxis(w, dim, 0).reshape(w.shape[dim], -1) if w.ndim > 1 else w.reshape(-1, 1)


def _infer_dim(w: np.ndarray, u, v) -> tuple[int | None, str]:
    """The axis the spectral norm takes W along, from the shapes of u, v; for a square
    W-matrix, the orientation they fit (after any power iteration u = N(M v), v = N(M^H u))."""
    if u is None:
        return 0, "1-D weight normalized exactly"
    if u.ndim != 1 or v is None or v.ndim != 1:
        return None, "convolution operator norm (u, v are activations)"
    axes = [d for d in range(max(w.ndim, 1)) if w.shape[d] == u.size and w.size // max(w.shape[d], 1) == v.size]
    if not axes:
        return None, f"unknown: u {list(u.shape)} and v {list(v.shape)} fit no axis of W {list(w.shape)}"
    if len(axes) == 1:
        return axes[0], "from the shapes of u and v"
    fits = {d: _orientation_fits(w, d, u, v, 1e-12) for d in axes}
    residual = {d: min(f) if f else math.inf for d, f in fits.items()}
    best = min(axes, key=lambda d: residual[d])
    others = [residual[d] for d in axes if d != best]
    if residual[best] <= ORIENTATION_TOL and all(r > 100 * max(residual[best], 1e-12) for r in others):
        return best, "from u and v (a square W-matrix: the orientation they fit)"
    return axes[0], f"ambiguous: u and v fit dims {axes} alike (a square W-matrix); {axes[0]} assumed"


def _sigma_of(w: np.ndarray, dim: int | None, u, v, tracked) -> float | None:
    if dim is None:  # a convolution operator norm: sigma needs the layer's geometry
        return None if tracked is None else float(np.real(np.asarray(tracked)).reshape(-1)[0])
    w = _wide(w)
    if u is None:
        return float(np.linalg.norm(w))
    m = _w_matrix(w, dim)
    return float(np.real(np.vdot(_wide(u), m @ _wide(v))))


def describe(checkpoint, *, key: str | None = None, strip_prefix: str | None = None,
             source: str | None = None) -> CheckpointDescription:
    """Describe the spectral norms in ``checkpoint``: a path (read with :func:`load_checkpoint`)
    or a mapping (a state dict, or what ``load_checkpoint`` returned).

    The framework is the file's format, or the tensors' type (numpy arrays: ``"paddle"``, as
    ``load_checkpoint`` reads ``.pdparams`` files; pass ``source`` to say otherwise). Each
    spectral norm's flavour is its key layout (:data:`FLAVOURS`); its preset is the one dualsn
    recorded in the file, else inferred: torch parametrization -> ``"torch"``, the older torch
    hook -> ``"torch_legacy"``, Paddle's hook -> ``"paddle"``. (The keys cannot tell a
    dualsn.torch model built with another ``compat`` from torch's built-in, nor a dualsn.paddle
    model from Paddle's: files dualsn wrote say so, others are inferred.) ``key`` and
    ``strip_prefix`` pick an entry as in :func:`select_state_dict`; without ``key`` every
    spectral norm in the checkpoint is described, named by its full dotted key. sigma is u^H M
    v of the stored state, computed in float64 with numpy.
    """
    path = None
    if not isinstance(checkpoint, Mapping):
        path = os.fsdecode(checkpoint)
        framework = detect_format(checkpoint)
        checkpoint = load_checkpoint(checkpoint)
    meta = checkpoint_metadata(checkpoint)
    if key is not None or strip_prefix:
        selection = select_state_dict(checkpoint, key=key, strip_prefix=strip_prefix)
        flat, chosen = selection.state, selection.key
        meta_layers = meta if (meta and not chosen and not selection.stripped) else None
    else:
        flat, chosen, meta_layers = flatten_state_dict(checkpoint), "", meta
    if path is None:
        kinds = {type(v).__module__.split(".")[0] for v in flat.values() if _is_tensor(v)}
        framework = source or ("torch" if kinds == {"torch"} else "paddle")
    recorded_presets = (meta_layers or {}).get("presets", {})
    recorded_dims = (meta_layers or {}).get("dims", {})
    version = (meta or {}).get("version", "?")

    layers = []
    for prefix, locals_ in _group(flat).items():
        for local, full in locals_.items():
            sn = _sn_param_of(local, locals_)
            if not sn or sn[1] != "original":
                continue
            param = sn[0]
            name = _join(prefix, param)
            keys = {"original": full, **{r: k for r, k in _sn_keys(locals_, param).items() if r != "original"}}
            flavour = _flavour(full, framework)
            u_value = flat.get(keys.get("u"))
            if name in recorded_presets:
                preset, basis = recorded_presets[name], f"recorded by dualsn {version}"
            else:
                preset, basis = _inferred_preset(full, framework, _shape(u_value) if _is_tensor(u_value) else None)
            arrays = {}
            for role, k in keys.items():
                value = flat[k]
                if _is_tensor(value):
                    try:
                        arrays[role] = _source_numpy(value)
                    except Exception:  # noqa: BLE001 - a meta tensor, bfloat16: described without sigma
                        pass
            w = arrays.get("original")
            if w is None:
                continue
            u, v = arrays.get("u"), arrays.get("v")
            if name in recorded_dims:
                dim = None if recorded_dims[name] == "conv" else int(recorded_dims[name])
                dim_basis = "convolution operator norm (recorded)" if dim is None else f"recorded by dualsn {version}"
            else:
                dim, dim_basis = _infer_dim(w, u, v)
            try:
                sigma = _sigma_of(w, dim, u, v, arrays.get("sigma"))
            except (ValueError, IndexError):
                sigma = None
            layers.append(SNLayerDescription(name, flavour, preset, basis, tuple(w.shape), dim, dim_basis,
                                             sigma, keys))
    flavours = {layer.flavour for layer in layers}
    overall = flavours.pop() if len(flavours) == 1 else ("none" if not flavours else "mixed")
    tensors = sum(_is_tensor(v) for v in flat.values())
    return CheckpointDescription(path, framework, overall, layers, meta, chosen, tensors)


# ---------------------------------------------------------------------------------------------
# Checkpoint files: writing. Atomic, exclusive unless overwriting, modes as for any new file.

TEMP_SUFFIX = ".dualsn-tmp"
"""save_checkpoint writes ``DIR/.NAME.<pid>-<8 hex digits>.dualsn-tmp`` first, then moves it to
``DIR/NAME``."""

STALE_TEMP_SECONDS = 60
"""A temporary file of a process that no longer exists, unchanged for this long, was left by a
killed writer: the next save_checkpoint to the same path removes it."""

_TEMP_MIDDLE = re.compile(r"(\d+)-[0-9a-f]{8}")
_NO_HARD_LINKS = {getattr(errno, name) for name in ("EPERM", "EOPNOTSUPP", "ENOTSUP", "ENOSYS", "EMLINK",
                                                      "EXDEV") if hasattr(errno, name)}


def _temp_owner(name: str) -> tuple[str, int] | None:
    """(checkpoint name, writer's pid) of a temporary file name of save_checkpoint, or None."""
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return None
    base, _, middle = name[1: -len(TEMP_SUFFIX)].rpartition(".")
    match = _TEMP_MIDDLE.fullmatch(middle)
    return (base, int(match.group(1))) if base and match else None


def _process_exists(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":  # no signal-0 probe: only the age decides
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _remove_stale_temps(directory: str, base: str) -> None:
    """Remove the temporary files killed writers left for ``base`` in ``directory``."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    now = time.time()
    for name in names:
        owner = _temp_owner(name)
        if owner is None or owner[0] != base or _process_exists(owner[1]):
            continue
        full = os.path.join(directory, name)
        try:
            info = os.lstat(full)
            if stat.S_ISREG(info.st_mode) and now - info.st_mtime >= STALE_TEMP_SECONDS:
                os.unlink(full)
        except OSError:
            pass  # gone already, or not ours to remove


def _serializable(state_dict: Mapping[str, Any], framework: str, meta: dict | None) -> collections.OrderedDict:
    if framework == "torch":
        import torch

        data = collections.OrderedDict(
            (k, v.detach().cpu() if type(v).__module__.startswith("torch") else torch.from_numpy(
                np.array(_to_numpy(v))))
            for k, v in state_dict.items()
        )
    else:
        data = collections.OrderedDict((k, np.array(_to_numpy(v))) for k, v in state_dict.items())
        data[_PARAMETER_NAMES] = {k: k for k in state_dict}
    if meta is not None:
        setattr(data, METADATA_ATTRIBUTE, meta)
    return data


def _metadata_for(framework: str, presets: Mapping[str, str] | None, dims: Mapping | None) -> dict:
    from dualsn import __version__

    meta: dict[str, Any] = {"format": METADATA_FORMAT, "version": __version__, "framework": framework}
    if presets is not None:
        meta["presets"] = {str(k): _check_preset(v, f"presets[{k!r}]") if v != "custom" else v
                           for k, v in presets.items()}
    if dims:
        meta["dims"] = {str(k): ("conv" if d in (None, "conv") else int(d)) for k, d in dims.items()}
    return meta


def _write_temp(data: dict, framework: str, directory: str, base: str) -> str:
    """Write ``data`` to a new temporary file next to the checkpoint; returns its path. Created
    with mode 0o666, so the umask gives it the mode of any new file (0o644 under umask 022)."""
    tmp = os.path.join(directory, f".{base}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if framework == "torch":
                sys.modules["torch"].save(data, f)
            else:
                pickle.dump(data, f, protocol=4)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _publish_new(tmp: str, path: str, shown: str) -> None:
    """Give ``tmp`` the name ``path`` unless ``path`` exists, atomically: a hard link fails if
    the name is taken. Where hard links are not supported the name is claimed with O_EXCL
    first, and the file then moved over the claim."""
    exists = FileExistsError(
        f"{shown} was created while the checkpoint was being written; it was left alone (pass "
        "overwrite=True to replace it)")
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise exists from None
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            raise exists from None
        os.replace(tmp, path)
        return
    _unlink_quietly(tmp)


def _replace(tmp: str, path: str) -> None:
    """Move ``tmp`` over ``path``, giving it the mode ``path`` had."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        info = None
    if info is not None and stat.S_ISREG(info.st_mode):
        os.chmod(tmp, stat.S_IMODE(info.st_mode))
    os.replace(tmp, path)


def _sync_directory(directory: str) -> None:
    """Make the new name durable (POSIX); best effort."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    state_dict, path: str | os.PathLike, framework: str, *, overwrite: bool = False,
    presets: Mapping[str, str] | None = None,
) -> None:
    """Write ``state_dict`` as a ``framework`` checkpoint (``"torch"``: ``torch.save``;
    ``"paddle"``: what ``paddle.save`` writes for a state dict: a protocol-4 pickle of numpy
    arrays plus its parameter-name table).

    ``state_dict`` may be a model (a ``torch.nn.Module`` or a ``paddle.nn.Layer``): its state
    is written, and the preset and dim of each of its spectral norms (:func:`presets_of`) are
    recorded in the file (:data:`METADATA_ATTRIBUTE`), so a later port knows them instead of
    inferring them from the keys. For a state dict, ``presets`` (``{"conv.weight": "torch"}``)
    records them; a state dict read by :func:`load_checkpoint` keeps the record it had.

    Atomic: written to a temporary file in the same directory (``.NAME.<pid>-<hex>.dualsn-tmp``,
    see :data:`TEMP_SUFFIX`), then moved to ``path``, so ``path`` never holds a partial file;
    the temporary file a killed writer left for ``path`` is removed. Without ``overwrite`` an
    existing ``path`` is refused (FileExistsError), also one created while this call was
    writing: the file is published with a hard link, which cannot replace anything. A new file
    gets the mode the umask allows (0o644 under umask 022); an overwritten one keeps its mode.
    A write error (a full disk, a read-only directory) raises OSError and leaves no file behind.
    """
    if framework not in FRAMEWORKS:
        raise ValueError(f"Expected framework to be one of {FRAMEWORKS}, but got framework={framework!r}")
    path = os.fspath(path)
    shown = os.fsdecode(path)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{shown} exists; pass overwrite=True to replace it")
    dims = None
    if not isinstance(state_dict, Mapping):
        model = state_dict
        state_dict = _adapter(framework_of(model)).state(model)  # TypeError for anything else
        if presets is None:
            presets = presets_of(model)
        dims = {_join(*key): dim for key, dim in _sn_dims(model).items()}
    elif presets is None:
        recorded = checkpoint_metadata(state_dict)
        presets = recorded.get("presets") if recorded else None
        dims = recorded.get("dims") if recorded else None
    data = _serializable(state_dict, framework, _metadata_for(framework, presets, dims))
    directory, base = os.path.split(os.path.abspath(path))
    _remove_stale_temps(directory, base)
    tmp = _write_temp(data, framework, directory, base)
    try:
        if overwrite:
            _replace(tmp, path)
        else:
            _publish_new(tmp, path, shown)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _sync_directory(directory)
