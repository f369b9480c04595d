"""The numpy reference implementation of dualsn's spectral norm: the oracle every backend and
conformance driver is tested against. It follows the rules of :mod:`dualsn.spec` and imports
numpy and nothing else.
"""

from __future__ import annotations

import numpy as np

from dualsn.spec import (
    Spec,
    canonical_dim,
    check_finite_sigma,
    check_weight_shape,
    from_matrix,
    in_order,
    matrix_shape,
    normalize,
    recovery_uv,
    safe_norm,
    to_matrix,
)

__all__ = ["power_step", "power_iteration", "training_iterations", "sigma", "normalized_weight_grad", "ReferenceSN"]


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
        pair = {"u": u, "v": v}

        def update_u():
            unnormalized = _orthogonalize(w_mat @ pair["v"], new_us)
            pair["u"] = normalize(unnormalized, eps, rec_u)
            return unnormalized

        def update_v():
            unnormalized = _orthogonalize(w_h @ pair["u"], new_vs)
            pair["v"] = normalize(unnormalized, eps, rec_v)
            return unnormalized

        last = in_order(order, update_u, update_v)
        if last_norm is None:
            last_norm = safe_norm(last)
        new_us.append(pair["u"])
        new_vs.append(pair["v"])
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
    """The power iterations of one training forward (:meth:`Spec.run_training_iterations`);
    returns (us, vs, count)."""
    state = {"us": us, "vs": vs}

    def step():
        state["us"], state["vs"], estimate = power_step(w_mat, state["us"], state["vs"], spec.order, spec.eps, recovery)
        return estimate

    count = spec.run_training_iterations(step)
    return state["us"], state["vs"], count


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
        if spec.bound_inactive(max(norm, spec.eps)):
            return grad
        if norm <= spec.eps:
            return scale * grad / np.asarray(spec.eps, dtype=norm.dtype)
        w_hat = weight / norm
        return scale * (grad - np.vdot(w_hat, grad).real * w_hat) / norm
    s = sigma(to_matrix(weight, dim), u, v)
    if spec.bound_inactive(s):
        return grad
    if spec.sigma_floored(s):
        return grad / np.asarray(spec.eps, dtype=np.real(grad).dtype)  # W / eps: a constant divisor
    w_sn = weight / spec.divisor(s)
    rank_one = from_matrix(np.outer(u, v.conj()), weight.shape, dim)
    return (scale * grad - np.vdot(w_sn, grad) * rank_one) / np.conj(s)


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
