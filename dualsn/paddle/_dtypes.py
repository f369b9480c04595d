"""dtype and AMP policy: the compute dtype of half-precision weights, auto_cast off, and the
complex helpers (Paddle's complex support is partial: see the comments at each use)."""

from __future__ import annotations

import contextlib

import numpy as np
import paddle

from dualsn import spec as _spec

# Paddle's dtypes are singletons: membership is tested by identity (the ids of the tuples'
# members, which the tuples keep alive). ``dtype in a_tuple`` compares with ==, about 0.7 us
# per entry, and every forward asks these questions (issue 14); paddle.is_complex costs more.
_COMPLEX_DTYPES = (paddle.complex64, paddle.complex128)
_COMPLEX_IDS = frozenset(map(id, _COMPLEX_DTYPES))
_LOW_PRECISION = tuple(getattr(paddle, name) for name in _spec.LOW_PRECISION_DTYPES)
_LOW_PRECISION_IDS = frozenset(map(id, _LOW_PRECISION))


def _is_complex(x) -> bool:
    return id(x.dtype) in _COMPLEX_IDS


def _is_low_precision(dtype) -> bool:
    """Whether ``dtype`` is one of ``_LOW_PRECISION``."""
    return id(dtype) in _LOW_PRECISION_IDS

# Paddle: numpy twins of the dtypes, for host-side sigma (_grad._scaled's overflow check,
# the complex sigma buffer); torch keeps sigma in a tensor and needs none.
_NUMPY_REAL = {paddle.float32: np.float32, paddle.float64: np.float64, paddle.complex64: np.float32, paddle.complex128: np.float64}
_FLOAT_MAX = {dtype: float(np.finfo(real).max) for dtype, real in _NUMPY_REAL.items()}
_NUMPY_COMPLEX = {paddle.complex64: np.complex64, paddle.complex128: np.complex128}


def _compute_dtype(dtype):
    """The dtype of u, v and of all spectral-norm math for a weight of ``dtype``: float32 for
    float16 / bfloat16 weights (a unit vector in half precision holds ~3 digits, and Paddle's
    CPU matmul has no half-precision kernels; see docs/training.md), else ``dtype``."""
    return paddle.float32 if _is_low_precision(dtype) else dtype


def _upcast(weight):
    """``weight`` in :func:`_compute_dtype` (a float32 copy of a half-precision weight)."""
    return weight.astype(paddle.float32) if _is_low_precision(weight.dtype) else weight


def _real_dtype(dtype):
    return {paddle.complex64: paddle.float32, paddle.complex128: paddle.float64}.get(dtype, dtype)


def _amp_off():
    """A context with paddle.amp.auto_cast off (a no-op one when it already is): on a GPU,
    level O1 would run the power iteration's matmuls, and the norms read off them, in
    float16. (Paddle 3.3.1's auto_cast does nothing on the CPU.)"""
    if paddle.is_autocast_enabled():
        return paddle.amp.auto_cast(enable=False)
    return contextlib.nullcontext()


def _scalar(value, like):
    """A Python number as a 0-D tensor of ``like``'s dtype and place (complex arithmetic
    with bare Python scalars would go through Paddle's type promotion)."""
    return paddle.to_tensor(value, dtype=like.dtype, place=like.place)


def _in_precision(value, dtype):
    """A host number rounded to ``dtype``'s precision, as a tensor computation would give it
    (a float32 sigma of 1e-59 is zero, and then the divisor's floor applies)."""
    if value is not None and (dtype is paddle.float32 or dtype is paddle.complex64):
        return complex(np.complex64(value)) if isinstance(value, complex) else float(np.float32(value))
    return value
