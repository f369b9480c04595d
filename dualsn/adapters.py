"""The registry of backend adapters: how the tools (port, report, cli, demo) reach a framework.

Modelled on einops' ``_backends.py``: the registry never imports a framework. A backend's
adapter (its public, mirrored interface for the tools; see ``dualsn/torch_adapter.py``) is
imported by name, lazily, the first time a tool asks for it; :func:`framework_of` only looks
at frameworks that are already imported (a torch model implies that torch is), so telling a
model's framework never imports one.

Adding a backend: add its name to :data:`FRAMEWORKS` and give it an adapter module with the
same public names as the others (the module path is built in :func:`adapter_module`).
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["FRAMEWORKS", "adapter", "adapter_module", "framework_of", "tensor_framework"]

FRAMEWORKS = ("torch", "paddle")


def adapter_module(name: str) -> str:
    """The dotted path of the adapter of the framework ``name``."""
    return f"dualsn.{name}.adapter"


def adapter(name: str):
    """The adapter module of the framework ``name`` (``"torch"`` or ``"paddle"``); importing
    it imports that framework."""
    if name not in FRAMEWORKS:
        raise ValueError(f"Expected a framework in {FRAMEWORKS}, but got {name!r}")
    return importlib.import_module(adapter_module(name))


def framework_of(model) -> str:
    """``"torch"`` for a ``torch.nn.Module``, ``"paddle"`` for a ``paddle.nn.Layer``.

    Only frameworks already imported are asked (an object of a framework implies that the
    framework is imported), so this never imports one. TypeError for anything else."""
    for name in FRAMEWORKS:
        if sys.modules.get(name) is not None and adapter(name).is_model(model):
            return name
    raise TypeError(
        f"Expected a torch.nn.Module or a paddle.nn.Layer, but got {type(model).__name__}"
    )


def tensor_framework(value) -> str | None:
    """The framework whose tensor type ``value`` has (by the type's top-level module), or
    None (a numpy array, anything else)."""
    top = type(value).__module__.split(".")[0]
    return top if top in FRAMEWORKS else None
