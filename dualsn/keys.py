"""State-dict key naming of spectral-norm state, for every flavour, in one place.

Two layouts exist:

* the torch parametrization (torch's ``parametrizations.spectral_norm`` and ``dualsn.torch``):
  W under ``parametrizations.<p>.original``, state role ``r`` of the parametrization at index
  ``i`` under ``parametrizations.<p>.<i>._<r>``;
* the hook layout (torch's older ``spectral_norm`` hook, Paddle's built-in and
  ``dualsn.paddle``): W under ``<p>_orig``, role ``r`` under ``<p>_<r>``.

Backends name their buffers with these functions; porting and reporting parse keys with them.
This module imports nothing but the standard library.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

__all__ = [
    "ORIGINAL",
    "STATE_ROLES",
    "EXTRA_ROLES",
    "RECOVERY_ROLES",
    "PARAMETRIZED_PATTERN",
    "FLAVOURS",
    "PARAMETRIZATIONS",
    "buffer_name",
    "parametrized_key",
    "hook_key",
    "split_key",
    "group_keys",
    "join_key",
    "sn_keys",
    "sn_param_of",
    "flavour",
]

ORIGINAL = "original"
"""The role of W itself."""

STATE_ROLES = ("u", "v", "u_extra", "v_extra", "sigma")
"""Spectral-norm state besides W, by role. ``u_extra``/``v_extra`` (``num_svs``) and ``sigma``
(``track_sigma``) are dualsn's; the built-ins have u and v only."""

EXTRA_ROLES = ("u_extra", "v_extra")
"""The roles of the extra pairs (``num_svs > 1``): one row per extra pair."""

RECOVERY_ROLES = ("u_recovery", "v_recovery")
"""dualsn.torch's non-persistent buffers (never in a state dict): where u, v restart."""

FLAVOURS = ("torch_parametrization", "torch_legacy", "paddle")
"""Key layouts: the torch parametrization, and the hook layout in a torch checkpoint (the older
torch hook) or a Paddle one (the Paddle built-in and dualsn.paddle)."""

PARAMETRIZATIONS = "parametrizations"
"""The torch module attribute (and key prefix) that holds parametrized tensors."""

_HOOK_ORIGINAL = "_orig"

PARAMETRIZED_PATTERN = re.compile(PARAMETRIZATIONS + r"\.([^.]+)\.(?:" + ORIGINAL + r"|(\d+)\.([^.]+))$")

# Longest suffixes first: "weight_u_extra" is the u_extra of "weight", not the u of "weight_u_extra".
_HOOK_SUFFIXES = tuple(sorted(
    [(_HOOK_ORIGINAL, ORIGINAL)] + [("_" + r, r) for r in STATE_ROLES], key=lambda pair: -len(pair[0])
))


def buffer_name(role: str) -> str:
    """The attribute a torch parametrization keeps state ``role`` in: ``_u``, ``_v``..."""
    return "_" + role


def parametrized_key(param: str, role: str = ORIGINAL, index: int = 0) -> str:
    """``parametrizations.<param>.original``, or ``parametrizations.<param>.<index>._<role>``."""
    if role == ORIGINAL:
        return f"{PARAMETRIZATIONS}.{param}.{ORIGINAL}"
    return f"{PARAMETRIZATIONS}.{param}.{index}.{buffer_name(role)}"


def hook_key(param: str, role: str = ORIGINAL) -> str:
    """``<param>_orig`` for W, ``<param>_<role>`` for the state: the hook layout."""
    return param + (_HOOK_ORIGINAL if role == ORIGINAL else "_" + role)


def split_key(key: str) -> tuple[str, str]:
    """(layer prefix, local name): the torch parametrization's entries stay together."""
    head = PARAMETRIZATIONS + "."
    if key.startswith(head):
        return "", key
    index = key.find("." + head)
    if index >= 0:
        return key[:index], key[index + 1 :]
    prefix, _, local = key.rpartition(".")
    return prefix, local


def join_key(prefix: str, local: str) -> str:
    return f"{prefix}.{local}" if prefix else local


def group_keys(keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """prefix -> {local name: full key}."""
    groups: dict[str, dict[str, str]] = {}
    for key in keys:
        prefix, local = split_key(key)
        groups.setdefault(prefix, {})[local] = key
    return groups


def sn_keys(locals_: Mapping[str, str], param: str) -> dict[str, str]:
    """The keys of the spectral-norm state on ``param`` among one layer's local names
    (local name -> full key), by role ``original`` or one of :data:`STATE_ROLES`; {} if
    there is none."""
    found: dict[str, str] = {}
    original = parametrized_key(param)
    if original in locals_:
        found[ORIGINAL] = locals_[original]
        for local, key in locals_.items():
            m = PARAMETRIZED_PATTERN.match(local)
            if m and m.group(1) == param and m.group(3) and m.group(3)[1:] in STATE_ROLES:
                found[m.group(3)[1:]] = key
    elif hook_key(param) in locals_:
        found[ORIGINAL] = locals_[hook_key(param)]
        for role in STATE_ROLES:
            if hook_key(param, role) in locals_:
                found[role] = locals_[hook_key(param, role)]
    return found


def sn_param_of(local: str, locals_: Mapping[str, str]) -> tuple[str, str] | None:
    """(param, role) when ``local`` is spectral-norm state in a layer, else None."""
    m = PARAMETRIZED_PATTERN.match(local)
    if m:
        if m.group(2) is None:
            return m.group(1), ORIGINAL
        if m.group(3)[1:] in STATE_ROLES and m.group(3).startswith("_"):
            return m.group(1), m.group(3)[1:]
        return None
    for suffix, role in _HOOK_SUFFIXES:
        if local.endswith(suffix) and hook_key(local[: -len(suffix)]) in locals_:
            return local[: -len(suffix)], role
    return None


def flavour(original_key: str, framework: str) -> str:
    """The flavour (:data:`FLAVOURS`) of spectral-norm state whose W has ``original_key``."""
    head = PARAMETRIZATIONS + "."
    if original_key.startswith(head) or "." + head in original_key:
        return "torch_parametrization"
    return "torch_legacy" if framework == "torch" else "paddle"
