"""Numeric helpers shared by the tests."""

import numpy as np


def rel(a, b) -> float:
    """max|a - b| / max|b|: the relative difference of ``a`` to the reference ``b``."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
