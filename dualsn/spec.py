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
import itertools
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
    "manual_seed",
    "next_seed",
    "power_iteration",
    "sigma",
    "ReferenceSN",
    "normalized_weight_grad",
]

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
    """

    n_power_iterations: int = 1
    eps: float = 1e-12
    order: str = "uv"
    warmup_iterations: int = 15
    registration_forward: bool = True
    vector_mode: str = "exact"

    def __post_init__(self) -> None:
        if isinstance(self.n_power_iterations, bool) or not isinstance(
            self.n_power_iterations, (int, np.integer)
        ) or self.n_power_iterations <= 0:
            raise ValueError(
                "Expected n_power_iterations to be a positive integer, but got "
                f"n_power_iterations={self.n_power_iterations!r}"
            )
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float, np.floating)) or not (
            self.eps > 0 and np.isfinite(self.eps)
        ):
            raise ValueError(f"Expected eps to be a finite float > 0, but got eps={self.eps!r}")
        if self.order not in ORDERS:
            raise ValueError(f"Expected order to be one of {ORDERS}, but got order={self.order!r}")
        if isinstance(self.warmup_iterations, bool) or not isinstance(
            self.warmup_iterations, (int, np.integer)
        ) or self.warmup_iterations < 0:
            raise ValueError(
                "Expected warmup_iterations to be an integer >= 0, but got "
                f"warmup_iterations={self.warmup_iterations!r}"
            )
        if self.vector_mode not in VECTOR_MODES:
            raise ValueError(
                f"Expected vector_mode to be one of {VECTOR_MODES}, but got "
                f"vector_mode={self.vector_mode!r}"
            )

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


def make_spec(compat: str = DEFAULT_COMPAT, n_power_iterations: int = 1, eps: float = 1e-12) -> Spec:
    """The preset ``compat`` with the user's ``n_power_iterations`` and ``eps``.

    Raises ValueError naming the argument for an unknown preset or a bad value.
    """
    if not isinstance(compat, str) or compat not in PRESETS:
        raise ValueError(
            f"Expected compat to be one of {tuple(PRESETS)}, but got compat={compat!r}"
        )
    return PRESETS[compat].replace(n_power_iterations=n_power_iterations, eps=eps)


# ---------------------------------------------------------------------------------------------
# Shapes and dim semantics


def canonical_dim(dim: int, ndim: int) -> int:
    """``dim`` as a non-negative axis of a rank-``ndim`` weight; IndexError if out of range."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise TypeError(f"Expected dim to be an int, but got dim={dim!r}")
    low = -max(ndim, 1)
    high = max(ndim, 1) - 1
    if not low <= dim <= high:
        raise IndexError(
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


def normalize(x: np.ndarray, eps: float) -> np.ndarray:
    """N(x) = x / max(||x||, eps), in x's own precision."""
    norm = np.linalg.norm(x)
    return x / np.maximum(norm, np.asarray(eps, dtype=norm.dtype))


def init_dtype(dtype_name: str) -> np.dtype:
    """The numpy dtype :func:`init_uv` draws in for a framework dtype called ``dtype_name``
    (``"float32"``, ``"torch.bfloat16"``, ``"paddle.complex64"``...).

    Numpy has no bfloat16: such weights get float32 u, v, which the framework then rounds.
    """
    bare = str(dtype_name).rpartition(".")[2]
    return np.dtype("float32" if bare == "bfloat16" else bare)


def init_uv(h: int, w: int, seed: int, dtype="float32", eps: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """Seeded initial u (h entries) and v (w entries), normalized.

    Draws standard normals from ``numpy.random.Generator(PCG64(seed))``: u's h values, then v's
    w values (for a complex dtype: u's real parts, u's imaginary parts, then the same for v).
    Normalizes in float64 and then casts to ``dtype``, so every framework that is handed these
    arrays starts from the same bits.
    """
    dtype = np.dtype(dtype)
    rng = np.random.Generator(np.random.PCG64(seed))

    def draw(n: int) -> np.ndarray:
        if dtype.kind == "c":
            parts = rng.standard_normal((2, n))
            x = parts[0] + 1j * parts[1]
        else:
            x = rng.standard_normal(n)
        return normalize(x, eps).astype(dtype)

    u = draw(h)
    v = draw(w)
    return u, v


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
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
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


def power_iteration(
    w_mat: np.ndarray, u: np.ndarray, v: np.ndarray, n: int, order: str, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` power iterations on the W-matrix, in ``order``; returns new (u, v)."""
    w_h = w_mat.conj().T
    for _ in range(n):
        if order == "uv":
            u = normalize(w_mat @ v, eps)
            v = normalize(w_h @ u, eps)
        else:
            v = normalize(w_h @ u, eps)
            u = normalize(w_mat @ v, eps)
    return u, v


def sigma(w_mat: np.ndarray, u: np.ndarray, v: np.ndarray):
    """sigma = u^H W v."""
    return np.vdot(u, w_mat @ v)


def normalized_weight_grad(
    grad: np.ndarray, weight: np.ndarray, u, v, dim: int, spec: Spec
) -> np.ndarray:
    """dL/dW given dL/dW_sn (``grad``), with u and v held constant.

    Matrix case: (G - <W_sn, G> u v^H) / conj(sigma), where <A, B> = sum(conj(A) * B).
    Exact 1-D case: (G - Re<w_hat, G> w_hat) / ||W|| (just G / eps when ||W|| <= eps).
    Gradients of complex tensors follow torch's convention (dL/dRe + i dL/dIm).
    """
    if spec.is_exact_vector(weight.ndim):
        norm = np.linalg.norm(weight)
        if norm <= spec.eps:
            return grad / np.asarray(spec.eps, dtype=norm.dtype)
        w_hat = weight / norm
        return (grad - np.vdot(w_hat, grad).real * w_hat) / norm
    s = sigma(to_matrix(weight, dim), u, v)
    w_sn = weight / s
    rank_one = from_matrix(np.outer(u, v.conj()), weight.shape, dim)
    return (grad - np.vdot(w_sn, grad) * rank_one) / np.conj(s)


class ReferenceSN:
    """Spectral norm of one weight, in numpy: the oracle for every backend.

    Holds u and v (None for an exact 1-D weight) and follows the same life cycle as a
    registered module: registration runs ``spec.registration_iterations(training)``; each
    training forward runs ``spec.n_power_iterations`` and then normalizes; an eval forward
    normalizes with the stored u, v.
    """

    def __init__(self, weight: np.ndarray, dim: int, spec: Spec, u0=None, v0=None, training: bool = True):
        check_weight_shape(weight.shape)
        self.spec = spec
        self.dim = canonical_dim(dim, weight.ndim)
        self.u: np.ndarray | None = None
        self.v: np.ndarray | None = None
        if spec.is_exact_vector(weight.ndim):
            return
        h, w = matrix_shape(weight.shape, self.dim)
        if u0 is None or v0 is None:
            raise ValueError("ReferenceSN needs u0 and v0 for a weight with power iteration")
        if np.shape(u0) != (h,) or np.shape(v0) != (w,):
            raise ValueError(f"u0, v0 must have shapes ({h},), ({w},)")
        self.u = np.array(u0, dtype=weight.dtype)
        self.v = np.array(v0, dtype=weight.dtype)
        self.iterate(weight, spec.registration_iterations(training))

    def iterate(self, weight: np.ndarray, n: int) -> None:
        if self.u is None or n == 0:
            return
        self.u, self.v = power_iteration(
            to_matrix(weight, self.dim), self.u, self.v, n, self.spec.order, self.spec.eps
        )

    def sigma(self, weight: np.ndarray):
        """sigma from the stored u, v (the norm itself for an exact 1-D weight)."""
        if self.u is None:
            return np.maximum(np.linalg.norm(weight), np.asarray(self.spec.eps, dtype=weight.real.dtype))
        return sigma(to_matrix(weight, self.dim), self.u, self.v)

    def forward(self, weight: np.ndarray, training: bool) -> np.ndarray:
        """The normalized weight, running the power iteration first in training mode."""
        if training:
            self.iterate(weight, self.spec.n_power_iterations)
        return weight / self.sigma(weight)

    def weight_grad(self, grad: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """dL/dW through the last forward (u, v as they are now)."""
        return normalized_weight_grad(grad, weight, self.u, self.v, self.dim, self.spec)

    def state(self) -> dict[str, np.ndarray]:
        if self.u is None:
            return {}
        return {"u": self.u.copy(), "v": self.v.copy()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        if self.u is not None:
            self.u = np.array(state["u"], dtype=self.u.dtype)
            self.v = np.array(state["v"], dtype=self.v.dtype)
