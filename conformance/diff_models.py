"""The models of the differential harness, described once, without any framework.

A :class:`ModelSpec` names its layers (kind, sizes, which carry spectral norm, with which
``dim`` and ``seed``) and its architecture; :data:`FORWARDS` holds each architecture's
forward, written against a tiny ``ops`` interface so that ``backends/_torch_models.py`` and
``backends/_paddle_models.py`` run the very same program. :func:`canonical_params` gives
the one set of numpy parameters (torch layouts) that both frameworks load.

Activations. A float32 run through a kink (ReLU, LeakyReLU) can differ *discretely* between
two correct computations: a pre-activation within rounding of 0 lands on either side, and the
gradient jumps (issue 10: a ReLU input of 6e-8 flipped). So float32 models use a smooth
activation (:meth:`ModelSpec.for_dtype`), float64 models LeakyReLU, whose kink a float64
rounding practically never crosses.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "LAYER_KINDS",
    "PRESETS",
    "Layer",
    "ModelSpec",
    "FORWARDS",
    "sngan_discriminator",
    "resnet",
    "random_stack",
    "canonical_params",
]

LAYER_KINDS = ("linear", "conv1d", "conv2d", "convtranspose2d", "embedding", "batchnorm2d", "scale")
PRESETS = ("torch", "torch_legacy", "paddle")

KINKED_ACTIVATION = "leaky_relu"  # slope 0.2
SMOOTH_ACTIVATION = {"sngan_discriminator": "silu", "resnet": "softplus", "stack": "tanh"}
"""Per architecture, the smooth activation of its float32 runs (all C-infinity: the gradient
penalty differentiates the activation twice, so ELU's jump in f'' would be a kink there)."""


@dataclass(frozen=True)
class Layer:
    """One layer, in torch terms. ``sizes`` follow torch's constructor: linear (in, out);
    conv1d/conv2d/convtranspose2d (in, out, kernel); embedding (num, dim); batchnorm2d (c,);
    scale (n,) (out = x * weight + bias over the last axis: a 1-D weight).

    ``sn``: spectral norm with canonical ``dim`` (None: the layer's default) and ``seed``.
    ``in_shape``: stacks reshape the incoming activation to this per-sample shape first."""

    name: str
    kind: str
    sizes: tuple[int, ...]
    stride: int = 1
    padding: int = 0
    sn: bool = True
    dim: int | None = None
    seed: int = 0
    in_shape: tuple[int, ...] | None = None
    operator_input: tuple[int, ...] | None = None
    """Register with ``spectral_norm_conv(input_shape=operator_input)`` (one sample's input):
    the convolution's operator norm, under its own preset (``dualsn.spec.conv_spec``)."""

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"unknown layer kind {self.kind!r}; expected one of {LAYER_KINDS}")

    @property
    def weight_shape(self) -> tuple[int, ...]:
        k, s = self.kind, self.sizes
        if k == "linear":
            return (s[1], s[0])
        if k == "conv1d":
            return (s[1], s[0], s[2])
        if k == "conv2d":
            return (s[1], s[0], s[2], s[2])
        if k == "convtranspose2d":
            return (s[0], s[1], s[2], s[2])
        if k == "embedding":
            return (s[0], s[1])
        return (s[0],)  # batchnorm2d, scale

    @property
    def bias_shape(self) -> tuple[int, ...] | None:
        if self.kind == "embedding":
            return None
        if self.kind in ("batchnorm2d", "scale"):
            return (self.sizes[0],)
        return (self.sizes[1],)

    def describe(self) -> str:
        sizes = "x".join(map(str, self.sizes))
        extra = f",s{self.stride}" if self.stride != 1 else ""
        sn = "" if not self.sn else (" sn" if self.dim is None else f" sn(dim={self.dim})")
        sn = " sn(operator)" if self.sn and self.operator_input else sn
        return f"{self.kind}[{sizes}{extra}]{sn}"


