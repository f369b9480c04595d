"""The small interface every conformance driver implements.

A *driver* wraps one spectral-norm implementation (the numpy reference, dualsn's backends, or a
framework built-in). Given a :class:`Config` (which layer, which ``dim``, ``n_power_iterations``,
``eps``, dtype) and a preset, it builds the layer from canonical numpy parameters, applies
spectral norm starting from known u0, v0, and hands back an :class:`Instance` with a handful of
primitives. The conformance runner composes those primitives into sequences.

Everything crossing this interface is numpy, in the CANONICAL layout: torch's parameter layouts
(``Linear`` weight ``[out, in]``, every bias ``[out]``) and torch-style dims. Drivers for
frameworks with other layouts (``paddle.nn.Linear`` stores ``[in, out]``) convert on the way in
and out, so traces from all drivers compare directly.

Driver modules import their framework at the top; :mod:`backends` imports a driver module
only once its framework is importable (einops-style), and otherwise stands in a driver whose
:meth:`Driver.unavailable` says why, so its tests skip with that reason.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from dualsn import spec

__all__ = [
    "LAYER_KINDS",
    "LayerSpec",
    "Config",
    "Grads",
    "Driver",
    "Instance",
    "Unsupported",
]

LAYER_KINDS = (
    "linear",
    "linear_compat",  # torch.nn.Linear in torch; paddle.compat.nn.Linear ([out, in]) in Paddle
    "conv1d",
    "conv2d",
    "conv3d",
    "convtranspose1d",
    "convtranspose2d",
    "convtranspose3d",
    "embedding",
    "bilinear",
    "vector",  # a tiny custom layer with a 1-D weight: out = x * weight + bias
)


def importable(module: str) -> bool:
    """Whether ``module`` can be found, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # e.g. sys.modules[module] is None (import blocked)
        return False


class Unsupported(Exception):
    """A driver cannot run this configuration or primitive; the message says why."""


@dataclass(frozen=True)
class LayerSpec:
    """A layer in canonical (torch) terms.

    ``sizes`` are the constructor sizes in torch's argument order:
    linear: (in, out); conv*/convtranspose*: (in_channels, out_channels, kernel);
    embedding: (num_embeddings, embedding_dim); bilinear: (in1, in2, out); vector: (n,).
    ``length`` is the spatial input extent for convolutions, ``batch`` the batch size.
    """

    kind: str
    sizes: tuple[int, ...]
    batch: int = 2
    length: int = 4

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"unknown layer kind {self.kind!r}; expected one of {LAYER_KINDS}")

    @property
    def spatial(self) -> int:
        """Number of spatial axes of a convolution (0 for other layers)."""
        return int(self.kind[-2]) if self.kind.startswith("conv") else 0

    @property
    def transposed(self) -> bool:
        return self.kind.startswith("convtranspose")

    @property
    def weight_shape(self) -> tuple[int, ...]:
        k, s = self.kind, self.sizes
        if k in ("linear", "linear_compat"):
            return (s[1], s[0])
        if self.transposed:
            return (s[0], s[1]) + (s[2],) * self.spatial
        if self.spatial:
            return (s[1], s[0]) + (s[2],) * self.spatial
        if k == "embedding":
            return (s[0], s[1])
        if k == "bilinear":
            return (s[2], s[0], s[1])
        return (s[0],)  # vector

    @property
    def bias_shape(self) -> tuple[int, ...] | None:
        k, s = self.kind, self.sizes
        if k == "embedding":
            return None
        if k in ("linear", "linear_compat") or self.spatial:
            return (s[1],)
        if k == "bilinear":
            return (s[2],)
        return (s[0],)  # vector

    @property
    def default_dim(self) -> int:
        """Torch's default dim: 1 for ConvTranspose (output channels), else 0."""
        return 1 if self.transposed else 0

    def input_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the forward's inputs (embedding: one integer index array)."""
        k, s, b = self.kind, self.sizes, self.batch
        if k in ("linear", "linear_compat"):
            return [(b, s[0])]
        if self.spatial:
            return [(b, s[0]) + (self.length,) * self.spatial]
        if k == "embedding":
            return [(b, 3)]
        if k == "bilinear":
            return [(b, s[0]), (b, s[1])]
        return [(b, s[0])]

    def output_shape(self) -> tuple[int, ...]:
        k, s, b = self.kind, self.sizes, self.batch
        if k in ("linear", "linear_compat"):
            return (b, s[1])
        if self.spatial:
            kern = s[2]
            n = self.length + kern - 1 if self.transposed else self.length - kern + 1
            return (b, s[1]) + (n,) * self.spatial
        if k == "embedding":
            return (b, 3, s[1])
        if k == "bilinear":
            return (b, s[2])
        return (b, s[0])

    @property
    def integer_input(self) -> bool:
        return self.kind == "embedding"


