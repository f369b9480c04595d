"""The gradient of W -> W / sigma: :func:`weight_grad` in closed form, and the fast path's
W / sigma whose gradient autograd and a tensor hook complete to it."""

from __future__ import annotations

import math

import numpy as np
import paddle

from dualsn import spec as _spec
from dualsn.paddle._dtypes import _FLOAT_MAX, _amp_off, _is_complex, _scalar
from dualsn.paddle._iteration import _clamped_norm, _host_norm, _sigma, _vdot
from dualsn.paddle._matrix import ConvOperator, WeightMatrix


def _inverse(value: float) -> float:
    """1 / value; +-inf for a zero (as dividing by it would give: W / 0 is inf or nan, not
    a Python ZeroDivisionError)."""
    x = float(value)
    return 1.0 / x if x != 0.0 else math.copysign(math.inf, x)


# ---------------------------------------------------------------------------------------------
# W / sigma and its gradient.
#
# Autograd sees W -> W * (1 / sigma) with sigma a constant: one cheap op, whose backward
# gives G / conj(sigma). The rest of the gradient, -<W_sn, G> u v^H / conj(sigma) (u, v
# held constant, reference.normalized_weight_grad), is added by a tensor hook on a private view
# of W, in place on the gradient that op's backward has just produced (it is ours alone).
# No paddle.autograd.PyLayer: in Paddle 3.3 a PyLayer drops its context after its first
# backward, so a second backward through a graph kept with retain_graph=True crashes.


def _private_view(weight):
    """A view of ``weight`` (no copy) that is a node of its own in the autograd graph, so a
    hook on it sees exactly the gradient flowing through this normalization. (A reshape to
    the same shape would alias ``weight`` itself, and a hook on it would stay on W.)

    ``Tensor.view``: one op (about 4 us), whose backward passes the gradient on as a view.
    Two reshapes took about 11 us; unsqueeze(0).squeeze(0), which a vector needed, copied
    the gradient in backward: 1.7 ms of a 1024 x 1024 step (issue 14)."""
    return weight.view(weight.shape)


class _GradHook:
    """Base of the gradient hooks. ``first_order`` runs under no_grad and may write into the
    incoming gradient; under ``create_graph=True`` (the incoming gradient then has a graph
    of its own) ``differentiable`` builds a result that can be differentiated again,
    including through sigma's dependence on W."""

    __slots__ = ()

    def __call__(self, grad):
        with _amp_off():  # backward() may run inside auto_cast
            if not grad.is_leaf:
                # create_graph=True: the result must be differentiable again, in W as well.
                return self.differentiable(grad)
            with paddle.no_grad():
                return self.first_order(grad)


class _MatrixGradHook(_GradHook):
    """grad = G / conj(sigma0) in, (G - <W_sn, G> u v^H) / conj(sigma) out."""

    __slots__ = ("mat", "u", "v", "sigma")

    def __init__(self, mat: WeightMatrix, u, v, sigma) -> None:
        super().__init__()
        # u, v are clones: a second forward (D(real), then D(fake)) updates the buffers in
        # place before this backward runs.
        self.mat, self.u, self.v, self.sigma = mat, u, v, sigma

    def first_order(self, grad):
        """The gradient, written into ``grad`` (real weights)."""
        return _add_rank_one_(grad, self.mat, self.u, self.v, self.sigma)

    def differentiable(self, grad):
        mat = self.mat
        s0 = _scalar(np.conj(self.sigma), grad)
        s = paddle.conj(_sigma(mat, self.u, self.v, twice_differentiable=True))
        # reshape, not flatten: flatten's gradient has no gradient of its own
        c = _vdot(mat.weight.reshape([-1]), grad.reshape([-1]), twice_differentiable=True)
        left, right = mat.outer_factors(self.u, self.v)
        rank_one = (left * right).reshape(mat.shape)
        return grad * (s0 / s) - (s0 * c / (s * s)) * rank_one


