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
added in place by a tensor hook, a training forward writes into a reused buffer, and an eval
forward reuses the normalized weight while W, u and v are unchanged. Results differ from
the built-in's only in the last bits (sigma and W / sigma are rounded differently).

This module imports paddle (and numpy, dualsn.spec) and no other framework.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import weakref

import numpy as np
import paddle
import paddle.nn.functional as F

from dualsn import spec as _spec

__all__ = [
    "SpectralNormHook",
    "spectral_norm",
    "remove_spectral_norm",
    "sigma",
    "is_spectral_norm",
    "get_spectral_norm",
    "invalidate_cache",
]


# ---------------------------------------------------------------------------------------------
# Why the code below looks the way it does (measured on CPU, one thread, W 2048 x 2048):
# every new W-sized tensor costs far more than a pass over W (Paddle's CPU allocator maps
# fresh pages for it: W / s, W.clone() and addmm take 10-20 ms, W.scale_() 0.5 ms, a W v
# product 0.6-0.8 ms), paddle.mv materializes a transposed W^T, and a broadcasting divide by
# a 0-D tensor is slow even into a preallocated output. So the W-matrix is only ever a view
# of the stored weight, products use matmul's transpose flag, sigma comes from the last
# product of the power iteration, W / sigma is a copy + scale_ into a reused buffer when one
# is free, and the gradient's rank-1 term is one in-place addmm_: a training step allocates
# one W-sized tensor (for the gradient) besides the plain layer's own, an eval forward with
# an unchanged weight none.


_COMPLEX_DTYPES = (paddle.complex64, paddle.complex128)


def _is_complex(x) -> bool:
    return x.dtype in _COMPLEX_DTYPES  # paddle.is_complex costs a few microseconds more


_LOW_PRECISION = (paddle.float16, paddle.bfloat16)


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


def _normalize_into(y, target, eps: float) -> float:
    """target <- N(y) = y / max(||y||, eps), in place; returns ||y||.

    The squared norm is one BLAS dot read back to the host (a complex y through its (re, im)
    pairs), and target = y * (1 / max(||y||, eps)) by copy_ + scale_: three small ops where
    F.normalize + assign take six. It rounds differently from F.normalize in the last bit.
    """
    flat = paddle.as_real(y).reshape([-1]) if _is_complex(y) else y
    norm = math.sqrt(max(paddle.matmul(flat, flat).item(), 0.0))
    target.copy_(y, False)
    target.scale_(1.0 / max(norm, eps))  # also bumps target's inplace version
    return norm


def _power_iteration_(mat: WeightMatrix, u, v, n: int, order: str, eps: float):
    """``n`` power iterations, writing into u and v in place (their identity is kept, so
    buffers shared between replicas see the update). Returns sigma = u^H W v for the new u,
    v as a float, read off the last product (None when n == 0):

    * order "uv" ends with v = N(y), y = W^H u, and u^H W v = y^H v = ||y||^2 / max(||y||, eps);
    * order "vu" ends with u = N(y), y = W v, and u^H W v = u^H y, the same number.

    So sigma costs no further pass over W (nor a dot), whatever the clamp to eps did.
    """
    norm = None
    with paddle.no_grad():
        for _ in range(n):
            if order == "uv":
                _normalize_into(mat.mv(v), u, eps)
                norm = _normalize_into(mat.mhv(u), v, eps)
            else:
                _normalize_into(mat.mhv(u), v, eps)
                norm = _normalize_into(mat.mv(v), u, eps)
    if norm is None:
        return None
    return norm * (norm / max(norm, eps))


def _sigma(mat: WeightMatrix, u, v, twice_differentiable: bool = False):
    """sigma = u^H W v as a 0-D tensor, one pass over W (differentiable in W when grad is
    enabled)."""
    return _vdot(u, mat.mv(v), twice_differentiable)


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
    including through sigma's dependence on W. The hook's life (a weakref) and ``ran`` tell
    the buffer pool when the forward's graph is done."""

    __slots__ = ("ran", "__weakref__")

    def __init__(self) -> None:
        self.ran = False

    def __call__(self, grad):
        self.ran = True
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


