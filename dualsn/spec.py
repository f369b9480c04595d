"""The dualsn spectral-normalization algorithm's rules, defined once.

Every backend (``dualsn.torch``, ``dualsn.paddle``) and every conformance driver takes its
rules from this module: the presets and defaults, the shapes and ``dim`` semantics, the
iteration order, the norm-range rules and the seeded initialization of u and v. The numpy
reference that follows these rules is :mod:`dualsn.reference`; argument checks are in
:mod:`dualsn.options`, the Linear layout and default-dim rule in :mod:`dualsn.layout`, the
norm-range rules in :mod:`dualsn.norms` (re-exported here). This
module imports numpy and nothing else: no framework.

Notation. The weight ``W`` is a tensor; ``dim`` is its output-features axis. The *W-matrix* is
``W`` with ``dim`` moved to the front and the other axes flattened, shape ``(h, w)``. ``u`` has
``h`` entries, ``v`` has ``w``. ``N(x) = x / max(||x||, eps)``, as ``F.normalize`` does in both
frameworks. ``sigma = u^H W v`` with ``u`` and ``v`` held constant (no gradient through them),
and the normalized weight is ``W / sigma``.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from dataclasses import dataclass

import numpy as np

from dualsn.layout import DEFAULT_DIM_1_LAYERS, default_dim
from dualsn.norms import check_finite_sigma, init_dtype, normalize, plain_norm_trusted, safe_norm, underflow_threshold
from dualsn.options import (
    ORDERS,
    VECTOR_MODES,
    ArgumentTypeError,
    DimOutOfRangeError,
    ParameterNotFoundError,
    check_name,
    check_num_svs,
    check_seed,
    check_spec_fields,
    is_int,
    require_type,
)

__all__ = [
    "Spec",
    "PRESETS",
    "ORDERS",
    "VECTOR_MODES",
    "DEFAULT_EPS",
    "DEFAULT_DIM_1_LAYERS",
    "make_spec",
    "default_dim",
    "resolve_dim",
    "in_order",
    "init_dtype",
    "canonical_dim",
    "check_weight_shape",
    "matrix_shape",
    "to_matrix",
    "from_matrix",
    "normalize",
    "init_uv",
    "LOW_PRECISION_DTYPES",
    "init_extra_uv",
    "manual_seed",
    "next_seed",
    "ArgumentTypeError",
    "DimOutOfRangeError",
    "ParameterNotFoundError",
    "check_name",
    "check_num_svs",
    "safe_norm",
    "underflow_threshold",
    "plain_norm_trusted",
    "recovery_uv",
    "check_finite_sigma",
    "conv_spec",
]

DEFAULT_EPS = 1e-12
"""The ``eps`` of N(x) = x / max(||x||, eps) when the user gives none (as in every built-in)."""


def in_order(order: str, update_u, update_v):
    """One power iteration's two half-steps in ``order`` (:data:`ORDERS`): "uv" calls
    ``update_u()`` (u <- N(W v)) and then ``update_v()`` (v <- N(W^H u)); "vu" the other way
    round. Returns what the second call returns (the implementations return the unnormalized
    vector or its norm, the sigma estimate). Every implementation runs its steps through this,
    so the order is decided here only."""
    if order == "uv":
        update_u()
        return update_v()
    update_v()
    return update_u()


@dataclass(frozen=True)
class Spec:
    """One complete choice of the algorithm's free parameters.

    ``warmup_iterations`` power iterations run once at registration. When
    ``registration_forward`` is true, registration then evaluates the normalized weight once
    in the module's current mode, which in training mode runs ``n_power_iterations`` more:
    that is what ``torch.nn.utils.parametrize.register_parametrization`` does when it checks
    the parametrization, so the torch built-in ends registration 15 + 1 iterations from its
    initial draw (15 if the module is in eval mode).

    Opt-in features no built-in has (every preset leaves them off):
    ``coeff``: soft bound, the weight is divided by max(1, sigma / coeff) (:meth:`divisor`),
    so its norm is at most ``coeff``; ``atol``/``rtol``: training forwards iterate until the
    sigma estimate settles, at most ``max_iterations`` (:func:`training_iterations`);
    ``num_svs``: that many (u, v) pairs, Gram-Schmidt orthogonalized, estimate the largest
    singular values for monitoring (:func:`power_step`); only the first normalizes.
    """

    n_power_iterations: int = 1
    eps: float = DEFAULT_EPS
    order: str = "uv"
    warmup_iterations: int = 15
    registration_forward: bool = True
    vector_mode: str = "exact"
    coeff: float | None = None
    atol: float | None = None
    rtol: float | None = None
    max_iterations: int = 100
    num_svs: int = 1

    def __post_init__(self) -> None:
        check_spec_fields(self)

    @property
    def uses_tolerance(self) -> bool:
        """True when training forwards iterate until sigma settles (``atol``/``rtol`` given)."""
        return self.atol is not None or self.rtol is not None

    def settled(self, previous_sigma: float, sigma: float) -> bool:
        """Whether two successive sigma estimates agree within ``atol + rtol * |sigma|``."""
        tolerance = (self.atol or 0.0) + (self.rtol or 0.0) * abs(sigma)
        return abs(sigma - previous_sigma) <= tolerance

    def divisor(self, sigma):
        """What the weight is divided by: sigma, or with ``coeff`` the soft bound
        max(1, sigma / coeff), so the normalized weight's norm is at most ``coeff``.
        The bound is active when Re(sigma) > coeff; then the divisor is sigma / coeff.

        Without ``coeff``, a sigma of exactly zero (an all-zero or underflowed W) is
        replaced by eps, as a zero norm is in N(x): W / eps = 0, whose gradient is G / eps,
        where the built-ins divide 0 by 0 and give NaN. Every other sigma is kept as the
        built-ins keep it (a tiny or negative one of a fresh, un-warmed u, v included)."""
        if self.coeff is None:
            return self.eps if self.sigma_floored(sigma) else sigma
        return 1.0 if self.bound_inactive(sigma) else sigma / self.coeff

    def bound_inactive(self, sigma) -> bool:
        """True when ``coeff``'s soft bound leaves the weight as it is: Re(sigma) <= coeff, so
        the divisor is 1 and the gradient passes unchanged (False without ``coeff``)."""
        return self.coeff is not None and not np.real(sigma) > self.coeff

    def run_training_iterations(self, step) -> int:
        """The power iterations of one training forward, each done by ``step()``, which returns
        its sigma estimate (None where the caller does not read it); returns how many ran.

        Fixed count: ``n_power_iterations``. With ``atol``/``rtol``: at least
        ``n_power_iterations`` and at least 2, stopping after the first iteration whose
        estimate settled against the previous one (:meth:`settled`), at most
        ``max_iterations``."""
        if not self.uses_tolerance:
            for _ in range(self.n_power_iterations):
                step()
            return self.n_power_iterations
        previous = None
        count = 0
        while count < self.max_iterations:
            estimate = step()
            count += 1
            if count >= self.n_power_iterations and None not in (previous, estimate) and self.settled(previous, estimate):
                break
            previous = estimate
        return count

    def sigma_floored(self, sigma) -> bool:
        """True when :meth:`divisor` replaces sigma by eps (no ``coeff``, sigma == 0)."""
        return self.coeff is None and sigma == 0

    def registration_iterations(self, training: bool) -> int:
        """Power iterations run at registration, from the initial draw of u and v."""
        extra = self.n_power_iterations if (self.registration_forward and training) else 0
        return self.warmup_iterations + extra

    def is_exact_vector(self, ndim: int) -> bool:
        """True when a weight of this rank is normalized exactly and keeps no u, v state."""
        return ndim == 1 and self.vector_mode == "exact"

    def replace(self, **changes) -> "Spec":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, Spec] = {
    # torch.nn.utils.parametrizations.spectral_norm
    "torch": Spec(order="uv", warmup_iterations=15, registration_forward=True, vector_mode="exact"),
    # torch.nn.utils.spectral_norm (the older forward-pre-hook)
    "torch_legacy": Spec(
        order="vu", warmup_iterations=0, registration_forward=False, vector_mode="matrix"
    ),
    # paddle.nn.utils.spectral_norm
    "paddle": Spec(order="vu", warmup_iterations=0, registration_forward=False, vector_mode="matrix"),
}
"""Compat presets. Each equals the named built-in's algorithm exactly (u, v init aside)."""

