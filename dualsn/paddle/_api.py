"""The public functions: each validates its arguments, resolves the defaults and calls the
registry (:mod:`dualsn.paddle._registry`) or the SN object; the algorithm lives below them."""

from __future__ import annotations

import importlib

import numpy as np
import paddle

from dualsn import options as _options
from dualsn import spec as _spec
from dualsn.paddle._dtypes import _is_complex
from dualsn.paddle._matrix import ConvGeometry, _prod
from dualsn.paddle._registry import (
    _check_free,
    _check_is_layer,
    _conv_classes,
    _dim_1_classes,
    _register,
    _require,
    _state_names,
    _target_weight,
    _unregister,
)
from dualsn.paddle._sn import SpectralNorm, SpectralNormConv, _normalized_weight
from dualsn.patching import Patch, check_patch_arguments

def spectral_norm(
    layer,
    name: str = "weight",
    n_power_iterations: int = 1,
    eps: float = _spec.DEFAULT_EPS,
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
    _options.check_arguments(seed=seed, track_sigma=track_sigma)
    _check_is_layer(layer, "spectral_norm")
    weight = _target_weight(layer, name)
    shape = tuple(weight.shape)
    # Paddle: paddle.nn.Linear's weight is [in, out], so it is a dim-1 class (dualsn.layout).
    dim = _spec.resolve_dim(dim, isinstance(layer, _dim_1_classes()), len(shape))
    exact = spec.is_exact_vector(len(shape))
    if not exact:
        _spec.check_num_svs(spec.num_svs, *_spec.matrix_shape(shape, dim))
    _check_free(layer, name, _state_names(name, exact, spec, track_sigma))
    seed = _spec.next_seed(seed)  # last: a failed call must not consume the manual_seed stream

    hook = SpectralNorm(name, dim, spec, exact, track_sigma)
    shapes = None if exact else tuple((n,) for n in _spec.matrix_shape(shape, dim))
    return _register(layer, weight, hook, shapes, seed)


def _conv_weight(layer, name: str):
    """The kernel spectral_norm_conv would normalize, after its checks on the layer."""
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
    kernel_shape = (layer._out_channels, layer._in_channels // layer._groups, *layer._kernel_size)
    if tuple(weight.shape) != tuple(int(n) for n in kernel_shape):
        raise ValueError(
            f"Expected {name!r} to have the layer's kernel shape {list(kernel_shape)}, but its "
            f"shape is {list(weight.shape)}"
        )
    return weight


def _check_input_shape(layer, input_shape) -> None:
    """ValueError unless ``input_shape`` is one sample's shape for the convolution ``layer``
    (channels first, no batch axis)."""
    spatial = len(layer._kernel_size)
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


def spectral_norm_conv(
    layer,
    input_shape,
    name: str = "weight",
    n_power_iterations: int = 1,
    eps: float = _spec.DEFAULT_EPS,
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
    :class:`dualsn.reference.ReferenceSN` on M with the "torch_legacy" preset (no warm-up), so u,
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
    _options.check_arguments(seed=seed, track_sigma=track_sigma)
    _check_is_layer(layer, "spectral_norm_conv")
    weight = _conv_weight(layer, name)
    _check_input_shape(layer, input_shape)
    geometry = ConvGeometry(layer, tuple(input_shape))
    _spec.check_num_svs(spec.num_svs, _prod(geometry.output_shape), _prod(geometry.input_shape))
    _check_free(layer, name, _state_names(name, False, spec, track_sigma))
    seed = _spec.next_seed(seed)  # last: a failed call must not consume the manual_seed stream

    hook = SpectralNormConv(name, geometry, spec, track_sigma)
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
    _unregister(layer, name, hook, value)
    return layer


def sigma(layer, name: str = "weight") -> float:
    """sigma of ``layer.<name>`` from the current u, v (no iteration), as a float (real part).

    It is u^H M v (M: the W-matrix, or the convolution of :func:`spectral_norm_conv`), taken
    from the last forward while W, u and v have not changed since (no pass over W), else
    computed. Forwards keep their sigma only once sigma has been read, so the first read
    computes it. For an exact 1-D weight: max(||W||, eps).

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


def normalized_weight(weight, u, v, dim: int, spec: _spec.Spec, do_power_iteration: bool):
    """W / sigma(W) (W / max(1, sigma / coeff) with ``spec.coeff``), iterating u, v in place
    first when ``do_power_iteration`` (``spec.n_power_iterations`` steps, or until sigma
    settles with ``spec.atol``/``spec.rtol``).

    ``u is None`` means an exact 1-D weight: W / max(||W||, eps), no state. When autograd
    needs a graph, the gradient is completed by :class:`_MatrixGradHook` /
    :class:`_VectorGradHook`.
    """
    return _normalized_weight(weight, (u, v, None, None), dim, spec, do_power_iteration)[0]


# ---------------------------------------------------------------------------------------------
# Patching the built-in: existing or PaConvert-converted code builds dualsn's spectral norm
# without being edited. The machinery (Patch) is dualsn.patching's.

# The modules that hold paddle.nn.utils.spectral_norm (the function object itself), where
# code looks it up at call time: paddle.nn.utils.spectral_norm(...) as PaConvert writes it,
# its defining module, and the paddle.nn re-export. Only those that have it are patched.
_BUILTIN_HOMES = ("paddle.nn.utils", "paddle.nn.utils.spectral_norm_hook", "paddle.nn")


def _builtin_replacement(compat: str, defaults: dict):
    """A function with ``paddle.nn.utils.spectral_norm``'s signature that registers dualsn's."""

    def spectral_norm_(layer, name="weight", n_power_iterations=1, eps=_spec.DEFAULT_EPS, dim=None):
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
    ``(layer, name="weight", n_power_iterations=1, eps=DEFAULT_EPS, dim=None)`` and forwards them,
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
