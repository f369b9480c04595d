"""The SN object: :class:`SpectralNorm`, the forward-pre-hook that sets ``layer.<name>`` to
the normalized weight, and :class:`SpectralNormConv`, its convolution-operator-norm variant;
with :func:`_normalized_weight`, the one forward computation both paths (fast, plain) share."""

from __future__ import annotations

import paddle

from dualsn import keys as _keys
from dualsn import spec as _spec
from dualsn.paddle import _iteration, _plain
from dualsn.paddle._cache import _EvalCache, _SigmaRecord, _write_sigma_buffer
from dualsn.paddle._dtypes import _amp_off, _is_complex, _is_low_precision, _upcast
from dualsn.paddle._grad import _divide, _exact_normalized_weight, _needs_graph
from dualsn.paddle._matrix import ConvGeometry, ConvOperator, WeightMatrix

# _iteration._sigma_value is looked up on its module at each call (not imported by name), so
# that a test can replace it there and see every computation of u^H M v.


def _normalized_weight(weight, vectors, dim: int, spec: _spec.Spec, do_power_iteration: bool, recovery=(None, None)):
    """:func:`dualsn.paddle.normalized_weight` with the extra pairs of ``num_svs``: ``vectors``
    = (u, v, extra_u, extra_v), and the ``recovery`` (u, v) of ``dualsn.spec.recovery_uv``.
    Returns (normalized weight, sigma as a number, power iterations run); sigma is None in a
    static graph (no host values there)."""
    u, v = vectors[0], vectors[1]
    if _is_low_precision(weight.dtype):
        # All the math in float32 (u, v are float32 too), the result cast back; autograd
        # carries the gradient through both casts.
        wide, sigma, count = _normalized_weight(
            weight.astype(paddle.float32), vectors, dim, spec, do_power_iteration, recovery
        )
        return wide.astype(weight.dtype), sigma, count
    # Paddle: static graphs (to_static) take the plain path, as the fast one reads norms on the
    # host; torch's fast path falls back to tensor ops under torch.compile instead.
    if _plain.enabled() or not paddle.in_dynamic_mode():
        return _plain._plain_normalized_weight(weight, vectors, dim, spec, do_power_iteration, recovery)
    if u is None:
        return _exact_normalized_weight(weight, spec, do_power_iteration)
    mat = WeightMatrix(weight, dim)
    sigma, count = _iteration._forward_sigma(mat, vectors, spec, do_power_iteration, recovery, weight.dtype)
    return _divide(weight, mat, sigma, u, v, spec), sigma, count


