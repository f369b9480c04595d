"""The norm-range rules of dualsn's power iteration, numpy only: N(x) = x / max(||x||, eps)
without overflow or underflow, when u, v restart, when a plain norm can be trusted, and that a
NaN or Inf in W is an error. :mod:`dualsn.spec` re-exports every name.
"""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ["underflow_threshold", "plain_norm_trusted", "safe_norm", "normalize", "init_dtype", "check_finite_sigma"]


@functools.lru_cache(maxsize=None)
def underflow_threshold(dtype) -> float:
    """The smallest normal number of ``dtype``'s real precision (numpy, torch or Paddle dtype,
    or its name). A norm below it has underflowed: there pair 0's u, v restart from
    :func:`dualsn.spec.recovery_uv` (see :func:`normalize`). Not zero, so that CPUs that flush subnormals
    to zero decide the same."""
    return float(np.finfo(init_dtype(str(dtype))).tiny)


def plain_norm_trusted(norm: float, dtype) -> bool:
    """Whether a plain sqrt(sum |x|^2) of ``dtype`` is exact to rounding: finite, and above
    sqrt(smallest normal), below which the squared sum lost digits to underflow. Elsewhere
    :func:`safe_norm` rescales by max|x|."""
    return math.sqrt(underflow_threshold(dtype)) < norm < math.inf


def safe_norm(x: np.ndarray):
    """||x|| in x's own (real) precision, without overflow or underflow of the squared sum:
    the plain sqrt(sum |x|^2) where that is representable, else max|x| * ||x / max|x|||.
    (Weights up to ~1e30 in float32 and ~1e300 in float64 then keep a finite, exact sigma.)"""
    x = np.asarray(x)
    with np.errstate(over="ignore", under="ignore"):  # out of range is what the fallback is for
        norm = np.linalg.norm(x)
    if plain_norm_trusted(norm, norm.dtype) or norm == 0 and not np.any(x):
        return norm
    scale = np.max(np.abs(x))
    if not np.isfinite(scale) or scale == 0:
        return norm  # inf / nan stay as they are
    return scale * np.linalg.norm(x / scale)


def normalize(x: np.ndarray, eps: float, recovery: np.ndarray | None = None) -> np.ndarray:
    """N(x) = x / max(||x||, eps), in x's own precision.

    With ``recovery`` (pair 0 of the power iteration), an x whose norm has underflowed (below
    the dtype's smallest normal number, zero included) gives ``recovery`` instead: u, v never
    collapse to zero for good, so a weight that was all zero (or underflowed) is estimated
    again as soon as it is not (see :func:`dualsn.spec.recovery_uv`, :func:`underflow_threshold`).
    """
    norm = safe_norm(x)
    if recovery is not None and norm < underflow_threshold(norm.dtype):
        return np.array(recovery, dtype=x.dtype)
    return x / np.maximum(norm, np.asarray(eps, dtype=norm.dtype))


def init_dtype(dtype_name: str) -> np.dtype:
    """The numpy dtype :func:`init_uv` draws in for a framework dtype called ``dtype_name``
    (``"float32"``, ``"torch.bfloat16"``, ``"paddle.complex64"``...).

    Numpy has no bfloat16: such weights get float32 u, v, which the framework then rounds.
    """
    bare = str(dtype_name).rpartition(".")[2]
    return np.dtype("float32" if bare == "bfloat16" else bare)


def check_finite_sigma(sigma) -> None:
    """FloatingPointError when a power iteration meets a NaN or Inf, which happens exactly
    when W holds one (every entry of W enters W v). Backends raise it before u, v change and
    add which parameter of which layer: the built-ins would make u, v NaN for good, and every
    later output NaN, without a word."""
    if not np.isfinite(sigma):
        raise FloatingPointError(
            f"the weight holds NaN or Inf (power-iteration norm = {sigma}). u and v are left "
            "as they were; fix the step that made the weight non-finite (a lower learning rate, "
            "gradient clipping) or restore a checkpoint."
        )


