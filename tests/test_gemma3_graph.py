"""Gemma 3 through the same graph builder as LLaMA (exporter.families): fp32 and int4 ONNX against
transformers' Gemma3ForCausalLM on a tiny random model, prefill and decode, past the sliding window."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exporter.families import FULL, SLIDING, family_from_hf_config
from exporter.int4 import dequantize_matmulnbits, quantize_rtn_int4
from exporter.onnx_graph import spec_from_hf_config
from runtime.errors import EdgepackError
from runtime.onnx_engine import OnnxDecoder
from test_onnx_graph import PROJ, build, gptq_weights, hf_logits, numpy_state, run_graph

WINDOW = 8
TYPES = [SLIDING, SLIDING, FULL, SLIDING, FULL]


def tiny_gemma3_config(**overrides):
    from transformers import Gemma3TextConfig

    kw = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=len(TYPES),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        query_pre_attn_scalar=24,  # not head_dim, so a wrong softmax scale shows
        sliding_window=WINDOW,
        layer_types=list(TYPES),
        rope_parameters={
            FULL: {"rope_type": "default", "rope_theta": 1_000_000.0},
            SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        },
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    kw.update(overrides)
    return Gemma3TextConfig(**kw)


def make_tiny_gemma3(seed: int = 0, **overrides):
    """A tiny random Gemma3ForCausalLM in float32 with non-zero norm weights (HF initializes them to 0,
    which would hide a missing 1 + w) and weights scaled so logits differ between tokens."""
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(tiny_gemma3_config(**overrides)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(3.0)
            elif "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return model


def gemma_with_weights(config, weights):
    from transformers import Gemma3ForCausalLM

    model = Gemma3ForCausalLM(config).float().eval()
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items() if k != "lm_head.weight"}
    model.load_state_dict(sd, strict=False)
    model.tie_weights()
    return model


def engine_logits(path, prompt, steps):
    """Prefill `prompt`, then `steps` greedy decode steps; logits after each position from the prompt's last."""
    dec = OnnxDecoder(path, threads=2)
    got = [dec.prefill(prompt)]
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(got[-1].argmax()))
        got.append(dec.decode(seq[-1]))
    return np.stack(got), seq


PROMPT = np.random.default_rng(5).integers(3, 256, 6).tolist()
IDS = np.random.default_rng(3).integers(3, 256, (2, 21))  # 21 tokens: well past the window of 8


def test_family_reads_gemma3_config():
    fc = family_from_hf_config(tiny_gemma3_config())
    assert fc.family.name == "gemma3" and fc.family.qk_norm and fc.family.norm_weight_offset == 1.0
    assert fc.layer_types == tuple(TYPES)
    assert fc.ropes[FULL].theta == 1_000_000.0 and fc.ropes[SLIDING].theta == 10_000.0
    assert fc.family.attention_scale == pytest.approx(24**-0.5)
    assert fc.family.embedding_scale == pytest.approx(8.0)
    # an old-style config (rope_theta + rope_local_base_freq, sliding_window_pattern) reads the same way
    old = {
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "num_hidden_layers": 6,
        "rope_theta": 1e6,
        "rope_local_base_freq": 1e4,
        "sliding_window_pattern": 3,
        "sliding_window": 8,
    }
    fc = family_from_hf_config(old)
    assert fc.layer_types == (SLIDING, SLIDING, FULL) * 2 and fc.ropes[SLIDING].theta == 1e4
    with pytest.raises(EdgepackError, match="no graph family"):
        family_from_hf_config({"model_type": "mistral"})


def test_spec_keeps_each_layers_attention_type():
    model = make_tiny_gemma3()
    spec = spec_from_hf_config(model.config, numpy_state(model))
    assert [l.attention_type for l in spec.layers] == TYPES
    assert spec.rope_local is not None and spec.family.sliding_window == WINDOW


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_fp32_graph_matches_hf_past_the_window(tmp_path, softcap):
    model = make_tiny_gemma3(final_logit_softcapping=softcap)
    path, meta = build(tmp_path, numpy_state(model), model.config)
    assert meta["architecture"] == "Gemma3ForCausalLM" and meta["layers"][0]["attention_type"] == SLIDING
    want = hf_logits(model, IDS)
    np.testing.assert_allclose(run_graph(path, meta, IDS), want, atol=1e-4)
    if softcap:
        assert np.abs(want).max() < softcap


