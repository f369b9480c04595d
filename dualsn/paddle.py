"""Spectral normalization for PaddlePaddle layers, following :mod:`dualsn.spec` exactly.

Like ``paddle.nn.utils.spectral_norm`` this is a forward-pre-hook: the trainable weight
lives in ``<name>_orig``, the power-iteration vectors in the persistable buffers ``<name>_u``
and ``<name>_v`` (the built-in's own keys, so its checkpoints load unchanged), and before
every forward the hook writes the normalized weight to the plain attribute ``<name>``.
Unlike the built-in, ``<name>`` holds the normalized weight from registration on, the
algorithm (update order, warm-up, 1-D handling) comes from the chosen ``compat`` preset, and
a ``seed`` gives u, v that are bit-identical to ``dualsn.torch``'s.

It is also several times faster on CPU (see the comment below the imports): W is never
copied or transposed, sigma is read off the power iteration, the gradient's rank-1 term is
added in place by a tensor hook (into the gradient tensor that this normalization's own
backward has just made), and an eval forward reuses the normalized weight while W, u and v
are unchanged. :func:`plain_path` switches all of that off, for the differential tests. Results differ from
the built-in's only in the last bits (sigma and W / sigma are rounded differently).

Lipschitz toolkit (opt-in, the same as in ``dualsn.torch``; the default path is unchanged):
``coeff`` (soft bound: W / max(1, sigma / coeff)), ``atol``/``rtol`` (training forwards
iterate until sigma settles; ``SpectralNormHook.last_iterations``), ``num_svs`` (several
singular values, :func:`singular_values`), ``track_sigma`` (sigma in the state dict as
``<name>_sigma``), and :func:`spectral_norm_conv`, the operator norm of a convolution rather
than of its reshaped kernel. :func:`sigma` returns the last forward's sigma while W, u and v
are unchanged, without a pass over W.

This module imports paddle (and numpy, dualsn.spec) and no other framework.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math

import numpy as np

try:
    import paddle
except ModuleNotFoundError as _error:
    if _error.name != "paddle":
        raise
    raise ModuleNotFoundError(
        'dualsn.paddle needs PaddlePaddle, which is not installed: pip install "dualsn[paddle]"', name="paddle"
    ) from _error
import paddle.nn.functional as F

from dualsn import spec as _spec
from dualsn.patching import Patch, check_patch_arguments

__all__ = [
    "SpectralNormHook",
    "SpectralNormConvHook",
    "spectral_norm",
    "spectral_norm_conv",
    "remove_spectral_norm",
    "sigma",
    "singular_values",
    "report",
    "is_spectral_norm",
    "get_spectral_norm",
    "invalidate_cache",
    "plain_path",
    "patch",
    "Patch",
]


# ---------------------------------------------------------------------------------------------
# Why the code below looks the way it does (measured on CPU, one thread, W 2048 x 2048):
# every new W-sized tensor costs far more than a pass over W (Paddle's CPU allocator maps
# fresh pages for it: W / s, W.clone() and addmm take 10-20 ms, W.scale_() 0.5 ms, a W v
# product 0.6-0.8 ms), paddle.mv materializes a transposed W^T, and a broadcasting divide by
# a 0-D tensor is slow even into a preallocated output. So the W-matrix is only ever a view
# of the stored weight, products use matmul's transpose flag, sigma comes from the last
# product of the power iteration, W / sigma is one scale, and the gradient's rank-1 term is
# one in-place addmm_: a training step allocates two W-sized tensors (W / sigma, and the
# gradient) besides the plain layer's own, an eval forward with
# an unchanged weight none.


_COMPLEX_DTYPES = (paddle.complex64, paddle.complex128)


def _is_complex(x) -> bool:
    return x.dtype in _COMPLEX_DTYPES  # paddle.is_complex costs a few microseconds more


_LOW_PRECISION = tuple(getattr(paddle, name) for name in _spec.LOW_PRECISION_DTYPES)


def _compute_dtype(dtype):
    """The dtype of u, v and of all spectral-norm math for a weight of ``dtype``: float32 for
    float16 / bfloat16 weights (a unit vector in half precision holds ~3 digits, and Paddle's
    CPU matmul has no half-precision kernels; see docs/training.md), else ``dtype``."""
    return paddle.float32 if dtype in _LOW_PRECISION else dtype


def _upcast(weight):
    """``weight`` in :func:`_compute_dtype` (a float32 copy of a half-precision weight)."""
    return weight.astype(paddle.float32) if weight.dtype in _LOW_PRECISION else weight


def _amp_off():
    """A context with paddle.amp.auto_cast off (a no-op one when it already is): on a GPU,
    level O1 would run the power iteration's matmuls, and the norms read off them, in
    float16. (Paddle 3.3.1's auto_cast does nothing on the CPU.)"""
    if paddle.is_autocast_enabled():
        return paddle.amp.auto_cast(enable=False)
    return contextlib.nullcontext()


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


def _inverse(value: float) -> float:
    """1 / value; +-inf for a zero (as dividing by it would give: W / 0 is inf or nan, not
    a Python ZeroDivisionError)."""
    x = float(value)
    return 1.0 / x if x != 0.0 else math.copysign(math.inf, x)


def _scalar(value, like):
    """A Python number as a 0-D tensor of ``like``'s dtype and place (complex arithmetic
    with bare Python scalars would go through Paddle's type promotion)."""
    return paddle.to_tensor(value, dtype=like.dtype, place=like.place)


def _prod(values) -> int:
    return math.prod(int(x) for x in values)


class WeightMatrix:
    """The W-matrix of a weight (``dim`` moved to the front, the rest flattened) as a view of
    the weight's own storage: products with it never copy W.

    With ``a`` the product of the axes before ``dim``, ``h`` the size of ``dim`` and ``b`` the
    product of the axes after it, the stored weight is an ``[a, h, b]`` block and:

    * ``"rows"`` (a == 1, e.g. dim 0): the view ``[h, b]`` *is* the W-matrix;
    * ``"cols"`` (b == 1, e.g. ``paddle.nn.Linear``'s dim 1): the view ``[a, h]`` is its
      transpose, which matmul's transpose flag reads in place;
    * ``"batched"`` (a middle axis, e.g. a transposed conv's dim 1): ``[a, h, b]``, and the
      products are batched over ``a``.
    """

    def __init__(self, weight, dim: int) -> None:
        shape = list(weight.shape)
        self.weight, self.shape = weight, shape
        self.a, self.h, self.b = _prod(shape[:dim]), int(shape[dim]), _prod(shape[dim + 1 :])
        self.complex = _is_complex(weight)
        if self.a == 1:
            self.kind, self.view = "rows", weight.reshape([self.h, self.b])
        elif self.b == 1:
            self.kind, self.view = "cols", weight.reshape([self.a, self.h])
        else:
            self.kind, self.view = "batched", weight.reshape([self.a, self.h, self.b])

    def mv(self, v):
        """W v (``v`` has a * b entries), an h-vector."""
        if self.kind == "rows":
            return paddle.matmul(self.view, v)
        if self.kind == "cols":
            return paddle.matmul(self.view, v, transpose_x=True)
        per_block = paddle.matmul(self.view, v.reshape([self.a, self.b, 1]))  # [a, h, 1]
        return per_block.sum(axis=0).reshape([self.h])

    def mhv(self, u):
        """W^H u, an (a * b)-vector. For complex W it is conj(W^T conj(u)): only vectors are
        conjugated, never W."""
        x = paddle.conj(u) if self.complex else u
        if self.kind == "rows":
            out = paddle.matmul(self.view, x, transpose_x=True)
        elif self.kind == "cols":
            out = paddle.matmul(self.view, x)
        else:
            out = paddle.matmul(x.reshape([1, 1, self.h]), self.view).reshape([self.a * self.b])
        return paddle.conj(out) if self.complex else out

    def outer_factors(self, u, v):
        """(left, right) whose (batched) matrix product is u v^H in the view's layout."""
        vh = paddle.conj(v) if self.complex else v
        if self.kind == "rows":
            return u.unsqueeze(1), vh.unsqueeze(0)
        if self.kind == "cols":  # (u v^H)^T = conj(v) u^T
            return vh.unsqueeze(1), u.unsqueeze(0)
        left = u.reshape([1, self.h, 1]).expand([self.a, self.h, 1])
        return left, vh.reshape([self.a, 1, self.b])


_CONV_FUNCTIONS = {
    1: (F.conv1d, F.conv1d_transpose, "NCL"),
    2: (F.conv2d, F.conv2d_transpose, "NCHW"),
    3: (F.conv3d, F.conv3d_transpose, "NCDHW"),
}


def _padding_pairs(padding, spatial: int, channel_last: bool):
    """A convolution layer's ``padding`` as (before, after) per spatial axis, or the string
    "SAME" / "VALID": the forms Paddle's convolutions accept (an int, one int per axis, two
    per axis, or one pair per axis of the data layout, batch and channel included)."""
    if isinstance(padding, str):
        return padding.upper()
    if isinstance(padding, (int, np.integer)):
        return [(int(padding), int(padding))] * spatial
    padding = list(padding)
    if len(padding) == spatial + 2 and all(isinstance(p, (list, tuple)) for p in padding):
        pairs = padding[1:-1] if channel_last else padding[2:]
        return [(int(a), int(b)) for a, b in pairs]
    if len(padding) == 2 * spatial:
        return [(int(padding[2 * i]), int(padding[2 * i + 1])) for i in range(spatial)]
    if len(padding) == spatial:
        return [(int(p), int(p)) for p in padding]
    raise NotImplementedError(f"spectral_norm_conv does not understand the layer's padding={padding!r}")


class ConvGeometry:
    """What the operator x -> conv(x, W) of one sample needs from a convolution layer.

    ``input_shape`` / ``output_shape``: one sample's activation shapes, channels first (no
    batch axis), whatever the layer's ``data_format`` (its kernel layout is the same). The
    convolution pads explicitly by ``pads`` (before, after) per spatial axis; Paddle's "SAME"
    padding is resolved here as Paddle does it (and, as Paddle does, with dilation 1). The
    adjoint is the transposed convolution with padding 0, whose output is the *padded*
    input, cropped back to ``input_shape`` (the adjoint of zero padding is a crop);
    ``output_padding`` (< stride) makes it return exactly the padded size.
    """

    __slots__ = ("spatial", "stride", "dilation", "groups", "pads", "input_shape", "output_shape",
                 "output_padding")

    def __init__(self, layer, input_shape: tuple[int, ...]) -> None:
        kernel = [int(k) for k in layer._kernel_size]
        spatial = len(kernel)
        self.spatial, self.groups = spatial, int(layer._groups)
        self.stride = [int(x) for x in layer._stride]
        self.dilation = [int(x) for x in layer._dilation]
        self.input_shape = tuple(int(n) for n in input_shape)
        channel_last = layer._data_format in ("NLC", "NHWC", "NDHWC")
        padding = _padding_pairs(layer._padding, spatial, channel_last)
        if padding == "SAME":
            self.dilation = [1] * spatial  # Paddle's SAME padding ignores the dilation
        pads, out_sizes, output_padding = [], [], []
        for i in range(spatial):
            n, s = self.input_shape[1 + i], self.stride[i]
            reach = self.dilation[i] * (kernel[i] - 1)  # the kernel's extent minus one
            if padding == "SAME":
                total = max((-(-n // s) - 1) * s + reach + 1 - n, 0)
                before, after = total // 2, total - total // 2
            elif padding == "VALID":
                before = after = 0
            else:
                before, after = padding[i]
            padded = n + before + after
            size = (padded - reach - 1) // s + 1
            if size < 1:
                raise ValueError(
                    f"Expected input_shape to be large enough for the kernel, but spatial axis {i} of "
                    f"input_shape={list(self.input_shape)} is {n} (padded: {padded}) and the dilated "
                    f"kernel spans {reach + 1}"
                )
            pads += [before, after]
            out_sizes.append(size)
            output_padding.append(padded - ((size - 1) * s + reach + 1))
        self.pads = pads
        self.output_shape = (int(layer._out_channels), *out_sizes)
        self.output_padding = output_padding


class ConvOperator:
    """The convolution of one sample as a linear map M x = conv(x, W) (no bias) from the input
    activation space to the output one, and its adjoint M^T y = conv_transpose(y, W) cropped:
    the ``op`` of :func:`_step`, on tensors of ``input_shape`` / ``output_shape``.

    Its largest singular value is the convolution's operator norm (its Lipschitz constant in
    the 2-norm), which the reshaped-kernel sigma of :func:`spectral_norm` is not.
    """

    __slots__ = ("weight", "geometry")

    def __init__(self, weight, geometry: ConvGeometry) -> None:
        self.weight, self.geometry = weight, geometry

    def mv(self, x):
        """M x for ``x`` of ``input_shape``: the convolution, of ``output_shape``."""
        g = self.geometry
        conv, _, layout = _CONV_FUNCTIONS[g.spatial]
        out = conv(x.unsqueeze(0), self.weight, None, stride=g.stride, padding=g.pads,
                   dilation=g.dilation, groups=g.groups, data_format=layout)
        return out.squeeze(0)

    def mhv(self, y):
        """M^T y for ``y`` of ``output_shape``: the transposed convolution, of ``input_shape``."""
        g = self.geometry
        _, conv_t, layout = _CONV_FUNCTIONS[g.spatial]
        x = conv_t(y.unsqueeze(0), self.weight, None, stride=g.stride, padding=0,
                   output_padding=g.output_padding, dilation=g.dilation, groups=g.groups,
                   data_format=layout)
        starts = g.pads[0::2]
        ends = [b + n for b, n in zip(starts, g.input_shape[1:])]
        return paddle.slice(x, list(range(2, 2 + g.spatial)), starts, ends).squeeze(0)


_NUMPY_REAL = {paddle.float32: np.float32, paddle.float64: np.float64, paddle.complex64: np.float32, paddle.complex128: np.float64}
_FLOAT_MAX = {dtype: float(np.finfo(real).max) for dtype, real in _NUMPY_REAL.items()}


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
        return None  # restarted: sigma is no longer r^2 / max(r, eps), see _sigma_from_norm
    target.copy_(y, False)
    target.scale_(1.0 / max(norm, eps))  # also bumps target's inplace version
    return norm


def _flat(x):
    """A 1-D view of ``x`` (``x`` itself when it is 1-D already: no new tensor object)."""
    return x if x.ndim == 1 else x.reshape([-1])


def _orthogonalize(x, basis):
    """``x`` minus its projections on the orthonormal vectors of ``basis``, one after the
    other (Gram-Schmidt, as ``dualsn.spec.power_step``); any shape, ``x``'s kept."""
    flat = _flat(x)
    for b in basis:
        b = _flat(b)
        flat = flat - _vdot(b, flat) * b
    return flat.reshape(x.shape) if x.ndim != 1 else flat


def _step(op, u, v, extra_u, extra_v, order: str, eps: float, recovery=(None, None)) -> float:
    """One power iteration on every (u, v) pair, in place (``dualsn.spec.power_step``).

    ``op`` has ``mv`` (x -> M x) and ``mhv`` (y -> M^H y): a :class:`WeightMatrix` or a
    :class:`ConvOperator`. ``u``, ``v`` are pair 0, the plain iteration; the rows of
    ``extra_u``, ``extra_v`` (or None) are the extra pairs of ``num_svs``, each made
    orthogonal to the pairs before it. ``recovery`` = (u, v) pair 0 restarts from instead
    of becoming zero. Returns the norm of pair 0's last vector before normalization, the
    sigma estimate (see :func:`_sigma_from_norm`).
    """
    rec_u, rec_v = recovery
    if order == "uv":
        _normalize_into(op.mv(v), u, eps, rec_u)
        norm = _normalize_into(op.mhv(u), v, eps, rec_v)
    else:
        _normalize_into(op.mhv(u), v, eps, rec_v)
        norm = _normalize_into(op.mv(v), u, eps, rec_u)
    if extra_u is not None:
        us, vs = [u], [v]  # the pairs already updated in this step
        for i in range(int(extra_u.shape[0])):
            ui, vi = extra_u[i], extra_v[i]  # views: the writes land in the buffers
            if order == "uv":
                _normalize_into(_orthogonalize(op.mv(vi), us), ui, eps)
                _normalize_into(_orthogonalize(op.mhv(ui), vs), vi, eps)
            else:
                _normalize_into(_orthogonalize(op.mhv(ui), vs), vi, eps)
                _normalize_into(_orthogonalize(op.mv(vi), us), ui, eps)
            us.append(ui)
            vs.append(vi)
    return norm


def _in_precision(value, dtype):
    """A host number rounded to ``dtype``'s precision, as a tensor computation would give it
    (a float32 sigma of 1e-59 is zero, and then the divisor's floor applies)."""
    if value is not None and dtype in (paddle.float32, paddle.complex64):
        return complex(np.complex64(value)) if isinstance(value, complex) else float(np.float32(value))
    return value


def _sigma_from_norm(norm: float | None, eps: float) -> float | None:
    """sigma = u^H M v after a step, from the norm r of its last vector before normalization:

    * order "uv" ends with v = N(y), y = M^H u, and u^H M v = y^H v = r^2 / max(r, eps);
    * order "vu" ends with u = N(y), y = M v, and u^H M v = u^H y, the same number.

    So sigma costs no further pass over W (nor a dot), whatever the clamp to eps did. After a
    restart from the recovery vectors (``norm`` None) it does not hold: None, and the caller
    computes u^H M v.
    """
    return None if norm is None else norm * (norm / max(norm, eps))


def _power_iteration_(
    mat: WeightMatrix, u, v, n: int, order: str, eps: float, extra_u=None, extra_v=None, recovery=(None, None)
):
    """``n`` power iterations, writing into u and v (and the extra pairs) in place: their
    identity is kept, so buffers shared between replicas see the update. Returns sigma =
    u^H M v for the new u, v as a float, read off the last product (None when n == 0)."""
    norm = None
    with paddle.no_grad():
        for _ in range(n):
            norm = _step(mat, u, v, extra_u, extra_v, order, eps, recovery)
    return None if norm is None else _sigma_from_norm(norm, eps)


def _training_steps(op, vectors, spec: _spec.Spec, recovery=(None, None)):
    """The power iterations of one training forward (``dualsn.spec.training_iterations``), in
    place on ``vectors`` = (u, v, extra_u, extra_v); returns (sigma, count).

    Without ``atol``/``rtol``: ``spec.n_power_iterations`` steps. With them: steps until the
    sigma estimate (pair 0's last norm) settles against the previous one
    (:meth:`dualsn.spec.Spec.settled`), after at least max(2, n_power_iterations) steps and at
    most ``spec.max_iterations``.
    """
    if not spec.uses_tolerance:
        return _power_iteration_(op, *vectors[:2], spec.n_power_iterations, spec.order, spec.eps,
                                 *vectors[2:], recovery), spec.n_power_iterations
    previous, count = None, 0
    with paddle.no_grad():
        while count < spec.max_iterations:
            norm = _step(op, *vectors, spec.order, spec.eps, recovery)
            count += 1
            if count >= spec.n_power_iterations and None not in (previous, norm) and spec.settled(previous, norm):
                break
            previous = norm
    return _sigma_from_norm(norm, spec.eps), count


def _sigma(mat: WeightMatrix, u, v, twice_differentiable: bool = False):
    """sigma = u^H M v as a 0-D tensor, one pass over W (differentiable in W when grad is
    enabled); ``mat`` may also be a :class:`ConvOperator`."""
    return _vdot(_flat(u), _flat(mat.mv(v)), twice_differentiable)


def _sigma_value(mat: WeightMatrix, u, v):
    """sigma = u^H W v as a Python float (complex for a complex W)."""
    with paddle.no_grad():
        return _sigma(mat, u, v).item()


# ---------------------------------------------------------------------------------------------
# W / sigma and its gradient.
#
# Autograd sees W -> W * (1 / sigma) with sigma a constant: one cheap op, whose backward
# gives G / conj(sigma). The rest of the gradient, -<W_sn, G> u v^H / conj(sigma) (u, v
# held constant, spec.normalized_weight_grad), is added by a tensor hook on a private view
# of W, in place on the gradient that op's backward has just produced (it is ours alone).
# No paddle.autograd.PyLayer: in Paddle 3.3 a PyLayer drops its context after its first
# backward, so a second backward through a graph kept with retain_graph=True crashes.


def _private_view(weight):
    """A view of ``weight`` (no copy) that is a node of its own in the autograd graph, so a
    hook on it sees exactly the gradient flowing through this normalization. (A reshape to
    the same shape would alias ``weight`` itself, and a hook on it would stay on W.)"""
    return weight.unsqueeze(0).squeeze(0)


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
        mat, weight = self.mat, self.mat.weight
        # <W_sn, G> = <W, grad>, and the correction is -(<W, grad> / conj(sigma)) u v^H.
        if mat.complex:
            c = _vdot(weight.flatten(), grad.flatten()).item() / np.conj(self.sigma)
            left, right = mat.outer_factors(self.u, self.v)
            return grad - (_scalar(c, grad) * (left * right)).reshape(mat.shape)
        k = -paddle.matmul(weight.flatten(), grad.flatten()).item() * _inverse(self.sigma)
        left, right = mat.outer_factors(self.u, self.v)
        update = grad.reshape(mat.view.shape)
        # unit coefficients: addmm_'s alpha, beta are float32, too coarse for float64 weights;
        # the factor goes into the small left vector (paddle.scale takes a double).
        fused = update.baddbmm_ if mat.kind == "batched" else update.addmm_
        fused(paddle.scale(left, k), right, beta=1.0, alpha=1.0)
        return grad

    def differentiable(self, grad):
        mat = self.mat
        s0 = _scalar(np.conj(self.sigma), grad)
        s = paddle.conj(_sigma(mat, self.u, self.v, twice_differentiable=True))
        # reshape, not flatten: flatten's gradient has no gradient of its own
        c = _vdot(mat.weight.reshape([-1]), grad.reshape([-1]), twice_differentiable=True)
        left, right = mat.outer_factors(self.u, self.v)
        rank_one = (left * right).reshape(mat.shape)
        return grad * (s0 / s) - (s0 * c / (s * s)) * rank_one


class _VectorGradHook(_GradHook):
    """grad = G / n0 in (n0 = max(||W||, eps)), spec.normalized_weight_grad out:
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


_PLAIN = False
"""Set by :func:`plain_path`: every forward takes :func:`_plain_normalized_weight`."""


@contextlib.contextmanager
def plain_path(enabled: bool = True):
    """A context in which every dualsn.paddle spectral norm takes its *plain* path: the power
    iteration and W / sigma through ordinary Paddle ops, Paddle's autograd deriving the whole
    gradient (sigma = u^H W v differentiated with u, v held constant), no gradient hooks, no
    host-side sigma, no eval cache. Same results up to rounding; slower.

    A testing aid: the differential harness (``conformance.differential``) runs every model
    through both paths and compares them. Nested uses restore the previous setting.
    """
    global _PLAIN
    previous, _PLAIN = _PLAIN, bool(enabled)
    try:
        yield
    finally:
        _PLAIN = previous


def normalized_weight(weight, u, v, dim: int, spec: _spec.Spec, do_power_iteration: bool):
    """W / sigma(W) (W / max(1, sigma / coeff) with ``spec.coeff``), iterating u, v in place
    first when ``do_power_iteration`` (``spec.n_power_iterations`` steps, or until sigma
    settles with ``spec.atol``/``spec.rtol``).

    ``u is None`` means an exact 1-D weight: W / max(||W||, eps), no state. When autograd
    needs a graph, the gradient is completed by :class:`_MatrixGradHook` /
    :class:`_VectorGradHook`.
    """
    return _normalized_weight(weight, (u, v, None, None), dim, spec, do_power_iteration)[0]


def _bound_inactive(spec: _spec.Spec, sigma) -> bool:
    """True when ``coeff``'s soft bound leaves the weight as it is (divisor 1, gradient G)."""
    return spec.coeff is not None and not np.real(sigma) > spec.coeff


def _normalized_weight(weight, vectors, dim: int, spec: _spec.Spec, do_power_iteration: bool, recovery=(None, None)):
    """:func:`normalized_weight` with the extra pairs of ``num_svs``: ``vectors`` = (u, v,
    extra_u, extra_v), and the ``recovery`` (u, v) of ``dualsn.spec.recovery_uv``. Returns
    (normalized weight, sigma as a number, power iterations run); sigma is None in a static
    graph (no host values there)."""
    u, v = vectors[0], vectors[1]
    if weight.dtype in _LOW_PRECISION:
        # All the math in float32 (u, v are float32 too), the result cast back; autograd
        # carries the gradient through both casts.
        wide, sigma, count = _normalized_weight(
            weight.astype(paddle.float32), vectors, dim, spec, do_power_iteration, recovery
        )
        return wide.astype(weight.dtype), sigma, count
    if _PLAIN or not paddle.in_dynamic_mode():
        return _plain_normalized_weight(weight, vectors, dim, spec, do_power_iteration, recovery)
    if u is None:
        return _exact_normalized_weight(weight, spec, do_power_iteration)
    mat = WeightMatrix(weight, dim)
    sigma, count = None, 0
    if do_power_iteration:
        sigma, count = _training_steps(mat, vectors, spec, recovery)
        sigma = _in_precision(sigma, weight.dtype)
    if sigma is None:
        sigma = _sigma_value(mat, u, v)
    divisor = spec.divisor(sigma)  # sigma itself without coeff (eps where it is zero)
    if not _needs_graph(weight):
        with paddle.no_grad():
            return _scaled(weight, divisor), sigma, count
    if _bound_inactive(spec, sigma):
        return _scaled(weight, 1.0), sigma, count  # W itself: the gradient passes unchanged
    if spec.sigma_floored(sigma):
        return _scaled(weight, divisor), sigma, count  # W / eps: a constant divisor, gradient G / eps
    private = _private_view(weight)
    # With coeff the hook's correction is the same (in terms of the gradient it receives,
    # G / conj(divisor)): see spec.normalized_weight_grad. u, v are clones: a second forward
    # (D(real), then D(fake)) updates the buffers in place before this backward runs.
    private.register_hook(_MatrixGradHook(mat, u.clone(), v.clone(), sigma))
    return _scaled(private, divisor), sigma, count


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
    if _bound_inactive(spec, n0):
        return _scaled(weight, 1.0), n0, 0  # W itself: the gradient passes unchanged
    private = _private_view(weight)
    private.register_hook(_VectorGradHook(weight, spec.eps, norm))
    return _scaled(private, spec.divisor(n0)), n0, 0


# ---------------------------------------------------------------------------------------------
# The plain path: the fast path's twin, ordinary ops only, for static graphs
# (paddle.jit.to_static) and for the differential harness (plain_path()).


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
    """One :func:`dualsn.spec.power_step` with ordinary ops; returns the new (us, vs) and the
    norm of pair 0's last vector before normalization (a 0-D tensor). Nothing is written."""
    u, v, extra_u, extra_v = vectors
    pairs = [(u, v)] + ([] if extra_u is None else [(extra_u[i], extra_v[i]) for i in range(int(extra_u.shape[0]))])
    new_us, new_vs, first_norm = [], [], None
    for ui, vi in pairs:
        rec_u, rec_v = recovery if not new_us else (None, None)
        if order == "uv":
            ui, _ = _plain_normalize(_orthogonalize(op.mv(vi), new_us), eps, rec_u)
            vi, norm = _plain_normalize(_orthogonalize(op.mhv(ui), new_vs), eps, rec_v)
        else:
            vi, _ = _plain_normalize(_orthogonalize(op.mhv(ui), new_vs), eps, rec_v)
            ui, norm = _plain_normalize(_orthogonalize(op.mv(vi), new_us), eps, rec_u)
        first_norm = norm if first_norm is None else first_norm
        new_us.append(ui)
        new_vs.append(vi)
    return new_us, new_vs, first_norm


def _store_pairs(vectors, new_us, new_vs) -> None:
    """Write a plain step's vectors into the buffers (their identity is kept)."""
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
    previous, count = None, 0
    with paddle.no_grad():
        while count < (spec.max_iterations if spec.uses_tolerance else spec.n_power_iterations):
            new_us, new_vs, norm = _plain_step(op, vectors, spec.order, spec.eps, recovery)
            if dynamic:
                norm = float(norm)
                _spec.check_finite_sigma(norm)
            _store_pairs(vectors, new_us, new_vs)
            count += 1
            if spec.uses_tolerance:
                if count >= spec.n_power_iterations and previous is not None and spec.settled(previous, norm):
                    break
                previous = norm
        return count


def _plain_divide(weight, op, u, v, spec: _spec.Spec):
    """(W / divisor(sigma), sigma) with sigma = u^H M v recorded by autograd, u and v held
    constant (clones: a later forward updates the buffers in place)."""
    sigma = _vdot(_flat(u.clone()), _flat(op.mv(v.clone())), twice_differentiable=True)
    return weight / _unfused_divisor(sigma, spec), sigma


def _host_sigma(sigma):
    """sigma as a Python number in dynamic mode, None in a static graph (no host values)."""
    return sigma.item() if paddle.in_dynamic_mode() else None


def _plain_normalized_weight(weight, vectors, dim: int, spec: _spec.Spec, do_power_iteration: bool, recovery=(None, None)):
    """:func:`_normalized_weight` through ordinary ops only: Paddle's autograd derives the
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
    if spec.coeff is None:
        # not sigma == 0: Paddle's float equality holds for |sigma| < 1e-15
        nonzero = paddle.abs(sigma) > 0
        return paddle.where(nonzero, sigma, _scalar(spec.eps, sigma))
    active = (paddle.real(sigma) if _is_complex(sigma) else sigma) > spec.coeff
    return paddle.where(active, sigma / _scalar(spec.coeff, sigma), paddle.ones_like(sigma))


# ---------------------------------------------------------------------------------------------
# The eval cache.


_FULL_CHECK_SIZE = 1 << 16
"""Weights up to this many entries are compared in full by the eval cache; larger ones by
a sample (see :func:`_sample_step`)."""

_SAMPLE_BLOCKS, _BLOCK_LENGTH = 16, 256


def _sample_step(weight) -> int | None:
    """Where the eval cache samples ``weight`` (None: it compares all entries).

    All entries of a small weight. Of a large one, ``_SAMPLE_BLOCKS`` blocks of
    ``_BLOCK_LENGTH`` consecutive entries of the flattened storage, starting every ``step``
    entries, with ``step`` coprime with the stored row length so that the blocks fall in
    different rows and column ranges. Few contiguous blocks rather than many scattered
    entries because W is cold in cache after the layer's own pass over the normalized
    weight: the cost is in the pages and cache lines touched.
    """
    n = _prod(weight.shape)
    if n <= _FULL_CHECK_SIZE:
        return None
    cols = n // int(weight.shape[0])
    step = n // _SAMPLE_BLOCKS
    while np.gcd(step, cols) != 1:
        step -= 1
    return step


def _host_view(t):
    """A numpy array on ``t``'s memory (no copy) when it can have one (CPU, a dtype numpy
    has), else None. Reading the cache's samples through it avoids a Paddle op per check."""
    if not t.place.is_cpu_place():
        return None
    try:
        return np.from_dlpack(t.detach())
    except (BufferError, RuntimeError, TypeError, ValueError):
        return None


class _Watched:
    """One tensor the eval cache depends on: the object, where its memory is, its inplace
    version, and a copy of (a sample of) its entries."""

    __slots__ = ("tensor", "key", "step", "view", "gather_index", "sample")

    def __init__(self, tensor, step: int | None = None) -> None:
        self.tensor = tensor
        self.key = self._key(tensor)
        self.step = step  # see _sample_step; None: all entries
        self.view = _host_view(tensor)
        self.gather_index = None
        if self.view is not None:
            self.view = self.view.reshape(-1)
            if step is not None:  # the blocks as one strided view: nothing to gather
                self.view = self.view[: _SAMPLE_BLOCKS * step].reshape(_SAMPLE_BLOCKS, step)
                self.view = self.view[:, :_BLOCK_LENGTH]
        elif step is not None:
            self.gather_index = paddle.to_tensor(self.index, place=tensor.place)
        self.sample = np.array(self._read(), copy=True)

    @property
    def index(self) -> np.ndarray | None:
        """The sampled positions in the flattened tensor (None: all of them)."""
        if self.step is None:
            return None
        starts = np.arange(_SAMPLE_BLOCKS, dtype=np.int64) * self.step
        return (starts[:, None] + np.arange(_BLOCK_LENGTH, dtype=np.int64)).reshape(-1)

    @staticmethod
    def _key(t) -> tuple:
        # A new allocation (replaced, cast, moved, re-initialized) or an in-place op (in-place
        # reshapes and casts included). Kept to two attribute reads: in the cold cache after
        # a large forward each costs several microseconds.
        return (t.data_ptr(), t.inplace_version)

    def _read(self) -> np.ndarray:
        if self.view is not None:
            return self.view
        flat = self.tensor.reshape([-1])
        if self.gather_index is not None:
            flat = paddle.gather(flat, self.gather_index)
        return flat.numpy()

    def unchanged(self, tensor) -> bool:
        return (
            tensor is self.tensor
            and self._key(tensor) == self.key
            and bool((self._read() == self.sample).all())
        )

    def refresh(self, tensor) -> bool:
        """Sample ``tensor`` anew if it is the watched tensor, in the same memory (the host
        view stays valid: it holds that memory); False if it is not."""
        if tensor is not self.tensor or tensor.data_ptr() != self.key[0]:
            return False
        self.key = self._key(tensor)
        if self.view is not None:
            np.copyto(self.sample, self.view)
        else:
            self.sample = np.array(self._read(), copy=True)
        return True


class _SigmaRecord:
    """The sigma of the last forward (or :func:`sigma` read), valid while W, u and v are
    unchanged: the checks of :class:`_EvalCache` (same objects, memory, inplace versions and
    sampled contents). :func:`sigma` returns it without a pass over W."""

    __slots__ = ("watched", "sigma")

    def __init__(self, weight, u, v, sigma) -> None:
        self.watched = (_Watched(weight, _sample_step(weight)), _Watched(u), _Watched(v))
        self.sigma = sigma

    def valid(self, weight, u, v) -> bool:
        return all(w.unchanged(t) for w, t in zip(self.watched, (weight, u, v)))

    @classmethod
    def renewed(cls, old, weight, u, v, sigma) -> "_SigmaRecord":
        """A record of ``sigma`` for W, u, v: ``old`` refreshed in place when it watches the
        same tensors (every training forward: a few microseconds instead of tens), else new."""
        if type(old) is cls and all(w.refresh(t) for w, t in zip(old.watched, (weight, u, v))):
            old.sigma = sigma
            return old
        return cls(weight, u, v, sigma)


class _EvalCache(_SigmaRecord):
    """The normalized weight of one eval forward, reused while W, u and v are unchanged.

    Paddle bumps a tensor's inplace version for in-place tensor ops (``add_``, ``W[i] = x``,
    ``paddle.assign(x, output=W)``) but NOT for ``set_value`` (which ``set_state_dict`` and
    model porting use) nor for the optimizers' updates, and nothing hooks those. So on each
    use the cache also compares the contents: u and v in full, W in full when small and
    otherwise 4096 entries in blocks spread over its storage (:func:`_sample_step`), which
    an optimizer step (it moves every entry with a gradient, or with momentum or weight
    decay), a loaded checkpoint or a ``set_value`` of other weights changes. What a sample
    cannot see is an out-of-band write that leaves all of it unchanged, e.g. ``set_value``
    of a tensor differing from W in a few unsampled entries only: call
    :func:`invalidate_cache` after such a write.
    """

    __slots__ = ("value", "value_version")

    def __init__(self, weight, u, v, value, sigma=None) -> None:
        super().__init__(weight, u, v, sigma)
        self.value = value
        self.value_version = value.inplace_version

    @property
    def index(self):
        """The sampled flat indices of W (None: all of them)."""
        return self.watched[0].index

    def get(self, weight, u, v):
        """The cached normalized weight if W, u, v (and it) are unchanged, else None."""
        if self.value.inplace_version != self.value_version:
            return None
        return self.value if self.valid(weight, u, v) else None


# ---------------------------------------------------------------------------------------------
# The hook.


class SpectralNormHook:
    """Forward-pre-hook that sets ``layer.<name>`` to the spectrally normalized weight.

    Attributes ``name``, ``dim`` (non-negative axis) and ``spec`` (a :class:`dualsn.spec.Spec`)
    describe the normalization; ``exact`` is true for a 1-D weight normalized without u, v.

    An eval-mode forward that needs no graph (under ``paddle.no_grad()``, or with a weight
    that does not require grad) reuses the previous such forward's normalized weight while W,
    u and v are unchanged (see :class:`_EvalCache`); every other forward computes afresh.

    Opt-in features (``dualsn.spec.Spec``): with ``spec.coeff`` the weight is divided by the
    soft bound max(1, sigma / coeff); with ``spec.atol``/``spec.rtol`` a training forward
    iterates until sigma settles, and ``last_iterations`` says how many it ran (0 after an
    eval forward); with ``spec.num_svs > 1`` the buffers ``<name>_u_extra`` /
    ``<name>_v_extra`` (one row per extra pair) estimate further singular values; with
    ``track_sigma`` the persistable buffer ``<name>_sigma`` holds the last forward's sigma.
    Without it that sigma is kept on the hook (not in the state dict) and read by
    :func:`sigma` while W, u and v are unchanged.
    """

    def __init__(self, name: str, dim: int, spec: _spec.Spec, exact: bool, track_sigma: bool = False) -> None:
        self.name = name
        self.dim = dim
        self.spec = spec
        self.exact = exact
        self.track_sigma = bool(track_sigma)
        self.last_iterations = 0
        self.seed: int | None = None  # the registration's seed: recovery_uv draws from it
        self._cache: _EvalCache | None = None
        self._record: _SigmaRecord | None = None
        self._recovery_cache = None

    def state(self, layer):
        """(W_orig, u, v) of ``layer``; u, v are None for an exact 1-D weight."""
        if not paddle.in_dynamic_mode():  # static graphs: through the layer's own lookup
            names = [self.name + "_orig"] + ([] if self.exact else [self.name + "_u", self.name + "_v"])
            found = [getattr(layer, n) for n in names]
            return tuple(found) if not self.exact else (found[0], None, None)
        # The layer's dicts first: Layer.__getattr__ costs tens of microseconds per call
        # right after a large forward has evicted the caches.
        weight = layer._parameters.get(self.name + "_orig")
        if weight is None:
            weight = getattr(layer, self.name + "_orig")
        if self.exact:
            return weight, None, None
        buffers = layer._buffers
        u, v = buffers.get(self.name + "_u"), buffers.get(self.name + "_v")
        if u is None or v is None:
            u, v = getattr(layer, self.name + "_u"), getattr(layer, self.name + "_v")
        if u.dtype in _LOW_PRECISION:
            # The layer was cast after registration (layer.to, amp.decorate at level O2):
            # u, v go back to float32, the dtype the math runs in (see _compute_dtype).
            u, v = u.astype(paddle.float32), v.astype(paddle.float32)
            layer._buffers[self.name + "_u"], layer._buffers[self.name + "_v"] = u, v
        return weight, u, v

    def extras(self, layer):
        """(extra u rows, extra v rows) of ``num_svs > 1``, or (None, None)."""
        if self.spec.num_svs == 1 or self.exact:
            return None, None
        names = (self.name + "_u_extra", self.name + "_v_extra")
        pair = [layer._buffers.get(n) for n in names]
        if pair[0] is None or pair[1] is None:
            pair = [getattr(layer, n) for n in names]
        if pair[0].dtype in _LOW_PRECISION:  # cast with the layer: back to float32, as u, v
            pair = [t.astype(paddle.float32) for t in pair]
            layer._buffers[names[0]], layer._buffers[names[1]] = pair
        return tuple(pair)

    def _operator(self, weight):
        """The linear map whose largest singular value sigma estimates: the W-matrix."""
        return WeightMatrix(_upcast(weight), self.dim)

    def _compute(self, layer, weight, u, v, do_power_iteration: bool):
        """(normalized weight, sigma, power iterations run) for one forward, uncached."""
        if do_power_iteration and self.track_sigma and not paddle.in_dynamic_mode():
            raise NotImplementedError("track_sigma needs dynamic mode in training (outside paddle.jit.to_static)")
        if not do_power_iteration or u is None:
            return _normalized_weight(weight, (u, v, None, None), self.dim, self.spec, do_power_iteration)
        vectors = (u, v) + self.extras(layer)
        return _normalized_weight(weight, vectors, self.dim, self.spec, True, self._recovery(u, v))

    def _recovery(self, u, v):
        """(u, v) of ``dualsn.spec.recovery_uv`` for this layer's seed, shaped and typed like
        the buffers: where a power-iteration step restarts instead of making them zero."""
        key = (u.dtype, str(u.place), tuple(u.shape), tuple(v.shape))
        cached = self._recovery_cache
        if cached is None or cached[0] != key:
            arrays = _spec.recovery_uv(_prod(u.shape), _prod(v.shape), self.seed, _spec.init_dtype(str(u.dtype)), self.spec.eps)
            tensors = tuple(
                paddle.to_tensor(x, place=u.place).astype(u.dtype).reshape(list(t.shape)) for x, t in zip(arrays, (u, v))
            )
            cached = self._recovery_cache = (key, tensors)
        return cached[1]

    def compute_weight(self, layer, do_power_iteration: bool):
        """The normalized weight, computed afresh (the eval cache is neither used nor
        changed)."""
        weight, u, v = self.state(layer)
        return self._compute(layer, weight, u, v, do_power_iteration)[0]

    def sigma(self, layer):
        """sigma from the current state, without iterating: the last forward's when it still
        belongs to W, u, v (see :class:`_SigmaRecord`), else u^H M v (then kept). A Python
        number (complex for complex weights); max(||W||, eps) for an exact 1-D weight."""
        weight, u, v = self.state(layer)
        with paddle.no_grad():
            if u is None:
                # numpy has no bfloat16: widen in paddle first.
                wide = weight.astype(paddle.complex128 if _is_complex(weight) else paddle.float64)
                return max(float(_spec.safe_norm(wide.numpy().ravel())), self.spec.eps)
            record = self._record
            if record is not None and not _PLAIN and paddle.in_dynamic_mode() and record.valid(weight, u, v):
                return record.sigma
            value = _sigma_value(self._operator(weight), u, v)
        if paddle.in_dynamic_mode() and not _PLAIN:
            self._record = _SigmaRecord(weight, u, v, value)
        return value

    def singular_values(self, layer) -> list:
        """u_i^H M v_i for every pair, from the current state: sigma first, then one per
        extra pair of ``num_svs``."""
        values = [self.sigma(layer)]
        u_extra, v_extra = self.extras(layer)
        if u_extra is not None:
            op = self._operator(self.state(layer)[0])
            values += [_sigma_value(op, u_extra[i], v_extra[i]) for i in range(int(u_extra.shape[0]))]
        return values

    def _publish(self, layer, weight, u, v, sigma, count: int) -> None:
        """After a forward: the iteration count, the kept sigma, the ``_sigma`` buffer."""
        self.last_iterations = count
        if sigma is None:  # a static graph: no host values
            return
        if u is not None:
            self._record = None if _PLAIN else _SigmaRecord.renewed(self._record, weight, u, v, sigma)
        if self.track_sigma:
            self._write_sigma(layer, sigma)

    def _write_sigma(self, layer, sigma) -> None:
        buffer = layer._buffers[self.name + "_sigma"]
        if _is_complex(buffer):
            buffer.set_value(np.asarray(sigma, dtype=np.complex128).astype(_NUMPY_COMPLEX[buffer.dtype]))
        else:
            buffer.fill_(float(np.real(sigma)))

    def invalidate(self) -> None:
        """Forget the cached eval-mode weight and the kept sigma: the next forward computes
        them afresh."""
        self._cache = None
        self._record = None

    def __call__(self, layer, inputs) -> None:
        with _amp_off():
            try:
                value = self._forward_weight(layer)
            except FloatingPointError as error:
                raise FloatingPointError(f"spectral norm of {self.name!r} in {type(layer).__name__}: {error}") from None
        if self.name in layer._buffers and paddle.in_dynamic_mode():
            # where Layer.__setattr__ would put it (a non-persistable buffer), without its
            # checks, which cost tens of microseconds in a cold cache
            layer._buffers[self.name] = value
        else:
            setattr(layer, self.name, value)

    def _forward_weight(self, layer):
        weight, u, v = self.state(layer)
        cacheable = (
            not _PLAIN
            and not layer.training
            and u is not None
            and paddle.in_dynamic_mode()
            and not _needs_graph(weight)
        )
        if not cacheable:
            self._cache = None
            value, sigma, count = self._compute(layer, weight, u, v, layer.training)
            self._publish(layer, weight, u, v, sigma, count)
            return value
        self.last_iterations = 0
        cache = self._cache
        if cache is not None:
            value = cache.get(weight, u, v)
            if value is not None:
                if self.track_sigma:
                    self._write_sigma(layer, cache.sigma)
                return value
        value, sigma, _ = self._compute(layer, weight, u, v, do_power_iteration=False)
        self._cache = self._record = _EvalCache(weight, u, v, value, sigma)
        if self.track_sigma:
            self._write_sigma(layer, sigma)
        return value

    def __getstate__(self) -> dict:
        # copy.deepcopy and pickling leave the cache behind: it refers to this layer's tensors.
        state = dict(self.__dict__)
        state["_cache"] = state["_record"] = state["_recovery_cache"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({"seed": None, "_recovery_cache": None, **state})

    def __repr__(self) -> str:
        extra = ", track_sigma=True" if self.track_sigma else ""
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, spec={self.spec}{extra})"


class SpectralNormConvHook(SpectralNormHook):
    """Forward-pre-hook that divides a convolution's kernel by the operator norm of the
    convolution itself (registered by :func:`spectral_norm_conv`).

    ``<name>_u`` (shape ``geometry.output_shape``) and ``<name>_v`` (``geometry.input_shape``)
    live in the output and input activation spaces of one sample; the power iteration is
    :func:`dualsn.spec.power_step` on the explicit convolution matrix, computed with the
    layer's convolution and the matching transposed convolution (:class:`ConvOperator`).
    ``dim`` is None: no axis of the kernel is singled out.
    """

    def __init__(self, name: str, geometry: ConvGeometry, spec: _spec.Spec, track_sigma: bool = False) -> None:
        super().__init__(name, None, spec, False, track_sigma)
        self.geometry = geometry

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.geometry.input_shape

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.geometry.output_shape

    def _operator(self, weight):
        return ConvOperator(_upcast(weight), self.geometry)

    def _compute(self, layer, weight, u, v, do_power_iteration: bool):
        spec = self.spec
        if weight.dtype in _LOW_PRECISION:
            # float32 math (Paddle's CPU convolutions have no half kernels), cast back
            wide, sigma, count = self._compute(layer, weight.astype(paddle.float32), u, v, do_power_iteration)
            return wide.astype(weight.dtype), sigma, count
        op = ConvOperator(weight, self.geometry)
        if _PLAIN or not paddle.in_dynamic_mode():
            if do_power_iteration and not paddle.in_dynamic_mode():
                raise NotImplementedError(
                    "spectral_norm_conv needs dynamic mode in training (outside paddle.jit.to_static)"
                )
            count = 0
            if do_power_iteration:
                count = _plain_steps(op, (u, v) + self.extras(layer), spec, self._recovery(u, v))
            out, sigma = _plain_divide(weight, op, u, v, spec)
            return out, _host_sigma(sigma), count
        sigma, count = None, 0
        if do_power_iteration:
            sigma, count = _training_steps(op, (u, v) + self.extras(layer), spec, self._recovery(u, v))
            sigma = _in_precision(sigma, weight.dtype)
        if sigma is None:
            sigma = _sigma_value(op, u, v)
        if not _needs_graph(weight):
            with paddle.no_grad():
                return _scaled(weight, spec.divisor(sigma)), sigma, count
        if _bound_inactive(spec, sigma):
            return _scaled(weight, 1.0), sigma, count  # W itself: the gradient passes unchanged
        if spec.sigma_floored(sigma):
            return _scaled(weight, spec.eps), sigma, count  # W / eps: a constant divisor
        # Autograd differentiates sigma(W) = u . conv(v, W) here (u, v held constant: clones,
        # since a later forward updates the buffers in place before this backward runs).
        divisor = _sigma(op, u.clone(), v.clone(), twice_differentiable=True)
        if spec.coeff is not None:
            divisor = paddle.scale(divisor, 1.0 / spec.coeff)
        return weight / divisor, sigma, count

    def __repr__(self) -> str:
        g = self.geometry
        extra = ", track_sigma=True" if self.track_sigma else ""
        return (
            f"SpectralNormConvHook(name={self.name!r}, input_shape={g.input_shape}, "
            f"output_shape={g.output_shape}, spec={self.spec}{extra})"
        )


def _hooks_on(layer, name: str):
    """(hook id, hook) of every spectral-norm hook on ``name``: dualsn's and the built-in's."""
    found = []
    for hook_id, hook in layer._forward_pre_hooks.items():
        if getattr(hook, "name", None) != name:
            continue
        if isinstance(hook, SpectralNormHook) or type(hook).__name__ == "SpectralNorm":
            found.append((hook_id, hook))
    return found


def get_spectral_norm(layer, name: str = "weight") -> SpectralNormHook | None:
    """The dualsn hook normalizing ``layer.<name>``, or None."""
    for _, hook in _hooks_on(layer, name):
        if isinstance(hook, SpectralNormHook):
            return hook
    return None


def is_spectral_norm(layer, name: str = "weight") -> bool:
    """True when dualsn spectral norm is applied to ``layer.<name>``."""
    return get_spectral_norm(layer, name) is not None


# ---------------------------------------------------------------------------------------------
# Registration.


@functools.lru_cache(maxsize=None)
def _dim_1_classes() -> tuple[type, ...]:
    """The classes of ``spec.DEFAULT_DIM_1_LAYERS["paddle"]`` this Paddle version has."""
    classes = []
    for dotted in _spec.DEFAULT_DIM_1_LAYERS["paddle"]:
        module_name, _, class_name = dotted.rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name, None)
        if cls is not None:
            classes.append(cls)
    return tuple(classes)





_NUMPY_COMPLEX = {paddle.complex64: np.complex64, paddle.complex128: np.complex128}


def _real_dtype(dtype):
    return {paddle.complex64: paddle.float32, paddle.complex128: paddle.float64}.get(dtype, dtype)


def _initial_uv(weight, h: int, w: int, seed: int | None, eps: float):
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


def _initial_extra_uv(weight, h: int, w: int, count: int, seed: int | None, eps: float):
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


def _check_track_sigma(track_sigma) -> None:
    if not isinstance(track_sigma, bool):
        raise ValueError(f"Expected track_sigma to be a bool, but got track_sigma={track_sigma!r}")


def _check_is_layer(layer, function: str) -> None:
    """TypeError naming the right function when ``layer`` is not a Paddle layer (a torch
    module would otherwise fail deep inside Paddle)."""
    if isinstance(layer, paddle.nn.Layer):
        return
    cls = type(layer)
    hint = f"; for a torch module use dualsn.torch.{function}" if cls.__module__.startswith("torch") else ""
    raise TypeError(f"Expected layer to be a paddle.nn.Layer, but got {cls.__module__}.{cls.__qualname__}{hint}")


def _target_weight(layer, name):
    """The parameter spectral norm would be put on, after the checks both entry points share
    (nothing is changed)."""
    _spec.check_name(name)
    if _hooks_on(layer, name):
        raise RuntimeError(f"Cannot register two spectral_norm hooks on the same parameter {name!r}")
    weight = layer._parameters.get(name)
    if weight is None:
        # KeyError, as paddle.nn.utils.spectral_norm raises (and a ValueError: see spec)
        raise _spec.ParameterNotFoundError(
            f"Expected name to be the name of a parameter of {type(layer).__name__}, but it has "
            f"no parameter called {name!r} (parameters: {list(layer._parameters)})"
        )
    if not (paddle.is_floating_point(weight) or _is_complex(weight)):
        # Paddle's built-in accepts an integer weight here and fails at the first forward.
        raise TypeError(
            f"Expected parameter {name!r} to have a floating point or complex dtype, but it is "
            f"{weight.dtype}"
        )
    _spec.check_weight_shape(tuple(weight.shape), name)
    return weight


def _state_names(name: str, exact: bool, spec: _spec.Spec, track_sigma: bool) -> list[str]:
    """The layer attributes registration adds (besides ``name`` itself)."""
    names = [name + "_orig"]
    if not exact:
        names += [name + "_u", name + "_v"]
        if spec.num_svs > 1:
            names += [name + "_u_extra", name + "_v_extra"]
    if track_sigma:
        names.append(name + "_sigma")
    return names


def _check_free(layer, name: str, names) -> None:
    for attr in names:
        if hasattr(layer, attr):
            raise ValueError(
                f"Cannot apply spectral_norm to {name!r}: {type(layer).__name__} already has an "
                f"attribute {attr!r}, which spectral_norm needs for its state"
            )


def _register(layer, weight, hook: "SpectralNormHook", shapes, seed: int | None):
    """Registration proper, once everything is validated: draws u, v of ``shapes`` = (u's
    shape, v's shape) (None: exact normalization) and the extra pairs, runs the registration
    iterations, computes the normalized weight and sigma, and only then changes the layer."""
    name, spec = hook.name, hook.spec
    hook.seed = seed
    u = v = u_extra = v_extra = None
    if shapes is not None:
        h, w = _prod(shapes[0]), _prod(shapes[1])
        k = spec.num_svs - 1
        with paddle.no_grad():
            u, v = _initial_uv(weight, h, w, seed, spec.eps)
            if k:
                u_extra, v_extra = _initial_extra_uv(weight, h, w, k, seed, spec.eps)
                u_extra, v_extra = u_extra.reshape([k, *shapes[0]]), v_extra.reshape([k, *shapes[1]])
            if len(shapes[0]) != 1 or len(shapes[1]) != 1:
                u, v = u.reshape(list(shapes[0])), v.reshape(list(shapes[1]))
            try:
                _power_iteration_(
                    hook._operator(weight), u, v, spec.registration_iterations(layer.training),
                    spec.order, spec.eps, u_extra, v_extra, hook._recovery(u, v),
                )
            except FloatingPointError as error:
                raise FloatingPointError(f"spectral norm of {name!r} in {type(layer).__name__}: {error}") from None
    normalized, sigma, _ = hook._compute(layer, weight, u, v, do_power_iteration=False)
    if u is not None and paddle.in_dynamic_mode():
        hook._record = _SigmaRecord(weight, u, v, sigma)

    # The same Parameter object moves to <name>_orig, so optimizers built before still see it.
    del layer._parameters[name]
    layer.add_parameter(name + "_orig", weight)
    if u is not None:
        layer.register_buffer(name + "_u", u)
        layer.register_buffer(name + "_v", v)
    if u_extra is not None:
        layer.register_buffer(name + "_u_extra", u_extra)
        layer.register_buffer(name + "_v_extra", v_extra)
    if hook.track_sigma:
        # u's dtype (complex for complex weights, float32 for half ones), real without u
        dtype = u.dtype if u is not None else _real_dtype(_compute_dtype(weight.dtype))
        layer.register_buffer(name + "_sigma", paddle.zeros([], dtype=dtype))
        hook._write_sigma(layer, sigma)
    # A plain tensor attribute, which Paddle keeps as a non-persistable buffer: not in state_dict.
    setattr(layer, name, normalized)
    layer.register_forward_pre_hook(hook)
    return layer


def spectral_norm(
    layer,
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
):
    """Apply spectral normalization to the parameter ``name`` of ``layer``; returns ``layer``.

    ``compat`` picks the algorithm preset of :data:`dualsn.spec.PRESETS` (``"torch"``: the
    torch parametrization with its warm-up; ``"torch_legacy"`` and ``"paddle"``: the
    forward-pre-hook built-ins). ``dim`` defaults to 1 for ``paddle.nn.Linear`` (its weight is
    ``[in, out]``) and the transposed convolutions, else 0, so the W-matrix is torch's.
    ``seed`` (or :func:`dualsn.manual_seed`) gives u, v identical to ``dualsn.torch``'s.

    Opt-in features no built-in has (all off by default; see :class:`dualsn.spec.Spec`):

    * ``coeff``: soft Lipschitz bound (i-ResNet, Residual Flows): the weight is divided by
      max(1, sigma / coeff), so its spectral norm is at most ``coeff``, and a weight already
      below it passes unchanged (gradient included).
    * ``atol``, ``rtol``: a training forward iterates until two successive sigma estimates
      agree within ``atol + rtol * sigma`` (at least max(2, n_power_iterations) iterations, at
      most ``max_iterations``); the hook's ``last_iterations`` is the count.
    * ``num_svs``: estimate this many leading singular values (BigGAN): extra (u, v) pairs in
      the buffers ``<name>_u_extra`` / ``<name>_v_extra``, Gram-Schmidt orthogonalized, read
      by :func:`singular_values`. The normalization uses the first pair only.
    * ``track_sigma``: keep the last forward's sigma in a persistable buffer ``<name>_sigma``
      (in the state dict), for logging. Without it :func:`sigma` still returns that sigma,
      kept on the hook, while it is current.

    For a convolution, sigma is the largest singular value of the kernel reshaped to an
    (out_channels, in_channels * kernel) matrix, as in every built-in: that is *not* the
    operator norm of the convolution (which can be several times larger, or smaller); for
    that, see :func:`spectral_norm_conv`.

    Everything is validated before the layer is touched: a failed call leaves it unchanged.

    Example::

        >>> layer = spectral_norm(paddle.nn.Linear(20, 10), coeff=0.97, atol=1e-4, num_svs=3, seed=0)
        >>> _ = layer(paddle.randn([4, 20]))   # training mode: iterates until sigma settles
        >>> len(singular_values(layer))
        3
    """
    spec = _spec.make_spec(
        compat, n_power_iterations, eps,
        coeff=coeff, atol=atol, rtol=rtol, max_iterations=max_iterations, num_svs=num_svs,
    )
    _spec.check_seed(seed)
    _check_track_sigma(track_sigma)
    _check_is_layer(layer, "spectral_norm")
    weight = _target_weight(layer, name)
    shape = tuple(weight.shape)
    if dim is None:
        # The layer's default describes its weight; a 1-D parameter (a bias) has only axis 0.
        dim = _spec.default_dim(isinstance(layer, _dim_1_classes()), len(shape))
    dim = _spec.canonical_dim(dim, len(shape))
    exact = spec.is_exact_vector(len(shape))
    if not exact:
        _spec.check_num_svs(spec.num_svs, *_spec.matrix_shape(shape, dim))
    _check_free(layer, name, _state_names(name, exact, spec, track_sigma))
    seed = _spec.next_seed(seed)  # last: a failed call must not consume the manual_seed stream

    hook = SpectralNormHook(name, dim, spec, exact, track_sigma)
    shapes = None if exact else tuple((n,) for n in _spec.matrix_shape(shape, dim))
    return _register(layer, weight, hook, shapes, seed)


def _conv_classes() -> tuple[type, ...]:
    return (paddle.nn.Conv1D, paddle.nn.Conv2D, paddle.nn.Conv3D)


def spectral_norm_conv(
    layer,
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
):
    """Normalize a convolution by its operator norm; returns ``layer``.

    For ``paddle.nn.Conv1D``/``Conv2D``/``Conv3D`` with ``padding_mode="zeros"``. The
    convolution of one sample of shape ``input_shape`` (channels first, no batch axis:
    ``(C, H, W)`` for Conv2D, whatever the layer's ``data_format``), without bias, is a linear
    map M (an explicit matrix with one column per input entry); sigma estimates its largest
    singular value, the layer's Lipschitz constant, which the reshaped-kernel sigma of
    :func:`spectral_norm` is not. ``<name>_u`` (shape of one output sample) and ``<name>_v``
    (shape ``input_shape``) live in the activation spaces, and the power iteration (order
    "vu", as i-ResNet: v <- N(M^T u), u <- N(M v)) applies the layer's own convolution and
    the matching transposed convolution (stride, padding, dilation, groups). The algorithm is
    :class:`dualsn.spec.ReferenceSN` on M with the "torch_legacy" preset (no warm-up), so u,
    v start from their draw: run a few training forwards, or use ``atol``/``rtol``, before
    trusting sigma. A seeded draw is ``spec.init_uv(M's rows, M's columns, seed)`` reshaped,
    the same as ``dualsn.torch.spectral_norm_conv``'s.

    The layer must then only see inputs of ``input_shape`` for the bound to hold (other
    sizes of a stride-1 convolution have a nearly equal norm, but that is not checked).
    ``coeff``, ``atol``/``rtol``/``max_iterations``, ``num_svs``, ``track_sigma``, ``seed``:
    as in :func:`spectral_norm`. :func:`remove_spectral_norm`, :func:`sigma` and
    :func:`singular_values` work on it.

    Raises TypeError for a layer that is not such a convolution (or a complex kernel: Paddle
    has no complex convolutions), ValueError for an ``input_shape`` that does not fit it,
    NotImplementedError for other padding modes.

    Example::

        >>> conv = spectral_norm_conv(paddle.nn.Conv2D(3, 8, 3, padding=1), (3, 16, 16), coeff=0.9, seed=0)
        >>> list(conv.weight_v.shape)
        [3, 16, 16]
    """
    spec = _spec.conv_spec(
        n_power_iterations, eps,
        coeff=coeff, atol=atol, rtol=rtol, max_iterations=max_iterations, num_svs=num_svs,
    )
    _spec.check_seed(seed)
    _check_track_sigma(track_sigma)
    _check_is_layer(layer, "spectral_norm_conv")
    if not isinstance(layer, _conv_classes()):
        raise TypeError(
            "Expected layer to be a paddle.nn.Conv1D, Conv2D or Conv3D, but got "
            f"{type(layer).__name__} (use spectral_norm for other layers)"
        )
    weight = _target_weight(layer, name)
    if _is_complex(weight):
        raise TypeError(f"spectral_norm_conv needs a real kernel (Paddle has no complex convolutions), got {weight.dtype}")
    if layer._padding_mode != "zeros":
        raise NotImplementedError(
            f"spectral_norm_conv supports padding_mode='zeros' only, but the layer has "
            f"padding_mode={layer._padding_mode!r}"
        )
    spatial = len(layer._kernel_size)
    kernel_shape = (layer._out_channels, layer._in_channels // layer._groups, *layer._kernel_size)
    if tuple(weight.shape) != tuple(int(n) for n in kernel_shape):
        raise ValueError(
            f"Expected {name!r} to have the layer's kernel shape {list(kernel_shape)}, but its "
            f"shape is {list(weight.shape)}"
        )
    if (
        not isinstance(input_shape, (tuple, list))
        or len(input_shape) != spatial + 1
        or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 for n in input_shape)
        or input_shape[0] != layer._in_channels
    ):
        raise ValueError(
            f"Expected input_shape to be {spatial + 1} positive ints (channels={layer._in_channels}, "
            f"then {spatial} spatial size(s); no batch axis), but got input_shape={input_shape!r}"
        )
    geometry = ConvGeometry(layer, tuple(input_shape))
    _spec.check_num_svs(spec.num_svs, _prod(geometry.output_shape), _prod(geometry.input_shape))
    _check_free(layer, name, _state_names(name, False, spec, track_sigma))
    seed = _spec.next_seed(seed)  # last: a failed call must not consume the manual_seed stream

    hook = SpectralNormConvHook(name, geometry, spec, track_sigma)
    return _register(layer, weight, hook, (geometry.output_shape, geometry.input_shape), seed)


def remove_spectral_norm(layer, name: str = "weight"):
    """Remove dualsn spectral norm from ``layer.<name>``; returns ``layer``.

    ``<name>`` becomes a fresh trainable Parameter holding W / sigma for the current u, v
    (W / max(1, sigma / coeff) with ``coeff``; no power iteration is run), and all
    spectral-norm state is removed. Works on :func:`spectral_norm_conv` too.
    """
    hook = _require(layer, name, "remove_spectral_norm")
    with paddle.no_grad():
        value = hook.compute_weight(layer, do_power_iteration=False)
    param = paddle.create_parameter(
        value.shape, value.dtype, default_initializer=paddle.nn.initializer.Constant(0.0)
    )
    param.set_value(value)
    param.stop_gradient = False

    for hook_id, found in list(layer._forward_pre_hooks.items()):
        if found is hook:
            del layer._forward_pre_hooks[hook_id]
            layer._forward_pre_hooks_with_kwargs_flag.pop(hook_id, None)
    del layer._parameters[name + "_orig"]
    for buffer in (name, name + "_u", name + "_v", name + "_u_extra", name + "_v_extra", name + "_sigma"):
        layer._buffers.pop(buffer, None)
        layer._non_persistable_buffer_names_set.discard(buffer)
    layer.add_parameter(name, param)
    return layer


def _require(layer, name: str, function: str) -> SpectralNormHook:
    _check_is_layer(layer, function)
    _spec.check_name(name)
    hook = get_spectral_norm(layer, name)
    if hook is None:
        raise ValueError(f"spectral_norm of {name!r} not found in {type(layer).__name__}")
    return hook


def sigma(layer, name: str = "weight") -> float:
    """sigma of ``layer.<name>`` from the current u, v (no iteration), as a float (real part).

    It is u^H M v (M: the W-matrix, or the convolution of :func:`spectral_norm_conv`), taken
    from the last forward while W, u and v have not changed since (no pass over W), else
    computed. For an exact 1-D weight: max(||W||, eps).

    Example::

        >>> layer = spectral_norm(paddle.nn.Linear(20, 10), seed=0)
        >>> sigma(layer) > 0
        True
    """
    return float(np.real(_require(layer, name, "sigma").sigma(layer)))


def singular_values(layer, name: str = "weight") -> list[float]:
    """The singular-value estimates u_i^H M v_i of ``layer.<name>``'s spectral norm, from the
    current state (no iteration), as floats (real parts): sigma first, then one per extra pair
    of ``num_svs``. Without extra pairs, a one-element list.

    Example::

        >>> layer = spectral_norm(paddle.nn.Linear(20, 10), num_svs=2, seed=0)
        >>> len(singular_values(layer))
        2
    """
    return [float(np.real(x)) for x in _require(layer, name, "singular_values").singular_values(layer)]


def invalidate_cache(layer, name: str = "weight") -> None:
    """Make the next eval-mode forward of ``layer`` recompute ``layer.<name>``.

    Only needed after writing to W, u or v in a way the eval cache cannot see (see
    :class:`_EvalCache`): a ``set_value`` or optimizer update that changes none of the
    sampled entries of a large W.
    """
    _require(layer, name, "invalidate_cache").invalidate()


# ---------------------------------------------------------------------------------------------
# Patching the built-in: existing or PaConvert-converted code builds dualsn's spectral norm
# without being edited. The machinery (Patch) is dualsn.patching's.

# The modules that hold paddle.nn.utils.spectral_norm (the function object itself), where
# code looks it up at call time: paddle.nn.utils.spectral_norm(...) as PaConvert writes it,
# its defining module, and the paddle.nn re-export. Only those that have it are patched.
_BUILTIN_HOMES = ("paddle.nn.utils", "paddle.nn.utils.spectral_norm_hook", "paddle.nn")


def _builtin_replacement(compat: str, defaults: dict):
    """A function with ``paddle.nn.utils.spectral_norm``'s signature that registers dualsn's."""

    def spectral_norm_(layer, name="weight", n_power_iterations=1, eps=1e-12, dim=None):
        return spectral_norm(layer, name, n_power_iterations, eps, dim, compat=compat, **defaults)

    spectral_norm_.__name__ = spectral_norm_.__qualname__ = "spectral_norm"
    spectral_norm_.__doc__ = f"dualsn.paddle.spectral_norm with compat={compat!r}, installed by dualsn.paddle.patch."
    return spectral_norm_


def _builtin_homes() -> list:
    homes = []
    for module_name in _BUILTIN_HOMES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # another Paddle version may not have this module
            continue
        if hasattr(module, "spectral_norm"):
            homes.append(module)
    return homes


def patch(compat: str = "torch", **defaults) -> Patch:
    """Make ``paddle.nn.utils.spectral_norm`` build dualsn's spectral norm; returns a :class:`Patch`.

    ``compat`` is the algorithm the *original* code used. The default, ``"torch"``, is for code
    converted from torch's ``torch.nn.utils.parametrizations.spectral_norm`` (PaConvert maps it
    to ``paddle.nn.utils.spectral_norm``, whose algorithm differs): such a model then trains
    as the torch model did. Code converted from the older ``torch.nn.utils.spectral_norm`` needs
    ``"torch_legacy"``; Paddle code that wants the built-in's algorithm, ``"paddle"``.

    Replaced: ``spectral_norm`` in ``paddle.nn.utils``, ``paddle.nn.utils.spectral_norm_hook``
    and ``paddle.nn`` (where they exist). The replacement takes the built-in's arguments
    ``(layer, name="weight", n_power_iterations=1, eps=1e-12, dim=None)`` and forwards them,
    with ``compat`` and ``defaults`` (keyword-only options of :func:`spectral_norm`: ``seed``,
    ``coeff``, ``atol``, ``rtol``, ``max_iterations``, ``num_svs``, ``track_sigma``). Seeding
    through :func:`dualsn.manual_seed` works as usual. With ``dim=None`` dualsn's default
    applies, which equals the built-in's (1 for ``paddle.nn.Linear`` and transposed
    convolutions, else 0).

    Use it as a context manager, or call it and later ``undo()`` (idempotent); either way the
    exact original function objects come back, and nested patches unwind in order. Names bound
    before the patch (``from paddle.nn.utils import spectral_norm`` at import time) keep the
    built-in: build the model (or import its module) inside the patch.

    A bad ``compat`` (ValueError) or option (TypeError, ValueError) is refused before anything
    is patched.

    Example::

        >>> with patch(compat="torch"):
        ...     layer = paddle.nn.utils.spectral_norm(paddle.nn.Linear(4, 3))
        >>> is_spectral_norm(layer)
        True
    """
    check_patch_arguments((compat,), defaults)
    replacement = _builtin_replacement(compat, defaults)
    replacements = [(module, "spectral_norm", replacement) for module in _builtin_homes()]
    return Patch(replacements, {"paddle.nn.utils.spectral_norm": compat})


def report(layer):
    """The per-layer sigma report of ``layer`` (see :func:`dualsn.report.report`); changes nothing."""
    from dualsn import report as _report

    return _report.report(layer)
