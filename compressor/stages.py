"""One function per pipeline stage: read the previous stage's checkpoint, do the work, write this stage's
checkpoint into `out_dir/model` and return the facts for its record. The pipeline (compressor.pipeline)
decides which stages run; these functions only do their own stage.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compressor.calibration import calibration_ids
from compressor.device import pick_device
from compressor.recipe import Recipe
from compressor.torch_backend import load_causal_lm
from runtime.contract import TOKENIZER_FILES
from runtime.errors import EdgepackError
from runtime.fileio import atomic_directory, read_json
from runtime.tokenizer import TextTokenizer


@dataclass
class StageContext:
    recipe: Recipe
    tokenizer: TextTokenizer
    source_dir: Path
    workdir: Path
    device: str = field(default_factory=pick_device)
    _calib: torch.Tensor | None = None
    masks_path: Path | None = None  # set by the width stage, read by the LoRA merge
    inputs: dict = field(default_factory=dict)  # stage name -> the checkpoint it started from

    def calib_ids(self) -> torch.Tensor:
        if self._calib is None:
            c = self.recipe.calibration
            self._calib = calibration_ids(self.tokenizer, c.dataset, c.samples, c.seqlen, c.seed)
        return self._calib


def save_checkpoint(model, src_dir: Path, out_dir: Path) -> Path:
    """save_pretrained into a temporary sibling, copy the tokenizer files, then rename: a stage's model
    directory either exists complete or not at all."""
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (src_dir / name).exists():
                shutil.copy2(src_dir / name, tmp / name)
    return out_dir


def parameter_counts(model) -> dict:
    from compressor.width import count_parameters

    return count_parameters(model)


def run_depth(ctx: StageContext, src: Path, out: Path) -> dict:
    from compressor.depth import drop_layers, iterative_drop, layer_importance, select_layers_to_drop

    s = ctx.recipe.depth
    model = load_causal_lm(src).to(ctx.device)
    n_layers = model.config.num_hidden_layers
    if not 0 < s.remove < n_layers:
        raise EdgepackError(f"depth.remove={s.remove}: the model has {n_layers} layers")
    bs = ctx.recipe.calibration.batch_size
    if s.method == "iterative":
        dropped, rounds = iterative_drop(model, ctx.calib_ids(), s.remove, bs)
        scores = rounds[0]
    else:
        # One-shot scores depend only on the input model and the calibration windows, not on how many
        # layers are removed: cache them, so D2, D4, D6 and D8 of one model score the layers once.
        from compressor.recipe import settings_hash
        from runtime.fileio import atomic_write_json, read_json

        key = settings_hash(
            {"input": ctx.inputs.get("depth_fingerprint"), "calibration": dataclasses.asdict(ctx.recipe.calibration)}
        )
        cache = ctx.workdir.parent / ".cache" / f"layer-scores-{key}.json"
        if ctx.inputs.get("depth_fingerprint") and cache.exists():
            scores = read_json(cache)["scores"]
        else:
            scores = layer_importance(model, ctx.calib_ids(), bs)
            if ctx.inputs.get("depth_fingerprint"):
                atomic_write_json(cache, {"scores": scores, "source": str(src)})
        dropped = select_layers_to_drop(scores, s.remove)
        rounds = [scores]
    print_layer_table(scores, dropped)
    drop_layers(model, dropped)
    save_checkpoint(model, src, out / "model")
    return {
        "layers_before": n_layers,
        "dropped": sorted(dropped),
        "layer_scores": scores,
        "rounds": rounds,
        "params": parameter_counts(model),
    }


def print_layer_table(scores: list[float], dropped: list[int]) -> None:
    """Ranked table: perplexity of the model with each layer removed (low = least important)."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    print("layer importance (calibration PPL with the layer removed; lowest first):", file=sys.stderr)
    for rank, i in enumerate(order, 1):
        mark = "  <- dropped" if i in dropped else ""
        print(f"  {rank:3d}. layer {i:3d}  PPL {scores[i]:10.2f}{mark}", file=sys.stderr)


