"""Harness backend for a Hugging Face causal LM in PyTorch (see runtime.harness.Backend).

Batched on purpose: plain HF fp32 evaluation runs at ~100-150 tokens/s on a 2-core CPU one window at a
time, so perplexity runs several windows per forward pass, and TriviaQA decodes left-padded batches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from compressor.device import pick_device
from runtime.errors import EdgepackError


LOGIT_CHUNK = 64  # positions per head call in TorchBackend.log_probs


def _plain_head(model) -> bool:
    """logits == lm_head(model.model(...).last_hidden_state): a Linear head and no soft-capping."""
    return (
        isinstance(getattr(model, "lm_head", None), torch.nn.Linear)
        and hasattr(getattr(model, "model", None), "forward")
        and getattr(model.config, "final_logit_softcapping", None) is None
    )


class TorchBackend:
    def __init__(self, model, pad_id: int = 0, device: str | None = None):
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.pad_id = int(pad_id)

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, pad_id: int = 0, device: str | None = None, dtype=torch.float32
    ) -> TorchBackend:
        return cls(load_causal_lm(model_dir, dtype), pad_id, device)

    @torch.no_grad()
    def log_probs(self, ids: np.ndarray) -> np.ndarray:
        """Log-softmax rows [B, T, V]. Where the head is a plain Linear on the decoder's output (Llama-family,
        no logit soft-capping), it runs LOGIT_CHUNK positions at a time into the result, so the full
        [B, T, V] logits never exist beside it: 1 GB per copy for a 128k vocabulary at 4 x 512 tokens."""
        x = torch.as_tensor(np.asarray(ids), dtype=torch.long, device=self.device)
        if not _plain_head(self.model):
            logits = self.model(input_ids=x, use_cache=False).logits
            return torch.log_softmax(logits.float(), dim=-1).cpu().numpy()
        hidden = self.model.model(input_ids=x, use_cache=False).last_hidden_state
        out = torch.empty((*x.shape, self.model.lm_head.out_features), dtype=torch.float32)
        for start in range(0, x.shape[1], LOGIT_CHUNK):
            logits = self.model.lm_head(hidden[:, start : start + LOGIT_CHUNK]).float()
            out[:, start : start + LOGIT_CHUNK] = torch.log_softmax(logits, dim=-1).cpu()
        return out.numpy()

    @torch.no_grad()
    def greedy(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int]) -> list[list[int]]:
        from transformers import GenerationConfig

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding, so every row's next token is at the same column
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        gen = GenerationConfig(
            do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=sorted(stop_ids), pad_token_id=self.pad_id
        )
        out = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), generation_config=gen
        )
        results = []
        for row in out[:, width:].tolist():
            kept = []
            for t in row:
                if t in stop_ids:
                    break
                kept.append(t)
            results.append(kept)
        return results


def load_causal_lm(model_dir: str | Path, dtype=torch.float32):
    """Load an HF checkpoint directory for evaluation. Checkpoints whose layers were pruned to different
    widths (compressor.channels) carry their per-layer shapes in config.json and load through that module."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise EdgepackError(f"{model_dir}: not a model directory (no config.json)")
    config = AutoConfig.from_pretrained(model_dir)
    if getattr(config, "edgepack_layer_widths", None):
        from compressor.channels import load_channel_pruned

        return load_channel_pruned(model_dir, dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
