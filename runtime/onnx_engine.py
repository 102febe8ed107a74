"""Generation engine on the fused decoder graph of exporter.onnx_graph (onnxruntime + numpy, no torch).

Speed comes from doing nothing per token that does not have to be done:

- The KV cache is preallocated once per batch shape as ORT-owned buffers [batch, kv_heads, max_len,
  head_dim] and bound with IO binding as *both* `past_key_values.{i}.*` and `present.{i}.*`. GroupQueryAttention
  sees the same pointer on both sides and writes each new position into it in place, so a decode step
  neither allocates nor copies the cache.
- The decode step's small inputs (token ids, seqlens_k, total_sequence_length, logits_positions) and its
  logits output are numpy arrays wrapped as OrtValues that share their memory; they are bound once, and a
  step only writes a few integers into them and calls `run_with_iobinding`.
- Logits are computed only at the positions that are read (`logits_positions`): the last prompt token
  in prefill, one per row in decode.

Batching follows GroupQueryAttention's convention: each row's tokens start at cache position 0, prompts of
different lengths are right-padded in one prefill with per-row `seqlens_k`, and each row then decodes at its
own position. Rows never attend to padding and RoPE positions are the true ones, so a batched result equals
the unbatched one (the harness' "left padding" is only how the torch backend does it).

Context-full policy: a prompt plus the tokens to generate must fit in `max_len` (the graph's rotary cache
and the KV buffer); anything longer raises EdgepackError before any work is done. No sliding or truncation.

Threads: `threads=None` lets ORT pick (one per physical core). ORT's intra-op workers busy-wait between
kernels by default (`spin=True`), which is fastest on an idle machine; when other processes compete for the
cores (a shared box, or a UI in the same process) busy-waiting threads steal each other's time slices:
measured on the shared 2-core dev box, a SmolLM2-shaped int4 graph decoded at ~100 tok/s with 2 spinning
threads, ~195 tok/s with spin=False and ~225 tok/s with 1 thread.

The MatMulNBits accuracy level (int8 vs fp32 activations) is an attribute baked into the graph at export;
the runtime can only check it (onnx, the one library that could rewrite the graph, is not a runtime
dependency).
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from runtime.contract import (
    FORMAT,
    INPUT_IDS,
    LOGITS,
    LOGITS_POSITIONS,
    METADATA_KEY,
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
)
from runtime.errors import EdgepackError

GRAPH_OPT = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


class KVCache:
    """ORT-owned KV buffers for one batch size, bound as past and present of every attention layer."""

    def __init__(self, kv_layers: list[dict], batch: int, length: int, head_dim: int):
        self.batch, self.length = batch, length
        self.values = {}
        for layer in kv_layers:
            shape = (batch, int(layer["kv_heads"]), length, head_dim)
            for role in ("key", "value"):
                self.values[layer[f"past_{role}"], layer[f"present_{role}"]] = (
                    ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cpu", 0)
                )

    def bind(self, binding: ort.IOBinding) -> None:
        for (past, present), value in self.values.items():
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(v.shape())) * 4 for v in self.values.values())


class DecodeStep:
    """The decode step's inputs and logits as numpy arrays shared with OrtValues, bound once."""

    def __init__(self, session: ort.InferenceSession, cache: KVCache, vocab: int, width: int = 1, read: int = 0):
        """width > 1: a step that appends `width` tokens per row with logits at each (speculative scoring), or
        at the first `read` of them only."""
        b = cache.batch
        read = read or width
        self.ids = np.zeros((b, width), np.int64)
        self.seqlens = np.zeros(b, np.int32)
        self.total = np.zeros((), np.int32)
        self.positions = np.broadcast_to(np.arange(read, dtype=np.int64), (b, read)).copy()
        self.logits = np.zeros((b, read, vocab), np.float32)
        self.binding = session.io_binding()
        for name, arr in (
            (INPUT_IDS, self.ids),
            (SEQLENS_K, self.seqlens),
            (TOTAL_SEQUENCE_LENGTH, self.total),
            (LOGITS_POSITIONS, self.positions),
        ):
            self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr))
        self.binding.bind_ortvalue_output(LOGITS, ort.OrtValue.ortvalue_from_numpy(self.logits))
        cache.bind(self.binding)


