"""Convolution geometry for ``spectral_norm_conv``, framework-free: which activation shapes
a convolution of one sample maps between, how it pads, and what makes its adjoint (the
transposed convolution) return exactly the padded input.

Each backend reads the layer's kernel, stride, dilation, padding and groups and calls
:func:`conv_geometry`; the arithmetic and its error messages live here only. This module
imports numpy and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ConvGeometry", "conv_geometry", "padding_pairs"]


@dataclass(frozen=True)
class ConvGeometry:
    """The operator x -> conv(x, W) of one sample.

    ``input_shape`` / ``output_shape``: one sample's activation shapes, channels first (no batch
    axis). The convolution pads explicitly by ``pads``, one (before, after) pair per spatial
    axis. The adjoint is the transposed convolution with padding 0, whose output is the
    *padded* input, cropped back to ``input_shape`` from ``before`` on (the adjoint of zero
    padding is a crop); ``output_padding`` (< stride) makes it return exactly the padded size:
    the last entries a strided convolution never reads come back as zeros.
    """

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    pads: tuple[tuple[int, int], ...]
    output_padding: tuple[int, ...]

    @property
    def spatial(self) -> int:
        return len(self.stride)

    @property
    def before(self) -> tuple[int, ...]:
        """The padding before each spatial axis: where the adjoint's crop starts."""
        return tuple(pair[0] for pair in self.pads)


def padding_pairs(padding, spatial: int, channel_last: bool = False):
    """A convolution layer's ``padding`` as (before, after) per spatial axis, or the string
    "SAME" / "VALID". Accepts both frameworks' forms: a string, an int, one int per axis, two
    per axis, or (Paddle) one pair per axis of the data layout, batch and channel included."""
    if isinstance(padding, str):
        return padding.upper()
    if isinstance(padding, (int, np.integer)):
        return [(int(padding), int(padding))] * spatial
    padding = list(padding)
    if len(padding) == spatial + 2 and all(isinstance(p, (list, tuple)) for p in padding):
        pairs = padding[1:-1] if channel_last else padding[2:]
        return [(int(a), int(b)) for a, b in pairs]
    if len(padding) == 2 * spatial:
        return [(int(padding[2 * i]), int(padding[2 * i + 1])) for i in range(spatial)]
    if len(padding) == spatial:
        return [(int(p), int(p)) for p in padding]
    raise NotImplementedError(f"spectral_norm_conv does not understand the layer's padding={padding!r}")


def _same_padding(n: int, stride: int, reach: int) -> tuple[int, int]:
    """"SAME" padding of an axis of ``n`` entries: the output has ceil(n / stride) entries, the
    odd extra entry goes at the end. (torch allows "same" with stride 1 only, where this is
    its reach // 2 before, the rest after; Paddle's rule is this one for every stride.)"""
    total = max((-(-n // stride) - 1) * stride + reach + 1 - n, 0)
    return total // 2, total - total // 2


def conv_geometry(input_shape, out_channels: int, kernel, stride, dilation, groups: int, padding) -> ConvGeometry:
    """The :class:`ConvGeometry` of a convolution layer for one sample of ``input_shape``
    (channels first); ``padding`` as :func:`padding_pairs` returns it. ValueError when the
    input is too small for the kernel."""
    input_shape = tuple(int(n) for n in input_shape)
    stride, dilation = tuple(int(s) for s in stride), tuple(int(d) for d in dilation)
    pads, out_sizes, output_padding = [], [], []
    for i, k in enumerate(int(k) for k in kernel):
        n, s = input_shape[1 + i], stride[i]
        reach = dilation[i] * (k - 1)  # the kernel's extent minus one
        if padding == "SAME":
            before, after = _same_padding(n, s, reach)
        elif padding == "VALID":
            before = after = 0
        else:
            before, after = padding[i]
        padded = n + before + after
        size = (padded - reach - 1) // s + 1
        if size < 1:
            raise ValueError(
                f"Expected input_shape to be large enough for the kernel, but spatial axis {i} of "
                f"input_shape={list(input_shape)} is {n} (padded: {padded}) and the dilated "
                f"kernel spans {reach + 1}"
            )
        pads.append((before, after))
        out_sizes.append(size)
        output_padding.append(padded - ((size - 1) * s + reach + 1))
    return ConvGeometry(input_shape, (int(out_channels), *out_sizes), stride, dilation, int(groups),
                        tuple(pads), tuple(output_padding))
