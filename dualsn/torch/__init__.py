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
then differ from the built-in's in the last bits only (rounding). Inside :func:`plain_path`
every forward skips all of these, for tests that hold the fast paths against plain autograd.

Lipschitz toolkit (opt-in, the same in ``dualsn.paddle``): ``coeff`` (soft bound
max(1, sigma / coeff)), ``atol``/``rtol`` (iterate until sigma settles), ``num_svs`` (several
singular values, :func:`singular_values`), ``track_sigma`` (sigma in the state dict), and
:func:`spectral_norm_conv`, the operator norm of a convolution rather than of its reshaped
kernel. The default path (none of them) is unchanged.

The algorithm's rules all come from :mod:`dualsn.spec`; this package only maps them onto
``torch.nn.utils.parametrize``. Its modules, each importing only those before it:
``_dtypes`` (dtype and autocast policy), ``_matrix`` (the W-matrix and the convolution
operator), ``_iteration`` (the fast power iteration), ``_grad`` (the division and its
gradient), ``_plain`` (the plain twin and its switch), ``_cache`` (eval cache, kept sigma),
``_sn`` (the SN objects), ``_registry`` (lookup, registration, pickling) and ``_api`` (the
public functions). This file only re-exports.
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
except ModuleNotFoundError as _error:
    if _error.name != "torch":
        raise
    raise ModuleNotFoundError(
        'dualsn.torch needs PyTorch, which is not installed: pip install "dualsn[torch]"', name="torch"
    ) from _error

from dualsn.patching import Patch
from dualsn.torch._api import (
    invalidate_cache,
    normalized_weight,
    patch,
    remove_spectral_norm,
    sigma,
    singular_values,
    spectral_norm,
    spectral_norm_conv,
    spectral_norm_forward,  # compatibility: normalized_weight's earlier name, not in __all__
)
from dualsn.torch._grad import weight_grad
from dualsn.torch._iteration import power_iteration_
from dualsn.torch._matrix import ConvGeometry, ConvOperator, WeightMatrix  # noqa: F401 (ConvGeometry: as before)
from dualsn.torch._plain import plain_path
from dualsn.torch._registry import get_spectral_norm, is_spectral_norm
from dualsn.torch._sn import SpectralNorm, SpectralNormConv
from dualsn.torch.adapter import report

# Pickled modules (torch.save(model)) made before the package split name their rebuild
# function dualsn.torch._rebuild_parametrized.
from dualsn.torch._registry import _rebuild_parametrized  # noqa: F401

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
