"""Driver for the torch built-in ``torch.nn.utils.parametrizations.spectral_norm`` (preset
``"torch"``).

Initial u, v. The built-in draws them itself and then warms up inside registration, so they
cannot be injected. Instead they are made known: registration runs with torch's RNG seeded to
``seed``, and :meth:`initial_uv` replays the built-in's draw from the same seed (u's normals,
then v's, ``normal_(0, 1)`` in the weight's dtype, each ``F.normalize``-d with eps). The
reference starts from those u0, v0, so this driver is compared with the live reference only,
never with the golden traces (which start from ``spec.init_uv``). The registration sequences
check the replay: a wrong draw would fail them.

Removal: ``parametrize.remove_parametrizations`` evaluates the parametrization once, which
iterates in training mode. dualsn's removal never iterates, so this driver removes in eval mode
and restores the mode afterwards (the built-in's own way to remove without an extra step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrizations, parametrize

from backends._torch_common import TORCH_DTYPES, ParametrizedInstance, make_layer
from backends.base import Driver


class BuiltinParametrizedInstance(ParametrizedInstance):
    def remove(self):
        was_training = self.module.training
        self.module.eval()  # no power iteration at removal
        parametrize.remove_parametrizations(self.module, "weight", leave_parametrized=True)
        self.module.train(was_training)
        self.removed = True


class TorchParametrizationsDriver(Driver):
    name = "torch_parametrizations"
    presets = ("torch",)
    requires = ("torch",)
    init_from_spec = False

    def initial_uv(self, config, preset, seed):
        if not config.has_uv(preset):
            return None
        h, w = config.matrix_shape()
        dtype = TORCH_DTYPES[config.dtype]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU generator the built-in draws from
            u = torch.empty(h, dtype=dtype).normal_(0, 1)
            v = torch.empty(w, dtype=dtype).normal_(0, 1)
        return (
            F.normalize(u, dim=0, eps=config.eps).numpy(),
            F.normalize(v, dim=0, eps=config.eps).numpy(),
        )

    def build(self, config, preset, params, seed, training=True):
        module = make_layer(config, params).train(training)
        with torch.random.fork_rng(devices=[]):  # leave the global RNG as it was
            torch.default_generator.manual_seed(seed)
            parametrizations.spectral_norm(module, "weight", config.n_power_iterations, config.eps, config.dim)
        return BuiltinParametrizedInstance(module, config)


DRIVER = TorchParametrizationsDriver()
