"""Driver for ``dualsn.paddle`` (all presets), through its public API: ``spectral_norm(...,
compat=preset, seed=seed)`` (``spectral_norm_conv`` for ``Config.operator_norm``), ``sigma``,
``remove_spectral_norm``, ``get_spectral_norm``. u, v
and the trainable weight are read where ``dualsn.paddle`` keeps them (``weight_orig``,
``weight_u``, ``weight_v``, like the Paddle built-in).

Canonical dims are mapped to Paddle dims (``paddle.nn.Linear`` swaps 0 and 1; negatives stay
negative, to exercise dualsn's own handling). u0, v0 come from ``spec.init_uv(seed)`` inside
dualsn, so this driver is compared with the golden traces as well as the live reference.
"""

from __future__ import annotations

import numpy as np

import dualsn.paddle as dsn
from backends._paddle_common import HookInstance, default_dtype, make_layer, paddle_dim, to_numpy
from backends.base import Driver


class DualsnPaddleInstance(HookInstance):
    def uv(self):
        # spectral_norm_conv keeps u, v in activation shapes: traces hold them flattened
        uv = super().uv()
        return None if uv is None else (uv[0].reshape(-1), uv[1].reshape(-1))

    def tracked_sigma(self):
        return to_numpy(self.layer.weight_sigma).reshape(())

    def _hook(self):
        return dsn.get_spectral_norm(self.layer, "weight")

    def sigma(self):
        return np.asarray(dsn.sigma(self.layer, "weight"))

    def singular_values(self):
        return np.asarray(dsn.singular_values(self.layer, "weight"))

    def remove(self):
        dsn.remove_spectral_norm(self.layer, "weight")
        self.removed = True


class DualsnPaddleDriver(Driver):
    name = "dualsn_paddle"
    presets = ("torch", "torch_legacy", "paddle")
    requires = ("paddle",)
    init_from_spec = True
    supports_features = True

    def build(self, config, preset, params, seed, training=True):
        with default_dtype(config.dtype):
            layer = make_layer(config, params)
        if not training:
            layer.eval()
        options = dict(seed=seed, track_sigma=config.track_sigma, **config.feature_kwargs)
        if config.operator_norm:  # preset is spec.CONV_COMPAT, the only one spectral_norm_conv has
            input_shape = config.layer.input_shapes()[0][1:]
            dsn.spectral_norm_conv(layer, input_shape, "weight", config.n_power_iterations, config.eps, **options)
        else:
            dsn.spectral_norm(
                layer, "weight", config.n_power_iterations, config.eps, paddle_dim(config), compat=preset, **options
            )
        return DualsnPaddleInstance(layer, config)


DRIVER = DualsnPaddleDriver()
