"""Reference log-probabilities of the uncompressed source model, so the runtime can compute KL divergence
and top-1 agreement with no torch and no source model.

Stored compactly in one safetensors file: the evaluation windows' token ids, and for every scored position
the reference's top-k token ids (int32) and log-probs (float32). See `runtime.metrics.topk_kl` for the error
this introduces (a lower bound of the full KL; the tail beyond k is folded into one 'rest' bucket).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import EdgepackError


@dataclass
class Reference:
    window_ids: np.ndarray  # [n_windows, ctx] int64: the WikiText test windows
    top_ids: np.ndarray  # [n_windows, ctx-1, k] int32: reference top-k ids at each scored position
    top_logp: np.ndarray  # [n_windows, ctx-1, k] float32

    @property
    def k(self) -> int:
        return int(self.top_ids.shape[-1])

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save

        from runtime.fileio import atomic_write_bytes

        data = save(
            {
                "window_ids": np.ascontiguousarray(self.window_ids.astype(np.int64)),
                "top_ids": np.ascontiguousarray(self.top_ids.astype(np.int32)),
                "top_logp": np.ascontiguousarray(self.top_logp.astype(np.float32)),
            },
            metadata={"format": "edgepack-reference-1"},
        )
        atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path: str | Path) -> "Reference":
        from safetensors.numpy import load_file

        try:
            t = load_file(str(path))
            return cls(t["window_ids"], t["top_ids"], t["top_logp"])
        except FileNotFoundError:
            raise EdgepackError(f"{path}: reference file not found") from None
        except Exception as e:
            raise EdgepackError(f"{path}: not a valid reference file ({e})") from None
