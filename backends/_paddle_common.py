"""What the Paddle drivers share: building the layers, the canonical-layout conversions, and
the primitives of a forward-pre-hook spectral norm (``<name>_orig``, ``<name>_u``,
``<name>_v`` and a hook with ``compute_weight(layer, do_power_iteration)``), which both the
Paddle built-in and ``dualsn.paddle`` use.

Layouts. Every Paddle layer here stores its weight as torch does except ``paddle.nn.Linear``
(``[in, out]``, the transpose) and ``paddle.nn.Bilinear``'s bias (``[1, out]``). Canonical
dims map to Paddle dims accordingly: for ``paddle.nn.Linear``, canonical 0 (out) is Paddle
axis 1 and canonical 1 (in) is Paddle axis 0; negative dims stay negative.

Imported only by Paddle drivers, and only once paddle is known to be importable.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import paddle

from backends.base import Config, Grads, Instance


@contextlib.contextmanager
def default_dtype(dtype: str):
    """Paddle layers (and the built-in's u, v) take their dtype from the global default."""
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    try:
        yield
    finally:
        paddle.set_default_dtype(previous)


class VectorLayer(paddle.nn.Layer):
    """A layer with a 1-D weight: out = x * weight + bias (elementwise over the last axis)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = self.create_parameter([n])
        self.bias = self.create_parameter([n], is_bias=True)

    def forward(self, x):
        return x * self.weight + self.bias


def transposes_weight(config: Config) -> bool:
    """True when the Paddle weight is the transpose of the canonical one (paddle.nn.Linear)."""
    return config.layer.kind == "linear"


def paddle_dim(config: Config, nonnegative: bool = False) -> int | None:
    """The Paddle ``dim`` equivalent to the canonical ``config.dim`` (None stays None)."""
    if config.dim is None:
        return None
    ndim = len(config.layer.weight_shape)
    d = config.canonical_dim
    if transposes_weight(config):
        d = ndim - 1 - d
    if config.dim < 0 and not nonnegative:
        d -= ndim
    return d


def weight_to_paddle(config: Config, w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T) if transposes_weight(config) else w


def weight_to_canonical(config: Config, w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T) if transposes_weight(config) else w


def make_layer(config: Config, params: dict[str, np.ndarray]) -> paddle.nn.Layer:
    """The Paddle layer for ``config.layer`` holding ``params`` (canonical), in train mode.
    Call inside :func:`default_dtype`."""
    layer = config.layer
    k, s = layer.kind, layer.sizes
    if k == "linear":
        module = paddle.nn.Linear(s[0], s[1])
    elif k == "linear_compat":
        module = paddle.compat.nn.Linear(s[0], s[1])
    elif layer.spatial:
        cls_name = f"Conv{layer.spatial}D" + ("Transpose" if layer.transposed else "")
        module = getattr(paddle.nn, cls_name)(s[0], s[1], s[2])
    elif k == "embedding":
        module = paddle.nn.Embedding(s[0], s[1])
    elif k == "bilinear":
        module = paddle.nn.Bilinear(s[0], s[1], s[2])
    else:
        module = VectorLayer(s[0])
    module.weight.set_value(weight_to_paddle(config, params["weight"]))
    if params.get("bias") is not None:
        module.bias.set_value(params["bias"].reshape(module.bias.shape))
    module.train()
    return module


def to_numpy(t) -> np.ndarray:
    return np.array(t.numpy(), copy=True)


class HookInstance(Instance):
    """A Paddle layer with a forward-pre-hook spectral norm on ``weight``.

    Subclasses give :meth:`_hook` (the hook object, None once removed), :meth:`sigma` and
    :meth:`remove`.
    """

    def __init__(self, layer: paddle.nn.Layer, config: Config) -> None:
        self.layer = layer
        self.config = config
        self.removed = False

    def _hook(self):
        raise NotImplementedError

    def _weight_param(self):
        return self.layer.weight if self.removed else self.layer.weight_orig

    def _uv_tensors(self):
        if self.removed or "weight_u" not in self.layer._buffers:
            return None
        return self.layer.weight_u, self.layer.weight_v

    # -- state ---------------------------------------------------------------------------
    def uv(self):
        uv = self._uv_tensors()
        return None if uv is None else (to_numpy(uv[0]), to_numpy(uv[1]))

    def normalized_weight(self):
        if self.removed:
            return self.original_weight()
        with paddle.no_grad():
            w = self._hook().compute_weight(self.layer, do_power_iteration=False)
        return weight_to_canonical(self.config, to_numpy(w))

    def original_weight(self):
        return weight_to_canonical(self.config, to_numpy(self._weight_param()))

    def bias(self):
        b = getattr(self.layer, "bias", None)
        return None if b is None else to_numpy(b).reshape(-1)

    def has_sn(self):
        return self._hook() is not None or "weight_orig" in self.layer._parameters

    # -- computation ---------------------------------------------------------------------
    def _set_mode(self, training: bool) -> None:
        if training:
            self.layer.train()
        else:
            self.layer.eval()

    @staticmethod
    def _tensors(inputs, requires_grad: bool):
        out = []
        for a in inputs:
            a = np.asarray(a)
            floating = a.dtype.kind == "f"
            out.append(paddle.to_tensor(a, stop_gradient=not (requires_grad and floating)))
        return out

    def forward(self, inputs, training):
        self._set_mode(training)
        with paddle.no_grad():
            return to_numpy(self.layer(*self._tensors(inputs, False)))

    def _trainables(self):
        return [p for p in (self._weight_param(), getattr(self.layer, "bias", None)) if p is not None]

    def backward(self, batches, training):
        self._set_mode(training)
        for p in self._trainables():
            p.clear_gradient(False)
        loss, outputs, inputs_used = 0, [], []
        for inputs, r, sign in batches:
            tensors = self._tensors(inputs, True)
            out = self.layer(*tensors)
            loss = loss + sign * (out * paddle.to_tensor(r)).sum()
            outputs.append(to_numpy(out))
            inputs_used.append(tensors)
        loss.backward()
        b = getattr(self.layer, "bias", None)
        return Grads(
            outputs=outputs,
            weight=weight_to_canonical(self.config, to_numpy(self._weight_param().grad)),
            bias=None if b is None else to_numpy(b.grad).reshape(-1),
            inputs=[[to_numpy(t.grad) for t in ts if not t.stop_gradient] for ts in inputs_used],
        )

    def sgd_step(self, lr):
        with paddle.no_grad():
            for p in self._trainables():
                p.set_value(p - lr * p.grad)
                p.clear_gradient(False)

    def save(self):
        # through paddle.save, as a real checkpoint would go
        buffer = io.BytesIO()
        paddle.save(self.layer.state_dict(), buffer)
        return buffer.getvalue()

    def load(self, saved):
        state = paddle.load(io.BytesIO(saved))
        missing, unexpected = self.layer.set_state_dict(state)
        if missing or unexpected:
            raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")


def sigma_from_state(weight, uv, dim: int, eps: float) -> np.ndarray:
    """sigma = u^T W v from a hook layer's state, computed in Paddle (paddle-layout weight and
    the hook's own non-negative dim)."""
    with paddle.no_grad():
        if uv is None:
            norm = paddle.linalg.norm(weight.flatten())
            return to_numpy(paddle.maximum(norm, paddle.full([], eps, dtype=norm.dtype)))
        u, v = uv
        perm = [dim] + [d for d in range(weight.ndim) if d != dim]
        w_mat = weight.transpose(perm).reshape([weight.shape[dim], -1])
        return to_numpy(paddle.dot(u, paddle.mv(w_mat, v)))
