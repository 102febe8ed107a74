"""One function per pipeline stage: read the previous stage's checkpoint, do the work, write this stage's
checkpoint into `out_dir/model` and return the facts for its record. The pipeline (compressor.pipeline)
decides which stages run; these functions only do their own stage.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compressor.calibration import calibration_ids
from compressor.device import pick_device
from compressor.recipe import Recipe
from compressor.torch_backend import load_causal_lm
from runtime.tokenizer import TextTokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json")


@dataclass
class StageContext:
    recipe: Recipe
    tokenizer: TextTokenizer
    source_dir: Path
    workdir: Path
    device: str = field(default_factory=pick_device)
    _calib: torch.Tensor | None = None
    masks_path: Path | None = None  # set by the width stage, read by the LoRA merge

    def calib_ids(self) -> torch.Tensor:
        if self._calib is None:
            c = self.recipe.calibration
            self._calib = calibration_ids(self.tokenizer, c.dataset, c.samples, c.seqlen, c.seed)
        return self._calib


def save_checkpoint(model, src_dir: Path, out_dir: Path) -> Path:
    """save_pretrained into a temporary sibling, copy the tokenizer files, then rename: a stage's model
    directory either exists complete or not at all."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (src_dir / name).exists():
                shutil.copy2(src_dir / name, tmp / name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
        from runtime.errors import EdgepackError

        raise EdgepackError(f"depth.remove={s.remove}: the model has {n_layers} layers")
    bs = ctx.recipe.calibration.batch_size
    if s.method == "iterative":
        dropped, rounds = iterative_drop(model, ctx.calib_ids(), s.remove, bs)
        scores = rounds[0]
    else:
        scores = layer_importance(model, ctx.calib_ids(), bs)
        dropped = select_layers_to_drop(scores, s.remove)
        rounds = [scores]
    print_layer_table(scores, dropped)
    drop_layers(model, dropped)
    save_checkpoint(model, src, out / "model")
    return {"layers_before": n_layers, "dropped": sorted(dropped), "layer_scores": scores, "rounds": rounds,
            "params": parameter_counts(model)}


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
    masks = apply_nm_pruning(model, norms, s.n, s.m, s.targets)
    save_checkpoint(model, src, out / "model")
    save_masks(out / "masks.safetensors", masks)
    report = sparsity_report(model, masks)
    return {"n_pruned": s.n, "m": s.m, "sparsity": report, "params": parameter_counts(model)}


def run_channels(ctx: StageContext, src: Path, out: Path) -> dict:
    from compressor.channels import prune_channels

    s = ctx.recipe.channels
    model = load_causal_lm(src).to(ctx.device)
    widths = prune_channels(model, ctx.calib_ids(), ffn_keep=s.ffn_keep, kv_groups_keep=s.kv_groups_keep,
                            batch_size=ctx.recipe.calibration.batch_size)
    save_checkpoint(model, src, out / "model")
    return {"widths": widths, "params": parameter_counts(model)}


STAGE_FUNCTIONS = {"depth": run_depth, "width": run_width, "channels": run_channels}