def _scaled(x, sigma, buffer=None):
    """x / sigma for a constant Python number ``sigma``: a new tensor, or written into ``buffer`` (a
    reused tensor of x's shape) through a new tensor object sharing its memory. Autograd
    records it when x needs a gradient.

    Real x is multiplied by 1 / sigma (``paddle.scale`` takes it as a double): Paddle's
    broadcasting divide by a 0-D tensor is several times slower than copy + ``scale_``, even
    into a preallocated output. The result differs from x / sigma in the last bit at most.
    """
    if _is_complex(x) or isinstance(sigma, complex):
        return x / _scalar(sigma, x)
    inverse = _inverse(sigma)
    if buffer is None:
        return paddle.scale(x, inverse)
    out = buffer.detach()  # its own autograd identity; the pool's tensor stays a plain buffer
    paddle.assign(x, output=out)
    out.scale_(inverse)
    return out


class _BufferPool:
    """W-sized buffers for the training-mode normalized weight, reused once nothing can read
    them any more: a new W-sized tensor costs Paddle's CPU allocator 10-20 ms (fresh pages)
    where filling an old one costs 2.

    A buffer is handed out as a new tensor object sharing its memory (``layer.<name>``). It
    is free again when that object has been collected (the layer points at a newer one and
    the user kept no reference) and its forward's graph is done: freed, or differentiated
    once (Paddle then releases the tensors the graph saved). Two forwards before one
    backward (D(real) - D(fake)) therefore use two buffers. At most ``size`` buffers are
    kept; when all are busy the forward allocates as usual.

    Writing into a reused buffer bumps the inplace version its old tensor shares, so a graph
    kept with ``retain_graph=True`` and differentiated again after later training forwards
    of the layer fails loudly in Paddle's version check rather than computing with wrong
    values. What reuse cannot see is a *detached* alias (``layer.weight.detach()``) kept
    across training forwards: it then shows a later normalized weight. Keep a ``clone()``
    instead, or set ``SpectralNormHook.reuse_buffers = False``.
    """

    size = 2

    def __init__(self) -> None:
        self._layout = None  # (shape, dtype, place) of the buffers
        # [buffer, weakref to the handed-out tensor, weakref to its gradient hook]
        self._slots: list[list] = []

    def acquire(self, weight):
        """A free slot for a weight like ``weight`` (allocating one if there is room), or None."""
        layout = (tuple(weight.shape), weight.dtype, str(weight.place))
        if layout != self._layout:  # the weight was replaced, cast or moved
            self._layout, self._slots = layout, []
        for slot in self._slots:
            out, hook = (None if ref is None else ref() for ref in slot[1:])
            if out is None and (hook is None or hook.ran):
                return slot
        if len(self._slots) < self.size:
            slot = [paddle.empty_like(weight), None, None]
            self._slots.append(slot)
            return slot
        return None


def _needs_graph(weight) -> bool:
    return paddle.is_grad_enabled() and not weight.stop_gradient


