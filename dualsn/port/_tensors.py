"""Tensor helpers that work on torch tensors, Paddle tensors and numpy arrays alike, and the
conversion of source values (plan phase): every conversion that can fail happens here. What a
framework has to answer comes from its adapter (:mod:`dualsn.adapters`)."""

from __future__ import annotations

import numpy as np

from dualsn.adapter_common import dtype_name as _dtype_name
from dualsn.adapter_common import shape_of as _shape
from dualsn.adapters import FRAMEWORKS, tensor_framework
from dualsn.adapters import adapter as _adapter

__all__ = ["_is_tensor", "_shape", "_dtype_name", "_to_numpy", "_Unloadable", "_source_numpy", "_degenerate"]


def _is_tensor(x) -> bool:
    return isinstance(x, (np.ndarray, np.generic)) or (
        type(x).__module__.split(".")[0] in FRAMEWORKS and hasattr(x, "shape") and hasattr(x, "dtype")
    )


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, (np.ndarray, np.generic)):
        return np.asarray(x)
    framework = tensor_framework(x)
    if framework is not None:
        return _adapter(framework).to_numpy(x)
    return x.numpy()


class _Unloadable(ValueError):
    """A source value that holds no data the target could take (the message completes the key)."""


def _source_numpy(value) -> np.ndarray:
    """``value`` as a numpy array that the target's framework takes as it is: dense, in the
    machine's byte order, without negative strides. Views where possible, copies where needed."""
    framework = tensor_framework(value)
    if framework is not None:
        tensors = _adapter(framework)
        why = tensors.missing_data(value)
        if why is not None:
            raise _Unloadable(why)
        array = tensors.dense_numpy(value)
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
