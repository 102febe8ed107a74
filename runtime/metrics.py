"""Quality metrics, written once against log-probabilities so that the torch side and the ONNX side
compute exactly the same numbers.

- Perplexity: non-overlapping windows of `ctx` tokens over the whole tokenized text (GPTQ / llama.cpp
  protocol); the first token of each window has no prediction, so a window scores ctx-1 tokens.
- TriviaQA: the official normalisation (lowercase, punctuation and ‘’´` to spaces, articles dropped,
  whitespace folded) plus unicode folding (NFKD, accents dropped), scored two ways: exact match and alias
  containment (a whole-word occurrence of an alias in the answer, which is what the seed's numbers look like).
- Fidelity: KL(P_ref || Q) and top-1 agreement per position, from full rows or from the compact top-k
  reference the bundle ships (see `topk_kl`).
"""

from __future__ import annotations

import re
import string
import unicodedata

import numpy as np


# ---------------------------------------------------------------- perplexity
def perplexity_windows(token_ids, ctx: int, limit: int | None = None) -> np.ndarray:
    """Split a token sequence into non-overlapping windows of `ctx` tokens (the tail that does not fill a
    window is dropped, as GPTQ and llama.cpp do). `limit` keeps the first `limit` windows."""
    ids = np.asarray(token_ids, dtype=np.int64)
    n = len(ids) // ctx
    if limit is not None:
        n = min(n, int(limit))
    if n == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {ctx}")
    return ids[: n * ctx].reshape(n, ctx)


def token_nll(log_probs: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ids[:, 1:] under log_probs[:, :-1] -> [B, T-1] float64."""
    lp = log_probs[:, :-1, :]
    tgt = ids[:, 1:, None]
    return -np.take_along_axis(lp, tgt, axis=-1)[..., 0].astype(np.float64)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float32, copy=False)
    m = logits.max(axis=-1, keepdims=True)
    z = logits - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


# ------------------------------------------------------------------ TriviaQA
_PUNCT = set(string.punctuation) | {"‘", "’", "´", "`", "“", "”", "«", "»"}


def normalize_answer(s: str) -> str:
    s = unicodedata.normalize("NFKD", s)
    s = "".join(c for c in s if not unicodedata.combining(c))
    s = s.lower().replace("_", " ")
    s = "".join(" " if (c in _PUNCT or unicodedata.category(c).startswith("P")) else c for c in s)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def answer_span(generated: str) -> str:
    """The model's answer: its first non-empty line, stripped."""
    for line in generated.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def exact_match(prediction: str, aliases: list[str]) -> bool:
    p = normalize_answer(prediction)
    return any(p == normalize_answer(a) for a in aliases if normalize_answer(a))


def contains_answer(prediction: str, aliases: list[str]) -> bool:
    p = f" {normalize_answer(prediction)} "
    return any(f" {a} " in p for a in (normalize_answer(x) for x in aliases) if a)


# ------------------------------------------------------------------ fidelity
def kl_divergence(ref_logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """Exact KL(P||Q) per row from full log-probability rows [N, V]."""
    p = np.exp(ref_logp.astype(np.float64))
    return (p * (ref_logp.astype(np.float64) - logq.astype(np.float64))).sum(-1)


def topk_reference(logp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Compact reference: the k most likely ids per row and their log-probs (sorted, most likely first)."""
    idx = np.argpartition(-logp, k - 1, axis=-1)[:, :k]
    vals = np.take_along_axis(logp, idx, axis=-1)
    order = np.argsort(-vals, axis=-1)
    return np.take_along_axis(idx, order, -1).astype(np.int32), np.take_along_axis(vals, order, -1).astype(np.float32)


def _log1mexp_sum(logp_k: np.ndarray) -> np.ndarray:
    rest = 1.0 - np.exp(logp_k.astype(np.float64)).sum(-1)
    return np.log(np.clip(rest, 1e-12, None))


def topk_kl(ref_ids: np.ndarray, ref_logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """KL between the reference and the model, each coarsened to {top-k ids of the reference, the rest}.

    By the data-processing inequality this is a lower bound of the full KL(P||Q); the gap is what the
    reference's tail carries. Measured on SmolLM2-135M vs its W1:8+LoRA+GPTQ+EoRA bundle model (2 windows of
    512): full KL 0.221, top-8 0.131 (-41 %), top-32 0.163 (-26 %), top-128 0.188 (-15 %). Verify compares
    like with like (the claim is computed the same way), but as an absolute figure it reads low."""
    ref_logp = ref_logp.astype(np.float64)
    # gather first, then widen: casting all of logq would copy [positions, vocabulary] in float64
    q_k = np.take_along_axis(logq, ref_ids.astype(np.int64), axis=-1).astype(np.float64)
    p_rest = _log1mexp_sum(ref_logp)
    q_rest = _log1mexp_sum(q_k)
    kl = (np.exp(ref_logp) * (ref_logp - q_k)).sum(-1)
    return kl + np.exp(p_rest) * (p_rest - q_rest)


def top1_agreement(ref_top1: np.ndarray, logq: np.ndarray) -> np.ndarray:
    return (logq.argmax(-1) == ref_top1).astype(np.float64)


# ------------------------------------------------------------ chat fidelity
CHAT_MATCH_TOKENS = 32  # a reply "matches" when its first 32 greedy tokens equal the source's


def chat_reply_scores(
    logq: np.ndarray,
    reply: np.ndarray,
    ref_ids: np.ndarray,
    ref_logp: np.ndarray,
    match_tokens: int = CHAT_MATCH_TOKENS,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Teacher-forced scores of one reply: logq [R, V] are the model's log-probs at the positions that
    predict reply tokens [R] (prompt and the source's earlier reply tokens as the prefix); ref_ids/ref_logp
    [R, k] the source's top-k there. Returns per-token KL (top-k coarsened, see topk_kl), per-token top-1
    agreement with the source's greedy token, and whether the first `match_tokens` tokens all agree.

    The last is exactly "free greedy decoding reproduces the source's first 32 tokens": greedy follows the
    source as long as every argmax equals the source's token, and then its prefix is the teacher-forced one."""
    kl = topk_kl(ref_ids, ref_logp, logq)
    agree = top1_agreement(reply, logq)
    return kl, agree, bool(agree[:match_tokens].all())
