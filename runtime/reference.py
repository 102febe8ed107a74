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
    def load(cls, path: str | Path, vocab_size: int | None = None) -> Reference:
        """Read and check a reference file: the three arrays present with the right dtypes and consistent
        shapes ([n, ctx] windows, [n, ctx-1, k] top ids and log-probs), token ids inside [0, vocab_size),
        log-probs finite. Anything else raises one EdgepackError naming the file."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            t = load_file(str(path))
        except FileNotFoundError:
            raise EdgepackError(f"{path}: reference file not found") from None
        except (SafetensorError, OSError, ValueError, TypeError, KeyError, MemoryError) as e:
            raise EdgepackError(f"{path}: not a valid reference file ({str(e).splitlines()[0][:200]})") from None
        ref = cls(
            *(
                _array(t, name, dtype, path)
                for name, dtype in (("window_ids", np.int64), ("top_ids", np.int32), ("top_logp", np.float32))
            )
        )
        ref.check(path, vocab_size)
        return ref

    def check(self, where, vocab_size: int | None = None) -> None:
        w, ids, lp = self.window_ids, self.top_ids, self.top_logp
        if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 2:
            raise EdgepackError(f"{where}: reference window_ids must be [windows, ctx >= 2], got {list(w.shape)}")
        n, ctx = w.shape
        if ids.ndim != 3 or ids.shape[:2] != (n, ctx - 1) or ids.shape[2] < 1 or lp.shape != ids.shape:
            raise EdgepackError(
                f"{where}: reference top_ids/top_logp must be [{n}, {ctx - 1}, k], got "
                f"{list(ids.shape)} and {list(lp.shape)}"
            )
        hi = vocab_size if vocab_size is not None else np.iinfo(np.int32).max
        for name, arr in (("window_ids", w), ("top_ids", ids)):
            if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= hi):
                raise EdgepackError(f"{where}: reference {name} holds token ids outside [0, {hi})")
        if lp.size and not np.isfinite(lp).all():
            raise EdgepackError(f"{where}: reference top_logp must be finite log-probabilities")


def _array(tensors: dict, name: str, dtype, where) -> np.ndarray:
    if name not in tensors:
        raise EdgepackError(f"{where}: reference file lacks the {name!r} array")
    arr = tensors[name]
    if arr.dtype != dtype:
        raise EdgepackError(f"{where}: reference {name} is {arr.dtype}, expected {np.dtype(dtype).name}")
    return arr
