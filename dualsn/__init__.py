"""dualsn: spectral normalization that gives the same numbers in PyTorch and PaddlePaddle.

``import dualsn`` imports neither framework. The backends are ``dualsn.torch`` and
``dualsn.paddle``; the algorithm they share is ``dualsn.spec``.
"""

from dualsn.spec import PRESETS, Spec, manual_seed

__all__ = ["PRESETS", "Spec", "manual_seed", "__version__"]
__version__ = "0.1.0"