ALGORITHM_FIELDS = ("order", "warmup_iterations", "registration_forward", "vector_mode")
"""The Spec fields a preset fixes; the others are the user's (n, eps) or opt-in features."""

LEGACY_PRESETS = ("torch_legacy", "paddle")
"""Two names of one algorithm (v first, no warm-up, 1-D weights as matrices): a port between
them is no mismatch."""


def matching_presets(spec: Spec) -> list[str]:
    """The :data:`PRESETS` whose algorithm ``spec`` follows (n, eps and features aside)."""
    return [name for name, preset in PRESETS.items()
            if all(getattr(preset, k) == getattr(spec, k) for k in ALGORITHM_FIELDS)]


def preset_for_order(order, framework: str) -> str:
    """The preset a spectral norm's state depends on, known from its update ``order`` only:
    ``"torch"`` for u first, else the legacy order, named after ``framework`` (``"torch_legacy"``
    in torch, ``"paddle"`` in Paddle); ``"custom"`` for anything else."""
    if order == "uv":
        return "torch"
    if order == "vu":
        return "torch_legacy" if framework == "torch" else "paddle"
    return "custom"


def same_algorithm(preset_a: str, preset_b: str) -> bool:
    """Whether two preset names name one algorithm (:data:`LEGACY_PRESETS` are one)."""
    return preset_a == preset_b or {preset_a, preset_b} <= set(LEGACY_PRESETS)


