"""Speculative decoding: a cheap proposer guesses the next k tokens, the bundle's model scores them all in one
pass over its KV cache (`OnnxDecoder.score`), the longest prefix it agrees with is kept plus one token of its
own, and the cache is rewound past the rejected guesses (`OnnxDecoder.rewind`).

Why it pays on a CPU: a small model's decode step is bound by per-kernel overhead, not by arithmetic, so
scoring k+1 tokens costs little more than scoring one; every accepted guess is a decode step saved.

Proposers (the "draft"):
- `PromptLookup`: the continuation of the latest earlier occurrence of the last n tokens (n = ngram_max down
  to ngram_min) in the prompt and the reply so far (the conversation, in a chat). No model, no weights. When
  the last token was never seen before (a year or counter that changed since the last repeat), the
  `skip_ngram` tokens before it are matched instead and what followed the token in their place is proposed.
- `DraftModel`: a small model of the same family and tokenizer (a bundle's optional `draft/` part, made by
  `edgepack export --draft`), decoding greedily (or sampling, when the target samples) with its own cache.

Exactness:
- Greedy (temperature 0): a guess is kept iff it is the token plain decoding would pick at that position (argmax
  after the same repetition penalty), so the output is plain greedy output, token for token, as long as the
  multi-token pass computes what a plain step computes. It does, bit for bit, once plain steps take the same
  path: onnxruntime's multi-token path (GroupQueryAttention's "subsequent prompt", MatMulNBits over several
  rows) gives every row the same bits whatever the number of tokens >= 2, while the one-token path agrees with
  it only to ~1e-5 in float (measured on SmolLM2, AMD EPYC with AVX-512 VNNI, onnxruntime 1.32). On graphs
  with int8 activations (MatMulNBits accuracy_level 4, the shipped default) the next MatMulNBits rounds such
  last-bit differences to different int8 steps, and logits move by up to ~0.6 (MatMulNBits alone is row-exact:
  benchmarks/nbits_row_dependence.py). So on those graphs greedy requests decode with two-token steps
  (OnnxDecoder.step_tokens = 2: the token plus a pad that is dropped; runtime.generation.exact_step_tokens),
  with or without a draft, and a draft changes the speed, never the tokens. On fp32-activation graphs the two
  paths differ by ~1e-6 and one-token steps are kept. benchmarks/spec_decode.py --steps 1,2 counts
  divergences for both step widths.
- Sampling: the standard rule (Leviathan et al. 2023, Chen et al. 2023): guess x drawn from the draft's q is kept
  with probability min(1, p(x)/q(x)); on rejection the token is drawn from max(p - q, 0), renormalised; after k
  kept guesses one more token is drawn from p. The output distribution is exactly p's. Prompt lookup's guess
  is deterministic (q is a point mass), so it is kept with probability p(x) and otherwise replaced by a draw
  from p without x. p is the target's distribution after the same penalty/temperature/top-k/top-p as plain
  sampling (runtime.generation.Sampler); the draft model's q uses the same processing on its own logits.
  One random stream (the Sampler's seeded generator) is used for everything, so a seed still fixes the output.

k adapts to the measured acceptance (`AdaptiveK`): an exponential moving average of the share of guesses kept
picks the k that maximises expected tokens per unit of cost, (1 - a^(k+1)) / (1 - a) / (1 + c k), with c the
relative cost of one more guessed token (the proposer's own cost plus the wider verification pass); when even
the best k is worth less than plain decoding, guessing pauses, with a probe every few rounds. With two-token
steps the first guess takes the pad's place and its verification is free, so guessing never pauses there.
It depends only on acceptance counts, never on timings, so a seeded run is reproducible.
"""

from __future__ import annotations

import copy
import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from collections.abc import Sequence

import numpy as np

from runtime.errors import EdgepackError

DraftChoice = Literal["auto", "none", "lookup", "model"]
DRAFT_CHOICES: tuple[str, ...] = DraftChoice.__args__
# Chat prompts for measuring acceptance (runtime/data/PROVENANCE.md)
CHAT_INSTRUCTIONS = Path(__file__).resolve().parent / "data" / "chat" / "user_oriented_instructions_202.jsonl"
# Cost of verifying one more token in the target's multi-token pass, relative to one decode step. Measured on
# SmolLM2-135M int4 with int8 activations on a loaded 2-core EPYC (benchmarks/spec_decode.py prints it): scoring
# 2 / 3 / 5 / 9 tokens costs ~1.2-1.4 / 1.2-1.4 / 1.5-1.7 / 2.0-2.6 decode steps.
VERIFY_COST_PER_TOKEN = 0.18


