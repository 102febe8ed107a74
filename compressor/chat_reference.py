"""The source model's side of the chat fidelity metric (torch): its greedy replies to the chat prompts and
its top-k log-probs on every reply token, packed as a runtime.reference.ChatReference.

Generation is batched with left padding (transformers' `generate`, greedy); the log-probs are the very
logits `generate` chose each token from, so the stored top-1 is the reply token. Cached per work directory
(`chat_reference_for`), so exports and evaluations after the first are free.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from runtime import metrics
from runtime.harness import EvalLimits, chat_prompt_ids
from runtime.progress import progress_bar
from runtime.reference import ChatReference
from runtime.tokenizer import TextTokenizer


def stop_ids_of(model, tokenizer: TextTokenizer) -> set[int]:
    """End-of-reply ids: the model's generation_config EOS ids plus the tokenizer's EOS."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_id is not None:
        ids.add(int(tokenizer.eos_id))
    return ids


@torch.no_grad()
def greedy_with_logprobs(
    model, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int], pad_id: int, k: int
) -> tuple[list[list[int]], list[tuple[np.ndarray, np.ndarray]]]:
    """One left-padded batch: each prompt's greedy reply (its stop token kept, nothing after it) and the
    top-k ids / log-probs [len(reply), k] of the distribution each reply token was chosen from."""
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=sorted(stop_ids),
        pad_token_id=pad_id,
        return_dict_in_generate=True,
        output_logits=True,
    )
    device = next(model.parameters()).device
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    logp = torch.log_softmax(torch.stack(out.logits, 1).float(), -1).cpu().numpy()  # [B, steps, V]
    replies, tops = [], []
    for b, row in enumerate(out.sequences[:, width:].tolist()):
        end = next((j + 1 for j, t in enumerate(row) if t in stop_ids), len(row))
        replies.append(row[:end])
        tops.append(metrics.topk_reference(logp[b, :end], k))
    return replies, tops


# Rows per generate() call. A step of transformers' greedy loop on a CPU is mostly one pass over the float32
# weights whatever the row count (SmolLM2-135M on 2 AVX2 cores: ~200 ms at 4 rows, ~400 ms at 16), so more rows
# per call is most of the speed: the main job's 32 source replies took 176 s at 4 rows, 75-104 s at 16 (the box
# busy or not). The bound is memory: every step's full logits are kept, rows x new tokens x vocabulary
# floats, twice (logits and log-probs).
GENERATION_ROWS = 16
LOGITS_BUDGET_BYTES = 1 << 30


def generation_rows(limits: EvalLimits, vocab_size: int) -> int:
    """Prompts per generate() call: up to GENERATION_ROWS while the kept logits fit LOGITS_BUDGET_BYTES,
    never fewer than limits.batch_size."""
    per_row = 2 * limits.chat_max_new_tokens * vocab_size * 4
    return max(limits.batch_size, min(GENERATION_ROWS, LOGITS_BUDGET_BYTES // per_row))


def build_chat_reference(
    model, tokenizer: TextTokenizer, limits: EvalLimits, k: int = 32, progress: bool = True, turns=None
) -> ChatReference:
    """The chat reference of an (uncompressed) torch model for `limits` (prompts: harness.chat_prompt_ids),
    or for these user `turns` (each one user message through the chat template)."""
    if turns is None:
        prompts = chat_prompt_ids(tokenizer, limits)
    else:
        prompts = [tokenizer.encode_chat([{"role": "user", "content": t}], add_generation_prompt=True) for t in turns]
    stops = stop_ids_of(model, tokenizer)
    order = np.argsort([len(p) for p in prompts], kind="stable")  # similar lengths together: less padding
    replies: list = [None] * len(prompts)
    tops: list = [None] * len(prompts)
    rows = generation_rows(limits, model.get_output_embeddings().weight.shape[0])
    with progress_bar(f"source chat replies ({len(prompts)} prompts)", len(prompts), progress) as advance:
        for start in range(0, len(prompts), rows):
            idx = order[start : start + rows]
            r, t = greedy_with_logprobs(
                model, [prompts[i] for i in idx], limits.chat_max_new_tokens, stops, tokenizer.pad_id, k
            )
            for i, ri, ti in zip(idx, r, t):
                replies[i], tops[i] = ri, ti
            advance(len(idx))
    return ChatReference.from_replies(prompts, replies, tops)


def chat_reference_for(
    model_dir: Path, workdir: Path, limits: EvalLimits, tokenizer: TextTokenizer, k: int = 32, log=print
) -> ChatReference:
    """The source's chat reference for these limits, cached in the work directory's evals/."""
    from compressor.recipe import settings_hash
    from compressor.torch_backend import load_causal_lm
    from compressor.workdir import Workdir
    from runtime.reference import Reference

    key = settings_hash(
        {
            "model": str(model_dir),
            "chat": limits.chat,
            "prompts": limits.chat_prompts,
            "max_new": limits.chat_max_new_tokens,
            "prompt_tokens": limits.chat_prompt_tokens,
            "k": k,
        }
    )
    path = Workdir(workdir).evals / f"chat-reference-{key}.safetensors"
    if not path.exists():  # a sweep's other work directories may have made it already: same source, same key
        sibling = next(iter(sorted(Path(workdir).parent.glob(f"*/evals/{path.name}"))), None)
        if sibling is not None:
            from runtime.fileio import atomic_write_bytes

            atomic_write_bytes(path, sibling.read_bytes())
    if path.exists():
        return Reference.load(path).chat
    log(f"greedy chat replies of {model_dir} (top-{k} log-probs)")
    chat = build_chat_reference(load_causal_lm(model_dir), tokenizer, limits, k)
    # stored inside a minimal Reference file (one dummy window) so one reader validates both
    dummy = np.zeros((1, 2), np.int64)
    Reference(dummy, np.zeros((1, 1, 1), np.int32), np.zeros((1, 1, 1), np.float32), chat).save(path)
    return chat
