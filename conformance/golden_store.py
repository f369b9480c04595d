"""The stored golden traces: where they live (``conformance/golden/<preset>.npz``) and how to read
one back. Written by :mod:`conformance.golden`, read by it and by :mod:`conformance.runner` (the
"golden" oracle); this module imports neither, so the two do not import each other."""

from __future__ import annotations

import functools
import json
import os

import numpy as np

from conformance import cases as _cases

__all__ = ["DIRECTORY", "REGENERATE", "trace", "path", "fingerprint"]

DIRECTORY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
REGENERATE = "regenerate with: python -m conformance.golden --regenerate"


def path(preset: str) -> str:
    return os.path.join(DIRECTORY, f"{preset}.npz")


def fingerprint(case: _cases.Case) -> str:
    """What identifies a case's definition in a golden file (a stale file is detected)."""
    return repr(case)


@functools.lru_cache(maxsize=None)
def _load(preset: str):
    """(layout, {dtype: flat array}) of one preset's file; (None, None) if there is none."""
    if not os.path.exists(path(preset)):
        return None, None
    with np.load(path(preset), allow_pickle=False) as data:
        layout = json.loads(str(data["layout"]))
        flats = {dtype: data[dtype] for dtype in ("float32", "float64")}
    return layout, flats


def trace(case_id: str, sequence: str, preset: str):
    """The stored trace, or None if it is missing or was made for a different case definition
    (cases the reference does not run under ``preset`` have none)."""
    layout, flats = _load(preset)
    entry = None if layout is None else layout.get(case_id)
    if entry is None or entry["config"] != fingerprint(_cases.CASES_BY_ID[case_id]):
        return None
    if sequence not in entry["traces"]:
        return None
    flat = flats[entry["dtype"]]
    out = []
    for label, shape, offset in entry["traces"][sequence]:
        size = int(np.prod(shape, dtype=np.int64))
        out.append((label, flat[offset : offset + size].reshape(shape)))
    return out
