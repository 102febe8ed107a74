"""Pipeline result -> bundle -> runtime, on a tiny model: the exporter's bundle opens, its int4 ONNX model
matches the pipeline's own quantized model, and `verify` passes on it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from compressor import pipeline
from compressor.recipe import Calibration, EoraStage, GptqStage, Recipe, WidthStage
from runtime.harness import EvalLimits

CHAT = dict(chat_max_new_tokens=8, chat_prompt_tokens=400)
LIMITS = EvalLimits(
    ctx=32,
    ppl_windows=3,
    qa_questions=3,
    qa_max_new_tokens=3,
    wikitext="tiny-wikitext",
    triviaqa="tiny-triviaqa",
    chat_prompts=2,
    **CHAT,
)
QUICK = EvalLimits(
    ctx=32,
    ppl_windows=2,
    qa_questions=2,
    qa_max_new_tokens=3,
    wikitext="tiny-wikitext",
    triviaqa="tiny-triviaqa",
    chat_prompts=1,
    **CHAT,
)


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    from exporter.export import ExportOptions, export_run, shipping_graph

    work = tmp_path_factory.mktemp("export")
    recipe = Recipe(
        name="tiny-w14-eora",
        model=str(tiny_checkpoint),
        calibration=Calibration(samples=4, seqlen=32, batch_size=2),
        width=WidthStage(n=1, m=4),
        gptq=GptqStage(group_size=32, samples=8, seqlen=64),
        eora=EoraStage(rank=4, samples=8, seqlen=64),
    )
    pipeline.run_pipeline(recipe, work / "run", eval_limits=LIMITS, stage_eval=False, log=lambda m: None)
    graph = replace(
        shipping_graph(), embedding="fp32", lm_head="fp32", accuracy_level=1, eora_bits=None, eora_fuse_a=False
    )  # exact fp32 EoRA branch: a tight parity test
    options = ExportOptions(graph=graph, limits=LIMITS, quick_limits=QUICK)
    bundle = export_run(work / "run", work / "bundle", options, log=lambda m: None)
    return work, bundle


def test_bundle_opens_with_manifest_and_archive(exported):
    from runtime.bundle import Bundle

    work, path = exported
    b = Bundle.open(path)
    m = b.manifest
    assert m["recipe"]["name"] == "tiny-w14-eora"
    assert {"full", "quick"} <= set(m["quality"])
    assert "ppl" in m["quality"]["full"] and "kld" in m["quality"]["full"]
    assert m["quality"]["full"]["chat_match32"]["n"] == 2 and m["quality"]["quick"]["chat_match32"]["n"] == 1
    assert b.reference().chat.count == 2  # the source's replies, generated once and cached in the work dir
    assert len(list((work / "run").glob("**/chat-reference-*.safetensors"))) == 1
    assert any(f.startswith("safetensors/eora/") for f in m["files"])
    assert any(f.startswith("reference/") for f in m["files"])
    assert (path.parent / f"{path.name}.edgepack").exists()
    assert Bundle.open(path.parent / f"{path.name}.edgepack").manifest["files"] == m["files"]


def test_onnx_logits_match_the_pipelines_quantized_model(exported):
    """The int4 ONNX graph (GPTQ codes re-packed bit-exactly + EoRA branch) against the pipeline's float
    model of the same weights (dequantized GPTQ + B·A), at fp32 activations."""
    import torch

    from compressor.stages import load_stage_model
    from runtime.bundle import Bundle
    from runtime.fileio import read_json

    work, path = exported
    record = read_json(work / "run/03-eora/record.json")
    model = load_stage_model("eora", work / "run/03-eora", record)
    ids = np.array([[5, 9, 30, 41, 77, 100, 120, 7, 8, 9]])
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor(ids)).logits, -1).numpy()
    got = Bundle.open(path).decoder().log_probs(ids)
    np.testing.assert_allclose(got, ref, atol=2e-3)


def test_verify_passes_on_the_exported_bundle(exported):
    from runtime.bundle import Bundle
    from runtime.verify import verify_bundle

    _, path = exported
    checks = verify_bundle(Bundle.open(path), quick=True, progress=False)
    assert checks and all(c.passed for c in checks), [c for c in checks if not c.passed]


def test_gptq_safetensors_load_back_with_the_same_logits(exported):
    """safetensors/ is the GPTQ checkpoint as GPTQModel/transformers load it: its exact dequantization
    equals the pipeline's."""
    import torch

    from compressor.gptq import dequantized_state_dict

    work, path = exported
    a = dequantized_state_dict(path / "safetensors")
    b = dequantized_state_dict(work / "run/02-gptq/model")
    assert a.keys() == b.keys()
    quantized = [k for k in a if ".layers." in k and k.endswith("proj.weight")]
    assert quantized and all(torch.equal(a[k], b[k]) for k in quantized)  # int4 codes and scales: exact
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-4) for k in a)  # rest: fp16


