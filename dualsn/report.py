"""Diagnostics: how good is each layer's sigma estimate, and what does it add up to?

:func:`report` takes a torch ``nn.Module`` or a ``paddle.nn.Layer`` and finds every spectral
norm in it - dualsn's (any preset) and the built-ins (``torch.nn.utils.parametrizations``,
the older ``torch.nn.utils.spectral_norm`` hook, ``paddle.nn.utils.spectral_norm``). For each
it compares the estimate the layer divides by, ``sigma = u^H W v`` with the stored u and v, with
the exact largest singular value of the W-matrix (numpy SVD, in float64), and it multiplies
them up into upper bounds on the network's Lipschitz constant.

The bounds are heuristics. A product of per-layer norms bounds the Lipschitz constant of a
plain *chain* of the layers with 1-Lipschitz activations in between; residual sums,
concatenations, normalization layers and attention are not accounted for. And for a
convolution the W-matrix is the *reshaped kernel* (out x in*kh*kw): its largest singular value
is not the operator norm of the convolution, which can be larger (by up to
sqrt(kh*kw) for stride 1), so for convolutions even the chain "bound" is not a guarantee.

Nothing here changes the model: no power iteration runs on its state. The numbers come from
numpy copies of W, u and v, so this module imports numpy only; a framework is imported by
the collector for its own models.
"""

from __future__ import annotations

import importlib
import math
import sys
from dataclasses import dataclass, field

import numpy as np

from dualsn import spec as _spec

__all__ = ["LayerSN", "ReportRow", "SNReport", "report", "collect", "preset_name", "convergence"]

NOTE = (
    "Lipschitz bounds assume a plain chain of these layers with 1-Lipschitz activations; for "
    "convolutions sigma is that of the reshaped kernel (out x in*k*k), not the operator norm "
    "of the convolution, so there the bound is a heuristic."
)


@dataclass(frozen=True)
class LayerSN:
    """One spectral norm, as numpy copies: what the report and the plot are computed from.

    ``weight`` is the unnormalized W (float64 or complex128), ``u`` and ``v`` the stored
    singular-vector estimates (None for a 1-D weight normalized exactly), ``spec`` the
    algorithm (a built-in gets the preset that equals it, with its own n and eps).
    """

    name: str  # "blocks.0.conv1.weight"
    layer: str  # the layer's class name
    kind: str  # "dualsn" or "built-in"
    preset: str
    dim: int
    spec: _spec.Spec
    weight: np.ndarray = field(repr=False)
    u: np.ndarray | None = field(default=None, repr=False)
    v: np.ndarray | None = field(default=None, repr=False)

    @property
    def matrix(self) -> np.ndarray:
        return _spec.to_matrix(self.weight, self.dim)

    def sigma(self) -> float:
        """The estimate the layer divides by (real part), from the stored u, v."""
        if self.u is None:
            return float(max(np.linalg.norm(self.weight), self.spec.eps))
        return float(np.real(_spec.sigma(self.matrix, self.u, self.v)))

    def sigma_exact(self) -> float:
        """The largest singular value of the W-matrix (for a 1-D weight: its norm)."""
        if self.weight.ndim == 1:
            return float(np.linalg.norm(self.weight))
        return float(np.linalg.svd(self.matrix, compute_uv=False)[0])


@dataclass(frozen=True)
class ReportRow:
    """One line of the report. ``rel_error`` = (sigma - sigma_exact) / sigma_exact: negative
    when the estimate is low, so that the normalized weight's norm,
    ``normalized_norm = sigma_exact / sigma``, exceeds 1."""

    name: str
    layer: str
    shape: tuple[int, ...]
    dim: int
    preset: str
    sigma: float
    sigma_exact: float

    @property
    def rel_error(self) -> float:
        if self.sigma_exact == 0:
            return 0.0 if self.sigma == 0 else math.inf
        return (self.sigma - self.sigma_exact) / self.sigma_exact

    @property
    def normalized_norm(self) -> float:
        """Largest singular value of the normalized W-matrix, W / sigma."""
        return self.sigma_exact / abs(self.sigma) if self.sigma else math.inf


