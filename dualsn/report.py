"""``dualsn.report``: how good is each layer's sigma estimate, and what does it add up to?

:func:`report` takes a torch ``nn.Module`` or a ``paddle.nn.Layer``; the model's framework
adapter (:mod:`dualsn.adapters`, imported only for a model of that framework) finds every
spectral norm in it - dualsn's (any preset) and the built-ins - and :mod:`dualsn.diagnostics`
(numpy only) computes the rows: the sigma each layer divides by against the exact largest
singular value, and the Lipschitz bounds they multiply up to. See :mod:`dualsn.diagnostics`
for what the numbers mean and what the bounds do not cover.
"""

from __future__ import annotations

from dualsn.adapters import adapter, framework_of
from dualsn.diagnostics import (  # noqa: F401 (the report's types and settings, re-exported)
    CONV_LANCZOS_RTOL,
    CONV_LANCZOS_STEPS,
    CONV_SVD_LIMIT,
    LANCZOS_NOTE,
    NOTE,
    ConvShape,
    LayerSN,
    ReportRow,
    SNReport,
    convergence,
    layers_of,
    plot,
    preset_name,
)

__all__ = ["LayerSN", "ReportRow", "SNReport", "ConvShape", "report", "collect", "preset_name", "convergence"]


def collect(model) -> list[LayerSN]:
    """Every spectral norm in ``model`` (a torch module or a Paddle layer), as numpy copies,
    in the order of the model's layers."""
    return layers_of(adapter(framework_of(model)).spectral_norms(model))


def report(model):
    """The per-layer sigma report of ``model`` (a ``torch.nn.Module`` or ``paddle.nn.Layer``),
    a :class:`SNReport`.

    Each row: the parameter's qualified name, layer type, weight shape, ``dim`` ("conv" for
    ``spectral_norm_conv``), preset (with ``coeff`` and the other features), the sigma
    estimate (u^H M v with the stored u, v), the exact largest singular value of M (the
    W-matrix, or the convolution matrix; SVD, or "~" a Lanczos estimate for a large
    convolution), their relative error and the normalized norm sigma_exact / divisor (the
    divisor: sigma, or max(1, sigma / coeff)). The products over the rows give Lipschitz
    upper bounds that hold for a plain chain of layers only; for convolutions under
    ``spectral_norm`` the reshaped-kernel sigma is not the convolution's operator norm, so
    there the "bound" is a heuristic. The model is not changed.
    """
    return adapter(framework_of(model)).report(model)
