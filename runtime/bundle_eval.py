"""`edgepack eval BUNDLE`: the harness on a bundle's ONNX model, no torch, so a user checks a bundle on their
own data: perplexity on any text file, closed-book TriviaQA-style questions from any JSONL (open book on those
that carry a passage), and chat fidelity against the source's replies in the bundle's reference (or another
reference file)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from runtime.harness import EvalLimits, evaluate


def fits_windows(reference, limits: EvalLimits) -> bool:
    """Whether the reference's WikiText windows serve these limits (same ctx, enough windows)."""
    n, ctx = reference.window_ids.shape
    return ctx == limits.ctx and limits.ppl_windows is not None and limits.ppl_windows <= n


def evaluate_bundle(
    bundle,
    limits: EvalLimits,
    tasks=None,
    text: str | Path | None = None,
    questions: str | Path | None = None,
    reference_path: str | Path | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """One harness record for the bundle (runtime.harness.evaluate), with `notes` saying what was left out.

    text: perplexity on this file instead of the text the bundle's claims name (then no KL: the reference's
    windows are cut from that text). questions: a JSONL of {"question", "answers", "context"?}. reference_path: a reference file
    to compare with instead of the bundle's own (validated like the bundle's)."""
    from runtime.reference import Reference

    vocab = bundle.manifest["tokenizer"].get("vocab_size")
    reference = Reference.load(reference_path, vocab_size=vocab) if reference_path else bundle.reference()
    notes = []
    # the evaluation sets the bundle's claims name (the reference's windows are cut from that text)
    claimed = next(iter((bundle.manifest["quality"].get("full") or {}).values()), {}).get("limits", {})
    limits = replace(
        limits,
        wikitext=str(text) if text is not None else claimed.get("wikitext", limits.wikitext),
        triviaqa=str(questions) if questions is not None else claimed.get("triviaqa", limits.triviaqa),
    )
    chat = reference.chat if reference is not None else None
    if tasks is None:
        tasks = ("ppl", "closed", "open") + (("chat",) if chat is not None and limits.chat_prompts != 0 else ())
    if chat is None and "chat" not in tasks:
        notes.append("no chat fidelity: the reference holds no source chat replies")
    if chat is not None and limits.chat_prompts is not None and limits.chat_prompts > chat.count:
        notes.append(f"chat fidelity on all {chat.count} replies the reference holds ({limits.chat_prompts} asked)")
        limits = replace(limits, chat_prompts=chat.count)
    ppl_reference = None
    if reference is not None and text is None and "ppl" in tasks:
        if fits_windows(reference, limits):
            ppl_reference = reference
        else:
            n, ctx = reference.window_ids.shape
            notes.append(f"no WikiText KL: the reference has {n} windows of {ctx}, the limits ask for other windows")
    result = evaluate(
        bundle.decoder(threads),
        bundle.tokenizer,
        limits,
        tasks=tuple(tasks),
        progress=progress,
        reference=ppl_reference,
        chat=chat,
        closed_on_all=questions is not None,
    )
    result["bundle"] = str(bundle.source)
    result["notes"] = notes
    return result
