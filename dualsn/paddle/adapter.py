"""The PaddlePaddle adapter: everything the tools (port, report, cli, demo) ask of Paddle.

The tools reach it through :func:`dualsn.adapters.adapter` (``adapter("paddle")``) and never
import paddle or a private name of :mod:`dualsn.paddle` themselves. It mirrors
``dualsn/torch/adapter.py``: the same public names with the same meaning, listed there; the
code differs only where the frameworks do (said where it does). Importing this module imports
paddle; :mod:`dualsn.paddle` is imported by the functions that need it.
"""

from __future__ import annotations

import numpy as np
import paddle

from dualsn import diagnostics as _diagnostics
from dualsn import keys as _keys
from dualsn import spec as _spec
from dualsn.paddle._api import sigma
from dualsn.paddle._registry import is_spectral_norm
from dualsn.paddle._registry import get_spectral_norm
from dualsn.paddle._sn import SpectralNorm
from dualsn.adapter_common import (SpectralNormState, conv_geometry, dotted_name, dtype_name, hook_sn_info,
                                   hook_sn_preset, shape_of)

__all__ = [
    "NAME", "is_model", "state", "layers", "layer_kind", "sn_info", "sn_preset", "assign", "refresh", "store_sigma",
    "to_numpy", "is_meta", "missing_data", "dense_numpy", "float_numpy", "spectral_norms", "forward", "seed",
    "sn_layer_names", "sigmas", "HingeTrainer",
    "report",
]

NAME = "paddle"


# ---------------------------------------------------------------------------------------------
# Models and their state


def is_model(obj) -> bool:
    return isinstance(obj, paddle.nn.Layer)


def state(model) -> dict:
    return model.state_dict()  # the live tensors


def layers(model) -> dict:
    return dict(model.named_sublayers(include_self=True))


def _classes(*dotted: str) -> tuple[type, ...]:
    """The Paddle classes at these dotted paths that this Paddle version has."""
    found = []
    for path in dotted:
        obj = paddle
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, type):
            found.append(obj)
    return tuple(found)


def layer_kind(layer) -> tuple[str, str | None]:
    if isinstance(layer, _classes("nn.Linear")):
        return "linear", "in_out"  # paddle.nn.Linear keeps its weight as [in, out]
    # Paddle: paddle.compat.nn.Linear keeps torch's [out, in] (not a paddle.nn.Linear subclass).
    if isinstance(layer, _classes("compat.nn.Linear")):
        return "linear", "out_in"
    if isinstance(layer, _classes("nn.Bilinear")):
        return "bilinear", None
    if isinstance(layer, _classes("nn.LayerNorm")):
        return "layernorm", None
    if isinstance(layer, _classes("nn.layer.norm._BatchNormBase", "nn.BatchNorm")):
        return "batchnorm", None
    if isinstance(layer, _classes("nn.layer.norm._InstanceNormBase")):
        return "instancenorm", None
    if isinstance(layer, _classes("nn.PReLU")):
        return "prelu", None
    return "other", None


def sn_info(layer, name: str):
    return hook_sn_info(layer, name)  # every Paddle spectral norm is a forward-pre-hook


def sn_preset(layer, name: str) -> str | None:
    return hook_sn_preset(layer, name, "paddle", "paddle")


def assign(tensor, array: np.ndarray) -> None:
    # reshape: ascontiguousarray turns a 0-d array (a tracked sigma) into shape (1,)
    tensor.set_value(np.ascontiguousarray(array).reshape(np.shape(array)))


def refresh(layer) -> None:
    """Recompute ``layer.<name>``, which the Paddle hooks (dualsn's and the built-in)
    keep as a plain attribute, so it reflects the loaded state before the next forward,
    and drop what dualsn's hook kept from the old state (eval cache, last sigma):
    ``set_value`` may change entries its sampled checks do not look at."""
    for hook in list(layer._forward_pre_hooks.values()):
        if hasattr(hook, "compute_weight") and isinstance(getattr(hook, "name", None), str):
            if hasattr(hook, "invalidate"):
                hook.invalidate()
            with paddle.no_grad():
                setattr(layer, hook.name, hook.compute_weight(layer, do_power_iteration=False))


def store_sigma(layer, name: str, tensor) -> None:
    """Write sigma of the loaded state (u^H M v, no iteration) into ``tensor``, the
    ``<name>_sigma`` buffer of dualsn's spectral norm on ``layer.<name>``."""

    value = get_spectral_norm(layer, name).sigma(layer)
    tensor.set_value(np.asarray(value).astype(dtype_name(tensor)).reshape(shape_of(tensor)))


