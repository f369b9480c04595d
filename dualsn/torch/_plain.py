"""The plain path: the fast paths' reference, behind a switch.

Everything in the fast path trades plainness for speed (sigma read off a norm, a hand-written
gradient, in-place normalization, caches). The plain path computes the same forward the way
the spec writes it, and lets autograd derive the whole gradient, so that tests can hold each
fast path against an implementation that shares none of its tricks.
"""

from __future__ import annotations

import contextlib

import torch

from dualsn import spec as _spec
from dualsn.torch import _dtypes
from dualsn.torch._dtypes import _no_autocast, _upcast
from dualsn.torch._iteration import _orthogonalize

ENABLED = False
"""Whether spectral-norm forwards take the plain path (set by :func:`plain_path`)."""


def enabled() -> bool:
    """Whether spectral-norm forwards take the plain path now."""
    return ENABLED


@contextlib.contextmanager
def plain_path(enabled: bool = True):
    """A context in which every dualsn.torch spectral-norm forward takes the plain path.

    The plain path is the reference the fast paths are tested against. It runs the same
    algorithm with the same state updates (u, v and the extra pairs, ``last_sigma``,
    ``last_iterations``, the ``_sigma`` buffer), but with ordinary operations only: the power
    iteration is ``F.normalize`` of products with the W-matrix (a copy, for ``dim != 0``) or
    with the convolution, sigma is ``u^H M v``, and autograd records ``W / divisor(sigma)``
    and derives the gradient (``create_graph`` included). No eval cache is read or written
    and no kept sigma is used. Results agree with the fast paths up to rounding; it is slower.

    The setting is module-wide (every thread); the previous one comes back on exit, also on
    an exception, so contexts nest. ``plain_path(False)`` turns it off inside an enclosing one.

    Example::

        >>> layer = spectral_norm(nn.Linear(20, 10), seed=0)
        >>> with plain_path():
        ...     reference = layer.weight
    """
    global ENABLED
    previous, ENABLED = ENABLED, bool(enabled)
    try:
        yield
    finally:
        ENABLED = previous


class _PlainMatrix:
    """The W-matrix as the spec writes it, ``dim`` moved to the front and the rest flattened
    (a copy unless ``dim`` is 0): the operator of the plain path."""

    __slots__ = ("mat",)

    def __init__(self, weight: torch.Tensor, dim: int) -> None:
        self.mat = weight.movedim(dim, 0).reshape(_spec.matrix_shape(tuple(weight.shape), dim))

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        return self.mat @ v

    def mhv(self, u: torch.Tensor) -> torch.Tensor:
        return self.mat.mH @ u


def _plain_norm(x: torch.Tensor) -> torch.Tensor:
    """``dualsn.spec.safe_norm`` in ordinary operations: the norm of x / max|x| (a constant for
    autograd), times max|x|, so the squared sum neither overflows nor underflows."""
    scale = x.detach().abs().amax()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.linalg.vector_norm(x / scale) * scale


def _plain_normalize(x: torch.Tensor, eps: float, recovery: torch.Tensor | None = None):
    """(N(x), ||x||) as ``dualsn.spec.normalize`` writes it, ``recovery`` where ||x|| has
    underflowed."""
    norm = _plain_norm(x)
    out = x / norm.clamp_min(eps)
    if recovery is not None:
        out = torch.where(norm < _spec.underflow_threshold(norm.dtype), recovery, out)
    return out, norm


def _plain_step(op, us: list, vs: list, spec: _spec.Spec, recovery=(None, None)):
    """``dualsn.reference.power_step`` in ordinary torch operations: the new lists of u's and v's,
    and the norm of pair 0's last vector before normalization (what atol/rtol compare). A NaN
    or Inf raises FloatingPointError on the CPU (nothing is written here)."""
    new_us, new_vs, estimate = [], [], None
    for u, v in zip(us, vs):
        rec_u, rec_v = recovery if not new_us else (None, None)
        pair, norms = {"u": u, "v": v}, []

        def update_u():
            pair["u"], norm = _plain_normalize(_orthogonalize(op.mv(pair["v"]), new_us), spec.eps, rec_u)
            norms.append(norm)

        def update_v():
            pair["v"], norm = _plain_normalize(_orthogonalize(op.mhv(pair["u"]), new_vs), spec.eps, rec_v)
            norms.append(norm)

        _spec.in_order(spec.order, update_u, update_v)
        if estimate is None:
            first, estimate = norms
            if _dtypes._reads_host(estimate):
                _spec.check_finite_sigma(first.item())
                _spec.check_finite_sigma(estimate.item())
        new_us.append(pair["u"])
        new_vs.append(pair["v"])
    return new_us, new_vs, estimate


def _plain_steps(op, us: list, vs: list, spec: _spec.Spec, recovery=(None, None)):
    """The steps of one training forward by :func:`_plain_step`, as many as
    :meth:`dualsn.spec.Spec.run_training_iterations` says: (new u's, new v's, count)."""
    state = {"us": us, "vs": vs}

    def step():
        state["us"], state["vs"], estimate = _plain_step(op, state["us"], state["vs"], spec, recovery)
        return estimate.item() if spec.uses_tolerance else None

    count = spec.run_training_iterations(step)
    return state["us"], state["vs"], count


@torch.no_grad()
def _plain_iterations(op, vectors, spec: _spec.Spec, recovery=(None, None)) -> int:
    """The power iterations of one training forward by :func:`_plain_steps`; the new vectors
    go into ``vectors`` = (u, v, extra u rows, extra v rows). Returns the count."""
    u, v, extra_u, extra_v = vectors
    buffers_u = [u] if extra_u is None else [u, *extra_u]
    buffers_v = [v] if extra_v is None else [v, *extra_v]
    us, vs, count = _plain_steps(op, buffers_u, buffers_v, spec, recovery)
    # copy_ rather than rebinding: the buffers keep their identity (DataParallel replicas
    # share them), and the extra rows are views of one buffer.
    for buffer, new in zip(buffers_u + buffers_v, us + vs):
        buffer.copy_(new)
    return count


def _plain_normalized_weight(weight: torch.Tensor, op_of, vectors, spec: _spec.Spec, training: bool, recovery=(None, None)):
    """(normalized weight, sigma, iterations run) of one forward on the plain path.

    ``op_of(w)`` is the operator (``mv``, ``mhv``) of a weight in the compute dtype;
    ``vectors`` = (u, v, extra u rows, extra v rows), flat views of the buffers. sigma is
    detached (the ``last_sigma`` value); for an exactly normalized weight it is max(||W||, eps).
    """
    w = _upcast(weight)  # half precision: the math in float32, the result cast back
    with _no_autocast(w.device.type):
        if spec.is_exact_vector(w.ndim):
            norm, count = _plain_norm(w), 0
            if training and _dtypes._reads_host(norm):
                _spec.check_finite_sigma(norm.item())
            sigma = norm.clamp_min(spec.eps)
        else:
            count = _plain_iterations(op_of(w), vectors, spec, recovery) if training else 0
            # Clones: autograd saves u, v for backward, and later forwards overwrite the buffers.
            u, v = vectors[0].clone(), vectors[1].clone()
            sigma = torch.vdot(u, op_of(w).mv(v))
        # The rule itself, not the fast path's tensor select: its Python branch reads the
        # bound's side on the host, a synchronization only a reference can afford.
        out = w / spec.divisor(sigma)
    return out.to(weight.dtype), sigma.detach(), count
