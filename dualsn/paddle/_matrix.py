"""The operators whose largest singular value sigma is: the W-matrix of a weight
(:class:`WeightMatrix`, a view of the weight, never a copy) and the convolution of one sample
(:class:`ConvOperator`, with its :class:`ConvGeometry`). Both have ``mv`` (x -> M x) and
``mhv`` (y -> M^H y)."""

from __future__ import annotations

import math

import paddle
import paddle.nn.functional as F

from dualsn import geometry as _geometry
from dualsn.paddle._dtypes import _is_complex


# ---------------------------------------------------------------------------------------------
# Why the code below looks the way it does (measured on CPU, one thread, W 2048 x 2048):
# every new W-sized tensor costs far more than a pass over W (Paddle's CPU allocator maps
# fresh pages for it: W / s, W.clone() and addmm take 10-20 ms, W.scale_() 0.5 ms, a W v
# product 0.6-0.8 ms), paddle.mv materializes a transposed W^T, and a broadcasting divide by
# a 0-D tensor is slow even into a preallocated output. So the W-matrix is only ever a view
# of the stored weight, products use matmul's transpose flag, sigma comes from the last
# product of the power iteration, W / sigma is one scale, and the gradient's rank-1 term is
# one in-place addmm_: a training step allocates two W-sized tensors (W / sigma, and the
# gradient) besides the plain layer's own, an eval forward with
# an unchanged weight none. (The views and products are here; sigma off the last product in
# _iteration.py; the scale and the addmm_ in _grad.py.)


def _prod(values) -> int:
    return math.prod(int(x) for x in values)


class WeightMatrix:
    """The W-matrix of a weight (``dim`` moved to the front, the rest flattened) as a view of
    the weight's own storage: products with it never copy W.

    With ``a`` the product of the axes before ``dim``, ``h`` the size of ``dim`` and ``b`` the
    product of the axes after it, the stored weight is an ``[a, h, b]`` block and:

    * ``"rows"`` (a == 1, e.g. dim 0): the view ``[h, b]`` *is* the W-matrix;
    * ``"cols"`` (b == 1, e.g. ``paddle.nn.Linear``'s dim 1): the view ``[a, h]`` is its
      transpose, which matmul's transpose flag reads in place;
    * ``"batched"`` (a middle axis, e.g. a transposed conv's dim 1): ``[a, h, b]``, and the
      products are batched over ``a``.
    """

    def __init__(self, weight, dim: int) -> None:
        shape = list(weight.shape)
        self.weight, self.shape = weight, shape
        self.a, self.h, self.b = _prod(shape[:dim]), int(shape[dim]), _prod(shape[dim + 1 :])
        self.complex = _is_complex(weight)
        if self.a == 1:
            self.kind, self.view = "rows", weight.reshape([self.h, self.b])
        elif self.b == 1:
            self.kind, self.view = "cols", weight.reshape([self.a, self.h])
        else:
            self.kind, self.view = "batched", weight.reshape([self.a, self.h, self.b])

    def mv(self, v):
        """W v (``v`` has a * b entries), an h-vector."""
        if self.kind == "rows":
            return paddle.matmul(self.view, v)
        if self.kind == "cols":
            return paddle.matmul(self.view, v, transpose_x=True)
        per_block = paddle.matmul(self.view, v.reshape([self.a, self.b, 1]))  # [a, h, 1]
        return per_block.sum(axis=0).reshape([self.h])

    def mhv(self, u):
        """W^H u, an (a * b)-vector. For complex W it is conj(W^T conj(u)): only vectors are
        conjugated, never W."""
        x = paddle.conj(u) if self.complex else u
        if self.kind == "rows":
            out = paddle.matmul(self.view, x, transpose_x=True)
        elif self.kind == "cols":
            out = paddle.matmul(self.view, x)
        else:
            out = paddle.matmul(x.reshape([1, 1, self.h]), self.view).reshape([self.a * self.b])
        return paddle.conj(out) if self.complex else out

    # Paddle: factors, not torch's fused add_rank1: _grad scales the left one itself
    # (addmm_'s alpha, beta are float32).
    def outer_factors(self, u, v):
        """(left, right) whose (batched) matrix product is u v^H in the view's layout."""
        vh = paddle.conj(v) if self.complex else v
        if self.kind == "rows":
            return u.unsqueeze(1), vh.unsqueeze(0)
        if self.kind == "cols":  # (u v^H)^T = conj(v) u^T
            return vh.unsqueeze(1), u.unsqueeze(0)
        left = u.reshape([1, self.h, 1]).expand([self.a, self.h, 1])
        return left, vh.reshape([self.a, 1, self.b])


