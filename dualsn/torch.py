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
then differ from the built-in's in the last bits only (rounding).

The algorithm's rules all come from :mod:`dualsn.spec`; this module only maps them onto
``torch.nn.utils.parametrize``.
"""

from __future__ import annotations

import contextlib
import importlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations as _parametrizations
from torch.nn.utils import parametrize

# The module, not the function ``torch.nn.utils.spectral_norm`` that shadows it.
_legacy = importlib.import_module("torch.nn.utils.spectral_norm")

from dualsn import spec as _spec

__all__ = [
    "SpectralNorm",
    "spectral_norm",
    "remove_spectral_norm",
    "sigma",
    "is_spectral_norm",
    "get_spectral_norm",
    "spectral_norm_forward",
    "power_iteration_",
    "weight_grad",
    "WeightMatrix",
]


def _no_compiler() -> bool:
    return False


_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or _no_compiler
"""Whether torch.compile is tracing this code (``torch.compiler.is_compiling``, torch >= 2.3)."""


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


_LOW_PRECISION = (torch.float16, torch.bfloat16)


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


def _normalize_into(x: torch.Tensor, out: torch.Tensor, eps: float):
    """``out <- x / max(||x||, eps)``, in place; returns ``||x||`` and ``max(||x||, eps)``.

    The same operations as ``F.normalize(x, dim=0, eps=eps, out=out)``, so the result has
    the same bits, but the norm is kept: it gives sigma (see :func:`power_iteration_`).
    """
    norm = torch.linalg.vector_norm(x, 2, 0, True)
    denom = norm.clamp_min(eps)
    torch.div(x, denom, out=out)
    return norm, denom


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
        if order == "uv":
            _normalize_into(mat.mv(v), u, eps)
            last = _normalize_into(mat.mv_h(u), v, eps)
        else:
            _normalize_into(mat.mv_h(u), v, eps)
            last = _normalize_into(mat.mv(v), u, eps)
    if last is None:
        return None
    norm, denom = last
    return (norm / denom).mul_(norm).view(())


@torch.no_grad()
def _sigma(weight: torch.Tensor, dim: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sigma = u^H W v with the stored u, v (a 0-d tensor; complex for complex weights)."""
    return torch.vdot(u, WeightMatrix(_upcast(weight), dim).mv(v))


def weight_grad(grad, weight, sigma, u, v, dim: int) -> torch.Tensor:
    """dL/dW of W -> W / sigma with u, v constant and sigma = u^H W v, from G = dL/dW_sn:

        (G - <W_sn, G> u v^H) / conj(sigma),   <A, B> = sum(conj(A) * B)

    (``dualsn.spec.normalized_weight_grad``). Computed in two passes over W: one dot
    product <W, G> (<W_sn, G> = <W, G> / conj(sigma)) and one fused rank-1 update.
    """
    mat = WeightMatrix(weight, dim)
    sigma_c = sigma.conj()
    dot = torch.vdot(weight.reshape(-1), grad.reshape(-1))
    if grad.device.type == "cpu" and not _is_compiling():
        # Reading the scalars is free on the CPU, and BLAS then scales while it adds.
        s_c = sigma_c.item()
        if s_c != 0:
            return mat.add_rank1(grad, u, v, 1 / s_c, -dot.item() / (s_c * s_c))
    # Elsewhere (CUDA, compiled code) a .item() would synchronize: keep the scalars in
    # tensors, at the price of a second pass. (Also sigma == 0: inf/nan, as tensors give.)
    out = mat.add_rank1(grad, u * (-dot / sigma_c), v, 1, 1)
    return out.div_(sigma_c)


def _weight_grad_differentiable(grad, weight, u, v, dim: int) -> torch.Tensor:
    """:func:`weight_grad` built from differentiable operations on W (sigma recomputed as
    u^H W v), for backward passes that record a graph (``create_graph=True``)."""
    mat = WeightMatrix(weight, dim)
    sigma = torch.vdot(u, mat.mv(v))
    dot = torch.vdot((weight / sigma).reshape(-1), grad.reshape(-1))
    return (grad - dot * mat.rank1(u, v)) / sigma.conj()


