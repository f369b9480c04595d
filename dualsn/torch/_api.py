"""The public functions of dualsn.torch: each validates its arguments, resolves the defaults
and hands over to :mod:`._registry` (registration, lookup, removal) or to the SN object; the
algorithm lives below them. Also the functional form :func:`normalized_weight`, the patching
of torch's built-ins, and the report.
"""

from __future__ import annotations

import importlib
import math

import torch
from torch import nn
from torch.nn.utils import parametrizations as _parametrizations

from dualsn import options as _options
from dualsn import spec as _spec
from dualsn.patching import Patch, check_patch_arguments
from dualsn.torch import _plain
from dualsn.torch._dtypes import _LOW_PRECISION
from dualsn.torch._grad import _divide, _normalize_exact
from dualsn.torch._iteration import _sigma, _training_steps
from dualsn.torch._matrix import ConvGeometry, WeightMatrix
from dualsn.torch._registry import (
    _check_is_module,
    _is_dim_1_layer,
    _legacy,
    _register,
    _remove,
    _require,
    _sn_input,
    _target_weight,
)
from dualsn.torch._sn import SpectralNorm, SpectralNormConv


# ---------------------------------------------------------------------------------------------
# Registration


def spectral_norm(
    module: nn.Module,
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
    _options.check_arguments(seed=seed, track_sigma=track_sigma)
    weight = _target_weight(module, name, stackable=compat == "torch")
    dim = _spec.resolve_dim(dim, _is_dim_1_layer(module), weight.ndim)
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
    eps: float = _spec.DEFAULT_EPS,
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
    The algorithm is :class:`dualsn.reference.ReferenceSN` on M with the "torch_legacy" preset
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
    _options.check_arguments(seed=seed, track_sigma=track_sigma)
    weight, geometry = _conv_target(module, name, input_shape)
    _spec.check_num_svs(sn_spec.num_svs, math.prod(geometry.output_shape), math.prod(geometry.input_shape))

    s = _spec.next_seed(seed)
    return _register(module, name, weight, SpectralNormConv(weight, geometry, sn_spec, s, track_sigma))


def _conv_target(module: nn.Module, name: str, input_shape):
    """(weight, :class:`ConvGeometry`) of the convolution ``module`` for ``input_shape``, after
    every check :func:`spectral_norm_conv` makes on the layer and the shape."""
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
    return weight, geometry


# ---------------------------------------------------------------------------------------------
# On a registered spectral norm


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
    return _remove(module, name, plist, sn)


def sigma(module: nn.Module, name: str = "weight") -> float:
    """The current sigma of ``module.<name>``'s spectral norm, as a float (real part).

    No power iteration runs: it is u^H M v with the current u, v (the W-matrix, or the
    convolution of :func:`spectral_norm_conv`), taken from the last forward when W, u and v
    have not changed since (free), else computed. Forwards keep their sigma only once sigma
    has been read, so the first read computes it. For a weight normalized exactly it is
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


def invalidate_cache(module: nn.Module, name: str = "weight") -> None:
    """Make the next eval-mode forward of ``module`` recompute ``module.<name>``.

    Only needed after writing to W, u or v in a way the eval cache cannot see (see
    :class:`_EvalCache`): a write through ``.data`` that changes none of the sampled entries
    of a large W, or u and v written through ``.data``. The kept sigma of :func:`sigma` goes
    too. ValueError if there is no dualsn spectral norm on ``name``.

    Example::

        >>> layer = spectral_norm(nn.Linear(20, 10), seed=0).eval()
        >>> invalidate_cache(layer)
    """
    _require(module, name, "invalidate_cache")[2].invalidate()


# ---------------------------------------------------------------------------------------------
# The functional form


def normalized_weight(
    weight: torch.Tensor,
    u: torch.Tensor | None,
    v: torch.Tensor | None,
    dim: int,
    spec: _spec.Spec,
    do_power_iteration: bool,
) -> torch.Tensor:
    """The normalized weight for one forward (the whole per-forward computation, uncached):
    W / sigma(W) (W / max(1, sigma / coeff) with ``spec.coeff``).

    With ``do_power_iteration`` (a training forward) it first runs the spec's training
    iterations (``spec.n_power_iterations``, or until sigma settles with ``atol``/``rtol``) on
    the ``u``, ``v`` buffers in place. Gradients flow into ``weight`` only; u and v are
    constants. ``u``, ``v`` are None for a weight the spec normalizes exactly (W / max(||W||,
    eps)). (Extra pairs of ``num_svs`` live in :class:`SpectralNorm`, which iterates them too.)
    Inside :func:`plain_path`, the plain computation.
    """
    if _plain.ENABLED:
        op_of = lambda w: _plain._PlainMatrix(w, dim)  # noqa: E731
        return _plain._plain_normalized_weight(weight, op_of, (u, v, None, None), spec, do_power_iteration)[0]
    if weight.dtype in _LOW_PRECISION:
        # All the math in float32 (u, v are float32 too), the result cast back; autograd
        # carries the gradient through both casts.
        return normalized_weight(weight.float(), u, v, dim, spec, do_power_iteration).to(weight.dtype)
    if spec.is_exact_vector(weight.ndim):
        return _normalize_exact(weight, spec, do_power_iteration)
    sigma = _training_steps(WeightMatrix(weight, dim), (u, v, None, None), spec)[0] if do_power_iteration else None
    if sigma is None:  # eval, or restarted from recovery vectors in training
        sigma = _sigma(weight, dim, u, v)
    return _divide(weight, sigma, u, v, dim, spec)


def spectral_norm_forward(
    weight: torch.Tensor,
    u: torch.Tensor | None,
    v: torch.Tensor | None,
    dim: int,
    spec: _spec.Spec,
    training: bool,
) -> torch.Tensor:
    """:func:`normalized_weight` under its earlier name, with ``training`` for
    ``do_power_iteration`` (kept for existing callers; not in ``__all__``)."""
    return normalized_weight(weight, u, v, dim, spec, training)


# ---------------------------------------------------------------------------------------------
# Patching the built-ins: existing code builds dualsn's spectral norm without being edited.
# The machinery (Patch) is dualsn.patching's; each backend patches only its own framework.


def _builtin_replacement(compat: str, defaults: dict):
    """A function with the torch built-ins' signature that registers dualsn's spectral norm."""

    def spectral_norm_(module, name="weight", n_power_iterations=1, eps=_spec.DEFAULT_EPS, dim=None):
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
    n_power_iterations=1, eps=DEFAULT_EPS, dim=None)`` and forward them, with ``compat`` and
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
    # torch: two built-ins, each keeping its own preset by default; Paddle has one, patched with
    # compat="torch" by default (for code PaConvert converted from torch).
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