# ---------------------------------------------------------------------------------------------
# Tensors


def to_numpy(tensor) -> np.ndarray:
    return tensor.numpy()


def is_meta(tensor) -> bool:
    return False  # Paddle has no meta device


def missing_data(tensor) -> str | None:
    return None if tensor._is_initialized() else "is a Paddle tensor without data"


def dense_numpy(tensor) -> np.ndarray:
    if any(getattr(tensor, name, lambda: False)() for name in ("is_sparse_coo", "is_sparse_csr")):
        tensor = tensor.to_dense()
    if tensor.place.is_cpu_place():
        try:
            return np.from_dlpack(tensor.detach())  # no copy
        except Exception:  # noqa: BLE001 - dtypes DLPack lacks: the copying path below
            pass
    return tensor.numpy()


def float_numpy(tensor) -> np.ndarray:
    if tensor.dtype in (paddle.bfloat16, paddle.float16):
        tensor = tensor.astype(paddle.float32)  # numpy has no bfloat16
    return np.asarray(tensor.numpy())


# ---------------------------------------------------------------------------------------------
# Diagnostics: every spectral norm of a model


def _dualsn_state(name, kind, hook, layer) -> SpectralNormState:
    weight, u, v = hook.state(layer)
    geometry = getattr(hook, "geometry", None)  # SpectralNormConvHook
    return SpectralNormState(
        name, kind, "dualsn", hook.dim, hook.spec, float_numpy(weight),
        None if u is None else float_numpy(u), None if v is None else float_numpy(v),
        None if geometry is None else conv_geometry(geometry),
    )


def _builtin_state(name, kind, hook, layer) -> SpectralNormState:
    # paddle.nn.utils.spectral_norm's hook: the torch legacy algorithm ("paddle" preset)
    s = _spec.make_spec("paddle", hook.n_power_iterations, hook.eps)
    return SpectralNormState(
        name, kind, "built-in", hook.dim, s,
        float_numpy(getattr(layer, _keys.hook_key(hook.name))),
        float_numpy(getattr(layer, hook.name + "_u")),
        float_numpy(getattr(layer, hook.name + "_v")),
        label="paddle, built-in",
    )


def spectral_norms(model) -> list[SpectralNormState]:

    found = []
    for prefix, layer in model.named_sublayers(include_self=True):
        kind = type(layer).__name__
        for hook in layer._forward_pre_hooks.values():
            if isinstance(hook, SpectralNorm):
                found.append(_dualsn_state(dotted_name(prefix, hook.name), kind, hook, layer))
            elif type(hook).__name__ == "SpectralNorm" and hasattr(hook, "n_power_iterations"):
                found.append(_builtin_state(dotted_name(prefix, hook.name), kind, hook, layer))
    return found


# ---------------------------------------------------------------------------------------------
# Running models


def forward(model, inputs):
    model.eval()
    with paddle.no_grad():
        return model(*[paddle.to_tensor(x) for x in inputs])


def seed(value: int) -> None:
    paddle.seed(value)


def sn_layer_names(model) -> list[str]:

    return [n for n, layer in model.named_sublayers(include_self=True) if is_spectral_norm(layer)]


def sigmas(model, names: list[str]) -> list[float]:

    found = dict(model.named_sublayers(include_self=True))
    return [sigma(found[n]) for n in names]


class HingeTrainer:
    """A discriminator with its optimizer (plain SGD): one hinge-loss update per step."""

    def __init__(self, model, lr: float) -> None:
        self.model = model
        self.opt = paddle.optimizer.SGD(learning_rate=lr, parameters=model.parameters())

    def step(self, real, y_real, fake, y_fake):
        self.model.train()
        d_real = self.model(paddle.to_tensor(real), paddle.to_tensor(y_real))
        d_fake = self.model(paddle.to_tensor(fake), paddle.to_tensor(y_fake))
        relu = paddle.nn.functional.relu
        loss = relu(1 - d_real).mean() + relu(1 + d_fake).mean()
        self.opt.clear_grad()
        loss.backward()
        self.opt.step()
        return float(loss), np.concatenate([d_real.numpy(), d_fake.numpy()])


def report(model):
    """The per-layer sigma report of ``model``, a :class:`dualsn.diagnostics.SNReport` (see
    :func:`dualsn.report.report`); changes nothing."""
    return _diagnostics.build_report(NAME, spectral_norms(model))
