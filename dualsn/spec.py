"""The dualsn spectral-normalization algorithm, defined once.

Every backend (``dualsn.torch``, ``dualsn.paddle``) and every conformance driver takes its
rules from this module, and the numpy reference at the bottom is the oracle they are tested
against. This module imports numpy and nothing else: no framework.

Notation. The weight ``W`` is a tensor; ``dim`` is its output-features axis. The *W-matrix* is
``W`` with ``dim`` moved to the front and the other axes flattened, shape ``(h, w)``. ``u`` has
``h`` entries, ``v`` has ``w``. ``N(x) = x / max(||x||, eps)``, as ``F.normalize`` does in both
frameworks. ``sigma = u^H W v`` with ``u`` and ``v`` held constant (no gradient through them),
and the normalized weight is ``W / sigma``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import threading
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Spec",
    "PRESETS",
    "ORDERS",
    "VECTOR_MODES",
    "DEFAULT_DIM_1_LAYERS",
    "make_spec",
    "default_dim",
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
    "power_iteration",
    "sigma",
    "ReferenceSN",
    "normalized_weight_grad",
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


# ---------------------------------------------------------------------------------------------
# Errors. Each is the type the built-ins raise for that mistake (torch's and Paddle's differ),
# and also a ValueError, so ``except ValueError`` keeps catching every bad argument.


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (``n_power_iterations="1"``, ``name=3``): a TypeError, as
    in every built-in."""


class DimOutOfRangeError(IndexError, ValueError):
    """``dim`` outside the weight's axes: torch raises IndexError, Paddle's built-in
    ValueError."""