@dataclass
class SpeculationSettings:
    """How speculation guesses: k is adapted in [k_min, k_max], starting at k_start."""

    k_start: int = 4
    k_min: int = 1
    k_max: int = 8
    ngram_max: int = 3  # prompt lookup: longest suffix matched
    ngram_min: int = 1  # prompt lookup: shortest suffix matched
    skip_ngram: int = 2  # prompt lookup, when nothing matched: tokens before the last one matched (0: off)
    ema: float = 0.3  # weight of the latest round in the acceptance average

    def check(self) -> None:
        if not 1 <= self.k_min <= self.k_start <= self.k_max <= 64:
            raise EdgepackError(
                f"speculation: need 1 <= k_min <= k_start <= k_max <= 64, got "
                f"{self.k_min}, {self.k_start}, {self.k_max}"
            )
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise EdgepackError(
                f"speculation: need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}"
            )
        if self.skip_ngram < 0:
            raise EdgepackError(f"speculation: skip_ngram={self.skip_ngram} must be >= 0 (0: off)")
        if not 0 < self.ema <= 1:
            raise EdgepackError(f"speculation: ema={self.ema} must be in (0, 1]")


@dataclass
class Proposal:
    """Guessed tokens; `q` holds, for a sampled draft, the probabilities [len(tokens), vocab] each guess was
    drawn from (None: the guesses are deterministic, a point mass each)."""

    tokens: list[int]
    q: np.ndarray | None = None


# ---------------------------------------------------------------------------------------------------------
# Proposers


def latest_occurrence(haystack: np.ndarray, needle: np.ndarray) -> int | None:
    """Start of the last window of `haystack` equal to `needle`, or None."""
    if needle.size == 0 or needle.size > haystack.size:
        return None
    windows = np.lib.stride_tricks.sliding_window_view(haystack, needle.size)
    hits = np.flatnonzero((windows == needle).all(axis=1))
    return int(hits[-1]) if hits.size else None


class PromptLookup:
    """n-gram prompt lookup: propose what followed the latest earlier occurrence of the context's last n tokens."""

    name = "lookup"
    cost_per_token = 0.0  # a numpy search, no model
    greedy_only = False  # set by make_proposer("auto"): runtime.generation.Generator skips it when sampling

    def __init__(
        self,
        ngram_max: int = SpeculationSettings.ngram_max,
        ngram_min: int = SpeculationSettings.ngram_min,
        skip_ngram: int = SpeculationSettings.skip_ngram,
    ):
        self.ngram_max, self.ngram_min, self.skip_ngram = int(ngram_max), int(ngram_min), int(skip_ngram)

    def propose(self, context: Sequence[int], k: int, sampler=None) -> Proposal:
        ctx = np.asarray(context, dtype=np.int64)
        n_ctx = ctx.size
        for n in range(min(self.ngram_max, n_ctx - 1), self.ngram_min - 1, -1):
            # windows that start at i <= n_ctx - 1 - n: each has at least one token after it
            hit = latest_occurrence(ctx[:-1], ctx[n_ctx - n :])
            if hit is not None:
                return Proposal(ctx[hit + n : hit + n + k].tolist())
        n = self.skip_ngram
        if n and n_ctx > n + 2:
            # no match of the last token: treat it as a wildcard and match the n tokens before it (a counter, a
            # year, a name that changes between repeats: "... 2005 film" then "... 2006" -> guess " film")
            hit = latest_occurrence(ctx[:-3], ctx[n_ctx - 1 - n : n_ctx - 1])
            if hit is not None:
                start = hit + n + 1  # past the wildcard's counterpart
                return Proposal(ctx[start : start + k].tolist())
        return Proposal([])

    def reset(self) -> None:
        pass


