"""The fast power iteration: norms that neither overflow nor underflow, normalization in place,
one step on every (u, v) pair, the training steps of a forward, sigma read off the last norm,
and the starting vectors as tensors.

Everything here writes u and v in place (``out=``, ``copy_``): module replicas (DataParallel)
share the buffers' storage with the original module, so this is how their updates survive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dualsn import spec as _spec
from dualsn.torch import _dtypes
from dualsn.torch._dtypes import _compute_dtype, _upcast
from dualsn.torch._matrix import WeightMatrix


def _safe_norm(x: torch.Tensor, check_finite: bool = False):
    """(||x|| with keepdim, its value on the host or None): ``dualsn.spec.safe_norm``, no
    overflow or underflow of the squared sum.

    On the CPU the plain norm is read on the host and kept unless it is out of range (so the
    result has F.normalize's bits), and ``check_finite`` raises FloatingPointError for a NaN
    or Inf (``dualsn.spec.check_finite_sigma``). Elsewhere a host read would synchronize: the
    norm is always taken of x / max|x|, and nothing is checked.
    """
    # torch: reads the host only where that is free (_reads_host); Paddle's _host_norm always does.
    host = _dtypes._reads_host(x)
    if host:
        norm = torch.linalg.vector_norm(x, 2, 0, True)
        value = norm.item()
        if _spec.plain_norm_trusted(value, norm.dtype):
            return norm, value
        if value == 0 and not bool(x.any()):
            return norm, 0.0
    scale = x.detach().abs().amax()  # a constant for autograd: s ||x / s|| has ||x||'s gradient
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    norm = torch.linalg.vector_norm(x / scale, 2, 0, True) * scale
    if not host:
        return norm, None
    value = norm.item()
    if check_finite:
        _spec.check_finite_sigma(value)
    return norm, value


def _normalize_into(x: torch.Tensor, out: torch.Tensor, eps: float, recovery: torch.Tensor | None = None):
    """``out <- x / max(||x||, eps)``, in place; returns (``||x||``, ``max(||x||, eps)``,
    ``||x||`` on the host or None), the first a tensor, the second a number where the third is
    known and a tensor elsewhere.

    The same operations as ``F.normalize(x, dim=0, eps=eps, out=out)``, so the result has
    the same bits (on the CPU the divisor is the host number: a division by a Python number
    gives the bits of one by F.normalize's expanded tensor), but the norm is kept: it gives
    sigma (see :func:`power_iteration_`). An x whose norm has underflowed gives ``recovery``
    instead, when given (``dualsn.spec.normalize``); a NaN or Inf norm raises
    FloatingPointError on the CPU before ``out`` is written.
    """
    norm, value = _safe_norm(x, check_finite=True)
    if value is not None:
        if recovery is not None and value < _spec.underflow_threshold(norm.dtype):
            out.copy_(recovery)  # underflowed (zero included): restart
            return None  # sigma is no longer r^2 / max(r, eps) (see sigma_from_last)
        denom = max(value, eps)
        torch.div(x, denom, out=out)
        return norm, denom, value
    denom = norm.clamp_min(eps)
    if recovery is None:
        torch.div(x, denom, out=out)
    else:
        # Off the CPU the restart is a select, and sigma is still read off the norm (0: the
        # forward divides by eps); only sigma() computes u^H W v.
        torch.where(norm < _spec.underflow_threshold(norm.dtype), recovery, x / denom, out=out)
    return norm, denom, None


def _orthogonalize(x: torch.Tensor, basis) -> torch.Tensor:
    """``x`` minus its projections on the (orthonormal) vectors of ``basis``, one after the
    other (Gram-Schmidt, as ``dualsn.reference.power_step``)."""
    for b in basis:
        x = x - torch.vdot(b, x) * b
    return x


def _step(op, u, v, extra_u, extra_v, order: str, eps: float, recovery=(None, None)):
    """One power iteration on every (u, v) pair, in place: ``dualsn.reference.power_step``.

    ``op`` has ``mv`` (x -> M x) and ``mhv`` (y -> M^H y) on flat vectors (a
    :class:`WeightMatrix` or a :class:`ConvOperator`). ``u``, ``v`` are pair 0; ``extra_u``,
    ``extra_v`` (rows = pairs 1, 2, ...; or None) are orthogonalized against the pairs before
    them, so pair 0 is the plain iteration. ``recovery`` = (u, v) pair 0 restarts from
    instead of becoming zero. Returns (norm, max(norm, eps)) of pair 0's last vector before
    normalization, from which sigma is read (see :func:`power_iteration_`).
    """
    rec_u, rec_v = recovery
    last = _spec.in_order(
        order,
        lambda: _normalize_into(op.mv(v), u, eps, rec_u),
        lambda: _normalize_into(op.mhv(u), v, eps, rec_v),
    )
    if extra_u is not None:
        for i in range(extra_u.shape[0]):
            # the new vectors of the pairs before this one (rows before i are updated already)
            us, vs = [u, *extra_u[:i]], [v, *extra_v[:i]]
            _spec.in_order(
                order,
                lambda: _normalize_into(_orthogonalize(op.mv(extra_v[i]), us), extra_u[i], eps),
                lambda: _normalize_into(_orthogonalize(op.mhv(extra_u[i]), vs), extra_v[i], eps),
            )
    return last


def sigma_from_last(last) -> torch.Tensor | None:
    """sigma = u^H M v after a step, from its last norm r: r^2 / max(r, eps) (0-d tensor).
    None after a restart from the recovery vectors: the caller computes u^H M v."""
    if last is None:
        return None
    # torch: a 0-D tensor (no host read); Paddle's computes sigma from the host float norm.
    norm, denom, value = last
    if value is not None and value == denom:
        return norm.view(())  # r >= eps, known on the host: r^2 / r is r itself
    return (norm / denom).mul_(norm).view(())


@torch.no_grad()
def _training_steps(op, vectors, spec: _spec.Spec, recovery=(None, None)):
    """The power iterations of one training forward (``dualsn.reference.training_iterations``),
    in place on ``vectors`` = (u, v, extra_u, extra_v); returns (sigma, count).

    How many steps: :meth:`dualsn.spec.Spec.run_training_iterations`; with ``atol``/``rtol``
    each comparison reads the estimate (pair 0's last norm) on the host.
    """
    state = {"last": None}

    def step():
        state["last"] = last = _step(op, *vectors, spec.order, spec.eps, recovery)
        # the estimate is read on the host only where the tolerance stop compares it
        if last is None or not spec.uses_tolerance:
            return None
        return last[0].item() if last[2] is None else last[2]

    count = spec.run_training_iterations(step)
    return sigma_from_last(state["last"]), count


@torch.no_grad()
def power_iteration_(
    weight: torch.Tensor, dim: int, u: torch.Tensor, v: torch.Tensor, n: int, order: str, eps: float
) -> torch.Tensor | None:
    """Run ``n`` power iterations in ``order`` on ``weight``'s W-matrix, into ``u`` and ``v``.

    The writes are in place (``out=``) on purpose: module replicas (DataParallel) share the
    buffers' storage with the original module, so this is how their updates survive.

    Returns sigma = u^H W v for the new u, v (a 0-d tensor; None when ``n == 0``), read off
    the last normalization instead of computed with a third product: order "uv" ends with
    v <- W^H u / max(r, eps), r = ||W^H u||, so u^H W v = r^2 / max(r, eps); order "vu" ends
    with u <- W v / max(r, eps), r = ||W v||, and the same holds. Computed as
    r * (r / max(r, eps)), which is exactly r when r > eps (r / r == 1 in floating point).
    It agrees with ``vdot(u, W v)`` up to rounding (last bits).
    """
    mat = WeightMatrix(_upcast(weight), dim)
    last = None
    for _ in range(n):
        last = _step(mat, u, v, None, None, order, eps)
    return None if last is None else sigma_from_last(last)


@torch.no_grad()
def _sigma(weight: torch.Tensor, dim: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sigma = u^H W v with the stored u, v (a 0-d tensor; complex for complex weights)."""
    return torch.vdot(u, WeightMatrix(_upcast(weight), dim).mv(v))


@torch.no_grad()
def _exact_sigma(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """sigma of an exactly normalized weight: max(||W||, eps)."""
    return _safe_norm(_upcast(weight))[0].clamp_min(eps).view(())


# ---------------------------------------------------------------------------------------------
# Starting vectors, as tensors of the weight's compute dtype on its device


def _from_numpy(arrays, like: torch.Tensor, dtype: torch.dtype):
    return tuple(torch.from_numpy(a).to(device=like.device, dtype=dtype) for a in arrays)


def _draw(weight: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, eps: float) -> torch.Tensor:
    """Normal entries from torch's RNG, each last-axis row normalized: the built-ins' draw."""
    x = weight.new_empty(shape).normal_(0, 1).to(dtype)
    return F.normalize(x, dim=-1, eps=eps)


def initial_uv(weight: torch.Tensor, h: int, w: int, seed: int | None, eps: float):
    """Normalized initial u, v: from ``spec.init_uv`` when seeded, else the torch built-ins'
    draw (u's normals, then v's, from torch's RNG)."""
    dtype = _compute_dtype(weight.dtype)
    if seed is not None:
        return _from_numpy(_spec.init_uv(h, w, seed, _spec.init_dtype(str(dtype)), eps), weight, dtype)
    u = _draw(weight, (h,), dtype, eps)
    return u, _draw(weight, (w,), dtype, eps)


def initial_extra_uv(weight: torch.Tensor, h: int, w: int, count: int, seed: int | None, eps: float):
    """Starting vectors of the ``count`` extra pairs of ``num_svs``: (count, h) and (count, w)
    tensors, each row normalized; from ``spec.init_extra_uv`` when seeded, else torch's RNG
    (the u rows, then the v rows; drawn after u and v, so those are what the built-in draws)."""
    dtype = _compute_dtype(weight.dtype)
    if seed is not None:
        arrays = _spec.init_extra_uv(h, w, count, seed, _spec.init_dtype(str(dtype)), eps)
        return _from_numpy(arrays, weight, dtype)
    us = _draw(weight, (count, h), dtype, eps)
    return us, _draw(weight, (count, w), dtype, eps)


def _recovery_uv(weight: torch.Tensor, h: int, w: int, seed: int | None, eps: float):
    """The (u, v) of ``dualsn.spec.recovery_uv``: where a step restarts instead of making
    pair 0 zero."""
    dtype = _compute_dtype(weight.dtype)
    return _from_numpy(_spec.recovery_uv(h, w, seed, _spec.init_dtype(str(dtype)), eps), weight, dtype)
