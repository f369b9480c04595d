"""The records and errors of a port: :class:`PortReport` and its :class:`Entry` rows,
:class:`PresetMismatch`, and :class:`PortError`, :class:`CheckpointError`,
:class:`PresetMismatchWarning`."""

from __future__ import annotations

from dataclasses import dataclass, field


class PortError(ValueError):
    """A state dict does not fit the target. ``problems`` lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"cannot load the state dict: {len(self.problems)} problem(s); the target was not "
            f"changed:\n{lines}"
        )


class CheckpointError(ValueError):
    """A checkpoint file is not a state dict this module can read safely, or which of its
    state dicts to use is not clear (:func:`select_state_dict`)."""


class PresetMismatchWarning(UserWarning):
    """A port loaded spectral-norm state into a layer whose preset runs another algorithm than
    the one that produced it (e.g. a torch-parametrization checkpoint into a Paddle model built
    with ``compat="paddle"``): eval outputs agree, training does not continue step for step.
    ``mismatches`` lists them (:class:`PresetMismatch`)."""

    def __init__(self, message: str, mismatches: list["PresetMismatch"] | None = None):
        super().__init__(message)
        self.mismatches = list(mismatches or [])


@dataclass(frozen=True)
class PresetMismatch:
    """The spectral norm on ``layer`` (``"conv1.weight"``) has preset ``source`` in the source
    and ``target`` in the target; ``basis`` says how the source's preset is known
    (``"recorded by dualsn"``, ``"inferred from torch parametrization keys"``, ...)."""

    layer: str
    source: str
    target: str
    basis: str

    def __str__(self) -> str:
        return (f"spectral norm of {self.layer!r}: the source's preset is {self.source!r} ({self.basis}), "
                f"the target's {self.target!r}")


@dataclass(frozen=True)
class Entry:
    """How one tensor of the target was (or will be) filled.

    ``sn`` is ``""`` for a plain tensor, else the role of the tensor in the spectral norm on
    ``param``: ``"original"`` (W), ``"u"``, ``"v"``, ``"u_extra"``, ``"v_extra"`` (the extra
    pairs of ``num_svs``) or ``"sigma"`` (``track_sigma``). ``source_key`` is None when no
    source tensor is read (``note`` says why).
    """

    key: str
    source_key: str | None
    shape: tuple[int, ...]
    transposed: bool = False
    sn: str = ""
    param: str = ""
    note: str = ""


@dataclass
class PortReport:
    """What :func:`load_state_dict` did: one :class:`Entry` per target tensor, plus the
    missing and unexpected keys it tolerated (only with ``strict=False``), the preset
    mismatches it warned about, and for a nested checkpoint the entry it loaded (``key``) and
    the key prefix it stripped."""

    source: str
    target: str
    entries: list[Entry] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    preset_mismatches: list[PresetMismatch] = field(default_factory=list)
    key: str = ""  # the entry of a nested checkpoint that was loaded ("" : the whole mapping)
    stripped_prefix: str = ""  # the key prefix that was stripped ("module.", ...)
