"""The pipeline: run a recipe's stages in order into a work directory (layout: compressor.workdir), resumably.

A stage counts as done when its record.json exists and its fingerprint (hash of the stage's settings, the
calibration settings and the previous stage's fingerprint) matches: a re-run resumes at the first stage
whose record is missing or whose settings changed, and never redoes a finished one. Checkpoints are written
to a temporary directory and renamed, and the record is written last, so Ctrl-C at any point leaves either
a finished stage or none.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import re
import shutil
import time
from pathlib import Path

import numpy as np

from compressor.importer import MODELS_DIR
from compressor.recipe import Recipe, settings_hash
from compressor.stages import STAGE_FUNCTIONS, StageContext, load_stage_model
from compressor.torch_backend import load_causal_lm
from compressor.workdir import RECORD, STARTED, Workdir, read_record
from runtime.errors import EdgepackError
from runtime.fileio import atomic_write_json, sha256_file
from runtime.harness import EvalLimits, evaluate, format_summary
from runtime.reference import Reference
from runtime.tokenizer import TextTokenizer

# Stages whose settings depend on the calibration windows.
USES_CALIBRATION = {"depth", "width", "channels"}
# Stages evaluated as soon as they finish, so the record shows what each one cost or won (GPTQ and EoRA also
# get KL divergence and top-1 agreement against the unquantized model of the same run).
EVAL_AFTER = {"lora", "gptq", "eora"}


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name.replace(":", "-")).strip("_") or "run"


def source_fingerprint(model_dir: Path) -> str:
    """Identity of the source checkpoint: its import record if it has one, else its weights' digests."""
    rec = model_dir / "edgepack_import.json"
    if rec.exists():
        return sha256_file(rec)[:16]
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise EdgepackError(f"{model_dir}: no safetensors weights (run `edgepack import` first)")
    return settings_hash({w.name: sha256_file(w) for w in weights})


def stage_fingerprint(recipe: Recipe, stage: str, previous: str) -> str:
    section = getattr(recipe, stage)
    settings = dataclasses.asdict(section)
    for key, value in getattr(section, "added_later", {}).items():  # at their default: same run as before
        if settings.get(key) == value:
            del settings[key]
    calib = dataclasses.asdict(recipe.calibration) if stage in USES_CALIBRATION else None
    return settings_hash({"stage": stage, "settings": settings, "calibration": calib, "input": previous})


def default_workdir(recipe: Recipe) -> Path:
    return MODELS_DIR / "runs" / slug(recipe.name)


def run_pipeline(
    recipe: Recipe,
    workdir: Path | None = None,
    eval_limits: EvalLimits | None = None,
    final_eval: bool = True,
    stage_eval: bool = True,
    log=print,
    eval_tasks: tuple[str, ...] | None = None,
) -> dict:
    """Run (or resume) `recipe`; returns the summary (also written to workdir/summary.json). `eval_tasks`:
    what the stage evaluations measure (runtime.harness.evaluate's tasks; None = all that apply)."""
    source = Path(recipe.model)
    if not (source / "config.json").exists():
        raise EdgepackError(
            f"{source}: source model not found (run `edgepack import` first, or set model= in the recipe)"
        )
    wd = Workdir(Path(workdir) if workdir else default_workdir(recipe))
    wd.path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(wd.recipe_path, recipe.to_dict())
    tokenizer = TextTokenizer(source)
    ctx = StageContext(recipe=recipe, tokenizer=tokenizer, source_dir=source, workdir=wd.path)

    previous_fp, previous_dir = source_fingerprint(source), source
    records, last = [], None
    stages = recipe.stage_names()
    log(f"recipe {recipe.name!r}: {recipe.describe()}")
    log(f"work directory {wd.path}; stages: {' → '.join(stages) or 'none'}")
    for index, stage in enumerate(stages, 1):
        sdir = wd.stage_dir(index, stage)
        ctx.inputs[stage] = previous_dir
        ctx.inputs[f"{stage}_fingerprint"] = previous_fp
        record = _run_or_reuse_stage(ctx, wd, index, stage, previous_fp, previous_dir, f"[{index}/{len(stages)}]", log)
        if stage == "width":
            ctx.masks_path = sdir / "masks.safetensors"
        if stage_eval and stage in EVAL_AFTER and not (final_eval and index == len(stages)):
            record["eval"] = evaluate_stage(ctx, stage, sdir, record, eval_limits or EvalLimits(), log, eval_tasks)
        records.append(record)
        previous_fp, previous_dir = record["fingerprint"], sdir / record.get("output", "model")
        last = (stage, sdir, record)

    summary = {
        "recipe": recipe.to_dict(),
        "description": recipe.describe(),
        "stages": records,
        "final_model": str(previous_dir),
        "fingerprint": previous_fp,
        "workdir": str(wd.path),
    }
    if final_eval:
        limits = eval_limits or EvalLimits()
        if stages:
            stage, sdir, record = last
            summary["eval"] = evaluate_stage(ctx, stage, sdir, record, limits, log, eval_tasks)
            record["eval"] = summary["eval"]
        else:
            summary["eval"] = evaluate_cached(
                lambda: load_causal_lm(source),
                wd.path,
                previous_fp,
                limits,
                tokenizer,
                log=log,
                chat=chat_for(source, wd.path, limits, tokenizer, log),
                tasks=eval_tasks,
            )
    atomic_write_json(wd.summary_path, summary)
    return summary