@dataclass(frozen=True)
class ModelSpec:
    """A model: its architecture (a key of :data:`FORWARDS`), layers, inputs and preset.

    Inputs per sample: a float array of ``input_shape``, or with ``integer_input`` > 0 an
    integer array of ``input_shape`` with values below it (an embedding first); with
    ``num_classes`` > 0 also a class label (the projection discriminator's y). The output is
    [batch, output_size]."""

    name: str
    arch: str
    layers: tuple[Layer, ...]
    input_shape: tuple[int, ...]
    output_size: int
    preset: str = "torch"
    activation: str = KINKED_ACTIVATION
    integer_input: int = 0
    num_classes: int = 0
    batch: int = 4

    def for_dtype(self, dtype: str) -> "ModelSpec":
        """This model with the activation its ``dtype`` runs use (see the module docstring)."""
        activation = SMOOTH_ACTIVATION[self.arch] if dtype == "float32" else KINKED_ACTIVATION
        return dataclasses.replace(self, activation=activation)

    def with_preset(self, preset: str) -> "ModelSpec":
        return dataclasses.replace(self, preset=preset)

    @property
    def sn_layers(self) -> tuple[Layer, ...]:
        return tuple(layer for layer in self.layers if layer.sn)

    @property
    def has_float_input(self) -> bool:
        return not self.integer_input

    def describe(self) -> str:
        return f"{self.name}[{self.preset}, {self.activation}]"


def _discriminator_forward(spec: ModelSpec, layers, ops, x, y):
    """SN-GAN-style projection discriminator: conv, strided conv, BatchNorm, (ConvTranspose),
    global sum pooling, a 1-D scale under spectral norm, and the projection
    (fc(h) * emb(y)).sum(1)."""
    h = ops.act(layers["conv1"](x))
    h = ops.act(layers["bn"](layers["conv2"](h)))
    if "up" in layers:
        h = ops.act(layers["up"](h))
    h = layers["scale"](ops.sum(h, (2, 3)))
    return ops.sum(layers["fc"](h) * layers["emb"](y), (1,), keepdim=True)


def _resnet_forward(spec: ModelSpec, layers, ops, x):
    """One residual block (conv-act-conv plus a 1x1 conv shortcut), then a linear head."""
    h = layers["conv_b"](ops.act(layers["conv_a"](x)))
    h = ops.act(h + layers["shortcut"](x))
    return layers["head"](ops.flatten(h))


def _stack_forward(spec: ModelSpec, layers, ops, x):
    """The layers in order, each input reshaped to the layer's ``in_shape``, an activation
    between layers, the last output flattened."""
    last = len(spec.layers) - 1
    for i, layer in enumerate(spec.layers):
        if layer.in_shape is not None:
            x = ops.reshape(x, (-1,) + layer.in_shape)
        x = layers[layer.name](x)
        if i < last:
            x = ops.act(x)
    return ops.flatten(x)


FORWARDS: dict[str, Callable] = {
    "sngan_discriminator": _discriminator_forward,
    "resnet": _resnet_forward,
    "stack": _stack_forward,
}
"""arch -> forward(spec, layers: name -> callable layer, ops, *inputs). ``ops`` provides
act(h) (the spec's activation), sum(h, axes, keepdim=False), reshape(h, shape), flatten(h)."""


# ---------------------------------------------------------------------------------------------
# The fixed models.


