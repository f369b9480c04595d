"""What both backend adapters share (Keras's ``backend/common``): framework-free, numpy only.

* :class:`SpectralNormState`: one spectral norm of a model, as numpy copies: what an
  adapter's ``spectral_norms`` returns and :mod:`dualsn.diagnostics` turns into its rows;
* :func:`hook_sn_info` / :func:`hook_sn_preset`: a spectral norm kept as a forward-pre-hook
  (the older torch hook, Paddle's built-in, dualsn's Paddle hooks) read by duck typing;
* :func:`conv_geometry`: a backend's convolution geometry as plain ints;
* :func:`dim_or_none`, :func:`dotted_name`, :func:`dtype_name`, :func:`shape_of`: small helpers.

The adapters import this module; it imports neither a framework nor a backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dualsn import spec as _spec
from dualsn.spec import DEFAULT_EPS

__all__ = ["SpectralNormState", "hook_sn_info", "hook_sn_preset", "dim_or_none",
           "conv_geometry", "dotted_name", "dtype_name", "shape_of"]


@dataclass(frozen=True)
class SpectralNormState:
    """One spectral norm found in a model, as numpy copies (half precision upcast to float32).

    ``name``: the weight it normalizes (``"blocks.0.conv1.weight"``); ``layer``: the layer's
    class name; ``kind``: ``"dualsn"`` or ``"built-in"``; ``dim``: the axis (None for a
    convolution operator norm); ``spec``: the algorithm (a built-in gets the preset that equals
    it, with its own n and eps); ``weight``, ``u``, ``v``: W as the norm sees it and the stored
    vectors (u, v None for a 1-D weight normalized exactly); ``conv``: for a convolution
    operator norm, its geometry as plain ints (``input_shape``, ``output_shape``, ``stride``,
    ``dilation``, ``pads``: the zero padding before each spatial axis, ``groups``), else None;
    ``label``: a fixed preset label, or None when the label is the spec's preset name (with
    ``", built-in"`` appended for a built-in).
    """

    name: str
    layer: str
    kind: str
    dim: int | None
    spec: Any
    weight: np.ndarray = field(repr=False)
    u: np.ndarray | None = field(default=None, repr=False)
    v: np.ndarray | None = field(default=None, repr=False)
    conv: dict | None = None
    label: str | None = None


def dim_or_none(dim) -> int | None:
    """A spectral norm's dim; None for a convolution operator norm, which has no dim."""
    return None if dim is None else int(dim)


def hook_sn_info(layer, name: str):
    """(dim, eps) from a forward-pre-hook spectral norm on ``name`` (the older torch hook, the
    Paddle built-in, dualsn's Paddle hooks), or None; dim is None for a convolution norm."""
    for hook in getattr(layer, "_forward_pre_hooks", {}).values():
        if getattr(hook, "name", None) == name and hasattr(hook, "dim"):
            eps = getattr(hook, "eps", None)
            if eps is None and hasattr(hook, "spec"):
                eps = hook.spec.eps
            return dim_or_none(hook.dim), float(eps if eps is not None else DEFAULT_EPS)
    return None


def hook_sn_preset(layer, name: str, builtin: str, framework: str) -> str | None:
    """The preset of a forward-pre-hook spectral norm on ``name``: dualsn's hooks carry their
    spec; a built-in hook (the older torch one, Paddle's) is ``builtin``."""
    for hook in getattr(layer, "_forward_pre_hooks", {}).values():
        if getattr(hook, "name", None) == name and hasattr(hook, "dim"):
            spec = getattr(hook, "spec", None)
            return builtin if spec is None else _spec.preset_for_order(spec.order, framework)
    return None


def conv_geometry(geometry) -> dict:
    """The geometry of a backend's ``ConvGeometry`` as plain ints (the ``conv`` of
    :class:`SpectralNormState`). Both backends keep ``pads`` as (before, after) per spatial
    axis, flat; the state keeps the padding before each axis, where the adjoint's crop starts."""
    pads = tuple(geometry.pads)[0::2]
    return {"input_shape": _ints(geometry.input_shape), "output_shape": _ints(geometry.output_shape),
            "stride": _ints(geometry.stride), "dilation": _ints(geometry.dilation), "pads": _ints(pads),
            "groups": int(geometry.groups)}


def _ints(values) -> tuple[int, ...]:
    return tuple(int(n) for n in values)


def dotted_name(prefix: str, name: str) -> str:
    """``prefix.name``, or ``name`` for the model itself (prefix ``""``)."""
    return f"{prefix}.{name}" if prefix else name


def dtype_name(x) -> str:
    """``"float32"`` etc. for a numpy array, a torch tensor or a Paddle tensor."""
    if isinstance(x, (np.ndarray, np.generic)):
        return x.dtype.name
    return str(x.dtype).rpartition(".")[2]


def shape_of(x) -> tuple[int, ...]:
    """The shape of any tensor as a tuple of ints."""
    return tuple(int(s) for s in x.shape)
