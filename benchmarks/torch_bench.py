"""PyTorch driver: builds the timed callables for every case.

Rows: ``plain`` (no spectral norm), ``builtin`` (``torch.nn.utils.parametrizations.spectral_norm``,
the built-in that dualsn's default preset reproduces) and ``dualsn`` (``dualsn.torch.spectral_norm``,
compat="torch"). Floor rows time the unavoidable arithmetic of one training step on the same
weight: one W v, one W^H u (a transposed view, so BLAS gets a transpose flag instead of a
copy), the rescale W / sigma into a preallocated buffer, and the rank-1 gradient term
(G - <G, W_sn> u v^T) / sigma as one ``addr`` into a preallocated buffer after one dot
product. Outputs go to preallocated buffers so the floor is arithmetic, not allocation.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.cases import Case, Floor, SetupError, converged_uv
from benchmarks.timing import Variant

FLOOR_TRAIN = ("floor:Wv", "floor:WHu", "floor:rescale", "floor:rank1_grad")
FLOOR_EVAL = ("floor:Wv", "floor:rescale")


class TorchDriver:
    name = "torch"

    def __init__(self, threads: int, device: str) -> None:
        if device == "cuda" and not torch.cuda.is_available():
            raise SetupError("--device cuda was asked for, but torch.cuda.is_available() is False")
        torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.threads = threads
        self.sn = self._sn_functions()

    # -- environment -----------------------------------------------------------------------

    def info(self) -> dict:
        info = dict(
            version=torch.__version__,
            device=str(self.device),
            threads=torch.get_num_threads(),
            interop_threads=torch.get_num_interop_threads(),
            sn_variants={k: _describe(f) for k, f in self.sn.items()},
        )
        if self.device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(self.device)
        return info

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @staticmethod
    def _sn_functions() -> dict[str, Callable]:
        sn = {"builtin": torch.nn.utils.parametrizations.spectral_norm}
        try:
            import dualsn.torch as dsn
        except ImportError as exc:  # the backend is written by another helper
            warnings.warn(f"dualsn.torch unavailable, no dualsn rows: {exc}")
        else:
            sn["dualsn"] = dsn.spectral_norm
        return sn

    # -- cases -------------------------------------------------------------------------------

    def variants(self, case: Case, mode: str) -> tuple[list[Variant], tuple[str, ...]]:
        """The timed callables for ``case`` in ``mode`` and the names of its floor rows."""
        torch.manual_seed(0)
        if case.kind == "register":
            return self._register(case), ()
        if case.kind == "sngan":
            make = lambda sn: _sngan_discriminator(case.params["ndf"], sn)  # noqa: E731
            base = None
            x = torch.randn(case.params["batch"], 3, case.params["size"], case.params["size"])
        else:
            base = _layer(case)
            make = lambda sn: _with_sn(copy.deepcopy(base), sn)  # noqa: E731
            x = _input(case)
        x = x.to(self.device)
        out = []
        for row, sn in [("plain", None), *self.sn.items()]:
            torch.manual_seed(1)  # the same weights (and u, v draws) for every row
            model = make(sn).to(self.device)
            out.append(Variant(row, _train_step(model, x) if mode == "train" else _eval_forward(model, x)))
        floor: tuple[str, ...] = ()
        if base is not None:
            floor = FLOOR_TRAIN if mode == "train" else FLOOR_EVAL
            ops = floor_ops(base.weight.detach().to(self.device)).ops
            out += [Variant(name, ops[name]) for name in floor]
        return out, floor

    def _register(self, case: Case) -> list[Variant]:
        n_in, n_out = case.params["in_features"], case.params["out_features"]
        weight = nn.Linear(n_in, n_out).weight.detach().to(self.device)

        def fresh() -> nn.Module:
            layer = nn.utils.skip_init(nn.Linear, n_in, n_out, device=self.device)
            with torch.no_grad():
                layer.weight.copy_(weight)
            return layer

        return [Variant(row, sn, prepare=fresh) for row, sn in self.sn.items()]


def _describe(fn: Callable) -> str:
    return f"{fn.__module__}.{getattr(fn, '__qualname__', fn)}"


def _layer(case: Case) -> nn.Module:
    p = case.params
    if case.kind == "linear":
        return nn.Linear(p["in_features"], p["out_features"])
    return nn.Conv2d(p["in_channels"], p["out_channels"], p["kernel"], padding=p["padding"])


def _input(case: Case) -> torch.Tensor:
    p = case.params
    if case.kind == "linear":
        return torch.randn(p["batch"], p["in_features"])
    return torch.randn(p["batch"], p["in_channels"], p["size"], p["size"])


def _with_sn(module: nn.Module, sn: Callable | None) -> nn.Module:
    """``module`` with ``sn`` applied to every Conv2d and Linear in it (None: unchanged)."""
    if sn is not None:
        for m in list(module.modules()):
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                sn(m)
    return module


def _train_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    model.train()

    def step() -> None:
        model(x).mean().backward()
        model.zero_grad(set_to_none=True)

    return step


def _eval_forward(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    model.eval()

    def forward() -> None:
        with torch.no_grad():
            model(x)

    return forward


def floor_ops(weight: torch.Tensor) -> Floor:
    """The unavoidable per-step arithmetic on this weight's W-matrix (dim 0)."""
    w = weight.reshape(weight.shape[0], -1)  # a view: conv weights are contiguous
    u, v = (torch.from_numpy(x).to(w.device) for x in converged_uv(w.cpu().numpy()))
    sigma = torch.vdot(u, w @ v)
    w_sn = w / sigma
    grad = torch.randn_like(w)
    inv = 1.0 / sigma.item()  # known from the forward pass
    buf_h, buf_w = torch.empty_like(u), torch.empty_like(v)
    buf_mat, buf_grad = torch.empty_like(w), torch.empty_like(w)

    def wv() -> None:
        torch.mv(w, v, out=buf_h)

    def whu() -> None:
        torch.mv(w.mH, u, out=buf_w)

    def rescale() -> None:
        torch.div(w, sigma, out=buf_mat)

    def rank1_grad() -> None:
        # dL/dW = G / sigma - (<G, W_sn> / sigma) u v^T: one dot, then one fused pass.
        c = torch.vdot(w_sn.reshape(-1), grad.reshape(-1)).item()
        torch.addr(grad, u, v, beta=inv, alpha=-c * inv, out=buf_grad)

    def outputs() -> dict[str, np.ndarray]:
        bufs = {"floor:Wv": buf_h, "floor:WHu": buf_w, "floor:rescale": buf_mat, "floor:rank1_grad": buf_grad}
        return {k: b.cpu().numpy() for k, b in bufs.items()}

    return Floor(
        ops={"floor:Wv": wv, "floor:WHu": whu, "floor:rescale": rescale, "floor:rank1_grad": rank1_grad},
        w_mat=w.cpu().numpy(),
        u=u.cpu().numpy(),
        v=v.cpu().numpy(),
        grad=grad.cpu().numpy(),
        outputs=outputs,
    )