_CONV_FUNCTIONS = {
    1: (F.conv1d, F.conv1d_transpose, "NCL"),
    2: (F.conv2d, F.conv2d_transpose, "NCHW"),
    3: (F.conv3d, F.conv3d_transpose, "NCDHW"),
}


class ConvGeometry:
    """What the operator x -> conv(x, W) of one sample needs from a convolution layer,
    computed once by :func:`dualsn.geometry.conv_geometry` (see there for ``input_shape``,
    ``output_shape``, ``output_padding``), whatever the layer's ``data_format`` (its kernel
    layout is the same). The convolution pads explicitly by ``pads``, (before, after) per
    spatial axis, flat: Paddle's convolution takes uneven pads, so "SAME" needs no string.
    """

    __slots__ = ("spatial", "stride", "dilation", "groups", "pads", "input_shape", "output_shape",
                 "output_padding")

    def __init__(self, layer, input_shape: tuple[int, ...]) -> None:
        # Paddle: conv layers keep their settings in private attributes (no public kernel_size).
        spatial = len(layer._kernel_size)
        # Paddle: layers may be channel-last (data_format); torch's convolutions are channels-first.
        channel_last = layer._data_format in ("NLC", "NHWC", "NDHWC")
        padding = _geometry.padding_pairs(layer._padding, spatial, channel_last)
        dilation = layer._dilation
        if padding == "SAME":
            dilation = [1] * spatial  # Paddle's SAME padding ignores the dilation (torch's does not)
        g = _geometry.conv_geometry(
            input_shape, layer._out_channels, layer._kernel_size, layer._stride, dilation, layer._groups, padding
        )
        self.spatial, self.groups = spatial, g.groups
        self.stride, self.dilation = list(g.stride), list(g.dilation)
        self.input_shape, self.output_shape = g.input_shape, g.output_shape
        self.pads = [n for pair in g.pads for n in pair]
        self.output_padding = list(g.output_padding)


class ConvOperator:
    """The convolution of one sample as a linear map M x = conv(x, W) (no bias) from the input
    activation space to the output one, and its adjoint M^T y = conv_transpose(y, W) cropped:
    the ``op`` of :func:`_step`, on tensors of ``input_shape`` / ``output_shape``.

    Its largest singular value is the convolution's operator norm (its Lipschitz constant in
    the 2-norm), which the reshaped-kernel sigma of :func:`spectral_norm` is not.
    """

    __slots__ = ("weight", "geometry")

    def __init__(self, weight, geometry: ConvGeometry) -> None:
        self.weight, self.geometry = weight, geometry

    def mv(self, x):
        """M x for ``x`` of ``input_shape``: the convolution, of ``output_shape``."""
        g = self.geometry
        conv, _, layout = _CONV_FUNCTIONS[g.spatial]
        out = conv(x.unsqueeze(0), self.weight, None, stride=g.stride, padding=g.pads,
                   dilation=g.dilation, groups=g.groups, data_format=layout)
        return out.squeeze(0)

    def mhv(self, y):
        """M^T y for ``y`` of ``output_shape``: the transposed convolution, of ``input_shape``."""
        g = self.geometry
        # Paddle: no conj(W), unlike torch's: complex kernels are refused (no complex convolutions).
        _, conv_t, layout = _CONV_FUNCTIONS[g.spatial]
        x = conv_t(y.unsqueeze(0), self.weight, None, stride=g.stride, padding=0,
                   output_padding=g.output_padding, dilation=g.dilation, groups=g.groups,
                   data_format=layout)
        starts = g.pads[0::2]
        ends = [b + n for b, n in zip(starts, g.input_shape[1:])]
        return paddle.slice(x, list(range(2, 2 + g.spatial)), starts, ends).squeeze(0)

