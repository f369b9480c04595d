"""PyTorch driver: builds the timed callables for every case, and measures peak memory.

Rows: ``plain`` (no spectral norm), ``builtin`` (``torch.nn.utils.parametrizations.spectral_norm``,
the built-in that dualsn's default preset reproduces) and ``dualsn`` (``dualsn.torch.spectral_norm``,
compat="torch").

Floor rows time the unavoidable arithmetic of one training step on the same weight, each part
in every correct form listed below (the report keeps the fastest form of each part, measured in
the same rounds): one W v and one W^H u (``mv`` into a preallocated vector; W^H is a transposed
view, so BLAS gets a transpose flag instead of a copy), the rescale W / sigma, and the rank-1
gradient term (G - <G, W_sn> u v^T) / sigma (one dot product, then one pass over W).

What the forms cost (1 thread, 2-core development machine, medians of 9 x 5+ calls, the machine
shared with other jobs, so +-20 %), in ms:

============================  =====  =========  =======  ========
form                          256^2  1024^2     2048^2   512x4608
============================  =====  =========  =======  ========
div(W, sigma, out=buf)        0.012  0.16       1.6-1.9  0.79
mul(W, 1/sigma, out=buf)      0.014  0.16       1.8-2.0  0.85
W / sigma (fresh)             0.012  0.18-0.24  1.7-2.2  1.0
dot + addr(G, u, v, out=buf)  -      0.17-0.21  2.3-5.0  2.7
dot + buf.addr_(u, v)         -      0.12       1.1-2.2  0.4-0.5
============================  =====  =========  =======  ========

(``dot`` of two W-sized vectors: 0.15-0.18 ms at 1024^2, 3.6-4.8 at 2048^2; ``vdot`` the same
within noise, a 1xN @ Nx1 ``mm`` 3-20x slower.) The two rescale forms are within noise of each
other and both stay candidates; the fresh ``W / sigma`` is left out: it is the same pass plus
an allocation, which can only add (how much depends on whether the allocator recycles the block). The in-place rank-1 update is up to
2x faster than ``addr(out=)`` (one buffer read and written instead of G read and another
written); it runs on a copy of G, keeps <G, W_sn> on the device (no host sync on a GPU; the
``addr(out=)`` form reads it back with ``.item()``, as a backend keeping scalars on the host
would), and alternates with its inverse update so that values stay bounded over thousands of
calls (same work each call).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import warnings
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.cases import Case, Floor, SetupError, converged_uv
from benchmarks.timing import Variant

# Steps before the measured one: lazily made state (gradients, caches, buffers) exists by then.
MEMORY_WARM_STEPS = 2
_STEP_LABEL = "benchmarks:measured_step"


class TorchDriver:
    name = "torch"

    def __init__(self, threads: int, device: str) -> None:
        if device == "cuda" and not torch.cuda.is_available():
            raise SetupError("--device cuda was asked for, but torch.cuda.is_available() is False")
        torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.label = "torch" if device == "cpu" else f"torch/{device}"
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
            memory_method=self.memory_method(),
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

    def _makers(self, case: Case) -> tuple[Callable[[Callable | None], nn.Module], torch.Tensor, nn.Module | None]:
        """(make(sn) -> a fresh model on the device, the input, the one-layer case's base layer)."""
        torch.manual_seed(0)
        if case.kind == "sngan":
            base = None
            x = torch.randn(case.params["batch"], 3, case.params["size"], case.params["size"])

            def make(sn):
                torch.manual_seed(1)  # the same weights (and u, v draws) for every row
                # On the device before the spectral norm: its state is made where it is used.
                return _with_sn(_SNGANDiscriminator32(case.params["ndf"]).to(self.device), sn)

        else:
            base = _layer(case)
            x = _input(case)

            def make(sn):
                torch.manual_seed(1)
                return _with_sn(copy.deepcopy(base).to(self.device), sn)

        return make, x.to(self.device), base

    def rows(self) -> list[tuple[str, Callable | None]]:
        return [("plain", None), *self.sn.items()]

    def variants(self, case: Case, mode: str) -> tuple[list[Variant], tuple[str, ...]]:
        """The timed callables for ``case`` in ``mode`` and the names of its floor candidates."""
        if case.kind == "register":
            return self._register(case), ()
        make, x, base = self._makers(case)
        out = []
        for row, sn in self.rows():
            model = make(sn)
            out.append(Variant(row, _train_step(model, x) if mode == "train" else _eval_forward(model, x)))
        floor: tuple[str, ...] = ()
        if base is not None:
            ops = floor_ops(base.weight.detach().to(self.device)).for_mode(mode)
            floor = tuple(ops)
            out += [Variant(name, fn) for name, fn in ops.items()]
        return out, floor

    def _register(self, case: Case) -> list[Variant]:
        torch.manual_seed(0)
        n_in, n_out = case.params["in_features"], case.params["out_features"]
        weight = nn.Linear(n_in, n_out).weight.detach().to(self.device)

        def fresh() -> nn.Module:
            layer = nn.utils.skip_init(nn.Linear, n_in, n_out, device=self.device)
            with torch.no_grad():
                layer.weight.copy_(weight)
            return layer

        return [Variant(row, sn, prepare=fresh) for row, sn in self.sn.items()]

    # -- memory ------------------------------------------------------------------------------

    def memory_method(self) -> str:
        if self.device.type == "cuda":
            return (
                "torch.cuda.max_memory_allocated over the measured step (peak stats reset after "
                f"{MEMORY_WARM_STEPS} warm-up steps), minus memory_allocated before the model was built"
            )
        return (
            "torch.profiler(profile_memory=True): every CPU-allocator allocation and free from before "
            f"the model is built through {MEMORY_WARM_STEPS} warm-up steps and the measured step; "
            "peak = most bytes live during the measured step, of those allocated since the start"
        )

    def memory(self, case: Case) -> dict[str, dict] | None:
        """Per row: peak bytes of a steady-state training step and bytes kept after it.

        Both count from before the model is built (so W, the gradients and any state a spectral
        norm keeps are in), not what existed before (the input, other models). None for cases
        without a single layer, or where the allocator cannot be observed.
        """
        if case.kind not in ("linear", "conv"):
            return None
        make, x, _ = self._makers(case)
        out = {}
        with _gc_paused():
            for row, sn in self.rows():
                def build(sn=sn):
                    return _train_step(make(sn), x)

                try:
                    out[row] = _cuda_memory(build, self.device) if self.device.type == "cuda" else _cpu_memory(build)
                except Exception as exc:  # private profiler API: report, don't fail the run
                    warnings.warn(f"torch peak memory unavailable ({type(exc).__name__}: {exc})")
                    return None
        return out


@contextlib.contextmanager
def _gc_paused():
    """No garbage-collector run inside a measurement (it would free older memory mid-step, and
    one collection costs ~0.4 s with both frameworks loaded); one collection afterwards."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
        gc.collect()


def _cuda_memory(build: Callable[[], Callable[[], None]], device: torch.device) -> dict:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    base_reserved = torch.cuda.memory_reserved(device)
    step = build()
    for _ in range(MEMORY_WARM_STEPS):
        step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    res = dict(
        peak_bytes=torch.cuda.max_memory_allocated(device) - base,
        kept_bytes=torch.cuda.memory_allocated(device) - base,
        reserved_peak_bytes=torch.cuda.max_memory_reserved(device) - base_reserved,
    )
    del step
    return res


def _cpu_memory(build: Callable[[], Callable[[], None]]) -> dict:
    """Replay the CPU allocator's events recorded by the profiler (torch has no CPU peak counter).

    Only allocations made inside the profiled region count (a free of older memory is
    ignored), so the numbers are relative to just before ``build()``.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step = build()
        for _ in range(MEMORY_WARM_STEPS):
            step()
        with record_function(_STEP_LABEL):
            step()
        del step
    allocs, window = [], []

    def walk(events) -> None:
        for e in events:
            if e.tag == _EventType.Allocation:
                allocs.append(e)
            elif e.name == _STEP_LABEL:
                window.append((e.start_time_ns, e.end_time_ns))
            walk(e.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    if len(window) != 1:
        raise RuntimeError(f"expected one {_STEP_LABEL!r} event, found {len(window)}")
    (t0, t1), = window
    allocs.sort(key=lambda e: e.start_time_ns)
    live, sizes, peak, kept = 0, {}, None, None
    for e in allocs:
        t, f = e.start_time_ns, e.extra_fields
        if t > t1:
            break
        if t >= t0 and peak is None:
            peak = live
        if f.alloc_size > 0:
            sizes[f.ptr] = f.alloc_size
            live += f.alloc_size
        elif f.ptr in sizes:
            live -= sizes.pop(f.ptr)
        if t >= t0:
            peak = max(peak, live)
    if peak is None:  # nothing allocated or freed during the step
        peak = live
    kept = live
    return dict(peak_bytes=peak, kept_bytes=kept, reserved_peak_bytes=None)


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
    """The unavoidable per-step arithmetic on this weight's W-matrix (dim 0), in each candidate form."""
    w = weight.reshape(weight.shape[0], -1)  # a view: conv weights are contiguous
    u, v = (torch.from_numpy(x).to(w.device) for x in converged_uv(w.cpu().numpy()))
    sigma = torch.dot(u, w @ v)
    w_sn = w / sigma
    grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(0)).to(w.device)
    inv = 1.0 / sigma.item()  # known from the forward pass
    s = sigma.item()
    buf_h, buf_w = torch.empty_like(u), torch.empty_like(v)
    buf_div, buf_mul, buf_addr = torch.empty_like(w), torch.empty_like(w), torch.empty_like(w)
    buf_inplace = grad.clone()
    w_sn_flat, grad_flat = w_sn.reshape(-1), grad.reshape(-1)
    flip = [False]

    def wv() -> None:
        torch.mv(w, v, out=buf_h)

    def whu() -> None:
        torch.mv(w.mH, u, out=buf_w)

    def rescale_div() -> None:
        torch.div(w, sigma, out=buf_div)

    def rescale_mul() -> None:
        torch.mul(w, inv, out=buf_mul)

    def rank1_addr() -> None:
        # dL/dW = G / sigma - (<G, W_sn> / sigma) u v^T: one dot, then one fused pass.
        c = torch.dot(w_sn_flat, grad_flat).item()
        torch.addr(grad, u, v, beta=inv, alpha=-c * inv, out=buf_addr)

    def rank1_inplace() -> None:
        # The same in place on a copy of G, with <G, W_sn> left on the device (no host sync on a
        # GPU; on the CPU it costs one extra pass over u). Every second call applies the inverse
        # update (beta sigma, alpha c), which brings the buffer back to G: same work, bounded values.
        c = torch.dot(w_sn_flat, grad_flat)
        if flip[0]:
            buf_inplace.addr_(u * c, v, beta=s)
        else:
            buf_inplace.addr_(u * (c * -inv), v, beta=inv)
        flip[0] = not flip[0]

    bufs = {
        "floor:Wv@mv_out": buf_h,
        "floor:WHu@mv_out": buf_w,
        "floor:rescale@div_out": buf_div,
        "floor:rescale@mul_out": buf_mul,
        "floor:rank1_grad@addr_out": buf_addr,
        "floor:rank1_grad@addr_inplace": buf_inplace,
    }

    def outputs() -> dict[str, np.ndarray]:
        return {k: b.cpu().numpy() for k, b in bufs.items()}

    return Floor(
        ops={
            "floor:Wv@mv_out": wv,
            "floor:WHu@mv_out": whu,
            "floor:rescale@div_out": rescale_div,
            "floor:rescale@mul_out": rescale_mul,
            "floor:rank1_grad@addr_out": rank1_addr,
            "floor:rank1_grad@addr_inplace": rank1_inplace,
        },
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
