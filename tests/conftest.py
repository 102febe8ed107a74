"""Shared fixtures: tiny random LLaMA models built in the test (seconds, never downloaded)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# A real imported SmolLM2 (edgepack import) lives here; the slow tests use it when present.
SMOLLM2_DIR = ROOT / "models" / "SmolLM2-135M-Instruct"


def tiny_llama_config(kind: str = "plain", **overrides):
    """Config of a tiny LLaMA. kind="llama32" mimics Llama-3.2: llama3 rope scaling, tied
    embeddings, GQA (4 query heads over 2 KV heads)."""
    from transformers import LlamaConfig

    base = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if kind == "llama32":
        base.update(
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    elif kind != "plain":
        raise ValueError(kind)
    base.update(overrides)
    return LlamaConfig(**base)


def make_tiny_llama(kind: str = "plain", seed: int = 0, **overrides):
    """A tiny random LlamaForCausalLM in float32, eval mode. Weights are scaled up a little from
    the default init so that logits differ meaningfully between tokens."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(kind, **overrides)).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny_llama("plain")


@pytest.fixture
def tiny_llama32():
    return make_tiny_llama("llama32")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny LLaMA imported through `edgepack import` from a GGUF written in the test, so it is an HF
    directory with a real byte-level tokenizer, like an imported SmolLM2."""
    from compressor.importer import import_model
    from gguf_fixture import write_tiny_llama_gguf

    model = make_tiny_llama("plain", vocab_size=288, max_position_embeddings=512)
    d = tmp_path_factory.mktemp("tiny")
    return import_model(write_tiny_llama_gguf(model, d / "tiny.gguf"), d / "hf")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("EDGEPACK_MAIN_JOB") != "1":  # the main job's bundle exists only after scripts/main_job.sh,
        # which runs these itself: deselected (not skipped) everywhere else, so no skip hides a missing check
        main_job = [item for item in items if "main_job" in item.keywords]
        if main_job:
            config.hook.pytest_deselected(items=main_job)
            items[:] = [item for item in items if "main_job" not in item.keywords]
    run_slow = os.environ.get("EDGEPACK_SLOW") == "1"
    if run_slow:
        return
    skip = pytest.mark.skip(reason="slow end-to-end test on SmolLM2: set EDGEPACK_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
