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
) -> list[list[int]]:
    """Calibration rows for GPTQ / EoRA: WikiText windows, or TriviaQA training prompts with answers."""
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
    raise EdgepackError(f"calibration dataset {dataset!r}: expected wikitext or triviaqa")
