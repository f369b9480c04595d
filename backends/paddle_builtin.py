"""Driver for the Paddle built-in ``paddle.nn.utils.spectral_norm`` (preset ``"paddle"``), a
forward-pre-hook with no warm-up.

Initial u, v: register, then overwrite the ``weight_u``/``weight_v`` buffers in place with
``spec.init_uv``'s u0, v0. Registration runs no iteration, so this is exact, and the driver is
compared with the golden traces too.

dim: the built-in permutes with ``dim`` as given and mishandles negative values (a repeated
axis), so the driver passes the equivalent non-negative Paddle dim; ``None`` stays ``None``.
Removal: Paddle has no ``remove_spectral_norm``, so the removal sequence is unsupported here.
"""

from __future__ import annotations

from paddle.nn.utils import spectral_norm
from paddle.nn.utils.spectral_norm_hook import SpectralNorm as _Hook

from backends._paddle_common import HookInstance, default_dtype, make_layer, paddle_dim, sigma_from_state
from backends.base import Driver, Unsupported

_NO_REMOVE = "paddle.nn.utils has no remove_spectral_norm"


class PaddleBuiltinInstance(HookInstance):
    def _hook(self):
        for hook in self.layer._forward_pre_hooks.values():
            if isinstance(hook, _Hook) and hook.name == "weight":
                return hook
        return None

    def sigma(self):
        hook = self._hook()
        return sigma_from_state(self.layer.weight_orig, self._uv_tensors(), hook.dim, hook.eps)

    def remove(self):
        raise Unsupported(_NO_REMOVE)


class PaddleBuiltinDriver(Driver):
    name = "paddle_builtin"
    presets = ("paddle",)
    requires = ("paddle",)
    init_from_spec = True

    def unsupported(self, config, preset, primitive=None):
        if primitive == "remove":
            return _NO_REMOVE
        return super().unsupported(config, preset, primitive)

    def build(self, config, preset, params, seed, training=True):
        with default_dtype(config.dtype):  # the built-in creates u, v in the default dtype
            layer = make_layer(config, params)
            if not training:
                layer.eval()
            spectral_norm(layer, "weight", config.n_power_iterations, config.eps, paddle_dim(config, nonnegative=True))
        u0, v0 = self.initial_uv(config, preset, seed)
        layer.weight_u.set_value(u0)
        layer.weight_v.set_value(v0)
        return PaddleBuiltinInstance(layer, config)


DRIVER = PaddleBuiltinDriver()
