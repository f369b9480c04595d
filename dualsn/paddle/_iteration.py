"""The fast power iteration: norms read on the host, vectors normalized in place (their
identity is kept: replicas share the buffers), one step of every (u, v) pair, the training
forward's steps, sigma read off the last norm, and the seeded initial u, v as tensors."""

from __future__ import annotations

import math

import paddle
import paddle.nn.functional as F

from dualsn import spec as _spec
from dualsn.paddle._dtypes import _compute_dtype, _in_precision, _is_complex, _real_dtype, _upcast
from dualsn.paddle._matrix import WeightMatrix, _prod

def _normalize(x, eps: float):
    """N(x) = x / max(||x||, eps) for a 1-D tensor, differentiable."""
    if not _is_complex(x):
        # The very op the Paddle built-in uses, so compat="paddle" updates u, v as it does.
        return F.normalize(x, axis=0, epsilon=eps)
    return x / paddle.cast(_clamped_norm(x, eps), x.dtype)


def _clamped_norm(x, eps: float, twice_differentiable: bool = False):
    """max(||x||, eps) as a real 0-D tensor; complex x is measured through its (re, im)
    pairs, since Paddle's p_norm has no complex kernel. p_norm's gradient has no gradient
    of its own: ``twice_differentiable`` takes sqrt(sum(x^2)) instead."""
    flat = (paddle.as_real(x) if _is_complex(x) else x).reshape([-1])  # flatten: no 2nd grad
    norm = paddle.sqrt(paddle.sum(flat * flat)) if twice_differentiable else paddle.linalg.norm(flat)
    return paddle.maximum(norm, paddle.full([], eps, dtype=norm.dtype))


def _vdot(a, b, twice_differentiable: bool = False):
    """a^H b of two 1-D tensors (conjugating a), as a 0-D tensor.

    paddle.dot does not conjugate and its gradient has no gradient of its own, so complex
    inputs, and ``twice_differentiable`` callers, get sum(conj(a) * b).
    """
    if _is_complex(a):
        return paddle.sum(paddle.conj(a) * b)
    if twice_differentiable:
        return paddle.sum(a * b)
    return paddle.dot(a, b)


def _host_norm(x) -> float:
    """||x|| as a Python float, without overflow or underflow of the squared sum: one BLAS
    dot read back to the host, and only where that is out of range ``dualsn.spec.safe_norm``
    on a host copy (u, v are vectors: the copy is small, and the rule stays in one place)."""
    flat = paddle.as_real(x).reshape([-1]) if _is_complex(x) else _flat(x)
    squared = paddle.matmul(flat, flat).item()
    norm = math.sqrt(squared) if squared >= 0 else math.nan
    if _spec.plain_norm_trusted(norm, flat.dtype):
        return norm
    return float(_spec.safe_norm(flat.numpy()))


def _normalize_into(y, target, eps: float, recovery=None) -> float | None:
    """target <- N(y) = y / max(||y||, eps), in place; returns ||y||. A y whose norm has
    underflowed gives ``recovery`` instead, when given (``dualsn.spec.normalize``), and None. A NaN or Inf norm raises
    FloatingPointError before target is written (``dualsn.spec.check_finite_sigma``).

    target = y * (1 / max(||y||, eps)) by copy_ + scale_: three small ops where F.normalize
    + assign take six. It rounds differently from F.normalize in the last bit.
    """
    norm = _host_norm(y)
    _spec.check_finite_sigma(norm)
    if recovery is not None and norm < _spec.underflow_threshold(target.dtype):
        target.copy_(recovery, False)
        return None  # restarted: sigma is no longer r^2 / max(r, eps), see sigma_from_last
    target.copy_(y, False)
    target.scale_(1.0 / max(norm, eps))  # also bumps target's inplace version
    return norm


def _flat(x):
    """A 1-D view of ``x`` (``x`` itself when it is 1-D already: no new tensor object)."""
    return x if x.ndim == 1 else x.reshape([-1])


def _orthogonalize(x, basis):
    """``x`` minus its projections on the orthonormal vectors of ``basis``, one after the
    other (Gram-Schmidt, as ``dualsn.reference.power_step``); any shape, ``x``'s kept."""
    flat = _flat(x)
    for b in basis:
        b = _flat(b)
        flat = flat - _vdot(b, flat) * b
    return flat.reshape(x.shape) if x.ndim != 1 else flat