def _add_rank_one_(grad, mat: WeightMatrix, u, v, sigma):
    """grad - (<W, grad> / conj(sigma)) u v^H, for ``grad`` = G / conj(d), the gradient that
    the scale by 1 / d passes back: <W_sn, G> = <W, grad>, so this is :func:`weight_grad`'s
    rank-1 term. In place into ``grad`` for a real W (one fused addmm_), a new tensor for a
    complex one. Runs under no_grad."""
    weight = mat.weight
    # <W_sn, G> = <W, grad>, and the correction is -(<W, grad> / conj(sigma)) u v^H.
    # Paddle: addmm_ has no complex kernel (CPU: float32, float64), so complex W takes a new
    # tensor; torch's add_rank1 fuses complex too.
    if mat.complex:
        c = _vdot(weight.flatten(), grad.flatten()).item() / np.conj(sigma)
        left, right = mat.outer_factors(u, v)
        return grad - (_scalar(c, grad) * (left * right)).reshape(mat.shape)
    k = -paddle.matmul(weight.flatten(), grad.flatten()).item() * _inverse(sigma)
    left, right = mat.outer_factors(u, v)
    shape = mat.view.shape
    update = grad if grad.shape == shape else grad.reshape(shape)  # a Linear's grad is the view's shape
    # unit coefficients: addmm_'s alpha, beta are float32, too coarse for float64 weights;
    # the factor goes into the small left vector (paddle.scale takes a double).
    fused = update.baddbmm_ if mat.kind == "batched" else update.addmm_
    fused(paddle.scale(left, k), right, beta=1.0, alpha=1.0)
    return grad


def weight_grad(grad, weight, sigma, u, v, dim: int, spec: _spec.Spec):
    """dL/dW of W -> W / d, d = sigma = u^H W v (u, v constant), from G = dL/dW_sn (``grad``):

        (G - <W_sn, G> u v^H) / conj(sigma),   <A, B> = sum(conj(A) * B)

    (``dualsn.reference.normalized_weight_grad``). With ``coeff`` and the bound active (d = sigma /
    coeff): G / conj(d) - <W_sn, G> u v^H / conj(sigma); inactive (d = 1): G itself. A zero
    sigma is floored (d = eps): G / eps.

    The fast path computes the same in two parts: autograd's backward of the scale by 1 / d
    gives G / conj(d), and :class:`_MatrixGradHook` adds the rank-1 term in place
    (:func:`_add_rank_one_`, one dot product <W, .> and one fused update). ``sigma`` is a
    number or a 0-D tensor: it is read on the host, as the fast path has it (where
    ``dualsn.torch.weight_grad`` keeps it in a tensor, for devices and vmap).
    """
    if isinstance(sigma, paddle.Tensor):
        sigma = sigma.item()
    if spec.bound_inactive(sigma):
        return grad  # the bound is inactive: W_sn = W
    divisor = spec.divisor(sigma)
    with paddle.no_grad():
        scaled = _scaled(grad, np.conj(divisor) if isinstance(divisor, complex) else divisor)
        if spec.sigma_floored(sigma):
            return scaled  # the floored divisor is a constant: G / eps
        return _add_rank_one_(scaled, WeightMatrix(weight, dim), u, v, sigma)


class _VectorGradHook(_GradHook):
    """grad = G / n0 in (n0 = max(||W||, eps)), reference.normalized_weight_grad out:
    (G - Re<w_hat, G> w_hat) / ||W||, or G / eps where ||W|| <= eps. Paddle's own p_norm
    gradient differs from that by about eps / ||W||."""

    __slots__ = ("weight", "eps", "norm")

    def __init__(self, weight, eps: float, norm: float) -> None:
        super().__init__()
        self.weight, self.eps, self.norm = weight, eps, norm

    def first_order(self, grad):
        norm = self.norm
        if norm <= self.eps:
            return grad
        # G / n - Re<w_hat, G> w_hat / n = grad - Re<W, grad> W / ||W||^2
        k = _vdot(self.weight, grad)
        k = paddle.real(k) if _is_complex(k) else k
        return grad - paddle.cast(k / (norm * norm), grad.dtype) * self.weight

    def differentiable(self, grad):
        n0 = _scalar(max(self.norm, self.eps), grad)
        n = paddle.cast(_clamped_norm(self.weight, self.eps, twice_differentiable=True), grad.dtype)
        if self.norm <= self.eps:
            return grad * (n0 / n)
        k = _vdot(self.weight, grad, twice_differentiable=True)
        k = paddle.cast(paddle.real(k), grad.dtype) if _is_complex(k) else k
        return grad * (n0 / n) - (n0 * k / (n * n * n)) * self.weight