class DraftModel:
    """A small decoder of the same tokenizer proposing k tokens with its own KV cache, kept in step with the
    context by rewinding to the common prefix and appending what it has not seen."""

    name = "model"
    greedy_only = False  # as PromptLookup.greedy_only

    def __init__(self, decoder, cost_per_token: float = 0.3):
        """cost_per_token: one draft step relative to one target step (for AdaptiveK; about the ratio of
        their weight bytes / kernel counts)."""
        self.decoder = decoder
        self.cost_per_token = float(cost_per_token)
        self.ids: list[int] = []  # what the draft's cache holds

    def reset(self) -> None:
        self.decoder.reset()
        self.ids = []

    def _sync(self, context: Sequence[int]) -> np.ndarray:
        """Bring the draft's cache to `context`; return its logits after the last context token."""
        dec = self.decoder
        common = 0
        if dec.length == len(self.ids):
            for a, b in zip(self.ids, context):
                if a != b:
                    break
                common += 1
        common = min(common, len(context) - 1)  # at least one token is appended, for its logits
        if common == 0:
            dec.reset()
            logits = dec.prefill(list(context))
        else:
            dec.rewind(common)
            logits = dec.score(list(context[common:]))[-1]
        self.ids = list(context)
        return logits

    def propose(self, context: Sequence[int], k: int, sampler) -> Proposal:
        dec = self.decoder
        k = min(k, dec.max_len - len(context))
        if k < 1:
            return Proposal([])
        logits = self._sync(context)
        sampling = sampler.s.temperature > 0
        # The same processing as the target (penalty over what it would have seen), on a private seen-set;
        # the random generator is shared, so one seed fixes the whole run.
        local = copy.copy(sampler)
        local.seen, local.seen_ids = sampler.seen.copy(), sampler.seen_ids.copy()
        tokens: list[int] = []
        q = np.zeros((k, logits.shape[-1]), np.float64) if sampling else None
        for i in range(k):
            if sampling:
                ids, probs = local.candidates(logits)
                probs = probs.astype(np.float64) / probs.sum(dtype=np.float64)
                q[i, ids] = probs
                tok = int(
                    ids[min(int(np.searchsorted(np.cumsum(probs), local.rng.random(), side="right")), ids.size - 1)]
                )
            else:
                tok = int(local(logits))
            tokens.append(tok)
            local.observe(tok)
            if i < k - 1:
                logits = dec.decode(tok)
                self.ids.append(tok)
        return Proposal(tokens, q)


# ---------------------------------------------------------------------------------------------------------
# Acceptance


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a round yields on average when each guess is kept with probability alpha: 1 + alpha + ... + alpha^k."""
    return float(k + 1) if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


class AdaptiveK:
    """The number of tokens to guess next, from a moving average of the share of guesses kept. When no k
    beats plain decoding (1 token per unit of cost), speculation pauses (k = 0) and probes with k_min
    guesses every `probe_every` rounds, so a stream that turns repetitive is noticed; each probe that does
    not resume speculation doubles the interval (up to 64 rounds), so a useless draft costs little.

    free_guesses: guesses whose verification costs nothing because plain decoding's own step already has room
    for them (1 with two-token steps, where a guess takes the pad's place); only the proposer's cost remains."""

    def __init__(
        self, settings: SpeculationSettings, cost_per_token: float, probe_every: int = 8, free_guesses: int = 0
    ):
        self.s = settings
        self.draft_cost, self.free = float(cost_per_token), int(free_guesses)
        self.alpha = 0.5  # prior: half the guesses kept
        self.k = settings.k_start
        self.probe_every, self.paused = probe_every, 0

    def next_k(self) -> int:
        if self.k > 0:
            return self.k
        self.paused += 1
        return self.s.k_min if self.paused % self.probe_every == 0 else 0

    def update(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        self.alpha += self.s.ema * (accepted / proposed - self.alpha)
        best, gain = best_k(self.alpha, self.draft_cost, self.s.k_min, self.s.k_max, self.free)
        if gain > 1.0:
            self.k, self.probe_every = best, 8
        else:
            if self.k == 0:  # a probe that failed
                self.probe_every = min(2 * self.probe_every, 64)
            self.k, self.paused = 0, 0


def round_cost(k: int, draft_cost: float, free_guesses: int = 0) -> float:
    """Cost of a round with k guesses, in plain decode steps: the proposer's k steps plus the wider
    verification pass (VERIFY_COST_PER_TOKEN per guess beyond the ones plain decoding's step has room for)."""
    return 1.0 + draft_cost * k + VERIFY_COST_PER_TOKEN * max(0, k - free_guesses)


def best_k(alpha: float, draft_cost: float, k_min: int = 1, k_max: int = 8, free_guesses: int = 0) -> tuple[int, float]:
    """The k with the most expected tokens per unit of cost against plain decoding (1 token per unit), and
    that ratio: > 1 means guessing pays."""
    gain = {k: expected_tokens(alpha, k) / round_cost(k, draft_cost, free_guesses) for k in range(k_min, k_max + 1)}
    k = max(gain, key=gain.get)
    return k, gain[k]


def target_probs(sampler, logits: np.ndarray) -> np.ndarray:
    """The target's sampling distribution p over the vocabulary at one position (float64, sums to 1)."""
    ids, probs = sampler.candidates(logits)
    p = np.zeros(logits.shape[-1], np.float64)
    p[ids] = probs
    return p / p.sum()


def draw(p: np.ndarray, rng) -> int:
    cum = np.cumsum(p)
    return min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), p.size - 1)