def normalized_weight(
    weight, u, v, dim: int, spec: _spec.Spec, do_power_iteration: bool, pool: _BufferPool | None = None
):
    """W / sigma(W), iterating u, v in place first when ``do_power_iteration``.

    ``u is None`` means an exact 1-D weight: W / max(||W||, eps), no state. When autograd
    needs a graph, the gradient is completed by :class:`_MatrixGradHook` /
    :class:`_VectorGradHook`. With a ``pool`` the result may be written into one of its
    buffers (real weights).
    """
    if weight.dtype in _LOW_PRECISION:
        # All the math in float32 (u, v are float32 too), the result cast back; autograd
        # carries the gradient through both casts.
        wide = normalized_weight(weight.astype(paddle.float32), u, v, dim, spec, do_power_iteration)
        return wide.astype(weight.dtype)
    graph = _needs_graph(weight)
    if not paddle.in_dynamic_mode():
        return _unfused_normalized_weight(weight, u, v, dim, spec, do_power_iteration)
    if u is None:
        with paddle.no_grad():
            norm = _clamped_norm(weight, 0.0).item()  # ||W||
            if not graph:
                return _scaled(weight, max(norm, spec.eps))
        private = _private_view(weight)
        private.register_hook(_VectorGradHook(weight, spec.eps, norm))
        return _scaled(private, max(norm, spec.eps))
    mat = WeightMatrix(weight, dim)
    sigma = None
    if do_power_iteration:
        sigma = _power_iteration_(mat, u, v, spec.n_power_iterations, spec.order, spec.eps)
    if sigma is None:
        sigma = _sigma_value(mat, u, v)
    slot = None if pool is None or _is_complex(weight) else pool.acquire(weight)
    buffer = None if slot is None else slot[0]
    if not graph:
        with paddle.no_grad():
            out = _scaled(weight, sigma, buffer)
        hook = None
    else:
        private = _private_view(weight)
        hook = _MatrixGradHook(mat, u.clone(), v.clone(), sigma)
        private.register_hook(hook)
        out = _scaled(private, sigma, buffer)
    if slot is not None:
        slot[1] = weakref.ref(out)
        slot[2] = None if hook is None else weakref.ref(hook)
    return out


def _unfused_normalized_weight(weight, u, v, dim, spec, do_power_iteration):
    """The same value through plain tensor ops only (no host reads, no hooks; Paddle's
    autograd derives the whole gradient): for static graphs (``paddle.jit.to_static``),
    and as the tests' second opinion on the hooked gradients.

    The W-matrix is the plain transpose + reshape, and u, v never go through a view op: a
    static graph refuses an in-place write (the assign into u, v) to a tensor that has one.
    """
    if u is None:
        norm = _clamped_norm(weight, spec.eps, twice_differentiable=True)
        return weight / paddle.cast(norm, weight.dtype)
    w_mat = weight
    if dim != 0:
        w_mat = w_mat.transpose(list(_spec.permutation(weight.ndim, dim)))
    w_mat = w_mat.reshape([int(weight.shape[dim]), -1])
    conj = paddle.conj if _is_complex(weight) else (lambda x: x)

    def mv(x):
        return paddle.matmul(w_mat, x)

    def mhv(x):
        return conj(paddle.matmul(w_mat, conj(x), transpose_x=True))

    if do_power_iteration:
        with paddle.no_grad():
            for _ in range(spec.n_power_iterations):
                if spec.order == "uv":
                    paddle.assign(_normalize(mv(v), spec.eps), u)
                    paddle.assign(_normalize(mhv(u), spec.eps), v)
                else:
                    paddle.assign(_normalize(mhv(u), spec.eps), v)
                    paddle.assign(_normalize(mv(v), spec.eps), u)
    sigma = _vdot(u.clone(), mv(v.clone()), twice_differentiable=True)
    return weight / sigma


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


class _EvalCache:
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

    __slots__ = ("watched", "value", "value_version")

    def __init__(self, weight, u, v, value) -> None:
        self.watched = (_Watched(weight, _sample_step(weight)), _Watched(u), _Watched(v))
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
        if all(w.unchanged(t) for w, t in zip(self.watched, (weight, u, v))):
            return self.value
        return None


# ---------------------------------------------------------------------------------------------
# The hook.


