"""Checkpoint files: writing. Atomic, exclusive unless overwriting, modes as for any new file."""

from __future__ import annotations

import collections
import errno
import os
import re
import secrets
import stat
import time
from typing import Any, Mapping

from dualsn.adapters import FRAMEWORKS, framework_of
from dualsn.adapters import adapter as _adapter
from dualsn.keys import join_key
from dualsn.port._keys import _check_preset
from dualsn.port._metadata import METADATA_ATTRIBUTE, METADATA_FORMAT, checkpoint_metadata
from dualsn.port._models import _sn_dims, presets_of
from dualsn.port._pdparams import _pdparams_data, _save_pdparams
from dualsn.port._torchfile import _save_torch, _torch_data


TEMP_SUFFIX = ".dualsn-tmp"
"""save_checkpoint writes ``DIR/.NAME.<pid>-<8 hex digits>.dualsn-tmp`` first, then moves it to
``DIR/NAME``."""


STALE_TEMP_SECONDS = 60
"""A temporary file of a process that no longer exists, unchanged for this long, was left by a
killed writer: the next save_checkpoint to the same path removes it."""


_TEMP_MIDDLE = re.compile(r"(\d+)-[0-9a-f]{8}")
_NO_HARD_LINKS = {getattr(errno, name) for name in ("EPERM", "EOPNOTSUPP", "ENOTSUP", "ENOSYS", "EMLINK",
                                                      "EXDEV") if hasattr(errno, name)}


def _temp_owner(name: str) -> tuple[str, int] | None:
    """(checkpoint name, writer's pid) of a temporary file name of save_checkpoint, or None."""
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return None
    base, _, middle = name[1: -len(TEMP_SUFFIX)].rpartition(".")
    match = _TEMP_MIDDLE.fullmatch(middle)
    return (base, int(match.group(1))) if base and match else None


def _process_exists(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":  # no signal-0 probe: only the age decides
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _remove_stale_temps(directory: str, base: str) -> None:
    """Remove the temporary files killed writers left for ``base`` in ``directory``."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    now = time.time()
    for name in names:
        owner = _temp_owner(name)
        if owner is None or owner[0] != base or _process_exists(owner[1]):
            continue
        full = os.path.join(directory, name)
        try:
            info = os.lstat(full)
            if stat.S_ISREG(info.st_mode) and now - info.st_mtime >= STALE_TEMP_SECONDS:
                os.unlink(full)
        except OSError:
            pass  # gone already, or not ours to remove


def _serializable(state_dict: Mapping[str, Any], framework: str, meta: dict | None) -> collections.OrderedDict:
    data = _torch_data(state_dict) if framework == "torch" else _pdparams_data(state_dict)
    if meta is not None:
        setattr(data, METADATA_ATTRIBUTE, meta)
    return data


def _metadata_for(framework: str, presets: Mapping[str, str] | None, dims: Mapping | None) -> dict:
    from dualsn import __version__

    meta: dict[str, Any] = {"format": METADATA_FORMAT, "version": __version__, "framework": framework}
    if presets is not None:
        meta["presets"] = {str(k): _check_preset(v, f"presets[{k!r}]") if v != "custom" else v
                           for k, v in presets.items()}
    if dims:
        meta["dims"] = {str(k): ("conv" if d in (None, "conv") else int(d)) for k, d in dims.items()}
    return meta


def _write_temp(data: dict, framework: str, directory: str, base: str) -> str:
    """Write ``data`` to a new temporary file next to the checkpoint; returns its path. Created
    with mode 0o666, so the umask gives it the mode of any new file (0o644 under umask 022)."""
    tmp = os.path.join(directory, f".{base}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            (_save_torch if framework == "torch" else _save_pdparams)(data, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _publish_new(tmp: str, path: str, shown: str) -> None:
    """Give ``tmp`` the name ``path`` unless ``path`` exists, atomically: a hard link fails if
    the name is taken. Where hard links are not supported the name is claimed with O_EXCL
    first, and the file then moved over the claim."""
    exists = FileExistsError(
        f"{shown} was created while the checkpoint was being written; it was left alone (pass "
        "overwrite=True to replace it)")
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise exists from None
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            raise exists from None
        os.replace(tmp, path)
        return
    _unlink_quietly(tmp)


def _replace(tmp: str, path: str) -> None:
    """Move ``tmp`` over ``path``, giving it the mode ``path`` had."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        info = None
    if info is not None and stat.S_ISREG(info.st_mode):
        os.chmod(tmp, stat.S_IMODE(info.st_mode))
    os.replace(tmp, path)


def _sync_directory(directory: str) -> None:
    """Make the new name durable (POSIX); best effort."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    state_dict, path: str | os.PathLike, framework: str, *, overwrite: bool = False,
    presets: Mapping[str, str] | None = None,
) -> None:
    """Write ``state_dict`` as a ``framework`` checkpoint (``"torch"``: ``torch.save``;
    ``"paddle"``: what ``paddle.save`` writes for a state dict: a protocol-4 pickle of numpy
    arrays plus its parameter-name table).

    ``state_dict`` may be a model (a ``torch.nn.Module`` or a ``paddle.nn.Layer``): its state
    is written, and the preset and dim of each of its spectral norms (:func:`presets_of`) are
    recorded in the file (:data:`METADATA_ATTRIBUTE`), so a later port knows them instead of
    inferring them from the keys. For a state dict, ``presets`` (``{"conv.weight": "torch"}``)
    records them; a state dict read by :func:`load_checkpoint` keeps the record it had.

    Atomic: written to a temporary file in the same directory (``.NAME.<pid>-<hex>.dualsn-tmp``,
    see :data:`TEMP_SUFFIX`), then moved to ``path``, so ``path`` never holds a partial file;
    the temporary file a killed writer left for ``path`` is removed. Without ``overwrite`` an
    existing ``path`` is refused (FileExistsError), also one created while this call was
    writing: the file is published with a hard link, which cannot replace anything. A new file
    gets the mode the umask allows (0o644 under umask 022); an overwritten one keeps its mode.
    A write error (a full disk, a read-only directory) raises OSError and leaves no file behind.
    """
    if framework not in FRAMEWORKS:
        raise ValueError(f"Expected framework to be one of {FRAMEWORKS}, but got framework={framework!r}")
    path = os.fspath(path)
    shown = os.fsdecode(path)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{shown} exists; pass overwrite=True to replace it")
    dims = None
    if not isinstance(state_dict, Mapping):
        model = state_dict
        state_dict = _adapter(framework_of(model)).state(model)  # TypeError for anything else
        if presets is None:
            presets = presets_of(model)
        dims = {join_key(*key): dim for key, dim in _sn_dims(model).items()}
    elif presets is None:
        recorded = checkpoint_metadata(state_dict)
        presets = recorded.get("presets") if recorded else None
        dims = recorded.get("dims") if recorded else None
    data = _serializable(state_dict, framework, _metadata_for(framework, presets, dims))
    directory, base = os.path.split(os.path.abspath(path))
    _remove_stale_temps(directory, base)
    tmp = _write_temp(data, framework, directory, base)
    try:
        if overwrite:
            _replace(tmp, path)
        else:
            _publish_new(tmp, path, shown)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _sync_directory(directory)