def _run_or_reuse_stage(
    ctx: StageContext, wd: Workdir, index: int, stage: str, previous_fp: str, previous_dir: Path, step: str, log
) -> dict:
    """The stage's record: read back when it finished earlier with the same fingerprint, else run it."""
    recipe = ctx.recipe
    sdir = wd.stage_dir(index, stage)
    fp = stage_fingerprint(recipe, stage, previous_fp)
    record = wd.finished(sdir.name, fp)
    if record:
        log(f"{step} {stage}: done earlier ({record['seconds']:.0f} s), reusing")
        return record
    if sdir.exists() and wd.started_fingerprint(sdir.name) != fp:
        shutil.rmtree(sdir)  # stale: its settings or input changed
    sdir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(sdir / STARTED, {"fingerprint": fp})  # same fingerprint: keep partial work
    log(f"{step} {stage}: running")
    t0 = time.perf_counter()
    facts = STAGE_FUNCTIONS[stage](ctx, previous_dir, sdir)
    record = {
        "stage": stage,
        "fingerprint": fp,
        "input": previous_fp,
        "input_dir": str(previous_dir),
        "settings": dataclasses.asdict(getattr(recipe, stage)),
        "calibration": dataclasses.asdict(recipe.calibration) if stage in USES_CALIBRATION else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "finished_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **facts,
    }
    atomic_write_json(sdir / RECORD, record)
    log(f"{step} {stage}: finished in {record['seconds']:.0f} s")
    return record


def evaluate_stage(
    ctx: StageContext, stage: str, sdir: Path, record: dict, limits: EvalLimits, log=print, tasks=None
) -> dict:
    reference = None
    if stage in ("gptq", "eora"):
        float_dir = ctx.inputs["gptq"]
        reference = reference_for(float_dir, ctx.workdir, limits, ctx.tokenizer, log)
    return evaluate_cached(
        lambda: load_stage_model(stage, sdir, record),
        ctx.workdir,
        record["fingerprint"],
        limits,
        ctx.tokenizer,
        log=log,
        reference=reference,
        chat=chat_for(ctx.source_dir, ctx.workdir, limits, ctx.tokenizer, log) if _wants_chat(tasks) else None,
        tasks=tasks,
    )


def _wants_chat(tasks) -> bool:
    return tasks is None or "chat" in tasks


def chat_for(source: Path, workdir: Path, limits: EvalLimits, tokenizer: TextTokenizer, log=print):
    """The source's chat replies (compressor.chat_reference, cached) when the limits ask for chat fidelity
    and the model has a chat template; every stage is scored against the source, not its float input."""
    if limits.chat_prompts == 0 or not tokenizer.chat_template:
        return None
    from compressor.chat_reference import chat_reference_for

    return chat_reference_for(source, workdir, limits, tokenizer, log=log)


def reference_for(
    model_dir: Path, workdir: Path, limits: EvalLimits, tokenizer: TextTokenizer, log=print, k: int = 32
) -> Reference:
    """Top-k log-probabilities of an unquantized model on the evaluation windows (cached per limits)."""
    from compressor.torch_backend import TorchBackend
    from runtime import metrics
    from runtime.datasets import wikitext_eval_text

    key = settings_hash({"model": str(model_dir), "ctx": limits.ctx, "windows": limits.ppl_windows, "k": k})
    path = Workdir(workdir).evals / f"reference-{key}.safetensors"
    if path.exists():
        return Reference.load(path)
    log(f"reference log-probabilities of {model_dir} (top-{k})")
    windows = metrics.perplexity_windows(
        tokenizer.encode(wikitext_eval_text(limits.wikitext)), limits.ctx, limits.ppl_windows
    )
    backend = TorchBackend(load_causal_lm(model_dir), pad_id=tokenizer.pad_id)
    ids, lps = [], []
    for start in range(0, len(windows), limits.batch_size):
        logp = backend.log_probs(windows[start : start + limits.batch_size])[:, :-1]
        i, lp = metrics.topk_reference(logp.reshape(-1, logp.shape[-1]), k)
        ids.append(i.reshape(logp.shape[0], -1, k))
        lps.append(lp.reshape(logp.shape[0], -1, k))
    ref = Reference(windows, np.concatenate(ids), np.concatenate(lps))
    ref.save(path)
    return ref


def evaluate_cached(
    load_model,
    workdir: Path,
    fingerprint: str,
    limits: EvalLimits,
    tokenizer: TextTokenizer,
    log=print,
    reference: Reference | None = None,
    chat=None,
    tasks: tuple[str, ...] | None = None,
) -> dict:
    """Evaluate a stage's model once per (fingerprint, limits, tasks); later calls read the cached result.
    `chat` (runtime.reference.ChatReference) adds chat fidelity against the source's replies; `tasks` picks
    what is measured (runtime.harness.evaluate; None = all that apply)."""
    what = {
        "fp": fingerprint,
        "limits": dataclasses.asdict(limits),
        "kl": reference is not None,
        "chat": chat is not None,
    }
    if tasks is not None:  # absent for the default, so results cached before tasks existed stay valid
        what["tasks"] = sorted(tasks)
    key = settings_hash(what)
    cache = Workdir(workdir).evals / f"{key}.json"
    cached = read_record(cache)
    if cached:
        log(format_summary(cached))
        return cached
    from compressor.torch_backend import TorchBackend

    log(f"evaluating ({limits.describe()})")
    backend = TorchBackend(load_model(), pad_id=tokenizer.pad_id)
    result = evaluate(backend, tokenizer, limits, tasks=tasks, reference=reference, chat=chat)
    atomic_write_json(cache, result)
    log(format_summary(result))
    return result
