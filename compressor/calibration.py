"""Calibration and training token ids from text, shared by every stage that needs data."""

from __future__ import annotations

import numpy as np
import torch

from runtime.datasets import calibration_text
from runtime.errors import EdgepackError
from runtime.tokenizer import TextTokenizer


def calibration_ids(
    tokenizer: TextTokenizer, dataset: str = "wikitext2-valid", samples: int = 32, seqlen: int = 512, seed: int = 0
) -> torch.Tensor:
    """`samples` windows of `seqlen` tokens at seeded random offsets in the calibration text (the GPTQ /
    WANDA recipe), as a LongTensor [samples, seqlen]. Never the evaluation split."""
    ids = tokenizer.encode(calibration_text(dataset), add_special_tokens=False)
    if len(ids) < seqlen + 1:
        raise EdgepackError(f"{dataset}: only {len(ids)} tokens, fewer than one window of {seqlen}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - seqlen, size=samples)
    return torch.tensor(np.stack([ids[s : s + seqlen] for s in starts]), dtype=torch.long)
