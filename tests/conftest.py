"""Shared test settings."""

import importlib.util

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Small models: extra threads only cost time, and the 2 cores are shared with other
    test processes. Torch is touched only if it is installed (``import dualsn`` must not
    need it)."""
    if importlib.util.find_spec("torch") is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