class ParameterNotFoundError(KeyError, ValueError):
    """No parameter called ``name``: Paddle's built-in and torch's legacy hook raise KeyError,
    torch's parametrization ValueError."""

    def __str__(self) -> str:  # KeyError would show the message as a quoted repr
        return str(self.args[0])


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _require_type(field: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ArgumentTypeError(f"Expected {field} to be {allowed}, but got {field}={value!r} ({type(value).__name__})")


def check_name(name) -> None:
    """TypeError unless the parameter name is a string."""
    _require_type("name", name, isinstance(name, str), "a str (the name of a parameter)")


def check_num_svs(num_svs: int, h: int, w: int) -> None:
    """ValueError when ``num_svs`` exceeds the W-matrix's rank bound min(h, w): Gram-Schmidt
    would run out of directions and return zero or repeated vectors."""
    if num_svs > min(h, w):
        raise ValueError(
            f"Expected num_svs <= min(h, w) = {min(h, w)} for a {h} x {w} W-matrix, but got num_svs={num_svs}"
        )

ORDERS = ("uv", "vu")
"""``"uv"``: u <- N(W v), then v <- N(W^H u) (torch parametrizations).
``"vu"``: v <- N(W^H u), then u <- N(W v) (torch legacy hook, Paddle hook)."""

VECTOR_MODES = ("exact", "matrix")
"""How a 1-D weight is normalized. ``"exact"``: W / max(||W||, eps), no u or v state.
``"matrix"``: W is an (n x 1) matrix and goes through the power iteration like any other."""


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
    eps: float = 1e-12
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
        _require_type("n_power_iterations", self.n_power_iterations, _is_int(self.n_power_iterations), "an int")
        if self.n_power_iterations <= 0:
            raise ValueError(
                "Expected n_power_iterations to be a positive integer, but got "
                f"n_power_iterations={self.n_power_iterations!r}"
            )
        _require_type("eps", self.eps, _is_real(self.eps), "a float")
        if not (self.eps > 0 and np.isfinite(self.eps)):
            raise ValueError(f"Expected eps to be a finite float > 0, but got eps={self.eps!r}")
        if self.order not in ORDERS:
            raise ValueError(f"Expected order to be one of {ORDERS}, but got order={self.order!r}")
        _require_type("warmup_iterations", self.warmup_iterations, _is_int(self.warmup_iterations), "an int")
        if self.warmup_iterations < 0:
            raise ValueError(
                "Expected warmup_iterations to be an integer >= 0, but got "
                f"warmup_iterations={self.warmup_iterations!r}"
            )
        if self.vector_mode not in VECTOR_MODES:
            raise ValueError(
                f"Expected vector_mode to be one of {VECTOR_MODES}, but got "
                f"vector_mode={self.vector_mode!r}"
            )
        for field in ("coeff", "atol", "rtol"):
            value = getattr(self, field)
            if value is None:
                continue
            _require_type(field, value, _is_real(value), "None or a float")
            if not np.isfinite(value) or value < 0 or (field == "coeff" and value == 0):
                allowed = "> 0" if field == "coeff" else ">= 0"
                raise ValueError(f"Expected {field} to be None or a finite float {allowed}, but got {field}={value!r}")
        for field in ("max_iterations", "num_svs"):
            value = getattr(self, field)
            _require_type(field, value, _is_int(value), "an int")
            if value < 1:
                raise ValueError(f"Expected {field} to be a positive integer, but got {field}={value!r}")
        if self.uses_tolerance and self.max_iterations < self.n_power_iterations:
            raise ValueError(
                "Expected max_iterations >= n_power_iterations, but got "
                f"max_iterations={self.max_iterations}, n_power_iterations={self.n_power_iterations}"
            )

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
        return sigma / self.coeff if np.real(sigma) > self.coeff else 1.0

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


def conv_spec(n_power_iterations: int = 1, eps: float = 1e-12, **features) -> "Spec":
    """The Spec of ``spectral_norm_conv``: :data:`CONV_COMPAT` with
    :data:`CONV_WARMUP_ITERATIONS` at registration, and the user's settings."""
    return make_spec(CONV_COMPAT, n_power_iterations, eps, **features).replace(
        warmup_iterations=CONV_WARMUP_ITERATIONS
    )

DEFAULT_DIM_1_LAYERS: dict[str, tuple[str, ...]] = {
    "torch": ("torch.nn.ConvTranspose1d", "torch.nn.ConvTranspose2d", "torch.nn.ConvTranspose3d"),
    # paddle.nn.Linear stores its weight as [in, out]; paddle.compat.nn.Linear keeps torch's
    # [out, in] and is not a subclass of paddle.nn.Linear, so it stays at dim 0.
    "paddle": (
        "paddle.nn.Conv1DTranspose",
        "paddle.nn.Conv2DTranspose",
        "paddle.nn.Conv3DTranspose",
        "paddle.nn.Linear",
    ),
}
"""Layer classes whose default ``dim`` is 1 (the output-features axis); every other layer
defaults to 0. With these defaults the W-matrix of a layer is the same matrix in both
frameworks, so u and v move between them unchanged."""


def default_dim(is_dim_1_layer: bool, ndim: int) -> int:
    """``dim`` when the user passes None: 1 for a layer in :data:`DEFAULT_DIM_1_LAYERS`, else 0.

    A 1-D weight (a bias, a scale) has no axis 1, so it always gets 0.
    """
    return 1 if is_dim_1_layer and ndim > 1 else 0


def make_spec(
    compat: str = DEFAULT_COMPAT, n_power_iterations: int = 1, eps: float = 1e-12, **features
) -> Spec:
    """The preset ``compat`` with the user's ``n_power_iterations`` and ``eps``, plus any of
    the opt-in features no built-in has: ``coeff``, ``atol``, ``rtol``, ``max_iterations``,
    ``num_svs`` (see :class:`Spec`).

    Raises :class:`ArgumentTypeError` (a TypeError) naming the argument for a wrong type, and
    ValueError for an unknown preset or a bad value.
    """
    _require_type("compat", compat, isinstance(compat, str), "a str")
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
    _require_type("dim", dim, _is_int(dim), "an int or None")
    low = -max(ndim, 1)
    high = max(ndim, 1) - 1
    if not low <= dim <= high:
        raise DimOutOfRangeError(
            f"Dimension out of range (expected dim to be in range of [{low}, {high}] "
            f"for a weight with {ndim} dimension(s), but got dim={dim})"
        )
    return int(dim) % max(ndim, 1)


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


@functools.lru_cache(maxsize=None)
def underflow_threshold(dtype) -> float:
    """The smallest normal number of ``dtype``'s real precision (numpy, torch or Paddle dtype,
    or its name). A norm below it has underflowed: there pair 0's u, v restart from
    :func:`recovery_uv` (see :func:`normalize`). Not zero, so that CPUs that flush subnormals
    to zero decide the same."""
    return float(np.finfo(init_dtype(str(dtype))).tiny)


def plain_norm_trusted(norm: float, dtype) -> bool:
    """Whether a plain sqrt(sum |x|^2) of ``dtype`` is exact to rounding: finite, and above
    sqrt(smallest normal), below which the squared sum lost digits to underflow. Elsewhere
    :func:`safe_norm` rescales by max|x|."""
    return math.sqrt(underflow_threshold(dtype)) < norm < math.inf


def safe_norm(x: np.ndarray):
    """||x|| in x's own (real) precision, without overflow or underflow of the squared sum:
    the plain sqrt(sum |x|^2) where that is representable, else max|x| * ||x / max|x|||.
    (Weights up to ~1e30 in float32 and ~1e300 in float64 then keep a finite, exact sigma.)"""
    x = np.asarray(x)
    with np.errstate(over="ignore", under="ignore"):  # out of range is what the fallback is for
        norm = np.linalg.norm(x)
    if plain_norm_trusted(norm, norm.dtype) or norm == 0 and not np.any(x):
        return norm
    scale = np.max(np.abs(x))
    if not np.isfinite(scale) or scale == 0:
        return norm  # inf / nan stay as they are
    return scale * np.linalg.norm(x / scale)


def normalize(x: np.ndarray, eps: float, recovery: np.ndarray | None = None) -> np.ndarray:
    """N(x) = x / max(||x||, eps), in x's own precision.

    With ``recovery`` (pair 0 of the power iteration), an x whose norm has underflowed (below
    the dtype's smallest normal number, zero included) gives ``recovery`` instead: u, v never
    collapse to zero for good, so a weight that was all zero (or underflowed) is estimated
    again as soon as it is not (see :func:`recovery_uv`, :func:`underflow_threshold`).
    """
    norm = safe_norm(x)
    if recovery is not None and norm < underflow_threshold(norm.dtype):
        return np.array(recovery, dtype=x.dtype)
    return x / np.maximum(norm, np.asarray(eps, dtype=norm.dtype))


def init_dtype(dtype_name: str) -> np.dtype:
    """The numpy dtype :func:`init_uv` draws in for a framework dtype called ``dtype_name``
    (``"float32"``, ``"torch.bfloat16"``, ``"paddle.complex64"``...).

    Numpy has no bfloat16: such weights get float32 u, v, which the framework then rounds.
    """
    bare = str(dtype_name).rpartition(".")[2]
    return np.dtype("float32" if bare == "bfloat16" else bare)


LOW_PRECISION_DTYPES = ("float16", "bfloat16")
"""Weights of these dtypes keep u, v in float32 and run all spectral-norm math in float32,
casting only the normalized weight back: a unit vector in half precision holds about three
digits, and the power iteration's rounding would bias sigma (the torch built-in keeps u, v in
the weight's dtype; mixed-precision users asked for float32)."""


def init_uv(h: int, w: int, seed: int, dtype="float32", eps: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
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


def init_extra_uv(h: int, w: int, count: int, seed: int, dtype="float32", eps: float = 1e-12):
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


def recovery_uv(h: int, w: int, seed: int | None, dtype="float32", eps: float = 1e-12):
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


def check_seed(seed) -> None:
    if seed is None:
        return
    _require_type("seed", seed, _is_int(seed), "a non-negative int or None")
    if seed < 0:
        raise ValueError(f"Expected seed to be a non-negative int or None, but got seed={seed!r}")


def next_seed(seed: int | None = None) -> int | None:
    """The seed a registration uses: its own ``seed`` if given, else the manual_seed stream's
    next one, else None (meaning: draw from the framework's RNG)."""
    check_seed(seed)
    if seed is not None:
        return int(seed)
    return _SEEDS.next()


# ---------------------------------------------------------------------------------------------
# The numpy reference implementation.


def _orthogonalize(x: np.ndarray, basis: list[np.ndarray]) -> np.ndarray:
    """x minus its projections on the (orthonormal) earlier vectors: Gram-Schmidt."""
    for b in basis:
        x = x - np.vdot(b, x) * b
    return x


def power_step(w_mat: np.ndarray, us: list, vs: list, order: str, eps: float, recovery=None):
    """One power iteration on every (u_i, v_i) pair, in ``order``.

    Pair i is orthogonalized against pairs 0..i-1 (Gram-Schmidt, as BigGAN estimates several
    singular values), so pair 0 is the plain iteration. Returns the new lists and r, the norm
    of pair 0's last vector before normalization (||W^H u|| for "uv", ||W v|| for "vu"): the
    sigma estimate the tolerance stop compares. After the step u^H W v = r^2 / max(r, eps),
    which is r whenever r >= eps. ``recovery`` = (u, v) of :func:`recovery_uv`: pair 0's
    vectors restart from them instead of becoming zero (see :func:`normalize`).
    """
    w_h = w_mat.conj().T
    new_us: list = []
    new_vs: list = []
    last_norm = None
    for u, v in zip(us, vs):
        rec_u, rec_v = recovery if recovery is not None and not new_us else (None, None)
        if order == "uv":
            u = normalize(_orthogonalize(w_mat @ v, new_us), eps, rec_u)
            last = _orthogonalize(w_h @ u, new_vs)
            v = normalize(last, eps, rec_v)
        else:
            v = normalize(_orthogonalize(w_h @ u, new_vs), eps, rec_v)
            last = _orthogonalize(w_mat @ v, new_us)
            u = normalize(last, eps, rec_u)
        if last_norm is None:
            last_norm = safe_norm(last)
        new_us.append(u)
        new_vs.append(v)
    return new_us, new_vs, last_norm


def power_iteration(
    w_mat: np.ndarray, u: np.ndarray, v: np.ndarray, n: int, order: str, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` power iterations on the W-matrix, in ``order``; returns new (u, v)."""
    us, vs = [u], [v]
    for _ in range(n):
        us, vs, _ = power_step(w_mat, us, vs, order, eps)
    return us[0], vs[0]


def training_iterations(w_mat: np.ndarray, us: list, vs: list, spec: Spec, recovery=None):
    """The power iterations of one training forward; returns (us, vs, count).

    Fixed count: ``spec.n_power_iterations``. With ``atol``/``rtol``: at least
    ``n_power_iterations`` and at least 2, stopping after the first iteration whose sigma
    estimate settled against the previous one (:meth:`Spec.settled`), at most
    ``spec.max_iterations``.
    """
    if not spec.uses_tolerance:
        for _ in range(spec.n_power_iterations):
            us, vs, _ = power_step(w_mat, us, vs, spec.order, spec.eps, recovery)
        return us, vs, spec.n_power_iterations
    previous = None
    count = 0
    while count < spec.max_iterations:
        us, vs, estimate = power_step(w_mat, us, vs, spec.order, spec.eps, recovery)
        count += 1
        if count >= spec.n_power_iterations and previous is not None and spec.settled(previous, estimate):
            break
        previous = estimate
    return us, vs, count


def sigma(w_mat: np.ndarray, u: np.ndarray, v: np.ndarray):
    """sigma = u^H W v."""
    return np.vdot(u, w_mat @ v)


def normalized_weight_grad(
    grad: np.ndarray, weight: np.ndarray, u, v, dim: int, spec: Spec
) -> np.ndarray:
    """dL/dW given dL/dW_sn (``grad``), with u and v held constant.

    Matrix case, W_sn = W / sigma: (G - <W_sn, G> u v^H) / conj(sigma), where
    <A, B> = sum(conj(A) * B). Exact 1-D case, W_sn = W / n with n = max(||W||, eps):
    (G - Re<w_hat, G> w_hat) / n (just G / eps when ||W|| <= eps).
    With ``coeff`` and the bound active (divisor d = sigma / coeff): W_sn = W / d and the
    same formulas hold with G scaled by coeff, i.e. (coeff G - <W_sn, G> u v^H) / conj(sigma);
    with the bound inactive W_sn = W and the gradient is G.
    Gradients of complex tensors follow torch's convention (dL/dRe + i dL/dIm).
    """
    scale = 1.0 if spec.coeff is None else spec.coeff
    if spec.is_exact_vector(weight.ndim):
        norm = safe_norm(weight)
        if spec.divisor(max(norm, spec.eps)) == 1.0 and spec.coeff is not None:
            return grad
        if norm <= spec.eps:
            return scale * grad / np.asarray(spec.eps, dtype=norm.dtype)
        w_hat = weight / norm
        return scale * (grad - np.vdot(w_hat, grad).real * w_hat) / norm
    s = sigma(to_matrix(weight, dim), u, v)
    if spec.coeff is not None and spec.divisor(s) == 1.0:
        return grad
    if spec.sigma_floored(s):
        return grad / np.asarray(spec.eps, dtype=np.real(grad).dtype)  # W / eps: a constant divisor
    w_sn = weight / spec.divisor(s)
    rank_one = from_matrix(np.outer(u, v.conj()), weight.shape, dim)
    return (scale * grad - np.vdot(w_sn, grad) * rank_one) / np.conj(s)


def check_finite_sigma(sigma) -> None:
    """FloatingPointError when a power iteration meets a NaN or Inf, which happens exactly
    when W holds one (every entry of W enters W v). Backends raise it before u, v change and
    add which parameter of which layer: the built-ins would make u, v NaN for good, and every
    later output NaN, without a word."""
    if not np.isfinite(sigma):
        raise FloatingPointError(
            f"the weight holds NaN or Inf (power-iteration norm = {sigma}). u and v are left "
            "as they were; fix the step that made the weight non-finite (a lower learning rate, "
            "gradient clipping) or restore a checkpoint."
        )


class ReferenceSN:
    """Spectral norm of one weight, in numpy: the oracle for every backend.

    Holds u and v (None for an exact 1-D weight) and, with ``spec.num_svs > 1``, the extra
    pairs in ``extra_u``/``extra_v`` (shape (num_svs - 1, h) and (num_svs - 1, w)), and
    follows the same life cycle as a registered module: registration runs
    ``spec.registration_iterations(training)``; each training forward runs
    :func:`training_iterations` and then normalizes; an eval forward normalizes with the
    stored u, v. The extra pairs only estimate further singular values for monitoring: they
    never change the normalized weight.
    """

    def __init__(
        self, weight: np.ndarray, dim: int, spec: Spec, u0=None, v0=None, training: bool = True,
        extra_u0=None, extra_v0=None, seed: int | None = None,
    ):
        check_weight_shape(weight.shape)
        self.spec = spec
        self.recovery = None
        self.dim = canonical_dim(dim, weight.ndim)
        self.u: np.ndarray | None = None
        self.v: np.ndarray | None = None
        self.extra_u: np.ndarray | None = None
        self.extra_v: np.ndarray | None = None
        self.last_iterations = 0
        if spec.is_exact_vector(weight.ndim):
            return
        h, w = matrix_shape(weight.shape, self.dim)
        if u0 is None or v0 is None:
            raise ValueError("ReferenceSN needs u0 and v0 for a weight with power iteration")
        if np.shape(u0) != (h,) or np.shape(v0) != (w,):
            raise ValueError(f"u0, v0 must have shapes ({h},), ({w},)")
        self.u = np.array(u0, dtype=weight.dtype)
        self.v = np.array(v0, dtype=weight.dtype)
        self.recovery = recovery_uv(h, w, seed, weight.dtype, spec.eps)
        if spec.num_svs > 1:
            k = spec.num_svs - 1
            if np.shape(extra_u0) != (k, h) or np.shape(extra_v0) != (k, w):
                raise ValueError(f"num_svs={spec.num_svs} needs extra_u0, extra_v0 of shapes ({k}, {h}), ({k}, {w})")
            self.extra_u = np.array(extra_u0, dtype=weight.dtype)
            self.extra_v = np.array(extra_v0, dtype=weight.dtype)
        self.iterate(weight, spec.registration_iterations(training))

    def _pairs(self):
        us, vs = [self.u], [self.v]
        if self.extra_u is not None:
            us += list(self.extra_u)
            vs += list(self.extra_v)
        return us, vs

    def _store(self, us, vs) -> None:
        self.u, self.v = us[0], vs[0]
        if self.extra_u is not None:
            self.extra_u, self.extra_v = np.stack(us[1:]), np.stack(vs[1:])

    def iterate(self, weight: np.ndarray, n: int) -> None:
        """Exactly ``n`` power iterations (registration, warm-up)."""
        if self.u is None or n == 0:
            return
        us, vs = self._pairs()
        w_mat = to_matrix(weight, self.dim)
        for _ in range(n):
            us, vs, _ = power_step(w_mat, us, vs, self.spec.order, self.spec.eps, self.recovery)
        self._store(us, vs)

    def sigma(self, weight: np.ndarray):
        """sigma from the stored u, v (the norm itself for an exact 1-D weight)."""
        if self.u is None:
            return np.maximum(safe_norm(weight), np.asarray(self.spec.eps, dtype=weight.real.dtype))
        return sigma(to_matrix(weight, self.dim), self.u, self.v)

    def singular_values(self, weight: np.ndarray) -> list:
        """u_i^H W v_i for every pair: sigma first, then the further estimates."""
        if self.u is None:
            return [self.sigma(weight)]
        w_mat = to_matrix(weight, self.dim)
        us, vs = self._pairs()
        return [sigma(w_mat, u, v) for u, v in zip(us, vs)]

    def forward(self, weight: np.ndarray, training: bool) -> np.ndarray:
        """The normalized weight, running the training iterations first in training mode."""
        if training and self.u is not None:
            w_mat = to_matrix(weight, self.dim)
            us, vs, count = training_iterations(w_mat, *self._pairs(), self.spec, self.recovery)
            check_finite_sigma(sigma(w_mat, us[0], vs[0]))
            self._store(us, vs)
            self.last_iterations = count
        elif not training:
            self.last_iterations = 0
        return weight / self.spec.divisor(self.sigma(weight))

    def weight_grad(self, grad: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """dL/dW through the last forward (u, v as they are now)."""
        return normalized_weight_grad(grad, weight, self.u, self.v, self.dim, self.spec)

    def state(self) -> dict[str, np.ndarray]:
        if self.u is None:
            return {}
        state = {"u": self.u.copy(), "v": self.v.copy()}
        if self.extra_u is not None:
            state.update(extra_u=self.extra_u.copy(), extra_v=self.extra_v.copy())
        return state

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        if self.u is not None:
            self.u = np.array(state["u"], dtype=self.u.dtype)
            self.v = np.array(state["v"], dtype=self.v.dtype)
            if self.extra_u is not None:
                self.extra_u = np.array(state["extra_u"], dtype=self.extra_u.dtype)
                self.extra_v = np.array(state["extra_v"], dtype=self.extra_v.dtype)
