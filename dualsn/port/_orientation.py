"""Which matrix a spectral norm normalizes: the messages that say so, and the orientation test
for square weights (numpy only)."""

from __future__ import annotations

import numpy as np

from dualsn.layout import IN_OUT, OUT_IN
from dualsn.port._keys import _describe_dim


_LAYOUT_TEXT = {OUT_IN: "[out, in]", IN_OUT: "[in, out]"}
ORIENTATION_TOL = 1e-3
"""u, v that miss both u = N(W v) and v = N(W^H u) by less than this fit as loaded."""


def _rows(layout: str, dim: int) -> str:
    return "output features" if (layout == OUT_IN) == (dim == 0) else "input features"


def _axis_text(kind: str, layout: str | None, dim: int | None) -> str:
    """How a spectral norm takes a weight: "along dim 0 of its [in, out] weight (rows: ...)"."""
    if dim is None:
        return _describe_dim(dim)
    text = f"along dim {dim}"
    if kind == "linear" and layout in _LAYOUT_TEXT and dim in (0, 1):
        text += f" of its {_LAYOUT_TEXT[layout]} weight (rows: {_rows(layout, dim)})"
    return text


def _register_text(kind: str, layout: str | None, dim: int) -> str:
    if kind == "linear" and layout in _LAYOUT_TEXT and dim in (0, 1):
        return f"dim={dim} (rows: {_rows(layout, dim)})"
    return f"dim={dim}"


def _dim_mismatch(name: str, kind: str, target: tuple, source: tuple, fitting: int | None) -> str:
    """The live path's message: ``target`` and ``source`` are (Linear layout, dim)."""
    text = (f"spectral norm of {name!r} normalizes a different matrix in the target than in the "
            f"source: the target takes it {_axis_text(kind, *target)}, the source "
            f"{_axis_text(kind, *source)}, so u and v would not fit")
    if fitting is not None and target[1] is not None:
        text += f"; register the target's with {_register_text(kind, target[0], fitting)}"
    return text


def _orientation_fits(w, dim: int, u, v, eps: float) -> tuple[float, float] | None:
    """How well u, v fit the target's W-matrix M as loaded, and its transpose: the smaller
    residual of u = N(M v) and v = N(M^H u), for M and for M^T. None unless M is square."""
    w, u, v = (np.asarray(a) for a in (w, u, v))
    if w.ndim < 2 or u.ndim != 1 or v.ndim != 1:
        return None
    dtype = np.complex128 if np.iscomplexobj(w) else np.float64
    dim %= w.ndim
    m = np.moveaxis(w, dim, 0).reshape(w.shape[dim], -1).astype(dtype)
    if m.shape[0] != m.shape[1] or u.shape != (m.shape[0],) or v.shape != (m.shape[1],):
        return None
    u, v = u.astype(dtype), v.astype(dtype)

    def unit(x):
        return x / max(float(np.linalg.norm(x)), eps)

    def residual(mat):
        return min(float(np.linalg.norm(u - unit(mat @ v))), float(np.linalg.norm(v - unit(mat.conj().T @ u))))

    return residual(m), residual(m.T)


def _transposed_fits_better(as_loaded: float, transposed: float) -> bool:
    return as_loaded > ORIENTATION_TOL and transposed * 100 < as_loaded


def _orientation_problem(name: str, kind: str, layout: str | None, dim: int, fits) -> str:
    as_loaded, transposed = fits
    text = (f"spectral norm of {name!r}: the source's u and v fit the transposed W-matrix (residual "
            f"{transposed:.1e}, against {as_loaded:.1e} as loaded): the source normalized this square "
            f"weight along its other axis, while the target takes it {_axis_text(kind, layout, dim)}. "
            "Loaded as they are, sigma and the normalized weight would be wrong")
    if dim in (0, 1):
        text += f"; register it with {_register_text(kind, layout, 1 - dim)}, as the source did"
    return text