class SpectralNormHook:
    """Forward-pre-hook that sets ``layer.<name>`` to the spectrally normalized weight.

    Attributes ``name``, ``dim`` (non-negative axis) and ``spec`` (a :class:`dualsn.spec.Spec`)
    describe the normalization; ``exact`` is true for a 1-D weight normalized without u, v.

    An eval-mode forward that needs no graph (under ``paddle.no_grad()``, or with a weight
    that does not require grad) reuses the previous such forward's normalized weight while W,
    u and v are unchanged (see :class:`_EvalCache`); every other forward computes afresh.
    A training-mode forward writes into a buffer of a small pool when one is free (see
    :class:`_BufferPool`); ``reuse_buffers = False`` makes it allocate every time.
    """

    def __init__(self, name: str, dim: int, spec: _spec.Spec, exact: bool) -> None:
        self.name = name
        self.dim = dim
        self.spec = spec
        self.exact = exact
        self.reuse_buffers = True
        self._cache: _EvalCache | None = None
        self._pool = _BufferPool()

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

    def compute_weight(self, layer, do_power_iteration: bool):
        """The normalized weight, computed afresh (the eval cache is neither used nor
        changed)."""
        weight, u, v = self.state(layer)
        return normalized_weight(weight, u, v, self.dim, self.spec, do_power_iteration)

    def invalidate(self) -> None:
        """Forget the cached eval-mode weight: the next forward computes it afresh."""
        self._cache = None

    def __call__(self, layer, inputs) -> None:
        with _amp_off():
            value = self._forward_weight(layer)
        if self.name in layer._buffers and paddle.in_dynamic_mode():
            # where Layer.__setattr__ would put it (a non-persistable buffer), without its
            # checks, which cost tens of microseconds in a cold cache
            layer._buffers[self.name] = value
        else:
            setattr(layer, self.name, value)

    def _forward_weight(self, layer):
        weight, u, v = self.state(layer)
        cacheable = (
            not layer.training
            and u is not None
            and paddle.in_dynamic_mode()
            and not _needs_graph(weight)
        )
        if not cacheable:
            self._cache = None
            pool = self._pool if (layer.training and self.reuse_buffers) else None
            return normalized_weight(weight, u, v, self.dim, self.spec, layer.training, pool)
        if self._cache is not None:
            value = self._cache.get(weight, u, v)
            if value is not None:
                return value
        value = normalized_weight(weight, u, v, self.dim, self.spec, do_power_iteration=False)
        self._cache = _EvalCache(weight, u, v, value)
        return value

    def __getstate__(self) -> dict:
        # copy.deepcopy and pickling leave the cache behind: it refers to this layer's tensors.
        state = dict(self.__dict__)
        state["_cache"] = None
        state["_pool"] = _BufferPool()
        return state

    def __repr__(self) -> str:
        return f"SpectralNormHook(name={self.name!r}, dim={self.dim}, spec={self.spec})"


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