def _step(op, u, v, extra_u, extra_v, order: str, eps: float, recovery=(None, None)) -> float:
    """One power iteration on every (u, v) pair, in place (``dualsn.reference.power_step``).

    ``op`` has ``mv`` (x -> M x) and ``mhv`` (y -> M^H y): a :class:`WeightMatrix` or a
    :class:`ConvOperator`. ``u``, ``v`` are pair 0, the plain iteration; the rows of
    ``extra_u``, ``extra_v`` (or None) are the extra pairs of ``num_svs``, each made
    orthogonal to the pairs before it. ``recovery`` = (u, v) pair 0 restarts from instead
    of becoming zero. Returns the norm of pair 0's last vector before normalization, the
    sigma estimate (see :func:`sigma_from_last`).
    """
    rec_u, rec_v = recovery
    norm = _spec.in_order(
        order,
        lambda: _normalize_into(op.mv(v), u, eps, rec_u),
        lambda: _normalize_into(op.mhv(u), v, eps, rec_v),
    )
    if extra_u is not None:
        us, vs = [u], [v]  # the pairs already updated in this step
        for i in range(int(extra_u.shape[0])):
            ui, vi = extra_u[i], extra_v[i]  # views: the writes land in the buffers
            _spec.in_order(
                order,
                lambda: _normalize_into(_orthogonalize(op.mv(vi), us), ui, eps),
                lambda: _normalize_into(_orthogonalize(op.mhv(ui), vs), vi, eps),
            )
            us.append(ui)
            vs.append(vi)
    return norm


def sigma_from_last(norm: float | None, eps: float) -> float | None:
    """sigma = u^H M v after a step, from the norm r of its last vector before normalization:

    * order "uv" ends with v = N(y), y = M^H u, and u^H M v = y^H v = r^2 / max(r, eps);
    * order "vu" ends with u = N(y), y = M v, and u^H M v = u^H y, the same number.

    So sigma costs no further pass over W (nor a dot), whatever the clamp to eps did. After a
    restart from the recovery vectors (``norm`` None) it does not hold: None, and the caller
    computes u^H M v.
    """
    return None if norm is None else norm * (norm / max(norm, eps))


def _iterate_(op, u, v, n: int, order: str, eps: float, extra_u=None, extra_v=None, recovery=(None, None)):
    """``n`` power iterations on ``op`` (a :class:`WeightMatrix` or a :class:`ConvOperator`),
    writing into u and v (and the extra pairs) in place: their identity is kept, so buffers
    shared between replicas see the update. Returns sigma = u^H M v for the new u, v as a
    float, read off the last product (None when n == 0)."""
    norm = None
    with paddle.no_grad():
        for _ in range(n):
            norm = _step(op, u, v, extra_u, extra_v, order, eps, recovery)
    return None if norm is None else sigma_from_last(norm, eps)


def power_iteration_(weight, dim: int, u, v, n: int, order: str, eps: float) -> float | None:
    """Run ``n`` power iterations in ``order`` on ``weight``'s W-matrix, into ``u`` and ``v``.

    The writes are in place on purpose: layer replicas (DataParallel) share the buffers with
    the original layer, so this is how their updates survive.

    Returns sigma = u^H W v for the new u, v (None when ``n == 0``), read off the last
    normalization instead of computed with a third product (:func:`sigma_from_last`). A Python
    number (complex for a complex weight), where ``dualsn.torch.power_iteration_`` returns a
    0-D tensor: Paddle's fast path reads the norms on the host anyway (overflow, NaN checks).
    """
    return _iterate_(WeightMatrix(_upcast(weight), dim), u, v, n, order, eps)