# Paddle: a forward-pre-hook, as paddle.nn.utils.spectral_norm is (same state-dict keys):
# Paddle has no parametrize module, which dualsn.torch's SpectralNorm is built on.
class SpectralNorm:
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
    Without it, once :func:`sigma` has been read, every forward keeps its sigma on the hook
    (not in the state dict), and :func:`sigma` returns it without a product while W, u and v
    are unchanged (the first read computes u^H M v).

    Called ``SpectralNormHook`` before the backends were mirrored; that name still works.
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
        self._keep_sigma = False  # set by the first sigma() read: from then on forwards keep a record
        self._recovery_cache = None
        self._state_keys = self._keys_of(name)

    @staticmethod
    def _keys_of(name: str) -> tuple[str, str, str]:
        """The state's keys (W_orig, u, v), built once: each forward looks them up."""
        return _keys.hook_key(name), _keys.hook_key(name, "u"), _keys.hook_key(name, "v")

    def state(self, layer):
        """(W_orig, u, v) of ``layer``; u, v are None for an exact 1-D weight."""
        if not paddle.in_dynamic_mode():  # static graphs: through the layer's own lookup
            names = [_keys.hook_key(self.name)] + ([] if self.exact else [_keys.hook_key(self.name, "u"), _keys.hook_key(self.name, "v")])
            found = [getattr(layer, n) for n in names]
            return tuple(found) if not self.exact else (found[0], None, None)
        # The layer's dicts first: Layer.__getattr__ costs tens of microseconds per call
        # right after a large forward has evicted the caches.
        w_key, u_key, v_key = self._state_keys
        weight = layer._parameters.get(w_key)
        if weight is None:
            weight = getattr(layer, w_key)
        if self.exact:
            return weight, None, None
        buffers = layer._buffers
        u, v = buffers.get(u_key), buffers.get(v_key)
        if u is None or v is None:
            u, v = getattr(layer, u_key), getattr(layer, v_key)
        # Paddle: u, v are the user's layer's buffers, not the hook's, so a cast is undone here;
        # torch's SpectralNorm owns them and keeps them float32 in _apply.
        if _is_low_precision(u.dtype):
            # The layer was cast after registration (layer.to, amp.decorate at level O2):
            # u, v go back to float32, the dtype the math runs in (see _compute_dtype).
            u, v = u.astype(paddle.float32), v.astype(paddle.float32)
            layer._buffers[_keys.hook_key(self.name, "u")], layer._buffers[_keys.hook_key(self.name, "v")] = u, v
        return weight, u, v

    def extras(self, layer):
        """(extra u rows, extra v rows) of ``num_svs > 1``, or (None, None)."""
        if self.spec.num_svs == 1 or self.exact:
            return None, None
        names = (_keys.hook_key(self.name, "u_extra"), _keys.hook_key(self.name, "v_extra"))
        pair = [layer._buffers.get(n) for n in names]
        if pair[0] is None or pair[1] is None:
            pair = [getattr(layer, n) for n in names]
        if _is_low_precision(pair[0].dtype):  # cast with the layer: back to float32, as u, v
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
        # Paddle: drawn when first needed and kept on the hook (torch keeps non-persistent buffers);
        # the key redraws them after a cast or a move.
        key = (u.dtype, str(u.place), tuple(u.shape), tuple(v.shape))
        cached = self._recovery_cache
        if cached is None or cached[0] != key:
            cached = self._recovery_cache = (key, _iteration._recovery_uv(u, v, self.seed, self.spec.eps))
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
            self._keep_sigma = True
            record = self._record
            if record is not None and not _plain.enabled() and paddle.in_dynamic_mode() and record.valid(weight, u, v):
                return record.sigma
            value = _iteration._sigma_value(self._operator(weight), u, v)
        if paddle.in_dynamic_mode() and not _plain.enabled():
            self._record = _SigmaRecord(weight, u, v, value)
        return value

    def singular_values(self, layer) -> list:
        """u_i^H M v_i for every pair, from the current state: sigma first, then one per
        extra pair of ``num_svs``."""
        values = [self.sigma(layer)]
        u_extra, v_extra = self.extras(layer)
        if u_extra is not None:
            op = self._operator(self.state(layer)[0])
            values += [_iteration._sigma_value(op, u_extra[i], v_extra[i]) for i in range(int(u_extra.shape[0]))]
        return values

    def _publish(self, layer, weight, u, v, sigma, count: int) -> None:
        """After a forward: the iteration count, the kept sigma, the ``_sigma`` buffer."""
        self.last_iterations = count
        if sigma is None:  # a static graph: no host values
            return
        if u is not None:
            keep = self._keep_sigma and not _plain.enabled()
            # torch keeps a record only once sigma() has been read, too: training forwards stay lean
            self._record = _SigmaRecord.renewed(self._record, weight, u, v, sigma) if keep else None
        if self.track_sigma:
            self._write_sigma(layer, sigma)

    def _write_sigma(self, layer, sigma) -> None:
        _write_sigma_buffer(layer._buffers[_keys.hook_key(self.name, "sigma")], sigma)

    def invalidate(self) -> None:
        """Forget the cached eval-mode weight and the kept sigma: the next forward computes
        them afresh."""
        self._cache = None
        self._record = None

    def __call__(self, layer, inputs) -> None:
        # A cache hit computes nothing: it needs neither auto_cast off nor the error context.
        value = self._cache_hit(layer)
        if value is None:
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

    def _cache_hit(self, layer):
        """The eval cache's normalized weight when this forward may reuse it (see
        :meth:`_may_cache`) and W, u and v are unchanged (see :class:`_EvalCache`); else None.

        The conditions of :meth:`_may_cache` and the lookups of :meth:`state` are written out
        here: every eval forward runs this, in a CPU cache the layer's own pass has just
        cleared (measured against calling the two: 2-6 us less per forward at 256^2 and
        1024^2, issue 14). A layer cast after registration has new u, v tensors, so the
        cache misses before their dtype matters."""
        cache = self._cache
        if cache is None or layer.training or _plain.ENABLED or not paddle.in_dynamic_mode():
            return None
        w_key, u_key, v_key = self._state_keys
        weight = layer._parameters.get(w_key)
        if weight is None or (paddle.is_grad_enabled() and not weight.stop_gradient):
            return None
        buffers = layer._buffers
        value = cache.get(weight, buffers.get(u_key), buffers.get(v_key))
        if value is not None:
            self.last_iterations = 0
            if self.track_sigma:
                self._write_sigma(layer, cache.sigma)
        return value

    @staticmethod
    def _may_cache(layer, weight, u) -> bool:
        """Whether this forward may use the eval cache: eval, u and v, no graph to record."""
        return (
            not layer.training
            and u is not None
            and not _plain.enabled()
            # Paddle: no cache in static graphs (no host values), as torch has none under compile.
            and paddle.in_dynamic_mode()
            and not _needs_graph(weight)
        )

    def _forward_weight(self, layer):
        """The normalized weight of a forward that :meth:`_cache_hit` did not serve."""
        weight, u, v = self.state(layer)
        if not self._may_cache(layer, weight, u):
            self._cache = None
            value, sigma, count = self._compute(layer, weight, u, v, layer.training)
            self._publish(layer, weight, u, v, sigma, count)
            return value
        return self._eval_weight(layer, weight, u, v)

    def _eval_weight(self, layer, weight, u, v):
        """An eval forward that needs no graph and missed the cache: computed, and cached."""
        self.last_iterations = 0
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
        self.__dict__.update({"seed": None, "_recovery_cache": None, "_keep_sigma": False, **state})
        self._state_keys = self._keys_of(self.name)

    def __repr__(self) -> str:
        extra = ", track_sigma=True" if self.track_sigma else ""
        # repr keeps the class's name from before the mirror rename (SpectralNormConv's too)
        name = "SpectralNormHook" if type(self) is SpectralNorm else type(self).__name__
        return f"{name}(name={self.name!r}, dim={self.dim}, spec={self.spec}{extra})"


