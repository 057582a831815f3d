"""Choosing where the tensors live."""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch

from aadetect.errors import UserError


def resolve_device(name: str) -> str:
    """'auto' picks CUDA when present; an explicit device must exist, or the user is told so."""
    name = name.strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if not match:
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available on this machine (use --device cpu)")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    return name


@contextmanager
def flush_denormals():
    """Denormal floats as zero, for training only: epochs slowed about 2x as the weights converged
    without it. Scoring, and the KDE and thresholds fitted after training, keep the default float
    handling (set back to it on exit), so a model's numbers do not depend on the process that made them."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


@contextmanager
def exact_math(device: str):
    """On CUDA: deterministic cuDNN kernels in full float32 (no TF32). The same seed then gives the
    same model, and GPU scores agree with CPU scores; TF32 convolutions moved far images' log-densities
    by more than 0.1%. Elsewhere a no-op."""
    if not str(device).startswith("cuda"):
        yield
        return
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        yield