class _DivideBySigma(torch.autograd.Function):
    """``W -> W / sigma`` where sigma = u^H W v, with u, v and sigma's value given.

    Autograd of the plain expression would record ``W / sigma`` *and* the product
    ``u^H (W v)``, and its backward would make several W-sized temporaries. This backward is
    the closed form :func:`weight_grad` instead (same value, up to rounding). Saved: W (the
    input itself, no copy), sigma and the u, v clones.
    """

    @staticmethod
    def forward(ctx, weight, sigma, u, v, dim):
        ctx.save_for_backward(weight, sigma, u, v)
        ctx.dim = dim
        return weight / sigma

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        with _no_autocast(grad.device.type):  # backward() may be called inside autocast
            weight, sigma, u, v = ctx.saved_tensors
            if torch.is_grad_enabled():  # create_graph=True: the gradient must be differentiable
                grad_w = _weight_grad_differentiable(grad, weight, u, v, ctx.dim)
            else:
                grad_w = weight_grad(grad, weight, sigma, u, v, ctx.dim)
        return grad_w, None, None, None, None


def spectral_norm_forward(
    weight: torch.Tensor,
    u: torch.Tensor | None,
    v: torch.Tensor | None,
    dim: int,
    spec: _spec.Spec,
    training: bool,
) -> torch.Tensor:
    """The normalized weight for one forward (the whole per-forward computation, uncached).

    Training mode first runs ``spec.n_power_iterations`` iterations on the ``u``, ``v``
    buffers in place. Gradients flow into ``weight`` only; u and v are constants.
    """
    if weight.dtype in _LOW_PRECISION:
        # All the math in float32 (u, v are float32 too), the result cast back; autograd
        # carries the gradient through both casts.
        return spectral_norm_forward(weight.float(), u, v, dim, spec, training).to(weight.dtype)
    if spec.is_exact_vector(weight.ndim):
        return F.normalize(weight, dim=0, eps=spec.eps)
    if training:
        sigma = power_iteration_(weight, dim, u, v, spec.n_power_iterations, spec.order, spec.eps)
    else:
        sigma = _sigma(weight, dim, u, v)
    return _divide(weight, sigma, u, v, dim)


def _divide(weight, sigma, u, v, dim: int) -> torch.Tensor:
    """W / sigma, through :class:`_DivideBySigma` when autograd records it."""
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return weight / sigma
    # Clone u, v: a later forward updates the buffers in place, and this forward's backward
    # needs them as they are now (loss = D(real) - D(fake) runs two forwards, one backward).
    return _DivideBySigma.apply(weight, sigma, u.clone(), v.clone(), dim)


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
        n = weight.numel()
        if n <= _SAMPLES:
            self.index = torch.arange(n, device=weight.device)
        else:  # evenly spread, first and last included (integer arithmetic: exact for any n)
            self.index = torch.arange(_SAMPLES, device=weight.device) * (n - 1) // (_SAMPLES - 1)
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


# ---------------------------------------------------------------------------------------------
# The parametrization


def _seeded_uv(h: int, w: int, seed: int, like: torch.Tensor, eps: float):
    """u, v from ``spec.init_uv`` in the weight's compute dtype, on its device."""
    dtype = _compute_dtype(like.dtype)
    u0, v0 = _spec.init_uv(h, w, seed, _spec.init_dtype(str(dtype)), eps)
    return tuple(torch.from_numpy(a).to(device=like.device, dtype=dtype) for a in (u0, v0))


