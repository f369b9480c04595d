"""Names in porting: layer tensors that differ between the frameworks, the preset names, and
how a spectral norm's preset is inferred from its keys. The key naming itself is
:mod:`dualsn.keys`', the Linear layouts :mod:`dualsn.layout`'s. Plain strings only."""

from __future__ import annotations

from dualsn.keys import flavour
from dualsn.spec import PRESETS

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




def _rename(name: str, kind: str, source_fw: str, target_fw: str) -> str:
    """The name a tensor called ``name`` in a ``target_fw`` layer has in a ``source_fw`` one."""
    if source_fw == target_fw:
        return name
    table = _PADDLE_NAMES.get(kind, {})
    if target_fw == "paddle":
        table = {p: t for t, p in table.items()}
    return table.get(name, name)


PRESET_NAMES = tuple(PRESETS)
"""The presets a spectral norm is labelled with (:data:`dualsn.spec.PRESETS`). ``"torch_legacy"``
and ``"paddle"`` are the same algorithm (:func:`dualsn.spec.same_algorithm`): a port between
them is no mismatch."""


def _check_preset(name, what: str) -> str:
    if name not in PRESET_NAMES:
        raise ValueError(f"Expected {what} to be one of {PRESET_NAMES}, but got {name!r}")
    return name


def _describe_dim(dim: int | None) -> str:
    return "as a convolution operator (spectral_norm_conv)" if dim is None else f"along dim {dim}"


_INFERRED = {
    "torch_parametrization": ("torch", "inferred from torch parametrization keys"),
    "torch_legacy": ("torch_legacy", "inferred from the older torch hook's keys"),
    "paddle": ("paddle", "inferred from Paddle hook keys"),
}


def _inferred_preset(original_key: str, framework: str, u_shape=None) -> tuple[str, str]:
    """(preset, basis) of a spectral norm known only from its keys: the torch parametrization
    -> "torch", the older torch hook -> "torch_legacy", Paddle's hook -> "paddle". A u with
    more than one axis (an output activation) is dualsn's convolution operator norm, whose
    algorithm is fixed (:data:`dualsn.spec.CONV_COMPAT`, the legacy order) in any flavour."""
    if u_shape is not None and len(u_shape) > 1:
        return ("torch_legacy" if framework == "torch" else "paddle",
                "inferred: a convolution operator norm (spectral_norm_conv)")
    return _INFERRED[flavour(original_key, framework)]


def _dotted(prefix: str, key) -> str:
    return f"{prefix}.{key}" if prefix else str(key)
