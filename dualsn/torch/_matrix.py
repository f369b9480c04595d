"""The linear maps whose largest singular value spectral norm estimates: the W-matrix of a
weight (:class:`WeightMatrix`) and the convolution of one sample (:class:`ConvOperator`),
each with ``mv`` (x -> M x) and ``mhv`` (y -> M^H y) on flat vectors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dualsn import geometry as _geometry

# ---------------------------------------------------------------------------------------------
# The W-matrix, without copying the weight
#
# Costs, measured on a CPU (one thread, 2048 x 2048 float32): a W-sized pass (a copy, W / s, a
# rank-1 update) ~1 ms, one matrix-vector product ~0.5-1 ms, anything on a vector ~microseconds.
# So the per-step work is counted in passes over W: two matrix-vector products, one W / sigma,
# and in backward one <W, G> and one fused rank-1 update. Nothing else touches W.


class WeightMatrix:
    """The W-matrix of ``weight`` (``dim`` to the front, other axes flattened), as views.

    The weight is seen as a 3-D ``(a, h, b)`` tensor: ``a`` the product of the axes before
    ``dim``, ``h`` the size of ``dim``, ``b`` the product of the axes after it (a 1-D weight,
    reached in the "matrix" vector mode, is ``(1, n, 1)``). The W-matrix is then
    ``M[o, (i, j)] = W3[i, o, j]``. When ``a == 1`` (``dim == 0``) or ``b == 1`` (``dim``
    last) M is a plain 2-D view and the products are single BLAS calls on it; otherwise they
    are batched products over the ``a`` blocks, which avoids copying W into M's layout.
    """

    __slots__ = ("shape", "a", "h", "b", "mat", "blocks")

    def __init__(self, weight: torch.Tensor, dim: int) -> None:
        self.shape = weight.shape
        if weight.ndim == 1:
            a, h = 1, weight.shape[0]
        else:
            a, h = math.prod(weight.shape[:dim]), weight.shape[dim]
        b = weight.numel() // (a * h)
        self.a, self.h, self.b = a, h, b
        # reshape gives views for contiguous weights (copies only for exotic layouts).
        self.mat = self.blocks = None
        if a == 1:
            # a 2-D weight with dim 0 is its own W-matrix: no reshape to dispatch
            self.mat = weight if weight.ndim == 2 and dim == 0 else weight.reshape(h, b)
        elif b == 1:
            self.mat = weight.reshape(a, h).mT
        else:
            self.blocks = weight.reshape(a, h, b)

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        """M v (``h`` entries)."""
        if self.mat is not None:
            return torch.mv(self.mat, v)
        # One (1 x b) @ (b x h) product per block, summed over the blocks.
        return torch.bmm(v.view(self.a, 1, self.b), self.blocks.mT).sum(0).view(self.h)

    def mhv(self, u: torch.Tensor) -> torch.Tensor:
        """M^H u (``a * b`` entries)."""
        if self.mat is not None:
            if self.b == 1 and u.is_complex():
                # M^H is conj of the (a, h) view: conj(W2 conj(u)) keeps W unconjugated (no copy)
                return torch.mv(self.mat.mT, u.conj()).conj_physical()
            return torch.mv(self.mat.mH, u)
        if u.is_complex():
            # sum_o conj(W3[i, o, j]) u[o] = conj(sum_o conj(u[o]) W3[i, o, j])
            return torch.matmul(u.conj(), self.blocks).conj_physical().reshape(-1)
        return torch.matmul(u, self.blocks).reshape(-1)

    mv_h = mhv  # the name before the backends were mirrored (kept for existing callers)

    def rank1(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """u v^H in the weight's layout, by broadcasting (used on the differentiable path)."""
        return (u.view(1, self.h, 1) * v.conj().view(self.a, 1, self.b)).view(self.shape)

    def add_rank1(self, grad: torch.Tensor, u, v, beta, alpha) -> torch.Tensor:
        """``beta * grad + alpha * u v^H`` in the weight's layout, as one fused pass.

        ``beta``, ``alpha`` are numbers (BLAS scaling factors).
        """
        vh = v.conj() if v.is_complex() else v
        if self.a == 1:
            if self.mat is not None and grad.shape == self.mat.shape:  # grad is the (h, b) matrix
                return torch.addr(grad, u, vh, beta=beta, alpha=alpha)
            out = torch.addr(grad.reshape(self.h, self.b), u, vh, beta=beta, alpha=alpha)
        elif self.b == 1:
            # the (a, h) view holds M^T, whose rank-1 term is conj(v) u^T
            out = torch.addr(grad.reshape(self.a, self.h), vh, u, beta=beta, alpha=alpha)
        else:
            out = torch.baddbmm(
                grad.reshape(self.a, self.h, self.b),
                u.view(1, self.h, 1).expand(self.a, self.h, 1),
                vh.view(self.a, 1, self.b),
                beta=beta,
                alpha=alpha,
            )
        return out.view(self.shape)