@dataclass(frozen=True)
class Config:
    """Everything that defines one spectral-norm registration, independent of the preset.

    ``dim`` is a canonical (torch-layout) dim, possibly negative, or None for the default.
    """

    layer: LayerSpec
    dim: int | None = None
    n_power_iterations: int = 1
    eps: float = 1e-12
    dtype: str = "float32"
    features: tuple[tuple[str, Any], ...] = ()
    """Opt-in features no built-in has (``spec.FEATURES``), as (name, value) pairs."""
    track_sigma: bool = False
    """Register with ``track_sigma=True`` (a registration option, not a spec field): the layer
    keeps the last forward's sigma in a buffer, which traces record (:meth:`Instance.tracked_sigma`)."""
    operator_norm: bool = False
    """Register with ``spectral_norm_conv(input_shape = one sample of the layer's input)``: the
    W-matrix is the explicit convolution matrix (rows: output entries, columns: input entries),
    u, v (flattened in traces) live in the output and input activation spaces, and the preset
    is ``spec.CONV_COMPAT``. Convolutions (not transposed) only."""

    degenerate: bool = False
    """The case's weight is one the built-ins turn into NaN (all zero) or overflow on (|W| near
    the dtype's range): dualsn's own rules apply (``spec.Spec.divisor``'s zero floor,
    ``spec.recovery_uv``, ``spec.safe_norm``), so only dualsn's drivers run it."""

    def __post_init__(self) -> None:
        if self.operator_norm and (not self.layer.spatial or self.layer.transposed or self.dim is not None):
            raise ValueError("operator_norm needs a (non-transposed) convolution and dim=None")

    @property
    def uses_features(self) -> bool:
        """Whether the registration uses anything only dualsn has."""
        return bool(self.features) or self.track_sigma or self.operator_norm or self.degenerate

    @property
    def feature_kwargs(self) -> dict[str, Any]:
        return dict(self.features)

    @property
    def num_svs(self) -> int:
        return self.feature_kwargs.get("num_svs", 1)

    @property
    def canonical_dim(self) -> int:
        """The non-negative canonical dim actually used."""
        ndim = len(self.layer.weight_shape)
        return self.layer.default_dim if self.dim is None else spec.canonical_dim(self.dim, ndim)

    def spec(self, preset: str) -> spec.Spec:
        if self.operator_norm:  # spectral_norm_conv: its own warm-up (spec.conv_spec)
            return spec.conv_spec(self.n_power_iterations, self.eps, **self.feature_kwargs)
        return spec.make_spec(preset, self.n_power_iterations, self.eps, **self.feature_kwargs)

    def matrix_shape(self) -> tuple[int, int]:
        """(h, w) of the matrix whose largest singular value is estimated (u has h entries)."""
        if self.operator_norm:
            return int(np.prod(self.layer.output_shape()[1:])), int(np.prod(self.layer.input_shapes()[0][1:]))
        return spec.matrix_shape(self.layer.weight_shape, self.canonical_dim)

    def has_uv(self, preset: str) -> bool:
        """False for the exact 1-D case, which keeps no u, v."""
        return not self.spec(preset).is_exact_vector(len(self.layer.weight_shape))


@dataclass
class Grads:
    """What one backward pass reports (canonical layout).

    ``outputs[i]`` is the i-th forward's output, ``inputs[i]`` the gradients of that
    forward's floating-point inputs (an empty list for integer inputs).
    """

    outputs: list[np.ndarray]
    weight: np.ndarray
    bias: np.ndarray | None
    inputs: list[list[np.ndarray]] = field(default_factory=list)


