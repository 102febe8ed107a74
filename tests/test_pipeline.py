"""Recipes and the resumable pipeline, on a tiny imported model."""

from __future__ import annotations

import json

import pytest

from compressor import pipeline, stages
from compressor.recipe import Calibration, DepthStage, Recipe, WidthStage, load_recipe, parse_preset
from runtime.errors import EdgepackError
from runtime.harness import EvalLimits

TINY_LIMITS = EvalLimits(
    ctx=32, ppl_windows=2, qa_questions=2, qa_max_new_tokens=3, wikitext="tiny-wikitext", triviaqa="tiny-triviaqa"
)


def tiny_recipe(model_dir, **stages_) -> Recipe:
    return Recipe(
        name="t", model=str(model_dir), calibration=Calibration(samples=4, seqlen=32, batch_size=2), **stages_
    )


def test_presets_parse_with_seed_notation():
    r = parse_preset("D2+W1:8 lora=triviaqa quant=eora order=DLW")
    assert r.depth.remove == 2 and (r.width.n, r.width.m) == (1, 8) and r.width.sparsity == 0.125
    assert r.lora.dataset == "triviaqa" and r.gptq and r.eora.rank == 32
    assert r.stage_names() == ["depth", "lora", "width", "gptq", "eora"]
    assert parse_preset("W12:16").width.sparsity == 0.75
    assert "12 pruned of every 16" in parse_preset("W12:16").describe()
    for bad in ("W8:8", "X1", "D2 lora=books", "D2 quant=awq"):
        with pytest.raises(EdgepackError):
            parse_preset(bad)


