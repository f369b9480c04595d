"""Spectral normalization for PaddlePaddle layers, following :mod:`dualsn.spec` exactly.

Like ``paddle.nn.utils.spectral_norm`` this is a forward-pre-hook: the trainable weight
lives in ``<name>_orig``, the power-iteration vectors in the persistable buffers ``<name>_u``
and ``<name>_v`` (the built-in's own keys, so its checkpoints load unchanged), and before
every forward the hook writes the normalized weight to the plain attribute ``<name>``.
Unlike the built-in, ``<name>`` holds the normalized weight from registration on, the
algorithm (update order, warm-up, 1-D handling) comes from the chosen ``compat`` preset, and
a ``seed`` gives u, v that are bit-identical to ``dualsn.torch``'s.

It is also several times faster on CPU (see the comment at the top of _matrix.py): W is never
copied or transposed, sigma is read off the power iteration, the gradient's rank-1 term is
added in place by a tensor hook (into the gradient tensor that this normalization's own
backward has just made), and an eval forward reuses the normalized weight while W, u and v
are unchanged. :func:`plain_path` switches all of that off, for the differential tests. Results differ from
the built-in's only in the last bits (sigma and W / sigma are rounded differently).

Lipschitz toolkit (opt-in, the same as in ``dualsn.torch``; the default path is unchanged):
``coeff`` (soft bound: W / max(1, sigma / coeff)), ``atol``/``rtol`` (training forwards
iterate until sigma settles; ``SpectralNorm.last_iterations``), ``num_svs`` (several
singular values, :func:`singular_values`), ``track_sigma`` (sigma in the state dict as
``<name>_sigma``), and :func:`spectral_norm_conv`, the operator norm of a convolution rather
than of its reshaped kernel. :func:`sigma` returns the last forward's sigma while W, u and v
are unchanged, without a pass over W.

This package imports paddle (and numpy, dualsn.spec) and no other framework. Its modules,
each importing only those before it: _dtypes (dtype and AMP policy), _matrix (the W-matrix
and the convolution operator), _iteration (the power iteration), _grad (the gradient),
_plain (the plain twin), _cache (eval cache, kept sigma), _sn (the SN object), _registry
(lookup, registration), _api (the public functions). The same files as ``dualsn.torch``.
"""

from __future__ import annotations

try:
    import paddle  # noqa: F401
except ModuleNotFoundError as _error:
    if _error.name != "paddle":
        raise
    raise ModuleNotFoundError(
        'dualsn.paddle needs PaddlePaddle, which is not installed: pip install "dualsn[paddle]"', name="paddle"
    ) from _error

from dualsn.paddle._api import (
    invalidate_cache,
    normalized_weight,
    patch,
    remove_spectral_norm,
    sigma,
    singular_values,
    spectral_norm,
    spectral_norm_conv,
)
from dualsn.paddle._grad import weight_grad
from dualsn.paddle._iteration import power_iteration_
from dualsn.paddle._matrix import ConvOperator, WeightMatrix
from dualsn.paddle._plain import plain_path
from dualsn.paddle._registry import get_spectral_norm, is_spectral_norm
from dualsn.paddle._sn import SpectralNorm, SpectralNormConv
from dualsn.paddle.adapter import report
from dualsn.patching import Patch

# The names from before the two backends were mirrored; not in __all__ (tests and user code
# written before still use them).
from dualsn.paddle._sn import SpectralNormConvHook, SpectralNormHook  # noqa: E402,F401  isort: skip

__all__ = [
    "SpectralNorm",
    "SpectralNormConv",
    "spectral_norm",
    "spectral_norm_conv",
    "remove_spectral_norm",
    "sigma",
    "singular_values",
    "is_spectral_norm",
    "get_spectral_norm",
    "invalidate_cache",
    "normalized_weight",
    "power_iteration_",
    "weight_grad",
    "WeightMatrix",
    "ConvOperator",
    "plain_path",
    "patch",
    "Patch",
    "report",
]
