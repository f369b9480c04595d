"""Checkpoint files: reading. Only regular files; the format is decided by the content; nothing
from the file runs; a file decodes to at most its own size of tensor data."""

from __future__ import annotations

import collections
import os
import stat
from typing import Any, Mapping

import numpy as np

from dualsn.port._keys import _dotted
from dualsn.port._limits import MAX_NESTING, _brief
from dualsn.port._metadata import METADATA_ATTRIBUTE, _checked_metadata
from dualsn.port._pdparams import _load_pdparams
from dualsn.port._tensors import _dtype_name, _is_tensor
from dualsn.port._torchfile import _TORCH_LEGACY, _ZIP, _load_torch, _torch_view_problem
from dualsn.port._types import CheckpointError


TORCH_SUFFIXES = (".pt", ".pth")
PADDLE_SUFFIXES = (".pdparams",)
_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
)


def _open_regular(path, shown: str):
    """(binary file, size) for ``path``; CheckpointError for anything but a regular file.
    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "not a file")
            raise CheckpointError(f"{shown}: not a regular file ({kind}): only regular files are read")
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), info.st_size
    except BaseException:
        os.close(fd)
        raise


def _content_format(head: bytes) -> str | None:
    if head.startswith(_ZIP) or head.startswith(_TORCH_LEGACY):
        return "torch"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # a pickle, protocol 2-5
        return "paddle"
    return None


def _checked_format(head: bytes, shown: str) -> str:
    """The format of a file starting with ``head``; a .pt/.pth/.pdparams suffix that the
    content contradicts is an error."""
    found = _content_format(head)
    suffix = os.path.splitext(shown)[1].lower()
    if suffix in TORCH_SUFFIXES and found != "torch":
        if found is None:
            raise CheckpointError(f"{shown}: not a torch checkpoint (neither a zip archive nor a pickle)")
        raise CheckpointError(
            f"{shown}: not a torch checkpoint: it is a pickle that is not torch's (a Paddle .pdparams file?)")
    if suffix in PADDLE_SUFFIXES and found != "paddle":
        what = ("a zip archive (a torch checkpoint?)" if head.startswith(_ZIP) else
                "a torch checkpoint (legacy format)" if found == "torch" else "not a pickle")
        raise CheckpointError(f"{shown}: not a Paddle .pdparams checkpoint: it is {what}")
    if found is None:
        raise CheckpointError(
            f"{shown}: unknown checkpoint format (expected a torch .pt/.pth or a Paddle .pdparams file)")
    return found


def detect_format(path: str | bytes | os.PathLike) -> str:
    """``"torch"`` (a zip archive, or torch's legacy pickle format) or ``"paddle"`` (any other
    pickle), decided by the file's content, the same for str, bytes and PathLike paths.

    Raises FileNotFoundError, or CheckpointError for a file that is not a regular file, whose
    content fits neither format, or whose .pt/.pth/.pdparams suffix the content contradicts.
    """
    shown = os.fsdecode(path)
    file, _ = _open_regular(path, shown)
    with file:
        return _checked_format(file.read(len(_TORCH_LEGACY)), shown)


class _TreeCheck:
    """Walks what a checkpoint decoded to (containers, tensors, plain values) and returns it
    rebuilt: Paddle's (name, array) pairs become arrays, shared containers stay shared. Refuses
    cycles, nesting deeper than MAX_NESTING, keys that are neither str nor int, arrays of
    Python objects and torch views larger than their storage."""

    def __init__(self, shown: str, framework: str):
        self.shown, self.framework = shown, framework
        self.done: dict[int, Any] = {}
        self.active: set[int] = set()

    def fail(self, message: str):
        raise CheckpointError(f"{self.shown}: {message}")

    def visit(self, obj, path: str = "", depth: int = 0):
        where = repr(path) if path else "the top level"
        if self.framework == "paddle" and isinstance(obj, tuple) and len(obj) == 2 \
                and isinstance(obj[0], str) and isinstance(obj[1], np.ndarray):
            obj = obj[1]  # a nested Paddle tensor
        if _is_tensor(obj):
            return self.tensor(obj, where)
        if not isinstance(obj, (Mapping, list, tuple)):
            return obj
        ident = id(obj)
        if ident in self.done:
            return self.done[ident]
        if ident in self.active:
            self.fail(f"the container at {where} contains itself: not a state dict")
        if depth >= MAX_NESTING:
            self.fail(f"containers nested more than {MAX_NESTING} levels deep (at {where})")
        self.active.add(ident)
        if isinstance(obj, Mapping):
            result = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
            for key, value in obj.items():
                if not isinstance(key, (str, int)) or isinstance(key, bool):
                    self.fail(f"key {_brief(repr(key))} at {where} is a {type(key).__name__}, "
                              "not a str or int")
                result[key] = self.visit(value, _dotted(path, key), depth + 1)
        else:
            items = [self.visit(value, _dotted(path, i), depth + 1) for i, value in enumerate(obj)]
            result = items if isinstance(obj, list) else tuple(items)
        self.active.discard(ident)
        self.done[ident] = result
        return result

    def tensor(self, obj, where: str):
        if _dtype_name(obj) == "object":
            self.fail(f"entry {where} is an array of Python objects, not tensor data")
        if type(obj).__module__.startswith("torch"):
            problem = _torch_view_problem(obj)
            if problem:
                self.fail(f"entry {where} {problem}")
        return obj


def load_checkpoint(path: str | bytes | os.PathLike) -> dict:
    """Read a torch (``.pt``/``.pth``) or Paddle (``.pdparams``) checkpoint.

    Only regular files are read (a FIFO or a device is refused at once); the format is
    :func:`detect_format`, decided by the content. No code from the file runs: torch files go
    through ``torch.load(weights_only=True)``, Paddle files through an unpickler that admits
    only what ``paddle.save`` writes (containers, numpy arrays and scalars, and its (name,
    array) pairs for nested tensors). A file never decodes to more tensor data than its own
    size (+ :data:`SIZE_SLACK`): that is checked before the memory is allocated.

    Returns the checkpoint as it was written: ``{name: tensor}`` for a state dict (torch
    tensors, or numpy arrays for Paddle files), or the nested containers of a trainer's file
    (``{"netG": {...}, "epoch": 3}``), with Paddle's nested tensors as numpy arrays, as
    ``paddle.load(path, return_numpy=True)`` gives them. :func:`flatten_state_dict` (which
    :func:`load_state_dict` applies) joins nested keys with dots. Raises FileNotFoundError, or
    CheckpointError for a file that is not a checkpoint or holds anything else.
    """
    shown = os.fsdecode(path)
    file, size = _open_regular(path, shown)
    with file:
        framework = _checked_format(file.read(len(_TORCH_LEGACY)), shown)
        file.seek(0)
        state = _load_torch(file, size, shown) if framework == "torch" else _load_pdparams(file, size, shown)
    meta = getattr(state, "__dict__", {}).get(METADATA_ATTRIBUTE)
    result = _TreeCheck(shown, framework).visit(state)
    meta = _checked_metadata(meta)
    if meta is not None and isinstance(result, collections.OrderedDict):
        setattr(result, METADATA_ATTRIBUTE, meta)
    return result