def test_toml_recipe_and_errors(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('name = "x"\npreset = "D2"\n[width]\nn = 2\nm = 4\n[calibration]\nsamples = 8\n')
    r = load_recipe(f)
    assert r.name == "x" and r.depth.remove == 2 and (r.width.n, r.width.m) == (2, 4) and r.calibration.samples == 8
    f.write_text("[width]\nnn = 2\n")
    with pytest.raises(EdgepackError, match="unknown setting"):
        load_recipe(f)
    f.write_text("[width\n")
    with pytest.raises(EdgepackError, match="invalid TOML"):
        load_recipe(f)


def test_pipeline_resumes_after_interrupt_without_redoing_stages(tiny_checkpoint, tmp_path, monkeypatch):
    calls = {"depth": 0, "width": 0}
    real = dict(stages.STAGE_FUNCTIONS)

    def counting(name, fail=False):
        def run(ctx, src, out):
            calls[name] += 1
            if fail:
                raise KeyboardInterrupt
            return real[name](ctx, src, out)

        return run

    recipe = tiny_recipe(tiny_checkpoint, depth=DepthStage(remove=1), width=WidthStage(n=1, m=4))
    monkeypatch.setitem(stages.STAGE_FUNCTIONS, "depth", counting("depth"))
    monkeypatch.setitem(stages.STAGE_FUNCTIONS, "width", counting("width", fail=True))
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(recipe, tmp_path / "work", final_eval=False, log=lambda m: None)
    assert (tmp_path / "work/01-depth/record.json").exists()
    assert not (tmp_path / "work/02-width/record.json").exists()

    monkeypatch.setitem(stages.STAGE_FUNCTIONS, "width", counting("width"))
    summary = pipeline.run_pipeline(recipe, tmp_path / "work", eval_limits=TINY_LIMITS, log=lambda m: None)
    assert calls == {"depth": 1, "width": 2}  # depth was not redone
    assert [s["stage"] for s in summary["stages"]] == ["depth", "width"]
    cfg = json.loads((tmp_path / "work/02-width/model/config.json").read_text())
    assert cfg["num_hidden_layers"] == 3
    assert summary["eval"]["wikitext"]["windows"] == 2

    # same recipe again: nothing runs; a changed width setting reruns width only
    pipeline.run_pipeline(recipe, tmp_path / "work", final_eval=False, log=lambda m: None)
    assert calls == {"depth": 1, "width": 2}
    recipe.width = WidthStage(n=2, m=4)
    pipeline.run_pipeline(recipe, tmp_path / "work", final_eval=False, log=lambda m: None)
    assert calls == {"depth": 1, "width": 3}


def test_depth_stage_records_every_layer_score(tiny_checkpoint, tmp_path):
    recipe = tiny_recipe(tiny_checkpoint, depth=DepthStage(remove=2))
    summary = pipeline.run_pipeline(recipe, tmp_path / "w", final_eval=False, log=lambda m: None)
    rec = summary["stages"][0]
    assert len(rec["layer_scores"]) == 4 and len(rec["dropped"]) == 2
    ranked = sorted(range(4), key=lambda i: rec["layer_scores"][i])
    assert sorted(rec["dropped"]) == sorted(ranked[:2])
    assert rec["params"]["dense"] < 1e6


def test_channel_stage_shrinks_and_final_model_loads(tiny_checkpoint, tmp_path):
    from compressor.recipe import ChannelStage
    from compressor.torch_backend import load_causal_lm

    recipe = tiny_recipe(tiny_checkpoint, channels=ChannelStage(ffn_keep=0.5, kv_groups_keep=1))
    summary = pipeline.run_pipeline(recipe, tmp_path / "w", eval_limits=TINY_LIMITS, log=lambda m: None)
    model = load_causal_lm(summary["final_model"])
    assert model.model.layers[0].mlp.gate_proj.out_features == 64  # 128 * 0.5, multiple of 32
    assert model.model.layers[0].self_attn.k_proj.out_features == 16  # one KV group of head_dim 16
    source = load_causal_lm(tiny_checkpoint)
    assert summary["stages"][0]["params"]["dense"] < sum(p.numel() for p in source.parameters())
    assert summary["eval"]["wikitext"]["ppl"] > 0


def test_full_pipeline_lora_gptq_eora_records_each_stage(tiny_checkpoint, tmp_path):
    """Depth → width → LoRA (TriviaQA) → GPTQ → EoRA on the tiny model: every stage runs, LoRA's merge
    re-applies the N:M mask, and GPTQ / EoRA are evaluated with KL against the unquantized model."""
    from compressor.recipe import EoraStage, GptqStage, LoraStage
    from compressor.width import load_masks
    from compressor.torch_backend import load_causal_lm

    recipe = tiny_recipe(
        tiny_checkpoint,
        depth=DepthStage(remove=1),
        width=WidthStage(n=1, m=4),
        lora=LoraStage(dataset="triviaqa", samples=16, batch_size=4, seqlen=128),
        gptq=GptqStage(group_size=32, samples=8, seqlen=64),
        eora=EoraStage(rank=4, samples=8, seqlen=64, tune_steps=2, tune_samples=8),
    )
    summary = pipeline.run_pipeline(recipe, tmp_path / "w", eval_limits=TINY_LIMITS, log=lambda m: None)
    stages_ = {s["stage"]: s for s in summary["stages"]}
    assert list(stages_) == ["depth", "width", "lora", "gptq", "eora"]
    # EoRA's closed-form fit in fit/, then 2 distillation steps from it: the shipped adapter is the tuned one
    assert stages_["eora"]["tune"]["steps"] == 2 and stages_["eora"]["tune"]["rows"] == 7
    assert (tmp_path / "w/05-eora/fit/adapter_model.safetensors").exists()
    assert "distilled 2 steps" in recipe.describe()
    assert stages_["lora"]["merge"]["mask_policy"] == "reapplied"
    assert stages_["lora"]["data"]["eval_questions"] == 728 and len(stages_["lora"]["data"]["heldout_ids"]) == 16
    merged = load_causal_lm(tmp_path / "w/03-lora/model")
    masks = load_masks(tmp_path / "w/02-width/masks.safetensors")
    w = dict(merged.named_modules())["model.layers.0.self_attn.q_proj"].weight
    assert (w[~masks["model.layers.0.self_attn.q_proj"]] == 0).all()
    for name in ("lora", "gptq"):
        assert stages_[name]["eval"]["wikitext"]["ppl"] > 0
    assert stages_["gptq"]["eval"]["wikitext"]["kld"] > 0
    assert summary["eval"]["wikitext"]["kld"] >= 0 and 0 <= summary["eval"]["wikitext"]["top1"] <= 1
    assert (tmp_path / "w/05-eora/adapter/adapter_model.safetensors").exists()


def test_compress_tasks_pick_what_stages_measure(tiny_checkpoint, tmp_path, monkeypatch):
    """`edgepack compress --tasks ppl` measures perplexity only (it used to be accepted and ignored); the cached
    result of an evaluation with every task is not reused for a narrower one, nor the other way round."""
    from edgepack.cli import main

    recipe = tiny_recipe(tiny_checkpoint, width=WidthStage(n=1, m=4))
    summary = pipeline.run_pipeline(
        recipe, tmp_path / "w", eval_limits=TINY_LIMITS, eval_tasks=("ppl",), log=lambda m: None
    )
    assert set(summary["eval"]) == {"limits", "wikitext"}
    full = pipeline.run_pipeline(recipe, tmp_path / "w", eval_limits=TINY_LIMITS, log=lambda m: None)
    assert {"wikitext", "triviaqa_closed", "triviaqa_open"} <= set(full["eval"])

    seen = {}
    monkeypatch.setattr(pipeline, "run_pipeline", lambda recipe, **kw: seen.update(kw) or {"final_model": "m"})
    assert main(["compress", "--preset", "W1:4", "--tasks", "ppl,chat", "--no-eval"]) == 0
    assert seen["eval_tasks"] == ("ppl", "chat")
    assert main(["compress", "--preset", "W1:4", "--tasks", "ppl,books"]) == 2  # one error line, nothing run


def test_main_job_recipe_file():
    """scripts/main_job.sh's recipe: W1:8, LoRA distilled from the source on 64 chat + WikiText samples (8 steps),
    GPTQ g32 asymmetric with damping 0.1 and EoRA r32 calibrated on the mix, then tuned for 32 steps."""
    from conftest import ROOT

    r = load_recipe(ROOT / "recipes/main_job.toml")
    assert r.stage_names() == ["width", "lora", "gptq", "eora"] and (r.width.n, r.width.m) == (1, 8)
    assert (r.lora.objective, r.lora.dataset, r.lora.samples) == ("distill", "mix", 64)
    assert (r.gptq.group_size, r.gptq.sym, r.gptq.dataset, r.eora.dataset, r.eora.rank) == (32, False, "mix", "mix", 32)
    assert (r.eora.tune_steps, r.eora.tune_samples, r.eora.tune_lr, r.gptq.damp) == (32, 64, 2e-4, 0.1)
    assert "recipes/main_job.toml" in (ROOT / "scripts/main_job.sh").read_text()
