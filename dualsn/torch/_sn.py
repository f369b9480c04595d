"""PyTorch backend of dualsn.

``spectral_norm(module)`` with the default ``compat="torch"`` is a drop-in for
``torch.nn.utils.parametrizations.spectral_norm``: same random draw, same registration
iterations, the same u, v bits after every forward, same state-dict keys
(``parametrizations.<name>.original``, ``parametrizations.<name>.0._u`` / ``._v``). Other
presets (``"torch_legacy"``, ``"paddle"``) change the algorithm as ``dualsn.spec`` says,
while keeping the parametrization mechanism.

It is faster than the built-in (see :class:`WeightMatrix` for the cost model): a training
forward takes sigma from the last power-iteration norm instead of a third product, the
gradient of W -> W / sigma is one closed-form fused pass (:class:`_DivideBySigma`), the
W-matrix is never copied for ``dim != 0``, and eval mode reuses the normalized weight while
nothing changed (:class:`_EvalCache`). Sigma, and so the normalized weight and gradients,
then differ from the built-in's in the last bits only (rounding). Inside :func:`plain_path`
every forward skips all of these, for tests that hold the fast paths against plain autograd.

Lipschitz toolkit (opt-in, the same in ``dualsn.paddle``): ``coeff`` (soft bound
max(1, sigma / coeff)), ``atol``/``rtol`` (iterate until sigma settles), ``num_svs`` (several
singular values, :func:`singular_values`), ``track_sigma`` (sigma in the state dict), and
:func:`spectral_norm_conv`, the operator norm of a convolution rather than of its reshaped
kernel. The default path (none of them) is unchanged.

The algorithm's rules all come from :mod:`dualsn.spec`; this module only maps them onto
``torch.nn.utils.parametrize``.
"""

from __future__ import annotations

import contextlib
import importlib
import math

try:
    import torch
except ModuleNotFoundError as _error:
    if _error.name != "torch":
        raise
    raise ModuleNotFoundError(
        'dualsn.torch needs PyTorch, which is not installed: pip install "dualsn[torch]"', name="torch"
    ) from _error
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations as _parametrizations
from torch.nn.utils import parametrize

# The module, not the function ``torch.nn.utils.spectral_norm`` that shadows it.
_legacy = importlib.import_module("torch.nn.utils.spectral_norm")

from dualsn import spec as _spec
from dualsn.patching import Patch, check_patch_arguments

__all__ = [
    "SpectralNorm",
    "SpectralNormConv",
    "spectral_norm",
    "spectral_norm_conv",
    "singular_values",
    "remove_spectral_norm",
    "sigma",
    "is_spectral_norm",
    "get_spectral_norm",
    "spectral_norm_forward",
    "power_iteration_",
    "weight_grad",
    "WeightMatrix",
    "ConvOperator",
    "plain_path",
    "patch",
    "Patch",
]


def _no_compiler() -> bool:
    return False


_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or _no_compiler
"""Whether torch.compile is tracing this code (``torch.compiler.is_compiling``, torch >= 2.3)."""


def _is_batched(t: torch.Tensor) -> bool:
    """Whether ``t`` is a vmap batched tensor (functorch's, or the legacy one of
    ``autograd.grad(..., is_grads_batched=True)``, which gradcheck uses): ``.item()`` fails on it."""
    functorch = getattr(torch._C, "_functorch", None)
    checks = ("is_batchedtensor", "is_legacy_batchedtensor", "is_functorch_wrapped_tensor")
    return functorch is not None and any(getattr(functorch, c)(t) for c in checks if hasattr(functorch, c))


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
    if _autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