def accept_sampled(p: np.ndarray, guess: int, q: np.ndarray | None, rng) -> int | None:
    """The acceptance rule for one guess: None if `guess` is kept, else the replacement token drawn from the
    residual max(p - q, 0) (q None: a point mass on `guess`)."""
    q_guess = 1.0 if q is None else float(q[guess])
    if q_guess > 0 and rng.random() * q_guess < p[guess]:
        return None
    if q is None:
        residual = p.copy()
        residual[guess] = 0.0
    else:
        residual = np.maximum(p - q, 0.0)
    if residual.sum() <= 0:  # p == q up to rounding: any draw from p is right
        residual = p
    return draw(residual, rng)


def verify(logits: np.ndarray, proposal: Proposal, sampler) -> tuple[list[int], int]:
    """Check the guesses against the target's logits [len(tokens) + 1, vocab] (row i: the distribution of the
    token after guess i-1). Returns (kept guesses, the target's own next token). The sampler observes the kept
    guesses (repetition penalty of the following positions)."""
    kept: list[int] = []
    greedy = sampler.s.temperature == 0
    for i, guess in enumerate(proposal.tokens):
        if greedy:
            tok = int(sampler(logits[i]))
            if tok != guess:
                return kept, tok
        else:
            q = None if proposal.q is None else proposal.q[i]
            tok = accept_sampled(target_probs(sampler, logits[i]), guess, q, sampler.rng)
            if tok is not None:
                return kept, tok
        kept.append(guess)
        sampler.observe(guess)
    last = len(proposal.tokens)
    return kept, int(sampler(logits[last]))


# ---------------------------------------------------------------------------------------------------------
# The token source runtime.generation.Generator pulls from


class SpeculativeTokens:
    """Tokens for Generator._stream: `next()` gives the next token, `feed(tok)` commits it to the sequence.

    Rounds run lazily inside `feed` when the queue of verified tokens is empty: the pending token plus the
    guesses go through the target in one pass, the kept guesses and the target's own token are queued, and the
    cache is rewound to the pending token + kept guesses. Queued tokens are already in the cache, so feeding
    them costs nothing. `close()` rewinds the cache to exactly the fed tokens (`cache_ids`)."""

    def __init__(
        self,
        decoder,
        proposer,
        sampler,
        logits: np.ndarray,
        cache_ids: list[int],
        max_new_tokens: int | None = None,
        settings: SpeculationSettings | None = None,
    ):
        """max_new_tokens: no guesses past the reply's last token (they could only be wasted)."""
        self.dec, self.proposer, self.sampler = decoder, proposer, sampler
        self.end = len(cache_ids) + max_new_tokens if max_new_tokens else None
        self.settings = settings or SpeculationSettings()
        self.settings.check()
        self.first_logits = logits
        self.cache_ids = cache_ids  # shared with the Generator: the ids fed so far, in order
        self.queue: deque[int] = deque()
        # with two-token steps (exact greedy on int8-activation graphs) plain decoding already pays for a second
        # token, so one guess per round rides along for free and guessing never pauses while there is a guess
        free = 1 if getattr(decoder, "step_tokens", 1) == 2 else 0
        self.k = AdaptiveK(self.settings, proposer.cost_per_token, free_guesses=free)
        self.proposed = self.accepted = self.rounds = 0

    def next(self) -> int:
        if self.queue:
            return self.queue.popleft()
        return int(self.sampler(self.first_logits))  # the first token, from the prefill's logits

    def feed(self, tok: int) -> None:
        self.cache_ids.append(int(tok))
        if self.queue:  # a kept guess: already in the cache
            return
        self._round(int(tok))

    def _round(self, pending: int) -> None:
        dec = self.dec
        base = len(self.cache_ids) - 1  # the cache holds everything before the pending token
        if dec.length != base:
            raise EdgepackError(f"speculation: the cache holds {dec.length} tokens, expected {base}")
        k = min(self.k.next_k(), dec.max_len - base - 1)
        if self.end is not None:  # the round yields up to k + 1 tokens after the pending one
            k = min(k, self.end - len(self.cache_ids) - 1)
        proposal = self.proposer.propose(self.cache_ids, k, self.sampler) if k > 0 else Proposal([])
        if proposal.tokens:
            logits = dec.score([pending] + proposal.tokens)
        else:
            logits = dec.decode(pending)[None]
        kept, own = verify(logits, proposal, self.sampler)
        dec.rewind(base + 1 + len(kept))
        self.queue.extend(kept)
        self.queue.append(own)
        self.rounds += 1
        self.proposed += len(proposal.tokens)
        self.accepted += len(kept)
        self.k.update(len(proposal.tokens), len(kept))

    def close(self) -> None:
        """Rewind the cache to the fed tokens (verified tokens never consumed are dropped)."""
        self.queue.clear()
        if self.dec.length > len(self.cache_ids):
            self.dec.rewind(len(self.cache_ids))