_HEADERS = ("layer", "type", "shape", "dim", "preset", "sigma", "exact (SVD)", "rel. error", "||W/sigma||")


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
        """Product of the estimates: the factor spectral norm divides out of a chain."""
        return float(np.prod([r.sigma for r in self.rows]))

    @property
    def exact_product(self) -> float:
        """Product of the exact sigmas: a chain bound for the network without spectral norm."""
        return float(np.prod([r.sigma_exact for r in self.rows]))

    @property
    def lipschitz_bound(self) -> float:
        """Product of ||W / sigma||: the chain bound for the spectrally normalized network
        (1.0 when every estimate is exact)."""
        return float(np.prod([r.normalized_norm for r in self.rows]))

    def _cells(self) -> list[tuple[str, ...]]:
        return [
            (
                r.name, r.layer, "x".join(str(s) for s in r.shape) or "scalar", str(r.dim), r.preset,
                f"{r.sigma:.6g}", f"{r.sigma_exact:.6g}", f"{r.rel_error:+.2e}", f"{r.normalized_norm:.6f}",
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
            f"product of ||W/sigma||:          {self.lipschitz_bound:.6g}  "
            "(Lipschitz upper bound of the normalized network)",
            "note: " + NOTE,
        ]

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
        lines = ["| " + " | ".join(_HEADERS) + " |", "|" + "---|" * len(_HEADERS)]
        lines += ["| " + " | ".join([f"`{c[0]}`", *c[1:]]) + " |" for c in self._cells()]
        summary = self._summary()
        return "\n".join((lines + [""] if self.rows else []) + [f"* {s}" for s in summary])

    def plot(self, path, iterations: int = 30, seed: int = 0) -> None:
        """Save a PNG: for each layer, the sigma estimate over ``iterations`` power iterations
        (in the layer's order) from its current u, v and from a fresh :func:`spec.init_uv`
        draw (``seed``), against the exact value. Needs matplotlib (``pip install
        "dualsn[plot]"``)."""
        plot(self.layers, path, iterations, seed)


# ---------------------------------------------------------------------------------------------
# Preset names


def preset_name(spec: _spec.Spec) -> str:
    """The :data:`dualsn.spec.PRESETS` name(s) whose algorithm ``spec`` follows (n and eps
    aside). ``torch_legacy`` and ``paddle`` are the same algorithm: both names are given."""
    keys = ("order", "warmup_iterations", "registration_forward", "vector_mode")
    names = [
        name for name, preset in _spec.PRESETS.items()
        if all(getattr(preset, k) == getattr(spec, k) for k in keys)
    ]
    label = "/".join(names) if names else "custom"
    extras = [f"{f}={getattr(spec, f)}" for f in ("coeff", "atol", "rtol") if getattr(spec, f) is not None]
    if spec.num_svs > 1:
        extras.append(f"num_svs={spec.num_svs}")
    if spec.n_power_iterations != 1:
        extras.insert(0, f"n={spec.n_power_iterations}")
    return label + (f" ({', '.join(extras)})" if extras else "")


# ---------------------------------------------------------------------------------------------
# Collectors: one per framework, each importing only its own framework.


def _wide(array: np.ndarray) -> np.ndarray:
    return array.astype(np.complex128 if np.iscomplexobj(array) else np.float64)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _torch_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()  # numpy has no bfloat16
    return _wide(tensor.cpu().resolve_conj().numpy())


def _paddle_numpy(tensor) -> np.ndarray:
    import paddle

    if tensor.dtype in (paddle.bfloat16, paddle.float16):
        tensor = tensor.astype(paddle.float32)
    return _wide(np.asarray(tensor.numpy()))


def _torch_layers(model) -> list[LayerSN]:
    import torch
    from torch.nn.utils import parametrizations, parametrize

    import dualsn.torch as dsn

    legacy = importlib.import_module("torch.nn.utils.spectral_norm").SpectralNorm
    found = []
    for prefix, module in model.named_modules():
        kind = type(module).__name__
        if parametrize.is_parametrized(module):
            # Registering a parametrization swaps the class for a subclass "Parametrized<cls>".
            kind = type(module).__mro__[1].__name__
            for pname, plist in module.parametrizations.items():
                # The tensor a spectral norm sees is the output of the parametrizations before it.
                with torch.no_grad():
                    x = plist.original if plist.is_tensor else None
                    for p in plist:
                        if x is None:  # a first parametrization taking several tensors
                            x = p(*[getattr(plist, f"original{i}") for i in range(plist.ntensors)])
                            continue
                        if isinstance(p, dsn.SpectralNorm):
                            found.append(LayerSN(
                                _join(prefix, pname), kind, "dualsn", preset_name(p.spec), p.dim, p.spec,
                                _torch_numpy(x),
                                None if p._u is None else _torch_numpy(p._u),
                                None if p._v is None else _torch_numpy(p._v),
                            ))
                        elif isinstance(p, parametrizations._SpectralNorm):
                            s = _spec.make_spec("torch", p.n_power_iterations, p.eps)
                            has_uv = x.ndim > 1
                            found.append(LayerSN(
                                _join(prefix, pname), kind, "built-in", preset_name(s) + ", built-in",
                                p.dim if has_uv else 0, s, _torch_numpy(x),
                                _torch_numpy(p._u) if has_uv else None, _torch_numpy(p._v) if has_uv else None,
                            ))
                        else:
                            x = p(x)
                            continue
                        # At most one spectral norm per tensor, and evaluating it could iterate.
                        break
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, legacy):
                s = _spec.make_spec("torch_legacy", hook.n_power_iterations, hook.eps)
                found.append(LayerSN(
                    _join(prefix, hook.name), kind, "built-in", "torch_legacy, built-in", hook.dim, s,
                    _torch_numpy(getattr(module, hook.name + "_orig")),
                    _torch_numpy(getattr(module, hook.name + "_u")),
                    _torch_numpy(getattr(module, hook.name + "_v")),
                ))
    return found


