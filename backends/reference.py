"""The numpy reference driver: ``dualsn.reference.ReferenceSN`` plus numpy layers.

It is the oracle every other driver is compared with. Spectral-norm state and the weight
gradient come from ``dualsn.spec`` (``ReferenceSN``, ``normalized_weight_grad``); the layer
math (outputs, input/weight/bias gradients) from :mod:`backends.numpy_layers`. All arithmetic
stays in the case's dtype, like the frameworks.

The convolution operator norm (``Config.operator_norm``) is ``ReferenceSN`` on the EXPLICIT
convolution matrix M(W), built by convolving the basis of the input space
(:class:`ConvOperatorSN`).
"""

from __future__ import annotations


import numpy as np

from backends import numpy_layers
from backends.base import Config, Driver, Grads, Instance, LayerSpec
from dualsn import spec
from dualsn import reference as numpy_ref


def conv_matrix(layer: LayerSpec, weight: np.ndarray) -> np.ndarray:
    """The explicit matrix M(W) of ``layer``'s convolution without bias on one input sample:
    column j is the (flattened) output for the j-th unit input."""
    in_shape = layer.input_shapes()[0][1:]
    n = int(np.prod(in_shape))
    basis = np.eye(n, dtype=weight.dtype).reshape((n,) + in_shape)
    return numpy_layers.conv(basis, weight).reshape(n, -1).T


class ConvOperatorSN:
    """Spectral norm by the operator norm of a convolution: a ``numpy_ref.ReferenceSN`` on M(W),
    with the interface :class:`ReferenceInstance` uses of a ``ReferenceSN`` on the weight.

    M(W) is linear in W, so the gradient of sigma = u^H M(W) v with respect to W is the
    convolution's weight-vjp with input v and upstream gradient u."""

    def __init__(self, layer: LayerSpec, weight: np.ndarray, sn_spec: spec.Spec, u0, v0, training: bool, **extra):
        self.layer = layer
        self.spec = sn_spec
        self.dim = None
        self.matrix_sn = numpy_ref.ReferenceSN(conv_matrix(layer, weight), 0, sn_spec, u0, v0, training=training, **extra)

    @property
    def u(self):
        return self.matrix_sn.u

    @property
    def v(self):
        return self.matrix_sn.v

    def sigma(self, weight):
        return self.matrix_sn.sigma(conv_matrix(self.layer, weight))

    def singular_values(self, weight):
        return self.matrix_sn.singular_values(conv_matrix(self.layer, weight))

    def forward(self, weight, training):
        m = conv_matrix(self.layer, weight)
        self.matrix_sn.forward(m, training)  # iterates u, v on M (training); its M / sigma is unused
        return weight / self.spec.divisor(self.matrix_sn.sigma(m))

    def weight_grad(self, grad, weight):
        """dL/dW given dL/dW_sn = ``grad``, u and v held constant: as
        ``numpy_ref.normalized_weight_grad`` with d sigma / dW in place of u v^H."""
        s = self.sigma(weight)
        if self.spec.coeff is not None and self.spec.divisor(s) == 1.0:
            return grad  # inactive soft bound: W_sn = W
        scale = 1.0 if self.spec.coeff is None else self.spec.coeff
        w_sn = weight / self.spec.divisor(s)
        in_shape = (1,) + self.layer.input_shapes()[0][1:]
        out_shape = (1,) + self.layer.output_shape()[1:]
        dsigma, _ = numpy_layers.conv_vjp(self.v.reshape(in_shape), weight, self.u.reshape(out_shape))
        return (scale * grad - np.vdot(w_sn, grad) * dsigma) / np.conj(s)

    def state(self):
        return self.matrix_sn.state()

    def load_state(self, state):
        self.matrix_sn.load_state(state)


class ReferenceInstance(Instance):
    def __init__(self, config: Config, preset: str, params: dict, uv0, training: bool, seed: int):
        self.config = config
        self.layer = config.layer
        self.spec = config.spec(preset)
        self.weight = np.array(params["weight"], dtype=config.dtype)
        self.bias_ = None if params.get("bias") is None else np.array(params["bias"], dtype=config.dtype)
        u0, v0 = (None, None) if uv0 is None else uv0
        extra = {"seed": seed}  # the recovery vectors (spec.recovery_uv) come from the seed too
        if self.spec.num_svs > 1 and u0 is not None:
            h, w = config.matrix_shape()
            extra_u0, extra_v0 = spec.init_extra_uv(h, w, self.spec.num_svs - 1, seed, config.dtype, config.eps)
            extra.update(extra_u0=extra_u0, extra_v0=extra_v0)
        if config.operator_norm:
            self.sn = ConvOperatorSN(self.layer, self.weight, self.spec, u0, v0, training, **extra)
        else:
            self.sn = numpy_ref.ReferenceSN(self.weight, config.canonical_dim, self.spec, u0, v0, training=training, **extra)
        self.last_sigma = None  # the sigma of the last forward (what track_sigma keeps)
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

    def tracked_sigma(self):
        return np.asarray(self.last_sigma)

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
        used = self.sn.forward(self.weight, training)
        self.last_sigma = self.sn.sigma(self.weight)  # with u, v as this forward left them
        return used

    def forward(self, inputs, training):
        return numpy_layers.forward(self.layer, self._effective_weight(training), self.bias_, inputs)

    def backward(self, batches, training):
        outputs, input_grads = [], []
        g_weight = np.zeros_like(self.weight)
        g_bias = None if self.bias_ is None else np.zeros_like(self.bias_)
        for inputs, r, sign in batches:
            w_used = self._effective_weight(training)
            outputs.append(numpy_layers.forward(self.layer, w_used, self.bias_, inputs))
            r = (sign * r).astype(self.weight.dtype)
            g_used, g_b, g_in = numpy_layers.vjp(self.layer, w_used, self.bias_, inputs, r)
            if self.sn is not None:
                # through W -> W_sn with u, v as this forward left them
                g_used = self.sn.weight_grad(g_used, self.weight)
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