DEFAULT_COMPAT = "torch"

CONV_COMPAT = "torch_legacy"
"""The preset of the convolution operator norm (``spectral_norm_conv``): i-ResNet's order,
v <- N(conv^T u) then u <- N(conv v). There u lives in the layer's output activation space
and v in its input space: the W-matrix is the explicit convolution matrix."""

CONV_WARMUP_ITERATIONS = 50
"""Power iterations ``spectral_norm_conv`` runs at registration (the input shape is known
then), so sigma is right from the first forward: within 1% of the exact operator norm on
typical GAN convolutions (3-64 channels, 3x3/4x4 kernels, 8x8-16x16 inputs; 2e-3 after 100).
Each costs one convolution and one transposed convolution of a single sample."""


def conv_spec(n_power_iterations: int = 1, eps: float = DEFAULT_EPS, **features) -> "Spec":
    """The Spec of ``spectral_norm_conv``: :data:`CONV_COMPAT` with
    :data:`CONV_WARMUP_ITERATIONS` at registration, and the user's settings."""
    return make_spec(CONV_COMPAT, n_power_iterations, eps, **features).replace(
        warmup_iterations=CONV_WARMUP_ITERATIONS
    )

def make_spec(
    compat: str = DEFAULT_COMPAT, n_power_iterations: int = 1, eps: float = DEFAULT_EPS, **features
) -> Spec:
    """The preset ``compat`` with the user's ``n_power_iterations`` and ``eps``, plus any of
    the opt-in features no built-in has: ``coeff``, ``atol``, ``rtol``, ``max_iterations``,
    ``num_svs`` (see :class:`Spec`).

    Raises :class:`ArgumentTypeError` (a TypeError) naming the argument for a wrong type, and
    ValueError for an unknown preset or a bad value.
    """
    require_type("compat", compat, isinstance(compat, str), "a str")
    if compat not in PRESETS:
        raise ValueError(
            f"Expected compat to be one of {tuple(PRESETS)}, but got compat={compat!r}"
        )
    unknown = sorted(set(features) - set(FEATURES))
    if unknown:
        raise TypeError(f"make_spec() got unexpected keyword argument(s) {unknown}; allowed: {FEATURES}")
    return PRESETS[compat].replace(n_power_iterations=n_power_iterations, eps=eps, **features)


