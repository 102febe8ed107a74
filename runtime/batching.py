"""Continuous batching: many generation requests decoding together through one decoder session.

A pool of KV-cache slots: one preallocated cache [slots, kv_heads, context, head_dim] per layer (numpy
buffers shared with OrtValues, so nothing is copied), each row a slot. A scheduler thread loops:

1. admit waiting requests into free slots (the lowest free row first);
2. prefill newcomers, at most `prefill_chunk` prompt tokens in all, each as a batch-1 run bound to *its own
   row* (row s of a C-contiguous [B, ...] buffer is itself a contiguous [1, ...] buffer), so a newcomer's
   cache is written exactly as a solo `OnnxDecoder.prefill` writes it and the others' rows are untouched;
   several short prompts join in one iteration, a long one is prefilled over several, so the decoding
   requests wait for at most one chunk's worth of prefill per token;
3. one decode step for every decoding slot at once, on the rows [0, b) where b is one past the highest
   busy slot (a lone request decodes at batch 1, as fast as solo). Per-row `seqlens_k` are
   GroupQueryAttention's batching: each row attends to its own positions only. A row that is free or
   still prefilling feeds a pad token at its current length, a position its next prefill overwrites;
4. sample each decoding slot's next token (runtime.generation's Sampler, incremental detokenizer and stop
   filter, per request), deliver its text, and free the slot when the request ends or was cancelled.

A cancelled request (a client that went away) leaves at the next iteration, so it costs at most one more
token. An exception in one request's token handling (or its listener) fails that request only; an
exception in a batched run fails the requests in that run; the scheduler thread keeps going.

Under greedy sampling every request yields what the pool yields for it alone, token for token, wherever the
graph's kernels compute a row the same whatever the batch: each row sees only its own positions, decode rows
are one-token steps, and a prompt cut across iterations keeps >= 2 tokens on both sides of every cut (a
one-token pass would take onnxruntime's decode path). Measured row-exact on fp32 graphs (tests) and on the
main bundle's int8-activation graph on an AVX-512 VNNI EPYC (48/48 load-test replies); an older GPTQ bundle on
an AVX2 box was not. `Generator` takes two-token steps for greedy requests on int8-activation graphs
(runtime.generation.exact_step_tokens), so there a pool's greedy reply can part from `edgepack generate`'s at a
near-tie.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import onnxruntime as ort

from runtime.errors import EdgepackError
from runtime.generation import (
    GenerationResult,
    IncrementalDetokenizer,
    Sampler,
    SamplingSettings,
    StopStringFilter,
    TokenEvent,
)

log = logging.getLogger("edgepack.batching")


class QueueFull(EdgepackError):
    """Every slot is busy and the waiting queue is full: try again later."""


@dataclass
class PoolConfig:
    """The slot pool. slots: requests decoding together; queue: requests allowed to wait for a slot;
    context: KV positions per slot (None = the decoder's max_len); prefill_chunk: prompt tokens prefilled
    per scheduler iteration; prefix: prompt tokens most requests start with (the chat template's system part,
    server.run.shared_chat_prefix): their KV cache is computed once and copied into each newcomer's row."""

    slots: int = 4
    queue: int = 16
    context: int | None = None
    prefill_chunk: int = 256
    prefix: tuple[int, ...] = ()

    def check(self, max_len: int) -> None:
        if not 1 <= self.slots <= 256:
            raise EdgepackError(f"parallel={self.slots}: must be between 1 and 256")
        if not 0 <= self.queue <= 100_000:
            raise EdgepackError(f"queue={self.queue}: must be between 0 and 100000")
        if self.context is not None and not 2 <= self.context <= max_len:
            raise EdgepackError(f"context={self.context}: must be between 2 and the model's max_len {max_len}")
        if self.prefill_chunk < 1:
            raise EdgepackError(f"prefill_chunk={self.prefill_chunk}: must be >= 1")
        if len(self.prefix) >= (self.context or max_len):
            raise EdgepackError(f"prefix of {len(self.prefix)} tokens: must be shorter than the context")


class Request:
    """One submitted generation. `on_event(TokenEvent)` is called from the scheduler thread for every
    event and `on_event(None)` once at the end; then `result` (or `error`) is set and `done` is set."""

    def __init__(self, prompt: list[int], settings: SamplingSettings, on_event: Callable[[TokenEvent | None], None]):
        self.prompt, self.settings, self.on_event = prompt, settings, on_event
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        """Ask the scheduler to stop this request; its slot is freed at the next iteration."""
        self.cancelled.set()


class TokenPolicy:
    """One request's per-token logic, step by step; the same rules and order as Generator._stream (which
    runs them in a loop for one sequence): sample, EOS, stop strings, max tokens, context full."""

    def __init__(self, tokenizer, settings: SamplingSettings, prompt: list[int], vocab: int, stop_ids: set[int]):
        self.settings, self.stop_ids = settings, stop_ids
        self.sampler = Sampler(settings, vocab, prompt)
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = StopStringFilter(settings.stop_strings)
        self.ids: list[int] = []
        self.parts: list[str] = []

    def step(self, logits: np.ndarray, cache_len: int, room: int) -> tuple[list[TokenEvent], str | None]:
        """Sample from `logits` (the row after `cache_len` cached tokens; `room` = cache positions).
        Returns the events to deliver and the stop reason, or None to decode the sampled token next."""
        tok = self.sampler(logits)
        if tok in self.stop_ids:
            return self.finish("eos"), "eos"
        self.ids.append(tok)
        self.sampler.observe(tok)
        text = self.stops.push(self.detok.push(tok))
        if self.stops.hit:
            reason = "stop_string"
        elif len(self.ids) >= self.settings.max_new_tokens:
            reason = "max_tokens"
        elif cache_len + 1 > room:
            reason = "context_full"
        else:
            self.parts.append(text)
            return [TokenEvent(text, tok)], None
        text += self.stops.flush(self.detok.flush()) if reason != "stop_string" else ""
        self.parts.append(text)
        return [TokenEvent(text, tok)], reason

    def finish(self, reason: str) -> list[TokenEvent]:
        """Events releasing held-back text when the request ends on EOS or is cancelled."""
        tail = self.stops.flush(self.detok.flush())
        if not tail:
            return []
        self.parts.append(tail)
        return [TokenEvent(tail, -1)]

    @property
    def last_token(self) -> int:
        return self.ids[-1]


class _Slot:
    def __init__(self, index: int, request: Request, policy: TokenPolicy):
        self.index, self.request, self.policy = index, request, policy
        self.length = 0  # tokens in this row's cache
        self.fed = 0  # prompt tokens prefilled so far
        self.decoding = False
        self.t_prefill = 0.0
        self.t_first = 0.0


class SlotCache:
    """KV buffers [slots, kv_heads, context, head_dim] per layer as numpy arrays shared with OrtValues;
    `binding_rows(a, b)` binds rows [a, b) as past and present of every layer (in place, as KVCache)."""

    def __init__(self, kv_layers: list[dict], slots: int, context: int, head_dim: int):
        self.slots, self.context = slots, context
        self.arrays = {}
        for layer in kv_layers:
            shape = (slots, int(layer["kv_heads"]), context, head_dim)
            for role in ("key", "value"):
                self.arrays[layer[f"past_{role}"], layer[f"present_{role}"]] = np.zeros(shape, np.float32)

    def bind_rows(self, binding: ort.IOBinding, start: int, stop: int) -> None:
        for (past, present), arr in self.arrays.items():
            value = ort.OrtValue.ortvalue_from_numpy(arr[start:stop])  # a contiguous view, no copy
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


class _DecodeBatch:
    """Decode-step inputs and logits for rows [0, b), bound once (as onnx_engine.DecodeStep)."""

    def __init__(self, session: ort.InferenceSession, cache: SlotCache, b: int, vocab: int):
        self.ids = np.zeros((b, 1), np.int64)
        self.seqlens = np.zeros(b, np.int32)
        self.total = np.zeros((), np.int32)
        self.positions = np.zeros((b, 1), np.int64)
        self.logits = np.zeros((b, 1, vocab), np.float32)
        self.binding = session.io_binding()
        for name, arr in (
            ("input_ids", self.ids),
            ("seqlens_k", self.seqlens),
            ("total_sequence_length", self.total),
            ("logits_positions", self.positions),
        ):
            self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr))
        self.binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self.logits))
        cache.bind_rows(self.binding, 0, b)


