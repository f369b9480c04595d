"""Lookup and registration: which hooks a layer has, the checks registration makes before it
touches the layer (target weight, free attribute names), registration itself, removal, and
the layer classes whose default dim is 1."""

from __future__ import annotations

import functools
import importlib

import paddle

from dualsn import keys as _keys
from dualsn import options as _options
from dualsn import spec as _spec
from dualsn.paddle._cache import _SigmaRecord
from dualsn.paddle._dtypes import _compute_dtype, _is_complex, _real_dtype
from dualsn.paddle._iteration import _iterate_, initial_extra_uv, initial_uv
from dualsn.paddle._matrix import _prod
from dualsn.paddle._sn import SpectralNorm

def _hooks_on(layer, name: str):
    """(hook id, hook) of every spectral-norm hook on ``name``: dualsn's and the built-in's."""
    found = []
    for hook_id, hook in layer._forward_pre_hooks.items():
        if getattr(hook, "name", None) != name:
            continue
        # Paddle's built-in hook class is called SpectralNorm too: dualsn's is told by isinstance
        if isinstance(hook, SpectralNorm) or type(hook).__name__ == "SpectralNorm":
            found.append((hook_id, hook))
    return found

def get_spectral_norm(layer, name: str = "weight") -> SpectralNorm | None:
    """The dualsn hook normalizing ``layer.<name>``, or None."""
    for _, hook in _hooks_on(layer, name):
        if isinstance(hook, SpectralNorm):
            return hook
    return None

def is_spectral_norm(layer, name: str = "weight") -> bool:
    """True when dualsn spectral norm is applied to ``layer.<name>``."""
    return get_spectral_norm(layer, name) is not None

# ---------------------------------------------------------------------------------------------

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

def _check_is_layer(layer, function: str) -> None:
    """TypeError naming the right function when ``layer`` is not a Paddle layer (a torch
    module would otherwise fail deep inside Paddle)."""
    if not isinstance(layer, paddle.nn.Layer):
        raise _options.wrong_model("paddle", layer, function)

def _target_weight(layer, name):
    """The parameter spectral norm would be put on, after the checks both entry points share
    (nothing is changed)."""
    _spec.check_name(name)
    if _hooks_on(layer, name):
        raise RuntimeError(f"Cannot register two spectral_norm hooks on the same parameter {name!r}")
    weight = layer._parameters.get(name)
    if weight is None:
        # KeyError, as paddle.nn.utils.spectral_norm raises (and a ValueError: see spec)
        raise _options.parameter_not_found(name, type(layer).__name__, "parameter", layer._parameters)
    # Paddle's built-in accepts an integer weight here and fails at the first forward.
    _options.check_weight_dtype(name, weight.dtype, paddle.is_floating_point(weight) or _is_complex(weight))
    _spec.check_weight_shape(tuple(weight.shape), name)
    return weight

def _state_names(name: str, exact: bool, spec: _spec.Spec, track_sigma: bool) -> list[str]:
    """The layer attributes registration adds (besides ``name`` itself)."""
    names = [_keys.hook_key(name)]
    if not exact:
        names += [_keys.hook_key(name, "u"), _keys.hook_key(name, "v")]
        if spec.num_svs > 1:
            names += [_keys.hook_key(name, "u_extra"), _keys.hook_key(name, "v_extra")]
    if track_sigma:
        names.append(_keys.hook_key(name, "sigma"))
    return names

# Paddle: the state goes onto the user's layer as <name>_u, <name>_v, ...: those names must be
# free (torch's sit inside the parametrization module).
def _check_free(layer, name: str, names) -> None:
    for attr in names:
        if hasattr(layer, attr):
            raise ValueError(
                f"Cannot apply spectral_norm to {name!r}: {type(layer).__name__} already has an "
                f"attribute {attr!r}, which spectral_norm needs for its state"
            )

