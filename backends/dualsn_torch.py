"""Driver for ``dualsn.torch`` (all presets), through its public API: ``spectral_norm(...,
compat=preset, seed=seed)``, ``sigma``, ``remove_spectral_norm``. u, v and the trainable weight
are read where ``dualsn.torch`` keeps them (a parametrization, like the torch built-in).

u0, v0 come from ``spec.init_uv(seed)`` inside dualsn, so this driver is compared with the
golden traces as well as with the live reference.
"""

from __future__ import annotations

import numpy as np

import dualsn.torch as dsn
from backends._torch_common import ParametrizedInstance, make_layer
from backends.base import Driver


class DualsnTorchInstance(ParametrizedInstance):
    def sigma(self):
        return np.asarray(dsn.sigma(self.module, "weight"))

    def singular_values(self):
        return np.asarray(dsn.singular_values(self.module, "weight"))

    def remove(self):
        dsn.remove_spectral_norm(self.module, "weight")
        self.removed = True

    def has_sn(self):
        return dsn.is_spectral_norm(self.module, "weight")


class DualsnTorchDriver(Driver):
    name = "dualsn_torch"
    presets = ("torch", "torch_legacy", "paddle")
    requires = ("torch",)
    init_from_spec = True
    supports_features = True

    def build(self, config, preset, params, seed, training=True):
        module = make_layer(config, params).train(training)
        dsn.spectral_norm(
            module, "weight", config.n_power_iterations, config.eps, config.dim, compat=preset, seed=seed,
            **config.feature_kwargs,
        )
        return DualsnTorchInstance(module, config)


DRIVER = DualsnTorchDriver()
