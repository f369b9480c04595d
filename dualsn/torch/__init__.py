"""PyTorch backend of dualsn (being split into modules; see dualsn/torch/_sn.py)."""

from dualsn.torch._sn import *  # noqa: F401,F403
from dualsn.torch._sn import __all__  # noqa: F401
from dualsn.torch import _sn as _impl


def __getattr__(name):
    return getattr(_impl, name)
