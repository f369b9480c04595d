"""The Paddle side of the differential harness (``conformance.differential``): builds a
``conformance.diff_models.ModelSpec`` as a Paddle model with dualsn.paddle spectral norms,
and offers the handful of operations the training patterns (``conformance.diff_patterns``)
need.

Everything crossing into the harness is numpy in canonical (torch) layouts: the weight of a
``paddle.nn.Linear`` is stored [in, out] and is transposed on the way in and out (as
``backends/_paddle_common.py`` does), and a canonical ``dim`` of a Linear maps to the Paddle
axis that names the same W-matrix. Parameter names are Paddle's own minus the hook's suffix
("conv1.weight_orig" -> "conv1.weight").

Imported only once paddle is known to be importable.
"""

from __future__ import annotations

import contextlib

import numpy as np
import paddle
import paddle.nn.functional as F

import dualsn.paddle as dsn
from backends._paddle_common import VectorLayer, default_dtype
from conformance.diff_models import FORWARDS, Layer, ModelSpec

__all__ = ["FRAMEWORK"]

PATH_OF_GRAD_NODE = {"ScaleGradNode": "fast", "DivideGradNode": "plain"}
"""The grad node of a normalized weight says which path made it: the fast path multiplies
by the host-side 1 / sigma (``paddle.scale``), the plain path divides by a sigma tensor."""


class _Ops:
    """What the shared forwards (``diff_models.FORWARDS``) need besides the layers."""

    _ACTIVATIONS = {
        "leaky_relu": lambda h: F.leaky_relu(h, 0.2),
        "silu": F.silu,
        "softplus": F.softplus,
        "tanh": paddle.tanh,
    }

    def __init__(self, activation: str) -> None:
        self.act = self._ACTIVATIONS[activation]

    @staticmethod
    def sum(h, axes, keepdim=False):
        return h.sum(axis=list(axes), keepdim=keepdim)

    @staticmethod
    def reshape(h, shape):
        return h.reshape(list(shape))

    @staticmethod
    def flatten(h):
        # reshape, not flatten: Paddle 3.3's flatten has no double backward (the gradient
        # penalty's create_graph backward fails with "flatten_grad doesn't have any grad op")
        return h.reshape([h.shape[0], -1])


def _make_layer(layer: Layer) -> paddle.nn.Layer:
    k, s = layer.kind, layer.sizes
    if k == "linear":
        return paddle.nn.Linear(s[0], s[1])
    if k in ("conv1d", "conv2d"):
        cls = paddle.nn.Conv1D if k == "conv1d" else paddle.nn.Conv2D
        return cls(s[0], s[1], s[2], stride=layer.stride, padding=layer.padding)
    if k == "convtranspose2d":
        return paddle.nn.Conv2DTranspose(s[0], s[1], s[2], stride=layer.stride, padding=layer.padding)
    if k == "embedding":
        return paddle.nn.Embedding(s[0], s[1])
    if k == "batchnorm2d":
        # batch statistics in eval mode too, as on the torch side (the running variances
        # differ by design: torch's is unbiased, Paddle's biased)
        return paddle.nn.BatchNorm2D(s[0], use_global_stats=False)
    return VectorLayer(s[0])


def _transposed(layer: Layer) -> bool:
    """paddle.nn.Linear stores its weight [in, out]: the transpose of the canonical one."""
    return layer.kind == "linear"


def _paddle_dim(layer: Layer) -> int | None:
    """The Paddle ``dim`` naming the same W-matrix as the canonical ``layer.dim``: for a
    Linear the other axis (negative stays negative)."""
    if layer.dim is None or not _transposed(layer):
        return layer.dim
    axis = 1 - layer.dim % 2
    return axis - 2 if layer.dim < 0 else axis