class BatchScheduler:
    """Continuous batching over one `OnnxDecoder`'s session (see the module docstring). Thread-safe
    `submit`; one scheduler thread does all the model work. Use as a context manager or call close()."""

    def __init__(self, decoder, tokenizer, stop_ids: set[int], config: PoolConfig | None = None):
        self.config = config or PoolConfig()
        self.config.check(decoder.max_len)
        self.decoder, self.tokenizer = decoder, tokenizer
        self.stop_ids = {int(i) for i in stop_ids}
        self.context = int(self.config.context or decoder.max_len)
        self.cache = SlotCache(decoder.kv_layers, self.config.slots, self.context, decoder.head_dim)
        self._batches: dict[int, _DecodeBatch] = {}
        self._slots: list[_Slot | None] = [None] * self.config.slots
        self._waiting: list[Request] = []
        self._cond = threading.Condition()
        self._closed = False
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0, "tokens": 0, "prefix_reused": 0}
        self.prefix = [int(t) for t in self.config.prefix]
        self._prefix_kv = self._prefill_prefix(self.prefix) if self.prefix else {}
        self._thread = threading.Thread(target=self._run, name="edgepack-batching", daemon=True)
        self._thread.start()

    # -----------------------------------------------------------------------------------------------------
    # Front-end side (any thread)

    def submit(
        self, prompt_ids: Sequence[int], settings: SamplingSettings, on_event: Callable[[TokenEvent | None], None]
    ) -> Request:
        """Queue a request. Raises EdgepackError for bad settings or a prompt that leaves no room for one
        new token, QueueFull when every slot is busy and the queue is full."""
        settings.check()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise EdgepackError("generate: the prompt is empty")
        if len(prompt) >= self.context:
            raise EdgepackError(
                f"prompt too long: {len(prompt)} tokens, the model's context is {self.context} "
                "tokens and the prompt must leave room for the reply"
            )
        vocab = self.decoder.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise EdgepackError(f"prompt: token ids must be in [0, {vocab})")
        request = Request(prompt, settings, on_event)
        with self._cond:
            if self._closed:
                raise EdgepackError("the scheduler is closed")
            busy = sum(s is not None for s in self._slots) + len(self._waiting)
            if busy >= self.config.slots + self.config.queue:
                raise QueueFull(
                    f"server busy: {self.config.slots} requests generating and {len(self._waiting)} waiting"
                )
            self._waiting.append(request)
            self._cond.notify()
        return request

    def stream(
        self, prompt_ids: Sequence[int], settings: SamplingSettings, cancel: threading.Event | None = None
    ) -> Iterator[TokenEvent]:
        """Blocking iterator of one request's events (for threads; the server uses `submit`). Raises the
        request's error at the end if it failed; closing the iterator cancels the request."""
        events: queue.Queue = queue.Queue()
        request = self.submit(prompt_ids, settings, events.put)
        try:
            while True:
                if cancel is not None and cancel.is_set():
                    request.cancel()
                event = events.get()
                if event is None:
                    break
                yield event
            if request.error is not None:
                raise request.error
        finally:
            request.cancel()

    def generate(self, prompt_ids: Sequence[int], settings: SamplingSettings) -> GenerationResult:
        """One request, waited for (a blocking convenience)."""
        done = threading.Event()
        request = self.submit(prompt_ids, settings, lambda e: done.set() if e is None else None)
        done.wait()
        if request.error is not None:
            raise request.error
        return request.result

    def status(self) -> dict:
        with self._cond:
            active = sum(s is not None for s in self._slots)
            return {
                "slots": self.config.slots,
                "active": active,
                "waiting": len(self._waiting),
                "queue": self.config.queue,
                "context": self.context,
                **self.stats,
            }

    def close(self) -> None:
        """Stop the scheduler thread; requests still waiting or running end with an error."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def __enter__(self) -> BatchScheduler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -----------------------------------------------------------------------------------------------------
    # Scheduler thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not any(self._slots):
                    self._cond.wait()
                if self._closed:
                    break
                self._admit()
            try:
                self._drop_cancelled()
                self._prefill_some()
                self._decode_step()
            except Exception:  # a bug in the scheduler itself: fail what is running, keep serving
                log.exception("batching scheduler step failed")
                for slot in list(filter(None, self._slots)):
                    self._end(slot, None, EdgepackError("internal error in the batching scheduler"))
        with self._cond:
            pending = self._waiting + [s.request for s in self._slots if s is not None]
            self._waiting.clear()
            self._slots = [None] * self.config.slots
        for request in pending:
            request.error = EdgepackError("the server is shutting down")
            self._notify(request, None)
            request.done.set()

    def _prefill_prefix(self, prefix: list[int]) -> dict:
        """The KV cache of `prefix` alone (prefilled in row 0 before the scheduler starts), per cache array."""
        if min(prefix) < 0 or max(prefix) >= self.decoder.vocab_size:
            raise EdgepackError(f"prefix: token ids must be in [0, {self.decoder.vocab_size})")
        self._run_prefill(0, prefix, 0)
        return {key: arr[0, :, : len(prefix)].copy() for key, arr in self.cache.arrays.items()}

    def _admit(self) -> None:
        vocab = self.decoder.vocab_size
        n = len(self.prefix)
        for i, slot in enumerate(self._slots):
            if not self._waiting:
                return
            if slot is None:
                request = self._waiting.pop(0)
                policy = TokenPolicy(self.tokenizer, request.settings, request.prompt, vocab, self.stop_ids)
                new = self._slots[i] = _Slot(i, request, policy)
                if n and len(request.prompt) > n and request.prompt[:n] == self.prefix:
                    # a copy instead of a prefill: causal attention makes the prefix's KV independent of what
                    # follows, so the row holds what prefilling the prompt in two parts would write
                    for key, arr in self.cache.arrays.items():
                        arr[i, :, :n] = self._prefix_kv[key]
                    new.length = new.fed = n
                    self.stats["prefix_reused"] += 1

    def _drop_cancelled(self) -> None:
        for slot in filter(None, self._slots):
            if slot.request.cancelled.is_set():
                events = slot.policy.finish("cancelled")
                self._end(slot, "cancelled", events=events)

    def _prefill_some(self) -> None:
        """Prefill newcomers in arrival order, `prefill_chunk` prompt tokens in all per iteration: several
        short prompts join in one iteration, a long one takes several (the decoders wait one chunk at most)."""
        pending = sorted(
            (s for s in self._slots if s is not None and not s.decoding), key=lambda s: s.request.submitted
        )
        budget = self.config.prefill_chunk
        for slot in pending:
            if budget <= 0:
                return
            prompt = slot.request.prompt
            remaining = len(prompt) - slot.fed
            take = min(budget, remaining)
            if take < remaining:
                # a cut keeps >= 2 tokens on both sides: a one-token pass takes onnxruntime's decode path, whose
                # last bits differ from the multi-token path (runtime.speculative), so a reply would depend on
                # how busy the pool was when its prompt was cut
                take = min(take, remaining - 2)
                if take < 2:
                    continue
            chunk = prompt[slot.fed : slot.fed + take]
            budget -= len(chunk)
            t = time.perf_counter()
            try:
                logits = self._run_prefill(slot.index, chunk, slot.length)
            except Exception as e:
                log.exception("prefill failed")
                self._end(slot, None, EdgepackError(f"prefill failed: {str(e).splitlines()[0][:200]}"))
                continue
            slot.t_prefill += time.perf_counter() - t
            slot.fed += len(chunk)
            slot.length += len(chunk)
            if slot.fed == len(prompt):
                slot.decoding = True
                slot.t_first = time.perf_counter()
                self._sample(slot, logits)

    def _run_prefill(self, row: int, ids: list[int], past: int) -> np.ndarray:
        """`ids` appended to row `row` after `past` cached tokens, batch 1 (as OnnxDecoder.prefill)."""
        n = len(ids)
        total = past + n
        binding = self.decoder.session.io_binding()
        binding.bind_cpu_input("input_ids", np.asarray(ids, np.int64).reshape(1, n))
        binding.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        binding.bind_cpu_input("logits_positions", np.array([[n - 1]], np.int64))
        logits = np.empty((1, 1, self.decoder.vocab_size), np.float32)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self.cache.bind_rows(binding, row, row + 1)
        self.decoder.session.run_with_iobinding(binding)
        return logits[0, 0]

    def _decode_step(self) -> None:
        decoding = [s for s in self._slots if s is not None and s.decoding]
        if not decoding:
            return
        b = 1 + max(i for i, s in enumerate(self._slots) if s is not None)
        batch = self._batches.get(b)
        if batch is None:
            batch = self._batches[b] = _DecodeBatch(self.decoder.session, self.cache, b, self.decoder.vocab_size)
        pad = self.decoder.pad_id
        for i in range(b):
            slot = self._slots[i]
            if slot is not None and slot.decoding:
                batch.ids[i, 0] = slot.policy.last_token
            else:  # free or still prefilling: a pad at the row's current length, overwritten later
                batch.ids[i, 0] = pad
            batch.seqlens[i] = slot.length if slot is not None else 0
        batch.total[()] = int(batch.seqlens.max()) + 1
        try:
            self.decoder.session.run_with_iobinding(batch.binding)
        except Exception as e:
            log.exception("decode step failed")
            for slot in decoding:
                self._end(slot, None, EdgepackError(f"decode failed: {str(e).splitlines()[0][:200]}"))
            return
        for slot in decoding:
            slot.length += 1
            self._sample(slot, batch.logits[slot.index, 0])

    def _sample(self, slot: _Slot, logits: np.ndarray) -> None:
        try:
            events, reason = slot.policy.step(logits, slot.length, self.context)
        except Exception as e:
            log.exception("token handling failed")
            self._end(slot, None, EdgepackError(f"generation failed: {e}"))
            return
        self.stats["tokens"] += bool(events and events[0].token_id >= 0)
        if reason is None:
            for event in events:
                if not self._notify(slot.request, event):
                    self._end(slot, None, EdgepackError("the request's listener failed"))
                    return
        else:
            self._end(slot, reason, events=events)

    def _notify(self, request: Request, event: TokenEvent | None) -> bool:
        try:
            request.on_event(event)
            return True
        except Exception:
            log.exception("request listener failed")
            return False

    def _end(
        self, slot: _Slot, reason: str | None, error: BaseException | None = None, events: list[TokenEvent] = ()
    ) -> None:
        """Deliver the last events, set the result (or error), free the slot."""
        request, policy = slot.request, slot.policy
        with self._cond:
            self._slots[slot.index] = None
        if error is None:
            for event in events:
                self._notify(request, event)
            if reason in ("eos", "cancelled") and policy.stops.hit:  # the flushed tail completed a stop string
                reason = "stop_string"
            now = time.perf_counter()
            steps = max(len(policy.ids) - 1, 0)
            decode_s = now - slot.t_first if slot.t_first else 0.0
            request.result = GenerationResult(
                text="".join(policy.parts),
                token_ids=list(policy.ids),
                stop_reason=reason,
                prompt_tokens=len(request.prompt),
                new_tokens=len(policy.ids),
                ttft_s=(slot.t_first - request.submitted) if slot.t_first else 0.0,
                decode_tokens_per_s=steps / decode_s if decode_s > 0 else 0.0,
                prefill_tokens_per_s=len(request.prompt) / slot.t_prefill if slot.t_prefill > 0 else 0.0,
            )
            self.stats["cancelled" if reason == "cancelled" else "completed"] += 1
        else:
            request.error = error
            self.stats["failed"] += 1
        self._notify(request, None)
        request.done.set()
