"""Forward passes and their vector-Jacobian products for the conformance layers, in numpy.

Canonical (torch) layouts throughout. Convolutions are stride 1, no padding, no dilation, one
group: that is all the conformance cases use. ``vjp`` returns (dL/dW, dL/db, [dL/dinput...])
for an upstream gradient ``r`` = dL/dout; integer inputs (embedding indices) get no gradient.
"""

from __future__ import annotations

import string
from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from backends.base import LayerSpec

__all__ = ["forward", "vjp"]


def _conv_subscripts(nd: int) -> tuple[str, str, str]:
    """einsum letters for the spatial output positions and kernel offsets of an nd conv."""
    letters = string.ascii_uppercase[: 2 * nd]  # upper case: clear of n, c, o
    return letters[:nd], letters[nd:], f"{letters[:nd]}{letters[nd:]}"


def _windows(x: np.ndarray, kernel: tuple[int, ...]) -> np.ndarray:
    """[N, C, *L] -> [N, C, *(L-K+1), *K] sliding windows (a view)."""
    nd = len(kernel)
    return sliding_window_view(x, kernel, axis=tuple(range(2, 2 + nd)))


def conv(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Cross-correlation, as torch's ConvNd: x [N, C, *L], weight [O, C, *K] -> [N, O, *P]."""
    nd = weight.ndim - 2
    pos, off, both = _conv_subscripts(nd)
    return np.einsum(f"nc{both},oc{off}->no{pos}", _windows(x, weight.shape[2:]), weight)


def conv_vjp(x: np.ndarray, weight: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dL/dweight, dL/dx) of :func:`conv` for dL/dout = r."""
    nd = weight.ndim - 2
    pos, off, both = _conv_subscripts(nd)
    g_weight = np.einsum(f"nc{both},no{pos}->oc{off}", _windows(x, weight.shape[2:]), r)
    # dL/dx[c, p] = sum_{o, k} r[o, p - k] w[o, c, k]: a transposed conv of r, with the
    # weight read as going from O channels to C channels.
    g_x = conv_transpose(r, weight)
    return g_weight, g_x


def _transpose_kernel(weight: np.ndarray) -> np.ndarray:
    """[In, Out, *K] -> the equivalent ordinary-conv kernel [Out, In, *K], flipped in space."""
    nd = weight.ndim - 2
    flipped = np.flip(weight, axis=tuple(range(2, 2 + nd)))
    return np.swapaxes(flipped, 0, 1)


def conv_transpose(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Transposed conv, as torch's ConvTransposeNd: x [N, In, *L], weight [In, Out, *K]
    -> [N, Out, *(L+K-1)]. It is the ordinary conv of x zero-padded by K-1 on each side with
    the flipped, in/out-swapped kernel."""
    pad = [(0, 0), (0, 0)] + [(k - 1, k - 1) for k in weight.shape[2:]]
    return conv(np.pad(x, pad), _transpose_kernel(weight))


def conv_transpose_vjp(x: np.ndarray, weight: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dL/dweight, dL/dx) of :func:`conv_transpose` for dL/dout = r."""
    pad = [(0, 0), (0, 0)] + [(k - 1, k - 1) for k in weight.shape[2:]]
    g_kernel, _ = conv_vjp(np.pad(x, pad), _transpose_kernel(weight), r)
    # undo the swap and the flip (each is its own inverse)
    g_weight = np.flip(np.swapaxes(g_kernel, 0, 1), axis=tuple(range(2, weight.ndim)))
    # dL/dx[c, p] = sum_{o, k} r[o, p + k] w[c, o, k]: an ordinary conv of r with weight as [C, O, K]
    g_x = conv(r, weight)
    return g_weight, g_x


def forward(layer: LayerSpec, weight: np.ndarray, bias: np.ndarray | None, inputs: Sequence[np.ndarray]) -> np.ndarray:
    """The layer's output for ``inputs`` with the given (already normalized) weight."""
    k = layer.kind
    if k in ("linear", "linear_compat"):
        out = inputs[0] @ weight.T
    elif layer.transposed:
        out = conv_transpose(inputs[0], weight)
    elif layer.spatial:
        out = conv(inputs[0], weight)
    elif k == "embedding":
        return weight[inputs[0]]
    elif k == "bilinear":
        out = np.einsum("ni,oij,nj->no", inputs[0], weight, inputs[1])
    else:  # vector
        out = inputs[0] * weight
    return out + _bias_view(layer, bias)


def _bias_view(layer: LayerSpec, bias: np.ndarray) -> np.ndarray:
    """bias broadcast against the output (channels on axis 1, spatial axes after)."""
    return bias.reshape((1, -1) + (1,) * layer.spatial)


def vjp(
    layer: LayerSpec, weight: np.ndarray, bias: np.ndarray | None, inputs: Sequence[np.ndarray], r: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None, list[np.ndarray]]:
    """(dL/dweight, dL/dbias, [dL/dinput for each float input]) for dL/dout = r."""
    k = layer.kind
    g_bias = None if bias is None else r.sum(axis=(0,) + tuple(range(2, r.ndim)))
    if k in ("linear", "linear_compat"):
        return r.T @ inputs[0], g_bias, [r @ weight]
    if layer.transposed:
        g_w, g_x = conv_transpose_vjp(inputs[0], weight, r)
        return g_w, g_bias, [g_x]
    if layer.spatial:
        g_w, g_x = conv_vjp(inputs[0], weight, r)
        return g_w, g_bias, [g_x]
    if k == "embedding":
        g_w = np.zeros_like(weight)
        np.add.at(g_w, inputs[0], r)  # repeated indices accumulate
        return g_w, None, []
    if k == "bilinear":
        x1, x2 = inputs
        g_w = np.einsum("no,ni,nj->oij", r, x1, x2)
        g_x1 = np.einsum("no,oij,nj->ni", r, weight, x2)
        g_x2 = np.einsum("no,oij,ni->nj", r, weight, x1)
        return g_w, g_bias, [g_x1, g_x2]
    x = inputs[0]  # vector: out = x * w + b
    return (r * x).sum(axis=0), g_bias, [r * weight]
