"""aadetect: find anomalous images with an autoencoder (optionally adversarial) and a latent-space density.

    from aadetect import Detector, TrainConfig, train, calibrate, evaluate

The names are imported when first used, so ``import aadetect`` and ``aadetect --help`` stay
instant (no torch, no scipy).
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Detector", "TrainConfig", "UserError", "train", "calibrate", "evaluate"]

_WHERE = {"Detector": "aadetect.scoring", "TrainConfig": "aadetect.config", "UserError": "aadetect.errors",
          "train": "aadetect.pipeline", "calibrate": "aadetect.pipeline", "evaluate": "aadetect.pipeline"}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'aadetect' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