def run_width(ctx: StageContext, src: Path, out: Path) -> dict:
    from compressor.width import apply_nm_pruning, collect_input_norms, save_masks, sparsity_report

    s = ctx.recipe.width
    model = load_causal_lm(src).to(ctx.device)
    norms = collect_input_norms(model, ctx.calib_ids(), s.targets, ctx.recipe.calibration.batch_size)
    try:
        masks = apply_nm_pruning(model, norms, s.n, s.m, s.targets)
    except ValueError as e:
        raise EdgepackError(f"width {s.n}:{s.m}: {e}") from None
    save_checkpoint(model, src, out / "model")
    save_masks(out / "masks.safetensors", masks)
    report = sparsity_report(model, masks)
    return {"n_pruned": s.n, "m": s.m, "sparsity": report, "params": parameter_counts(model)}


def run_channels(ctx: StageContext, src: Path, out: Path) -> dict:
    from compressor.channels import prune_channels

    s = ctx.recipe.channels
    model = load_causal_lm(src).to(ctx.device)
    # FFN widths rounded to a multiple of 32: int4 blocks and N:M groups then tile them exactly
    kv_keep = s.kv_groups_keep if s.kv_groups_keep is not None else 1.0
    try:
        widths = prune_channels(
            model,
            ctx.calib_ids(),
            ffn_keep=float(s.ffn_keep),
            kv_groups_keep=kv_keep,
            batch_size=ctx.recipe.calibration.batch_size,
            ffn_multiple_of=32,
        )
    except ValueError as e:
        raise EdgepackError(f"channels: {e}") from None
    save_checkpoint(model, src, out / "model")
    return {"widths": widths, "params": parameter_counts(model)}


def run_lora(ctx: StageContext, src: Path, out: Path) -> dict:
    """Train LoRA (checkpoints in out/train, so an interrupted run resumes), then merge it in float32;
    after N:M width pruning the merge re-applies the mask unless the recipe keeps the merge dense."""
    from compressor.lora import LoraTraining, merge_lora, train_lora

    s = ctx.recipe.lora
    train, held, data = _lora_examples(ctx)
    settings = LoraTraining.for_examples(s, len(train), ctx.tokenizer.pad_id)
    model = load_causal_lm(src).to(ctx.device)
    # distill: the teacher is the recipe's source (before any stage), resident beside the student
    teacher = load_causal_lm(ctx.source_dir) if s.objective == "distill" else None
    peft_model, train_record = train_lora(model, train, held, settings, out / "train", teacher=teacher)
    del teacher
    masks = None
    if ctx.masks_path is not None and ctx.masks_path.exists():
        from compressor.width import load_masks

        masks = load_masks(ctx.masks_path)
    merged, merge_record = merge_lora(peft_model, masks=masks, keep_dense=s.keep_dense)
    save_checkpoint(merged, src, out / "model")
    return {
        "data": data,
        "train": {k: v for k, v in train_record.items() if k != "settings"},
        "merge": merge_record,
        "params": parameter_counts(merged),
    }


def _lora_examples(ctx: StageContext) -> tuple[list, list, dict]:
    """(train, heldout, data record) of the recipe's LoRA dataset (LoraStage checks the choice)."""
    from compressor.training_data import chat_examples, mixed_examples, triviaqa_examples, wikitext_examples

    s = ctx.recipe.lora
    if s.dataset == "triviaqa":
        train, held, data = triviaqa_examples(ctx.tokenizer, s.triviaqa_mode)
        return train[: s.samples], held, data
    if s.dataset == "wikitext":
        return wikitext_examples(ctx.tokenizer, s.seqlen, s.samples, ctx.recipe.calibration.dataset)
    chat = chat_examples(
        ctx.tokenizer,
        ctx.source_dir,
        ctx.workdir / "lora-chat-replies.json",
        train_limit=s.samples if s.dataset == "chat" else s.samples // 2,
    )
    if s.dataset == "chat":
        return chat[0][: s.samples], chat[1], chat[2]
    text = wikitext_examples(ctx.tokenizer, s.seqlen, s.samples, ctx.recipe.calibration.dataset)
    return mixed_examples(chat, text, s.samples)  # "mix"