def _paddle_layers(model) -> list[LayerSN]:
    import dualsn.paddle as dsn

    found = []
    for prefix, layer in model.named_sublayers(include_self=True):
        kind = type(layer).__name__
        for hook in layer._forward_pre_hooks.values():
            if isinstance(hook, dsn.SpectralNormHook):
                weight, u, v = hook.state(layer)
                found.append(LayerSN(
                    _join(prefix, hook.name), kind, "dualsn", preset_name(hook.spec), hook.dim, hook.spec,
                    _paddle_numpy(weight),
                    None if u is None else _paddle_numpy(u), None if v is None else _paddle_numpy(v),
                ))
            elif type(hook).__name__ == "SpectralNorm" and hasattr(hook, "n_power_iterations"):
                # paddle.nn.utils.spectral_norm's hook: the torch legacy algorithm ("paddle" preset)
                s = _spec.make_spec("paddle", hook.n_power_iterations, hook.eps)
                found.append(LayerSN(
                    _join(prefix, hook.name), kind, "built-in", "paddle, built-in", hook.dim, s,
                    _paddle_numpy(getattr(layer, hook.name + "_orig")),
                    _paddle_numpy(getattr(layer, hook.name + "_u")),
                    _paddle_numpy(getattr(layer, hook.name + "_v")),
                ))
    return found


def _framework_of(model) -> str:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        return "torch"
    paddle = sys.modules.get("paddle")
    if paddle is not None and isinstance(model, paddle.nn.Layer):
        return "paddle"
    raise TypeError(f"Expected a torch.nn.Module or a paddle.nn.Layer, but got {type(model).__name__}")


def collect(model) -> list[LayerSN]:
    """Every spectral norm in ``model`` (a torch module or a Paddle layer), as numpy copies,
    in the order of the model's layers."""
    return _torch_layers(model) if _framework_of(model) == "torch" else _paddle_layers(model)