_LOW_PRECISION = tuple(getattr(torch, name) for name in _spec.LOW_PRECISION_DTYPES)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of u, v and of all spectral-norm math for a weight of ``dtype``: float32 for
    float16 / bfloat16 weights (a unit vector in half precision holds ~3 digits, and the
    power iteration's rounding would bias sigma; see docs/training.md), else ``dtype``."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _upcast(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in :func:`_compute_dtype` (a float32 copy of a half-precision weight)."""
    return weight.to(_compute_dtype(weight.dtype))


# ---------------------------------------------------------------------------------------------
# The W-matrix, without copying the weight
#
# Costs, measured on a CPU (one thread, 2048 x 2048 float32): a W-sized pass (a copy, W / s, a
# rank-1 update) ~1 ms, one matrix-vector product ~0.5-1 ms, anything on a vector ~microseconds.
# So the per-step work is counted in passes over W: two matrix-vector products, one W / sigma,
# and in backward one <W, G> and one fused rank-1 update. Nothing else touches W.


class WeightMatrix:
    """The W-matrix of ``weight`` (``dim`` to the front, other axes flattened), as views.

    The weight is seen as a 3-D ``(a, h, b)`` tensor: ``a`` the product of the axes before
    ``dim``, ``h`` the size of ``dim``, ``b`` the product of the axes after it (a 1-D weight,
    reached in the "matrix" vector mode, is ``(1, n, 1)``). The W-matrix is then
    ``M[o, (i, j)] = W3[i, o, j]``. When ``a == 1`` (``dim == 0``) or ``b == 1`` (``dim``
    last) M is a plain 2-D view and the products are single BLAS calls on it; otherwise they
    are batched products over the ``a`` blocks, which avoids copying W into M's layout.
    """

    __slots__ = ("shape", "a", "h", "b", "mat", "blocks")

    def __init__(self, weight: torch.Tensor, dim: int) -> None:
        self.shape = weight.shape
        if weight.ndim == 1:
            a, h = 1, weight.shape[0]
        else:
            a, h = math.prod(weight.shape[:dim]), weight.shape[dim]
        b = weight.numel() // (a * h)
        self.a, self.h, self.b = a, h, b
        # reshape gives views for contiguous weights (copies only for exotic layouts).
        self.mat = self.blocks = None
        if a == 1:
            self.mat = weight.reshape(h, b)
        elif b == 1:
            self.mat = weight.reshape(a, h).mT
        else:
            self.blocks = weight.reshape(a, h, b)

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        """M v (``h`` entries)."""
        if self.mat is not None:
            return torch.mv(self.mat, v)
        # One (1 x b) @ (b x h) product per block, summed over the blocks.
        return torch.bmm(v.view(self.a, 1, self.b), self.blocks.mT).sum(0).view(self.h)

    def mv_h(self, u: torch.Tensor) -> torch.Tensor:
        """M^H u (``a * b`` entries)."""
        if self.mat is not None:
            if self.b == 1 and u.is_complex():
                # M^H is conj of the (a, h) view: conj(W2 conj(u)) keeps W unconjugated (no copy)
                return torch.mv(self.mat.mT, u.conj()).conj_physical()
            return torch.mv(self.mat.mH, u)
        if u.is_complex():
            # sum_o conj(W3[i, o, j]) u[o] = conj(sum_o conj(u[o]) W3[i, o, j])
            return torch.matmul(u.conj(), self.blocks).conj_physical().reshape(-1)
        return torch.matmul(u, self.blocks).reshape(-1)

    def rank1(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """u v^H in the weight's layout, by broadcasting (used on the differentiable path)."""
        return (u.view(1, self.h, 1) * v.conj().view(self.a, 1, self.b)).view(self.shape)

    def add_rank1(self, grad: torch.Tensor, u, v, beta, alpha) -> torch.Tensor:
        """``beta * grad + alpha * u v^H`` in the weight's layout, as one fused pass.

        ``beta``, ``alpha`` are numbers (BLAS scaling factors).
        """
        vh = v.conj()
        if self.a == 1:
            out = torch.addr(grad.reshape(self.h, self.b), u, vh, beta=beta, alpha=alpha)
        elif self.b == 1:
            # the (a, h) view holds M^T, whose rank-1 term is conj(v) u^T
            out = torch.addr(grad.reshape(self.a, self.h), vh, u, beta=beta, alpha=alpha)
        else:
            out = torch.baddbmm(
                grad.reshape(self.a, self.h, self.b),
                u.view(1, self.h, 1).expand(self.a, self.h, 1),
                vh.view(self.a, 1, self.b),
                beta=beta,
                alpha=alpha,
            )
        return out.view(self.shape)


_CONV_FUNCTIONS = {
    1: (F.conv1d, F.conv_transpose1d),
    2: (F.conv2d, F.conv_transpose2d),
    3: (F.conv3d, F.conv_transpose3d),
}


class ConvGeometry:
    """Everything about a convolution layer the operator x -> conv(x, W) needs, computed once.

    ``input_shape`` / ``output_shape``: one sample's activation shapes (channels first, no
    batch axis). The adjoint is the transposed convolution with padding 0, whose output is
    the *padded* input, cropped back to ``input_shape`` (the adjoint of zero padding is a
    crop): ``crop`` holds the first kept index per spatial axis, and ``output_padding``
    makes the transposed convolution return exactly the padded size (it is < stride; the
    last input entries a strided convolution never reads come back as zeros).
    """

    __slots__ = ("spatial", "stride", "padding", "dilation", "groups", "input_shape", "output_shape",
                 "output_padding", "crop")

    def __init__(self, conv: nn.Module, input_shape: tuple[int, ...]) -> None:
        spatial = len(conv.kernel_size)
        self.spatial = spatial
        self.stride, self.dilation, self.groups = tuple(conv.stride), tuple(conv.dilation), conv.groups
        self.padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        self.input_shape = tuple(input_shape)
        out_sizes, output_padding, crop = [], [], []
        for i in range(spatial):
            k, s, d, n = conv.kernel_size[i], self.stride[i], self.dilation[i], self.input_shape[1 + i]
            reach = d * (k - 1)  # the kernel's extent minus one
            if self.padding == "valid":
                left = right = 0
            elif self.padding == "same":  # torch pads the odd extra entry at the end
                left, right = reach // 2, reach - reach // 2
            else:
                left = right = self.padding[i]
            padded = n + left + right
            size = (padded - reach - 1) // s + 1
            if size < 1:
                raise ValueError(
                    f"Expected input_shape to be large enough for the kernel, but spatial axis {i} "
                    f"of input_shape={list(self.input_shape)} is {n} (padded: {padded}) and the dilated "
                    f"kernel spans {reach + 1}"
                )
            out_sizes.append(size)
            output_padding.append(padded - ((size - 1) * s + reach + 1))
            crop.append(left)
        self.output_shape = (conv.out_channels, *out_sizes)
        self.output_padding = tuple(output_padding)
        self.crop = tuple(crop)


class ConvOperator:
    """The convolution of one sample as a linear map of flat vectors, M x = conv(x, W) with no
    bias, from the input activation space (``input_shape``) to the output one, and its
    adjoint M^H y = conv_transpose(y, conj(W)), cropped: the ``op`` of :func:`_step`.

    Its largest singular value is the convolution's operator norm (its Lipschitz constant
    in the 2-norm), which the reshaped-kernel sigma of :func:`spectral_norm` is not.
    """

    __slots__ = ("weight", "geometry")

    def __init__(self, weight: torch.Tensor, geometry: ConvGeometry) -> None:
        self.weight, self.geometry = weight, geometry

    def mv(self, x: torch.Tensor) -> torch.Tensor:
        """M x: the convolution of ``x`` (``input_shape`` entries), flat."""
        g = self.geometry
        conv = _CONV_FUNCTIONS[g.spatial][0]
        out = conv(x.reshape(1, *g.input_shape), self.weight, None, g.stride, g.padding, g.dilation, g.groups)
        return out.reshape(-1)

    def mv_h(self, y: torch.Tensor) -> torch.Tensor:
        """M^H y: the transposed convolution of ``y`` (``output_shape`` entries), flat."""
        g = self.geometry
        conv_t = _CONV_FUNCTIONS[g.spatial][1]
        weight = self.weight.conj().resolve_conj() if self.weight.is_complex() else self.weight
        x = conv_t(y.reshape(1, *g.output_shape), weight, None, g.stride, 0, g.output_padding, g.groups, g.dilation)
        for axis, (start, length) in enumerate(zip(g.crop, g.input_shape[1:])):
            x = x.narrow(2 + axis, start, length)
        return x.reshape(-1)


def _reads_host(x: torch.Tensor) -> bool:
    """Whether a scalar of ``x`` can be read on the host for free: CPU, eager, not under vmap."""
    return x.device.type == "cpu" and not _is_compiling() and not _is_batched(x)


def _safe_norm(x: torch.Tensor, check_finite: bool = False):
    """(||x|| with keepdim, its value on the host or None): ``dualsn.spec.safe_norm``, no
    overflow or underflow of the squared sum.

    On the CPU the plain norm is read on the host and kept unless it is out of range (so the
    result has F.normalize's bits), and ``check_finite`` raises FloatingPointError for a NaN
    or Inf (``dualsn.spec.check_finite_sigma``). Elsewhere a host read would synchronize: the
    norm is always taken of x / max|x|, and nothing is checked.
    """
    host = _reads_host(x)
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
    """``out <- x / max(||x||, eps)``, in place; returns ``||x||`` and ``max(||x||, eps)``.

    The same operations as ``F.normalize(x, dim=0, eps=eps, out=out)``, so the result has
    the same bits, but the norm is kept: it gives sigma (see :func:`power_iteration_`). An
    x whose norm has underflowed gives ``recovery`` instead, when given
    (``dualsn.spec.normalize``); a NaN
    or Inf norm raises FloatingPointError on the CPU before ``out`` is written.
    """
    norm, value = _safe_norm(x, check_finite=True)
    denom = norm.clamp_min(eps)
    tiny = _spec.underflow_threshold(norm.dtype)
    if recovery is None or value is not None and value >= tiny:
        torch.div(x, denom, out=out)
    elif value is not None:  # underflowed (zero included): restart
        out.copy_(recovery)
        return None  # sigma is no longer r^2 / max(r, eps) (see _sigma_from_last)
    else:
        # Off the CPU the restart is a select, and sigma is still read off the norm (0: the
        # forward divides by eps); only sigma() computes u^H W v.
        torch.where(norm < tiny, recovery, x / denom, out=out)
    return norm, denom


def _orthogonalize(x: torch.Tensor, basis) -> torch.Tensor:
    """``x`` minus its projections on the (orthonormal) vectors of ``basis``, one after the
    other (Gram-Schmidt, as ``dualsn.spec.power_step``)."""
    for b in basis:
        x = x - torch.vdot(b, x) * b
    return x


def _step(op, u, v, extra_u, extra_v, order: str, eps: float, recovery=(None, None)):
    """One power iteration on every (u, v) pair, in place: ``dualsn.spec.power_step``.

    ``op`` has ``mv`` (x -> M x) and ``mv_h`` (y -> M^H y) on flat vectors (a
    :class:`WeightMatrix` or a :class:`ConvOperator`). ``u``, ``v`` are pair 0; ``extra_u``,
    ``extra_v`` (rows = pairs 1, 2, ...; or None) are orthogonalized against the pairs before
    them, so pair 0 is the plain iteration. ``recovery`` = (u, v) pair 0 restarts from
    instead of becoming zero. Returns (norm, max(norm, eps)) of pair 0's last vector before
    normalization, from which sigma is read (see :func:`power_iteration_`).
    """
    rec_u, rec_v = recovery
    if order == "uv":
        _normalize_into(op.mv(v), u, eps, rec_u)
        last = _normalize_into(op.mv_h(u), v, eps, rec_v)
    else:
        _normalize_into(op.mv_h(u), v, eps, rec_v)
        last = _normalize_into(op.mv(v), u, eps, rec_u)
    if extra_u is not None:
        for i in range(extra_u.shape[0]):
            # the new vectors of the pairs before this one (rows before i are updated already)
            us, vs = [u, *extra_u[:i]], [v, *extra_v[:i]]
            if order == "uv":
                _normalize_into(_orthogonalize(op.mv(extra_v[i]), us), extra_u[i], eps)
                _normalize_into(_orthogonalize(op.mv_h(extra_u[i]), vs), extra_v[i], eps)
            else:
                _normalize_into(_orthogonalize(op.mv_h(extra_u[i]), vs), extra_v[i], eps)
                _normalize_into(_orthogonalize(op.mv(extra_v[i]), us), extra_u[i], eps)
    return last


def _sigma_from_last(last) -> torch.Tensor | None:
    """sigma = u^H M v after a step, from its last norm r: r^2 / max(r, eps) (0-d tensor).
    None after a restart from the recovery vectors: the caller computes u^H M v."""
    if last is None:
        return None
    norm, denom = last
    return (norm / denom).mul_(norm).view(())


@torch.no_grad()
def _training_steps(op, vectors, spec: _spec.Spec, recovery=(None, None)):
    """The power iterations of one training forward (``dualsn.spec.training_iterations``),
    in place on ``vectors`` = (u, v, extra_u, extra_v); returns (sigma, count).

    Without ``atol``/``rtol``: ``spec.n_power_iterations`` steps. With them: steps until the
    sigma estimate (pair 0's last norm) settles against the previous one
    (:meth:`dualsn.spec.Spec.settled`), after at least max(2, n_power_iterations) steps and
    at most ``spec.max_iterations``. Each comparison reads the estimate on the host.
    """
    if not spec.uses_tolerance:
        last = None
        for _ in range(spec.n_power_iterations):
            last = _step(op, *vectors, spec.order, spec.eps, recovery)
        return _sigma_from_last(last), spec.n_power_iterations
    previous = None
    count = 0
    while count < spec.max_iterations:
        last = _step(op, *vectors, spec.order, spec.eps, recovery)
        count += 1
        estimate = None if last is None else last[0].item()  # None: restarted
        if count >= spec.n_power_iterations and None not in (previous, estimate) and spec.settled(previous, estimate):
            break
        previous = estimate
    return _sigma_from_last(last), count


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
    return None if last is None else _sigma_from_last(last)


@torch.no_grad()
def _sigma(weight: torch.Tensor, dim: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sigma = u^H W v with the stored u, v (a 0-d tensor; complex for complex weights)."""
    return torch.vdot(u, WeightMatrix(_upcast(weight), dim).mv(v))


def _divisor(sigma: torch.Tensor, spec: _spec.Spec) -> torch.Tensor:
    """What the weight is divided by (``dualsn.spec.Spec.divisor``): sigma (eps where it is
    zero), or with ``coeff`` the soft bound sigma / coeff where Re(sigma) > coeff and 1
    elsewhere. A tensor select, not a Python branch: no host synchronization, and autograd
    follows the chosen side."""
    coeff = spec.coeff
    if coeff is None:
        return torch.where(sigma == 0, torch.full_like(sigma, spec.eps), sigma)
    return torch.where(sigma.real > coeff, sigma / coeff, torch.ones_like(sigma))


def weight_grad(grad, weight, sigma, u, v, dim: int, spec: _spec.Spec) -> torch.Tensor:
    """dL/dW of W -> W / d, d = sigma = u^H W v (u, v constant), from G = dL/dW_sn:

        (G - <W_sn, G> u v^H) / conj(sigma),   <A, B> = sum(conj(A) * B)

    (``dualsn.spec.normalized_weight_grad``). With ``coeff`` and the bound active (d = sigma /
    coeff): G / conj(d) - <W_sn, G> u v^H / conj(sigma); inactive (d = 1): G itself. A zero
    sigma is floored (d = eps): G / eps. Computed in two passes over W: one dot product
    <W, G> (<W_sn, G> = <W, G> / conj(d)) and one fused rank-1 update.
    """
    coeff = spec.coeff
    mat = WeightMatrix(weight, dim)
    sigma_c = sigma.conj()
    dot = torch.vdot(weight.reshape(-1), grad.reshape(-1))
    if _reads_host(grad):
        # Reading the scalars is free on the CPU, and BLAS then scales while it adds.
        s_c = sigma_c.item()
        if coeff is not None and not s_c.real > coeff:
            return grad  # the bound is inactive: W_sn = W
        if s_c == 0:
            return grad / spec.eps  # the floored divisor is a constant
        d_c = s_c if coeff is None else s_c / coeff
        return mat.add_rank1(grad, u, v, 1 / d_c, -dot.item() / (d_c * s_c))
    # Elsewhere (CUDA, compiled code) a .item() would synchronize, and under vmap it fails:
    # keep the scalars in tensors, at the price of a second pass. k = 1 / conj(sigma) where
    # there is a rank-1 term, 0 where there is none (sigma floored, or the bound inactive).
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
        return weight / _divisor(sigma, spec)

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


def _normalize_exact(weight: torch.Tensor, spec: _spec.Spec, training: bool = False) -> torch.Tensor:
    """An exactly normalized 1-D weight: W / max(||W||, eps) (F.normalize's operations, on a
    norm that cannot overflow), or W / divisor with ``coeff``. A training forward raises
    FloatingPointError for a NaN or Inf W (on the CPU)."""
    norm = _safe_norm(weight, check_finite=training)[0].clamp_min(spec.eps)
    return weight / (norm if spec.coeff is None else _divisor(norm, spec))


@torch.no_grad()
def _exact_sigma(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """sigma of an exactly normalized weight: max(||W||, eps)."""
    return _safe_norm(_upcast(weight))[0].clamp_min(eps).view(())


def spectral_norm_forward(
    weight: torch.Tensor,
    u: torch.Tensor | None,
    v: torch.Tensor | None,
    dim: int,
    spec: _spec.Spec,
    training: bool,
) -> torch.Tensor:
    """The normalized weight for one forward (the whole per-forward computation, uncached).

    Training mode first runs the spec's training iterations (``spec.n_power_iterations``, or
    until sigma settles with ``atol``/``rtol``) on the ``u``, ``v`` buffers in place.
    Gradients flow into ``weight`` only; u and v are constants. (Extra pairs of ``num_svs``
    live in :class:`SpectralNorm`, which iterates them too.) Inside :func:`plain_path`, the
    plain computation.
    """
    if _plain:
        return _plain_normalized_weight(weight, lambda w: _PlainMatrix(w, dim), (u, v, None, None), spec, training)[0]
    if weight.dtype in _LOW_PRECISION:
        # All the math in float32 (u, v are float32 too), the result cast back; autograd
        # carries the gradient through both casts.
        return spectral_norm_forward(weight.float(), u, v, dim, spec, training).to(weight.dtype)
    if spec.is_exact_vector(weight.ndim):
        return _normalize_exact(weight, spec, training)
    sigma = _training_steps(WeightMatrix(weight, dim), (u, v, None, None), spec)[0] if training else None
    if sigma is None:  # eval, or restarted from recovery vectors in training
        sigma = _sigma(weight, dim, u, v)
    return _divide(weight, sigma, u, v, dim, spec)


def _divide(weight, sigma, u, v, dim: int, spec: _spec.Spec) -> torch.Tensor:
    """W / divisor(sigma) (``dualsn.spec.Spec.divisor``), through :class:`_DivideBySigma` when
    autograd records it."""
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return weight / _divisor(sigma, spec)
    # Clone u, v: a later forward updates the buffers in place, and this forward's backward
    # needs them as they are now (loss = D(real) - D(fake) runs two forwards, one backward).
    return _DivideBySigma.apply(weight, sigma, u.clone(), v.clone(), dim, spec)


# ---------------------------------------------------------------------------------------------
# The plain path: the fast paths' reference, behind a switch
#
# Everything above trades plainness for speed (sigma read off a norm, a hand-written gradient,
# in-place normalization, caches). The plain path computes the same forward the way the spec
# writes it, and lets autograd derive the whole gradient, so that tests can hold each fast
# path against an implementation that shares none of its tricks.

_plain = False
"""Whether spectral-norm forwards take the plain path (set by :func:`plain_path`)."""


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
    global _plain
    previous, _plain = _plain, bool(enabled)
    try:
        yield
    finally:
        _plain = previous


class _PlainMatrix:
    """The W-matrix as the spec writes it, ``dim`` moved to the front and the rest flattened
    (a copy unless ``dim`` is 0): the operator of the plain path."""

    __slots__ = ("mat",)

    def __init__(self, weight: torch.Tensor, dim: int) -> None:
        self.mat = weight.movedim(dim, 0).reshape(_spec.matrix_shape(tuple(weight.shape), dim))

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        return self.mat @ v

    def mv_h(self, u: torch.Tensor) -> torch.Tensor:
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
    """``dualsn.spec.power_step`` in ordinary torch operations: the new lists of u's and v's,
    and the norm of pair 0's last vector before normalization (what atol/rtol compare). A NaN
    or Inf raises FloatingPointError on the CPU (nothing is written here)."""
    new_us, new_vs, estimate = [], [], None
    for u, v in zip(us, vs):
        rec_u, rec_v = recovery if not new_us else (None, None)
        if spec.order == "uv":
            u, first = _plain_normalize(_orthogonalize(op.mv(v), new_us), spec.eps, rec_u)
            v, last = _plain_normalize(_orthogonalize(op.mv_h(u), new_vs), spec.eps, rec_v)
        else:
            v, first = _plain_normalize(_orthogonalize(op.mv_h(u), new_vs), spec.eps, rec_v)
            u, last = _plain_normalize(_orthogonalize(op.mv(v), new_us), spec.eps, rec_u)
        if estimate is None:
            estimate = last
            if _reads_host(last):
                _spec.check_finite_sigma(first.item())
                _spec.check_finite_sigma(last.item())
        new_us.append(u)
        new_vs.append(v)
    return new_us, new_vs, estimate


@torch.no_grad()
def _plain_iterations(op, vectors, spec: _spec.Spec, recovery=(None, None)) -> int:
    """The power iterations of one training forward by :func:`_plain_step`, counted as
    ``dualsn.spec.training_iterations`` counts them (written out again, not shared with the
    fast path); the new vectors go into ``vectors`` = (u, v, extra u rows, extra v rows).
    Returns the count."""
    u, v, extra_u, extra_v = vectors
    buffers_u = [u] if extra_u is None else [u, *extra_u]
    buffers_v = [v] if extra_v is None else [v, *extra_v]
    us, vs = buffers_u, buffers_v
    if not spec.uses_tolerance:
        for _ in range(spec.n_power_iterations):
            us, vs, _ = _plain_step(op, us, vs, spec, recovery)
        count = spec.n_power_iterations
    else:
        previous, count = None, 0
        while count < spec.max_iterations:
            us, vs, estimate = _plain_step(op, us, vs, spec, recovery)
            count += 1
            estimate = estimate.item()
            if count >= spec.n_power_iterations and previous is not None and spec.settled(previous, estimate):
                break
            previous = estimate
    # copy_ rather than rebinding: the buffers keep their identity (DataParallel replicas
    # share them), and the extra rows are views of one buffer.
    for buffer, new in zip(buffers_u + buffers_v, us + vs):
        buffer.copy_(new)
    return count


def _plain_normalized_weight(weight: torch.Tensor, op_of, vectors, spec: _spec.Spec, training: bool, recovery=(None, None)):
    """(normalized weight, sigma, iterations run) of one forward on the plain path.

    ``op_of(w)`` is the operator (``mv``, ``mv_h``) of a weight in the compute dtype;
    ``vectors`` = (u, v, extra u rows, extra v rows), flat views of the buffers. sigma is
    detached (the ``last_sigma`` value); for an exactly normalized weight it is max(||W||, eps).
    """
    w = _upcast(weight)  # half precision: the math in float32, the result cast back
    with _no_autocast(w.device.type):
        if spec.is_exact_vector(w.ndim):
            norm, count = _plain_norm(w), 0
            if training and _reads_host(norm):
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


# ---------------------------------------------------------------------------------------------
# The eval-mode cache

_SAMPLES = 256
"""Entries of W compared by value on every cache hit (see :class:`_EvalCache`)."""


class _EvalCache:
    """The normalized weight of the last eval forward, and what it was computed from.

    It is valid while W, u and v are unchanged, which :meth:`valid` checks on every use:

    * W, u, v are the same tensor objects, W with the same data pointer, shape and strides
      (W's storage is held here, so its address cannot be reused by another tensor);
    * their version counters did not move: every tracked in-place change bumps them
      (optimizer steps, ``load_state_dict``, ``copy_`` under ``no_grad``);
    * 256 entries spread over W are unchanged by value: writes through ``.data`` bypass the
      version counter, and this catches whole-tensor ones such as an EMA of the weights
      written through ``.data`` (u and v written through ``.data`` while W is not changed are
      not seen: set ``cache_eval = False`` for such code);
    * the returned tensor's own version counter did not move (the caller did not modify it).

    The check is kept to a few attribute reads and two tensor operations on purpose: an eval
    forward streams W through the CPU caches, so everything here runs cache-cold.
    """

    __slots__ = ("weight", "u", "v", "storage", "index", "sample", "key", "sigma", "out")

    def __init__(self, weight, u, v, sigma) -> None:
        self.weight, self.u, self.v = weight, u, v
        self.storage = weight.untyped_storage()
        self.index = _sample_index(weight)
        self.sample = torch.take(weight, self.index)
        self.sigma = sigma
        self.out = None
        self.key = self._key(weight, u, v, None)

    @staticmethod
    def _key(weight, u, v, out):
        return (
            weight._version,
            weight.data_ptr(),
            weight.shape,
            weight.stride(),
            u._version,
            v._version,
            None if out is None else out._version,
        )

    def valid(self, weight, u, v) -> bool:
        """Whether the cached sigma (and output, if any) still belong to ``weight``, u, v."""
        return (
            weight is self.weight
            and u is self.u
            and v is self.v
            and self._key(weight, u, v, self.out) == self.key
            and torch.equal(torch.take(weight, self.index), self.sample)
        )

    def set_output(self, out) -> None:
        self.out = out
        self.key = self._key(self.weight, self.u, self.v, out)


def _sample_index(weight: torch.Tensor) -> torch.Tensor:
    """Where :class:`_EvalCache` and :class:`_SigmaRecord` sample W: every entry of a small W,
    else 256 evenly spread ones, first and last included (integer arithmetic: exact for any
    size)."""
    n = weight.numel()
    if n <= _SAMPLES:
        return torch.arange(n, device=weight.device)
    return torch.arange(_SAMPLES, device=weight.device) * (n - 1) // (_SAMPLES - 1)


class _SigmaRecord:
    """The sigma of the last forward, and what it was computed from: :func:`sigma` returns it
    while it is valid, by the checks of :class:`_EvalCache` (same W, u, v objects, W's
    storage, version counters, 256 sampled entries of W). Once :func:`sigma` has been read, one
    is made on every training forward, so it holds no output and costs one small gather."""

    __slots__ = ("weight", "u", "v", "storage", "key", "index", "sample", "sigma")

    def __init__(self, weight, u, v, sigma, index) -> None:
        self.weight, self.u, self.v, self.sigma, self.index = weight, u, v, sigma, index
        self.storage = weight.untyped_storage()  # held: its address cannot be reused
        self.sample = torch.take(weight, index)
        self.key = (weight._version, weight.data_ptr(), weight.shape, weight.stride(), u._version, v._version)

    def valid(self, weight, u, v) -> bool:
        return (
            weight is self.weight
            and u is self.u
            and v is self.v
            and (weight._version, weight.data_ptr(), weight.shape, weight.stride(), u._version, v._version)
            == self.key
            and torch.equal(torch.take(weight, self.index), self.sample)
        )


# ---------------------------------------------------------------------------------------------
# The parametrization


def _seeded_uv(h: int, w: int, seed: int, like: torch.Tensor, eps: float):
    """u, v from ``spec.init_uv`` in the weight's compute dtype, on its device."""
    dtype = _compute_dtype(like.dtype)
    u0, v0 = _spec.init_uv(h, w, seed, _spec.init_dtype(str(dtype)), eps)
    return tuple(torch.from_numpy(a).to(device=like.device, dtype=dtype) for a in (u0, v0))


def _seeded_extra_uv(h: int, w: int, count: int, seed: int, like: torch.Tensor, eps: float):
    """The extra pairs' starting vectors from ``spec.init_extra_uv``, like :func:`_seeded_uv`."""
    dtype = _compute_dtype(like.dtype)
    us, vs = _spec.init_extra_uv(h, w, count, seed, _spec.init_dtype(str(dtype)), eps)
    return tuple(torch.from_numpy(a).to(device=like.device, dtype=dtype) for a in (us, vs))


_STATE_BUFFERS = ("_u", "_v", "_u_extra", "_v_extra", "_sigma", "_u_recovery", "_v_recovery")
"""The buffers a :class:`SpectralNorm` may hold (all in the compute dtype)."""


class SpectralNorm(nn.Module):
    """Parametrization ``W -> W / sigma(W)``, registered by :func:`spectral_norm`.

    Attributes ``spec`` (the :class:`dualsn.spec.Spec`) and ``dim`` (non-negative) describe
    the algorithm. Buffers ``_u`` and ``_v`` hold the singular-vector estimates; they are
    None (and absent from the state dict) for a weight the spec normalizes exactly. They
    are float32 for float16 / bfloat16 weights (the math then runs in float32 and the
    normalized weight is cast back), and stay float32 when the module is cast later.

    Opt-in features (``dualsn.spec.Spec``): with ``spec.coeff`` the weight is divided by the
    soft bound max(1, sigma / coeff); with ``spec.atol``/``spec.rtol`` a training forward
    iterates until sigma settles, and ``last_iterations`` says how many it ran (0 after an
    eval forward); with ``spec.num_svs > 1`` buffers ``_u_extra`` / ``_v_extra`` (one row per
    extra pair) estimate further singular values (:func:`singular_values`); with
    ``track_sigma`` a persistent buffer ``_sigma`` holds the sigma of the last forward.
    Without it, that sigma is the plain attribute ``last_sigma`` (a 0-d tensor; None before the
    first forward and for an exactly normalized weight), and :func:`sigma` returns it, without
    a product, while W, u and v are unchanged (checked as the eval cache is).

    In eval mode, when no autograd graph is recorded (``torch.no_grad()``, or a frozen
    weight), the normalized weight is cached and returned again while W, u and v are
    unchanged (see :class:`_EvalCache`); ``cache_eval = False`` turns that off. When a graph
    is recorded only sigma is reused. The cache costs one extra W-sized tensor in memory; it
    is dropped by ``train()``/``eval()`` and device or dtype moves.

    The constructor only draws u and v; :func:`spectral_norm` runs the registration
    iterations.
    """

    owner = "the module"  # the default for modules pickled before it existed

    def __init__(
        self, weight: torch.Tensor, dim: int, spec: _spec.Spec, seed: int | None = None, track_sigma: bool = False
    ) -> None:
        super().__init__()
        self.spec = spec
        self.dim = dim
        shapes = None
        if not spec.is_exact_vector(weight.ndim):
            h, w = _spec.matrix_shape(tuple(weight.shape), dim)
            shapes = ((h,), (w,))
        self._init_state(weight, shapes, seed, track_sigma)

    def _init_state(self, weight: torch.Tensor, shapes, seed: int | None, track_sigma: bool) -> None:
        """Plain attributes, and the buffers drawn: u, v of ``shapes`` = (u's shape, v's
        shape) (None: exact normalization, no u, v), the extra pairs, and ``_sigma``."""
        spec = self.spec
        self.cache_eval = True
        self.owner = "the module"  # named in errors; _register says which parameter of which module
        self.track_sigma = bool(track_sigma)
        self.last_iterations = 0
        self.last_sigma: torch.Tensor | None = None
        self._cache: _EvalCache | None = None
        self._record: _SigmaRecord | None = None
        self._keep_sigma = False  # set by the first sigma() read: from then on forwards keep a record
        self._sample_index = None  # _SigmaRecord's sample positions, and the size they are for
        self._sample_numel = 0
        dtype = _compute_dtype(weight.dtype)
        u = v = u_extra = v_extra = None
        if shapes is not None:
            h, w = math.prod(shapes[0]), math.prod(shapes[1])
            k = spec.num_svs - 1
            with torch.no_grad():
                if seed is not None:
                    u, v = _seeded_uv(h, w, seed, weight, spec.eps)
                    if k:
                        u_extra, v_extra = _seeded_extra_uv(h, w, k, seed, weight, spec.eps)
                else:
                    # The torch built-ins' draw: u's normals, then v's, from torch's RNG (the
                    # extra pairs after them, so u and v are what the built-in draws).
                    def draw(*shape):
                        x = weight.new_empty(shape).normal_(0, 1).to(dtype)
                        return F.normalize(x, dim=-1, eps=spec.eps)

                    u, v = draw(h), draw(w)
                    if k:
                        u_extra, v_extra = draw(k, h), draw(k, w)
                # Non-persistent buffers (not in the state dict): they follow .to() and work
                # under torch.compile, where drawing them with numpy could not run.
                recovery = _spec.recovery_uv(h, w, seed, _spec.init_dtype(str(dtype)), spec.eps)
                for name, x in zip(("_u_recovery", "_v_recovery"), recovery):
                    self.register_buffer(name, torch.from_numpy(x).to(device=weight.device, dtype=dtype), persistent=False)
            u, v = u.view(shapes[0]), v.view(shapes[1])
            if k:
                u_extra, v_extra = u_extra.view(k, *shapes[0]), v_extra.view(k, *shapes[1])
        self.register_buffer("_u", u)
        self.register_buffer("_v", v)
        if u_extra is not None:
            self.register_buffer("_u_extra", u_extra)
            self.register_buffer("_v_extra", v_extra)
        if self.track_sigma:
            sigma_dtype = dtype if u is not None else torch.empty((), dtype=dtype).real.dtype
            self.register_buffer("_sigma", torch.zeros((), dtype=sigma_dtype, device=weight.device))

    # Names the torch built-in's parametrization exposes, for tools that read them.
    @property
    def n_power_iterations(self) -> int:
        return self.spec.n_power_iterations

    @property
    def eps(self) -> float:
        return self.spec.eps

    # -- what the subclass for convolutions changes ----------------------------------------
    def _operator(self, weight: torch.Tensor):
        """The linear map whose largest singular value is estimated: the W-matrix (of a
        weight already in the compute dtype)."""
        return WeightMatrix(weight, self.dim)

    def _vectors(self):
        """(u, v, extra u rows, extra v rows) as flat views of the buffers (extras: None)."""
        b = self._buffers  # (not self._u: nn.Module's attribute lookup is slow)
        return b["_u"], b["_v"], b.get("_u_extra"), b.get("_v_extra")

    def _sigma_of(self, weight: torch.Tensor) -> torch.Tensor:
        """u^H M v from the current state (no iteration, no graph)."""
        return _sigma(weight, self.dim, self._u, self._v)

    def _divide_by(self, weight: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """W / sigma (or the ``coeff`` divisor), differentiable in W with u, v constant."""
        return _divide(weight, sigma, self._u, self._v, self.dim, self.spec)

    def _plain_operator(self, weight: torch.Tensor) -> _PlainMatrix:
        """The operator of the plain path (:func:`plain_path`)."""
        return _PlainMatrix(weight, self.dim)

    # ----------------------------------------------------------------------------------------
    def iterate(self, weight: torch.Tensor, n: int) -> None:
        """``n`` power iterations on ``weight`` (all pairs; no-op without u, v)."""
        if self._u is not None and n > 0:
            with torch.no_grad():
                op, vectors = self._operator(_upcast(weight)), self._vectors()
                recovery = self._recovery(vectors[0])
                for _ in range(n):
                    _step(op, *vectors, self.spec.order, self.spec.eps, recovery)

    def sigma(self, weight: torch.Tensor) -> torch.Tensor:
        """sigma of ``weight`` from the current state, without iterating or recording grad.

        The sigma of the last forward is returned when it still belongs to ``weight``, u and v
        (the checks of :class:`_EvalCache`); else it is computed (u^H M v) and kept.
        """
        with torch.no_grad():
            if self._u is None:
                return _exact_sigma(weight, self.spec.eps)
            self._keep_sigma = True
            u, v = self._u, self._v
            for kept in (self._record, self._cache):
                if kept is not None and kept.valid(weight, u, v):
                    return kept.sigma
            value = self._sigma_of(weight)
            self._remember(weight, value)
            return value

    def singular_values(self, weight: torch.Tensor) -> list[float]:
        """u_i^H M v_i for every pair (real parts): sigma first, then the extra estimates."""
        values = [self.sigma(weight)]
        u_extra = self._buffers.get("_u_extra")
        if u_extra is not None:
            with torch.no_grad():
                op = self._operator(_upcast(weight))
                _, _, us, vs = self._vectors()
                values += [torch.vdot(us[i], op.mv(vs[i])) for i in range(us.shape[0])]
        return [float(s.real.item()) for s in values]

    def _remember(self, weight: torch.Tensor, sigma: torch.Tensor) -> None:
        """Keep ``sigma`` as the last sigma, with what it was computed from (a
        :class:`_SigmaRecord`). On every training forward: kept lean."""
        attrs = self.__dict__  # plain attributes, written around nn.Module.__setattr__ (slow)
        u, v = self._buffers["_u"], self._buffers["_v"]
        if _is_compiling() or weight.is_inference() or u.is_inference() or v.is_inference():
            attrs["_record"] = None  # no version counters to check it by
            return
        index = attrs.get("_sample_index")
        if index is None or index.device != weight.device or attrs["_sample_numel"] != weight.numel():
            index = attrs["_sample_index"] = _sample_index(weight)
            attrs["_sample_numel"] = weight.numel()
        attrs["_record"] = _SigmaRecord(weight, u, v, sigma, index)

    def _publish(self, weight: torch.Tensor, sigma: torch.Tensor | None) -> None:
        """After a forward: keep sigma (``last_sigma``; and, once :func:`sigma` has been read,
        a record to check it by), and write it into the ``_sigma`` buffer if tracked."""
        attrs = self.__dict__
        attrs["last_sigma"] = sigma
        if sigma is not None and attrs["_keep_sigma"]:
            self._remember(weight, sigma)
        if self.track_sigma:
            with torch.no_grad():
                self._sigma.copy_(_exact_sigma(weight, self.spec.eps) if sigma is None else sigma)

    def _compute(self, weight: torch.Tensor, training: bool):
        """(normalized weight, sigma) for one forward, uncached; sigma is None for an exactly
        normalized weight."""
        if weight.dtype in _LOW_PRECISION:
            # All the math in float32 (u, v are float32 too), the result cast back; autograd
            # carries the gradient through both casts.
            out, sigma = self._compute(weight.float(), training)
            return out.to(weight.dtype), sigma
        attrs = self.__dict__  # last_iterations is a plain attribute: skip nn.Module.__setattr__
        if self._buffers["_u"] is None:
            attrs["last_iterations"] = 0
            return _normalize_exact(weight, self.spec, training), None
        if training:
            vectors = self._vectors()
            sigma, attrs["last_iterations"] = _training_steps(
                self._operator(weight), vectors, self.spec, self._recovery(vectors[0])
            )
        else:
            sigma, attrs["last_iterations"] = None, 0
        if sigma is None:  # eval, or restarted from the recovery vectors in training
            sigma = self._sigma_of(weight)
        return self._divide_by(weight, sigma), sigma

    def _recovery(self, like: torch.Tensor):
        """(u, v) of ``dualsn.spec.recovery_uv`` for this norm's seed, flat: where a
        power-iteration step restarts instead of making them zero. (None, None) for a module
        pickled before they existed."""
        b = self._buffers
        if b.get("_u_recovery") is None:
            return None, None
        return b["_u_recovery"].to(like.dtype), b["_v_recovery"].to(like.dtype)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        try:
            return self._forward(weight)
        except FloatingPointError as error:
            raise FloatingPointError(f"spectral norm of {self.owner}: {error}") from None

    def _forward(self, weight: torch.Tensor) -> torch.Tensor:
        if _plain:
            return self._plain_forward(weight)
        cache = self._cache
        if (
            cache is not None
            and cache.out is not None
            and self.cache_eval
            and not self.training
            and not _is_compiling()
            and not (torch.is_grad_enabled() and weight.requires_grad)
            and cache.valid(weight, self._buffers["_u"], self._buffers["_v"])
        ):
            return cache.out  # eval, nothing changed: the fast path (see _EvalCache)
        with _no_autocast(weight.device.type):
            if self.training or self._u is None or weight.dtype in _LOW_PRECISION:
                out, sigma = self._compute(weight, self.training)
                self._publish(weight, sigma)
            else:
                out, sigma = self._eval_forward(weight)
                self.__dict__["last_iterations"] = 0
                self.__dict__["last_sigma"] = sigma
                if self._keep_sigma and (self._cache is None or self._cache.sigma is not sigma):
                    self._remember(weight, sigma)  # not kept by the eval cache
                if self.track_sigma:
                    with torch.no_grad():
                        self._sigma.copy_(sigma)
        return out

    def _plain_forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The forward under :func:`plain_path`: the same state updates, neither the eval cache
        nor the kept sigma touched."""
        vectors = self._vectors()
        recovery = (None, None) if vectors[0] is None else self._recovery(vectors[0])
        out, sigma, count = _plain_normalized_weight(
            weight, self._plain_operator, vectors, self.spec, self.training, recovery
        )
        attrs = self.__dict__
        attrs["last_iterations"] = count
        attrs["last_sigma"] = None if self._u is None else sigma
        if self.track_sigma:
            with torch.no_grad():
                self._sigma.copy_(sigma)
        return out

    def _eval_forward(self, weight: torch.Tensor):
        """(normalized weight, sigma) in eval mode, through the eval cache when allowed."""
        u, v = self._u, self._v
        cacheable = (
            self.cache_eval
            and not _is_compiling()
            and not (weight.is_inference() or u.is_inference() or v.is_inference())
        )
        if not cacheable:
            sigma = self._sigma_of(weight)
            return self._divide_by(weight, sigma), sigma
        cache = self._cache
        if cache is None or not cache.valid(weight, u, v):
            # Built as normal tensors even in inference mode: their version counters can be
            # read, and sigma and the result stay usable where autograd records later.
            with torch.inference_mode(False), torch.no_grad():
                cache = self._cache = _EvalCache(weight, u, v, self._sigma_of(weight))
        if torch.is_grad_enabled() and weight.requires_grad:
            # autograd needs a graph from W: reuse sigma only
            return self._divide_by(weight, cache.sigma), cache.sigma
        with torch.inference_mode(False), torch.no_grad():
            out = weight / _divisor(cache.sigma, self.spec)
        cache.set_output(out)
        return out, cache.sigma

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._cache = self._record = self._sample_index = None
        before = {name: self._buffers.get(name) for name in _STATE_BUFFERS}
        result = super()._apply(fn, *args, **kwargs)
        if self._u is not None and self._u.dtype in _LOW_PRECISION:
            # module.half() / .to(torch.bfloat16): the state stays float32 (see _compute_dtype),
            # taken from before the cast so that it is not rounded through half precision.
            device = self._u.device
            for name, t in before.items():
                if t is not None:
                    setattr(self, name, t.to(device=device, dtype=_compute_dtype(self._buffers[name].dtype)))
        return result

    def __getstate__(self):
        # copies and pickles start without a cache or a kept sigma
        state = super().__getstate__()
        state["_cache"] = state["_record"] = state["_sample_index"] = None
        return state

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        # Assigning module.<name> = X stores X itself as the unnormalized weight.
        return value

    def _features_repr(self) -> str:
        s = self.spec
        parts = [f"{f}={getattr(s, f)}" for f in ("coeff", "atol", "rtol") if getattr(s, f) is not None]
        if s.uses_tolerance:
            parts.append(f"max_iterations={s.max_iterations}")
        if s.num_svs > 1:
            parts.append(f"num_svs={s.num_svs}")
        if self.track_sigma:
            parts.append("track_sigma=True")
        return "".join(", " + p for p in parts)

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"dim={self.dim}, n_power_iterations={s.n_power_iterations}, eps={s.eps}, "
            f"order={s.order!r}, vector_mode={s.vector_mode!r}" + self._features_repr()
        )


class SpectralNormConv(SpectralNorm):
    """Parametrization ``W -> W / sigma`` where sigma estimates the operator norm of the
    convolution itself, registered by :func:`spectral_norm_conv`.

    ``_u`` (shape ``output_shape``) and ``_v`` (shape ``input_shape``) live in the output and
    input activation spaces of one sample; the power iteration is
    :func:`dualsn.spec.power_step` on the explicit convolution matrix, computed with the
    layer's convolution and transposed convolution (:class:`ConvOperator`). ``dim`` is None:
    no axis of the kernel is singled out.
    """

    def __init__(
        self, weight: torch.Tensor, geometry: ConvGeometry, spec: _spec.Spec, seed: int | None = None,
        track_sigma: bool = False,
    ) -> None:
        nn.Module.__init__(self)
        self.spec = spec
        self.dim = None
        self.geometry = geometry
        self._init_state(weight, (geometry.output_shape, geometry.input_shape), seed, track_sigma)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.geometry.input_shape

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.geometry.output_shape

    def _operator(self, weight: torch.Tensor) -> ConvOperator:
        return ConvOperator(weight, self.geometry)

    # conv and conv_transpose are plain operations already (autograd differentiates them)
    _plain_operator = _operator

    def _vectors(self):
        u_extra = self._buffers.get("_u_extra")
        if u_extra is None:
            return self._u.view(-1), self._v.view(-1), None, None
        k = u_extra.shape[0]
        return self._u.view(-1), self._v.view(-1), u_extra.view(k, -1), self._v_extra.view(k, -1)

    def _sigma_of(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.vdot(self._u.view(-1), self._operator(_upcast(weight)).mv(self._v.view(-1)))

    def _divide_by(self, weight: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and weight.requires_grad):
            return weight / _divisor(sigma, self.spec)
        # sigma = u^H conv(v, W) recorded by autograd (the gradient of W -> W / sigma(W)),
        # from clones of u, v: later forwards update the buffers in place.
        u, v = self._u.reshape(-1).clone(), self._v.reshape(-1).clone()
        return weight / _divisor(torch.vdot(u, self._operator(weight).mv(v)), self.spec)

    def extra_repr(self) -> str:
        g, s = self.geometry, self.spec
        return (
            f"input_shape={g.input_shape}, output_shape={g.output_shape}, "
            f"n_power_iterations={s.n_power_iterations}, eps={s.eps}, order={s.order!r}" + self._features_repr()
        )


# ---------------------------------------------------------------------------------------------
# Pickling. parametrize gives each parametrized module a class of its own, made on the fly,
# whose __getstate__ refuses to pickle ("only supported through state_dict()"). A module
# carrying dualsn's spectral norm pickles instead as: its original class, the names of its
# parametrized tensors and its __dict__; unpickling makes a bare instance, lets parametrize
# give it a fresh class and properties, and restores the __dict__ (parametrizations
# included). So torch.save(model) and copy / multiprocessing pickles work.


def _rebuild_parametrized(base_cls: type, names: tuple[str, ...]) -> nn.Module:
    module = base_cls.__new__(base_cls)
    parametrize._inject_new_class(module)
    for name in names:
        parametrize._inject_property(module, name)
    _make_picklable(module)
    return module


def _reduce_parametrized(module: nn.Module, protocol):
    base_cls = type(module).__bases__[0]
    names = tuple(module.parametrizations.keys())
    return _rebuild_parametrized, (base_cls, names), module.__dict__.copy()


def _make_picklable(module: nn.Module) -> None:
    """Let the parametrized ``module`` be pickled (its class is its own: see above)."""
    if hasattr(parametrize, "_inject_new_class") and hasattr(parametrize, "_inject_property"):
        type(module).__reduce_ex__ = _reduce_parametrized


# ---------------------------------------------------------------------------------------------
# Lookup helpers


def _find(module: nn.Module, name: str):
    """(parametrization list, index, SpectralNorm) of dualsn's SN on ``name``, or None."""
    if not isinstance(name, str) or not parametrize.is_parametrized(module, name):
        return None
    plist = module.parametrizations[name]
    for index, p in enumerate(plist):
        if isinstance(p, SpectralNorm):
            return plist, index, p
    return None


def get_spectral_norm(module: nn.Module, name: str = "weight") -> SpectralNorm | None:
    """The :class:`SpectralNorm` parametrization on ``module.<name>``, or None."""
    found = _find(module, name)
    return None if found is None else found[2]


def is_spectral_norm(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.<name>`` carries a dualsn spectral norm."""
    return _find(module, name) is not None


def _has_any_spectral_norm(module: nn.Module, name: str) -> bool:
    """dualsn's, or either torch built-in's, spectral norm on ``name``."""
    if is_spectral_norm(module, name):
        return True
    if parametrize.is_parametrized(module, name):
        builtin = _parametrizations._SpectralNorm
        if any(isinstance(p, builtin) for p in module.parametrizations[name]):
            return True
    hooks = module._forward_pre_hooks.values()
    return any(isinstance(h, _legacy.SpectralNorm) and h.name == name for h in hooks)


def _sn_input(plist, index: int) -> torch.Tensor:
    """The tensor the parametrization at ``index`` receives (what ``sigma`` is taken of)."""
    if plist.is_tensor:
        originals = [plist.original]
    else:
        originals = [getattr(plist, f"original{i}") for i in range(plist.ntensors)]
    if index == 0:
        return originals[0]
    x = plist[0](*originals)
    for k in range(1, index):
        x = plist[k](x)
    return x


def _is_dim_1_layer(module: nn.Module) -> bool:
    for dotted in _spec.DEFAULT_DIM_1_LAYERS["torch"]:
        module_name, cls_name = dotted.rsplit(".", 1)
        if isinstance(module, getattr(importlib.import_module(module_name), cls_name)):
            return True
    return False


# ---------------------------------------------------------------------------------------------
# Public API


def _check_track_sigma(track_sigma) -> None:
    if not isinstance(track_sigma, bool):
        raise ValueError(f"Expected track_sigma to be a bool, but got track_sigma={track_sigma!r}")


def _check_is_module(module, function: str) -> None:
    """TypeError naming the right function when ``module`` is not a torch module."""
    if isinstance(module, nn.Module):
        return
    cls = type(module)
    hint = f"; for a Paddle layer use dualsn.paddle.{function}" if cls.__module__.startswith("paddle") else ""
    raise TypeError(f"Expected module to be a torch.nn.Module, but got {cls.__module__}.{cls.__qualname__}{hint}")


def _has_legacy_hook(module: nn.Module, name: str) -> bool:
    return any(isinstance(h, _legacy.SpectralNorm) and h.name == name for h in module._forward_pre_hooks.values())


def _target_weight(module: nn.Module, name: str, stackable: bool = False) -> torch.Tensor:
    """The tensor spectral norm would be put on, after every check that needs no algorithm
    parameter (errors as common to both entry points; nothing is changed).

    ``stackable``: a parametrization may go on top of others on ``name`` (compat "torch",
    as torch's own parametrization allows); hooks never stack, as in their built-ins.
    """
    _check_is_module(module, "spectral_norm")
    _spec.check_name(name)
    if _has_legacy_hook(module, name) or (not stackable and _has_any_spectral_norm(module, name)):
        raise RuntimeError(f"Cannot register two spectral norms on the same parameter {name!r}")
    is_tensor = (
        module._parameters.get(name) is not None
        or module._buffers.get(name) is not None
        or parametrize.is_parametrized(module, name)
    )
    if not is_tensor:
        raise _spec.ParameterNotFoundError(
            f"Expected name to be a parameter or buffer of {type(module).__name__}, "
            f"but it has none called name={name!r}"
        )
    weight = getattr(module, name)
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"Parameter {name!r} is uninitialized; run a forward pass of the lazy module "
            "before applying spectral norm"
        )
    if not (weight.is_floating_point() or weight.is_complex()):
        raise NotImplementedError(
            f"Spectral norm needs a floating-point or complex parameter, but {name!r} has "
            f"dtype {weight.dtype}"
        )
    _spec.check_weight_shape(tuple(weight.shape), name)
    return weight


def _register(module: nn.Module, name: str, weight: torch.Tensor, parametrization: SpectralNorm) -> nn.Module:
    """Registration proper, once everything is validated: the registration iterations, the
    parametrization, the kept sigma."""
    parametrization.owner = f"{name!r} in {type(module).__name__}"
    spec = parametrization.spec
    iterations = spec.registration_iterations(module.training)
    # The built-in's registration check evaluates module.<name> once more, and on a stacked
    # parametrization that runs the spectral norms below this one again (training mode):
    # its last iterations see that new weight. So do these.
    stacked = spec.registration_forward and module.training and parametrize.is_parametrized(module, name)
    check = spec.n_power_iterations if stacked else 0
    try:
        parametrization.iterate(weight, iterations - check)
        if check:
            weight = getattr(module, name)
            parametrization.iterate(weight, check)
    except FloatingPointError as error:
        raise FloatingPointError(f"spectral norm of {parametrization.owner}: {error}") from None
    # unsafe=True: register_parametrization would otherwise evaluate the parametrization once
    # (one more iteration in training mode); registration_iterations already counts that.
    parametrize.register_parametrization(module, name, parametrization, unsafe=True)
    if parametrization.track_sigma:
        parametrization._publish(weight, parametrization.sigma(weight))
    _make_picklable(module)
    return module


def spectral_norm(
    module: nn.Module,
    name: str = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int | None = None,
    *,
    compat: str = "torch",
    seed: int | None = None,
    coeff: float | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    max_iterations: int = 100,
    num_svs: int = 1,
    track_sigma: bool = False,
) -> nn.Module:
    """Apply spectral normalization to ``module.<name>`` and return ``module``.

    Args:
        module: the module holding the parameter (or buffer).
        name: the parameter's name.
        n_power_iterations: power iterations per training-mode evaluation of the weight.
        eps: the floor of every norm.
        dim: the output-features axis; default 1 for transposed convolutions, else 0.
        compat: a :data:`dualsn.spec.PRESETS` key; ``"torch"`` reproduces
            ``torch.nn.utils.parametrizations.spectral_norm`` exactly.
        seed: draw u, v from :func:`dualsn.spec.init_uv` with this seed (identical in every
            framework). Without it the :func:`dualsn.manual_seed` stream is used if set,
            else torch's RNG, exactly as the built-in draws.

    Opt-in features no built-in has (all off by default; see :class:`dualsn.spec.Spec`):

    Args:
        coeff: soft Lipschitz bound (i-ResNet, Residual Flows): the weight is divided by
            max(1, sigma / coeff), so its spectral norm is at most ``coeff`` and a weight
            already below it passes unchanged (gradient included).
        atol, rtol: a training forward iterates until two successive sigma estimates agree
            within ``atol + rtol * sigma`` (at least max(2, n_power_iterations) iterations, at
            most ``max_iterations``); the count is the parametrization's ``last_iterations``.
        num_svs: estimate this many leading singular values (BigGAN): extra (u, v) pairs in
            buffers ``_u_extra`` / ``_v_extra``, Gram-Schmidt orthogonalized, read by
            :func:`singular_values`. The normalization uses the first only.
        track_sigma: keep the last forward's sigma in a persistent buffer ``_sigma``
            (state-dict key ``parametrizations.<name>.0._sigma``), for logging. Without it,
            :func:`sigma` still returns it, from a non-persistent attribute, when it is current.

    Like the built-in, ``module.<name>`` is recomputed on every access, and every access in
    training mode runs the power iteration. Everything is validated before the module is
    touched: a failed call leaves it as it was.

    For a convolution, sigma is the largest singular value of the kernel reshaped to a
    (out_channels, in_channels * kernel) matrix, as in every built-in: it is *not* the
    operator norm of the convolution (which can be several times larger, or smaller); for
    that, see :func:`spectral_norm_conv`.

    Example::

        >>> layer = spectral_norm(nn.Linear(20, 10), coeff=0.97, atol=1e-4, num_svs=3, seed=0)
        >>> _ = layer(torch.randn(4, 20))       # training mode: iterates until sigma settles
        >>> len(singular_values(layer))
        3
    """
    sn_spec = _spec.make_spec(
        compat, n_power_iterations, eps,
        coeff=coeff, atol=atol, rtol=rtol, max_iterations=max_iterations, num_svs=num_svs,
    )
    _spec.check_seed(seed)
    _check_track_sigma(track_sigma)
    weight = _target_weight(module, name, stackable=compat == "torch")
    dim = _spec.canonical_dim(
        _spec.default_dim(_is_dim_1_layer(module), weight.ndim) if dim is None else dim, weight.ndim
    )
    if not sn_spec.is_exact_vector(weight.ndim):
        _spec.check_num_svs(sn_spec.num_svs, *_spec.matrix_shape(tuple(weight.shape), dim))

    # Validation is over; from here on the module changes.
    s = _spec.next_seed(seed)
    return _register(module, name, weight, SpectralNorm(weight, dim, sn_spec, s, track_sigma))



def spectral_norm_conv(
    module: nn.Module,
    input_shape,
    name: str = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    *,
    coeff: float | None = None,
    seed: int | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    max_iterations: int = 100,
    num_svs: int = 1,
    track_sigma: bool = False,
) -> nn.Module:
    """Normalize a convolution by its operator norm, and return ``module``.

    For ``nn.Conv1d``/``Conv2d``/``Conv3d`` with ``padding_mode="zeros"``. The convolution of one
    sample of shape ``input_shape`` (channels first, no batch axis: ``(C, H, W)`` for Conv2d),
    without bias, is a linear map M (an explicit matrix with one column per input entry);
    sigma estimates its largest singular value, the layer's Lipschitz constant, which the
    reshaped-kernel sigma of :func:`spectral_norm` is not. ``_u`` (shape of one output
    sample) and ``_v`` (shape ``input_shape``) live in the activation spaces, and the power
    iteration (order "vu", as i-ResNet: v <- N(M^H u), u <- N(M v)) applies the layer's own
    convolution and the matching transposed convolution (stride, padding, dilation, groups).
    The algorithm is :class:`dualsn.spec.ReferenceSN` on M with the "torch_legacy" preset
    (no warm-up), so u, v start from their draw: run a few training forwards, or use
    ``atol``/``rtol``, before trusting sigma. A seeded draw is
    ``spec.init_uv(M's rows, M's columns, seed)`` reshaped.

    The layer must then only see inputs of ``input_shape`` for the bound to hold (other
    sizes of a stride-1 convolution have a nearly equal norm, but that is not checked).
    ``coeff``, ``atol``/``rtol``/``max_iterations``, ``num_svs``, ``track_sigma``, ``seed``:
    as in :func:`spectral_norm`. :func:`remove_spectral_norm`, :func:`sigma` and
    :func:`singular_values` work on it.

    Raises TypeError for a module that is not such a convolution, ValueError for an
    ``input_shape`` that does not fit it, NotImplementedError for other padding modes.

    Example::

        >>> conv = spectral_norm_conv(nn.Conv2d(3, 8, 3, padding=1), (3, 16, 16), coeff=0.9, seed=0)
        >>> conv.parametrizations.weight[0]._v.shape
        torch.Size([3, 16, 16])
    """
    sn_spec = _spec.conv_spec(
        n_power_iterations, eps,
        coeff=coeff, atol=atol, rtol=rtol, max_iterations=max_iterations, num_svs=num_svs,
    )
    _spec.check_seed(seed)
    _check_track_sigma(track_sigma)
    _check_is_module(module, "spectral_norm_conv")
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        raise TypeError(
            "Expected module to be a torch.nn.Conv1d, Conv2d or Conv3d, but got "
            f"{type(module).__name__} (use spectral_norm for other layers)"
        )
    weight = _target_weight(module, name)
    if module.padding_mode != "zeros":
        raise NotImplementedError(
            f"spectral_norm_conv supports padding_mode='zeros' only, but the layer has "
            f"padding_mode={module.padding_mode!r}"
        )
    kernel_shape = (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
    if tuple(weight.shape) != kernel_shape:
        raise ValueError(
            f"Expected {name!r} to have the layer's kernel shape {list(kernel_shape)}, but its "
            f"shape is {list(weight.shape)}"
        )
    spatial = len(module.kernel_size)
    if (
        not isinstance(input_shape, (tuple, list, torch.Size))
        or len(input_shape) != spatial + 1
        or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in input_shape)
        or input_shape[0] != module.in_channels
    ):
        raise ValueError(
            f"Expected input_shape to be {spatial + 1} positive ints (channels={module.in_channels}, "
            f"then {spatial} spatial size(s); no batch axis), but got input_shape={input_shape!r}"
        )
    geometry = ConvGeometry(module, tuple(int(n) for n in input_shape))
    _spec.check_num_svs(sn_spec.num_svs, math.prod(geometry.output_shape), math.prod(geometry.input_shape))

    s = _spec.next_seed(seed)
    return _register(module, name, weight, SpectralNormConv(weight, geometry, sn_spec, s, track_sigma))


def _require(module: nn.Module, name: str, function: str):
    _check_is_module(module, function)
    _spec.check_name(name)
    found = _find(module, name)
    if found is None:
        raise ValueError(f"Expected a dualsn spectral norm on name={name!r}, but {type(module).__name__} has none")
    return found


def remove_spectral_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Remove dualsn's spectral norm from ``module.<name>`` and return ``module``.

    ``module.<name>`` becomes a plain, fresh leaf Parameter (a buffer if it was one) holding
    W / sigma (W / max(1, sigma / coeff) with ``coeff``) with the current u, v: no power
    iteration runs, in either mode. Being a new tensor, it must be given to the optimizer
    again. All the spectral norm's state goes. ValueError if there is no dualsn spectral
    norm on ``name``; RuntimeError if other parametrizations share it.
    """
    plist, _, sn = _require(module, name, "remove_spectral_norm")
    if len(plist) != 1:
        raise RuntimeError(
            f"Cannot remove the spectral norm from {name!r} while other parametrizations are "
            "registered on it; remove those first (torch.nn.utils.parametrize.remove_parametrizations)"
        )
    original = plist.original
    with torch.no_grad():
        normalized = sn._compute(original, training=False)[0].detach().clone()
    was_parameter = isinstance(original, nn.Parameter)
    parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    delattr(module, name)
    if was_parameter:
        module.register_parameter(name, nn.Parameter(normalized, requires_grad=original.requires_grad))
    else:
        module.register_buffer(name, normalized)
    return module


def sigma(module: nn.Module, name: str = "weight") -> float:
    """The current sigma of ``module.<name>``'s spectral norm, as a float (real part).

    No power iteration runs: it is u^H M v with the current u, v (the W-matrix, or the
    convolution of :func:`spectral_norm_conv`), taken from the last forward when W, u and v
    have not changed since (free), else computed. For a weight normalized exactly it is
    max(||W||, eps).

    Example::

        >>> layer = spectral_norm(nn.Linear(20, 10), seed=0)
        >>> sigma(layer) > 0
        True
    """
    plist, index, sn = _require(module, name, "sigma")
    with torch.no_grad():
        return float(sn.sigma(_sn_input(plist, index)).real.item())


def singular_values(module: nn.Module, name: str = "weight") -> list[float]:
    """The singular-value estimates u_i^H M v_i of ``module.<name>``'s spectral norm, from
    the current state (no iteration), as floats (real parts): ``sigma`` first, then one per
    extra pair of ``num_svs``. Without extra pairs, a one-element list.

    Example::

        >>> layer = spectral_norm(nn.Linear(20, 10), num_svs=2, seed=0)
        >>> len(singular_values(layer))
        2
    """
    plist, index, sn = _require(module, name, "singular_values")
    return sn.singular_values(_sn_input(plist, index))


# ---------------------------------------------------------------------------------------------
# Patching the built-ins: existing code builds dualsn's spectral norm without being edited.
# The machinery (Patch) is dualsn.patching's; each backend patches only its own framework.


def _builtin_replacement(compat: str, defaults: dict):
    """A function with the torch built-ins' signature that registers dualsn's spectral norm."""

    def spectral_norm_(module, name="weight", n_power_iterations=1, eps=1e-12, dim=None):
        return spectral_norm(module, name, n_power_iterations, eps, dim, compat=compat, **defaults)

    spectral_norm_.__name__ = spectral_norm_.__qualname__ = "spectral_norm"
    spectral_norm_.__doc__ = f"dualsn.torch.spectral_norm with compat={compat!r}, installed by dualsn.torch.patch."
    return spectral_norm_


def patch(compat: str | None = None, **defaults) -> Patch:
    """Make torch's spectral-norm functions build dualsn's spectral norm; returns a :class:`Patch`.

    Replaced: ``torch.nn.utils.parametrizations.spectral_norm`` (preset ``compat``, default
    ``"torch"``) and the older ``torch.nn.utils.spectral_norm`` (also under
    ``torch.nn.utils.spectral_norm.spectral_norm``; preset ``compat``, default
    ``"torch_legacy"``). So without ``compat`` each call keeps its built-in's algorithm. The
    replacements take the built-ins' arguments ``(module, name="weight",
    n_power_iterations=1, eps=1e-12, dim=None)`` and forward them, with ``compat`` and
    ``defaults`` (keyword-only options of :func:`spectral_norm`: ``seed``, ``coeff``,
    ``atol``, ``rtol``, ``max_iterations``, ``num_svs``, ``track_sigma``). Seeding through
    :func:`dualsn.manual_seed` works as usual.

    Use it as a context manager, or call it and later ``undo()`` (idempotent); either way the
    exact original function objects come back, and nested patches unwind in order. Names bound
    before the patch (``from torch.nn.utils.parametrizations import spectral_norm`` at import
    time) keep the built-in: build the model (or import its module) inside the patch.

    A bad ``compat`` (ValueError) or option (TypeError, ValueError) is refused before anything
    is patched.

    Example::

        >>> with patch():
        ...     layer = torch.nn.utils.parametrizations.spectral_norm(nn.Linear(4, 3))
        >>> is_spectral_norm(layer)
        True
    """
    modern = "torch" if compat is None else compat
    legacy = "torch_legacy" if compat is None else compat
    check_patch_arguments((modern, legacy), defaults)
    modern_fn = _builtin_replacement(modern, defaults)
    legacy_fn = _builtin_replacement(legacy, defaults)
    utils = importlib.import_module("torch.nn.utils")
    replacements = [(_parametrizations, "spectral_norm", modern_fn), (utils, "spectral_norm", legacy_fn)]
    if hasattr(_legacy, "spectral_norm"):  # the function inside the module it shadows
        replacements.append((_legacy, "spectral_norm", legacy_fn))
    compat_of = {
        "torch.nn.utils.parametrizations.spectral_norm": modern,
        "torch.nn.utils.spectral_norm": legacy,
    }
    return Patch(replacements, compat_of)


# ---------------------------------------------------------------------------------------------
# Diagnostics


def report(module: nn.Module):
    """The per-layer sigma report of ``module`` (a :class:`dualsn.report.SNReport`).

    One row per spectral norm in the module (dualsn's and the torch built-ins): the sigma
    estimate against the exact largest singular value of the W-matrix (SVD), and products
    that bound the Lipschitz constant of a plain chain of layers (for convolutions only a
    heuristic: the reshaped-kernel sigma is not the operator norm). Changes nothing. See
    :func:`dualsn.report.report`.
    """
    from dualsn import report as _report

    return _report.report(module)