class Instance:
    """One layer with spectral norm applied, in one implementation.

    All arrays are numpy, canonical layout. ``forward``/``backward`` set the layer's mode to
    ``training`` first, so a training-mode call runs the power iteration exactly as the
    implementation does on its own.
    """

    def uv(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Current u, v (None for the exact 1-D case, which has none)."""
        raise NotImplementedError

    def sigma(self) -> np.ndarray:
        """sigma from the current state, without iterating (0-d array)."""
        raise NotImplementedError

    def normalized_weight(self) -> np.ndarray:
        """W / sigma from the current state, without iterating."""
        raise NotImplementedError

    def original_weight(self) -> np.ndarray:
        """The trainable weight (after removal: the plain weight that replaced it)."""
        raise NotImplementedError

    def bias(self) -> np.ndarray | None:
        raise NotImplementedError

    def forward(self, inputs: Sequence[np.ndarray], training: bool) -> np.ndarray:
        """One forward without gradient bookkeeping; returns the output."""
        raise NotImplementedError

    def backward(
        self, batches: Sequence[tuple[Sequence[np.ndarray], np.ndarray, float]], training: bool
    ) -> Grads:
        """Forward every ``(inputs, R, sign)`` batch in order, then ONE backward of
        ``sum_i sign_i * sum(out_i * R_i)``. Gradients are kept for :meth:`sgd_step`."""
        raise NotImplementedError

    def sgd_step(self, lr: float) -> None:
        """weight -= lr * grad and bias -= lr * grad, with the grads of the last backward."""
        raise NotImplementedError

    def save(self) -> Any:
        """The implementation's own state dict, serialized as it would be saved to disk."""
        raise NotImplementedError

    def load(self, saved: Any) -> None:
        """Load what :meth:`save` returned (possibly from another instance)."""
        raise NotImplementedError

    def remove(self) -> None:
        """Remove spectral norm, leaving a plain weight (W / sigma)."""
        raise NotImplementedError

    def has_sn(self) -> bool:
        """Whether spectral-norm state is still attached to the layer."""
        raise NotImplementedError

    def singular_values(self) -> np.ndarray:
        """The ``num_svs`` singular-value estimates u_i^H W v_i from the current state."""
        raise Unsupported("this driver has no several-singular-value estimates")

    def tracked_sigma(self) -> np.ndarray:
        """The sigma the last forward used, as kept by ``track_sigma`` (0-d array)."""
        raise Unsupported("this driver has no track_sigma")


class Driver:
    """Builds :class:`Instance` objects for one implementation.

    ``presets``: the presets this implementation can run. ``requires``: top-level modules that
    must be importable. ``init_from_spec``: True when u0, v0 come from ``spec.init_uv`` (so the
    driver's traces can be compared with the stored golden traces).
    """

    name: str = "?"
    presets: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    init_from_spec: bool = True
    supports_features: bool = False

    def unavailable(self) -> str | None:
        """None if usable, else why not (e.g. the framework is not installed)."""
        for module in self.requires:
            if not importable(module):
                return f"{self.name}: {module} is not installed"
        return None

    def unsupported(self, config: Config, preset: str, primitive: str | None = None) -> str | None:
        """None if the driver can run ``config`` under ``preset`` (and ``primitive``), else why."""
        if preset not in self.presets:
            return f"{self.name} does not implement preset {preset!r}"
        if config.uses_features and not self.supports_features:
            flags = ("track_sigma", "operator_norm", "degenerate")
            used = list(dict(config.features)) + [f for f in flags if getattr(config, f)]
            return f"{self.name} has none of dualsn's opt-in features ({', '.join(used)})"
        if config.operator_norm and preset != spec.CONV_COMPAT:
            return f"the convolution operator norm runs under preset {spec.CONV_COMPAT!r} only"
        return None

    def initial_uv(self, config: Config, preset: str, seed: int):
        """The u0, v0 a registration with ``seed`` starts from (before any iteration), as numpy;
        None for the exact 1-D case."""
        if not config.has_uv(preset):
            return None
        h, w = config.matrix_shape()
        return spec.init_uv(h, w, seed, config.dtype, config.eps)

    def build(
        self, config: Config, preset: str, params: dict[str, np.ndarray], seed: int, training: bool = True
    ) -> Instance:
        """A layer with canonical ``params`` ('weight', optional 'bias'), spectral norm applied
        in ``training`` mode starting from ``initial_uv(config, preset, seed)``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<driver {self.name}>"
