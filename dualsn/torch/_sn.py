"""The SN objects: :class:`SpectralNorm`, the parametrization ``W -> W / sigma(W)`` that
:func:`spectral_norm` registers, and :class:`SpectralNormConv`, its subclass for the operator
norm of a convolution (:func:`spectral_norm_conv`).

A forward takes one of three routes: the plain path (:mod:`._plain`, under ``plain_path()``),
the eval cache's kept output (:mod:`._cache`), or the fast computation: the training steps of
:mod:`._iteration` and the fused division of :mod:`._grad`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dualsn import keys as _keys
from dualsn import spec as _spec
from dualsn.torch import _cache, _plain
from dualsn.torch._dtypes import _LOW_PRECISION, _compute_dtype, _no_autocast, _upcast
from dualsn.torch._grad import _divide, _divided, _divisor, _normalize_exact
from dualsn.torch._iteration import (
    _exact_sigma,
    _recovery_uv,
    _sigma,
    _step,
    _training_steps,
    initial_extra_uv,
    initial_uv,
)
from dualsn.torch._matrix import ConvGeometry, ConvOperator, WeightMatrix

# The parametrization's buffers, named as torch's state-dict keys show them (dualsn.keys).
_U, _V, _U_EXTRA, _V_EXTRA, _SIGMA = (_keys.buffer_name(role) for role in _keys.STATE_ROLES)
_U_RECOVERY, _V_RECOVERY = (_keys.buffer_name(role) for role in _keys.RECOVERY_ROLES)
_STATE_BUFFERS = (_U, _V, _U_EXTRA, _V_EXTRA, _SIGMA, _U_RECOVERY, _V_RECOVERY)
"""The buffers a :class:`SpectralNorm` may hold (all in the compute dtype)."""


# torch: a parametrization, as torch's built-in is (same state-dict keys); Paddle has no
# parametrize, so dualsn.paddle's SpectralNorm is a forward-pre-hook.
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
    is dropped by ``train()``/``eval()``, device or dtype moves and :func:`invalidate_cache`.

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
        self.cache_eval = True
        self.owner = "the module"  # named in errors; _register says which parameter of which module
        self.track_sigma = bool(track_sigma)
        self.last_iterations = 0
        self.last_sigma: torch.Tensor | None = None
        self._cache: _cache._EvalCache | None = None
        self._record: _cache._SigmaRecord | None = None
        self._keep_sigma = False  # set by the first sigma() read: from then on forwards keep a record
        self._sample_index = None  # _SigmaRecord's sample positions, and the size they are for
        self._sample_numel = 0
        dtype = _compute_dtype(weight.dtype)
        u = v = u_extra = v_extra = None
        if shapes is not None:
            u, v, u_extra, v_extra = self._draw_state(weight, shapes, seed)
        self.register_buffer(_U, u)
        self.register_buffer(_V, v)
        if u_extra is not None:
            self.register_buffer(_U_EXTRA, u_extra)
            self.register_buffer(_V_EXTRA, v_extra)
        if self.track_sigma:
            sigma_dtype = dtype if u is not None else torch.empty((), dtype=dtype).real.dtype
            self.register_buffer(_SIGMA, torch.zeros((), dtype=sigma_dtype, device=weight.device))

    def _draw_state(self, weight: torch.Tensor, shapes, seed: int | None):
        """(u, v, extra u rows, extra v rows) drawn for ``shapes`` (extras None without
        ``num_svs``); registers the recovery buffers."""
        spec = self.spec
        h, w = math.prod(shapes[0]), math.prod(shapes[1])
        k = spec.num_svs - 1
        u_extra = v_extra = None
        with torch.no_grad():
            u, v = initial_uv(weight, h, w, seed, spec.eps)
            if k:
                u_extra, v_extra = initial_extra_uv(weight, h, w, k, seed, spec.eps)
            # Non-persistent buffers (not in the state dict): they follow .to() and work
            # under torch.compile, where drawing them with numpy could not run.
            recovery = _recovery_uv(weight, h, w, seed, spec.eps)
            for name, x in zip((_U_RECOVERY, _V_RECOVERY), recovery):
                self.register_buffer(name, x, persistent=False)
        u, v = u.view(shapes[0]), v.view(shapes[1])
        if k:
            u_extra, v_extra = u_extra.view(k, *shapes[0]), v_extra.view(k, *shapes[1])
        return u, v, u_extra, v_extra

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
        return b[_U], b[_V], b.get(_U_EXTRA), b.get(_V_EXTRA)

    def _sigma_of(self, weight: torch.Tensor) -> torch.Tensor:
        """u^H M v from the current state (no iteration, no graph)."""
        return _sigma(weight, self.dim, self._u, self._v)

    def _divide_by(self, weight: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """W / sigma (or the ``coeff`` divisor), differentiable in W with u, v constant."""
        return _divide(weight, sigma, self._u, self._v, self.dim, self.spec)

    def _plain_operator(self, weight: torch.Tensor) -> _plain._PlainMatrix:
        """The operator of the plain path (:func:`plain_path`)."""
        return _plain._PlainMatrix(weight, self.dim)

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
            kept = _cache.kept_sigma(self, weight)
            if kept is not None:
                return kept
            value = self._sigma_of(weight)
            _cache.remember(self, weight, value)
            return value

    def singular_values(self, weight: torch.Tensor) -> list[float]:
        """u_i^H M v_i for every pair (real parts): sigma first, then the extra estimates."""
        values = [self.sigma(weight)]
        u_extra = self._buffers.get(_U_EXTRA)
        if u_extra is not None:
            with torch.no_grad():
                op = self._operator(_upcast(weight))
                _, _, us, vs = self._vectors()
                values += [torch.vdot(us[i], op.mv(vs[i])) for i in range(us.shape[0])]
        return [float(s.real.item()) for s in values]

    def invalidate(self) -> None:
        """Forget the cached eval-mode weight and the kept sigma: the next forward computes
        them afresh."""
        self._cache = None
        self._record = None

    def _publish(self, weight: torch.Tensor, sigma: torch.Tensor | None) -> None:
        """After a forward: keep sigma (``last_sigma``; and, once :func:`sigma` has been read,
        a record to check it by), and write it into the ``_sigma`` buffer if tracked."""
        attrs = self.__dict__
        attrs["last_sigma"] = sigma
        if sigma is not None and attrs["_keep_sigma"]:
            _cache.remember(self, weight, sigma)
        if self.track_sigma:
            with torch.no_grad():
                self._sigma.copy_(_exact_sigma(weight, self.spec.eps) if sigma is None else sigma)

    def _publish_eval(self, weight: torch.Tensor, sigma: torch.Tensor) -> None:
        """:meth:`_publish` after an eval forward through :func:`_cache.eval_forward`: no record
        of a sigma the eval cache keeps already."""
        attrs = self.__dict__
        attrs["last_iterations"] = 0
        attrs["last_sigma"] = sigma
        if self._keep_sigma and (self._cache is None or self._cache.sigma is not sigma):
            _cache.remember(self, weight, sigma)  # not kept by the eval cache
        if self.track_sigma:
            with torch.no_grad():
                self._sigma.copy_(sigma)

    def _compute(self, weight: torch.Tensor, training: bool):
        """(normalized weight, sigma) for one forward, uncached; sigma is None for an exactly
        normalized weight."""
        if weight.dtype in _LOW_PRECISION:
            # All the math in float32 (u, v are float32 too), the result cast back; autograd
            # carries the gradient through both casts.
            out, sigma = self._compute(weight.float(), training)
            return out.to(weight.dtype), sigma
        attrs = self.__dict__  # last_iterations is a plain attribute: skip nn.Module.__setattr__
        if self._buffers[_U] is None:
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
        if b.get(_U_RECOVERY) is None:
            return None, None
        u, v = b[_U_RECOVERY], b[_V_RECOVERY]
        if u.dtype == like.dtype:
            return u, v
        return u.to(like.dtype), v.to(like.dtype)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # The eval cache first, outside the error context: a hit computes nothing, and it
        # runs cache-cold after the layer's pass, where each Python call costs about a
        # microsecond (issue 14).
        if not _plain.ENABLED and self._cache is not None:
            out = _cache.cached_output(self, weight)
            if out is not None:
                return out  # eval, nothing changed: the fast path (see _EvalCache)
        try:
            return self._forward(weight)
        except FloatingPointError as error:
            raise FloatingPointError(f"spectral norm of {self.owner}: {error}") from None

    def _forward(self, weight: torch.Tensor) -> torch.Tensor:
        if _plain.ENABLED:
            return self._plain_forward(weight)
        with _no_autocast(weight.device.type):
            if self.training or self._u is None or weight.dtype in _LOW_PRECISION:
                out, sigma = self._compute(weight, self.training)
                self._publish(weight, sigma)
            else:
                out, sigma = _cache.eval_forward(self, weight)
                self._publish_eval(weight, sigma)
        return out

    def _plain_forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The forward under :func:`plain_path`: the same state updates, neither the eval cache
        nor the kept sigma touched."""
        vectors = self._vectors()
        recovery = (None, None) if vectors[0] is None else self._recovery(vectors[0])
        out, sigma, count = _plain._plain_normalized_weight(
            weight, self._plain_operator, vectors, self.spec, self.training, recovery
        )
        attrs = self.__dict__
        attrs["last_iterations"] = count
        attrs["last_sigma"] = None if self._u is None else sigma
        if self.track_sigma:
            with torch.no_grad():
                self._sigma.copy_(sigma)
        return out

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
    :func:`dualsn.reference.power_step` on the explicit convolution matrix, computed with the
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
        u_extra = self._buffers.get(_U_EXTRA)
        if u_extra is None:
            return self._u.view(-1), self._v.view(-1), None, None
        k = u_extra.shape[0]
        return self._u.view(-1), self._v.view(-1), u_extra.view(k, -1), self._v_extra.view(k, -1)

    def _sigma_of(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.vdot(self._u.view(-1), self._operator(_upcast(weight)).mv(self._v.view(-1)))

    def _divide_by(self, weight: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and weight.requires_grad):
            return _divided(weight, sigma, self.spec)
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
