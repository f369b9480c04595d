"""The plain path: the fast path's twin through ordinary Paddle ops only (Paddle's autograd
derives the whole gradient, no hooks, no host-side sigma, no eval cache), for static graphs
(paddle.jit.to_static) and for the differential harness; and the :func:`plain_path` switch."""

from __future__ import annotations

import contextlib

import paddle

from dualsn import spec as _spec
from dualsn.paddle._dtypes import _is_complex, _scalar
from dualsn.paddle._iteration import _flat, _orthogonalize, _vdot

ENABLED = False
"""Set by :func:`plain_path`: every forward takes :func:`_plain_normalized_weight`."""


def enabled() -> bool:
    """Whether :func:`plain_path` is on (read at each forward: the flag is rebound, so a
    ``from ... import ENABLED`` would keep the old value)."""
    return ENABLED


@contextlib.contextmanager
def plain_path(enabled: bool = True):
    """A context in which every dualsn.paddle spectral norm takes its *plain* path: the power
    iteration and W / sigma through ordinary Paddle ops, Paddle's autograd deriving the whole
    gradient (sigma = u^H W v differentiated with u, v held constant), no gradient hooks, no
    host-side sigma, no eval cache. Same results up to rounding; slower.

    A testing aid: the differential harness (``conformance.differential``) runs every model
    through both paths and compares them. Nested uses restore the previous setting.
    """
    global ENABLED
    previous, ENABLED = ENABLED, bool(enabled)
    try:
        yield
    finally:
        ENABLED = previous


class _PlainMatrix:
    """The W-matrix as the plain transpose + reshape of W (a new tensor when dim != 0; in a
    static graph u, v must not go through view ops, which refuse the in-place assign)."""

    def __init__(self, weight, dim: int) -> None:
        w_mat = weight
        if dim != 0:
            w_mat = w_mat.transpose(list(_spec.permutation(weight.ndim, dim)))
        self.w_mat = w_mat.reshape([int(weight.shape[dim]), -1])
        self.complex = _is_complex(weight)

    def mv(self, x):
        return paddle.matmul(self.w_mat, x)

    def mhv(self, y):
        if self.complex:
            return paddle.conj(paddle.matmul(self.w_mat, paddle.conj(y), transpose_x=True))
        return paddle.matmul(self.w_mat, y, transpose_x=True)


def _plain_norm(x):
    """||x|| as a real 0-D tensor, scaled by max|x| so that the squared sum neither overflows
    nor underflows (``dualsn.spec.safe_norm``; no host read, for static graphs too)."""
    flat = (paddle.as_real(x) if _is_complex(x) else x).reshape([-1])
    # a constant factor for autograd: s * ||x / s|| has the gradient of ||x|| for any s > 0
    scale = paddle.max(paddle.abs(flat)).detach()
    scale = paddle.where(scale > 0, scale, paddle.ones_like(scale))
    scaled = flat / scale
    return paddle.sqrt(paddle.sum(scaled * scaled)) * scale


def _plain_normalize(x, eps: float, recovery=None):
    """N(x) for a tensor of any shape (conv operators have activation-shaped u, v), and
    ``recovery`` where ||x|| has underflowed (``dualsn.spec.normalize``); returns (N(x), ||x||)."""
    norm = _plain_norm(x)
    out = x / paddle.cast(paddle.maximum(norm, paddle.full([], eps, dtype=norm.dtype)), x.dtype)
    if recovery is not None:
        underflowed = norm < _spec.underflow_threshold(norm.dtype)
        out = paddle.where(underflowed, recovery.reshape(x.shape), out)
    return out, norm


def _plain_step(op, vectors, order: str, eps: float, recovery=(None, None)):
    """One :func:`dualsn.reference.power_step` with ordinary ops; returns the new (us, vs) and the
    norm of pair 0's last vector before normalization (a 0-D tensor). Nothing is written."""
    u, v, extra_u, extra_v = vectors
    pairs = [(u, v)] + ([] if extra_u is None else [(extra_u[i], extra_v[i]) for i in range(int(extra_u.shape[0]))])
    new_us, new_vs, first_norm = [], [], None
    for ui, vi in pairs:
        rec_u, rec_v = recovery if not new_us else (None, None)
        pair = {"u": ui, "v": vi}

        def update_u():
            pair["u"], norm = _plain_normalize(_orthogonalize(op.mv(pair["v"]), new_us), eps, rec_u)
            return norm

        def update_v():
            pair["v"], norm = _plain_normalize(_orthogonalize(op.mhv(pair["u"]), new_vs), eps, rec_v)
            return norm

        norm = _spec.in_order(order, update_u, update_v)
        first_norm = norm if first_norm is None else first_norm
        new_us.append(pair["u"])
        new_vs.append(pair["v"])
    return new_us, new_vs, first_norm


