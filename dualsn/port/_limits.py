"""Limits on what a checkpoint may hold, shared by reading, flattening and selecting."""

from __future__ import annotations


SIZE_SLACK = 64 * 1024
"""Bytes of tensor data a checkpoint may decode to beyond its own size. Pickled arrays and
torch's zip entries carry their bytes, so a real checkpoint decodes to less than its size; a
file that would decode to more (by using the same data again, or by asking for memory without
data) is refused before that memory is allocated."""


MAX_NESTING = 100
"""Containers nested deeper than this in a checkpoint are refused."""


def _brief(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
