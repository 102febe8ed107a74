"""The one quality harness. It runs on any backend that offers two methods:

    log_probs(ids: np.ndarray[int64, (B, T)]) -> np.ndarray[float32, (B, T, V)]   # log-softmax rows
    greedy(prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int]) -> list[list[int]]

The torch backend (compressor.torch_backend) and the ONNX engine (runtime.onnx_engine) both implement them,
so `edgepack eval` on a checkpoint and `edgepack verify` on a bundle measure with the same code.

Tasks: "ppl" (WikiText perplexity; with a reference also KL and top-1 against the source), "closed" and
"open" (TriviaQA), and "chat" (chat fidelity against the source's greedy replies stored in a reference, see
`eval_chat`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Protocol

import numpy as np

from runtime import metrics
from runtime.datasets import chat_turns, eval_text, triviaqa_records
from runtime.errors import EdgepackError
from runtime.progress import progress_bar
from runtime.prompts import closed_book_prompt, open_book_prompt
from runtime.tokenizer import TextTokenizer


class Backend(Protocol):
    def log_probs(self, ids: np.ndarray) -> np.ndarray: ...

    def greedy(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int]) -> list[list[int]]: ...


@dataclass(frozen=True)
class EvalLimits:
    """How much of each evaluation set to use. None = all of it."""

    ctx: int = 512  # perplexity window length
    ppl_windows: int | None = None  # None = the whole WikiText-2 test (about 580 windows of 512 for SmolLM2)
    qa_questions: int | None = None  # None = all 728 questions that have a passage
    qa_max_new_tokens: int = 16
    batch_size: int = 4
    wikitext: str = "wikitext2-test"
    triviaqa: str = "triviaqa"
    chat_prompts: int | None = 0  # chat fidelity replies: 0 = no chat fidelity, None = all the reference holds
    chat_max_new_tokens: int = 128  # source reply length cap (tokens scored per reply)
    chat_prompt_tokens: int = 384  # prompts longer than this (template included) are skipped
    chat: str = "chat-instructions"  # the instructions the source's replies answer

    def describe(self) -> str:
        w = "all" if self.ppl_windows is None else self.ppl_windows
        q = "all" if self.qa_questions is None else self.qa_questions
        c = "all" if self.chat_prompts is None else self.chat_prompts
        chat = f", chat replies={c} × ≤{self.chat_max_new_tokens} tokens" if self.chat_prompts != 0 else ""
        return f"ctx={self.ctx}, ppl windows={w}, TriviaQA questions={q}, max new tokens={self.qa_max_new_tokens}{chat}"


# Chat sizes: teacher-forced scoring costs one forward pass of prompt + reply (~250 tokens for SmolLM2) per
# reply, and the source's replies are generated once per work directory; 32 replies keep a standard export
# within about a minute of chat work on 2 cores while the match share moves in steps of 3 points.
PRESETS = {
    "quick": EvalLimits(ppl_windows=8, qa_questions=40, chat_prompts=8),
    "standard": EvalLimits(ppl_windows=40, qa_questions=200, chat_prompts=32),
    "full": EvalLimits(chat_prompts=None),
}


def limits_from(preset: str = "quick", **overrides) -> EvalLimits:
    base = PRESETS[preset]
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def newline_stop_ids(tokenizer: TextTokenizer) -> set[int]:
    """Ids of every token whose text contains a newline, plus EOS: answers end at the first line break."""
    stops = {i for i in range(tokenizer.vocab_size) if "\n" in tokenizer.decode([i], skip_special_tokens=False)}
    if tokenizer.eos_id is not None:
        stops.add(tokenizer.eos_id)
    return stops


def chat_prompt_ids(tokenizer: TextTokenizer, limits: EvalLimits) -> list[list[int]]:
    """The chat fidelity prompts: the first `chat_prompts` user turns of `limits.chat` (all when None) whose
    rendering through the model's chat template (a lone user turn, generation prompt added) fits in
    `chat_prompt_tokens`."""
    out: list[list[int]] = []
    if limits.chat_prompts == 0:
        return out
    for turn in chat_turns(limits.chat):
        if limits.chat_prompts is not None and len(out) >= limits.chat_prompts:
            break
        ids = tokenizer.encode_chat([{"role": "user", "content": turn}], add_generation_prompt=True)
        if len(ids) <= limits.chat_prompt_tokens:
            out.append(ids)
    return out


def eval_chat(backend: Backend, limits: EvalLimits, chat, progress: bool = True) -> dict:
    """Chat fidelity against a runtime.reference.ChatReference: each of the first `chat_prompts` stored
    prompts is followed by the source's greedy reply (first `chat_max_new_tokens` tokens), scored teacher-forced
    in one forward pass: KL(source || model) and top-1 agreement per reply token, and the share of replies
    whose first 32 tokens the model's greedy decoding reproduces exactly (metrics.chat_reply_scores).

    The equivalence with free greedy decoding is exact where the kernels are row- and length-independent
    (fp32 graphs, torch); on int8-activation graphs a prefill and a one-token decode step can round a
    near-tie differently, so a reply may rarely differ at such a tie. Claims and verify use the same batches
    (limits.batch_size), so they compare like with like."""
    n = chat.count if limits.chat_prompts is None else limits.chat_prompts
    if n == 0:
        raise EdgepackError("chat fidelity: the limits ask for 0 replies (chat_prompts=0 turns it off)")
    if n > chat.count:
        raise EdgepackError(f"chat fidelity: {n} replies asked, the reference holds {chat.count}")
    kl_sum = top1_sum = 0.0
    tokens = matched = 0
    t0 = time.perf_counter()
    with progress_bar(f"chat fidelity ({n} replies)", n, progress) as advance:
        for start in range(0, n, limits.batch_size):
            rows = range(start, min(n, start + limits.batch_size))
            lens = {
                i: (int(chat.prompt_lens[i]), min(int(chat.reply_lens[i]), limits.chat_max_new_tokens)) for i in rows
            }
            width = max(p + r - 1 for p, r in lens.values())
            ids = np.zeros((len(rows), width), np.int64)  # right padding: causal rows never see it
            for b, i in enumerate(rows):
                p, r = lens[i]
                ids[b, : p + r - 1] = chat.tokens[i, : p + r - 1]
            logp = backend.log_probs(ids)
            for b, i in enumerate(rows):
                p, r = lens[i]
                kl, agree, match = metrics.chat_reply_scores(
                    logp[b, p - 1 : p - 1 + r], chat.tokens[i, p : p + r], chat.top_ids[i, :r], chat.top_logp[i, :r]
                )
                kl_sum, top1_sum, tokens, matched = (
                    kl_sum + kl.sum(),
                    top1_sum + agree.sum(),
                    tokens + r,
                    matched + match,
                )
            advance(len(rows))
    return {
        "kld": float(kl_sum / tokens),
        "top1": float(top1_sum / tokens),
        "match32": matched / n,
        "replies": n,
        "tokens": tokens,
        "reference_k": chat.k,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def eval_perplexity(
    backend: Backend, tokenizer: TextTokenizer, limits: EvalLimits, progress: bool = True, reference=None
) -> dict:
    """Perplexity on non-overlapping windows; with a `reference`, also KL and top-1 agreement on its windows."""
    if reference is not None:
        windows = reference.window_ids[: limits.ppl_windows]
    else:
        ids = tokenizer.encode(eval_text(limits.wikitext), add_special_tokens=True)
        windows = metrics.perplexity_windows(ids, limits.ctx, limits.ppl_windows)
    nll_sum, count, kl_sum, top1_sum = 0.0, 0, 0.0, 0.0
    t0 = time.perf_counter()
    with progress_bar(f"perplexity ({len(windows)}×{windows.shape[1]} tokens)", len(windows), progress) as advance:
        for start in range(0, len(windows), limits.batch_size):
            batch = windows[start : start + limits.batch_size]
            logp = backend.log_probs(batch)
            nll = metrics.token_nll(logp, batch)
            nll_sum += float(nll.sum())
            count += nll.size
            if reference is not None:  # window by window: logp[i, :-1] is a view, a batch reshape a copy
                for i, q in enumerate(logp[:, :-1, :], start):
                    r_ids, r_lp = reference.top_ids[i], reference.top_logp[i]
                    kl_sum += float(metrics.topk_kl(r_ids, r_lp, q).sum())
                    top1_sum += float(metrics.top1_agreement(r_ids[:, 0], q).sum())
            advance(len(batch))
    seconds = time.perf_counter() - t0
    out = {
        "text": limits.wikitext,
        "ppl": float(np.exp(nll_sum / count)),
        "windows": int(len(windows)),
        "ctx": int(windows.shape[1]),
        "tokens": int(count),
        "seconds": round(seconds, 2),
        "tokens_per_s": round(len(windows) * windows.shape[1] / seconds, 1),
    }
    if reference is not None:
        out.update(kld=kl_sum / count, top1=top1_sum / count, reference_k=reference.k)
    return out


def eval_triviaqa(
    backend: Backend,
    tokenizer: TextTokenizer,
    limits: EvalLimits,
    modes=("closed", "open"),
    progress: bool = True,
    return_predictions: bool = False,
    closed_on_all: bool = False,
) -> dict:
    """Closed- and open-book TriviaQA on the same questions (those that have a passage). closed_on_all (a
    user's own questions): closed book on every question, open book on those that have a passage."""
    with_passage = triviaqa_records(limits.triviaqa, with_context_only=not closed_on_all)
    stops = newline_stop_ids(tokenizer)
    results = {}
    for mode in modes:
        records = with_passage if mode == "closed" else [r for r in with_passage if r.context]
        records = records[: limits.qa_questions]
        if not records:
            continue
        prompts = [
            closed_book_prompt(r.question) if mode == "closed" else open_book_prompt(r.question, r.context)
            for r in records
        ]
        ids = tokenizer.encode_batch(prompts, add_special_tokens=True)
        order = np.argsort([len(x) for x in ids])  # similar lengths together: less padding
        preds: list[str] = [""] * len(ids)
        t0 = time.perf_counter()
        with progress_bar(f"TriviaQA {mode} book ({len(ids)} questions)", len(ids), progress) as advance:
            for start in range(0, len(ids), limits.batch_size):
                idx = order[start : start + limits.batch_size]
                outs = backend.greedy([ids[i] for i in idx], limits.qa_max_new_tokens, stops)
                for i, out in zip(idx, outs):
                    preds[i] = metrics.answer_span(tokenizer.decode(out))
                advance(len(idx))
        em = [metrics.exact_match(p, r.answers) for p, r in zip(preds, records)]
        contains = [metrics.contains_answer(p, r.answers) for p, r in zip(preds, records)]
        res = {
            "exact_match": float(np.mean(em)),
            "contains": float(np.mean(contains)),
            "n": len(records),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        if return_predictions:
            res["predictions"] = [{"id": r.id, "prediction": p} for r, p in zip(records, preds)]
        results[mode] = res
    return results


def evaluate(
    backend: Backend,
    tokenizer: TextTokenizer,
    limits: EvalLimits,
    tasks=None,
    progress: bool = True,
    reference=None,
    chat=None,
    closed_on_all: bool = False,
) -> dict:
    """Run the chosen tasks and return one flat record (limits included, so every number carries them).
    tasks=None: ppl, closed, open, and chat when there is a chat reference (`chat`, else `reference.chat`).
    closed_on_all: see eval_triviaqa."""
    chat = chat if chat is not None else getattr(reference, "chat", None)
    if tasks is None:
        tasks = ("ppl", "closed", "open") + (("chat",) if chat is not None and limits.chat_prompts != 0 else ())
    out: dict = {"limits": asdict(limits)}
    if "chat" in tasks:
        if chat is None:
            raise EdgepackError("chat fidelity needs a reference with the source's chat replies")
        out["chat"] = eval_chat(backend, limits, chat, progress)
    if "ppl" in tasks:
        out["wikitext"] = eval_perplexity(backend, tokenizer, limits, progress, reference)
    modes = [m for m in ("closed", "open") if m in tasks]
    if modes:
        qa = eval_triviaqa(backend, tokenizer, limits, modes, progress, closed_on_all=closed_on_all)
        for m in modes:
            if m in qa:
                out[f"triviaqa_{m}"] = qa[m]
    return out


def format_summary(result: dict) -> str:
    """Human-readable lines; sample sizes always printed next to the figure."""
    lines = []
    if "wikitext" in result:
        w = result["wikitext"]
        name = "WikiText-2" if w.get("text", "wikitext2-test") == "wikitext2-test" else w["text"]
        line = (
            f"{name} PPL {w['ppl']:.2f}  ({w['windows']} windows × {w['ctx']} = {w['tokens']} scored tokens, "
            f"{w['tokens_per_s']} tok/s)"
        )
        if "kld" in w:
            line += f"\nKL divergence {w['kld']:.4f}  top-1 agreement {100 * w['top1']:.1f} %  (vs reference, top-{w['reference_k']})"
        lines.append(line)
    if "chat" in result:
        c = result["chat"]
        lines.append(
            f"Chat fidelity: first-32-token match {100 * c['match32']:.1f} %  KL {c['kld']:.4f}  "
            f"top-1 {100 * c['top1']:.1f} %  ({c['replies']} source replies, {c['tokens']} tokens, top-{c['reference_k']})"
        )
    for mode in ("closed", "open"):
        k = f"triviaqa_{mode}"
        if k in result:
            r = result[k]
            lines.append(
                f"TriviaQA {mode:6s} book: contains {100 * r['contains']:5.1f} %  exact {100 * r['exact_match']:5.1f} %"
                f"  (n={r['n']}, {r['seconds']:.0f} s)"
            )
    return "\n".join(lines)


def add_limit_args(parser) -> None:
    """The evaluation-size flags every measuring command shares (eval, compress, sweep)."""
    parser.add_argument(
        "--limits",
        default="quick",
        choices=list(PRESETS),
        help="evaluation size: quick (8 PPL windows, 40 questions, 8 chat replies), standard (40, 200, 32), full (all)",
    )
    parser.add_argument("--ctx", type=int, help="perplexity window length (default 512)")
    parser.add_argument("--windows", type=int, help="number of perplexity windows (overrides --limits)")
    parser.add_argument("--questions", type=int, help="number of TriviaQA questions (overrides --limits)")
    parser.add_argument("--batch-size", type=int, help="windows / questions per forward pass (default 4)")
    parser.add_argument(
        "--chat-prompts", type=int, help="number of chat fidelity replies, 0 = none (overrides --limits)"
    )


def limits_from_args(args) -> EvalLimits:
    return limits_from(
        args.limits,
        ctx=args.ctx,
        ppl_windows=args.windows,
        qa_questions=args.questions,
        batch_size=args.batch_size,
        chat_prompts=getattr(args, "chat_prompts", None),
    )