# ---------------------------------------------------------------------------------------------
# The convolution of one sample

_CONV_FUNCTIONS = {
    1: (F.conv1d, F.conv_transpose1d),
    2: (F.conv2d, F.conv_transpose2d),
    3: (F.conv3d, F.conv_transpose3d),
}


class ConvGeometry:
    """Everything about a convolution layer the operator x -> conv(x, W) needs, computed once
    by :func:`dualsn.geometry.conv_geometry` (see there for ``input_shape``, ``output_shape``,
    ``output_padding``); ``pads`` is its (before, after) pairs, flat. The forward convolution
    is given the layer's own ``padding``, which says the same ("same" may pad unevenly, which
    torch's convolution accepts only as the string); the adjoint crops from the ``before``
    offsets.
    """

    __slots__ = ("spatial", "stride", "padding", "dilation", "groups", "input_shape", "output_shape",
                 "output_padding", "pads")

    def __init__(self, conv: nn.Module, input_shape: tuple[int, ...]) -> None:
        self.spatial = len(conv.kernel_size)
        self.padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        g = _geometry.conv_geometry(
            input_shape, conv.out_channels, conv.kernel_size, conv.stride, conv.dilation, conv.groups,
            _geometry.padding_pairs(self.padding, self.spatial),
        )
        self.stride, self.dilation, self.groups = g.stride, g.dilation, g.groups
        self.input_shape, self.output_shape, self.output_padding = g.input_shape, g.output_shape, g.output_padding
        self.pads = tuple(n for pair in g.pads for n in pair)


class ConvOperator:
    """The convolution of one sample as a linear map of flat vectors, M x = conv(x, W) with no
    bias, from the input activation space (``input_shape``) to the output one, and its
    adjoint M^H y = conv_transpose(y, conj(W)), cropped: the ``op`` of the power iteration.

    Its largest singular value is the convolution's operator norm (its Lipschitz constant
    in the 2-norm), which the reshaped-kernel sigma of :func:`spectral_norm` is not.
    """

    __slots__ = ("weight", "geometry")

    def __init__(self, weight: torch.Tensor, geometry: ConvGeometry) -> None:
        self.weight, self.geometry = weight, geometry

    def mv(self, x: torch.Tensor) -> torch.Tensor:
        """M x: the convolution of ``x`` (``input_shape`` entries), flat."""
        g = self.geometry
        conv = _CONV_FUNCTIONS[g.spatial][0]
        out = conv(x.reshape(1, *g.input_shape), self.weight, None, g.stride, g.padding, g.dilation, g.groups)
        return out.reshape(-1)

    def mhv(self, y: torch.Tensor) -> torch.Tensor:
        """M^H y: the transposed convolution of ``y`` (``output_shape`` entries), flat."""
        g = self.geometry
        conv_t = _CONV_FUNCTIONS[g.spatial][1]
        weight = self.weight.conj().resolve_conj() if self.weight.is_complex() else self.weight
        x = conv_t(y.reshape(1, *g.output_shape), weight, None, g.stride, 0, g.output_padding, g.groups, g.dilation)
        for axis, (start, length) in enumerate(zip(g.pads[0::2], g.input_shape[1:])):
            x = x.narrow(2 + axis, start, length)
        return x.reshape(-1)

    mv_h = mhv  # the name before the backends were mirrored (kept for existing callers)
