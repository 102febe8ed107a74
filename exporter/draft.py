"""A bundle's optional draft model for speculative decoding (runtime.speculative): a much smaller decoder of the
same family and tokenizer, exported like the main model and shipped under draft/.

    draft/model.onnx, draft/model.onnx.data     listed in the manifest's `files` (size + sha256) like every file
    manifest runtime.draft                      {"onnx": "draft/model.onnx", "recipe": ..., "cost_per_token": ...,
                                                 "acceptance": {"greedy": rate, "prompts": n, "new_tokens": n}}

`add_draft` puts a built draft into a finished bundle: files first, manifest.json last (atomically), then the
archive again; until the manifest names the draft, the runtime ignores a draft/ folder entirely.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from runtime.errors import EdgepackError
from runtime.fileio import atomic_write_json, sha256_file
from runtime.manifest import MANIFEST_NAME, validate_manifest

DRAFT_DIR = "draft"


def add_draft(bundle_dir, draft_onnx_dir, record: dict, archive: bool = True) -> Path:
    """Copy the draft's .onnx and external data from `draft_onnx_dir` into `bundle_dir`/draft/, list them in
    the manifest, set runtime.draft = {"onnx": ..., **record}; rewrite the archive when `archive`."""
    from runtime.bundle import read_manifest

    bundle_dir, draft_onnx_dir = Path(bundle_dir), Path(draft_onnx_dir)
    models = sorted(draft_onnx_dir.glob("*.onnx"))
    if len(models) != 1:
        raise EdgepackError(f"{draft_onnx_dir}: expected exactly one .onnx draft model, found {len(models)}")
    manifest = read_manifest(bundle_dir)
    target = bundle_dir / DRAFT_DIR
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    files = {rel: info for rel, info in manifest["files"].items() if not rel.startswith(f"{DRAFT_DIR}/")}
    for f in sorted(draft_onnx_dir.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            shutil.copyfile(f, target / f.name)
            files[f"{DRAFT_DIR}/{f.name}"] = {"size": f.stat().st_size, "sha256": sha256_file(target / f.name)}
    manifest["files"] = dict(sorted(files.items()))
    manifest["runtime"]["draft"] = {"onnx": f"{DRAFT_DIR}/{models[0].name}", **record}
    validate_manifest(manifest, str(bundle_dir / MANIFEST_NAME))
    atomic_write_json(bundle_dir / MANIFEST_NAME, manifest)
    if archive:
        from exporter.bundle_writer import write_archive

        write_archive(bundle_dir)
    return bundle_dir


# Depth scoring for a draft only has to rank layers, not to be a paper figure: 2 x 256 calibration tokens
# instead of the recipe default 8 x 512 bring SmolLM2's 30 scoring passes from ~16 to ~2 minutes on 2 cores.
DRAFT_CALIBRATION = {"samples": 2, "seqlen": 256}


def step_seconds(decoder, prompt: list[int], steps: int = 32) -> float:
    """Median seconds of one decode step after `prompt` (the draft's cost relative to the model's)."""
    import statistics
    import time

    decoder.reset()
    decoder.prefill(prompt)
    times = []
    tok = prompt[-1]
    for _ in range(steps):
        t = time.perf_counter()
        tok = int(decoder.decode(tok).argmax())
        times.append(time.perf_counter() - t)
    decoder.reset()
    return statistics.median(times)


def export_draft(
    bundle_dir,
    recipe_text: str,
    run_workdir,
    options=None,
    prompts: int = 8,
    new_tokens: int = 64,
    archive: bool = True,
    log=print,
) -> dict:
    """`edgepack export --draft RECIPE`: compress the run's source model with the preset RECIPE (e.g. "D20":
    20 of SmolLM2's 30 layers dropped) in its own work directory next to the run's, export it like the main
    model (int4 projections, quantized head), measure its greedy acceptance rate against the bundle's model on
    the shipped chat instructions and its step cost relative to it, and add it to the bundle as draft/.
    Returns the manifest's runtime.draft record."""
    import dataclasses
    import tempfile

    from compressor.pipeline import run_pipeline, slug
    from compressor.recipe import parse_preset
    from exporter.export import ExportOptions, build_onnx
    from runtime.bundle import Bundle
    from runtime.fileio import read_json
    from runtime.generation import ChatSession, Generator
    from runtime.onnx_engine import OnnxDecoder
    from runtime.speculative import DraftModel, chat_instructions, measure_acceptance

    bundle_dir, run_workdir = Path(bundle_dir), Path(run_workdir)
    source = read_json(run_workdir / "summary.json")["recipe"]["model"]
    recipe = parse_preset(recipe_text, model=source)
    recipe.name = f"draft {recipe_text}"
    recipe.calibration = dataclasses.replace(recipe.calibration, **DRAFT_CALIBRATION)
    workdir = run_workdir.parent / f"{run_workdir.name}-draft-{slug(recipe_text)}"
    log(f"draft: compressing {source} with {recipe_text!r} in {workdir}")
    summary = run_pipeline(recipe, workdir=workdir, final_eval=False, stage_eval=False, log=log)
    options = options or ExportOptions()
    stage = Path(tempfile.mkdtemp(prefix=".draft-", dir=bundle_dir.parent))
    try:
        log("draft: building its ONNX decoder graph")
        graph = build_onnx(workdir, summary, stage, options)
        bundle = Bundle.open(bundle_dir)
        onnx_path = stage / "onnx" / "model.onnx"
        main, draft = bundle.decoder(), OnnxDecoder(onnx_path, pad_id=bundle.tokenizer.pad_id)
        chat = ChatSession(Generator(main, bundle.tokenizer), bundle.tokenizer, bundle.system_prompt)
        ids = []
        for text in chat_instructions():  # the first `prompts` instructions that leave room for the reply
            try:
                prompt = chat.build_prompt([{"role": "user", "content": text}], new_tokens)[0]
            except EdgepackError:
                continue
            if len(prompt) + new_tokens <= min(main.max_len, draft.max_len) and len(ids) < prompts:
                ids.append(prompt)
        if not ids:
            raise EdgepackError(f"draft: no chat instruction fits the model's context with {new_tokens} new tokens")
        cost = step_seconds(draft, ids[0]) / step_seconds(main, ids[0])
        gen = Generator(main, bundle.tokenizer, bundle.stop_ids, draft=DraftModel(draft, cost))
        log(f"draft: measuring acceptance on {prompts} chat instructions ({new_tokens} new tokens each)")
        acceptance = measure_acceptance(gen, ids, new_tokens)
        record = {
            "recipe": recipe_text,
            "description": recipe.describe(),
            "layers": graph.get("num_layers"),
            "cost_per_token": round(cost, 4),
            "acceptance": {**acceptance, "set": "chat/user_oriented_instructions_202.jsonl"},
            "dropped_layers": next((s.get("dropped") for s in summary["stages"] if s.get("stage") == "depth"), None),
        }
        del main, draft, gen
        add_draft(bundle_dir, stage / "onnx", record, archive=archive)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log(
        f"draft: {record['layers']} layers, {cost:.2f}x the model's step, {100 * acceptance['greedy']:.0f} % of "
        f"guesses kept (greedy)"
    )
    return record