def make_proposer(choice: str, bundle=None, threads: int | None = None, settings: SpeculationSettings | None = None):
    """The proposer for a `--draft` choice: "none" -> None, "lookup" -> PromptLookup, "model" -> the bundle's
    draft model (EdgepackError if it has none), "auto" -> the draft model if the bundle has one and its
    measured acceptance says it pays, else lookup; for greedy requests only (`greedy_only`)."""
    if choice not in DRAFT_CHOICES:
        raise EdgepackError(f"draft={choice!r}: use one of {', '.join(DRAFT_CHOICES)}")
    s = settings or SpeculationSettings()
    s.check()
    if choice == "none":
        return None
    has_model = bundle is not None and bundle.has_draft
    if choice == "model" and not has_model:
        raise EdgepackError("draft=model: this bundle has no draft model (export it with `edgepack export --draft`)")
    if choice == "auto" and has_model:  # the draft model only where its measured acceptance says it pays
        measured = (bundle.manifest["runtime"]["draft"].get("acceptance") or {}).get("greedy")
        has_model = measured is None or best_k(float(measured), bundle.draft_cost)[1] > 1.0
    if choice == "model" or (choice == "auto" and has_model):
        proposer = DraftModel(bundle.draft_decoder(threads), cost_per_token=bundle.draft_cost)
    else:
        proposer = PromptLookup(s.ngram_max, s.ngram_min, s.skip_ngram)
    # auto speculates on greedy requests only: with sampling, lookup's guesses are kept far less often (16-19 %
    # vs 67-79 % greedy on SmolLM2, benchmarks/spec_decode.py) and save next to nothing (1.03x)
    proposer.greedy_only = choice == "auto"
    return proposer


def measure_acceptance(generator, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64) -> dict:
    """Share of the draft's guesses kept over greedy replies to `prompts` (the manifest's runtime.draft
    acceptance record): {"greedy", "drafted", "accepted", "prompts", "new_tokens"}."""
    from runtime.generation import SamplingSettings

    settings = SamplingSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=max_new_tokens)
    drafted = accepted = new = 0
    for ids in prompts:
        generator.reset()
        r = generator.generate(list(ids), settings)
        drafted, accepted, new = drafted + r.drafted_tokens, accepted + r.accepted_tokens, new + r.new_tokens
    return {
        "greedy": accepted / drafted if drafted else 0.0,
        "drafted": drafted,
        "accepted": accepted,
        "prompts": len(prompts),
        "new_tokens": new,
    }


def chat_instructions(n: int | None = None) -> list[str]:
    """The first n user turns of the shipped chat instructions: `instruction`, plus the first instance's
    `input` on its own paragraph when it has one."""
    out = []
    with open(CHAT_INSTRUCTIONS, encoding="utf-8") as f:
        for line in f:
            if n is not None and len(out) >= n:
                break
            rec = json.loads(line)
            extra = (rec.get("instances") or [{}])[0].get("input", "").strip()
            out.append(rec["instruction"].strip() + (f"\n\n{extra}" if extra else ""))
    return out
