"""The torch side of the differential harness (``conformance.differential``): builds a
``conformance.diff_models.ModelSpec`` as a torch model with dualsn.torch spectral norms, and
offers the handful of operations the training patterns (``conformance.diff_patterns``) need.

Everything crossing into the harness is numpy in canonical (torch) layouts, so this side is
a thin mapping; parameter names are torch's own minus the parametrization
("conv1.parametrizations.weight.original" -> "conv1.weight").

Imported only once torch is known to be importable.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import dualsn.torch as dsn
from backends._torch_common import VectorLayer
from conformance.diff_models import FORWARDS, Layer, ModelSpec

__all__ = ["FRAMEWORK"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
FAST_GRAD_FN = "_DivideBySigmaBackward"
"""The grad_fn of a normalized weight on the fast path: the fused autograd Function."""


class _Ops:
    """What the shared forwards (``diff_models.FORWARDS``) need besides the layers."""

    _ACTIVATIONS = {
        "leaky_relu": lambda h: F.leaky_relu(h, 0.2),
        "silu": F.silu,
        "softplus": F.softplus,
        "tanh": torch.tanh,
    }

    def __init__(self, activation: str) -> None:
        self.act = self._ACTIVATIONS[activation]

    @staticmethod
    def sum(h, axes, keepdim=False):
        return h.sum(dim=tuple(axes), keepdim=keepdim)

    @staticmethod
    def reshape(h, shape):
        return h.reshape(tuple(shape))

    @staticmethod
    def flatten(h):
        return h.flatten(1)


def _make_layer(layer: Layer) -> nn.Module:
    k, s = layer.kind, layer.sizes
    if k == "linear":
        return nn.Linear(s[0], s[1])
    if k in ("conv1d", "conv2d"):
        cls = nn.Conv1d if k == "conv1d" else nn.Conv2d
        return cls(s[0], s[1], s[2], stride=layer.stride, padding=layer.padding)
    if k == "convtranspose2d":
        return nn.ConvTranspose2d(s[0], s[1], s[2], stride=layer.stride, padding=layer.padding)
    if k == "embedding":
        return nn.Embedding(s[0], s[1])
    if k == "batchnorm2d":
        # batch statistics in eval mode too: the frameworks' running variances differ by
        # design (torch: unbiased, Paddle: biased), which has nothing to do with spectral norm
        return nn.BatchNorm2d(s[0], track_running_stats=False)
    return VectorLayer(s[0])


class Model(nn.Module):
    """The spec's layers as attributes, run by the spec's shared forward."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.ops = _Ops(spec.activation)
        for layer in spec.layers:
            self.add_module(layer.name, _make_layer(layer))

    def forward(self, *inputs):
        layers = {layer.name: getattr(self, layer.name) for layer in self.spec.layers}
        return FORWARDS[self.spec.arch](self.spec, layers, self.ops, *inputs)


class _Optimizer:
    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.inner = inner

    def step(self) -> None:
        self.inner.step()

    def zero_grad(self) -> None:
        self.inner.zero_grad(set_to_none=True)


def _canonical_name(name: str) -> str:
    return name.replace(".parametrizations.weight.original", ".weight")


