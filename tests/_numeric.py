"""Numeric helpers shared by the tests."""

import numpy as np


def rel(a, b) -> float:
    """max|a - b| / max|b|: the relative difference of ``a`` to the reference ``b``."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def random_array(shape, dtype=np.float64, seed=0):
    """Standard normal entries of ``dtype`` (complex: independent real and imaginary parts).

    ``seed`` is an int or a ``numpy.random.Generator``, which is used (and advanced) as is."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    if np.dtype(dtype).kind == "c":
        x = x + 1j * rng.standard_normal(shape)
    return x.astype(dtype)