def _store_pairs(vectors, new_us, new_vs) -> None:
    """Write a plain step's vectors into the buffers (their identity is kept)."""
    # Paddle: paddle.assign, not copy_ as torch: static-graph variables (to_static) have no copy_.
    u, v, extra_u, extra_v = vectors
    paddle.assign(new_us[0], u)
    paddle.assign(new_vs[0], v)
    if extra_u is not None:
        paddle.assign(paddle.stack(new_us[1:]), extra_u)
        paddle.assign(paddle.stack(new_vs[1:]), extra_v)


def _plain_steps(op, vectors, spec: _spec.Spec, recovery=(None, None)) -> int:
    """The power iterations of one training forward on the plain path; returns the count.
    In dynamic mode each step's norm is read on the host (the tolerance stop, and the NaN /
    Inf check before anything is written), as on the fast path."""
    dynamic = paddle.in_dynamic_mode()

    def step():
        new_us, new_vs, norm = _plain_step(op, vectors, spec.order, spec.eps, recovery)
        if dynamic:
            norm = float(norm)
            _spec.check_finite_sigma(norm)
        _store_pairs(vectors, new_us, new_vs)
        return norm if dynamic else None  # a static graph's norm has no value to compare yet

    with paddle.no_grad():
        return spec.run_training_iterations(step)


def _plain_divide(weight, op, u, v, spec: _spec.Spec):
    """(W / divisor(sigma), sigma) with sigma = u^H M v recorded by autograd, u and v held
    constant (clones: a later forward updates the buffers in place)."""
    sigma = _vdot(_flat(u.clone()), _flat(op.mv(v.clone())), twice_differentiable=True)
    return weight / _unfused_divisor(sigma, spec), sigma


def _host_sigma(sigma):
    """sigma as a Python number in dynamic mode, None in a static graph (no host values)."""
    return sigma.item() if paddle.in_dynamic_mode() else None


def _plain_normalized_weight(weight, vectors, dim: int, spec: _spec.Spec, do_power_iteration: bool, recovery=(None, None)):
    """:func:`dualsn.paddle._sn._normalized_weight` through ordinary ops only: Paddle's autograd derives the
    whole gradient. Returns (normalized weight, sigma as a number or None, iterations)."""
    u, v, extra_u, _ = vectors
    if u is None:
        norm = paddle.cast(_plain_norm(weight), weight.dtype)
        if do_power_iteration and paddle.in_dynamic_mode():
            _spec.check_finite_sigma(float(paddle.real(norm) if _is_complex(norm) else norm))
        clamped = paddle.maximum(norm, paddle.full([], spec.eps, dtype=norm.dtype))
        return weight / _unfused_divisor(clamped, spec), _host_sigma(clamped), 0
    if do_power_iteration and not paddle.in_dynamic_mode() and (spec.uses_tolerance or extra_u is not None):
        raise NotImplementedError(
            "atol/rtol and num_svs > 1 need dynamic mode in training (the iteration count "
            "and the extra pairs are host-side); use them outside paddle.jit.to_static"
        )
    op = _PlainMatrix(weight, dim)
    count = _plain_steps(op, vectors, spec, recovery) if do_power_iteration else 0
    out, sigma = _plain_divide(weight, op, u, v, spec)
    return out, _host_sigma(sigma), count


def _unfused_divisor(sigma, spec: _spec.Spec):
    """``spec.divisor`` on a 0-D tensor, as a select (no host read): sigma (eps where it is
    zero), or with ``coeff`` sigma / coeff where Re(sigma) > coeff and 1 elsewhere."""
    # Paddle: a select, where torch's plain path branches on the host (spec.divisor): static
    # graphs have no host values.
    if spec.coeff is None:
        # not sigma == 0: Paddle's float equality holds for |sigma| < 1e-15
        nonzero = paddle.abs(sigma) > 0
        return paddle.where(nonzero, sigma, _scalar(spec.eps, sigma))
    active = (paddle.real(sigma) if _is_complex(sigma) else sigma) > spec.coeff
    return paddle.where(active, sigma / _scalar(spec.coeff, sigma), paddle.ones_like(sigma))


# ---------------------------------------------------------------------------------------------
# The plain path of the convolution operator norm.


def _plain_conv_normalized_weight(weight, op, vectors, spec: _spec.Spec, do_power_iteration: bool, recovery):
    """The plain path of a convolution's operator norm (``op`` a :class:`ConvOperator`), in
    dynamic mode when ``do_power_iteration``. Returns (normalized weight, sigma as a number or
    None, iterations)."""
    count = _plain_steps(op, vectors, spec, recovery) if do_power_iteration else 0
    out, sigma = _plain_divide(weight, op, vectors[0], vectors[1], spec)
    return out, _host_sigma(sigma), count
