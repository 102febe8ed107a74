"""Device choice for the compressor: CUDA when present (users compress 1B-8B models on GPUs), else CPU."""

from __future__ import annotations

import os


def pick_device(requested: str | None = None) -> str:
    import torch

    requested = requested or os.environ.get("EDGEPACK_DEVICE")
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"
