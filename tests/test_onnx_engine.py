"""runtime.onnx_engine against Hugging Face: prefill + decode logits, greedy generation, log-probs, with the
KV cache shared in place between past and present."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_tiny_llama
from exporter.int4 import dequantize_matmulnbits, quantize_rtn_int4
from runtime.errors import EdgepackError
from runtime.onnx_engine import OnnxDecoder, log_softmax_inplace
from test_onnx_graph import PROJ, build, channel_pruned, depth_pruned, hf_logits, hf_with_weights, numpy_state

RNG = np.random.default_rng(11)
PROMPT = RNG.integers(3, 256, 9).tolist()


def engine_for(tmp_path, model_or_ref, weights=None, config=None, max_len=96, **opts):
    weights = numpy_state(model_or_ref) if weights is None else weights
    path, _ = build(tmp_path, weights, config or model_or_ref.config, max_len=max_len, **opts)
    return OnnxDecoder(path, threads=2)


def cases():
    return {
        "plain": lambda: (make_tiny_llama("plain"), None, None),
        "llama32": lambda: (make_tiny_llama("llama32"), None, None),
        "depth_pruned": lambda: depth_pruned("llama32"),
        "channel_pruned": lambda: channel_pruned("llama32"),
    }


@pytest.mark.parametrize("case", ["plain", "llama32", "depth_pruned", "channel_pruned"])
def test_prefill_and_20_decode_steps_match_hf(tmp_path, case):
    ref, weights, config = cases()[case]()
    dec = engine_for(tmp_path, ref, weights, config)
    got = [dec.prefill(PROMPT)]
    seq = list(PROMPT)
    for _ in range(20):
        tok = int(got[-1].argmax())
        seq.append(tok)
        got.append(dec.decode(tok))
    want = hf_logits(ref, np.array([seq]))[0, len(PROMPT) - 1 :]
    np.testing.assert_allclose(np.stack(got), want, atol=1e-4)
    assert dec.length == len(seq)


def test_kv_cache_is_written_in_place(tmp_path):
    """Past and present are one buffer: its address never changes and each decode fills the next row."""
    dec = engine_for(tmp_path, make_tiny_llama("llama32"))
    dec.prefill(PROMPT)
    (past, present), value = next(iter(dec._cache.values.items()))
    assert past.startswith("past_key_values.") and present.startswith("present.")
    addr = value.data_ptr()
    before = value.numpy()[0, :, len(PROMPT)].copy()
    dec.decode(5)
    after = value.numpy()
    assert value.data_ptr() == addr and value.shape() == [1, 2, 96, 16]
    assert not np.allclose(before, after[0, :, len(PROMPT)])  # the new token's key landed in row len(PROMPT)


def test_chat_continuation_appends_to_the_cache(tmp_path):
    """A second prefill (next user turn) continues the same sequence."""
    model = make_tiny_llama("plain")
    dec = engine_for(tmp_path, model)
    dec.prefill(PROMPT)
    dec.decode(7)
    turn2 = [4, 99, 150, 23]
    got = dec.prefill(turn2, all_logits=True)
    want = hf_logits(model, np.array([PROMPT + [7] + turn2]))[0, -len(turn2) :]
    np.testing.assert_allclose(got, want, atol=1e-4)
    dec.reset()
    np.testing.assert_allclose(dec.prefill(turn2), hf_logits(model, np.array([turn2]))[0, -1], atol=1e-4)


@pytest.mark.parametrize("kind,seed", [("plain", 1), ("llama32", 0)])
def test_batched_greedy_equals_hf_generate(tmp_path, kind, seed):
    model = make_tiny_llama(kind, seed=seed)
    dec = engine_for(tmp_path, model)
    prompts = [RNG.integers(3, 256, n).tolist() for n in (4, 11, 7, 1)]
    got = dec.greedy(prompts, 12, set())
    for p, g in zip(prompts, got):
        want = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, pad_token_id=0)[
            0, len(p) :
        ].tolist()
        assert g == want
    assert len({tuple(g) for g in got}) > 1  # rows really differ: padding did not leak between them


def test_greedy_stops_before_stop_id(tmp_path):
    model = make_tiny_llama("plain", seed=1)
    dec = engine_for(tmp_path, model)
    full = dec.greedy([PROMPT], 12, set())[0]
    stop = full[3]
    first = full.index(stop)
    assert dec.greedy([PROMPT, PROMPT[:5]], 12, {stop})[0] == full[:first]


@pytest.mark.parametrize("case", ["llama32", "channel_pruned"])
def test_log_probs_match_hf(tmp_path, case):
    ref, weights, config = cases()[case]()
    dec = engine_for(tmp_path, ref, weights, config)
    ids = RNG.integers(3, 256, (3, 24))
    got = dec.log_probs(ids)
    want = torch.log_softmax(torch.from_numpy(hf_logits(ref, ids)), dim=-1).numpy()
    assert got.shape == (3, 24, 256) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_log_softmax_inplace():
    x = np.random.default_rng(0).standard_normal((2, 3, 50)).astype(np.float32) * 10
    want = torch.log_softmax(torch.from_numpy(x), -1).numpy()
    np.testing.assert_allclose(log_softmax_inplace(x.copy()), want, atol=1e-5)


def test_int4_engine_matches_hf_with_dequantized_weights(tmp_path):
    model = make_tiny_llama("llama32")
    weights = numpy_state(model)
    dec = engine_for(tmp_path, model, weights, projections="int4", rtn_block_size=32, accuracy_level=1)
    deq = dict(weights)
    for k in weights:
        if any(p in k for p in PROJ):
            deq[k] = dequantize_matmulnbits(quantize_rtn_int4(weights[k], block_size=32))
    ref = hf_with_weights(model.config, deq)
    got = [dec.prefill(PROMPT)]
    seq = list(PROMPT)
    for _ in range(10):
        seq.append(int(got[-1].argmax()))
        got.append(dec.decode(seq[-1]))
    np.testing.assert_allclose(np.stack(got), hf_logits(ref, np.array([seq]))[0, len(PROMPT) - 1 :], atol=2e-4)


def test_context_full_raises(tmp_path):
    dec = engine_for(tmp_path, make_tiny_llama("plain"), max_len=32)
    with pytest.raises(EdgepackError, match="context full"):
        dec.greedy([PROMPT], 30, set())
    with pytest.raises(EdgepackError, match="context full"):
        dec.log_probs(np.zeros((1, 33), np.int64))
    dec.prefill(list(range(3, 33)))
    dec.decode(5)
    dec.decode(6)
    with pytest.raises(EdgepackError, match="context full"):
        dec.decode(7)
    assert dec.length == 32


def test_bad_settings_raise(tmp_path):
    model = make_tiny_llama("plain")
    path, _ = build(tmp_path, numpy_state(model), model.config, accuracy_level=4)
    with pytest.raises(EdgepackError, match="accuracy_level"):
        OnnxDecoder(path, accuracy_level=1)
    with pytest.raises(EdgepackError, match="max_len"):
        OnnxDecoder(path, max_len=10_000)
    with pytest.raises(EdgepackError, match="not found"):
        OnnxDecoder(tmp_path / "missing.onnx")
    dec = OnnxDecoder(path, max_len=40)
    assert dec.max_len == 40 and dec.eos_token_ids == [2] and dec.bos_token_id == 1
    with pytest.raises(EdgepackError, match="prefill first"):
        dec.decode(3)
