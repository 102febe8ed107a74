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