class TorchFramework:
    """The operations of ``conformance.diff_patterns`` in torch."""

    name = "torch"

    # -- models ---------------------------------------------------------------------------
    def build(self, spec: ModelSpec, params: dict[str, np.ndarray], dtype: str) -> Model:
        """The model holding the canonical ``params``, spectral norm applied (seeded), in
        training mode, with the path probes of :meth:`paths_taken` attached."""
        model = Model(spec).to(DTYPES[dtype])
        with torch.no_grad():
            for name, value in params.items():
                model.get_parameter(name).copy_(torch.from_numpy(value))
        model.path_log = {}
        for layer in spec.sn_layers:
            module = getattr(model, layer.name)
            if layer.operator_input:
                dsn.spectral_norm_conv(module, layer.operator_input, seed=layer.seed)
            else:
                dsn.spectral_norm(module, dim=layer.dim, compat=spec.preset, seed=layer.seed)
            # no fused Function on either path: an exact 1-D norm, and the operator norm
            # (sigma is autograd's conv of u, v on both paths)
            by_switch = layer.operator_input is not None or dsn.get_spectral_norm(module)._u is None
            module.parametrizations.weight[0].register_forward_hook(_path_probe(model.path_log, layer.name, by_switch))
        return model.train()

    @staticmethod
    @contextlib.contextmanager
    def one_thread():
        """Run with one intra-op thread, restored afterwards: these tiny models gain nothing
        from threads (on a busy 2-core machine they ran 10-100x slower with them), and the
        order of float32 reductions no longer depends on the machine's core count."""
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    @staticmethod
    def plain_path(enabled: bool = True):
        """dualsn's switch: every spectral-norm forward on the plain path (or, False, not)."""
        return dsn.plain_path(enabled)

    @staticmethod
    def paths_taken(model: Model) -> dict[str, set[str]]:
        """Per spectral-norm layer, the paths ("fast", "plain") its graph-recording forwards
        took: the fast path's normalized weight comes out of the fused ``_DivideBySigma``."""
        return model.path_log

    # -- tensors --------------------------------------------------------------------------
    @staticmethod
    def tensor(array: np.ndarray, dtype: str, requires_grad: bool = False) -> torch.Tensor:
        if array.dtype.kind in "iu":
            return torch.from_numpy(array.astype(np.int64))
        return torch.tensor(array, dtype=DTYPES[dtype], requires_grad=requires_grad)

    @staticmethod
    def numpy(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy().astype(np.float64)

    @staticmethod
    def no_grad():
        return torch.no_grad()

    @staticmethod
    def backward(loss: torch.Tensor, retain_graph: bool = False) -> None:
        loss.backward(retain_graph=retain_graph)

    @staticmethod
    def grad(output: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """d output / d inputs as a differentiable tensor (create_graph=True)."""
        return torch.autograd.grad(output, inputs, create_graph=True)[0]

    def input_grad(self, t: torch.Tensor) -> np.ndarray:
        return np.zeros(tuple(t.shape)) if t.grad is None else self.numpy(t.grad)

    # -- training -------------------------------------------------------------------------
    @staticmethod
    def train(model: Model, mode: bool) -> None:
        model.train(mode)

    @staticmethod
    def optimizer(model: Model, kind: str, lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> _Optimizer:
        if kind == "sgd":
            return _Optimizer(torch.optim.SGD(model.parameters(), lr=lr))
        return _Optimizer(torch.optim.Adam(model.parameters(), lr=lr, betas=betas, eps=eps))

    # -- state ----------------------------------------------------------------------------
    def grads(self, model: Model) -> dict[str, np.ndarray]:
        """Every parameter's gradient (zeros where there is none), canonical names."""
        return {
            _canonical_name(name): np.zeros(tuple(p.shape)) if p.grad is None else self.numpy(p.grad)
            for name, p in model.named_parameters()
        }

    def sn_state(self, model: Model) -> dict[str, np.ndarray]:
        """u, v (where the preset keeps them) and sigma of every spectral norm."""
        out = {}
        for layer in model.spec.sn_layers:
            module = getattr(model, layer.name)
            sn = dsn.get_spectral_norm(module)
            if sn._u is not None:
                out[f"u/{layer.name}"] = self.numpy(sn._u)
                out[f"v/{layer.name}"] = self.numpy(sn._v)
            out[f"sigma/{layer.name}"] = np.array(dsn.sigma(module))
        return out

    @staticmethod
    def normalized_weight(model: Model, layer_name: str) -> torch.Tensor:
        """``layer.weight`` as a user would keep it. Read in eval mode: torch recomputes a
        parametrized weight on every access, and a training-mode access runs one more power
        iteration (Paddle's attribute read does not), which would put the frameworks out of
        step. In eval mode it is W / sigma for the current u, v."""
        module = getattr(model, layer_name)
        if not module.training:
            return module.weight
        module.eval()
        try:
            return module.weight
        finally:
            module.train()

    def canonical_weight(self, model: Model, layer_name: str, weight: torch.Tensor) -> np.ndarray:
        """A weight of layer ``layer_name`` as a numpy array in the canonical layout."""
        return self.numpy(weight)


def _path_probe(log: dict, name: str, by_switch: bool):
    """A forward hook on a spectral-norm parametrization that logs which path produced the
    normalized weight. Where neither path has a fused Function (``by_switch``) only the plain
    switch tells."""

    def probe(module, inputs, output):
        if output.grad_fn is None:  # no graph recorded (no_grad): nothing to tell apart
            return
        if by_switch:
            path = "plain" if dsn._plain.enabled() else "fast"
        else:
            path = "fast" if type(output.grad_fn).__name__ == FAST_GRAD_FN else "plain"
        log.setdefault(name, set()).add(path)

    return probe


FRAMEWORK = TorchFramework()
