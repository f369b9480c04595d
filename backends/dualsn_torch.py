"""Driver for ``dualsn.torch`` (all presets), through its public API: ``spectral_norm(...,
compat=preset, seed=seed)`` (``spectral_norm_conv`` for ``Config.operator_norm``), ``sigma``,
``remove_spectral_norm``. u, v and the trainable weight
are read where ``dualsn.torch`` keeps them (a parametrization, like the torch built-in).

u0, v0 come from ``spec.init_uv(seed)`` inside dualsn, so this driver is compared with the
golden traces as well as with the live reference.
"""

from __future__ import annotations

import numpy as np

import dualsn.torch as dsn
from backends._torch_common import ParametrizedInstance, make_layer, to_numpy
from backends.base import Driver


class DualsnTorchInstance(ParametrizedInstance):
    def uv(self):
        # spectral_norm_conv keeps u, v in activation shapes: traces hold them flattened
        uv = super().uv()
        return None if uv is None else (uv[0].reshape(-1), uv[1].reshape(-1))

    def tracked_sigma(self):
        return to_numpy(self._parametrization()._sigma)

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
        options = dict(seed=seed, track_sigma=config.track_sigma, **config.feature_kwargs)
        if config.operator_norm:  # preset is spec.CONV_COMPAT, the only one spectral_norm_conv has
            input_shape = config.layer.input_shapes()[0][1:]
            dsn.spectral_norm_conv(module, input_shape, "weight", config.n_power_iterations, config.eps, **options)
        else:
            dsn.spectral_norm(
                module, "weight", config.n_power_iterations, config.eps, config.dim, compat=preset, **options
            )
        return DualsnTorchInstance(module, config)


DRIVER = DualsnTorchDriver()
