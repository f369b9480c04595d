"""The division W -> W / d and its gradient: the divisor rule as a tensor select, the
closed-form gradient :func:`weight_grad`, and the autograd Function that applies it in one
fused pass (:class:`_DivideBySigma`).
"""

from __future__ import annotations

import torch

from dualsn import spec as _spec
from dualsn.torch import _dtypes
from dualsn.torch._dtypes import _no_autocast
from dualsn.torch._iteration import _safe_norm
from dualsn.torch._matrix import WeightMatrix


def _divisor(sigma: torch.Tensor, spec: _spec.Spec) -> torch.Tensor:
    """What the weight is divided by (``dualsn.spec.Spec.divisor``): sigma (eps where it is
    zero), or with ``coeff`` the soft bound sigma / coeff where Re(sigma) > coeff and 1
    elsewhere. A tensor select, not a Python branch: no host synchronization, and autograd
    follows the chosen side."""
    coeff = spec.coeff
    if coeff is None:
        return torch.where(sigma == 0, torch.full_like(sigma, spec.eps), sigma)
    return torch.where(sigma.real > coeff, sigma / coeff, torch.ones_like(sigma))


def _divided(weight: torch.Tensor, sigma: torch.Tensor, spec: _spec.Spec) -> torch.Tensor:
    """W / divisor(sigma). Where reading sigma on the host is free (the CPU) the divisor is
    ``spec.divisor`` of that number: one operation instead of a select's three, and the same
    bits (a Python number divides as the 0-d tensor holding it does; a complex sigma / coeff
    would not round as the tensor's complex division does, so complex sigmas stay tensors)."""
    if not sigma.is_complex() and _dtypes._reads_host(sigma):
        return weight / spec.divisor(sigma.item())
    return weight / _divisor(sigma, spec)


def weight_grad(grad, weight, sigma, u, v, dim: int, spec: _spec.Spec) -> torch.Tensor:
    """dL/dW of W -> W / d, d = sigma = u^H W v (u, v constant), from G = dL/dW_sn:

        (G - <W_sn, G> u v^H) / conj(sigma),   <A, B> = sum(conj(A) * B)

    (``dualsn.reference.normalized_weight_grad``). With ``coeff`` and the bound active (d = sigma /
    coeff): G / conj(d) - <W_sn, G> u v^H / conj(sigma); inactive (d = 1): G itself. A zero
    sigma is floored (d = eps): G / eps. Computed in two passes over W: one dot product
    <W, G> (<W_sn, G> = <W, G> / conj(d)) and one fused rank-1 update.
    """
    coeff = spec.coeff
    mat = WeightMatrix(weight, dim)
    if _dtypes._reads_host(grad):
        # Reading the scalars is free on the CPU, BLAS then scales while it adds, and the
        # pass for <W, G> is skipped where there is no rank-1 term.
        s = sigma.item()
        if spec.bound_inactive(s):
            return grad  # W_sn = W
        d_c = spec.divisor(s).conjugate()
        if spec.sigma_floored(s):
            return grad / d_c  # the floored divisor is a constant
        dot = torch.vdot(weight.reshape(-1), grad.reshape(-1)).item()
        return mat.add_rank1(grad, u, v, 1 / d_c, -dot / (d_c * s.conjugate()))
    dot = torch.vdot(weight.reshape(-1), grad.reshape(-1))
    # Elsewhere (CUDA, compiled code) a .item() would synchronize, and under vmap it fails:
    # keep the scalars in tensors, at the price of a second pass. k = 1 / conj(sigma) where
    # there is a rank-1 term, 0 where there is none (sigma floored, or the bound inactive).
    sigma_c = sigma.conj()
    has_term = sigma != 0 if coeff is None else sigma.real > coeff
    k = torch.where(has_term, 1 / sigma_c, torch.zeros_like(sigma_c))
    out = mat.add_rank1(grad, u * (-dot * k), v, 1, 1)
    return out.div_(_divisor(sigma, spec).conj())


def _weight_grad_differentiable(grad, weight, u, v, dim: int, spec: _spec.Spec) -> torch.Tensor:
    """:func:`weight_grad` built from differentiable operations on W (sigma recomputed as
    u^H W v), for backward passes that record a graph (``create_graph=True``)."""
    mat = WeightMatrix(weight, dim)
    sigma = torch.vdot(u, mat.mv(v))
    d = _divisor(sigma, spec)
    dot = torch.vdot((weight / d).reshape(-1), grad.reshape(-1))
    has_term = sigma != 0 if spec.coeff is None else sigma.real > spec.coeff
    k = torch.where(has_term, 1 / sigma.conj(), torch.zeros_like(sigma))
    return grad / d.conj() - (dot * k) * mat.rank1(u, v)


# torch: an autograd.Function with the closed-form backward; Paddle's _grad adds the rank-1
# term with a tensor hook instead (a PyLayer breaks retain_graph: see there).
class _DivideBySigma(torch.autograd.Function):
    """``W -> W / d`` where d = sigma = u^H W v (or the ``coeff`` soft bound of it), with u, v
    and sigma's value given.

    Autograd of the plain expression would record ``W / sigma`` *and* the product
    ``u^H (W v)``, and its backward would make several W-sized temporaries. This backward is
    the closed form :func:`weight_grad` instead (same value, up to rounding). Saved: W (the
    input itself, no copy), sigma and the u, v clones.
    """

    @staticmethod
    def forward(ctx, weight, sigma, u, v, dim, spec):
        ctx.save_for_backward(weight, sigma, u, v)
        ctx.dim = dim
        ctx.spec = spec
        return _divided(weight, sigma, spec)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        with _no_autocast(grad.device.type):  # backward() may be called inside autocast
            weight, sigma, u, v = ctx.saved_tensors
            if torch.is_grad_enabled():  # create_graph=True: the gradient must be differentiable
                grad_w = _weight_grad_differentiable(grad, weight, u, v, ctx.dim, ctx.spec)
            else:
                grad_w = weight_grad(grad, weight, sigma, u, v, ctx.dim, ctx.spec)
        return grad_w, None, None, None, None, None


def _divide(weight, sigma, u, v, dim: int, spec: _spec.Spec) -> torch.Tensor:
    """W / divisor(sigma) (``dualsn.spec.Spec.divisor``), through :class:`_DivideBySigma` when
    autograd records it."""
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return _divided(weight, sigma, spec)
    # Clone u, v: a later forward updates the buffers in place, and this forward's backward
    # needs them as they are now (loss = D(real) - D(fake) runs two forwards, one backward).
    return _DivideBySigma.apply(weight, sigma, u.clone(), v.clone(), dim, spec)


def _normalize_exact(weight: torch.Tensor, spec: _spec.Spec, training: bool = False) -> torch.Tensor:
    """An exactly normalized 1-D weight: W / max(||W||, eps) (F.normalize's operations, on a
    norm that cannot overflow), or W / divisor with ``coeff``; autograd derives its gradient.
    A training forward raises FloatingPointError for a NaN or Inf W (on the CPU)."""
    norm = _safe_norm(weight, check_finite=training)[0].clamp_min(spec.eps)
    return weight / (norm if spec.coeff is None else _divisor(norm, spec))