def _register(layer, weight, hook: SpectralNorm, shapes, seed: int | None):
    """Registration proper, once everything is validated: draws u, v of ``shapes`` = (u's
    shape, v's shape) (None: exact normalization) and the extra pairs, runs the registration
    iterations, computes the normalized weight and sigma, and only then changes the layer."""
    hook.seed = seed
    vectors = (None, None, None, None)
    if shapes is not None:
        with paddle.no_grad():
            vectors = _initial_vectors(weight, hook.spec, shapes, seed)
            try:
                _iterate_(
                    hook._operator(weight), vectors[0], vectors[1], hook.spec.registration_iterations(layer.training),
                    hook.spec.order, hook.spec.eps, vectors[2], vectors[3], hook._recovery(vectors[0], vectors[1]),
                )
            except FloatingPointError as error:
                raise FloatingPointError(f"spectral norm of {hook.name!r} in {type(layer).__name__}: {error}") from None
    u, v = vectors[0], vectors[1]
    normalized, sigma, _ = hook._compute(layer, weight, u, v, do_power_iteration=False)
    if u is not None and paddle.in_dynamic_mode():
        hook._record = _SigmaRecord(weight, u, v, sigma)
    _install(layer, weight, hook, vectors, normalized, sigma)
    return layer

def _initial_vectors(weight, spec: _spec.Spec, shapes, seed: int | None):
    """(u, v, extra u rows, extra v rows) drawn for ``shapes`` (the extras None without
    ``num_svs > 1``), before the registration iterations."""
    h, w = _prod(shapes[0]), _prod(shapes[1])
    k = spec.num_svs - 1
    u_extra = v_extra = None
    u, v = initial_uv(weight, h, w, seed, spec.eps)
    if k:
        u_extra, v_extra = initial_extra_uv(weight, h, w, k, seed, spec.eps)
        u_extra, v_extra = u_extra.reshape([k, *shapes[0]]), v_extra.reshape([k, *shapes[1]])
    if len(shapes[0]) != 1 or len(shapes[1]) != 1:
        u, v = u.reshape(list(shapes[0])), v.reshape(list(shapes[1]))
    return u, v, u_extra, v_extra

def _install(layer, weight, hook: SpectralNorm, vectors, normalized, sigma) -> None:
    """Change the layer: W to ``<name>_orig``, the state buffers, ``<name>`` and the hook."""
    name = hook.name
    u, v, u_extra, v_extra = vectors
    # The same Parameter object moves to <name>_orig, so optimizers built before still see it.
    del layer._parameters[name]
    layer.add_parameter(_keys.hook_key(name), weight)
    if u is not None:
        layer.register_buffer(_keys.hook_key(name, "u"), u)
        layer.register_buffer(_keys.hook_key(name, "v"), v)
    if u_extra is not None:
        layer.register_buffer(_keys.hook_key(name, "u_extra"), u_extra)
        layer.register_buffer(_keys.hook_key(name, "v_extra"), v_extra)
    if hook.track_sigma:
        # u's dtype (complex for complex weights, float32 for half ones), real without u
        dtype = u.dtype if u is not None else _real_dtype(_compute_dtype(weight.dtype))
        layer.register_buffer(_keys.hook_key(name, "sigma"), paddle.zeros([], dtype=dtype))
        hook._write_sigma(layer, sigma)
    # A plain tensor attribute, which Paddle keeps as a non-persistable buffer: not in state_dict.
    setattr(layer, name, normalized)
    layer.register_forward_pre_hook(hook)

def _unregister(layer, name: str, hook: SpectralNorm, value) -> None:
    """Undo :func:`_register`: ``<name>`` becomes a fresh trainable Parameter holding
    ``value``, and the hook and all spectral-norm state are removed."""
    param = paddle.create_parameter(
        value.shape, value.dtype, default_initializer=paddle.nn.initializer.Constant(0.0)
    )
    param.set_value(value)
    param.stop_gradient = False

    for hook_id, found in list(layer._forward_pre_hooks.items()):
        if found is hook:
            del layer._forward_pre_hooks[hook_id]
            layer._forward_pre_hooks_with_kwargs_flag.pop(hook_id, None)
    del layer._parameters[_keys.hook_key(name)]
    for buffer in (name, _keys.hook_key(name, "u"), _keys.hook_key(name, "v"), _keys.hook_key(name, "u_extra"), _keys.hook_key(name, "v_extra"), _keys.hook_key(name, "sigma")):
        layer._buffers.pop(buffer, None)
        layer._non_persistable_buffer_names_set.discard(buffer)
    layer.add_parameter(name, param)

def _conv_classes() -> tuple[type, ...]:
    return (paddle.nn.Conv1D, paddle.nn.Conv2D, paddle.nn.Conv3D)

def _require(layer, name: str, function: str) -> SpectralNorm:
    _check_is_layer(layer, function)
    _spec.check_name(name)
    hook = get_spectral_norm(layer, name)
    if hook is None:
        raise ValueError(f"spectral_norm of {name!r} not found in {type(layer).__name__}")
    return hook
