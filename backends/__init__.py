"""Conformance drivers: one per spectral-norm implementation, all behind :mod:`backends.base`.

The registry below knows every driver's name, presets and requirements without importing any
framework (einops-style). :func:`load` imports a driver only when its framework can be imported;
otherwise it returns an :class:`UnavailableDriver` whose ``unavailable()`` says why, and the
conformance tests skip with that reason.

Drivers:

==========================  ==============================  =======================================
name                        presets                         implementation
==========================  ==============================  =======================================
``reference``               torch, torch_legacy, paddle     ``dualsn.reference.ReferenceSN`` + numpy layers
``dualsn_torch``            torch, torch_legacy, paddle     ``dualsn.torch``
``dualsn_paddle``           torch, torch_legacy, paddle     ``dualsn.paddle``
``torch_parametrizations``  torch                           ``torch.nn.utils.parametrizations.spectral_norm``
``torch_legacy``            torch_legacy                    ``torch.nn.utils.spectral_norm``
``paddle_builtin``          paddle                          ``paddle.nn.utils.spectral_norm``
==========================  ==============================  =======================================
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass

from backends.base import Driver, importable

__all__ = ["DriverInfo", "DRIVERS", "UnavailableDriver", "load", "names"]


@dataclass(frozen=True)
class DriverInfo:
    name: str
    module: str
    presets: tuple[str, ...]
    requires: tuple[str, ...]
    init_from_spec: bool  # u0, v0 from spec.init_uv: comparable with the golden traces


ALL_PRESETS = ("torch", "torch_legacy", "paddle")

DRIVERS: dict[str, DriverInfo] = {
    info.name: info
    for info in (
        DriverInfo("reference", "backends.reference", ALL_PRESETS, (), True),
        DriverInfo("dualsn_torch", "backends.dualsn_torch", ALL_PRESETS, ("torch",), True),
        DriverInfo("dualsn_paddle", "backends.dualsn_paddle", ALL_PRESETS, ("paddle",), True),
        DriverInfo("torch_parametrizations", "backends.torch_parametrizations", ("torch",), ("torch",), False),
        DriverInfo("torch_legacy", "backends.torch_legacy", ("torch_legacy",), ("torch",), True),
        DriverInfo("paddle_builtin", "backends.paddle_builtin", ("paddle",), ("paddle",), True),
    )
}


class UnavailableDriver(Driver):
    """Stands in for a driver that cannot be imported; ``unavailable()`` gives the reason."""

    def __init__(self, info: DriverInfo, reason: str) -> None:
        self.name = info.name
        self.presets = info.presets
        self.requires = info.requires
        self.init_from_spec = info.init_from_spec
        self._reason = reason

    def unavailable(self) -> str:
        return self._reason

    def build(self, *args, **kwargs):
        raise RuntimeError(self._reason)


_cache: dict[str, Driver] = {}
_lock = threading.Lock()


def names() -> list[str]:
    return list(DRIVERS)


def load(name: str) -> Driver:
    """The driver called ``name`` (cached); an :class:`UnavailableDriver` if its framework
    is missing or fails to import."""
    with _lock:
        if name in _cache:
            return _cache[name]
        info = DRIVERS[name]
        driver: Driver
        missing = [m for m in info.requires if not importable(m)]
        if missing:
            driver = UnavailableDriver(info, f"{name}: {', '.join(missing)} is not installed")
        else:
            try:
                driver = importlib.import_module(info.module).DRIVER
            except Exception as exc:  # a broken install is reported, not raised
                driver = UnavailableDriver(info, f"{name}: importing {info.module} failed: {exc!r}")
        _cache[name] = driver
        return driver
