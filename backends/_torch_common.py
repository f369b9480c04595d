"""What the torch drivers share: building the layers, and every primitive that does not depend
on how spectral norm is attached (parametrization or forward-pre-hook).

Imported only by torch drivers, and only once torch is known to be importable.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from backends.base import Config, Grads, Instance

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class VectorLayer(nn.Module):
    """A layer with a 1-D weight: out = x * weight + bias (elementwise over the last axis)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n))
        self.bias = nn.Parameter(torch.empty(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


def make_layer(config: Config, params: dict[str, np.ndarray]) -> nn.Module:
    """The torch layer for ``config.layer`` holding ``params``, in train mode."""
    layer = config.layer
    k, s = layer.kind, layer.sizes
    if k in ("linear", "linear_compat"):
        module = nn.Linear(s[0], s[1])
    elif layer.spatial:
        cls_name = ("ConvTranspose" if layer.transposed else "Conv") + f"{layer.spatial}d"
        module = getattr(nn, cls_name)(s[0], s[1], s[2])
    elif k == "embedding":
        module = nn.Embedding(s[0], s[1])
    elif k == "bilinear":
        module = nn.Bilinear(s[0], s[1], s[2])
    else:
        module = VectorLayer(s[0])
    module = module.to(TORCH_DTYPES[config.dtype])
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(params["weight"]))
        if params.get("bias") is not None:
            module.bias.copy_(torch.from_numpy(params["bias"]))
    return module.train()


def weight_matrix(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """The W-matrix (1-D weights: an n x 1 matrix)."""
    perm = (dim,) + tuple(d for d in range(weight.ndim) if d != dim)
    return weight.permute(perm).reshape(weight.shape[dim], -1)


def sigma_from_state(weight: torch.Tensor, uv, dim: int, eps: float) -> torch.Tensor:
    """sigma = u^H W v from a layer's state (max(||W||, eps) without u, v)."""
    with torch.no_grad():
        if uv is None:
            return torch.linalg.vector_norm(weight).clamp_min(eps)
        u, v = uv
        return torch.vdot(u, torch.mv(weight_matrix(weight, dim), v))


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


class TorchInstance(Instance):
    """Primitives common to all torch drivers. Subclasses say where the state lives:
    :meth:`_weight_param` (the trainable weight), :meth:`_uv`, :meth:`_normalized`,
    :meth:`sigma`, :meth:`remove`, :meth:`has_sn`."""

    def __init__(self, module: nn.Module, config: Config) -> None:
        self.module = module
        self.config = config
        self.removed = False

    # -- to implement ---------------------------------------------------------------------
    def _weight_param(self) -> torch.Tensor:
        raise NotImplementedError

    def _uv(self):
        raise NotImplementedError

    def _normalized(self) -> torch.Tensor:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------
    def uv(self):
        uv = self._uv()
        return None if uv is None else (to_numpy(uv[0]), to_numpy(uv[1]))

    def normalized_weight(self):
        with torch.no_grad():
            return to_numpy(self._normalized())

    def original_weight(self):
        return to_numpy(self._weight_param())

    def bias(self):
        b = getattr(self.module, "bias", None)
        return None if b is None else to_numpy(b)

    def _tensors(self, inputs, requires_grad: bool):
        out = []
        for a in inputs:
            t = torch.from_numpy(np.array(a))
            if requires_grad and t.is_floating_point():
                t.requires_grad_(True)
            out.append(t)
        return out

    def forward(self, inputs, training):
        self.module.train(training)
        with torch.no_grad():
            return to_numpy(self.module(*self._tensors(inputs, False)))

    def _trainables(self):
        return [p for p in (self._weight_param(), getattr(self.module, "bias", None)) if p is not None]

    def backward(self, batches, training):
        self.module.train(training)
        for p in self._trainables():
            p.grad = None
        loss, outputs, inputs_used = 0, [], []
        for inputs, r, sign in batches:
            tensors = self._tensors(inputs, True)
            out = self.module(*tensors)
            loss = loss + sign * (out * torch.from_numpy(r)).sum()
            outputs.append(to_numpy(out))
            inputs_used.append(tensors)
        loss.backward()
        weight = self._weight_param()
        b = getattr(self.module, "bias", None)
        return Grads(
            outputs=outputs,
            weight=to_numpy(weight.grad),
            bias=None if b is None else to_numpy(b.grad),
            inputs=[[to_numpy(t.grad) for t in ts if t.is_floating_point()] for ts in inputs_used],
        )

    def sgd_step(self, lr):
        with torch.no_grad():
            for p in self._trainables():
                p.sub_(lr * p.grad)
                p.grad = None

    def save(self):
        # through torch.save, as a real checkpoint would go (keeps the state-dict metadata)
        buffer = io.BytesIO()
        torch.save(self.module.state_dict(), buffer)
        return buffer.getvalue()

    def load(self, saved):
        state = torch.load(io.BytesIO(saved), weights_only=True)
        self.module.load_state_dict(state)


class ParametrizedInstance(TorchInstance):
    """Spectral norm as a ``torch.nn.utils.parametrize`` parametrization on ``weight`` (the
    torch built-in and ``dualsn.torch``). State: ``module.parametrizations.weight.original``
    and the parametrization's ``_u``/``_v`` buffers (absent or None for an exact 1-D weight)."""

    def _parametrization(self):
        return self.module.parametrizations.weight[0]

    def _weight_param(self):
        if self.removed:
            return self.module.weight
        return self.module.parametrizations.weight.original

    def _uv(self):
        if self.removed:
            return None
        p = self._parametrization()
        u = getattr(p, "_u", None)
        return None if u is None else (u, p._v)

    def _normalized(self):
        if self.removed:
            return self.module.weight
        # module.weight is recomputed on every access, and an access in training mode
        # iterates: read it in eval mode, which only normalizes with the current u, v.
        was_training = self.module.training
        self.module.eval()
        try:
            return self.module.weight
        finally:
            self.module.train(was_training)

    def sigma(self):
        p = self._parametrization()
        return sigma_from_state(self._weight_param(), self._uv(), p.dim, p.eps).numpy()

    def has_sn(self):
        return parametrize.is_parametrized(self.module, "weight")
