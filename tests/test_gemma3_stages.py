"""Every stage on a tiny Gemma 3 imported from a GGUF (sliding window 8, shorter than the calibration
windows): depth scoring and pruning keep each layer's attention type, then depth -> WANDA N:M -> LoRA ->
GPTQ -> EoRA through gptqmodel -> export, and the bundle runs and verifies with the runtime unchanged."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from compressor import pipeline
from compressor.recipe import Calibration, DepthStage, EoraStage, GptqStage, LoraStage, Recipe, WidthStage
from exporter.families import FULL, SLIDING
from gguf_fixture import write_tiny_gemma3_gguf
from runtime.harness import EvalLimits
from test_gemma3_graph import make_tiny_gemma3

_CHAT = dict(chat_prompts=1, chat_max_new_tokens=8, chat_prompt_tokens=400)  # chat fidelity kept tiny
LIMITS = EvalLimits(
    ctx=32,
    ppl_windows=2,
    qa_questions=2,
    qa_max_new_tokens=3,
    wikitext="tiny-wikitext",
    triviaqa="tiny-triviaqa",
    **{k: v for k, v in _CHAT.items() if k in EvalLimits.__dataclass_fields__},
)


@pytest.fixture(scope="module")
def gemma_checkpoint(tmp_path_factory):
    from compressor.importer import import_model

    model = make_tiny_gemma3(vocab_size=330, num_hidden_layers=6, layer_types=None, query_pre_attn_scalar=256)
    d = tmp_path_factory.mktemp("gemma")
    return import_model(write_tiny_gemma3_gguf(model, d / "tiny-gemma3.gguf"), d / "hf")


def test_depth_scoring_gives_each_layer_its_own_attention_type(gemma_checkpoint):
    """Scoring with a layer skipped equals the model with that layer really dropped: the layers after it
    keep their sliding/global type (config.layer_types is sliced while scoring, not only when dropping)."""
    from compressor.calibration_forward import calibration_perplexity
    from compressor.depth import drop_layers, layers_skipped
    from compressor.torch_backend import load_causal_lm

    model = load_causal_lm(gemma_checkpoint)
    ids = torch.randint(3, 300, (2, 32))  # 32 tokens, window 8
    with layers_skipped(model, {5}):  # the only global layer: every remaining one is sliding
        skipped = calibration_perplexity(model, ids, batch_size=2)
    assert model.config.layer_types == [SLIDING] * 5 + [FULL]  # put back
    dropped = drop_layers(copy.deepcopy(model), [5])
    assert dropped.config.layer_types == [SLIDING] * 5
    assert skipped == pytest.approx(calibration_perplexity(dropped, ids, batch_size=2), rel=1e-5)
    want = calibration_perplexity(drop_layers(copy.deepcopy(model), [0]), ids, batch_size=2)
    with layers_skipped(model, {0}):  # shifts the global layer to position 4
        assert calibration_perplexity(model, ids, batch_size=2) == pytest.approx(want, rel=1e-5)


@pytest.fixture(scope="module")
def exported(gemma_checkpoint, tmp_path_factory):
    from exporter.export import ExportOptions, export_run, shipping_graph

    work = tmp_path_factory.mktemp("export")
    recipe = Recipe(
        name="tiny-gemma-d1-w14-lora-eora",
        model=str(gemma_checkpoint),
        calibration=Calibration(samples=4, seqlen=32, batch_size=2),
        depth=DepthStage(remove=1),
        width=WidthStage(n=1, m=4),
        lora=LoraStage(dataset="wikitext", samples=8, batch_size=4, seqlen=32),
        gptq=GptqStage(group_size=32, samples=8, seqlen=64),
        eora=EoraStage(rank=4, samples=8, seqlen=64),
    )
    summary = pipeline.run_pipeline(recipe, work / "run", eval_limits=LIMITS, stage_eval=False, log=lambda m: None)
    graph = ExportOptions().graph
    graph = type(graph)(**{**graph.__dict__, "embedding": "fp32", "lm_head": "fp32", "accuracy_level": 1})
    graph.eora_bits, graph.eora_fuse_a = None, False  # exact EoRA branch: a tight parity test
    bundle = export_run(work / "run", work / "bundle", ExportOptions(graph=graph, limits=LIMITS, quick_limits=LIMITS))
    assert isinstance(shipping_graph().eora_bits, int)
    return work, bundle, summary


def test_every_stage_runs_and_the_bundle_matches_the_pipelines_model(exported):
    from compressor.stages import load_stage_model
    from runtime.bundle import Bundle
    from runtime.fileio import read_json

    work, path, summary = exported
    assert [s["stage"] for s in summary["stages"]] == ["depth", "width", "lora", "gptq", "eora"]
    b = Bundle.open(path)
    assert b.manifest["model"]["architecture"] == "Gemma3ForCausalLM"
    types = [layer["attention_type"] for layer in b.manifest["model"]["graph"]["layers"]]
    eora_dir = sorted((work / "run").glob("*-eora"))[0]
    model = load_stage_model("eora", eora_dir, read_json(eora_dir / "record.json"))
    assert types == model.config.layer_types and len(types) == 5
    ids = np.array([[5, 9, 30, 41, 77, 100, 120, 7, 8, 9, 200, 250, 17, 3, 99]])  # 15 tokens: past the window
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor(ids)).logits, -1).numpy()
    np.testing.assert_allclose(b.decoder().log_probs(ids), ref, atol=2e-3)


def test_runtime_verifies_generates_and_benches_the_gemma_bundle(exported):
    from runtime.bench import bench_bundle
    from runtime.bundle import Bundle
    from runtime.verify import verify_bundle

    _, path, _ = exported
    b = Bundle.open(path)
    checks = verify_bundle(b, quick=True, progress=False)
    assert checks and all(c.passed for c in checks), [c for c in checks if not c.passed]
    assert b.manifest["generation"]["eos_token_ids"] == [1, 5]  # <eos> and <end_of_turn>
    prompt = b.tokenizer.encode_chat([{"role": "user", "content": "hello world"}])
    assert prompt[:2] == [2, 4]  # <bos><start_of_turn>
    out = b.decoder().greedy([prompt], 6, set())[0]
    assert len(out) == 6
    result = bench_bundle(b, prompt_tokens=8, new_tokens=4, repeats=1)
    assert result["decode_tokens_per_s"]["median"] > 0


def test_continuous_batching_serves_the_gemma_bundle_like_solo(exported):
    """The server's engine (runtime.batching): prompts longer than the window, prefilled in chunks beside
    decoding rows, give what the plain Generator gives each alone."""
    from runtime.batching import BatchScheduler, PoolConfig
    from runtime.bundle import Bundle
    from runtime.generation import Generator, SamplingSettings

    b = Bundle.open(exported[1])
    greedy = SamplingSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=12)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, 300, n).tolist() for n in (3, 17, 9, 12)]
    with BatchScheduler(b.decoder(threads=1), b.tokenizer, b.stop_ids, PoolConfig(slots=3, prefill_chunk=7)) as s:
        requests = [s.submit(p, greedy, lambda e: None) for p in prompts]
        for r in requests:
            assert r.done.wait(120) and r.error is None, r.error
    for p, r in zip(prompts, requests):
        want = Generator(b.decoder(threads=1), b.tokenizer, stop_ids=b.stop_ids).generate(p, greedy)
        assert r.result.token_ids == want.token_ids


def test_channel_pruning_on_gemma_exports_with_its_new_widths(gemma_checkpoint, tmp_path):
    """Channel pruning (FFN channels and KV groups) applies to Gemma 3 unchanged: the q/k norms act per head,
    so dropping whole KV groups and their query heads keeps them valid. The pruned model loads with its new
    widths and its fp32 graph matches it past the sliding window."""
    from compressor.recipe import ChannelStage
    from compressor.torch_backend import load_causal_lm
    from exporter.export import ExportOptions, export_run
    from runtime.bundle import Bundle

    recipe = Recipe(
        name="tiny-gemma-channels",
        model=str(gemma_checkpoint),
        calibration=Calibration(samples=4, seqlen=32, batch_size=2),
        channels=ChannelStage(ffn_keep=0.5, kv_groups_keep=1),
    )
    summary = pipeline.run_pipeline(recipe, tmp_path / "run", eval_limits=LIMITS, stage_eval=False, log=lambda m: None)
    model = load_causal_lm(summary["final_model"])
    source = load_causal_lm(gemma_checkpoint)
    layer, before = model.model.layers[0], source.model.layers[0]
    assert layer.mlp.gate_proj.out_features == 64 < before.mlp.gate_proj.out_features  # 96 x 0.5, rounded up to 32s
    assert layer.self_attn.k_proj.out_features == layer.self_attn.head_dim  # one KV group left
    assert model.config.layer_types == source.config.layer_types
    graph = ExportOptions().graph
    graph = type(graph)(**{**graph.__dict__, "embedding": "fp32", "lm_head": "fp32", "projections": "keep"})
    bundle = export_run(
        tmp_path / "run", tmp_path / "bundle", ExportOptions(graph=graph, limits=LIMITS, quick_limits=LIMITS)
    )
    ids = np.array([[5, 9, 30, 41, 77, 100, 120, 7, 8, 9, 200, 250, 17, 3, 99]])  # 15 tokens: past the window
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor(ids)).logits, -1).numpy()
    np.testing.assert_allclose(Bundle.open(bundle).decoder().log_probs(ids), ref, atol=1e-3)