def run_gptq(ctx: StageContext, src: Path, out: Path) -> dict:
    from compressor.gptq import quantize_gptq
    from compressor.training_data import quant_calibration_rows

    s = ctx.recipe.gptq
    rows = quant_calibration_rows(
        ctx.tokenizer, s.dataset, s.samples, s.seqlen, ctx.recipe.calibration.dataset, **_chat_source(ctx)
    )
    record = quantize_gptq(src, rows, out / "model", s)
    _copy_tokenizer(src, out / "model")
    return {
        "gptq": {k: v for k, v in record.items() if k not in ("module_loss", "settings", "stage")},
        "module_loss": record.get("module_loss"),
    }


def run_eora(ctx: StageContext, src: Path, out: Path) -> dict:
    """EoRA needs both the float model that was quantized (the GPTQ stage's input) and the GPTQ checkpoint."""
    from compressor.eora import generate_eora
    from compressor.training_data import quant_calibration_rows

    s = ctx.recipe.eora
    float_dir = ctx.inputs["gptq"]
    rows = quant_calibration_rows(
        ctx.tokenizer, s.dataset, s.samples, s.seqlen, ctx.recipe.calibration.dataset, **_chat_source(ctx)
    )
    tuned = None
    if not s.tune_steps:
        record = generate_eora(float_dir, src, rows, out / "adapter", s)
    else:  # the closed-form fit first (out/fit, reused when the tuning is resumed), then the tuning (out/adapter)
        from compressor.eora_tune import tune_eora
        from compressor.gptq import load_quantized

        fit = out / "fit"
        record = read_json(fit / "eora_record.json") if (fit / "eora_record.json").exists() else None
        if record is None:
            record = generate_eora(float_dir, src, rows, fit, s)
        tune_rows = quant_calibration_rows(
            ctx.tokenizer, s.dataset, s.tune_samples, s.seqlen, ctx.recipe.calibration.dataset, **_chat_source(ctx)
        )
        tuned = tune_eora(load_causal_lm(float_dir), load_quantized(src), fit, tune_rows, s, out, ctx.tokenizer.pad_id)
    return {
        "eora": {k: v for k, v in record.items() if k not in ("settings", "stage")},
        **({"tune": {k: v for k, v in tuned.items() if k != "train_loss"}} if tuned else {}),
        "float_model": str(float_dir),
        "quantized_model": str(src),
        "output": "adapter",
    }


def _chat_source(ctx: StageContext) -> dict:
    """Chat calibration rows are the source model's own replies, cached once per work directory (the same
    cache file the LoRA stage's chat data uses)."""
    return {"source_dir": ctx.source_dir, "chat_cache": ctx.workdir / "lora-chat-replies.json"}


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)


def load_stage_model(stage: str, stage_dir: Path, record: dict):
    """A float32 torch model of a stage's result, for evaluation: HF checkpoints load as they are, GPTQ
    checkpoints as their exact dequantized weights, EoRA as those plus B·A (what the int4 runtime computes)."""
    from compressor.gptq import dequantized_state_dict, float_model_from_state_dict, load_quantized

    if stage == "gptq":
        return load_quantized(stage_dir / "model")
    if stage == "eora":
        from compressor.eora import apply_eora_to_dequantized, load_eora

        qdir = Path(record["quantized_model"])
        sd = apply_eora_to_dequantized(dequantized_state_dict(qdir), load_eora(stage_dir / "adapter"))
        return float_model_from_state_dict(qdir, sd)
    return load_causal_lm(stage_dir / "model")


STAGE_FUNCTIONS = {
    "depth": run_depth,
    "width": run_width,
    "channels": run_channels,
    "lora": run_lora,
    "gptq": run_gptq,
    "eora": run_eora,
}
