"""Driver for the legacy torch built-in ``torch.nn.utils.spectral_norm`` (preset
``"torch_legacy"``), a forward-pre-hook with no warm-up.

Initial u, v: register, then overwrite the ``weight_u``/``weight_v`` buffers in place with
``spec.init_uv``'s u0, v0. Registration runs no iteration, so this is exact, and the driver is
compared with the golden traces too.

dim: the built-in permutes with ``dim`` as given and mishandles negative values (a repeated
axis), so the driver passes the equivalent non-negative dim; ``None`` stays ``None`` (its
default).
"""

from __future__ import annotations

import importlib

import torch
from torch.nn.utils import remove_spectral_norm, spectral_norm

from backends._torch_common import TorchInstance, make_layer, sigma_from_state
from backends.base import Driver

# the module, not the function of the same name that torch.nn.utils exports
_legacy = importlib.import_module("torch.nn.utils.spectral_norm")


class LegacyHookInstance(TorchInstance):
    """State: ``weight_orig`` (parameter), ``weight_u``/``weight_v`` (buffers), the hook."""

    def _hook(self):
        for hook in self.module._forward_pre_hooks.values():
            if isinstance(hook, _legacy.SpectralNorm) and hook.name == "weight":
                return hook
        return None

    def _weight_param(self):
        return self.module.weight if self.removed else self.module.weight_orig

    def _uv(self):
        return None if self.removed else (self.module.weight_u, self.module.weight_v)

    def _normalized(self):
        if self.removed:
            return self.module.weight
        return self._hook().compute_weight(self.module, do_power_iteration=False)

    def sigma(self):
        hook = self._hook()
        return sigma_from_state(self.module.weight_orig, self._uv(), hook.dim, hook.eps).numpy()

    def remove(self):
        remove_spectral_norm(self.module, "weight")
        self.removed = True

    def has_sn(self):
        return self._hook() is not None or hasattr(self.module, "weight_orig")


class TorchLegacyDriver(Driver):
    name = "torch_legacy"
    presets = ("torch_legacy",)
    requires = ("torch",)
    init_from_spec = True

    def build(self, config, preset, params, seed, training=True):
        module = make_layer(config, params).train(training)
        dim = None if config.dim is None else config.canonical_dim
        spectral_norm(module, "weight", config.n_power_iterations, config.eps, dim)
        u0, v0 = self.initial_uv(config, preset, seed)
        with torch.no_grad():
            module.weight_u.copy_(torch.from_numpy(u0))
            module.weight_v.copy_(torch.from_numpy(v0))
        return LegacyHookInstance(module, config)


DRIVER = TorchLegacyDriver()
