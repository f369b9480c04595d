"""The conformance tolerances, stated once.

Two arrays ``actual`` and ``expected`` (the oracle's) agree when they have the same shape and

    relative_error = max|actual - expected| / max(max|expected|, FLOOR)  <=  RTOL[dtype]

i.e. the largest absolute difference, measured against the largest magnitude of the expected
array (one scale per array, so small entries are not over-weighted). FLOOR only avoids a
division by zero: an expected array of exact zeros (e.g. "u did not change in eval mode")
demands differences below 1e-30 * RTOL, i.e. exact zeros.
"""

from __future__ import annotations

import numpy as np

RTOL = {"float64": 1e-10, "float32": 2e-5}
FLOOR = 1e-30


def relative_error(actual, expected) -> float:
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    if actual.shape != expected.shape:
        return float("inf")
    if expected.size == 0:
        return 0.0
    diff = np.max(np.abs(actual.astype(np.complex128) - expected.astype(np.complex128)))
    if not np.isfinite(diff):
        return float("inf")
    return float(diff / max(float(np.max(np.abs(expected))), FLOOR))


def compare(actual, expected, dtype: str) -> list[str]:
    """Differences between two traces (lists of (label, array)); empty when they agree."""
    rtol = RTOL[dtype]
    actual_labels = [label for label, _ in actual]
    expected_labels = [label for label, _ in expected]
    if actual_labels != expected_labels:
        return [f"trace entries differ: got {actual_labels}, expected {expected_labels}"]
    problems = []
    for (label, a), (_, e) in zip(actual, expected):
        a, e = np.asarray(a), np.asarray(e)
        if a.shape != e.shape:
            problems.append(f"{label}: shape {a.shape} != expected {e.shape}")
            continue
        err = relative_error(a, e)
        if not err <= rtol:
            problems.append(f"{label}: relative error {err:.3g} > {rtol:g}")
    return problems
