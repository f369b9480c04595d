"""The torch checkpoint format (``torch.save``'s zip archive, or its legacy pickle): read with
``torch.load(weights_only=True)`` after the size checks, written with ``torch.save``. Only this
module and :mod:`dualsn.port._pdparams` know a file format; torch is imported when a torch file
is read or written."""

from __future__ import annotations

import collections
import sys
from typing import Any, Mapping

import numpy as np

from dualsn.port._limits import SIZE_SLACK, _brief
from dualsn.port._tensors import _to_numpy
from dualsn.port._types import CheckpointError

_ZIP = b"PK\x03\x04"
_TORCH_LEGACY = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # torch.save's pre-1.6 magic number


def _check_zip_size(file, size: int, shown: str) -> None:
    """Refuse a zip whose entries unpack to more than the file holds: torch stores its tensors
    uncompressed, so only a compressed bomb does."""
    import zipfile

    try:
        with zipfile.ZipFile(file) as archive:
            unpacked = sum(entry.file_size for entry in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{shown}: not a readable zip archive ({_brief(str(e))})") from None
    finally:
        file.seek(0)
    if unpacked > size + SIZE_SLACK:
        raise CheckpointError(
            f"{shown}: its zip entries unpack to {unpacked} bytes, more than the file's {size} "
            f"(+{SIZE_SLACK}): torch stores tensors uncompressed; refused")


def _load_torch(file, size: int, shown: str) -> dict:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{shown}: reading a torch checkpoint needs torch installed") from None
    if file.read(len(_ZIP)) == _ZIP:
        _check_zip_size(file, size, shown)
    file.seek(0)
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch refuses
        raise CheckpointError(f"{shown}: torch.load(weights_only=True) refused it: {_brief(str(e), 400)}") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{shown}: holds a {type(obj).__name__}, not a state dict")
    return obj


def _torch_view_problem(t) -> str | None:
    """Why a loaded torch tensor spans more memory than its storage holds (stride 0 or
    overlapping strides: materializing it would amplify the file), or None."""
    torch = sys.modules["torch"]
    if t.layout != torch.strided:
        return None
    logical, stored = t.numel() * t.element_size(), t.untyped_storage().nbytes()
    if logical > stored + SIZE_SLACK:
        return (f"spans {logical} bytes over {stored} bytes of storage (stride 0 or overlapping "
                "strides); refused")
    return None


def _torch_data(state_dict: Mapping[str, Any]) -> collections.OrderedDict:
    """What ``torch.save`` writes for ``state_dict``: detached CPU tensors."""
    import torch

    return collections.OrderedDict(
        (k, v.detach().cpu() if type(v).__module__.startswith("torch") else torch.from_numpy(
            np.array(_to_numpy(v))))
        for k, v in state_dict.items()
    )


def _save_torch(data, file) -> None:
    sys.modules["torch"].save(data, file)
