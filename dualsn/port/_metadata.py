"""dualsn's record in a checkpoint file: the presets and dims of its spectral norms."""

from __future__ import annotations

from typing import Mapping

from dualsn.port._keys import PRESET_NAMES


METADATA_ATTRIBUTE = "_dualsn"
""":func:`save_checkpoint` writes the state dict as an ``OrderedDict`` with this attribute:
``{"format": 1, "version": dualsn's version, "framework": ..., "presets": {"conv.weight":
"torch", ...}, "dims": {"conv.weight": 0, ...}}`` (dims only when saved from a model; a
convolution operator norm's dim is ``"conv"``). It is pickled state, not a key: ``torch.load``
(also with ``weights_only=True``) and ``paddle.load`` restore or skip it, and
``load_state_dict``/``set_state_dict`` never see it, exactly as torch's own ``_metadata``."""


METADATA_FORMAT = 1


def _plain(value, depth: int = 0) -> bool:
    """Whether ``value`` is plain data (str, int, float, bool, None, and dicts/lists of them)."""
    if depth > 8:
        return False
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items())
    return False


def _checked_metadata(meta) -> dict | None:
    """dualsn's record as a plain dict, or None when there is none or it is malformed (a file
    is then read as if dualsn had not written it: its presets are inferred)."""
    if not isinstance(meta, Mapping) or not _plain(meta):
        return None
    meta = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in meta.items()}
    presets = meta.get("presets", {})
    if not isinstance(presets, dict) or not all(v in PRESET_NAMES + ("custom",) for v in presets.values()):
        return None
    dims = meta.get("dims", {})
    if not isinstance(dims, dict) or not all(d == "conv" or (isinstance(d, int) and not isinstance(d, bool))
                                             for d in dims.values()):
        return None
    return meta


def checkpoint_metadata(checkpoint) -> dict | None:
    """The record dualsn wrote into a checkpoint (:data:`METADATA_ATTRIBUTE`), as read by
    :func:`load_checkpoint`, or None (a file dualsn did not write, or a mapping that lost it)."""
    return _checked_metadata(getattr(checkpoint, "__dict__", {}).get(METADATA_ATTRIBUTE))
