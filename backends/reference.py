"""The numpy reference driver: ``dualsn.spec.ReferenceSN`` plus numpy layers.

It is the oracle every other driver is compared with. Spectral-norm state and the weight
gradient come from ``dualsn.spec`` (``ReferenceSN``, ``normalized_weight_grad``); the layer
math (outputs, input/weight/bias gradients) from :mod:`backends.numpy_layers`. All arithmetic
stays in the case's dtype, like the frameworks.
"""

from __future__ import annotations


import numpy as np

from backends import numpy_layers
from backends.base import Config, Driver, Grads, Instance
from dualsn import spec


class ReferenceInstance(Instance):
    def __init__(self, config: Config, preset: str, params: dict, uv0, training: bool, seed: int):
        self.config = config
        self.layer = config.layer
        self.spec = config.spec(preset)
        self.weight = np.array(params["weight"], dtype=config.dtype)
        self.bias_ = None if params.get("bias") is None else np.array(params["bias"], dtype=config.dtype)
        u0, v0 = (None, None) if uv0 is None else uv0
        extra = {}
        if self.spec.num_svs > 1 and u0 is not None:
            h, w = config.matrix_shape()
            extra_u0, extra_v0 = spec.init_extra_uv(h, w, self.spec.num_svs - 1, seed, config.dtype, config.eps)
            extra = {"extra_u0": extra_u0, "extra_v0": extra_v0}
        self.sn: spec.ReferenceSN | None = spec.ReferenceSN(
            self.weight, config.canonical_dim, self.spec, u0, v0, training=training, **extra
        )
        self._grads: tuple[np.ndarray, np.ndarray | None] | None = None

    # -- state ---------------------------------------------------------------------------
    def uv(self):
        if self.sn is None or self.sn.u is None:
            return None
        return self.sn.u.copy(), self.sn.v.copy()

    def sigma(self):
        return np.asarray(self.sn.sigma(self.weight))

    def normalized_weight(self):
        return self.weight / self.spec.divisor(self.sn.sigma(self.weight))

    def singular_values(self):
        return np.asarray(self.sn.singular_values(self.weight))

    def original_weight(self):
        return self.weight.copy()

    def bias(self):
        return None if self.bias_ is None else self.bias_.copy()

    def has_sn(self):
        return self.sn is not None

    # -- computation ---------------------------------------------------------------------
    def _effective_weight(self, training: bool) -> np.ndarray:
        """The weight one forward uses (runs the power iteration in training mode)."""
        if self.sn is None:
            return self.weight
        return self.sn.forward(self.weight, training)

    def forward(self, inputs, training):
        return numpy_layers.forward(self.layer, self._effective_weight(training), self.bias_, inputs)

    def backward(self, batches, training):
        outputs, input_grads = [], []
        g_weight = np.zeros_like(self.weight)
        g_bias = None if self.bias_ is None else np.zeros_like(self.bias_)
        for inputs, r, sign in batches:
            w_used = self._effective_weight(training)
            # u, v as this forward left them: its sigma and its gradient use exactly these
            state = None if self.sn is None else (self.sn.u, self.sn.v)
            outputs.append(numpy_layers.forward(self.layer, w_used, self.bias_, inputs))
            r = (sign * r).astype(self.weight.dtype)
            g_used, g_b, g_in = numpy_layers.vjp(self.layer, w_used, self.bias_, inputs, r)
            if state is not None:
                g_used = spec.normalized_weight_grad(
                    g_used, self.weight, state[0], state[1], self.sn.dim, self.spec
                )
            g_weight = g_weight + g_used
            if g_bias is not None:
                g_bias = g_bias + g_b
            input_grads.append(g_in)
        self._grads = (g_weight, g_bias)
        return Grads(outputs=outputs, weight=g_weight, bias=g_bias, inputs=input_grads)

    def sgd_step(self, lr):
        g_weight, g_bias = self._grads
        self.weight = self.weight - self.weight.dtype.type(lr) * g_weight
        if self.bias_ is not None:
            self.bias_ = self.bias_ - self.bias_.dtype.type(lr) * g_bias

    def save(self):
        state = {"weight": self.weight.copy()}
        if self.bias_ is not None:
            state["bias"] = self.bias_.copy()
        if self.sn is not None:
            state.update(self.sn.state())
        return state

    def load(self, saved):
        self.weight = np.array(saved["weight"], dtype=self.weight.dtype)
        if self.bias_ is not None:
            self.bias_ = np.array(saved["bias"], dtype=self.bias_.dtype)
        if self.sn is not None:
            self.sn.load_state(saved)

    def remove(self):
        # removal never iterates: the plain weight is W / sigma with the current u, v
        self.weight = self.normalized_weight()
        self.sn = None


class ReferenceDriver(Driver):
    name = "reference"
    presets = tuple(spec.PRESETS)
    requires = ()
    init_from_spec = True
    supports_features = True

    def build(self, config, preset, params, seed, training=True, uv0=None):
        """As :meth:`Driver.build`; ``uv0`` overrides the seeded u0, v0 (used to follow a
        driver that draws its own, e.g. the torch parametrization built-in)."""
        if uv0 is None:
            uv0 = self.initial_uv(config, preset, seed)
        return ReferenceInstance(config, preset, params, uv0, training, seed)


DRIVER = ReferenceDriver()
