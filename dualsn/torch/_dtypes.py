"""dtype and autocast policy of dualsn.torch, and what the execution context allows.

Spectral norm runs in the weight's compute dtype (float32 for half-precision weights) with
autocast off. Host reads of a scalar (``.item()``) are free only on the CPU, in eager mode
and outside vmap: :func:`_reads_host` says when the fast paths may take them.
"""

from __future__ import annotations

import contextlib

import torch

from dualsn import spec as _spec


# ---------------------------------------------------------------------------------------------
# The execution context


# torch: .item() would synchronize off the CPU and in compiled code, and fails under vmap,
# so the fast paths ask first; Paddle's fast path always reads there (dynamic mode only).
def _no_compiler() -> bool:
    return False


_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or _no_compiler
"""Whether torch.compile is tracing this code (``torch.compiler.is_compiling``, torch >= 2.3).

Every caller looks it up here at call time (``_dtypes._is_compiling()``), so that tests can
force the off-CPU paths by replacing this one name."""


_functorch = getattr(torch._C, "_functorch", None)
_BATCH_CHECKS = tuple(
    getattr(_functorch, name)
    for name in ("is_batchedtensor", "is_legacy_batchedtensor", "is_functorch_wrapped_tensor")
    if _functorch is not None and hasattr(_functorch, name)
)
"""functorch's tests for a vmap batched or wrapped tensor, those this torch has (looked up once:
:func:`_reads_host` runs several times per training step)."""


def _is_batched(t: torch.Tensor) -> bool:
    """Whether ``t`` is a vmap batched tensor (functorch's, or the legacy one of
    ``autograd.grad(..., is_grads_batched=True)``, which gradcheck uses): ``.item()`` fails on it."""
    for check in _BATCH_CHECKS:
        if check(t):
            return True
    return False


def _reads_host(x: torch.Tensor) -> bool:
    """Whether a scalar of ``x`` can be read on the host for free: CPU, eager, not under vmap."""
    return x.is_cpu and not _is_compiling() and not _is_batched(x)


# ---------------------------------------------------------------------------------------------
# Autocast


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for this device type."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


def _no_autocast(device_type: str):
    """A context with autocast off, or a no-op one when it is already off (the cheap case).

    Spectral norm runs in the weight's own dtype: autocast would cast the batched products
    (bmm, matmul, baddbmm) of the power iteration and of the gradient to reduced precision.
    """
    # torch: autocast is per device type; Paddle's auto_cast is one switch (its _amp_off).
    if _autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# The compute dtype

_LOW_PRECISION = tuple(getattr(torch, name) for name in _spec.LOW_PRECISION_DTYPES)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of u, v and of all spectral-norm math for a weight of ``dtype``: float32 for
    float16 / bfloat16 weights (a unit vector in half precision holds ~3 digits, and the
    power iteration's rounding would bias sigma; see docs/training.md), else ``dtype``."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _upcast(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in :func:`_compute_dtype` (a float32 copy of a half-precision weight)."""
    return weight.to(_compute_dtype(weight.dtype))
