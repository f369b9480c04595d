"""The conformance case table and the data each case runs on.

Every case is run by every driver under every preset the driver has. The table is not a
cartesian product; it covers each layer kind (Linear, paddle.compat.nn.Linear, Conv1d/2d/3d,
ConvTranspose1d/2d/3d, Embedding, Bilinear, a 1-D weight), default, explicit and negative dims,
``n_power_iterations`` 1 and 3, ``eps`` 1e-12 and 1e-4 (with "tiny" weights whose largest
singular value is below eps, so eps changes every normalization), float32 and float64,
dualsn's opt-in features (``Config.features``, ``track_sigma``, the convolution operator norm),
and all-zero weights (``Config.degenerate``).

All data (weights, biases, inputs, upstream gradients R) is drawn from numpy's PCG64 seeded
with the case's seed, which is derived from the case id, so adding or reordering cases
changes no other case's data.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from backends.base import Config, LayerSpec
from dualsn import spec

__all__ = ["Case", "CASES", "CASES_BY_ID", "LR", "params", "inputs", "upstream"]

LR = 0.05
"""SGD learning rate of the training sequences (scaled per case: :attr:`Case.lr`)."""


@dataclass(frozen=True)
class Case:
    """One row of the table: an id, the registration :class:`Config`, and ``sigma_max``: when
    set, the weight is rescaled so the largest singular value of its W-matrix is exactly this
    (used for the cases where eps matters)."""

    id: str
    config: Config
    sigma_max: float | None = None

    @property
    def lr(self) -> float:
        """The SGD learning rate. Gradients through W / sigma scale like 1 / sigma, so with
        weights of scale s an SGD step of LR * s**2 changes them by a few percent, as LR does
        for unit-scale weights. (An unscaled step would blow tiny weights up by 1e7, and the
        next sigma would come out of catastrophic cancellation: ill-conditioned, not a test.)"""
        return LR if self.sigma_max is None else LR * self.sigma_max**2

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())

    @property
    def dtype(self) -> str:
        return self.config.dtype


def _case(
    id: str, kind: str, sizes, *, dim=None, n=1, eps=1e-12, dtype="float32", length=4, sigma_max=None,
    track_sigma=False, operator_norm=False, degenerate=False, **features
):
    layer = LayerSpec(kind, tuple(sizes), length=length)
    features = tuple(sorted(features.items()))
    config = Config(layer, dim, n, eps, dtype, features, track_sigma, operator_norm, degenerate)
    return Case(id, config, sigma_max)


LIN, CONV1, CONV2, CONV3 = (5, 4), (2, 3, 2), (2, 3, 2), (2, 2, 2)
TCONV1, TCONV2, TCONV3 = (3, 2, 2), (2, 3, 2), (2, 2, 2)
EMB, BIL, VEC = (6, 4), (3, 4, 2), (5,)
TINY = 0.9e-4  # largest singular value just under eps=1e-4: eps acts, yet u, v shrink slowly

CASES: tuple[Case, ...] = (
    # Linear (paddle.nn.Linear on the Paddle side: weight [in, out], dims mapped)
    _case("linear-f32", "linear", LIN),
    _case("linear-f64", "linear", LIN, dtype="float64"),
    _case("linear-dim1-f64", "linear", LIN, dim=1, dtype="float64"),
    _case("linear-dimneg1-f32", "linear", LIN, dim=-1),
    _case("linear-dimneg2-f64", "linear", LIN, dim=-2, dtype="float64"),
    _case("linear-n3-f32", "linear", LIN, n=3),
    _case("linear-eps1e-4-f64", "linear", LIN, eps=1e-4, dtype="float64"),
    _case("linear-tiny-eps1e-4-f64", "linear", LIN, eps=1e-4, dtype="float64", sigma_max=TINY),
    _case("linear-tiny-eps1e-4-f32", "linear", LIN, eps=1e-4, sigma_max=TINY),
    # paddle.compat.nn.Linear on the Paddle side (torch layout [out, in])
    _case("linear_compat-f32", "linear_compat", LIN),
    _case("linear_compat-dim1-f64", "linear_compat", LIN, dim=1, dtype="float64"),
    _case("linear_compat-dimneg1-n3-f32", "linear_compat", LIN, dim=-1, n=3),
    # convolutions
    _case("conv1d-f32", "conv1d", CONV1),
    _case("conv1d-dim1-f64", "conv1d", CONV1, dim=1, dtype="float64"),
    _case("conv1d-dimneg1-n3-f64", "conv1d", CONV1, dim=-1, n=3, dtype="float64"),
    _case("conv2d-f32", "conv2d", CONV2, length=3),
    _case("conv2d-dim1-n3-f64", "conv2d", CONV2, dim=1, n=3, dtype="float64", length=3),
    _case("conv2d-dimneg3-eps1e-4-f32", "conv2d", CONV2, dim=-3, eps=1e-4, length=3),
    _case("conv3d-f64", "conv3d", CONV3, dtype="float64", length=3),
    _case("conv3d-dim2-f32", "conv3d", CONV3, dim=2, length=3),
    # transposed convolutions (default dim 1)
    _case("convtranspose1d-f32", "convtranspose1d", TCONV1, length=3),
    _case("convtranspose1d-dim0-f64", "convtranspose1d", TCONV1, dim=0, dtype="float64", length=3),
    _case("convtranspose2d-f64", "convtranspose2d", TCONV2, dtype="float64", length=2),
    _case("convtranspose2d-dimneg4-n3-f32", "convtranspose2d", TCONV2, dim=-4, n=3, length=2),
    _case("convtranspose3d-f32", "convtranspose3d", TCONV3, length=2),
    _case("convtranspose3d-dimneg1-f64", "convtranspose3d", TCONV3, dim=-1, dtype="float64", length=2),
    # embedding
    _case("embedding-f32", "embedding", EMB),
    _case("embedding-dim1-f64", "embedding", EMB, dim=1, dtype="float64"),
    _case("embedding-n3-tiny-eps1e-4-f64", "embedding", EMB, n=3, eps=1e-4, dtype="float64", sigma_max=TINY),
    # bilinear (Paddle's bias is [1, out])
    _case("bilinear-f32", "bilinear", BIL),
    _case("bilinear-dim2-f64", "bilinear", BIL, dim=2, dtype="float64"),
    _case("bilinear-dimneg1-n3-f32", "bilinear", BIL, dim=-1, n=3),
    # a 1-D weight: exact normalization under "torch", an n x 1 matrix otherwise
    _case("vector-f32", "vector", VEC),
    _case("vector-n3-f64", "vector", VEC, n=3, dtype="float64"),
    _case("vector-eps1e-4-f32", "vector", VEC, eps=1e-4),
    _case("vector-eps1e-4-f64", "vector", VEC, eps=1e-4, dtype="float64"),
    _case("vector-tiny-eps1e-4-f64", "vector", VEC, eps=1e-4, dtype="float64", sigma_max=TINY),
    _case("vector-dimneg1-f32", "vector", VEC, dim=-1),
    # dualsn's opt-in features (no built-in has them): the soft bound coeff (active and not),
    # iterating until sigma settles, several singular values
    # the tracked sigma buffer (track_sigma=True), with a W-matrix and with an exact 1-D norm
    _case("linear-track_sigma-f32", "linear", LIN, track_sigma=True),
    _case("vector-track_sigma-f64", "vector", VEC, dtype="float64", track_sigma=True),
    # the convolution operator norm (spectral_norm_conv; preset spec.CONV_COMPAT only): the
    # reference runs on the explicit convolution matrix
    _case("conv1d-opnorm-f32", "conv1d", CONV1, operator_norm=True),
    _case("conv2d-opnorm-n3-f64", "conv2d", CONV2, n=3, dtype="float64", length=3, operator_norm=True),
    _case(
        "conv2d-opnorm-coeff0.5-track_sigma-f32", "conv2d", CONV2, length=3, coeff=0.5, track_sigma=True,
        operator_norm=True,
    ),
    _case("linear-coeff0.5-f64", "linear", LIN, dtype="float64", coeff=0.5),
    _case("conv2d-coeff50-f32", "conv2d", CONV2, length=3, coeff=50.0),
    _case("vector-coeff0.3-f64", "vector", VEC, dtype="float64", coeff=0.3),
    _case("linear-rtol1e-6-f64", "linear", LIN, dtype="float64", rtol=1e-6, max_iterations=40),
    _case("conv1d-atol1e-3-n2-f32", "conv1d", CONV1, n=2, atol=1e-3, max_iterations=30),
    _case("linear-svs3-f64", "linear", LIN, dtype="float64", num_svs=3),
    _case("convtranspose2d-svs2-coeff0.8-f32", "convtranspose2d", TCONV2, length=2, num_svs=2, coeff=0.8),
    # all-zero weights, where dualsn deliberately differs from the built-ins (they give NaN):
    # W / eps = 0, gradient G / eps, u, v = spec.recovery_uv
    # (weights near the top of the range are tests/test_degenerate_weights.py's: the sequences'
    # SGD rate LR * sigma^2 would overflow the biases)
    _case("linear-zero-f32", "linear", LIN, sigma_max=0.0, degenerate=True),
    _case("conv2d-zero-f64", "conv2d", CONV2, length=3, dtype="float64", sigma_max=0.0, degenerate=True),
    _case("convtranspose1d-zero-f32", "convtranspose1d", TCONV1, sigma_max=0.0, degenerate=True),
    _case("vector-zero-f64", "vector", VEC, dtype="float64", sigma_max=0.0, degenerate=True),
)

CASES_BY_ID = {case.id: case for case in CASES}
assert len(CASES_BY_ID) == len(CASES), "duplicate case id"


def _rng(case: Case, stream: int, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([case.seed, stream, index]))


def params(case: Case, variant: int = 0) -> dict[str, np.ndarray]:
    """Canonical weight and bias. ``variant`` 1 is a different layer of the same shape (the
    freshly built layer a state dict is loaded into)."""
    layer = case.config.layer
    rng = _rng(case, 1, variant)
    shape = layer.weight_shape
    fan_in = max(1, int(np.prod(shape)) // shape[0])
    weight = rng.standard_normal(shape) / np.sqrt(fan_in)
    if case.sigma_max is not None:
        top = np.linalg.svd(spec.to_matrix(weight, case.config.canonical_dim), compute_uv=False)[0]
        weight *= case.sigma_max / top  # (exactly zero for sigma_max = 0)
    out = {"weight": weight.astype(case.dtype)}
    if layer.bias_shape is not None:
        out["bias"] = (0.1 * rng.standard_normal(layer.bias_shape)).astype(case.dtype)
    return out


def inputs(case: Case, index: int) -> list[np.ndarray]:
    """The ``index``-th batch of forward inputs (embedding: int64 indices)."""
    layer = case.config.layer
    rng = _rng(case, 2, index)
    if layer.integer_input:
        return [rng.integers(0, layer.sizes[0], size=s, dtype=np.int64) for s in layer.input_shapes()]
    return [rng.standard_normal(s).astype(case.dtype) for s in layer.input_shapes()]


def upstream(case: Case, index: int) -> np.ndarray:
    """R of the loss sum(out * R): the ``index``-th fixed upstream gradient dL/dout."""
    return _rng(case, 3, index).standard_normal(case.config.layer.output_shape()).astype(case.dtype)