FEATURES = ("coeff", "atol", "rtol", "max_iterations", "num_svs")
"""Spec fields that are opt-in features beyond the built-ins (all presets default them off)."""


# ---------------------------------------------------------------------------------------------
# Shapes and dim semantics


def canonical_dim(dim: int, ndim: int) -> int:
    """``dim`` as a non-negative axis of a rank-``ndim`` weight; IndexError if out of range."""
    require_type("dim", dim, is_int(dim), "an int or None")
    low = -max(ndim, 1)
    high = max(ndim, 1) - 1
    if not low <= dim <= high:
        raise DimOutOfRangeError(
            f"Dimension out of range (expected dim to be in range of [{low}, {high}] "
            f"for a weight with {ndim} dimension(s), but got dim={dim})"
        )
    return int(dim) % max(ndim, 1)


def resolve_dim(dim, is_dim_1_layer: bool, ndim: int) -> int:
    """The ``dim`` a spectral norm uses: the user's, or :func:`dualsn.layout.default_dim`
    for None; as a non-negative axis (:func:`canonical_dim`)."""
    return canonical_dim(default_dim(is_dim_1_layer, ndim) if dim is None else dim, ndim)


def check_weight_shape(shape: tuple[int, ...], name: str = "weight") -> None:
    """ValueError for weights spectral norm cannot handle: scalars and zero-size axes."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        raise ValueError(f"Expected parameter {name!r} to have at least 1 dimension, but it is a scalar")
    if any(s == 0 for s in shape):
        raise ValueError(
            f"Expected parameter {name!r} to have no zero-size axis, but its shape is {list(shape)}"
        )


def matrix_shape(weight_shape: tuple[int, ...], dim: int) -> tuple[int, int]:
    """(h, w) of the W-matrix: ``dim`` moved to the front, the rest flattened.

    A 1-D weight is an (n x 1) matrix.
    """
    shape = tuple(int(s) for s in weight_shape)
    dim = canonical_dim(dim, len(shape))
    return shape[dim], int(np.prod(shape[:dim] + shape[dim + 1 :], dtype=np.int64))


def permutation(ndim: int, dim: int) -> tuple[int, ...]:
    """The axis order that moves ``dim`` to the front and keeps the others in order."""
    dim = canonical_dim(dim, ndim)
    return (dim,) + tuple(d for d in range(ndim) if d != dim)


def to_matrix(weight: np.ndarray, dim: int) -> np.ndarray:
    """The W-matrix of a numpy weight."""
    h, w = matrix_shape(weight.shape, dim)
    return np.transpose(weight, permutation(weight.ndim, dim)).reshape(h, w)


def from_matrix(matrix: np.ndarray, weight_shape: tuple[int, ...], dim: int) -> np.ndarray:
    """Inverse of :func:`to_matrix`: an (h, w) matrix back in the weight's layout."""
    perm = permutation(len(weight_shape), dim)
    permuted_shape = tuple(weight_shape[p] for p in perm)
    return np.transpose(matrix.reshape(permuted_shape), np.argsort(perm))


# ---------------------------------------------------------------------------------------------
# Seeded u, v initialization: the same seed gives bit-identical u, v in every framework.


LOW_PRECISION_DTYPES = ("float16", "bfloat16")
"""Weights of these dtypes keep u, v in float32 and run all spectral-norm math in float32,
casting only the normalized weight back: a unit vector in half precision holds about three
digits, and the power iteration's rounding would bias sigma (the torch built-in keeps u, v in
the weight's dtype; mixed-precision users asked for float32)."""