def sngan_discriminator(preset: str = "torch", transposed_conv: bool = True) -> ModelSpec:
    """The projection discriminator on 2x6x6 images with 3 classes.

    ``transposed_conv=False`` drops the ConvTranspose2d: Paddle 3.3 has no double backward
    for conv2d_transpose (``paddle.grad(..., create_graph=True)`` through it fails with
    "Unable to fill empty grad inputs"), so the gradient-penalty pattern uses this variant in
    both frameworks."""
    layers = [
        Layer("conv1", "conv2d", (2, 4, 3), padding=1, seed=11),
        # the strided conv's bias feeds BatchNorm, so its gradient is ~0 (rounding noise):
        # kept on purpose, the gradient norms' floor handles it
        Layer("conv2", "conv2d", (4, 5, 3), stride=2, padding=1, seed=12),
        Layer("bn", "batchnorm2d", (5,), sn=False),
    ]
    if transposed_conv:
        layers.append(Layer("up", "convtranspose2d", (5, 4, 2), seed=13))  # dim 1 by default
    width = 4 if transposed_conv else 5
    layers += [
        # 1-D weight: exact W / ||W|| under "torch", an n x 1 matrix under the other presets
        Layer("scale", "scale", (width,), seed=14),
        Layer("fc", "linear", (width, 3), seed=15),  # paddle.nn.Linear: dim 1 by default
        Layer("emb", "embedding", (3, 3), seed=16),
    ]
    name = "sngan_discriminator" if transposed_conv else "sngan_discriminator_no_convtranspose"
    return ModelSpec(
        name=name,
        arch="sngan_discriminator",
        layers=tuple(layers),
        input_shape=(2, 6, 6),
        output_size=1,
        preset=preset,
        num_classes=3,
    )


def resnet(preset: str = "torch") -> ModelSpec:
    """A residual block on 3x5x5 images with a 1x1 conv shortcut, all under spectral norm (the
    first conv by its operator norm, spectral_norm_conv), and a linear head with an explicit
    negative dim."""
    layers = (
        Layer("conv_a", "conv2d", (3, 4, 3), padding=1, seed=21, operator_input=(3, 5, 5)),
        Layer("conv_b", "conv2d", (4, 4, 3), padding=1, dim=-4, seed=22),  # = dim 0, spelled negative
        Layer("shortcut", "conv2d", (3, 4, 1), seed=23),
        Layer("head", "linear", (4 * 5 * 5, 2), dim=-2, seed=24),  # canonical dim 0 (out)
    )
    return ModelSpec(
        name="resnet", arch="resnet", layers=layers, input_shape=(3, 5, 5), output_size=2, preset=preset
    )


# ---------------------------------------------------------------------------------------------
# Random stacks.