def _training_steps(op, vectors, spec: _spec.Spec, recovery=(None, None)):
    """The power iterations of one training forward (``dualsn.reference.training_iterations``), in
    place on ``vectors`` = (u, v, extra_u, extra_v); returns (sigma, count).

    How many steps: :meth:`dualsn.spec.Spec.run_training_iterations`, comparing pair 0's last
    norm (read on the host by every step anyway).
    """
    state = {"norm": None}

    def step():
        state["norm"] = _step(op, *vectors, spec.order, spec.eps, recovery)
        return state["norm"]

    with paddle.no_grad():
        count = spec.run_training_iterations(step)
    return sigma_from_last(state["norm"], spec.eps), count


def _sigma(mat: WeightMatrix, u, v, twice_differentiable: bool = False):
    """sigma = u^H M v as a 0-D tensor, one pass over W (differentiable in W when grad is
    enabled); ``mat`` may also be a :class:`ConvOperator`."""
    return _vdot(_flat(u), _flat(mat.mv(v)), twice_differentiable)


def _sigma_value(mat: WeightMatrix, u, v):
    """sigma = u^H W v as a Python float (complex for a complex W)."""
    with paddle.no_grad():
        return _sigma(mat, u, v).item()


def _forward_sigma(op, vectors, spec: _spec.Spec, do_power_iteration: bool, recovery, dtype):
    """(sigma as a host number, power iterations run) of one fast-path forward: the training
    steps' last norm, rounded to ``dtype``'s precision (see :func:`_in_precision`), else (no
    iteration, or a restart from the recovery vectors) u^H M v."""
    sigma, count = None, 0
    if do_power_iteration:
        sigma, count = _training_steps(op, vectors, spec, recovery)
        # Paddle: the host float is float64; torch's tensor sigma has the weight's precision.
        sigma = _in_precision(sigma, dtype)
    if sigma is None:
        sigma = _sigma_value(op, vectors[0], vectors[1])
    return sigma, count


def _recovery_uv(u, v, seed: int | None, eps: float):
    """(u, v) of ``dualsn.spec.recovery_uv`` for ``seed``, shaped and typed like the buffers
    ``u``, ``v``: where a power-iteration step restarts instead of making them zero."""
    arrays = _spec.recovery_uv(_prod(u.shape), _prod(v.shape), seed, _spec.init_dtype(str(u.dtype)), eps)
    return tuple(
        paddle.to_tensor(x, place=u.place).astype(u.dtype).reshape(list(t.shape)) for x, t in zip(arrays, (u, v))
    )


def initial_uv(weight, h: int, w: int, seed: int | None, eps: float):
    """Normalized initial u, v as tensors of the weight's compute dtype, on its place."""
    dtype = _compute_dtype(weight.dtype)
    if seed is not None:
        u0, v0 = _spec.init_uv(h, w, seed, _spec.init_dtype(str(dtype)), eps)
        return tuple(
            paddle.to_tensor(x, place=weight.place).astype(dtype) for x in (u0, v0)
        )
    real = _real_dtype(dtype)

    def draw(n: int):
        if _is_complex(weight):
            x = paddle.complex(paddle.randn([n], dtype=real), paddle.randn([n], dtype=real))
        else:
            x = paddle.randn([n], dtype=real)
        return _normalize(x, eps)

    u = draw(h)  # u first, then v, as the torch built-in draws them
    v = draw(w)
    return u, v


def initial_extra_uv(weight, h: int, w: int, count: int, seed: int | None, eps: float):
    """Starting vectors of the ``count`` extra pairs of ``num_svs``: [count, h] and [count, w]
    tensors, each row normalized; from ``spec.init_extra_uv`` when seeded, else Paddle's RNG
    (the u rows, then the v rows)."""
    dtype = _compute_dtype(weight.dtype)
    if seed is not None:
        us, vs = _spec.init_extra_uv(h, w, count, seed, _spec.init_dtype(str(dtype)), eps)
        return tuple(paddle.to_tensor(x, place=weight.place).astype(dtype) for x in (us, vs))
    real = _real_dtype(dtype)

    def draw(n: int):
        x = paddle.randn([count, n], dtype=real)
        if _is_complex(weight):
            x = paddle.complex(x, paddle.randn([count, n], dtype=real))
        norms = paddle.sqrt(paddle.sum(paddle.abs(x) ** 2, axis=1, keepdim=True))
        return x / paddle.cast(paddle.clip(norms, min=eps), x.dtype)

    us = draw(h)
    return us, draw(w)
