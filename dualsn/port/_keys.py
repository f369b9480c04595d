"""State-dict keys: where a tensor of a layer lives in each framework and each spectral-norm
flavour, the Linear layouts, and the preset names. Plain strings only: no tensor, no framework."""

from __future__ import annotations

import re
from typing import Iterable, Mapping

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


PRESET_NAMES = ("torch", "torch_legacy", "paddle")
"""The presets a spectral norm is labelled with (:data:`dualsn.spec.PRESETS`). ``"torch_legacy"``
and ``"paddle"`` are the same algorithm: a port between them is no mismatch."""


def _algorithm(preset: str) -> str:
    return "legacy" if preset in ("torch_legacy", "paddle") else preset


def _check_preset(name, what: str) -> str:
    if name not in PRESET_NAMES:
        raise ValueError(f"Expected {what} to be one of {PRESET_NAMES}, but got {name!r}")
    return name


def _describe_dim(dim: int | None) -> str:
    return "as a convolution operator (spectral_norm_conv)" if dim is None else f"along dim {dim}"


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


def _dotted(prefix: str, key) -> str:
    return f"{prefix}.{key}" if prefix else str(key)
