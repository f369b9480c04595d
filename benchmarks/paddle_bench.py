"""PaddlePaddle driver (CPU): builds the timed callables for every case, and measures peak memory.

Rows: ``plain``, ``builtin`` (``paddle.nn.utils.spectral_norm``, the forward-pre-hook),
``dualsn`` (``dualsn.paddle.spectral_norm``, default compat="torch") and ``dualsn[paddle]``
(compat="paddle", the preset with the built-in's own algorithm, for a like-for-like cost).
``paddle.nn.Linear`` stores its weight as [in, out]; its W-matrix is the transpose, so the
floor's W v and W^H u use matmul's transpose flags on the stored weight.

The floor's parts are timed in every correct form listed below, and the report keeps the
fastest form of each part measured in the same rounds. What the forms cost (1 thread, 2-core
development machine shared with other jobs, medians of 9 x 5+ calls), in ms:

===================================  =====  =========  ========  =========  ========
form                                 256^2  1024^2     2048^2    4096x1024  512x4608
===================================  =====  =========  ========  =========  ========
divide(W, sigma, out=buf)            0.08   1.1-1.2    4.2-6.8   4.3-4.5    2.5
multiply(W, 1/sigma, out=buf)        0.07   1.3        12        -          2.5
buf.copy_(W).scale_(1/sigma)         0.018  0.25       2.7-4.2   3.0-3.3    1.2
scale(W, 1/sigma) (fresh)            0.013  0.17-0.32  1.8 / 15  13-14      0.9
dot(W, G) (flattened)                -      1.1        4.7-8.9   -          4.3
inner(W, G)                          -      0.28       2.6       -          1.1
mm(W 1xN, G Nx1)                     -      0.21       4.1       -          0.8
buf.addmm_(u, v) (rank-1, in place)  -      0.10       1.6-2.6   -          0.25
===================================  =====  =========  ========  =========  ========

``divide``/``multiply`` with ``out=`` compute a fresh result and copy it into ``out``: 4-7x the
cost of one pass, which is why the floor no longer uses them (issue 14: they made dualsn look
faster than the floor). Paddle has no one-pass "scale into this buffer", so the rescale has two
candidates: two passes into a preallocated buffer (``copy_`` + in-place ``scale_``), and one pass
into a fresh tensor (``paddle.scale``), which wins when the allocator hands back the block the
previous call freed (2048^2: 1.8 ms, no page faults) and loses badly when it does not (15 ms,
4097 faults per call: every page of 16 MiB touched fresh); the fault counts are in the report.
``paddle.dot`` of two W-sized vectors is 3-5x slower than ``inner`` or a 1xN @ Nx1 ``mm``, so
those two are the rank-1 term's candidates for <G, W_sn>, each followed by one in-place
``addmm_`` on a copy of G (Paddle's ``addmm`` has no ``out=``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import warnings
from typing import Callable

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from benchmarks.cases import Case, Floor, SetupError, converged_uv
from benchmarks.timing import Variant

# Steps before the measured one: lazily made state (gradients, caches, buffers) exists by then.
MEMORY_WARM_STEPS = 2


def set_threads(threads: int) -> None:
    """Pin Paddle's CPU threads (OpenMP and MKL) for this process.

    ``paddle.base.core.set_num_threads`` exists in paddle 3.3.1 (there is no public
    ``paddle.set_num_threads``); checked to change the CPU time of a 2048^2 matmul from 1x
    to about 1.9x its wall time with 2 threads. Paddle's CPU default is 1 thread.
    """
    paddle.base.core.set_num_threads(int(threads))


def gpu_skip_reason() -> str:
    """Why this run has no Paddle GPU rows (the driver runs Paddle on CPU only)."""
    if not paddle.device.is_compiled_with_cuda():
        return "this paddle build has no CUDA"
    return "the Paddle driver times CPU only (no GPU path yet)"


class PaddleDriver:
    name = "paddle"

    def __init__(self, threads: int, device: str) -> None:
        if device != "cpu":
            raise SetupError("the Paddle rows run on CPU only (use --framework torch for cuda)")
        paddle.set_device("cpu")
        set_threads(threads)
        self.label = "paddle"
        self.threads = threads
        self.sn = self._sn_functions()

    def info(self) -> dict:
        return dict(
            version=paddle.__version__,
            device="cpu",
            threads=self.threads,
            threads_set_by="paddle.base.core.set_num_threads (+ OMP/MKL_NUM_THREADS at import)",
            sn_variants={k: _describe(f) for k, f in self.sn.items()},
            memory_method=self.memory_method(),
        )

    def sync(self) -> None:
        pass  # CPU kernels run synchronously

    @staticmethod
    def _sn_functions() -> dict[str, Callable]:
        sn = {"builtin": paddle.nn.utils.spectral_norm}
        try:
            import dualsn.paddle as dsn
        except ImportError as exc:  # the backend is written by another helper
            warnings.warn(f"dualsn.paddle unavailable, no dualsn rows: {exc}")
        else:
            sn["dualsn"] = dsn.spectral_norm
            sn["dualsn[paddle]"] = functools.partial(dsn.spectral_norm, compat="paddle")
        return sn

    def rows(self) -> list[tuple[str, Callable | None]]:
        return [("plain", None), *self.sn.items()]

    def _makers(self, case: Case):
        """(make(sn) -> a fresh model, the input, the one-layer case's base layer or None)."""
        paddle.seed(0)
        if case.kind == "sngan":
            base = None
            x = paddle.randn([case.params["batch"], 3, case.params["size"], case.params["size"]])

            def make(sn):
                paddle.seed(1)  # the same weights (and u, v draws) for every row
                return _with_sn(_SNGANDiscriminator32(case.params["ndf"]), sn)

        else:
            base = _layer(case)
            x = _input(case)

            def make(sn):
                paddle.seed(1)
                return _with_sn(copy.deepcopy(base), sn)

        return make, x, base

    def variants(self, case: Case, mode: str) -> tuple[list[Variant], tuple[str, ...]]:
        if case.kind == "register":
            return self._register(case), ()
        make, x, base = self._makers(case)
        out = []
        for row, sn in self.rows():
            model = make(sn)
            out.append(Variant(row, _train_step(model, x) if mode == "train" else _eval_forward(model, x)))
        floor: tuple[str, ...] = ()
        if base is not None:
            ops = floor_ops(base.weight.detach(), transposed=case.kind == "linear").for_mode(mode)
            floor = tuple(ops)
            out += [Variant(name, fn) for name, fn in ops.items()]
        return out, floor

    def _register(self, case: Case) -> list[Variant]:
        paddle.seed(0)
        n_in, n_out = case.params["in_features"], case.params["out_features"]
        weight = nn.Linear(n_in, n_out).weight.numpy()
        init = nn.initializer.Assign(weight)

        def fresh() -> nn.Layer:
            return nn.Linear(n_in, n_out, weight_attr=paddle.ParamAttr(initializer=init))

        return [Variant(row, sn, prepare=fresh) for row, sn in self.sn.items()]

    # -- memory ------------------------------------------------------------------------------

    @staticmethod
    def memory_method() -> str:
        return (
            "Paddle's host allocator statistics (paddle.base.core.host_memory_stat_*_value, "
            "'Allocated' and 'Reserved'): peak reset after "
            f"{MEMORY_WARM_STEPS} warm-up steps, minus the current value before the model was built"
        )

    def memory(self, case: Case) -> dict[str, dict] | None:
        """Per row: peak bytes of a steady-state training step, bytes kept after it, and the
        allocator's reserved peak (its buffer pool included); all from before the model is built."""
        if case.kind not in ("linear", "conv"):
            return None
        core = paddle.base.core
        if not hasattr(core, "host_memory_stat_reset_peak_value"):
            warnings.warn("paddle host memory statistics unavailable: no peak memory")
            return None
        make, x, _ = self._makers(case)
        out = {}
        with _gc_paused():
            for row, sn in self.rows():
                base = {k: core.host_memory_stat_current_value(k, 0) for k in ("Allocated", "Reserved")}
                step = _train_step(make(sn), x)
                for _ in range(MEMORY_WARM_STEPS):
                    step()
                for k in base:
                    core.host_memory_stat_reset_peak_value(k, 0)
                step()
                out[row] = dict(
                    peak_bytes=core.host_memory_stat_peak_value("Allocated", 0) - base["Allocated"],
                    kept_bytes=core.host_memory_stat_current_value("Allocated", 0) - base["Allocated"],
                    reserved_peak_bytes=core.host_memory_stat_peak_value("Reserved", 0) - base["Reserved"],
                )
                del step  # freed now unless in a cycle; then it stays, and counts in the next baseline
        return out


@contextlib.contextmanager
def _gc_paused():
    """No garbage-collector run inside a measurement (it could free an earlier model mid-step and
    lower the peak; one collection costs ~0.4 s with both frameworks loaded); one afterwards."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
        gc.collect()


def _describe(fn: Callable) -> str:
    if isinstance(fn, functools.partial):
        kw = ", ".join(f"{k}={v!r}" for k, v in fn.keywords.items())
        return f"{_describe(fn.func)}({kw})"
    return f"{fn.__module__}.{getattr(fn, '__qualname__', fn)}"


def _layer(case: Case) -> nn.Layer:
    p = case.params
    if case.kind == "linear":
        return nn.Linear(p["in_features"], p["out_features"])
    return nn.Conv2D(p["in_channels"], p["out_channels"], p["kernel"], padding=p["padding"])


def _input(case: Case) -> paddle.Tensor:
    p = case.params
    if case.kind == "linear":
        return paddle.randn([p["batch"], p["in_features"]])
    return paddle.randn([p["batch"], p["in_channels"], p["size"], p["size"]])


def _with_sn(layer: nn.Layer, sn: Callable | None) -> nn.Layer:
    """``layer`` with ``sn`` applied to every Conv2D and Linear in it (None: unchanged)."""
    if sn is not None:
        for m in list(layer.sublayers(include_self=True)):
            if isinstance(m, (nn.Conv2D, nn.Linear)):
                sn(m)
    return layer


def _train_step(model: nn.Layer, x: paddle.Tensor) -> Callable[[], None]:
    model.train()

    def step() -> None:
        model(x).mean().backward()
        model.clear_gradients(set_to_zero=False)

    return step


def _eval_forward(model: nn.Layer, x: paddle.Tensor) -> Callable[[], None]:
    model.eval()

    def forward() -> None:
        with paddle.no_grad():
            model(x)

    return forward


def floor_ops(weight: paddle.Tensor, transposed: bool) -> Floor:
    """The unavoidable per-step arithmetic on this weight's W-matrix, in each candidate form.

    ``transposed``: the stored weight is the W-matrix's transpose ([in, out], paddle Linear).
    Everything works on the stored layout, as a backend would.
    """
    stored = weight if transposed else weight.reshape([weight.shape[0], -1])
    w_np = stored.numpy()
    w_mat = w_np.T if transposed else w_np
    u_np, v_np = converged_uv(w_mat)
    u, v = paddle.to_tensor(u_np), paddle.to_tensor(v_np)
    # In the stored layout W v and W^H u swap their transpose flags, and u v^T is v u^T.
    if transposed:
        wv_args, whu_args = dict(transpose_x=True), dict(transpose_x=False)
        left, right = v.unsqueeze(1), u.unsqueeze(0)
    else:
        wv_args, whu_args = dict(transpose_x=False), dict(transpose_x=True)
        left, right = u.unsqueeze(1), v.unsqueeze(0)
    sigma = paddle.dot(u, paddle.matmul(stored, v, **wv_args))
    s = float(sigma)  # known from the forward pass
    inv = 1.0 / s
    w_sn = stored / sigma
    grad = paddle.to_tensor(np.random.default_rng(0).standard_normal(stored.shape).astype("float32"))
    w_sn_flat, grad_flat = w_sn.flatten(), grad.flatten()
    w_sn_row, grad_col = w_sn_flat.unsqueeze(0), grad_flat.unsqueeze(1)
    buf_h, buf_w = paddle.empty_like(u), paddle.empty_like(v)
    buf_mat = paddle.empty_like(stored)
    grad_bufs = {"inner": grad.clone(), "mm": grad.clone()}
    flips = {"inner": [False], "mm": [False]}
    latest: dict[str, paddle.Tensor] = {}

    def wv_out() -> None:
        paddle.matmul(stored, v, out=buf_h, **wv_args)

    def wv_fresh() -> None:
        latest["floor:Wv@matmul"] = paddle.matmul(stored, v, **wv_args)

    def whu_out() -> None:
        paddle.matmul(stored, u, out=buf_w, **whu_args)

    def whu_fresh() -> None:
        latest["floor:WHu@matmul"] = paddle.matmul(stored, u, **whu_args)

    def rescale_copy_scale() -> None:
        buf_mat.copy_(stored, False).scale_(inv)

    def rescale_fresh() -> None:
        # Replacing the previous result frees it first (the allocator may hand its block back).
        latest.pop("floor:rescale@scale", None)
        latest["floor:rescale@scale"] = paddle.scale(stored, inv)

    def rank1(kind: str) -> Callable[[], None]:
        buf, flip = grad_bufs[kind], flips[kind]

        def op() -> None:
            # dL/dW = G / sigma - (<G, W_sn> / sigma) u v^T: one dot, then one fused in-place
            # addmm_. Every second call applies the inverse update (beta sigma, alpha c), which
            # brings the buffer back to G: same work, bounded values.
            if kind == "inner":
                c = float(paddle.inner(w_sn_flat, grad_flat))
            else:
                c = float(paddle.mm(w_sn_row, grad_col).reshape([]))
            if flip[0]:
                buf.addmm_(left, right, beta=s, alpha=c)
            else:
                buf.addmm_(left, right, beta=inv, alpha=-c * inv)
            flip[0] = not flip[0]

        return op

    def as_matrix(t: paddle.Tensor) -> np.ndarray:
        return t.numpy().T if transposed else t.numpy()

    def outputs() -> dict[str, np.ndarray]:
        return {
            "floor:Wv@matmul_out": buf_h.numpy(),
            "floor:Wv@matmul": latest["floor:Wv@matmul"].numpy(),
            "floor:WHu@matmul_out": buf_w.numpy(),
            "floor:WHu@matmul": latest["floor:WHu@matmul"].numpy(),
            "floor:rescale@copy_scale": as_matrix(buf_mat),
            "floor:rescale@scale": as_matrix(latest["floor:rescale@scale"]),
            "floor:rank1_grad@inner_addmm_": as_matrix(grad_bufs["inner"]),
            "floor:rank1_grad@mm_addmm_": as_matrix(grad_bufs["mm"]),
        }

    return Floor(
        ops={
            "floor:Wv@matmul_out": wv_out,
            "floor:Wv@matmul": wv_fresh,
            "floor:WHu@matmul_out": whu_out,
            "floor:WHu@matmul": whu_fresh,
            "floor:rescale@copy_scale": rescale_copy_scale,
            "floor:rescale@scale": rescale_fresh,
            "floor:rank1_grad@inner_addmm_": rank1("inner"),
            "floor:rank1_grad@mm_addmm_": rank1("mm"),
        },
        w_mat=w_mat,
        u=u_np,
        v=v_np,
        grad=as_matrix(grad),
        outputs=outputs,
    )


# -- the SNGAN CIFAR-10 discriminator, same structure as torch_bench's ---------------------


class _DBlockOptimized(nn.Layer):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2D(cin, cout, 3, 1, 1)
        self.c2 = nn.Conv2D(cout, cout, 3, 1, 1)
        self.c_sc = nn.Conv2D(cin, cout, 1, 1, 0)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = F.avg_pool2d(self.c2(F.relu(self.c1(x))), 2)
        return h + self.c_sc(F.avg_pool2d(x, 2))


class _DBlock(nn.Layer):
    def __init__(self, cin: int, cout: int, downsample: bool) -> None:
        super().__init__()
        self.downsample = downsample
        self.c1 = nn.Conv2D(cin, cin, 3, 1, 1)
        self.c2 = nn.Conv2D(cin, cout, 3, 1, 1)
        self.c_sc = nn.Conv2D(cin, cout, 1, 1, 0) if (downsample or cin != cout) else None

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = self.c2(F.relu(self.c1(F.relu(x))))
        s = x if self.c_sc is None else self.c_sc(x)
        if self.downsample:
            h, s = F.avg_pool2d(h, 2), F.avg_pool2d(s, 2)
        return h + s


class _SNGANDiscriminator32(nn.Layer):
    def __init__(self, ndf: int) -> None:
        super().__init__()
        self.block1 = _DBlockOptimized(3, ndf)
        self.block2 = _DBlock(ndf, ndf, downsample=True)
        self.block3 = _DBlock(ndf, ndf, downsample=False)
        self.block4 = _DBlock(ndf, ndf, downsample=False)
        self.l5 = nn.Linear(ndf, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = self.block4(self.block3(self.block2(self.block1(x))))
        return self.l5(paddle.sum(F.relu(h), axis=[2, 3]))
