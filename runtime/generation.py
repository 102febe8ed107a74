"""Text generation on a bundle's decoder: sampling, stop tokens and strings, streaming, chat sessions.

SKELETON: the public API below is fixed; bodies are being filled in.

Speed: per token the only Python work besides `OnnxDecoder.decode` is the sampler (numpy on one logits
row) and an incremental detokenizer that decodes a small window of recent ids, never the whole text.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator, Sequence


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


@dataclass
class TokenEvent:
    """One step of a stream. `text` is the new text since the last event (may be "" while text is held back
    because it could be the start of a stop string). `token_id` is the id just sampled, or -1 on a final
    event that only releases held-back text."""

    text: str
    token_id: int


@dataclass
class GenerationResult:
    text: str  # exactly the concatenation of the streamed events' text
    token_ids: list[int]  # generated ids (the stop/EOS id excluded)
    stop_reason: str  # "eos" | "stop_string" | "max_tokens" | "cancelled" | "context_full"
    prompt_tokens: int
    new_tokens: int
    ttft_s: float  # stream start to first token sampled (prefill included)
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    cached_tokens: int = 0  # prompt tokens already in the KV cache from the previous turn (not recomputed)


class Generator:
    """Generates from token ids with one OnnxDecoder. Not thread-safe: one stream at a time."""

    def __init__(self, decoder, tokenizer, stop_ids: set[int] | None = None):
        """stop_ids: token ids that end generation (default: the decoder's and the tokenizer's EOS)."""
        self.decoder, self.tokenizer = decoder, tokenizer
        self.stop_ids = set(stop_ids) if stop_ids is not None else set()
        self.last_result: GenerationResult | None = None

    @property
    def context_length(self) -> int:
        return self.decoder.max_len

    def stream(self, prompt_ids: Sequence[int], settings: SamplingSettings,
               cancel: threading.Event | None = None) -> Iterator[TokenEvent]:
        """Yield TokenEvents as tokens are generated; afterwards `self.last_result` holds the result.
        A prompt that leaves no room for one new token raises EdgepackError before any work."""
        raise NotImplementedError

    def generate(self, prompt_ids: Sequence[int], settings: SamplingSettings,
                 cancel: threading.Event | None = None) -> GenerationResult:
        for _ in self.stream(prompt_ids, settings, cancel):
            pass
        return self.last_result


class ChatSession:
    """A multi-turn chat rendered with the bundle's chat template.

    Context policy: when history + reply do not fit the context, the oldest messages are dropped (whole
    user/assistant exchanges, so the history never starts with an assistant reply) and `last_dropped` says
    how many messages are left out; a single user message that cannot fit raises EdgepackError."""

    def __init__(self, generator: Generator, tokenizer, system_prompt: str | None = None):
        self.generator, self.tokenizer, self.system_prompt = generator, tokenizer, system_prompt
        self.messages: list[dict] = []  # {"role": "user"|"assistant", "content": str}; system prompt excluded
        self.last_dropped = 0
        self.context_used = 0  # tokens of the last prompt + reply

    @property
    def context_length(self) -> int:
        return self.generator.context_length

    def build_prompt(self, messages: list[dict], max_new_tokens: int) -> tuple[list[int], int]:
        """Token ids of system prompt + `messages` (oldest dropped to fit) + generation prompt, and the
        number of oldest messages dropped."""
        raise NotImplementedError

    def stream_reply(self, user_text: str, settings: SamplingSettings,
                     cancel: threading.Event | None = None) -> Iterator[TokenEvent]:
        """Append the user message, stream the assistant's reply, append it (on cancel: what was written)."""
        raise NotImplementedError

    def regenerate(self, settings: SamplingSettings, cancel: threading.Event | None = None) -> Iterator[TokenEvent]:
        """Drop the last assistant reply and stream a new one for the same user message."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages.clear()
        self.last_dropped = 0
        self.context_used = 0