def test_window_matters():
    """The test model is sensitive to the window: with a window longer than the text HF agrees up to
    position WINDOW and differs after it, so the parity tests above really check the window."""
    model = make_tiny_gemma3()
    glob = gemma_with_weights(tiny_gemma3_config(sliding_window=128), numpy_state(model))
    want, other = hf_logits(model, IDS), hf_logits(glob, IDS)
    assert np.abs(want[:, :WINDOW] - other[:, :WINDOW]).max() < 1e-3 < np.abs(want - other).max()


def test_unfused_graph_matches_hf(tmp_path):
    model = make_tiny_gemma3(seed=1)
    path, meta = build(tmp_path, numpy_state(model), model.config, fuse_qkv=False, fuse_gate_up=False)
    np.testing.assert_allclose(run_graph(path, meta, IDS), hf_logits(model, IDS), atol=1e-4)


def test_prefill_and_decode_past_the_window_match_hf(tmp_path):
    model = make_tiny_gemma3(seed=2)
    path, _ = build(tmp_path, numpy_state(model), model.config)
    got, seq = engine_logits(path, PROMPT, 16)  # 6 + 16 tokens: decode crosses the window of 8
    want = hf_logits(model, np.array([seq]))[0, len(PROMPT) - 1 :]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_int4_rtn_graph_matches_hf_with_dequantized_weights(tmp_path):
    model = make_tiny_gemma3(seed=3)
    weights = numpy_state(model)
    path, _ = build(tmp_path, weights, model.config, projections="int4", rtn_block_size=32, accuracy_level=1)
    deq = dict(weights)
    for k in weights:
        if any(p in k for p in PROJ):
            deq[k] = dequantize_matmulnbits(quantize_rtn_int4(weights[k], block_size=32))
    ref = gemma_with_weights(model.config, deq)
    got, seq = engine_logits(path, PROMPT, 12)
    want = hf_logits(ref, np.array([seq]))[0, len(PROMPT) - 1 :]
    np.testing.assert_allclose(got, want, atol=2e-4)
    assert np.abs(want - hf_logits(model, np.array([seq]))[0, len(PROMPT) - 1 :]).max() > 1e-2


def test_gptq_graph_matches_hf_with_dequantized_weights(tmp_path):
    from exporter.onnx_graph import GptqFormat

    model = make_tiny_gemma3(seed=4)
    quant, deq = gptq_weights(numpy_state(model), 32, np.random.default_rng(0))
    path, meta = build(tmp_path, quant, model.config, gptq=GptqFormat(bits=4, group_size=32), accuracy_level=1)
    assert meta["weights"]["projections"] == "int4-gptq"
    np.testing.assert_allclose(
        run_graph(path, meta, IDS), hf_logits(gemma_with_weights(model.config, deq), IDS), atol=2e-4
    )


def test_quantized_embedding_keeps_the_scale(tmp_path):
    """int8 embedding + head (the shipping graph's choice) stays close; the embedding scale still applies."""
    model = make_tiny_gemma3(seed=5)
    path, meta = build(tmp_path, numpy_state(model), model.config, embedding="int8", lm_head="int8")
    got, want = run_graph(path, meta, IDS), hf_logits(model, IDS)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_depth_pruned_layer_types_follow_the_layers(tmp_path):
    """compressor.depth.drop_layers slices config.layer_types; the graph then gives each remaining layer its
    own window and RoPE, and matches the pruned HF model."""
    from compressor.depth import drop_layers

    model = drop_layers(make_tiny_gemma3(seed=6), [0, 2])
    assert model.config.layer_types == [SLIDING, SLIDING, FULL]
    weights = numpy_state(model)
    path, meta = build(tmp_path, weights, model.config)
    assert [l["attention_type"] for l in meta["layers"]] == [SLIDING, SLIDING, FULL]
    np.testing.assert_allclose(run_graph(path, meta, IDS), hf_logits(model, IDS), atol=1e-4)


def test_batched_greedy_past_the_window_equals_hf_generate(tmp_path):
    """Right-padded rows of different lengths: each row's window is counted from its own length."""
    model = make_tiny_gemma3(seed=7)
    path, _ = build(tmp_path, numpy_state(model), model.config)
    rng = np.random.default_rng(9)
    prompts = [rng.integers(3, 256, n).tolist() for n in (3, 13, 9)]
    got = OnnxDecoder(path, threads=2).greedy(prompts, 10, set())
    for p, g in zip(prompts, got):
        want = model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert g == want[0, len(p) :].tolist()
