"""The decode benchmark's own graph surgery (benchmarks/bench_decode.py), checked with plain onnxruntime:
onnxruntime-genai and llama.cpp are benchmark-only tools and are not installed for the tests."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from conftest import make_tiny_llama
from tiny_bundle import tiny_bundle

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_decode  # noqa: E402


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_checkpoint):
    return tiny_bundle(tmp_path_factory, tiny_checkpoint)


def _feeds_empty_past(session, batch: int) -> dict:
    feeds = {}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
    return feeds


def test_genai_view_computes_the_bundle_graph_from_an_attention_mask(good, tmp_path):
    """genai feeds `attention_mask`; the view must turn it into the graph's seqlens_k / total length and
    return logits at every position, equal to the bundle's own graph on the same tokens."""
    view = bench_decode.genai_view(good, tmp_path / "view")
    config = json.loads((view / "genai_config.json").read_text())
    assert config["model"]["decoder"]["inputs"]["attention_mask"] == "attention_mask"
    assert config["search"]["past_present_share_buffer"] is True
    ids = np.array([[5, 17, 42, 99, 7, 3]], np.int64)
    t = ids.shape[1]
    base = ort.InferenceSession(str(good / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    want = base.run(
        ["logits"],
        {
            "input_ids": ids,
            "seqlens_k": np.array([t - 1], np.int32),
            "total_sequence_length": np.array(t, np.int32),
            "logits_positions": np.arange(t, dtype=np.int64)[None],
            **_feeds_empty_past(base, 1),
        },
    )[0]
    wrapped = ort.InferenceSession(str(view / "model.onnx"), providers=["CPUExecutionProvider"])
    assert {i.name for i in wrapped.get_inputs()} >= {"input_ids", "attention_mask"}
    assert not {"seqlens_k", "total_sequence_length", "logits_positions"} & {i.name for i in wrapped.get_inputs()}
    got = wrapped.run(
        ["logits"], {"input_ids": ids, "attention_mask": np.ones((1, t), np.int64), **_feeds_empty_past(wrapped, 1)}
    )[0]
    assert got.shape == want.shape == (1, t, config["model"]["vocab_size"])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert (view / "model.onnx.data").stat().st_nlink == 1  # a copy: never a hard link to the bundle's file


def test_weight_kernels_only_graph(tmp_path):
    """The "kernels only" row runs every MatMulNBits of a bundle's graph and nothing else."""
    from exporter.onnx_graph import GraphOptions, build_decoder, spec_from_hf_config
    from test_onnx_graph import numpy_state

    model = make_tiny_llama("llama32")
    weights = numpy_state(model)
    path = tmp_path / "bundle" / "onnx" / "model.onnx"
    build_decoder(
        weights,
        spec_from_hf_config(model.config, weights),
        path,
        GraphOptions(max_len=64, projections="int4", lm_head="int8", embedding="int8"),
        progress=False,
    )
    result = bench_decode.engine_kernels(
        types.SimpleNamespace(bundle=str(tmp_path / "bundle"), threads=1, repeats=2, new_tokens=16)
    )
    assert result["kernels"] == model.config.num_hidden_layers * 4 + 1  # q|k|v, o, gate|up, down; the head
    assert 0 < result["decode_tokens_per_s"]["min"] <= result["decode_tokens_per_s"]["max"]


def test_engine_quality_scores_a_genai_graph_like_the_runtime(good, tmp_path):
    """engine_quality.py runs onnxruntime-genai builds with plain onnxruntime; on the genai view of a bundle
    its log-probs must equal the runtime's own on the same windows."""
    import engine_quality
    from runtime.onnx_engine import OnnxDecoder

    view = bench_decode.genai_view(good, tmp_path / "view")
    ids = np.array([[5, 17, 42, 99, 7, 3, 11, 12], [1, 2, 3, 4, 5, 6, 7, 8]], np.int64)
    got = engine_quality.GenaiGraphBackend(view, threads=1).log_probs(ids)
    want = OnnxDecoder(good / "onnx" / "model.onnx").log_probs(ids)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.allclose(np.exp(got).sum(-1), 1.0, atol=1e-4)


def test_prompts_every_engine_gets(good, tmp_path):
    from runtime.bench import bench_prompt
    from runtime.errors import EdgepackError
    from runtime.speculative import chat_instructions
    from runtime.tokenizer import TextTokenizer

    tok = TextTokenizer(good / "tokenizer")
    assert bench_decode.prompt_for(tok, "bench") == bench_prompt(tok, bench_decode.PROMPT_TOKENS)
    chat = bench_decode.prompt_for(tok, "chat:1")
    assert chat == tok.encode_chat([{"role": "user", "content": chat_instructions(2)[1]}])
    assert chat != bench_decode.prompt_for(tok, "chat:0")
    wiki = bench_decode.prompt_for(tok, "wikitext:2")
    assert len(wiki) == bench_decode.PROMPT_TOKENS and wiki != bench_decode.prompt_for(tok, "wikitext:0")
    for bad in ("chat", "chat:x", "wiki:0", "bench:1", "chat:100000"):
        with pytest.raises(EdgepackError):
            bench_decode.prompt_for(tok, bad)
    # the file the engines read, and `--new-tokens reply`: the bundle's own greedy reply, end-of-turn included
    path = bench_decode.write_prompt_ids(good, tmp_path / "ids.json", "chat:0")
    assert json.loads(path.read_text()) == bench_decode.prompt_for(tok, "chat:0")
    from runtime.bundle import Bundle
    from runtime.generation import SamplingSettings

    res = (
        Bundle.open(good)
        .generator(draft="none")
        .generate(
            json.loads(path.read_text()), SamplingSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=128)
        )
    )
    expected = min(128, len(res.token_ids) + (res.stop_reason == "eos"))
    assert bench_decode.reply_length(good, path) == expected


def test_weight_bytes_counts_initializers_without_the_rope_tables(good):
    import onnx
    from onnx import numpy_helper

    import weight_bytes

    path = good / "onnx" / "model.onnx"
    model = onnx.load(str(path))  # with the external data: every initializer's real bytes
    want = sum(
        numpy_helper.to_array(t).nbytes for t in model.graph.initializer if t.name not in weight_bytes.ROPE_TABLES
    )
    rope = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer if t.name in weight_bytes.ROPE_TABLES)
    assert rope > 0 and weight_bytes.onnx_weight_bytes(path) == want
