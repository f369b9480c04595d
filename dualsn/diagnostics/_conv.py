"""The convolution of one sample as a matrix-free linear map (numpy only), and the W-matrix as
one: the operators :class:`dualsn.diagnostics.LayerSN` computes its reference values with."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

__all__ = ["ConvShape"]


@dataclass(frozen=True)
class ConvShape:
    """The convolution of one sample, as ``spectral_norm_conv`` sees it: a linear map M from
    the input activation space (``input_shape``, channels first) to the output one, no bias.
    Zero padding of ``pads`` entries before each spatial axis (entries after the input are
    zeros too; only as many as the kernel reaches are used), then a cross-correlation with
    ``stride``, ``dilation`` and ``groups``, as both frameworks compute it. Numpy only.
    """

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[int, ...]
    groups: int

    @property
    def size(self) -> tuple[int, int]:
        """(rows, columns) of M: output entries, input entries."""
        return int(np.prod(self.output_shape)), int(np.prod(self.input_shape))

    def _windows(self, kernel: tuple[int, ...]):
        """(kernel offset, slices of the padded input it meets), one per kernel entry, and
        the padded input's spatial sizes."""
        padded = []
        for n, m, s, d, k, p in zip(self.input_shape[1:], self.output_shape[1:], self.stride,
                                    self.dilation, kernel, self.pads):
            padded.append(max(p + n, (m - 1) * s + d * (k - 1) + 1))
        windows = []
        for offset in itertools.product(*(range(k) for k in kernel)):
            windows.append((offset, tuple(
                slice(o * d, o * d + (m - 1) * s + 1, s)
                for o, d, m, s in zip(offset, self.dilation, self.output_shape[1:], self.stride)
            )))
        return windows, padded

    def _grouped(self, weight: np.ndarray) -> np.ndarray:
        out_c, in_per_group = weight.shape[:2]
        return weight.reshape(self.groups, out_c // self.groups, in_per_group, *weight.shape[2:])

    def mv(self, weight: np.ndarray, x: np.ndarray) -> np.ndarray:
        """M x for a batch ``x`` of shape (batch, *input_shape); returns (batch, *output_shape)."""
        g = self._grouped(weight)
        windows, padded = self._windows(weight.shape[2:])
        batch = x.shape[0]
        xp = np.zeros((batch, *self.input_shape[:1], *padded), np.result_type(x, weight))
        xp[(slice(None), slice(None)) + tuple(slice(p, p + n) for p, n in zip(self.pads, self.input_shape[1:]))] = x
        xp = xp.reshape(batch, self.groups, -1, *padded)
        out = 0
        for offset, window in windows:
            # one kernel entry: a (out/groups x in/groups) matrix times the input it meets
            patch = xp[(slice(None),) * 3 + window].reshape(batch, self.groups, g.shape[2], -1)
            out = out + g[(slice(None),) * 3 + offset] @ patch
        return out.reshape(batch, *self.output_shape)

    def mhv(self, weight: np.ndarray, y: np.ndarray) -> np.ndarray:
        """M^H y for a batch ``y`` of shape (batch, *output_shape); returns (batch, *input_shape):
        the transposed convolution with the conjugate kernel, cropped (the adjoint of M)."""
        g = self._grouped(weight).conj()
        windows, padded = self._windows(weight.shape[2:])
        batch = y.shape[0]
        yg = y.reshape(batch, self.groups, g.shape[1], -1)
        xp = np.zeros((batch, self.groups, g.shape[2], *padded), np.result_type(y, weight))
        spatial = self.output_shape[1:]
        for offset, window in windows:
            kernel_entry = np.swapaxes(g[(slice(None),) * 3 + offset], -1, -2)
            xp[(slice(None),) * 3 + window] += (kernel_entry @ yg).reshape(batch, self.groups, -1, *spatial)
        crop = tuple(slice(p, p + n) for p, n in zip(self.pads, self.input_shape[1:]))
        return xp.reshape(batch, -1, *padded)[(slice(None), slice(None)) + crop]

    def matrix(self, weight: np.ndarray) -> np.ndarray:
        """M explicitly: column j is the convolution of the j-th unit input."""
        rows, cols = self.size
        basis = np.eye(cols, dtype=weight.dtype).reshape(cols, *self.input_shape)
        return self.mv(weight, basis).reshape(cols, rows).T


class _Dense:
    """The W-matrix as the linear map of a power iteration."""

    def __init__(self, matrix: np.ndarray) -> None:
        self.matrix = matrix

    def mv(self, v: np.ndarray) -> np.ndarray:
        return self.matrix @ v

    def mhv(self, u: np.ndarray) -> np.ndarray:
        return self.matrix.conj().T @ u


class _Conv:
    """A convolution matrix, matrix-free, on flat vectors."""

    def __init__(self, conv: ConvShape, weight: np.ndarray) -> None:
        self.conv, self.weight = conv, weight

    def mv(self, v: np.ndarray) -> np.ndarray:
        return self.conv.mv(self.weight, v.reshape(1, *self.conv.input_shape)).ravel()

    def mhv(self, u: np.ndarray) -> np.ndarray:
        return self.conv.mhv(self.weight, u.reshape(1, *self.conv.output_shape)).ravel()
