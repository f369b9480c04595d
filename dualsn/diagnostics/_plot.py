"""Convergence of the sigma estimate over power iterations, and its plot (matplotlib, loaded
only to draw)."""

from __future__ import annotations

import numpy as np

from dualsn import spec as _spec

__all__ = ["convergence", "plot"]


def _power_step(op, u: np.ndarray, v: np.ndarray, order: str, eps: float):
    """One power iteration of a single pair in ``order``: :func:`dualsn.reference.power_step` for a
    linear map given by its products."""
    pair = {"u": u, "v": v}

    def update_u():
        pair["u"] = _spec.normalize(op.mv(pair["v"]), eps)

    def update_v():
        pair["v"] = _spec.normalize(op.mhv(pair["u"]), eps)

    _spec.in_order(order, update_u, update_v)
    return pair["u"], pair["v"]


def convergence(layer, iterations: int, u0=None, v0=None) -> np.ndarray:
    """sigma estimates u^H W v before and after each of ``iterations`` power iterations in the
    layer's order (``iterations + 1`` values), from (u0, v0), by default the stored u, v.
    A 1-D weight normalized exactly has no iteration: its value is constant."""
    if layer.u is None:
        return np.full(iterations + 1, layer.sigma())
    op = layer.operator
    u = (layer.u if u0 is None else u0).ravel()
    v = (layer.v if v0 is None else v0).ravel()
    out = [np.real(np.vdot(u, op.mv(v)))]
    for _ in range(iterations):
        u, v = _power_step(op, u, v, layer.spec.order, layer.spec.eps)
        out.append(np.real(np.vdot(u, op.mv(v))))
    return np.asarray(out, dtype=np.float64)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError('plotting needs matplotlib: pip install "dualsn[plot]"') from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


_FLOOR = 1e-16  # the smallest gap drawn: float64 rounding


def plot(layers: list, path, iterations: int = 30, seed: int = 0) -> None:
    """Save the convergence plot of ``layers`` (see :meth:`SNReport.plot`) to ``path``.

    One panel per layer: the relative gap (exact - estimate) / exact on a log scale (floored
    at 1e-16: float64 rounding), after k power iterations from the stored u, v and from a
    fresh draw. The title gives the exact sigma and the stored estimate.
    """
    if not layers:
        raise ValueError("no spectral norm to plot")
    plt = _pyplot()

    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        _panel(ax, layer, iterations, seed)
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


def _gap(estimates, exact):
    return np.maximum(np.abs(exact - estimates) / exact if exact else np.abs(estimates), _FLOOR)


def _panel(ax, layer, iterations: int, seed: int) -> None:
    """One layer's panel: the gap from the stored u, v and from a fresh draw."""
    from matplotlib.ticker import MaxNLocator

    steps = np.arange(iterations + 1)
    exact = layer.sigma_exact()
    stored = convergence(layer, iterations)
    ax.semilogy(steps, _gap(stored, exact), color="C0", linewidth=2,
                label="from the stored u, v (k = 0: the layer's sigma)")
    if layer.u is not None:
        h, w = layer.u.size, layer.v.size
        u0, v0 = _spec.init_uv(h, w, seed, layer.u.dtype, layer.spec.eps)
        fresh = convergence(layer, iterations, u0, v0)
        ax.semilogy(steps, _gap(fresh, exact), color="C1", marker=".", markersize=3,
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
    ax.set_ylim(_FLOOR / 3, None)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3, which="both")
