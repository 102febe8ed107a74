"""Rotary position caches for GroupQueryAttention (do_rotary=1), computed once at export time.

GQA rotates q and k itself from `cos_cache` / `sin_cache` [max_len, rotary_dim / 2], indexed by absolute
position. Baking the caches means any RoPE variant whose inverse frequencies do not depend on the sequence
length (default, linear, llama3) costs nothing at run time and needs no rope code in the runtime.

The inverse frequencies follow transformers' formulas step by step in float32 (the model was trained and
is evaluated with those float32 values); the angles `position * inv_freq` and their cos/sin are then taken
in float64 and rounded once, which matches HF's float32 product for small positions and is more accurate
for large ones. Written by hand because transformers is not a dependency of the graph builder's output
and its rope functions need torch tensors and a config object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from runtime.errors import EdgepackError


@dataclass(frozen=True)
class RopeSpec:
    theta: float = 10000.0
    kind: str = "default"  # "default", "linear" or "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    partial_rotary_factor: float = 1.0


def rope_from_hf(config) -> RopeSpec:
    """RopeSpec from a transformers config object or a config.json dict (old `rope_scaling` + `rope_theta`
    or transformers 5 `rope_parameters`)."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    params = dict(get("rope_parameters") or {})
    scaling = get("rope_scaling") or {}
    if scaling:
        params = {**params, **scaling}
    theta = float(params.get("rope_theta", get("rope_theta", 10000.0) or 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise EdgepackError(
            f"rope_type={kind!r}: only default, linear and llama3 RoPE are supported by the ONNX export"
        )
    return RopeSpec(
        theta=theta,
        kind=kind,
        factor=float(params.get("factor", 1.0) or 1.0),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings") or get("max_position_embeddings", 8192) or 8192
        ),
        partial_rotary_factor=float(params.get("partial_rotary_factor", get("partial_rotary_factor", 1.0) or 1.0)),
    )


def inv_freq(rope: RopeSpec, head_dim: int) -> np.ndarray:
    """float32 [rotary_dim / 2], as transformers computes it (including llama3 frequency smoothing)."""
    dim = int(head_dim * rope.partial_rotary_factor)
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    freq = (np.float32(1.0) / np.power(np.float32(rope.theta), exponents)).astype(np.float32)
    if rope.kind == "linear":
        return (freq / np.float32(rope.factor)).astype(np.float32)
    if rope.kind == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = (2 * math.pi / freq).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, freq / np.float32(rope.factor), freq).astype(np.float32)
        smooth = ((old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)).astype(
            np.float32
        )
        smoothed = ((1 - smooth) * scaled / np.float32(rope.factor) + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return freq


def cos_sin_cache(rope: RopeSpec, head_dim: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 [max_len, rotary_dim / 2] for GQA's cos_cache / sin_cache (non-interleaved halves,
    i.e. HF's rotate_half convention)."""
    angles = np.arange(max_len, dtype=np.float64)[:, None] * inv_freq(rope, head_dim).astype(np.float64)[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
