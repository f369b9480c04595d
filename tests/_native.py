"""Saving a model's state dict with its own framework's plain save (no dualsn record)."""

import paddle
import torch

from dualsn import port


def save_native(model, path) -> str:
    if port.framework_of(model) == "torch":
        torch.save(model.state_dict(), path)
    else:
        paddle.save(model.state_dict(), str(path))
    return str(path)