class SpectralNorm(nn.Module):
    """Parametrization ``W -> W / sigma(W)``, registered by :func:`spectral_norm`.

    Attributes ``spec`` (the :class:`dualsn.spec.Spec`) and ``dim`` (non-negative) describe
    the algorithm. Buffers ``_u`` and ``_v`` hold the singular-vector estimates; they are
    None (and absent from the state dict) for a weight the spec normalizes exactly. They
    are float32 for float16 / bfloat16 weights (the math then runs in float32 and the
    normalized weight is cast back), and stay float32 when the module is cast later.

    In eval mode, when no autograd graph is recorded (``torch.no_grad()``, or a frozen
    weight), the normalized weight is cached and returned again while W, u and v are
    unchanged (see :class:`_EvalCache`); ``cache_eval = False`` turns that off. When a graph
    is recorded only sigma is reused. The cache costs one extra W-sized tensor in memory; it
    is dropped by ``train()``/``eval()`` and device or dtype moves.

    The constructor only draws u and v; :func:`spectral_norm` runs the registration
    iterations.
    """

    def __init__(self, weight: torch.Tensor, dim: int, spec: _spec.Spec, seed: int | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.dim = dim
        self.cache_eval = True
        self._cache: _EvalCache | None = None
        u = v = None
        if not spec.is_exact_vector(weight.ndim):
            with torch.no_grad():
                h, w = _spec.matrix_shape(tuple(weight.shape), dim)
                if seed is not None:
                    u, v = _seeded_uv(h, w, seed, weight, spec.eps)
                else:
                    # The torch built-ins' draw: u's normals, then v's, from torch's RNG.
                    dtype = _compute_dtype(weight.dtype)
                    u = F.normalize(weight.new_empty(h).normal_(0, 1).to(dtype), dim=0, eps=spec.eps)
                    v = F.normalize(weight.new_empty(w).normal_(0, 1).to(dtype), dim=0, eps=spec.eps)
        self.register_buffer("_u", u)
        self.register_buffer("_v", v)

    # Names the torch built-in's parametrization exposes, for tools that read them.
    @property
    def n_power_iterations(self) -> int:
        return self.spec.n_power_iterations

    @property
    def eps(self) -> float:
        return self.spec.eps

    def iterate(self, weight: torch.Tensor, n: int) -> None:
        """``n`` power iterations on ``weight``'s W-matrix (no-op without u, v)."""
        if self._u is not None and n > 0:
            power_iteration_(weight, self.dim, self._u, self._v, n, self.spec.order, self.spec.eps)

    def sigma(self, weight: torch.Tensor) -> torch.Tensor:
        """sigma of ``weight`` from the current state, without iterating or recording grad."""
        with torch.no_grad():
            if self._u is None:
                return torch.linalg.vector_norm(_upcast(weight)).clamp_min(self.spec.eps)
            return _sigma(weight, self.dim, self._u, self._v)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
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
                return spectral_norm_forward(weight, self._u, self._v, self.dim, self.spec, self.training)
            return self._eval_forward(weight)

    def _eval_forward(self, weight: torch.Tensor) -> torch.Tensor:
        u, v = self._u, self._v
        cacheable = (
            self.cache_eval
            and not _is_compiling()
            and not (weight.is_inference() or u.is_inference() or v.is_inference())
        )
        if not cacheable:
            return _divide(weight, _sigma(weight, self.dim, u, v), u, v, self.dim)
        cache = self._cache
        if cache is None or not cache.valid(weight, u, v):
            # Built as normal tensors even in inference mode: their version counters can be
            # read, and sigma and the result stay usable where autograd records later.
            with torch.inference_mode(False), torch.no_grad():
                cache = self._cache = _EvalCache(weight, u, v, _sigma(weight, self.dim, u, v))
        if torch.is_grad_enabled() and weight.requires_grad:
            # autograd needs a graph from W: reuse sigma only
            return _divide(weight, cache.sigma, u, v, self.dim)
        with torch.inference_mode(False), torch.no_grad():
            out = weight / cache.sigma
        cache.set_output(out)
        return out

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._cache = None
        before = (self._u, self._v)
        result = super()._apply(fn, *args, **kwargs)
        if self._u is not None and self._u.dtype in _LOW_PRECISION:
            # module.half() / .to(torch.bfloat16): u, v stay float32 (see _compute_dtype),
            # taken from before the cast so that they are not rounded through half precision.
            device = self._u.device
            self._u, self._v = (t.to(device=device, dtype=torch.float32) for t in before)
        return result

    def __getstate__(self):
        # copies and pickles start without a cache
        state = super().__getstate__()
        state["_cache"] = None
        return state

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        # Assigning module.<name> = X stores X itself as the unnormalized weight.
        return value

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"dim={self.dim}, n_power_iterations={s.n_power_iterations}, eps={s.eps}, "
            f"order={s.order!r}, vector_mode={s.vector_mode!r}"
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


def spectral_norm(
    module: nn.Module,
    name: str = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int | None = None,
    *,
    compat: str = "torch",
    seed: int | None = None,
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

    Like the built-in, ``module.<name>`` is recomputed on every access, and every access in
    training mode runs the power iteration. Everything is validated before the module is
    touched: a failed call leaves it as it was.
    """
    sn_spec = _spec.make_spec(compat, n_power_iterations, eps)
    _spec.check_seed(seed)
    if not isinstance(module, nn.Module):
        raise TypeError(f"Expected module to be a torch.nn.Module, but got {type(module).__name__}")
    if not isinstance(name, str):
        raise ValueError(f"Expected name to be a str, but got name={name!r}")
    if _has_any_spectral_norm(module, name):
        raise RuntimeError(f"Cannot register two spectral norms on the same parameter {name!r}")
    is_tensor = (
        module._parameters.get(name) is not None
        or module._buffers.get(name) is not None
        or parametrize.is_parametrized(module, name)
    )
    if not is_tensor:
        raise ValueError(
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
    dim = _spec.canonical_dim(
        _spec.default_dim(_is_dim_1_layer(module), weight.ndim) if dim is None else dim, weight.ndim
    )

    # Validation is over; from here on the module changes.
    s = _spec.next_seed(seed)
    parametrization = SpectralNorm(weight, dim, sn_spec, s)
    parametrization.iterate(weight, sn_spec.registration_iterations(module.training))
    # unsafe=True: register_parametrization would otherwise evaluate the parametrization once
    # (one more iteration in training mode); registration_iterations already counts that.
    parametrize.register_parametrization(module, name, parametrization, unsafe=True)
    _make_picklable(module)
    return module


def remove_spectral_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Remove dualsn's spectral norm from ``module.<name>`` and return ``module``.

    ``module.<name>`` becomes a plain, fresh leaf Parameter (a buffer if it was one) holding
    W / sigma with the current u, v: no power iteration runs, in either mode. Being a new
    tensor, it must be given to the optimizer again. ValueError if there is no dualsn
    spectral norm on ``name``; RuntimeError if other parametrizations share it.
    """
    found = _find(module, name)
    if found is None:
        raise ValueError(f"Expected a dualsn spectral norm on name={name!r}, but {type(module).__name__} has none")
    plist, _, sn = found
    if len(plist) != 1:
        raise RuntimeError(
            f"Cannot remove the spectral norm from {name!r} while other parametrizations are "
            "registered on it; remove those first (torch.nn.utils.parametrize.remove_parametrizations)"
        )
    original = plist.original
    with torch.no_grad():
        normalized = spectral_norm_forward(original, sn._u, sn._v, sn.dim, sn.spec, training=False)
        normalized = normalized.detach().clone()
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

    No power iteration runs. For a weight normalized exactly it is max(||W||, eps).
    """
    found = _find(module, name)
    if found is None:
        raise ValueError(f"Expected a dualsn spectral norm on name={name!r}, but {type(module).__name__} has none")
    plist, index, sn = found
    with torch.no_grad():
        return float(sn.sigma(_sn_input(plist, index)).real.item())


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