class OnnxDecoder:
    """A decoder session: interactive `prefill`/`decode` on one sequence, and the quality harness'
    backend protocol (`log_probs`, `greedy`) on batches."""

    def __init__(
        self,
        model_path,
        threads: int | None = None,
        max_len: int | None = None,
        accuracy_level: int | None = None,
        graph_opt: str = "all",
        pad_id: int = 0,
        spin: bool = True,
        step_tokens: int = 1,
    ):
        """step_tokens: tokens per `decode` pass, 1 or 2 (see `decode`)."""
        model_path = Path(model_path)
        if not model_path.is_file():
            raise EdgepackError(f"{model_path}: ONNX model not found")
        if graph_opt not in GRAPH_OPT:
            raise EdgepackError(f"graph_opt={graph_opt!r}: use one of {sorted(GRAPH_OPT)}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = GRAPH_OPT[graph_opt]
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = 1
        if threads:
            opts.intra_op_num_threads = int(threads)
        if not spin:  # idle worker threads sleep instead of busy-waiting (see module docstring)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types with long messages
            raise EdgepackError(
                f"{model_path}: onnxruntime could not load the model ({str(e).splitlines()[0][:200]})"
            ) from None
        raw = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if raw is None:
            raise EdgepackError(f"{model_path}: no '{METADATA_KEY}' metadata; not an edgepack decoder graph")
        self.metadata = json.loads(raw)
        if self.metadata.get("format") != FORMAT:
            raise EdgepackError(f"{model_path}: metadata format {self.metadata.get('format')!r} is not {FORMAT!r}")
        baked = self.metadata.get("weights", {}).get("accuracy_level")
        if accuracy_level is not None and accuracy_level != baked:
            raise EdgepackError(
                f"accuracy_level={accuracy_level}: this graph was exported with accuracy_level={baked}; "
                "it is fixed at export (GraphOptions.accuracy_level)"
            )
        graph_max = int(self.metadata["max_len"])
        if max_len is not None and max_len > graph_max:
            raise EdgepackError(
                f"max_len={max_len}: the graph supports at most {graph_max} positions (its rotary cache)"
            )
        self.max_len = int(max_len or graph_max)
        self.vocab_size = int(self.metadata["vocab_size"])
        self.head_dim = int(self.metadata["head_dim"])
        self.kv_layers = list(self.metadata["kv_cache"])
        self.eos_token_ids = list(self.metadata.get("eos_token_ids") or [])
        self.bos_token_id = self.metadata.get("bos_token_id")
        self.pad_id = int(pad_id)
        if step_tokens not in (1, 2):
            raise EdgepackError(f"step_tokens={step_tokens}: must be 1 or 2")
        self.step_tokens = step_tokens
        self.threads = threads
        self._cache: KVCache | None = None  # the interactive sequence's cache (batch 1, max_len)
        self._step: DecodeStep | None = None
        self._wide_steps: dict[int, DecodeStep] = {}  # score(): one bound step per number of tokens
        self._pair_step: DecodeStep | None = None  # decode() with step_tokens=2
        self.length = 0  # tokens in the interactive cache

    @property
    def quantizes_activations(self) -> bool:
        """Whether the graph's MatMulNBits kernels quantize their inputs to int8 (accuracy_level 4 with int4
        projections or a quantized head). Then a one-token step and the multi-token path, which agree to ~1e-5
        in float, can round an activation to a different int8 step, and logits differ by up to ~0.6."""
        w = self.metadata.get("weights") or {}
        quantized = w.get("projections", "fp32") != "fp32" or w.get("lm_head", "fp32") != "fp32"
        return w.get("accuracy_level") == 4 and quantized

    # -----------------------------------------------------------------------------------------------------
    # One sequence, interactively (chat)

    def reset(self) -> None:
        """Forget the interactive sequence (the buffers are kept and simply overwritten)."""
        self.length = 0

    def _ensure_session_cache(self) -> None:
        if self._cache is None:
            self._cache = KVCache(self.kv_layers, 1, self.max_len, self.head_dim)
            self._step = DecodeStep(self.session, self._cache, self.vocab_size)

    def prefill(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append `ids` to the sequence; return the logits [vocab] after its last token (or [len, vocab]
        for every appended position with all_logits=True)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        n = ids.shape[1]
        if n == 0:
            raise EdgepackError("prefill: no tokens given")
        self._check_room(self.length + n)
        self._ensure_session_cache()
        total = self.length + n
        positions = np.arange(n, dtype=np.int64)[None, :] if all_logits else np.array([[n - 1]], np.int64)
        logits = self._run_bound(self._cache, ids, np.array([total - 1], np.int32), total, positions)
        self.length = total
        return logits[0] if all_logits else logits[0, -1]

    def decode(self, token: int) -> np.ndarray:
        """Append one token; return the logits [vocab] for the next one.

        With step_tokens=2 the token goes through the graph's multi-token path, followed by a pad that is
        dropped again (never attended to, overwritten by the next step): the same arithmetic as `score`, whose
        rows are bit-identical whatever the number of tokens >= 2 (measured on SmolLM2's int8-activation
        graphs, where the one-token path differs at the rounding level: see runtime.speculative). So greedy
        decoding that always takes this step equals speculative decoding's output token for token. The last
        free position of the context falls back to the one-token step."""
        if self.length == 0:
            raise EdgepackError("decode: call prefill first (the sequence is empty)")
        self._check_room(self.length + 1)
        if self.step_tokens == 2 and self.length + 2 <= self.max_len:
            if self._pair_step is None:  # two tokens in, the logits of the first out
                self._pair_step = DecodeStep(self.session, self._cache, self.vocab_size, width=2, read=1)
            step = self._pair_step
            step.ids[0, 0], step.ids[0, 1] = int(token), self.pad_id
            step.seqlens[0] = self.length + 1
            step.total[()] = self.length + 2
            self.session.run_with_iobinding(step.binding)
            self.length += 1
            return step.logits[0, 0].copy()
        step = self._step
        step.ids[0, 0] = int(token)
        step.seqlens[0] = self.length
        step.total[()] = self.length + 1
        self.session.run_with_iobinding(step.binding)
        self.length += 1
        return step.logits[0, 0].copy()

    def score(self, ids: Sequence[int]) -> np.ndarray:
        """Append `ids` in one pass over the cache and return the logits [len(ids), vocab] after each of
        them: speculative decoding's verification of a draft. GroupQueryAttention treats a multi-token step
        after a past as a "subsequent prompt" (causal within the new tokens), so row i equals what `decode`
        would return after the same tokens (to float rounding). Bindings are kept per length, so a step costs
        what `decode` costs plus the extra rows' compute."""
        n = len(ids)
        if n == 0:
            raise EdgepackError("score: no tokens given")
        if self.length == 0:
            raise EdgepackError("score: call prefill first (the sequence is empty)")
        if n == 1:
            return self.decode(ids[0])[None]
        self._check_room(self.length + n)
        step = self._wide_steps.get(n)
        if step is None:
            step = self._wide_steps[n] = DecodeStep(self.session, self._cache, self.vocab_size, width=n)
        step.ids[0, :] = ids
        step.seqlens[0] = self.length + n - 1
        step.total[()] = self.length + n
        self.session.run_with_iobinding(step.binding)
        self.length += n
        return step.logits[0].copy()

    def rewind(self, length: int) -> None:
        """Keep the first `length` tokens of the sequence (speculative rollback, a shared chat prefix): the
        rows after them stay in the buffer but are never attended to and are overwritten by the next step."""
        if not 0 <= length <= self.length:
            raise EdgepackError(f"rewind: length {length} is outside the sequence's 0..{self.length} tokens")
        self.length = int(length)

    # -----------------------------------------------------------------------------------------------------
    # Harness backend protocol (runtime.harness.Backend)

    def log_probs(self, ids: np.ndarray) -> np.ndarray:
        """log-softmax over the vocabulary at every position of full sequences: float32 [B, T, V].
        Runs without a cache (empty past); each call sees only its own rows."""
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise EdgepackError(f"log_probs: expected token ids [batch, T], got shape {ids.shape}")
        b, t = ids.shape
        self._check_room(t)
        feeds = {
            INPUT_IDS: ids,
            SEQLENS_K: np.full(b, t - 1, np.int32),
            TOTAL_SEQUENCE_LENGTH: np.array(t, np.int32),
            LOGITS_POSITIONS: np.broadcast_to(np.arange(t, dtype=np.int64), (b, t)).copy(),
        }
        for layer in self.kv_layers:
            empty = np.zeros((b, int(layer["kv_heads"]), 0, self.head_dim), np.float32)
            feeds[layer["past_key"]] = empty
            feeds[layer["past_value"]] = empty
        logits = self.session.run([LOGITS], feeds)[0]
        return log_softmax_inplace(logits)

    def greedy(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int]) -> list[list[int]]:
        """Greedy continuation of each prompt, batched; each result stops before its first stop id."""
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise EdgepackError("greedy: empty prompt")
        lengths = np.array([len(p) for p in prompts], np.int32)
        longest = int(lengths.max())
        self._check_room(longest + max_new_tokens)
        b = len(prompts)
        # A buffer just long enough for this batch: the attention kernel's work scales with its length.
        cache = KVCache(self.kv_layers, b, longest + max(max_new_tokens, 1), self.head_dim)
        ids = np.full((b, longest), self.pad_id, np.int64)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = p
        logits = self._run_bound(cache, ids, lengths - 1, longest, (lengths - 1).astype(np.int64)[:, None])
        results: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(b, bool)
        step = DecodeStep(self.session, cache, self.vocab_size) if max_new_tokens > 1 else None
        seqlens = lengths.copy()  # tokens in each row's cache
        for n in range(max_new_tokens):
            nxt = logits[:, -1].argmax(axis=-1)
            for i in range(b):
                if not done[i]:
                    if int(nxt[i]) in stop_ids:
                        done[i] = True
                    else:
                        results[i].append(int(nxt[i]))
            if done.all() or n == max_new_tokens - 1:
                break
            step.ids[:, 0] = np.where(done, self.pad_id, nxt)
            step.seqlens[:] = seqlens  # after this step each row holds seqlens + 1 tokens
            step.total[()] = int(seqlens.max()) + 1
            self.session.run_with_iobinding(step.binding)
            seqlens += 1
            logits = step.logits
        return results

    # -----------------------------------------------------------------------------------------------------

    def _check_room(self, needed: int) -> None:
        if needed > self.max_len:
            raise EdgepackError(
                f"context full: {needed} tokens needed, the model's max_len is {self.max_len} "
                "(shorten the prompt or the number of new tokens, or reset the conversation)"
            )

    def _run_bound(
        self, cache: KVCache, ids: np.ndarray, seqlens: np.ndarray, total: int, positions: np.ndarray
    ) -> np.ndarray:
        """One multi-token step through `cache` (shared past/present buffers); returns [B, P, V] logits."""
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUT_IDS, np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input(SEQLENS_K, np.ascontiguousarray(seqlens, dtype=np.int32))
        binding.bind_cpu_input(TOTAL_SEQUENCE_LENGTH, np.array(total, np.int32))
        binding.bind_cpu_input(LOGITS_POSITIONS, np.ascontiguousarray(positions, dtype=np.int64))
        logits = np.empty((ids.shape[0], positions.shape[1], self.vocab_size), np.float32)
        binding.bind_ortvalue_output(LOGITS, ort.OrtValue.ortvalue_from_numpy(logits))
        cache.bind(binding)
        self.session.run_with_iobinding(binding)
        return logits


def log_softmax_inplace(logits: np.ndarray) -> np.ndarray:
    """log-softmax over the last axis, overwriting `logits` (float32), one row at a time so the temporary
    exp buffer stays small even for [B, 512, 49152] batches."""
    flat = logits.reshape(-1, logits.shape[-1])
    chunk = max(1, (1 << 22) // flat.shape[1])
    for start in range(0, flat.shape[0], chunk):
        x = flat[start : start + chunk]
        x -= x.max(axis=-1, keepdims=True)
        x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return logits
