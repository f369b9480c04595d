"""PaddlePaddle driver (CPU): builds the timed callables for every case.

Rows: ``plain``, ``builtin`` (``paddle.nn.utils.spectral_norm``, the forward-pre-hook),
``dualsn`` (``dualsn.paddle.spectral_norm``, default compat="torch") and ``dualsn[paddle]``
(compat="paddle", the preset with the built-in's own algorithm, for a like-for-like cost).
``paddle.nn.Linear`` stores its weight as [in, out]; its W-matrix is the transpose, so the
floor's W v and W^H u use matmul's transpose flags on the stored weight. Floor outputs go to
preallocated buffers (``out=`` or an in-place op), as in the torch driver.
"""

from __future__ import annotations

import copy
import functools
import warnings
from typing import Callable

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from benchmarks.cases import Case, Floor, SetupError, converged_uv
from benchmarks.timing import Variant

FLOOR_TRAIN = ("floor:Wv", "floor:WHu", "floor:rescale", "floor:rank1_grad")
FLOOR_EVAL = ("floor:Wv", "floor:rescale")


def set_threads(threads: int) -> None:
    """Pin Paddle's CPU threads (OpenMP and MKL) for this process.

    ``paddle.base.core.set_num_threads`` exists in paddle 3.3.1 (there is no public
    ``paddle.set_num_threads``); checked to change the CPU time of a 2048^2 matmul from 1x
    to about 1.9x its wall time with 2 threads. Paddle's CPU default is 1 thread.
    """
    paddle.base.core.set_num_threads(int(threads))


class PaddleDriver:
    name = "paddle"

    def __init__(self, threads: int, device: str) -> None:
        if device != "cpu":
            raise SetupError("the Paddle rows run on CPU only (use --framework torch for cuda)")
        paddle.set_device("cpu")
        set_threads(threads)
        self.threads = threads
        self.sn = self._sn_functions()

    def info(self) -> dict:
        return dict(
            version=paddle.__version__,
            device="cpu",
            threads=self.threads,
            threads_set_by="paddle.base.core.set_num_threads (+ OMP/MKL_NUM_THREADS at import)",
            sn_variants={k: _describe(f) for k, f in self.sn.items()},
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

    def variants(self, case: Case, mode: str) -> tuple[list[Variant], tuple[str, ...]]:
        paddle.seed(0)
        if case.kind == "register":
            return self._register(case), ()
        if case.kind == "sngan":
            make = lambda sn: _with_sn(_SNGANDiscriminator32(case.params["ndf"]), sn)  # noqa: E731
            base = None
            x = paddle.randn([case.params["batch"], 3, case.params["size"], case.params["size"]])
        else:
            base = _layer(case)
            make = lambda sn: _with_sn(copy.deepcopy(base), sn)  # noqa: E731
            x = _input(case)
        out = []
        for row, sn in [("plain", None), *self.sn.items()]:
            paddle.seed(1)  # the same weights (and u, v draws) for every row
            model = make(sn)
            out.append(Variant(row, _train_step(model, x) if mode == "train" else _eval_forward(model, x)))
        floor: tuple[str, ...] = ()
        if base is not None:
            floor = FLOOR_TRAIN if mode == "train" else FLOOR_EVAL
            ops = floor_ops(base.weight.detach(), transposed=case.kind == "linear").ops
            out += [Variant(name, ops[name]) for name in floor]
        return out, floor

    def _register(self, case: Case) -> list[Variant]:
        n_in, n_out = case.params["in_features"], case.params["out_features"]
        weight = nn.Linear(n_in, n_out).weight.numpy()
        init = nn.initializer.Assign(weight)

        def fresh() -> nn.Layer:
            return nn.Linear(n_in, n_out, weight_attr=paddle.ParamAttr(initializer=init))

        return [Variant(row, sn, prepare=fresh) for row, sn in self.sn.items()]


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
    """The unavoidable per-step arithmetic on this weight's W-matrix.

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
    buf_h, buf_w = paddle.empty_like(u), paddle.empty_like(v)
    sigma = paddle.dot(u, paddle.matmul(stored, v, **wv_args))
    w_sn = stored / sigma
    grad = paddle.to_tensor(np.random.default_rng(0).standard_normal(stored.shape).astype("float32"))
    s = float(sigma)  # known from the forward pass
    buf_mat = paddle.empty_like(stored)
    grad_buf = grad.clone()
    flip = [False]

    def wv() -> None:
        paddle.matmul(stored, v, out=buf_h, **wv_args)

    def whu() -> None:
        paddle.matmul(stored, u, out=buf_w, **whu_args)

    def rescale() -> None:
        # Into a preallocated buffer, as torch's floor does (a fresh 4M-element result costs
        # Paddle's CPU allocator more than the division itself).
        paddle.divide(stored, sigma, out=buf_mat)

    def rank1_grad() -> None:
        # dL/dW = G / sigma - (<G, W_sn> / sigma) u v^T: one dot, then one fused in-place
        # addmm_ (Paddle's addmm has no out=). Every second call applies the inverse update
        # (beta sigma, alpha c), which brings the buffer back to G: same work, bounded values.
        c = float(paddle.dot(w_sn.flatten(), grad.flatten()))
        if flip[0]:
            grad_buf.addmm_(left, right, beta=s, alpha=c)
        else:
            grad_buf.addmm_(left, right, beta=1.0 / s, alpha=-c / s)
        flip[0] = not flip[0]

    def as_matrix(t: paddle.Tensor) -> np.ndarray:
        return t.numpy().T if transposed else t.numpy()

    def outputs() -> dict[str, np.ndarray]:
        return {
            "floor:Wv": buf_h.numpy(),
            "floor:WHu": buf_w.numpy(),
            "floor:rescale": as_matrix(buf_mat),
            "floor:rank1_grad": as_matrix(grad_buf),
        }

    return Floor(
        ops={"floor:Wv": wv, "floor:WHu": whu, "floor:rescale": rescale, "floor:rank1_grad": rank1_grad},
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
