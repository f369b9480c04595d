"""Spectral normalization for PaddlePaddle layers, following :mod:`dualsn.spec` exactly.

Like ``paddle.nn.utils.spectral_norm`` this is a forward-pre-hook: the trainable weight
lives in ``<name>_orig``, the power-iteration vectors in the persistable buffers ``<name>_u``
and ``<name>_v`` (the built-in's own keys, so its checkpoints load unchanged), and before
every forward the hook writes the normalized weight to the plain attribute ``<name>``.
Unlike the built-in, ``<name>`` holds the normalized weight from registration on, the
algorithm (update order, warm-up, 1-D handling) comes from the chosen ``compat`` preset, and
a ``seed`` gives u, v that are bit-identical to ``dualsn.torch``'s.

This module imports paddle (and numpy, dualsn.spec) and no other framework.
"""

from __future__ import annotations

import functools
import importlib

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
]


# ---------------------------------------------------------------------------------------------
# The per-forward math. Kept in a handful of small functions so that a fused
# paddle.autograd.PyLayer can replace `normalized_weight` later without touching the hook.


def _is_complex(x) -> bool:
    return bool(paddle.is_complex(x))


def _normalize(x, eps: float):
    """N(x) = x / max(||x||, eps) for a 1-D tensor, differentiable."""
    if not _is_complex(x):
        # The very op the Paddle built-in uses, so compat="paddle" matches it bit for bit.
        return F.normalize(x, axis=0, epsilon=eps)
    # Paddle's p_norm has no complex kernel; the norm of the (re, im) pairs is the same
    # number, and p_norm's gradient stays finite at zero.
    norm = paddle.linalg.norm(paddle.as_real(x).flatten())
    norm = paddle.maximum(norm, paddle.full([], eps, dtype=norm.dtype))
    return x / paddle.cast(norm, x.dtype)


def _to_matrix(weight, dim: int):
    """The W-matrix: ``dim`` moved to the front, the other axes flattened (1-D: n x 1)."""
    if dim != 0:
        weight = weight.transpose(list(_spec.permutation(weight.ndim, dim)))
    return weight.reshape([weight.shape[0], -1])


def _mat_h_vec(w_mat, u):
    """W^H u, without materializing W^T (matmul's transpose flag reads W in place)."""
    if _is_complex(w_mat):
        # conj(W^T conj(u)) == W^H u, and only vector-sized tensors get conjugated.
        return paddle.conj(paddle.matmul(w_mat, paddle.conj(u), transpose_x=True))
    return paddle.matmul(w_mat, u, transpose_x=True)


def _power_iteration_(w_mat, u, v, n: int, order: str, eps: float) -> None:
    """``n`` power iterations, writing into u and v in place (their identity is kept, so
    buffers shared between replicas see the update)."""
    with paddle.no_grad():
        for _ in range(n):
            if order == "uv":
                paddle.assign(_normalize(paddle.matmul(w_mat, v), eps), u)
                paddle.assign(_normalize(_mat_h_vec(w_mat, u), eps), v)
            else:
                paddle.assign(_normalize(_mat_h_vec(w_mat, u), eps), v)
                paddle.assign(_normalize(paddle.matmul(w_mat, v), eps), u)


def _sigma(w_mat, u, v):
    """sigma = u^H W v (u, v constants for autograd)."""
    if _is_complex(w_mat):
        # paddle.dot does not conjugate and paddle.mv has no complex kernel.
        return paddle.sum(paddle.conj(u) * paddle.matmul(w_mat, v))
    return paddle.dot(u, paddle.mv(w_mat, v))


def normalized_weight(weight, u, v, dim: int, spec: _spec.Spec, do_power_iteration: bool):
    """W / sigma(W), iterating u, v in place first when ``do_power_iteration``.

    ``u is None`` means an exact 1-D weight: W / max(||W||, eps), no state.
    """
    if u is None:
        return _normalize(weight, spec.eps)
    w_mat = _to_matrix(weight, dim)
    if do_power_iteration:
        _power_iteration_(w_mat, u, v, spec.n_power_iterations, spec.order, spec.eps)
    # Clones: the forward's graph must keep the u, v it used even when a second forward
    # (D(real) - D(fake)) updates the buffers in place before backward.
    return weight / _sigma(w_mat, u.clone(), v.clone())


# ---------------------------------------------------------------------------------------------
# The hook.


class SpectralNormHook:
    """Forward-pre-hook that sets ``layer.<name>`` to the spectrally normalized weight.

    Attributes ``name``, ``dim`` (non-negative axis) and ``spec`` (a :class:`dualsn.spec.Spec`)
    describe the normalization; ``exact`` is true for a 1-D weight normalized without u, v.
    """

    def __init__(self, name: str, dim: int, spec: _spec.Spec, exact: bool) -> None:
        self.name = name
        self.dim = dim
        self.spec = spec
        self.exact = exact

    def state(self, layer):
        """(W_orig, u, v) of ``layer``; u, v are None for an exact 1-D weight."""
        weight = getattr(layer, self.name + "_orig")
        if self.exact:
            return weight, None, None
        return weight, getattr(layer, self.name + "_u"), getattr(layer, self.name + "_v")

    def compute_weight(self, layer, do_power_iteration: bool):
        weight, u, v = self.state(layer)
        return normalized_weight(weight, u, v, self.dim, self.spec, do_power_iteration)

    def __call__(self, layer, inputs) -> None:
        setattr(layer, self.name, self.compute_weight(layer, do_power_iteration=layer.training))

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
    """Normalized initial u, v as tensors of the weight's dtype and place."""
    dtype = weight.dtype
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
                _to_matrix(weight, dim), u, v, spec.registration_iterations(layer.training),
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
        value = _sigma(_to_matrix(weight, hook.dim), u, v)
        value = value.astype(paddle.complex128 if _is_complex(value) else paddle.float64)
    return float(np.real(value.numpy()))