# -- the SNGAN CIFAR-10 discriminator (Miyato et al. 2018; mimicry SNGANDiscriminator32) ----


class _DBlockOptimized(nn.Module):
    """First block: conv-relu-conv-pool, shortcut pool-conv1x1."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.c_sc = nn.Conv2d(cin, cout, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.avg_pool2d(self.c2(F.relu(self.c1(x))), 2)
        return h + self.c_sc(F.avg_pool2d(x, 2))


class _DBlock(nn.Module):
    """Pre-activation residual block; a learnable 1x1 shortcut when downsampling."""

    def __init__(self, cin: int, cout: int, downsample: bool) -> None:
        super().__init__()
        self.downsample = downsample
        self.c1 = nn.Conv2d(cin, cin, 3, 1, 1)
        self.c2 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.c_sc = nn.Conv2d(cin, cout, 1, 1, 0) if (downsample or cin != cout) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c2(F.relu(self.c1(F.relu(x))))
        s = x if self.c_sc is None else self.c_sc(x)
        if self.downsample:
            h, s = F.avg_pool2d(h, 2), F.avg_pool2d(s, 2)
        return h + s


class _SNGANDiscriminator32(nn.Module):
    def __init__(self, ndf: int) -> None:
        super().__init__()
        self.block1 = _DBlockOptimized(3, ndf)
        self.block2 = _DBlock(ndf, ndf, downsample=True)
        self.block3 = _DBlock(ndf, ndf, downsample=False)
        self.block4 = _DBlock(ndf, ndf, downsample=False)
        self.l5 = nn.Linear(ndf, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block4(self.block3(self.block2(self.block1(x))))
        return self.l5(F.relu(h).sum(dim=(2, 3)))


def _sngan_discriminator(ndf: int, sn: Callable | None) -> nn.Module:
    return _with_sn(_SNGANDiscriminator32(ndf), sn)