class SpectralNormConv(SpectralNorm):
    """Forward-pre-hook that divides a convolution's kernel by the operator norm of the
    convolution itself (registered by :func:`spectral_norm_conv`).

    ``<name>_u`` (shape ``geometry.output_shape``) and ``<name>_v`` (``geometry.input_shape``)
    live in the output and input activation spaces of one sample; the power iteration is
    :func:`dualsn.reference.power_step` on the explicit convolution matrix, computed with the
    layer's convolution and the matching transposed convolution (:class:`ConvOperator`).
    ``dim`` is None: no axis of the kernel is singled out. Formerly ``SpectralNormConvHook``.
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
        if _is_low_precision(weight.dtype):
            # float32 math (Paddle's CPU convolutions have no half kernels), cast back
            wide, sigma, count = self._compute(layer, weight.astype(paddle.float32), u, v, do_power_iteration)
            return wide.astype(weight.dtype), sigma, count
        op = ConvOperator(weight, self.geometry)
        plain = _plain.enabled() or not paddle.in_dynamic_mode()
        if do_power_iteration and not paddle.in_dynamic_mode():
            raise NotImplementedError(
                "spectral_norm_conv needs dynamic mode in training (outside paddle.jit.to_static)"
            )
        vectors, recovery = (u, v, None, None), (None, None)
        if do_power_iteration:
            vectors, recovery = (u, v) + self.extras(layer), self._recovery(u, v)
        if plain:
            return _plain._plain_conv_normalized_weight(weight, op, vectors, spec, do_power_iteration, recovery)
        sigma, count = _iteration._forward_sigma(op, vectors, spec, do_power_iteration, recovery, weight.dtype)
        return _divide(weight, op, sigma, u, v, spec), sigma, count

    def __repr__(self) -> str:
        g = self.geometry
        extra = ", track_sigma=True" if self.track_sigma else ""
        return (
            f"SpectralNormConvHook(name={self.name!r}, input_shape={g.input_shape}, "
            f"output_shape={g.output_shape}, spec={self.spec}{extra})"
        )


# The names before the two backends were mirrored (tests and saved code use them).
SpectralNormHook = SpectralNorm
SpectralNormConvHook = SpectralNormConv