def _as_rank(shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    """``shape`` reshaped to ``rank`` axes: flattened, or channels first with unit axes added."""
    if rank == 1:
        return (int(np.prod(shape)),)
    if len(shape) == 1:
        shape = (1,) + shape
    if len(shape) > rank:
        return shape[:1] + (int(np.prod(shape[1:])),)
    return shape + (1,) * (rank - len(shape))


def _stack_layer(choose, index: int, shape: tuple[int, ...]) -> tuple[Layer, tuple[int, ...]]:
    """A random layer taking per-sample ``shape`` (reshaped to the layer's rank first);
    returns it and its per-sample output shape."""
    kind = choose(("linear", "conv1d", "conv2d", "convtranspose2d"))
    rank = {"linear": 1, "conv1d": 2, "conv2d": 3, "convtranspose2d": 3}[kind]
    in_shape = _as_rank(shape, rank)
    name, channels = f"l{index}", in_shape[0]
    if kind == "linear":
        out = choose((1, 2, 3, 4))
        return Layer(name, kind, (channels, out), in_shape=in_shape), (out,)
    out = choose((1, 2, 3))
    if kind == "convtranspose2d":
        kernel = choose((2, 3))
        layer = Layer(name, kind, (channels, out, kernel), in_shape=in_shape)
        return layer, (out,) + tuple(n + kernel - 1 for n in in_shape[1:])
    # kernel 3 for a 1-in 1-out conv: with kernel 1 its weight would have a single entry,
    # which spectral norm turns into a constant (see _normalizable)
    kernel = choose((1, 3)) if channels * out > 1 else 3
    stride = choose((1, 2))
    padding = kernel // 2
    layer = Layer(name, kind, (channels, out, kernel), stride=stride, padding=padding, in_shape=in_shape)
    return layer, (out,) + tuple((n + 2 * padding - kernel) // stride + 1 for n in in_shape[1:])


def random_stack(choose: Callable[[Sequence], object], label: str = "stack") -> ModelSpec:
    """A small random stack, every decision made by ``choose(options) -> one option`` (a
    hypothesis draw in the tests, a seeded numpy generator in
    :func:`conformance.differential.numpy_stacks`).

    Layers among linear/conv1d/conv2d/convtranspose2d, optionally an embedding first; which
    carry spectral norm (at least one), their dims (default, or explicit incl. negative), and
    the preset are drawn too."""
    preset = choose(PRESETS)
    layers: list[Layer] = []
    integer_input = 0
    if choose((False, True)):  # an embedding first: integer input [batch, length]
        integer_input, length = choose((3, 5)), choose((2, 3))
        input_shape = (length,)
        layers.append(Layer("l0", "embedding", (integer_input, choose((2, 3)))))
        shape = (length, layers[0].sizes[1])
    else:
        input_shape = choose(((5,), (2, 4), (2, 3, 3)))
        shape = input_shape
    for _ in range(choose((1, 2, 3))):
        layer, shape = _stack_layer(choose, len(layers), shape)
        layers.append(layer)
    layers = [_with_random_sn(choose, layer, i) for i, layer in enumerate(layers)]
    if not any(layer.sn for layer in layers):
        last = max(i for i, layer in enumerate(layers) if _normalizable(layer))  # the first is
        layers[last] = dataclasses.replace(layers[last], sn=True)
    return ModelSpec(
        name=f"{label}(" + " > ".join(layer.describe() for layer in layers) + ")",
        arch="stack",
        layers=tuple(layers),
        input_shape=input_shape,
        output_size=int(np.prod(shape)),
        preset=preset,
        integer_input=integer_input,
    )


def _normalizable(layer: Layer) -> bool:
    """False for a single-entry weight: W / sigma is then the constant sign(W), whose gradient
    is identically zero, so every implementation returns rounding noise (a cancellation of
    two terms ~ G / sigma), and comparing noise with noise measures nothing."""
    return int(np.prod(layer.weight_shape)) > 1


def _with_random_sn(choose, layer: Layer, index: int) -> Layer:
    ndim = len(layer.weight_shape)
    dim = choose((None,) + tuple(range(-ndim, ndim)))
    sn = choose((True, False)) and _normalizable(layer)
    return dataclasses.replace(layer, sn=sn, dim=dim, seed=100 + index)


# ---------------------------------------------------------------------------------------------
# Parameters.


def _seed_of(spec: ModelSpec) -> int:
    """A stable seed per architecture and layer layout (not per preset or activation: the
    same weights under every preset)."""
    key = spec.arch + "|" + "|".join(f"{l.name}:{l.kind}:{l.sizes}" for l in spec.layers)
    return zlib.crc32(key.encode())


def canonical_params(spec: ModelSpec, dtype: str) -> dict[str, np.ndarray]:
    """The model's parameters, torch layouts, keyed like torch's ``named_parameters`` of the
    plain model ("conv1.weight"), rounded to ``dtype`` and returned as float64 arrays: a
    float32 model and its float64 reference start from exactly the same values."""
    rng = np.random.default_rng(_seed_of(spec))
    params: dict[str, np.ndarray] = {}
    for layer in spec.layers:
        shape = layer.weight_shape
        if layer.kind in ("batchnorm2d", "scale"):
            weight = 1.0 + 0.3 * rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape)) // shape[0 if layer.kind != "convtranspose2d" else 1]
            weight = rng.standard_normal(shape) / np.sqrt(fan_in)
        params[f"{layer.name}.weight"] = weight
        if layer.bias_shape is not None:
            params[f"{layer.name}.bias"] = 0.1 * rng.standard_normal(layer.bias_shape)
    return {name: a.astype(dtype).astype(np.float64) for name, a in params.items()}
