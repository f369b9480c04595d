"""Diagnostics: how good is each layer's sigma estimate, and what does it add up to?

:func:`dualsn.report.report` takes a torch ``nn.Module`` or a ``paddle.nn.Layer``, its
framework's adapter finds every spectral norm in it - dualsn's (any preset) and the built-ins (``torch.nn.utils.parametrizations``,
the older ``torch.nn.utils.spectral_norm`` hook, ``paddle.nn.utils.spectral_norm``). For each
it compares the estimate the layer divides by, ``sigma = u^H W v`` with the stored u and v, with
the exact largest singular value of the W-matrix (numpy SVD, in float64), and it multiplies
them up into upper bounds on the network's Lipschitz constant.

The bounds are heuristics. A product of per-layer norms bounds the Lipschitz constant of a
plain *chain* of the layers with 1-Lipschitz activations in between; residual sums,
concatenations, normalization layers and attention are not accounted for. And for a
convolution under ``spectral_norm`` the W-matrix is the *reshaped kernel* (out x in*kh*kw):
its largest singular value is not the operator norm of the convolution, which can be larger
(by up to sqrt(kh*kw) for stride 1), so for convolutions even the chain "bound" is not a
guarantee.

A convolution under ``spectral_norm_conv`` is normalized by its operator norm: its matrix M is
the explicit convolution of one sample of its ``input_shape`` (u, v live in the output and
input activation spaces), its ``dim`` shows as "conv", and the exact value is the largest
singular value of M. M is built here in numpy (:class:`ConvShape`) and goes through an SVD
when it has at most :data:`CONV_SVD_LIMIT` entries (1e6, 8 MB: an SVD of a 1000 x 1000
matrix takes a second or two, and its cost grows with the cube of the size); for a
larger one the reference is a Lanczos estimate (matrix-free, at most
:data:`CONV_LANCZOS_STEPS` products with M and M^H, started from the stored v): a *lower*
bound of the exact value, to about 1e-10 when it converged, marked "~" in the tables and
``exact_method == "lanczos"`` in the row. (Lanczos rather than more power iterations: for the
same number of products it converges far faster when the top singular values are close.)

With ``coeff`` a layer divides by max(1, sigma / coeff) rather than sigma (see
:meth:`dualsn.spec.Spec.divisor`), so its normalized norm is sigma_exact / max(1, sigma / coeff),
min(sigma_exact, coeff) when the estimate is exact; the products use that.

Nothing here changes the model: no power iteration runs on its state. The numbers come from
numpy copies of W, u and v, so this package imports numpy only (and matplotlib to plot):
the backends' adapters copy the state and call :func:`build_report`.

Layout: this module (the rows, the report, the reference values), ``_conv`` (the convolution
of one sample as a matrix-free map), ``_plot`` (convergence over power iterations, the plot).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from dualsn import spec as _spec
from dualsn.diagnostics._conv import ConvShape, _Conv, _Dense
from dualsn.diagnostics._plot import convergence, plot

__all__ = ["LayerSN", "ReportRow", "SNReport", "ConvShape", "build_report", "layers_of", "preset_name", "convergence", "plot"]

NOTE = (
    "Lipschitz bounds assume a plain chain of these layers with 1-Lipschitz activations; for "
    "convolutions under spectral_norm sigma is that of the reshaped kernel (out x in*k*k), not the "
    "operator norm of the convolution, so there the bound is a heuristic (rows with dim 'conv', "
    "from spectral_norm_conv, use the operator norm)."
)


LANCZOS_NOTE = (
    "~: the explicit convolution matrix is too large for an SVD; the reference is a Lanczos "
    "estimate, a lower bound of the exact operator norm."
)


CONV_SVD_LIMIT = 1_000_000
"""A convolution matrix with at most this many entries (input size x output size) is built
explicitly and its exact largest singular value taken by SVD; a larger one gets a Lanczos
estimate."""


CONV_LANCZOS_STEPS = 100
"""At most this many Lanczos steps (each one product with M and one with M^H) give the
reference value of a convolution too large for an SVD; they stop once the largest Ritz value
of M^H M is within :data:`CONV_LANCZOS_RTOL` (relative) of an eigenvalue."""


CONV_LANCZOS_RTOL = 1e-10


@dataclass(frozen=True)
class LayerSN:
    """One spectral norm, as numpy copies: what the report and the plot are computed from.

    ``weight`` is the unnormalized W (float64 or complex128), ``u`` and ``v`` the stored
    singular-vector estimates (None for a 1-D weight normalized exactly), ``spec`` the
    algorithm (a built-in gets the preset that equals it, with its own n and eps). A
    convolution normalized by its operator norm (``spectral_norm_conv``) has ``dim`` None and
    ``conv`` set; its u, v have the activation shapes of one output / input sample.
    """

    name: str  # "blocks.0.conv1.weight"
    layer: str  # the layer's class name
    kind: str  # "dualsn" or "built-in"
    preset: str
    dim: int | None
    spec: _spec.Spec
    weight: np.ndarray = field(repr=False)
    u: np.ndarray | None = field(default=None, repr=False)
    v: np.ndarray | None = field(default=None, repr=False)
    conv: ConvShape | None = None

    @property
    def matrix(self) -> np.ndarray:
        """The matrix sigma estimates the largest singular value of: the W-matrix, or the
        explicit convolution matrix (output size x input size: may be large)."""
        if self.conv is not None:
            return self.conv.matrix(self.weight)
        return _spec.to_matrix(self.weight, self.dim)

    @property
    def operator(self):
        """That matrix as a map with ``mv``/``mhv`` on flat vectors (a convolution stays
        matrix-free)."""
        return _Conv(self.conv, self.weight) if self.conv is not None else _Dense(self.matrix)

    def sigma(self) -> float:
        """The estimate the layer divides by (real part), from the stored u, v."""
        if self.u is None:
            return float(max(np.linalg.norm(self.weight), self.spec.eps))
        return float(np.real(np.vdot(self.u.ravel(), self.operator.mv(self.v.ravel()))))

    def sigma_exact(self) -> float:
        """The largest singular value of the matrix (for a 1-D weight: its norm). For a
        convolution whose matrix has more than :data:`CONV_SVD_LIMIT` entries: a Lanczos
        estimate (see :attr:`exact_method`)."""
        return self._reference[0]

    @property
    def exact_method(self) -> str:
        """How :meth:`sigma_exact` was obtained: ``"svd"`` (exact; a 1-D weight's norm too)
        or ``"lanczos"`` (a large convolution: :func:`_lanczos_reference`, a lower bound)."""
        return self._reference[1]

    @functools.cached_property
    def _reference(self) -> tuple[float, str]:
        if self.weight.ndim == 1 and self.conv is None:
            return float(np.linalg.norm(self.weight)), "svd"
        if self.conv is None or np.prod(self.conv.size, dtype=np.float64) <= CONV_SVD_LIMIT:
            return float(np.linalg.svd(self.matrix, compute_uv=False)[0]), "svd"
        return _lanczos_reference(self), "lanczos"


def _lanczos_reference(layer: LayerSN) -> float:
    """The largest singular value of a large convolution M, matrix-free: the square root of
    the largest eigenvalue of M^H M by the Lanczos iteration (three-term recurrence, no
    reorthogonalization: for the largest eigenvalue that only adds copies of converged Ritz
    values), started from the stored v. Stops when the Ritz residual bound |beta_k s_k|, the
    distance from the largest Ritz value to an eigenvalue, is below :data:`CONV_LANCZOS_RTOL`
    times that value, or after :data:`CONV_LANCZOS_STEPS` steps."""
    op = layer.operator
    q = layer.v.ravel()
    if not np.linalg.norm(q) > 0:  # a zero v (from a zero W): any start will do
        q = _spec.init_uv(1, q.size, 0, q.dtype)[1]
    q = q / np.linalg.norm(q)
    q_prev = np.zeros_like(q)
    alphas: list[float] = []
    betas: list[float] = []
    beta = 0.0
    top = 0.0
    for _ in range(CONV_LANCZOS_STEPS):
        w = op.mhv(op.mv(q))
        alpha = float(np.real(np.vdot(q, w)))
        w = w - alpha * q - beta * q_prev
        beta = float(np.linalg.norm(w))
        alphas.append(alpha)
        t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        ritz, vectors = np.linalg.eigh(t)
        top = float(ritz[-1])
        if beta * abs(vectors[-1, -1]) <= CONV_LANCZOS_RTOL * top or beta <= 1e-300:
            break  # converged, or the Krylov space is exhausted (an invariant subspace)
        betas.append(beta)
        q_prev, q = q, w / beta
    return float(np.sqrt(max(top, 0.0)))


@dataclass(frozen=True)
class ReportRow:
    """One line of the report. ``rel_error`` = (sigma - sigma_exact) / sigma_exact: negative
    when the estimate is low, so that the normalized weight's norm,
    ``normalized_norm = sigma_exact / sigma``, exceeds 1 (with ``coeff``: exceeds coeff).

    ``dim`` is None for a convolution normalized by its operator norm (shown as "conv");
    ``shape`` is the weight's shape; ``exact_method`` is ``"svd"`` or ``"lanczos"`` (see
    :attr:`LayerSN.exact_method`); ``coeff`` the layer's soft bound, or None.
    """

    name: str
    layer: str
    shape: tuple[int, ...]
    dim: int | None
    preset: str
    sigma: float
    sigma_exact: float
    exact_method: str = "svd"
    coeff: float | None = None

    @property
    def divisor(self) -> float:
        """What the layer divides W by: |sigma|, or with ``coeff`` max(1, sigma / coeff)."""
        if self.coeff is None:
            return abs(self.sigma)
        return abs(self.sigma) / self.coeff if self.sigma > self.coeff else 1.0

    @property
    def rel_error(self) -> float:
        if self.sigma_exact == 0:
            return 0.0 if self.sigma == 0 else math.inf
        return (self.sigma - self.sigma_exact) / self.sigma_exact

    @property
    def normalized_norm(self) -> float:
        """Largest singular value of the normalized matrix, W / sigma (W / max(1, sigma /
        coeff) with ``coeff``)."""
        return self.sigma_exact / self.divisor if self.divisor else math.inf


_HEADERS = ("layer", "type", "shape", "dim", "preset", "sigma", "exact (SVD)", "rel. error", "||W_sn||")


def _md_cell(text: str) -> str:
    """A Markdown table cell: a ``|`` inside it (``||W_sn||``) would end the cell, so escape it
    (``\\|``, which GFM also honours inside a code span)."""
    return text.replace("|", "\\|")


@dataclass
class SNReport:
    """Per-layer rows plus the products over them (see the module docstring for what the
    products do and do not bound). ``str(report)`` is a text table, :meth:`to_markdown` a
    Markdown one; :meth:`plot` draws the estimate over power iterations for each layer."""

    framework: str
    rows: list[ReportRow]
    layers: list[LayerSN] = field(default_factory=list, repr=False)

    @property
    def sigma_product(self) -> float:
        """Product of the estimates (without ``coeff``: the factor spectral norm divides out of
        a chain)."""
        return float(np.prod([r.sigma for r in self.rows]))

    @property
    def exact_product(self) -> float:
        """Product of the exact sigmas: a chain bound for the network without spectral norm."""
        return float(np.prod([r.sigma_exact for r in self.rows]))

    @property
    def lipschitz_bound(self) -> float:
        """Product of the normalized norms ||W_sn|| (:attr:`ReportRow.normalized_norm`): the
        chain bound for the spectrally normalized network (1.0 when every estimate is exact
        and no layer has ``coeff``)."""
        return float(np.prod([r.normalized_norm for r in self.rows]))

    def _cells(self) -> list[tuple[str, ...]]:
        return [
            (
                r.name, r.layer, "x".join(str(s) for s in r.shape) or "scalar",
                "conv" if r.dim is None else str(r.dim), r.preset, f"{r.sigma:.6g}",
                ("~" if r.exact_method == "lanczos" else "") + f"{r.sigma_exact:.6g}",
                f"{r.rel_error:+.2e}", f"{r.normalized_norm:.6f}",
            )
            for r in self.rows
        ]

    def _summary(self) -> list[str]:
        if not self.rows:
            return [f"no spectral norm found in this {self.framework} model"]
        return [
            f"{len(self.rows)} spectral norm(s) ({self.framework}); largest |rel. error| "
            f"{max(abs(r.rel_error) for r in self.rows):.2e}",
            f"product of sigma (estimates):    {self.sigma_product:.6g}",
            f"product of exact sigma:          {self.exact_product:.6g}  "
            "(Lipschitz upper bound without spectral norm)",
            f"product of ||W_sn||:             {self.lipschitz_bound:.6g}  "
            "(Lipschitz upper bound of the normalized network; W_sn = W / max(1, sigma / coeff) "
            "where coeff is set)",
            "note: " + NOTE,
        ] + (["note: " + LANCZOS_NOTE] if any(r.exact_method == "lanczos" for r in self.rows) else [])

    def __str__(self) -> str:
        rows = [_HEADERS] + self._cells()
        widths = [max(len(r[i]) for r in rows) for i in range(len(_HEADERS))]
        numeric = {3, 5, 6, 7, 8}  # right-aligned columns
        lines = []
        for k, row in enumerate(rows):
            cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
            lines.append("  ".join(cells).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join((lines if self.rows else []) + self._summary())

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(map(_md_cell, _HEADERS)) + " |", "|" + "---|" * len(_HEADERS)]
        lines += ["| " + " | ".join([f"`{_md_cell(c[0])}`", *map(_md_cell, c[1:])]) + " |" for c in self._cells()]
        summary = self._summary()
        return "\n".join((lines + [""] if self.rows else []) + [f"* {s}" for s in summary])

    def plot(self, path, iterations: int = 30, seed: int = 0) -> None:
        """Save a PNG: for each layer, the sigma estimate over ``iterations`` power iterations
        (in the layer's order) from its current u, v and from a fresh :func:`spec.init_uv`
        draw (``seed``), against the exact value. Needs matplotlib (``pip install
        "dualsn[plot]"``)."""
        plot(self.layers, path, iterations, seed)


def preset_name(spec: _spec.Spec) -> str:
    """The :data:`dualsn.spec.PRESETS` name(s) whose algorithm ``spec`` follows (n and eps
    aside). ``torch_legacy`` and ``paddle`` are the same algorithm: both names are given."""
    names = _spec.matching_presets(spec)
    label = "/".join(names) if names else "custom"
    extras = [f"{f}={getattr(spec, f)}" for f in ("coeff", "atol", "rtol") if getattr(spec, f) is not None]
    if spec.num_svs > 1:
        extras.append(f"num_svs={spec.num_svs}")
    if spec.n_power_iterations != 1:
        extras.insert(0, f"n={spec.n_power_iterations}")
    return label + (f" ({', '.join(extras)})" if extras else "")


def _wide(array: np.ndarray) -> np.ndarray:
    return array.astype(np.complex128 if np.iscomplexobj(array) else np.float64)


def _layer_sn(found) -> LayerSN:
    """A :class:`LayerSN` from what an adapter found (a
    :class:`dualsn.adapter_common.SpectralNormState`)."""
    preset = found.label
    if preset is None:
        preset = preset_name(found.spec) + (", built-in" if found.kind == "built-in" else "")
    return LayerSN(
        found.name, found.layer, found.kind, preset, found.dim, found.spec, _wide(found.weight),
        None if found.u is None else _wide(found.u), None if found.v is None else _wide(found.v),
        None if found.conv is None else ConvShape(**found.conv),
    )


def layers_of(found) -> list[LayerSN]:
    """:class:`LayerSN` of each spectral norm an adapter's ``spectral_norms`` found."""
    return [_layer_sn(f) for f in found]


def build_report(framework: str, found) -> SNReport:
    """The per-layer sigma report of the spectral norms ``found`` in a model of ``framework``
    (what its adapter's ``spectral_norms`` returns; see :func:`dualsn.report.report`)."""
    layers = layers_of(found)
    rows = [
        ReportRow(
            l.name, l.layer, tuple(l.weight.shape),
            None if l.conv is not None else _spec.canonical_dim(l.dim, l.weight.ndim), l.preset,
            l.sigma(), l.sigma_exact(), l.exact_method, l.spec.coeff,
        )
        for l in layers
    ]
    return SNReport(framework, rows, layers)
