"""Text generation on a bundle's decoder: sampling, stop tokens and strings, streaming, chat sessions.

Speed: per token, the only Python work besides `OnnxDecoder.decode` is the sampler (numpy on one logits
row) and an incremental detokenizer that decodes a small window of recent ids, never the whole text.

Sampling follows Hugging Face's order of logits processors, so a temperature-0 run equals
`generate(do_sample=False)` token for token: repetition penalty, then temperature, top-k, top-p, and a draw
from a numpy Generator seeded per call (same seed + prompt + settings = same tokens).

Stop strings are matched on the decoded text. Text that could still be the start of a stop string is held
back from the stream until the next tokens resolve it, so a stop string is never emitted, not even partly.

Context policy: a prompt must leave room for at least one new token (else EdgepackError before any work);
generation then stops with stop_reason "context_full" when the KV cache is full. ChatSession drops the
oldest messages to make room for the reply and reports how many (`last_dropped`).

Between calls the Generator keeps the decoder's KV cache and the ids in it; a new prompt that starts with
those ids (the next chat turn) only prefills the tokens after the common prefix.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from collections.abc import Iterator, Sequence

import numpy as np

from runtime.errors import EdgepackError

STOP_REASONS = ("eos", "stop_string", "max_tokens", "cancelled", "context_full")


@dataclass
class SamplingSettings:
    """How to pick each next token. temperature 0 = greedy (argmax after the repetition penalty)."""

    temperature: float = 0.7
    top_k: int = 50  # 0 = no top-k cut
    top_p: float = 0.9  # 1.0 = no nucleus cut
    repetition_penalty: float = 1.1  # 1.0 = off; HF's rule: divide positive logits of seen ids, multiply negative
    max_new_tokens: int = 256
    seed: int | None = None  # same seed + same prompt + same settings = same tokens
    stop_strings: tuple[str, ...] = ()  # generation ends before the first one; it is never emitted

    def check(self) -> None:
        import math

        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise EdgepackError(f"{name}={value}: must be a finite number")
        for name in ("top_k", "max_new_tokens"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise EdgepackError(f"{name}={getattr(self, name)}: must be an integer")
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63
        ):
            raise EdgepackError(f"seed={self.seed}: must be an integer in [0, 2^63)")
        if self.temperature < 0:
            raise EdgepackError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise EdgepackError(f"top_k={self.top_k}: must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise EdgepackError(f"top_p={self.top_p}: must be in (0, 1] (1 = off)")
        if self.repetition_penalty <= 0:
            raise EdgepackError(f"repetition_penalty={self.repetition_penalty}: must be > 0 (1 = off)")
        if self.max_new_tokens < 1:
            raise EdgepackError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")


@dataclass
class TokenEvent:
    """One step of a stream. `text` is the new text since the last event (may be "" while text is held back
    because it could be the start of a stop string). `token_id` is the id just sampled, or -1 on a final
    event that only releases held-back text."""

    text: str
    token_id: int
    result: GenerationResult | None = None  # set on a stream's last event only: the whole result


@dataclass
class GenerationResult:
    text: str  # exactly the concatenation of the streamed events' text
    token_ids: list[int]  # generated ids (the EOS id excluded; ids through the one completing a stop string)
    stop_reason: str  # "eos" | "stop_string" | "max_tokens" | "cancelled" | "context_full"
    prompt_tokens: int
    new_tokens: int
    ttft_s: float  # stream start to first token sampled (prefill included)
    decode_tokens_per_s: float  # tokens per second of decode + sampling time (the consumer's time excluded)
    prefill_tokens_per_s: float  # prompt tokens actually computed per second of prefill
    cached_tokens: int = 0  # prompt tokens already in the KV cache from the previous call (not recomputed)
    loop_us_per_token: float = 0.0  # of each decode step, the time spent in Python (sampling, detokenizing, stops)
    draft: str = "none"  # the speculative proposer used ("none", "lookup", "model")
    drafted_tokens: int = 0  # guesses the proposer made (speculative decoding)
    accepted_tokens: int = 0  # guesses the model kept
    dropped_messages: int = 0  # chat (ChatSession): oldest messages left out so that the prompt fits

    @property
    def context_used(self) -> int:
        """Tokens in the context after this reply: prompt + generated."""
        return self.prompt_tokens + self.new_tokens

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0


# ---------------------------------------------------------------------------------------------------------
# Per-token helpers


class Sampler:
    """Picks the next id from one logits row (numpy, in place on the row it is given)."""

    def __init__(self, settings: SamplingSettings, vocab_size: int, prompt_ids: Sequence[int]):
        self.s = settings
        self.rng = np.random.default_rng(settings.seed)
        self.penalize = settings.repetition_penalty != 1.0
        self.seen = np.zeros(vocab_size, bool)
        if self.penalize:
            self.seen[np.asarray(prompt_ids, np.int64)] = True
        self.seen_ids = np.flatnonzero(self.seen)

    def observe(self, token: int) -> None:
        if self.penalize and not self.seen[token]:
            self.seen[token] = True
            self.seen_ids = np.append(self.seen_ids, token)

    def penalize_row(self, x: np.ndarray) -> np.ndarray:
        if self.penalize and self.seen_ids.size:
            v = x[self.seen_ids]
            p = self.s.repetition_penalty
            x[self.seen_ids] = np.where(v < 0, v * p, v / p)
        return x

    def candidates(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ids a draw can pick and their (unnormalised) probabilities, after the repetition penalty,
        temperature, top-k and top-p; `logits` may be modified. Needs temperature > 0."""
        s = self.s
        x = self.penalize_row(logits) / np.float32(s.temperature)
        if 0 < s.top_k < x.size:
            ids = np.argpartition(x, -s.top_k)[-s.top_k :]
            vals = x[ids]
        else:
            ids, vals = np.arange(x.size), x
        probs = np.exp(vals - vals.max())
        if s.top_p >= 1.0:
            return ids, probs
        # HF's rule: keep the most likely tokens whose preceding cumulative mass is below top_p (>= 1 kept).
        # The nucleus is nearly always a few dozen tokens, so sort only the k most likely (k grows until
        # they hold top_p of the mass) instead of the whole vocabulary (5 ms per token at 49k).
        target = s.top_p * float(probs.sum(dtype=np.float64))
        k = min(64, probs.size)
        while True:
            top = np.argpartition(-probs, k - 1)[:k] if k < probs.size else np.arange(probs.size)
            top = top[np.argsort(-probs[top], kind="stable")]
            cum = np.cumsum(probs[top], dtype=np.float64)
            if cum[-1] >= target or k >= probs.size:
                break
            k = min(k * 8, probs.size)
        keep = min(int(np.searchsorted(cum, target, side="left")) + 1, top.size)
        top = top[:keep]
        return ids[top], probs[top]

    def __call__(self, logits: np.ndarray) -> int:
        if self.s.temperature == 0:
            return int(self.penalize_row(logits).argmax())
        ids, probs = self.candidates(logits)
        cum = np.cumsum(probs, dtype=np.float64)
        pick = min(int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right")), cum.size - 1)
        return int(ids[pick])


class IncrementalDetokenizer:
    """Text of a growing id sequence, one delta per token, decoding only a short window of recent ids.

    Two offsets into the ids (as in TGI / vLLM): text up to `read` has been emitted; decoding from `prefix`
    (a few tokens back) gives the tokenizer the context it needs for spaces and multi-token characters. A
    delta that ends in U+FFFD is an incomplete UTF-8 character and is held until the next token completes it."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        if self.prefix > 32:  # keep the window small
            del self.ids[: self.prefix]
            self.read -= self.prefix
            self.prefix = 0
        return after[len(before) :]

    def flush(self) -> str:
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


class StopStringFilter:
    """Holds back text that could be the start of a stop string; cuts the text at the first one found."""

    def __init__(self, stop_strings: Sequence[str]):
        self.stops = tuple(s for s in stop_strings if s)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.held = ""
        self.hit = False

    def push(self, text: str) -> str:
        if not self.stops or self.hit:
            return "" if self.hit else text
        buf = self.held + text
        found = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit, self.held = True, ""
            return buf[: min(found)]
        keep = 0
        for n in range(min(len(buf), self.longest - 1), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                keep = n
                break
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def flush(self, text: str = "") -> str:
        out = self.push(text)
        if not self.hit:
            out, self.held = out + self.held, ""
        return out


# ---------------------------------------------------------------------------------------------------------


class PlainTokens:
    """Tokens for Generator._stream, one decode step each (runtime.speculative.SpeculativeTokens is the other
    source): `next()` samples from the current logits, `feed(tok)` appends tok to the sequence."""

    def __init__(self, decoder, sampler: Sampler, logits: np.ndarray, cache_ids: list[int]):
        self.dec, self.sampler, self.logits, self.cache_ids = decoder, sampler, logits, cache_ids

    def next(self) -> int:
        return self.sampler(self.logits)

    def feed(self, tok: int) -> None:
        self.logits = self.dec.decode(tok)
        self.cache_ids.append(tok)

    def close(self) -> None:
        pass


def exact_step_tokens(decoder, settings: SamplingSettings) -> int:
    """The decode step width that makes greedy output independent of speculation: 2 (every token through the
    graph's multi-token path, as a speculative verification pass computes it, bit for bit) for greedy
    requests on graphs that quantize activations, else 1. On those graphs the one-token path rounds
    differently, so plain one-token greedy decoding and speculative decoding could part at a near-tie; with
    this rule `--draft` changes the speed, never the tokens. A two-token step runs at 0.80-0.89x of a one-token
    step where no guess is made (benchmarks/spec_decode.py --steps 1,2 measures it); sampling keeps one-token
    steps."""
    quantized = getattr(decoder, "quantizes_activations", False)
    return 2 if settings.temperature == 0 and quantized else 1


class Generator:
    """Generates from token ids with one OnnxDecoder. Not thread-safe: one stream at a time."""

    def __init__(
        self, decoder, tokenizer, stop_ids: set[int] | None = None, draft=None, step_tokens: int | None = None
    ):
        """stop_ids: token ids that end generation (default: the decoder's and the tokenizer's EOS).
        draft: a runtime.speculative proposer (PromptLookup, DraftModel) for speculative decoding, or None; a
        proposer with `greedy_only` set is used for greedy requests only.
        step_tokens: the decoder's step width (OnnxDecoder.step_tokens); None = `exact_step_tokens`."""
        self.decoder, self.tokenizer = decoder, tokenizer
        self.draft = draft
        self.step_tokens = step_tokens
        if stop_ids is None:
            stop_ids = set(getattr(decoder, "eos_token_ids", []) or [])
            if getattr(tokenizer, "eos_id", None) is not None:
                stop_ids.add(tokenizer.eos_id)
        self.stop_ids = {int(i) for i in stop_ids}
        self.last_result: GenerationResult | None = None
        self._cache_ids: list[int] = []  # the ids in the decoder's interactive KV cache, in order

    @property
    def context_length(self) -> int:
        return int(self.decoder.max_len)

    def reset(self) -> None:
        """Forget the cached sequence: the next prompt is prefilled from scratch."""
        self.decoder.reset()
        self._cache_ids = []
        if self.draft is not None:
            self.draft.reset()

    def _prefill(self, prompt: list[int]) -> tuple[np.ndarray, int]:
        """Logits after `prompt`, reusing the longest prefix already in the cache; returns (logits, reused)."""
        dec = self.decoder
        cached = self._cache_ids if dec.length == len(self._cache_ids) else []
        common = 0
        for a, b in zip(cached, prompt):
            if a != b:
                break
            common += 1
        common = min(common, len(prompt) - 1)  # at least one token goes through prefill, for its logits
        if common == 0:
            dec.reset()
            self._cache_ids = []
        else:
            # Rewind: the cache keeps rows [0, common); later rows are overwritten by the new prefill.
            dec.length = common
            del self._cache_ids[common:]
        logits = dec.prefill(prompt[common:])
        self._cache_ids.extend(prompt[common:])
        return logits, common

    def stream(
        self, prompt_ids: Sequence[int], settings: SamplingSettings, cancel: threading.Event | None = None
    ) -> Iterator[TokenEvent]:
        """An iterator of TokenEvents as tokens are generated. A stream that runs to its end ends with an
        event (text "", token_id -1) whose `result` is the GenerationResult; `self.last_result` also holds it
        (kept for callers not yet moved, and for a stream closed early). Bad settings and a prompt that
        leaves no room for one new token raise EdgepackError here, when stream() is called, before any work."""
        settings.check()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise EdgepackError("generate: the prompt is empty")
        if len(prompt) >= self.decoder.max_len:
            raise EdgepackError(
                f"prompt too long: {len(prompt)} tokens, the model's context is "
                f"{self.decoder.max_len} tokens and the prompt must leave room for the reply"
            )
        self.last_result = None
        return self._stream(prompt, settings, cancel)

    def _stream(
        self, prompt: list[int], settings: SamplingSettings, cancel: threading.Event | None
    ) -> Iterator[TokenEvent]:
        dec = self.decoder
        dec.step_tokens = self.step_tokens or exact_step_tokens(dec, settings)
        t0 = time.perf_counter()
        try:
            logits, reused = self._prefill(prompt)
        except BaseException:
            self._cache_ids = []
            dec.reset()
            raise
        t_prefill = time.perf_counter() - t0
        sampler = Sampler(settings, logits.shape[-1], prompt)
        source = self._token_source(logits, sampler)
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = StopStringFilter(settings.stop_strings)
        ids: list[int] = []
        parts: list[str] = []
        reason = "cancelled"  # if the consumer abandons the stream
        ttft = decode_time = loop_time = 0.0
        steps = 0
        try:
            while True:
                t = time.perf_counter()
                if cancel is not None and cancel.is_set():
                    reason = "cancelled"
                    break
                tok = source.next()
                if not ids:
                    ttft = time.perf_counter() - t0
                if tok in self.stop_ids:
                    reason = "eos"
                    break
                ids.append(tok)
                sampler.observe(tok)
                text = stops.push(detok.push(tok))
                if stops.hit:
                    reason = "stop_string"
                elif len(ids) >= settings.max_new_tokens:
                    reason = "max_tokens"
                elif len(self._cache_ids) + 1 > dec.max_len:
                    reason = "context_full"
                else:
                    if steps:  # sampling + detokenizing count as decode time; the consumer's time does not
                        host = time.perf_counter() - t
                        decode_time += host
                        loop_time += host
                    parts.append(text)
                    yield TokenEvent(text, tok)
                    t = time.perf_counter()
                    source.feed(tok)
                    decode_time += time.perf_counter() - t
                    steps += 1
                    continue
                if reason != "stop_string":
                    text += stops.flush(detok.flush())
                parts.append(text)
                yield TokenEvent(text, tok)
                break
            if reason in ("eos", "cancelled"):
                tail = stops.flush(detok.flush())
                if stops.hit:
                    reason = "stop_string"
                if tail:
                    parts.append(tail)
                    yield TokenEvent(tail, -1)
        finally:
            source.close()
            computed = len(prompt) - reused
            self.last_result = GenerationResult(
                text="".join(parts),
                token_ids=ids,
                stop_reason=reason,
                prompt_tokens=len(prompt),
                new_tokens=len(ids),
                ttft_s=ttft,
                decode_tokens_per_s=steps / decode_time if decode_time > 0 else 0.0,
                prefill_tokens_per_s=computed / t_prefill if t_prefill > 0 else 0.0,
                cached_tokens=reused,
                loop_us_per_token=1e6 * loop_time / steps if steps else 0.0,
                draft=getattr(self.draft, "name", "none"),
                drafted_tokens=getattr(source, "proposed", 0),
                accepted_tokens=getattr(source, "accepted", 0),
            )
        yield TokenEvent("", -1, self.last_result)  # a stream that ran to its end says how it ended

    def _token_source(self, logits: np.ndarray, sampler: Sampler):
        greedy_only = getattr(self.draft, "greedy_only", False)
        if self.draft is None or (greedy_only and sampler.s.temperature != 0):
            return PlainTokens(self.decoder, sampler, logits, self._cache_ids)
        from runtime.speculative import SpeculativeTokens

        return SpeculativeTokens(self.decoder, self.draft, sampler, logits, self._cache_ids, sampler.s.max_new_tokens)

    def generate(
        self, prompt_ids: Sequence[int], settings: SamplingSettings, cancel: threading.Event | None = None
    ) -> GenerationResult:
        result = None
        for event in self.stream(prompt_ids, settings, cancel):
            result = event.result or result
        return result

    def generate_text(
        self,
        prompt: str,
        settings: SamplingSettings,
        add_special_tokens: bool = True,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        """Plain completion of a text prompt (no chat template)."""
        return self.generate(
            self.tokenizer.encode_text(prompt, add_special_tokens=add_special_tokens), settings, cancel
        )


class ChatSession:
    """A multi-turn chat rendered with the bundle's chat template.

    Context policy: when history + reply do not fit the context, the oldest messages are dropped (whole
    user/assistant exchanges, so the history never starts with an assistant reply) and `last_dropped` says
    how many messages were left out; a single user message that cannot fit raises EdgepackError."""

    def __init__(self, generator: Generator, tokenizer, system_prompt: str | None = None):
        self.generator, self.tokenizer, self.system_prompt = generator, tokenizer, system_prompt
        self.messages: list[dict] = []  # {"role": "user"|"assistant", "content": str}; system prompt excluded
        self.last_dropped = 0
        self.context_used = 0  # tokens of the last prompt + its reply

    @property
    def context_length(self) -> int:
        return self.generator.context_length

    def _encode(self, messages: list[dict]) -> list[int]:
        head = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        if hasattr(self.tokenizer, "encode_chat"):
            # Contents are user text: special tokens typed in them stay plain text (TextTokenizer.encode_chat).
            return self.tokenizer.encode_chat(head + list(messages), add_generation_prompt=True)
        text = self.tokenizer.apply_chat_template(head + list(messages), add_generation_prompt=True)
        # The template writes any BOS itself (as transformers' apply_chat_template assumes).
        return self.tokenizer.encode(text, add_special_tokens=False)

    def build_prompt(self, messages: list[dict], max_new_tokens: int) -> tuple[list[int], int]:
        """Token ids of system prompt + `messages` (oldest dropped to fit) + generation prompt, and the
        number of oldest messages dropped. Messages are dropped until `max_new_tokens` fit after the prompt;
        if even the last user message alone leaves no room for `max_new_tokens`, it is sent anyway as long
        as one new token fits (generation then ends with "context_full"), else EdgepackError."""
        if not messages:
            raise EdgepackError("chat: no messages to answer")
        ctx = self.context_length
        start = 0
        while True:
            ids = self._encode(messages[start:])
            if len(ids) + max_new_tokens <= ctx:
                return ids, start
            nxt = next((i for i in range(start + 1, len(messages)) if messages[i]["role"] == "user"), None)
            if nxt is None:
                break
            start = nxt
        if len(ids) < ctx:
            return ids, start
        raise EdgepackError(
            f"message too long: the prompt is {len(ids)} tokens and the model's context is {ctx} "
            "tokens (shorten the message or the system prompt)"
        )

    def stream_reply(
        self, user_text: str, settings: SamplingSettings, cancel: threading.Event | None = None
    ) -> Iterator[TokenEvent]:
        """Append the user message, stream the assistant's reply, append it (on cancel: what was written)."""
        self.messages.append({"role": "user", "content": user_text})
        try:
            ids, dropped = self.build_prompt(self.messages, settings.max_new_tokens)
        except BaseException:
            self.messages.pop()
            raise
        return self._reply(ids, dropped, settings, cancel)

    def regenerate(self, settings: SamplingSettings, cancel: threading.Event | None = None) -> Iterator[TokenEvent]:
        """Drop the last assistant reply and stream a new one for the same user message."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if not self.messages or self.messages[-1]["role"] != "user":
            raise EdgepackError("chat: nothing to regenerate (no user message yet)")
        ids, dropped = self.build_prompt(self.messages, settings.max_new_tokens)
        return self._reply(ids, dropped, settings, cancel)

    def _reply(self, ids, dropped, settings, cancel) -> Iterator[TokenEvent]:
        self.last_dropped = dropped
        self.context_used = len(ids)
        parts: list[str] = []
        try:
            for event in self.generator.stream(ids, settings, cancel):
                parts.append(event.text)
                self.context_used += event.token_id >= 0
                if event.result is not None:
                    event = replace(event, result=replace(event.result, dropped_messages=dropped))
                yield event
        finally:  # also when the consumer stops early: keep what was written
            self.messages.append({"role": "assistant", "content": "".join(parts)})
            result = self.generator.last_result
            if result is not None:
                self.context_used = result.prompt_tokens + result.new_tokens

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages.clear()
        self.last_dropped = 0
        self.context_used = 0
