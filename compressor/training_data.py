"""Training and calibration examples for the LoRA, GPTQ and EoRA stages.

TriviaQA split (deterministic, recorded in each stage record): the harness evaluates on the 728 questions
that have a passage, so training uses only the other 272 (closed-book prompts, answer = the alias that best
represents the alias list). Evaluation questions are never trained on. Open-book training would need
passages that are not evaluation questions; the shipped file has none, so it is refused with a clear error.
"""

from __future__ import annotations

import numpy as np

from runtime.datasets import calibration_text, triviaqa_records
from runtime.errors import EdgepackError
from runtime.metrics import normalize_answer
from runtime.progress import progress_bar
from runtime.prompts import closed_book_prompt
from runtime.tokenizer import TextTokenizer

HELDOUT_QA = 16  # training-split questions kept for the held-out loss


def canonical_answer(aliases: list[str]) -> str:
    """TriviaQA alias lists start with arbitrary variants ('Arxintina' for Argentina). Pick the ASCII alias
    whose normalised form occurs inside the most other aliases; ties go to the shorter one."""
    norm = [normalize_answer(a) for a in aliases]
    best, best_key = aliases[0], None
    for a, n in zip(aliases, norm):
        if not n:
            continue
        key = (a.isascii(), sum(n in other for other in norm), -len(a))
        if best_key is None or key > best_key:
            best, best_key = a, key
    return best


def triviaqa_split(dataset: str = "triviaqa") -> tuple[list, list]:
    """(train records, eval records): eval = questions with a passage, train = the rest."""
    records = triviaqa_records(dataset)
    train = [r for r in records if not r.context]
    evaluation = [r for r in records if r.context]
    if not train:
        raise EdgepackError(f"{dataset}: every question has a passage, so none is free for training")
    return train, evaluation


def triviaqa_examples(tokenizer: TextTokenizer, mode: str = "closed", dataset: str = "triviaqa"):
    """(train, heldout, split record) as (prompt + answer) examples with loss on the answer only."""
    from compressor.lora import qa_example

    if mode != "closed":
        raise EdgepackError(
            "lora.triviaqa_mode=open: the shipped TriviaQA file has passages only for the 728 "
            "evaluation questions; train closed-book, or give a file with passages for other questions"
        )
    train, evaluation = triviaqa_split(dataset)
    examples = []
    for r in train:
        prompt = tokenizer.encode(closed_book_prompt(r.question), add_special_tokens=True)
        answer = tokenizer.encode(" " + canonical_answer(r.answers), add_special_tokens=False)
        examples.append(qa_example(prompt, answer, tokenizer.encode("\n", add_special_tokens=False)[-1]))
    split = {
        "train_ids": [r.id for r in train[HELDOUT_QA:]],
        "heldout_ids": [r.id for r in train[:HELDOUT_QA]],
        "eval_questions": len(evaluation),
        "rule": "train = questions without a passage; eval = with",
    }
    return examples[HELDOUT_QA:], examples[:HELDOUT_QA], split


def wikitext_examples(
    tokenizer: TextTokenizer,
    seqlen: int,
    samples: int,
    dataset: str = "wikitext2-valid",
    seed: int = 0,
    heldout: int = 16,
):
    """Packed causal-LM windows of the calibration text, shuffled with a seed; the first `heldout` windows
    of the shuffle are the held-out set."""
    from compressor.lora import pack_lm_windows

    windows = pack_lm_windows(tokenizer.encode(calibration_text(dataset), add_special_tokens=False), seqlen)
    order = np.random.default_rng(seed).permutation(len(windows))
    held = [windows[i] for i in order[:heldout]]
    train = [windows[i] for i in order[heldout : heldout + samples]]
    return train, held, {"windows": len(windows), "train": len(train), "heldout": len(held), "seqlen": seqlen}


