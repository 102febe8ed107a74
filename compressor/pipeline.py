"""The pipeline: run a recipe's stages in order into a work directory, resumably.

    workdir/
      recipe.json                 the recipe as resolved
      01-depth/model/             HF checkpoint after this stage      01-depth/record.json
      02-width/model/ masks.safetensors                               02-width/record.json
      ...
      summary.json                every stage's record + the final evaluation

A stage counts as done when its record.json exists and its fingerprint (hash of the stage's settings, the
calibration settings and the previous stage's fingerprint) matches: a re-run resumes at the first stage
whose record is missing or whose settings changed, and never redoes a finished one. Checkpoints are written
to a temporary directory and renamed, and the record is written last, so Ctrl-C at any point leaves either
a finished stage or none.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import re
import shutil
import sys
import time
from pathlib import Path

from compressor.importer import MODELS_DIR
from compressor.recipe import Recipe, settings_hash
from compressor.stages import STAGE_FUNCTIONS, StageContext
from runtime.errors import EdgepackError
from runtime.fileio import atomic_write_json, sha256_file
from runtime.harness import EvalLimits, evaluate, format_summary
from runtime.tokenizer import TextTokenizer

# Stages whose settings depend on the calibration windows.
USES_CALIBRATION = {"depth", "width", "channels"}


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
    settings = dataclasses.asdict(getattr(recipe, stage))
    calib = dataclasses.asdict(recipe.calibration) if stage in USES_CALIBRATION else None
    return settings_hash({"stage": stage, "settings": settings, "calibration": calib, "input": previous})


def default_workdir(recipe: Recipe) -> Path:
    return MODELS_DIR / "runs" / slug(recipe.name)


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run_pipeline(recipe: Recipe, workdir: Path | None = None, eval_limits: EvalLimits | None = None,
                 final_eval: bool = True, log=print) -> dict:
    """Run (or resume) `recipe`; returns the summary (also written to workdir/summary.json)."""
    source = Path(recipe.model)
    if not (source / "config.json").exists():
        raise EdgepackError(f"{source}: source model not found (run `edgepack import` first, or set model= in the recipe)")
    workdir = Path(workdir) if workdir else default_workdir(recipe)
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(workdir / "recipe.json", recipe.to_dict())
    tokenizer = TextTokenizer(source)
    ctx = StageContext(recipe=recipe, tokenizer=tokenizer, source_dir=source, workdir=workdir)

    previous_fp, previous_dir = source_fingerprint(source), source
    records = []
    stages = recipe.stage_names()
    log(f"recipe {recipe.name!r}: {recipe.describe()}")
    log(f"work directory {workdir}; stages: {' → '.join(stages) or 'none'}")
    for index, stage in enumerate(stages, 1):
        sdir = workdir / f"{index:02d}-{stage}"
        fp = stage_fingerprint(recipe, stage, previous_fp)
        record = _read_record(sdir / "record.json")
        if record and record.get("fingerprint") == fp and (sdir / "model").exists():
            log(f"[{index}/{len(stages)}] {stage}: done earlier ({record['seconds']:.0f} s), reusing")
        else:
            if sdir.exists():
                shutil.rmtree(sdir)  # stale or half-finished: its settings or input changed
            sdir.mkdir(parents=True)
            log(f"[{index}/{len(stages)}] {stage}: running")
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
                "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                **facts,
            }
            atomic_write_json(sdir / "record.json", record)
            log(f"[{index}/{len(stages)}] {stage}: finished in {record['seconds']:.0f} s")
        if stage == "width":
            ctx.masks_path = sdir / "masks.safetensors"
        records.append(record)
        previous_fp, previous_dir = fp, sdir / "model"

    summary = {"recipe": recipe.to_dict(), "description": recipe.describe(), "stages": records,
               "final_model": str(previous_dir), "fingerprint": previous_fp}
    if final_eval:
        summary["eval"] = evaluate_cached(previous_dir, workdir, previous_fp, eval_limits or EvalLimits(), tokenizer,
                                          log=log)
    atomic_write_json(workdir / "summary.json", summary)
    return summary


def evaluate_cached(model_dir: Path, workdir: Path, fingerprint: str, limits: EvalLimits, tokenizer: TextTokenizer,
                    log=print) -> dict:
    """Evaluate a stage's model once per (fingerprint, limits); later calls read the cached result."""
    key = settings_hash({"fp": fingerprint, "limits": dataclasses.asdict(limits)})
    cache = workdir / "evals" / f"{key}.json"
    cached = _read_record(cache)
    if cached:
        log(format_summary(cached))
        return cached
    from compressor.torch_backend import TorchBackend

    log(f"evaluating {model_dir} ({limits.describe()})")
    backend = TorchBackend.from_pretrained(model_dir, pad_id=tokenizer.pad_id)
    result = evaluate(backend, tokenizer, limits)
    result["model_dir"] = str(model_dir)
    atomic_write_json(cache, result)
    log(format_summary(result))
    return result
