"""EoRA tuning: a few optimizer steps that distil all EoRA factors together, after the closed-form fit.

EoRA (compressor/eora.py) fits each projection on its own: the error W - W_q, projected onto the eigenspace of
that projection's calibration inputs, truncated to rank r. Nothing in that fit sees the model's output, so
errors that add up across layers stay. Here the int4 weights stay frozen and every A, B pair starts from the
fit and is trained end to end so that the quantized model's next-token distribution matches the float model
that was quantized (KL(float || quantized + B·A) on its logits over calibration rows). The shipped graph
keeps its shape and cost: only the numbers of the low-rank branch change.

The training loop is compressor.lora's (peft LoRA with scaling 1 on exactly the corrected projections,
checkpoints, resume, progress); this module only turns the fit into the loop's starting point and the result
back into the EoRA adapter layout (PEFT LoRA, lora_alpha = r, as gptqmodel writes it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compressor.eora import PEFT_PREFIX, load_eora, write_adapter
from compressor.lora import LoraTraining, adapter_state, train_lora
from compressor.recipe import EoraStage, LoraStage
from runtime.errors import EdgepackError
from runtime.fileio import atomic_write_json


def training_settings(settings: EoraStage, modules: list[str], pad_id: int) -> LoraTraining:
    """The LoRA trainer's settings for tuning EoRA factors of rank settings.rank (alpha = rank: scaling 1)."""
    stage = LoraStage(
        dataset="mix",  # recorded only: the rows are given to the trainer
        objective="distill",
        rank=settings.rank,
        alpha=float(settings.rank),
        dropout=0.0,
        targets=sorted({m.rsplit(".", 1)[-1] for m in modules}),
        samples=settings.tune_samples,
        batch_size=settings.tune_batch_size,
        lr=settings.tune_lr,
        seqlen=settings.seqlen,
    )
    return LoraTraining.for_steps(stage, settings.tune_steps, pad_id, modules=sorted(modules))


def tune_eora(
    float_model, quantized_model, fit_dir, rows: list[list[int]], settings: EoraStage, out_dir, pad_id: int
) -> dict[str, Any]:
    """Distil the EoRA adapter in `fit_dir` (a fit of `quantized_model`, a float32 model of the dequantized
    GPTQ weights; peft wraps it in place, so it is spent afterwards) from `float_model` over `rows` (token ids;
    the last eighth held out) and write the tuned adapter to out_dir/adapter. Resumes from out_dir/train.
    Returns the record (also eora_tune_record.json)."""
    out_dir = Path(out_dir)
    fit = load_eora(fit_dir)  # {module: (A [r, in], B [out, r])}, scaling folded into B
    if not fit:
        raise EdgepackError(f"{fit_dir}: no EoRA modules to tune")
    ranks = {a.shape[0] for a, _ in fit.values()}
    if ranks != {settings.rank}:
        raise EdgepackError(f"{fit_dir}: EoRA rank {sorted(ranks)} is not eora.rank={settings.rank}")
    examples = [(list(r), list(r)) for r in rows if len(r) >= 2]
    n_held = max(1, len(examples) // 8) if len(examples) > 1 else 0
    train, held = examples[: len(examples) - n_held], examples[len(examples) - n_held :]
    if not train:
        raise EdgepackError("eora tuning: no calibration rows to train on")
    training = training_settings(settings, list(fit), pad_id)
    init = {}
    for name, (a, b) in fit.items():
        init[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
        init[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
    peft_model, record = train_lora(
        quantized_model, train, held, training, out_dir / "train", float_model, init, desc="EoRA tuning"
    )
    state = adapter_state(peft_model)
    tuned = {}
    for name in fit:
        a = state.get(f"{PEFT_PREFIX}{name}.lora_A.weight")
        b = state.get(f"{PEFT_PREFIX}{name}.lora_B.weight")
        if a is None or b is None:
            raise EdgepackError(f"eora tuning: the trained adapter has no factors for {name}")
        tuned[name] = (a.float(), b.float())
    (out_dir / "adapter").mkdir(parents=True, exist_ok=True)
    write_adapter(out_dir / "adapter", tuned, settings.rank)
    moved = sum(float((tuned[n][1] @ tuned[n][0] - fit[n][1] @ fit[n][0]).norm()) for n in fit)
    size = sum(float((fit[n][1] @ fit[n][0]).norm()) for n in fit)
    out = {
        "steps": training.steps,
        "rows": len(train),
        "heldout_rows": len(held),
        "train_loss": record["train_loss"],
        "heldout_kl": record["heldout_loss"],  # KL(float || quantized + EoRA) per token, before/middle/end
        "relative_change": moved / size if size else 0.0,  # |tuned B·A - fit B·A| / |fit B·A|, summed
        "seconds": record["seconds"],
    }
    atomic_write_json(out_dir / "eora_tune_record.json", out)
    return out