def _scaled(x, sigma):
    """x / sigma for a constant Python number ``sigma``, as a new tensor; autograd records it
    when x needs a gradient.

    Real x is multiplied by 1 / sigma (``paddle.scale`` takes it as a double): Paddle's
    broadcasting divide by a 0-D tensor is several times slower. The result differs from
    x / sigma in the last bit at most.
    """
    inverse = None if _is_complex(x) or isinstance(sigma, complex) else _inverse(sigma)
    if inverse is None or not abs(inverse) <= _FLOAT_MAX.get(x.dtype, math.inf):
        return x / _scalar(sigma, x)  # (also where 1 / sigma of a subnormal sigma overflows x's dtype)
    return paddle.scale(x, inverse)


def _needs_graph(weight) -> bool:
    return paddle.is_grad_enabled() and not weight.stop_gradient


def _exact_normalized_weight(weight, spec: _spec.Spec, training: bool):
    """W / max(||W||, eps) for an exactly normalized 1-D weight (the ``coeff`` divisor of it);
    (value, sigma, 0)."""
    with paddle.no_grad():
        norm = _host_norm(weight)  # ||W||
    if training:
        _spec.check_finite_sigma(norm)
    n0 = max(norm, spec.eps)  # sigma
    if not _needs_graph(weight):
        with paddle.no_grad():
            return _scaled(weight, spec.divisor(n0)), n0, 0
    if spec.bound_inactive(n0):
        return _scaled(weight, 1.0), n0, 0  # W itself: the gradient passes unchanged
    private = _private_view(weight)
    private.register_hook(_VectorGradHook(weight, spec.eps, norm))
    return _scaled(private, spec.divisor(n0)), n0, 0


def _divide(weight, op, sigma, u, v, spec: _spec.Spec):
    """W / divisor(sigma) on the fast path, ``sigma`` a host number, ``op`` the operator it
    belongs to. When autograd needs a graph, the gradient of a :class:`WeightMatrix` sigma is
    completed to :func:`weight_grad` by a :class:`_MatrixGradHook`; that of a
    :class:`ConvOperator` sigma by autograd (:func:`_divide_by_conv_sigma`)."""
    divisor = spec.divisor(sigma)  # sigma itself without coeff (eps where it is zero)
    if not _needs_graph(weight):
        with paddle.no_grad():
            return _scaled(weight, divisor)
    if spec.bound_inactive(sigma):
        return _scaled(weight, 1.0)  # W itself: the gradient passes unchanged
    if spec.sigma_floored(sigma):
        return _scaled(weight, divisor)  # W / eps: a constant divisor, gradient G / eps
    if isinstance(op, ConvOperator):
        return _divide_by_conv_sigma(weight, op, u, v, spec)
    private = _private_view(weight)
    # With coeff the hook's correction is the same (in terms of the gradient it receives,
    # G / conj(divisor)): see reference.normalized_weight_grad. u, v are clones: a second forward
    # (D(real), then D(fake)) updates the buffers in place before this backward runs.
    private.register_hook(_MatrixGradHook(op, u.clone(), v.clone(), sigma))
    return _scaled(private, divisor)


def _divide_by_conv_sigma(weight, op: ConvOperator, u, v, spec: _spec.Spec):
    """W / d with d = u . conv(v, W) (or d / coeff) recorded by autograd."""
    # Autograd differentiates sigma(W) = u . conv(v, W) here (u, v held constant: clones,
    # since a later forward updates the buffers in place before this backward runs).
    divisor = _sigma(op, u.clone(), v.clone(), twice_differentiable=True)
    if spec.coeff is not None:
        divisor = paddle.scale(divisor, 1.0 / spec.coeff)
    return weight / divisor