def report(model) -> SNReport:
    """The per-layer sigma report of ``model`` (a ``torch.nn.Module`` or ``paddle.nn.Layer``).

    Each row: the parameter's qualified name, layer type, weight shape, ``dim``, preset, the
    sigma estimate (u^H W v with the stored u, v; what the layer divides by), the exact
    largest singular value of the W-matrix (SVD) and their relative error. The products of
    sigma over the rows give Lipschitz upper bounds that hold for a plain chain of layers
    only; for convolutions the reshaped-kernel sigma is not the convolution's operator norm,
    so there the "bound" is a heuristic. The model is not changed.
    """
    layers = collect(model)
    rows = [
        ReportRow(
            l.name, l.layer, tuple(l.weight.shape), _spec.canonical_dim(l.dim, l.weight.ndim), l.preset,
            l.sigma(), l.sigma_exact(),
        )
        for l in layers
    ]
    return SNReport(_framework_of(model), rows, layers)


# ---------------------------------------------------------------------------------------------
# Convergence over power iterations, and its plot


def convergence(layer: LayerSN, iterations: int, u0=None, v0=None) -> np.ndarray:
    """sigma estimates u^H W v before and after each of ``iterations`` power iterations in the
    layer's order (``iterations + 1`` values), from (u0, v0), by default the stored u, v.
    A 1-D weight normalized exactly has no iteration: its value is constant."""
    if layer.u is None:
        return np.full(iterations + 1, layer.sigma())
    w_mat = layer.matrix
    u = layer.u if u0 is None else u0
    v = layer.v if v0 is None else v0
    out = [np.real(_spec.sigma(w_mat, u, v))]
    for _ in range(iterations):
        u, v = _spec.power_iteration(w_mat, u, v, 1, layer.spec.order, layer.spec.eps)
        out.append(np.real(_spec.sigma(w_mat, u, v)))
    return np.asarray(out, dtype=np.float64)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError('plotting needs matplotlib: pip install "dualsn[plot]"') from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot(layers: list[LayerSN], path, iterations: int = 30, seed: int = 0) -> None:
    """Save the convergence plot of ``layers`` (see :meth:`SNReport.plot`) to ``path``.

    One panel per layer: the relative gap (exact - estimate) / exact on a log scale (floored
    at 1e-16: float64 rounding), after k power iterations from the stored u, v and from a
    fresh draw. The title gives the exact sigma and the stored estimate.
    """
    if not layers:
        raise ValueError("no spectral norm to plot")
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    steps = np.arange(iterations + 1)
    floor = 1e-16

    def gap(estimates, exact):
        return np.maximum(np.abs(exact - estimates) / exact if exact else np.abs(estimates), floor)

    for ax, layer in zip(axes.flat, layers):
        exact = layer.sigma_exact()
        stored = convergence(layer, iterations)
        ax.semilogy(steps, gap(stored, exact), color="C0", linewidth=2,
                    label="from the stored u, v (k = 0: the layer's sigma)")
        if layer.u is not None:
            h, w = layer.matrix.shape
            u0, v0 = _spec.init_uv(h, w, seed, layer.u.dtype, layer.spec.eps)
            fresh = convergence(layer, iterations, u0, v0)
            ax.semilogy(steps, gap(fresh, exact), color="C1", marker=".", markersize=3,
                        label=f"from a fresh draw (seed {seed})")
            warm = layer.spec.registration_iterations(True)
            if 0 < warm <= iterations:
                ax.axvline(warm, color="grey", linestyle=":", linewidth=1,
                           label="registration iterations (training mode)")
        shape = "x".join(map(str, layer.weight.shape))
        ax.set_title(f"{layer.name} ({layer.layer} {shape})\nexact {exact:.5g}, stored estimate {stored[0]:.5g}",
                     fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("power iterations k", fontsize=7)
        ax.set_ylabel("|exact - estimate| / exact", fontsize=7)
        ax.set_ylim(floor / 3, None)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize=8)
    fig.suptitle("sigma estimate u^H W v vs the exact largest singular value (SVD), over power iterations",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