def spectral_norm(
    layer,
    name: str = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int | None = None,
    *,
    compat: str = "torch",
    seed: int | None = None,
):
    """Apply spectral normalization to the parameter ``name`` of ``layer``; returns ``layer``.

    ``compat`` picks the algorithm preset of :data:`dualsn.spec.PRESETS` (``"torch"``: the
    torch parametrization with its warm-up; ``"torch_legacy"`` and ``"paddle"``: the
    forward-pre-hook built-ins). ``dim`` defaults to 1 for ``paddle.nn.Linear`` (its weight is
    ``[in, out]``) and the transposed convolutions, else 0, so the W-matrix is torch's.
    ``seed`` (or :func:`dualsn.manual_seed`) gives u, v identical to ``dualsn.torch``'s.

    Everything is validated before the layer is touched: a failed call leaves it unchanged.
    """
    spec = _spec.make_spec(compat, n_power_iterations, eps)
    _spec.check_seed(seed)
    if _hooks_on(layer, name):
        raise RuntimeError(f"Cannot register two spectral_norm hooks on the same parameter {name!r}")
    weight = layer._parameters.get(name) if isinstance(name, str) else None
    if weight is None:
        raise ValueError(
            f"Expected name to be the name of a parameter of {type(layer).__name__}, but it has "
            f"no parameter called {name!r} (parameters: {list(layer._parameters)})"
        )
    if not (paddle.is_floating_point(weight) or _is_complex(weight)):
        raise TypeError(
            f"Expected parameter {name!r} to have a floating point or complex dtype, but it is "
            f"{weight.dtype}"
        )
    shape = tuple(weight.shape)
    _spec.check_weight_shape(shape, name)
    if dim is None:
        # The layer's default describes its weight; a 1-D parameter (a bias) has only axis 0.
        dim = _spec.default_dim(isinstance(layer, _dim_1_classes()), len(shape))
    dim = _spec.canonical_dim(dim, len(shape))
    exact = spec.is_exact_vector(len(shape))
    new_names = [name + "_orig"] + ([] if exact else [name + "_u", name + "_v"])
    for attr in new_names:
        if hasattr(layer, attr):
            raise ValueError(
                f"Cannot apply spectral_norm to {name!r}: {type(layer).__name__} already has an "
                f"attribute {attr!r}, which spectral_norm needs for its state"
            )
    seed = _spec.next_seed(seed)  # last: a failed call must not consume the manual_seed stream

    # Compute the whole new state before the first change to the layer.
    if exact:
        u = v = None
    else:
        h, w = _spec.matrix_shape(shape, dim)
        with paddle.no_grad():
            u, v = _initial_uv(weight, h, w, seed, spec.eps)
            _power_iteration_(
                WeightMatrix(_upcast(weight), dim), u, v, spec.registration_iterations(layer.training),
                spec.order, spec.eps,
            )
    hook = SpectralNormHook(name, dim, spec, exact)
    normalized = normalized_weight(weight, u, v, dim, spec, do_power_iteration=False)

    # The same Parameter object moves to <name>_orig, so optimizers built before still see it.
    del layer._parameters[name]
    layer.add_parameter(name + "_orig", weight)
    if not exact:
        layer.register_buffer(name + "_u", u)
        layer.register_buffer(name + "_v", v)
    # A plain tensor attribute, which Paddle keeps as a non-persistable buffer: not in state_dict.
    setattr(layer, name, normalized)
    layer.register_forward_pre_hook(hook)
    return layer


def remove_spectral_norm(layer, name: str = "weight"):
    """Remove dualsn spectral norm from ``layer.<name>``; returns ``layer``.

    ``<name>`` becomes a fresh trainable Parameter holding W / sigma for the current u, v (no
    power iteration is run), and all spectral-norm state is removed.
    """
    hook = get_spectral_norm(layer, name)
    if hook is None:
        raise ValueError(f"spectral_norm of {name!r} not found in {type(layer).__name__}")
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
    for buffer in (name, name + "_u", name + "_v"):
        layer._buffers.pop(buffer, None)
        layer._non_persistable_buffer_names_set.discard(buffer)
    layer.add_parameter(name, param)
    return layer


def sigma(layer, name: str = "weight") -> float:
    """sigma of ``layer.<name>`` from the current u, v (no iteration), as a float.

    For an exact 1-D weight: max(||W||, eps).
    """
    hook = get_spectral_norm(layer, name)
    if hook is None:
        raise ValueError(f"spectral_norm of {name!r} not found in {type(layer).__name__}")
    weight, u, v = hook.state(layer)
    with paddle.no_grad():
        if u is None:
            # numpy has no bfloat16: widen in paddle first.
            wide = weight.astype(paddle.complex128 if _is_complex(weight) else paddle.float64)
            return max(float(np.linalg.norm(wide.numpy().ravel())), hook.spec.eps)
        value = _sigma(WeightMatrix(_upcast(weight), hook.dim), u, v)
        value = value.astype(paddle.complex128 if _is_complex(value) else paddle.float64)
    return float(np.real(value.numpy()))


def invalidate_cache(layer, name: str = "weight") -> None:
    """Make the next eval-mode forward of ``layer`` recompute ``layer.<name>``.

    Only needed after writing to W, u or v in a way the eval cache cannot see (see
    :class:`_EvalCache`): a ``set_value`` or optimizer update that changes none of the
    sampled entries of a large W.
    """
    hook = get_spectral_norm(layer, name)
    if hook is None:
        raise ValueError(f"spectral_norm of {name!r} not found in {type(layer).__name__}")
    hook.invalidate()
