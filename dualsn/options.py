"""Argument validation, shared by both backends: one check per option, one exception type and
one message for each mistake, whichever framework the user called.

Each error class is the type the built-ins raise for that mistake (torch's and Paddle's differ)
and also a ValueError, so ``except ValueError`` keeps catching every bad argument. This module
imports numpy and nothing else.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "ArgumentTypeError",
    "DimOutOfRangeError",
    "ParameterNotFoundError",
    "WeightDtypeError",
    "parameter_not_found",
    "check_weight_dtype",
    "wrong_model",
    "require_type",
    "is_int",
    "is_real",
    "check_name",
    "check_seed",
    "check_track_sigma",
    "check_num_svs",
    "check_spec_fields",
    "check_arguments",
    "ORDERS",
    "VECTOR_MODES",
]


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


class WeightDtypeError(NotImplementedError, TypeError):
    """A weight that is neither floating point nor complex: torch's functions raise
    NotImplementedError for an unsupported dtype, Paddle's TypeError."""


def parameter_not_found(name: str, owner: str, accepted: str, present) -> ParameterNotFoundError:
    """The error for a ``name`` that is no ``accepted`` ("parameter", "parameter or buffer")
    of the layer class ``owner``; ``present`` lists the names it does have."""
    return ParameterNotFoundError(
        f"Expected name to be the name of a {accepted} of {owner}, but it has no {accepted} "
        f"called {name!r} (it has: {list(present)})"
    )


# framework -> (argument name, expected type, what a user calls it)
_MODEL_KINDS = {
    "torch": ("module", "a torch.nn.Module", "a torch module"),
    "paddle": ("layer", "a paddle.nn.Layer", "a Paddle layer"),
}


def wrong_model(framework: str, model, function: str) -> TypeError:
    """The TypeError for a ``model`` that is not a model of ``framework`` ("torch" or
    "paddle"), naming the other backend's ``function`` when the model is of that framework."""
    argument, expected, _ = _MODEL_KINDS[framework]
    cls = type(model)
    other = cls.__module__.split(".")[0]
    hint = ""
    if other in _MODEL_KINDS and other != framework:
        hint = f"; for {_MODEL_KINDS[other][2]} use dualsn.{other}.{function}"
    return TypeError(f"Expected {argument} to be {expected}, but got {cls.__module__}.{cls.__qualname__}{hint}")


def check_weight_dtype(name: str, dtype, supported: bool) -> None:
    """:class:`WeightDtypeError` unless the weight's dtype is floating point or complex."""
    if not supported:
        raise WeightDtypeError(
            f"Expected parameter {name!r} to have a floating point or complex dtype, but it is {dtype}"
        )


ORDERS = ("uv", "vu")
"""``"uv"``: u <- N(W v), then v <- N(W^H u) (torch parametrizations).
``"vu"``: v <- N(W^H u), then u <- N(W v) (torch legacy hook, Paddle hook)."""

VECTOR_MODES = ("exact", "matrix")
"""How a 1-D weight is normalized. ``"exact"``: W / max(||W||, eps), no u or v state.
``"matrix"``: W is an (n x 1) matrix and goes through the power iteration like any other."""


def is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def require_type(field: str, value, ok: bool, allowed: str) -> None:
    """:class:`ArgumentTypeError` naming ``field`` and what is allowed, unless ``ok``."""
    if not ok:
        raise ArgumentTypeError(f"Expected {field} to be {allowed}, but got {field}={value!r} ({type(value).__name__})")


def check_name(name) -> None:
    """TypeError unless the parameter name is a string."""
    require_type("name", name, isinstance(name, str), "a str (the name of a parameter)")


def check_seed(seed) -> None:
    """``seed`` is None or a non-negative int."""
    if seed is None:
        return
    require_type("seed", seed, is_int(seed), "a non-negative int or None")
    if seed < 0:
        raise ValueError(f"Expected seed to be a non-negative int or None, but got seed={seed!r}")


def check_track_sigma(track_sigma) -> None:
    if not isinstance(track_sigma, bool):
        raise ValueError(f"Expected track_sigma to be a bool, but got track_sigma={track_sigma!r}")


def check_num_svs(num_svs: int, h: int, w: int) -> None:
    """ValueError when ``num_svs`` exceeds the W-matrix's rank bound min(h, w): Gram-Schmidt
    would run out of directions and return zero or repeated vectors."""
    if num_svs > min(h, w):
        raise ValueError(
            f"Expected num_svs <= min(h, w) = {min(h, w)} for a {h} x {w} W-matrix, but got num_svs={num_svs}"
        )


def _check_positive_int(field: str, value) -> None:
    require_type(field, value, is_int(value), "an int")
    if value < 1:
        raise ValueError(f"Expected {field} to be a positive integer, but got {field}={value!r}")


def _check_optional_bound(field: str, value) -> None:
    if value is None:
        return
    require_type(field, value, is_real(value), "None or a float")
    if not np.isfinite(value) or value < 0 or (field == "coeff" and value == 0):
        allowed = "> 0" if field == "coeff" else ">= 0"
        raise ValueError(f"Expected {field} to be None or a finite float {allowed}, but got {field}={value!r}")


def check_spec_fields(spec) -> None:
    """Every field of a :class:`dualsn.spec.Spec` (its constructor calls this)."""
    require_type("n_power_iterations", spec.n_power_iterations, is_int(spec.n_power_iterations), "an int")
    if spec.n_power_iterations <= 0:
        raise ValueError(
            "Expected n_power_iterations to be a positive integer, but got "
            f"n_power_iterations={spec.n_power_iterations!r}"
        )
    require_type("eps", spec.eps, is_real(spec.eps), "a float")
    if not (spec.eps > 0 and np.isfinite(spec.eps)):
        raise ValueError(f"Expected eps to be a finite float > 0, but got eps={spec.eps!r}")
    if spec.order not in ORDERS:
        raise ValueError(f"Expected order to be one of {ORDERS}, but got order={spec.order!r}")
    require_type("warmup_iterations", spec.warmup_iterations, is_int(spec.warmup_iterations), "an int")
    if spec.warmup_iterations < 0:
        raise ValueError(
            f"Expected warmup_iterations to be an integer >= 0, but got warmup_iterations={spec.warmup_iterations!r}"
        )
    if spec.vector_mode not in VECTOR_MODES:
        raise ValueError(f"Expected vector_mode to be one of {VECTOR_MODES}, but got vector_mode={spec.vector_mode!r}")
    for field in ("coeff", "atol", "rtol"):
        _check_optional_bound(field, getattr(spec, field))
    for field in ("max_iterations", "num_svs"):
        _check_positive_int(field, getattr(spec, field))
    if spec.uses_tolerance and spec.max_iterations < spec.n_power_iterations:
        raise ValueError(
            "Expected max_iterations >= n_power_iterations, but got "
            f"max_iterations={spec.max_iterations}, n_power_iterations={spec.n_power_iterations}"
        )


def check_arguments(*, seed, track_sigma) -> None:
    """The options of ``spectral_norm`` / ``spectral_norm_conv`` that are not Spec fields,
    checked before anything is changed: the Spec's own fields are checked when it is made
    (:func:`check_spec_fields`), ``name`` with the module it names (:func:`check_name`)."""
    check_seed(seed)
    check_track_sigma(track_sigma)