class Model(paddle.nn.Layer):
    """The spec's layers as attributes, run by the spec's shared forward."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.ops = _Ops(spec.activation)
        for layer in spec.layers:
            self.add_sublayer(layer.name, _make_layer(layer))

    def forward(self, *inputs):
        layers = {layer.name: getattr(self, layer.name) for layer in self.spec.layers}
        return FORWARDS[self.spec.arch](self.spec, layers, self.ops, *inputs)


class _Optimizer:
    def __init__(self, inner) -> None:
        self.inner = inner

    def step(self) -> None:
        self.inner.step()

    def zero_grad(self) -> None:
        self.inner.clear_grad(set_to_zero=False)  # None, as torch's set_to_none


def _layer_of(model: Model, name: str) -> Layer:
    return next(layer for layer in model.spec.layers if layer.name == name)


class PaddleFramework:
    """The operations of ``conformance.diff_patterns`` in Paddle."""

    name = "paddle"

    # -- models ---------------------------------------------------------------------------
    def build(self, spec: ModelSpec, params: dict[str, np.ndarray], dtype: str) -> Model:
        """The model holding the canonical ``params``, spectral norm applied (seeded), in
        training mode, with the path probes of :meth:`paths_taken` attached."""
        with default_dtype(dtype):  # Paddle layers take their dtype from the global default
            model = Model(spec)
            for name, value in params.items():
                layer_name, param = name.rsplit(".", 1)
                self._set(model, layer_name, param, value, dtype)
            model.path_log = {}
            for layer in spec.sn_layers:
                sub = getattr(model, layer.name)
                if layer.operator_input:
                    dsn.spectral_norm_conv(sub, list(layer.operator_input), seed=layer.seed)
                else:
                    dsn.spectral_norm(sub, dim=_paddle_dim(layer), compat=spec.preset, seed=layer.seed)
                # the operator norm divides by an autograd sigma on both paths: the switch tells
                by_switch = layer.operator_input is not None
                sub.register_forward_post_hook(_path_probe(model.path_log, layer.name, by_switch))
        model.train()
        return model

    @staticmethod
    def _set(model: Model, layer_name: str, param: str, value: np.ndarray, dtype: str) -> None:
        if param == "weight" and _transposed(_layer_of(model, layer_name)):
            value = value.T
        target = getattr(getattr(model, layer_name), param)
        target.set_value(np.ascontiguousarray(value, dtype=dtype).reshape(target.shape))

    @staticmethod
    def one_thread():
        """Nothing to set: Paddle has no per-call intra-op thread setting, and runs of these
        models gave the same bits in separate processes and kept their speed under load."""
        return contextlib.nullcontext()

    @staticmethod
    def plain_path(enabled: bool = True):
        """dualsn's switch: every spectral-norm forward on the plain path (or, False, not)."""
        return dsn.plain_path(enabled)

    @staticmethod
    def paths_taken(model: Model) -> dict[str, set[str]]:
        """Per spectral-norm layer, the paths ("fast", "plain") its graph-recording forwards
        took (see :data:`PATH_OF_GRAD_NODE`)."""
        return model.path_log

    # -- tensors --------------------------------------------------------------------------
    @staticmethod
    def tensor(array: np.ndarray, dtype: str, requires_grad: bool = False):
        if array.dtype.kind in "iu":
            return paddle.to_tensor(array.astype(np.int64))
        return paddle.to_tensor(array.astype(dtype), stop_gradient=not requires_grad)

    @staticmethod
    def numpy(t) -> np.ndarray:
        return np.array(t.numpy(), dtype=np.float64)

    @staticmethod
    def no_grad():
        return paddle.no_grad()

    @staticmethod
    def backward(loss, retain_graph: bool = False) -> None:
        loss.backward(retain_graph=retain_graph)

    @staticmethod
    def grad(output, inputs):
        """d output / d inputs as a differentiable tensor (create_graph=True)."""
        return paddle.grad([output], [inputs], create_graph=True)[0]

    def input_grad(self, t) -> np.ndarray:
        return np.zeros(tuple(t.shape)) if t.grad is None else self.numpy(t.grad)

    # -- training -------------------------------------------------------------------------
    @staticmethod
    def train(model: Model, mode: bool) -> None:
        model.train() if mode else model.eval()
        # Paddle 3.3's BatchNorm2D(use_global_stats=False) in eval mode normalizes with the
        # batch statistics but back-propagates as if they were constants (measured: input
        # gradient off by 0.68 on a 4x3x2x2 batch). Not spectral norm's business: BatchNorm
        # stays in training mode, the same forward with the full gradient, which is what
        # torch's BatchNorm2d(track_running_stats=False) computes in eval mode.
        for sub in model.sublayers():
            if isinstance(sub, paddle.nn.BatchNorm2D):
                sub.train()

    @staticmethod
    def _trainable(model: Model) -> list:
        return [p for p in model.parameters() if not p.stop_gradient]  # not BatchNorm's statistics

    def optimizer(self, model: Model, kind: str, lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> _Optimizer:
        params = self._trainable(model)
        if kind == "sgd":
            return _Optimizer(paddle.optimizer.SGD(learning_rate=lr, parameters=params))
        return _Optimizer(
            paddle.optimizer.Adam(learning_rate=lr, beta1=betas[0], beta2=betas[1], epsilon=eps, parameters=params)
        )

    # -- state ----------------------------------------------------------------------------
    def grads(self, model: Model) -> dict[str, np.ndarray]:
        """Every trainable parameter's gradient (zeros where there is none), canonical names
        and layouts."""
        out = {}
        for name, p in model.named_parameters():
            if p.stop_gradient:
                continue
            layer_name, param = name.rsplit(".", 1)
            param = param.removesuffix("_orig")
            grad = np.zeros(tuple(p.shape)) if p.grad is None else self.numpy(p.grad)
            if param == "weight" and _transposed(_layer_of(model, layer_name)):
                grad = grad.T
            out[f"{layer_name}.{param}"] = grad
        return out

    def sn_state(self, model: Model) -> dict[str, np.ndarray]:
        """u, v (where the preset keeps them) and sigma of every spectral norm."""
        out = {}
        for layer in model.spec.sn_layers:
            sub = getattr(model, layer.name)
            if "weight_u" in sub._buffers:
                out[f"u/{layer.name}"] = self.numpy(sub.weight_u)
                out[f"v/{layer.name}"] = self.numpy(sub.weight_v)
            out[f"sigma/{layer.name}"] = np.array(dsn.sigma(sub))
        return out

    @staticmethod
    def normalized_weight(model: Model, layer_name: str):
        """``layer.weight`` as a user would keep it: the normalized weight the hook wrote for
        the last forward."""
        return getattr(model, layer_name).weight

    def canonical_weight(self, model: Model, layer_name: str, weight) -> np.ndarray:
        """A weight of layer ``layer_name`` as a numpy array in the canonical layout."""
        value = self.numpy(weight)
        return value.T if _transposed(_layer_of(model, layer_name)) else value


def _path_probe(log: dict, name: str, by_switch: bool = False):
    """A forward post-hook logging which path made the normalized weight of this forward
    (``by_switch``: read off the plain switch, where both paths make the same grad node)."""

    def probe(layer, inputs, output):
        node = layer.weight.grad_fn
        if node is None:  # no graph recorded (no_grad): nothing to tell apart
            return
        if by_switch:
            path = "plain" if dsn._plain.enabled() else "fast"
        else:
            path = PATH_OF_GRAD_NODE.get(node.name(), f"unknown ({node.name()})")
        log.setdefault(name, set()).add(path)

    return probe


FRAMEWORK = PaddleFramework()