def quant_calibration_rows(
    tokenizer: TextTokenizer,
    dataset: str,
    samples: int,
    seqlen: int,
    calibration_dataset: str = "wikitext2-valid",
    seed: int = 0,
    source_dir=None,
    chat_cache=None,
) -> list[list[int]]:
    """Calibration rows for GPTQ / EoRA: WikiText windows, TriviaQA training prompts with answers, "chat"
    (the self-instruct seed tasks through the chat template with the source model's own greedy replies, one
    conversation per row, cut to `seqlen`; needs `source_dir` and the replies' cache file `chat_cache`), or
    "mix" (chat and WikiText rows alternating, half each)."""
    if dataset in ("chat", "mix"):
        if source_dir is None or chat_cache is None:
            raise EdgepackError(f"calibration dataset {dataset!r} needs the source model and a reply cache")
        train, held, _ = chat_examples(
            tokenizer, source_dir, chat_cache, first=samples if dataset == "chat" else samples // 2
        )
        chat = [ids[:seqlen] for ids, _ in train + held]
        if dataset == "chat":
            return chat[:samples]
        text = quant_calibration_rows(tokenizer, "wikitext", samples - samples // 2, seqlen, calibration_dataset, seed)
        chat = chat[: samples // 2]
        return [row for pair in zip(chat, text) for row in pair] + chat[len(text) :] + text[len(chat) :]
    if dataset == "wikitext":
        from compressor.calibration import calibration_ids

        return calibration_ids(tokenizer, calibration_dataset, samples, seqlen, seed).tolist()
    if dataset == "triviaqa":
        train, held, _ = triviaqa_examples(tokenizer)
        rows = [ids for ids, _ in train + held]
        # pack several short QA examples per row, so each row carries a useful number of tokens
        packed, cur = [], []
        for ids in rows:
            cur += ids
            if len(cur) >= seqlen:
                packed.append(cur[:seqlen])
                cur = []
        return (packed or [cur])[:samples]
    raise EdgepackError(f"calibration dataset {dataset!r}: expected wikitext, triviaqa, chat or mix")


# ---------------------------------------------------------------------------------------------------------
# Chat samples for LoRA recovery (dataset "chat" / "mix"): the source's own greedy replies

CHAT_SEED_TASKS = "chat/self_instruct_seed_tasks.jsonl"  # under runtime/data (175 self-instruct seed tasks)
CHAT_REPLY_TOKENS = 128
HELDOUT_CHAT = 15  # seed tasks kept for the held-out loss (the last ones of the file)


def source_chat_replies(
    source_dir, tokenizer: TextTokenizer, prompts: list[list[int]], cache_path, max_new_tokens: int = CHAT_REPLY_TOKENS
) -> list[list[int]]:
    """The source model's greedy replies (token ids, stop token excluded) to chat-template prompts, made with
    batched transformers generation. Each reply is cached in `cache_path` (JSON, one entry per prompt, keyed
    by source, prompt and length) as soon as its batch finishes: an interrupted run resumes, and a later stage
    that needs the same replies, or a subset of them, pays nothing."""
    import hashlib
    import json
    from pathlib import Path

    from compressor.pipeline import source_fingerprint
    from runtime.fileio import atomic_write_json, read_json

    base = json.dumps([source_fingerprint(Path(source_dir)), max_new_tokens])
    keys = [hashlib.sha256(json.dumps([base, p]).encode()).hexdigest() for p in prompts]
    cache_path = Path(cache_path)
    cached = read_json(cache_path) if cache_path.exists() else {}
    known = cached.get("replies") if isinstance(cached, dict) and cached.get("version") == 2 else None
    known = known if isinstance(known, dict) else {}
    missing = [i for i, k in enumerate(keys) if k not in known]
    if missing:
        from compressor.torch_backend import TorchBackend

        backend = TorchBackend.from_pretrained(source_dir, pad_id=tokenizer.pad_id)
        stop = {tokenizer.eos_id} | set(_as_list(getattr(backend.model.generation_config, "eos_token_id", None)))
        stop.discard(None)
        order = sorted(missing, key=lambda i: len(prompts[i]))  # similar lengths share a batch
        label = f"source replies for chat data ({len(missing)} of {len(prompts)} prompts)"
        with progress_bar(label, len(missing)) as advance:
            for start in range(0, len(order), 16):
                idx = order[start : start + 16]
                for i, reply in zip(idx, backend.greedy([prompts[i] for i in idx], max_new_tokens, stop)):
                    known[keys[i]] = reply
                atomic_write_json(cache_path, {"version": 2, "max_new_tokens": max_new_tokens, "replies": known})
                advance(len(idx))
    return [known[k] for k in keys]


def _as_list(x) -> list:
    return [] if x is None else (list(x) if isinstance(x, (list, tuple)) else [x])


def chat_examples(
    tokenizer: TextTokenizer,
    source_dir,
    cache_path,
    path: str | None = None,
    first: int | None = None,
    train_limit: int | None = None,
):
    """(train, heldout, record): each seed task's user turn through the chat template, followed by the
    source's greedy reply and the end-of-turn token; labels only on the reply (and its end). `first`: only
    the first tasks of the file, all as training examples (calibration needs a few rows, not every reply).
    `train_limit`: at most this many training examples (the held-out tasks stay whole); the source's replies
    are generated only for the tasks returned, so a 64-sample LoRA run does not pay for all 175 replies."""
    from compressor.lora import IGNORE
    from runtime.datasets import DATA_DIR, chat_turns

    turns = chat_turns(path or DATA_DIR / CHAT_SEED_TASKS)
    if first is not None:
        turns = turns[:first]
    cut = len(turns) if first is not None else len(turns) - min(HELDOUT_CHAT, len(turns) // 4)
    if train_limit is not None and train_limit < cut:
        turns, cut = turns[:train_limit] + turns[cut:], train_limit
    prompts = [tokenizer.encode_chat([{"role": "user", "content": t}]) for t in turns]
    replies = source_chat_replies(source_dir, tokenizer, prompts, cache_path)
    end = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    examples = [(p + r + end, [IGNORE] * len(p) + r + end) for p, r in zip(prompts, replies)]
    record = {
        "tasks": len(turns),
        "train": cut,
        "heldout": len(examples) - cut,
        "reply_tokens": sum(len(r) for r in replies),
        "max_new_tokens": CHAT_REPLY_TOKENS,
    }
    return examples[:cut], examples[cut:], record


def mixed_examples(chat: tuple, text: tuple, samples: int):
    """Half chat (as many as exist, up to samples/2), the rest WikiText windows, interleaved; held-out sets
    joined. `chat` and `text` are (train, heldout, record) triples."""
    n_chat = min(len(chat[0]), samples // 2)
    c, t = chat[0][:n_chat], text[0][: samples - n_chat]
    train = [x for pair in zip(c, t) for x in pair] + c[len(t) :] + t[len(c) :]
    record = {"chat": dict(chat[2], train=len(c)), "wikitext": dict(text[2], train=len(t))}
    return train, chat[1] + text[1], record