def test_gptqmodel_loads_the_bundled_checkpoint(exported):
    """safetensors/ loads with GPTQModel itself (its torch kernel, bf16: the only dtype that kernel takes on
    CPU) and gives the pipeline's GPTQ logits to bf16 precision."""
    import torch

    from compressor.gptq import import_gptqmodel, load_quantized

    import_gptqmodel()
    from gptqmodel import GPTQModel

    work, path = exported
    ids = torch.tensor([[5, 9, 30, 41, 77, 100, 120, 7]])
    with torch.no_grad():
        ref = load_quantized(work / "run/02-gptq/model")(ids).logits.float()
        model = GPTQModel.load(str(path / "safetensors"), backend="torch", device="cpu", dtype=torch.bfloat16)
        got = model.model(ids).logits.float()
    assert torch.allclose(got, ref, atol=0.05 * ref.abs().max().item())
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("projections", ["fp32", "int4"])
def test_export_without_gptq(tiny_checkpoint, tmp_path, projections):
    """A depth+channel-pruned run with no stage 4 exports fp32 projections or RTN int4 ones; the fp32 graph
    equals the torch model, and the bundle verifies."""
    import torch

    from compressor.recipe import ChannelStage, DepthStage
    from compressor.torch_backend import load_causal_lm
    from exporter.export import ExportOptions, export_run, shipping_graph
    from runtime.bundle import Bundle
    from runtime.verify import verify_bundle

    recipe = Recipe(
        name="tiny-d1-c50",
        model=str(tiny_checkpoint),
        calibration=Calibration(samples=4, seqlen=32),
        depth=DepthStage(remove=1),
        channels=ChannelStage(ffn_keep=0.5, kv_groups_keep=1),
    )
    summary = pipeline.run_pipeline(recipe, tmp_path / "run", eval_limits=LIMITS, log=lambda m: None)
    graph = replace(
        shipping_graph(),
        embedding="fp32",
        lm_head="fp32",
        accuracy_level=1,
        projections="keep" if projections == "fp32" else projections,
    )
    options = ExportOptions(graph=graph, limits=LIMITS, quick_limits=QUICK, archive=False)
    path = export_run(tmp_path / "run", tmp_path / "bundle", options, log=lambda m: None)
    bundle = Bundle.open(path)
    assert bundle.manifest["model"]["layers"] == 3
    ids = np.array([[5, 9, 30, 41, 77, 100, 120, 7]])
    got = bundle.decoder().log_probs(ids)
    with torch.no_grad():
        ref = torch.log_softmax(load_causal_lm(summary["final_model"])(torch.tensor(ids)).logits, -1).numpy()
    if projections == "fp32":
        np.testing.assert_allclose(got, ref, atol=1e-4)
    else:  # RTN int4 (block 32) with int8 activations: close, not equal
        assert np.abs(got - ref).mean() < 0.2 and np.abs(got - ref).max() < 1.0
    assert all(c.passed for c in verify_bundle(bundle, quick=True, progress=False))


def test_export_flags_become_graph_options():
    """The 1B options on the command line reach GraphOptions; the defaults stay the shipping graph."""
    from edgepack.cli import _export_options, build_parser
    from exporter.export import shipping_graph

    def graph(*flags):
        return _export_options(build_parser().parse_args(["export", "RUN", "-o", "B", *flags])).graph

    assert graph() == replace(shipping_graph(), eora_fuse_a=True)
    g = graph("--embedding", "int4", "--lm-head", "int4", "--max-gptq-block", "32", "--eora-bits", "4")
    assert (g.embedding, g.lm_head, g.max_gptq_block, g.eora_bits) == ("int4", "int4", 32, 4)
    with pytest.raises(SystemExit):
        graph("--max-gptq-block", "48")
