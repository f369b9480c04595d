"""Patching the frameworks' built-in spectral-norm functions, shared by both backends
(``dualsn.torch.patch``, ``dualsn.paddle.patch``): existing or converted model code then builds
dualsn's spectral norm without being edited. Imports no framework: each backend hands in the
(module, attribute, replacement) triples of its own framework.
"""

from __future__ import annotations

from dualsn import spec as _spec

__all__ = ["Patch", "PATCH_OPTIONS", "check_patch_arguments"]

PATCH_OPTIONS = ("seed", "coeff", "atol", "rtol", "max_iterations", "num_svs", "track_sigma")
"""Options of spectral_norm that patch() may fix for every patched call. The built-in's own
arguments (name, n_power_iterations, eps, dim) are not among them: each call passes them."""

# Every patch in force, oldest first. undo() needs them to unlink a patch that a later one sits
# on: plain calls can be undone in any order.
_ACTIVE_PATCHES: list["Patch"] = []


class Patch:
    """Built-in functions replaced by :func:`patch`, until :meth:`undo` or the end of a ``with``.

    ``compat`` maps the name of each replaced built-in to the preset its replacement builds.
    """

    def __init__(self, replacements, compat: dict[str, str]):
        # One slot per attribute: [module, attribute, value before this patch, replacement].
        self._slots = [[module, attr, getattr(module, attr), new] for module, attr, new in replacements]
        self.compat = dict(compat)
        for module, attr, _, new in self._slots:
            setattr(module, attr, new)
        _ACTIVE_PATCHES.append(self)

    @property
    def active(self) -> bool:
        return any(p is self for p in _ACTIVE_PATCHES)

    def undo(self) -> None:
        """Put back the exact objects this patch replaced; a second call does nothing."""
        if not self.active:
            return
        _ACTIVE_PATCHES[:] = [p for p in _ACTIVE_PATCHES if p is not self]
        for module, attr, before, new in self._slots:
            if getattr(module, attr, None) is new:
                setattr(module, attr, before)
                continue
            # A later patch replaced ours: when it is undone it must restore what we replaced.
            for later in _ACTIVE_PATCHES:
                for slot in later._slots:
                    if slot[0] is module and slot[1] == attr and slot[2] is new:
                        slot[2] = before

    def __enter__(self) -> "Patch":
        return self

    def __exit__(self, *exc_info) -> bool:
        self.undo()
        return False  # exceptions propagate

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return f"<dualsn.Patch {state} {self.compat}>"


def check_patch_arguments(compats, defaults: dict) -> None:
    """Every error patch() can raise, before anything is patched."""
    unknown = sorted(set(defaults) - set(PATCH_OPTIONS))
    if unknown:
        raise TypeError(
            f"patch() got unexpected keyword argument(s) {unknown}; allowed: {PATCH_OPTIONS} "
            "(name, n_power_iterations, eps and dim come from each call)"
        )
    features = {k: v for k, v in defaults.items() if k in _spec.FEATURES}
    for compat in compats:
        _spec.make_spec(compat, **features)  # ValueError naming an unknown compat
    _spec.check_seed(defaults.get("seed"))
    if not isinstance(defaults.get("track_sigma", False), bool):
        raise ValueError(f"Expected track_sigma to be a bool, but got track_sigma={defaults['track_sigma']!r}")