def init_uv(h: int, w: int, seed: int, dtype="float32", eps: float = DEFAULT_EPS) -> tuple[np.ndarray, np.ndarray]:
    """Seeded initial u (h entries) and v (w entries), normalized.

    Draws standard normals from ``numpy.random.Generator(PCG64(seed))``: u's h values, then v's
    w values (for a complex dtype: u's real parts, u's imaginary parts, then the same for v).
    Normalizes in float64 and then casts to ``dtype``, so every framework that is handed these
    arrays starts from the same bits.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    u = _draw_normalized(rng, h, dtype, eps)
    v = _draw_normalized(rng, w, dtype, eps)
    return u, v


def init_extra_uv(h: int, w: int, count: int, seed: int, dtype="float32", eps: float = DEFAULT_EPS):
    """Seeded starting vectors of the ``count`` extra pairs that ``num_svs > 1`` adds:
    arrays of shape (count, h) and (count, w), each row normalized.

    Drawn like :func:`init_uv` from a generator of their own, ``PCG64([seed, 1])``: the u
    rows, then the v rows. The first pair stays exactly :func:`init_uv`'s.
    """
    rng = np.random.Generator(np.random.PCG64([seed, 1]))
    us = [_draw_normalized(rng, h, dtype, eps) for _ in range(count)]
    vs = [_draw_normalized(rng, w, dtype, eps) for _ in range(count)]
    return np.stack(us).reshape(count, h), np.stack(vs).reshape(count, w)


RECOVERY_STREAM = 2
"""``recovery_uv`` draws from ``PCG64([seed, RECOVERY_STREAM])`` (init_extra_uv uses 1)."""


def recovery_uv(h: int, w: int, seed: int | None, dtype="float32", eps: float = DEFAULT_EPS):
    """The unit vectors u, v restart from when a power-iteration step would make them zero
    (an all-zero or underflowing W): drawn like :func:`init_uv` from
    ``PCG64([seed, RECOVERY_STREAM])``, seed 0 for a layer registered without a seed. The same
    pair every time, so a layer's recovery is deterministic and the same in every framework.
    """
    rng = np.random.Generator(np.random.PCG64([0 if seed is None else int(seed), RECOVERY_STREAM]))
    return _draw_normalized(rng, h, dtype, eps), _draw_normalized(rng, w, dtype, eps)


def _draw_normalized(rng: np.random.Generator, n: int, dtype, eps: float) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind == "c":
        parts = rng.standard_normal((2, n))
        x = parts[0] + 1j * parts[1]
    else:
        x = rng.standard_normal(n)
    return normalize(x, eps).astype(dtype)


class _SeedStream:
    """Hands out one seed per registration after :func:`manual_seed`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._base: int | None = None
        self._counter = itertools.count()

    def reset(self, seed: int | None) -> None:
        with self._lock:
            self._base = None if seed is None else int(seed)
            self._counter = itertools.count()

    def next(self) -> int | None:
        with self._lock:
            if self._base is None:
                return None
            index = next(self._counter)
            state = np.random.SeedSequence([self._base, index]).generate_state(2, np.uint32)
            return int(state[0]) << 32 | int(state[1])


_SEEDS = _SeedStream()


def manual_seed(seed: int | None) -> None:
    """Seed the u, v of every later registration that passes no ``seed``, in both frameworks.

    After ``manual_seed(s)`` the k-th registration gets a seed derived from ``(s, k)``, so
    applying spectral norm to the layers of two equivalent models in the same order, each
    after ``manual_seed(s)``, gives each pair of layers the same u and v. ``manual_seed(None)``
    goes back to the frameworks' own RNGs.
    """
    check_seed(seed)
    _SEEDS.reset(seed)


def next_seed(seed: int | None = None) -> int | None:
    """The seed a registration uses: its own ``seed`` if given, else the manual_seed stream's
    next one, else None (meaning: draw from the framework's RNG)."""
    check_seed(seed)
    if seed is not None:
        return int(seed)
    return _SEEDS.next()
