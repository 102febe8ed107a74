"""Write a bundle directory (and its BUNDLE.edgepack archive) from the exporter's parts.

Layout (see runtime.manifest for the manifest schema):

    manifest.json            written last, after every other file is in place and hashed
    onnx/                    the decoder graph and its external weight data
    tokenizer/               tokenizer.json, tokenizer_config.json, chat template, special tokens map
    reference/reference.safetensors
    safetensors/             GPTQ checkpoint + EoRA adapter as transformers/GPTQModel load them (optional)

Everything is assembled in a temporary sibling directory and renamed into place, so an interrupted export
never leaves a directory that looks like a bundle. The archive is an uncompressed zip (weights do not
compress, and a stored member can be streamed out), written with fixed timestamps so the same bundle gives
the same archive bytes, hence the same cache key in runtime.bundle.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from runtime.contract import TOKENIZER_FILES
from runtime.errors import EdgepackError
from runtime.fileio import atomic_open, atomic_write_json, sha256_file
from runtime.manifest import MANIFEST_NAME, build_manifest
from runtime.onnx_check import ORT_MIN_VERSION
from runtime.signing import SIGNATURE_NAME

# What a safetensors checkpoint directory may contribute: no pickles (.bin, .pt, .pth, .pkl) ever.
SAFE_SUFFIXES = (".safetensors", ".json", ".txt", ".md", ".jinja", ".model")
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def write_bundle(
    out_dir,
    *,
    onnx_dir,
    tokenizer_dir,
    reference_path,
    safetensors_dir: Path | None,
    manifest_fields: dict,
    archive: bool = True,
) -> Path:
    """Copy the parts into the bundle layout, hash every file, write manifest.json last; return out_dir.

    onnx_dir: directory holding exactly one .onnx model and its external data file(s).
    manifest_fields: the manifest blocks runtime.manifest.build_manifest takes, except `files` (computed
    here): model, recipe, generation, quality, created_by, and optionally runtime (extra keys such as
    requires / accuracy_level) and tokenizer (extra keys); the paths inside runtime and tokenizer are
    filled in here. An existing out_dir is replaced."""
    out_dir = Path(out_dir)
    onnx_dir, tokenizer_dir = Path(onnx_dir), Path(tokenizer_dir)
    models = sorted(onnx_dir.glob("*.onnx"))
    if len(models) != 1:
        raise EdgepackError(f"{onnx_dir}: expected exactly one .onnx model, found {len(models)}")
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise EdgepackError(f"{tokenizer_dir}: no tokenizer.json")
    unknown = set(manifest_fields) - {
        "model",
        "recipe",
        "generation",
        "quality",
        "created_by",
        "created_at",
        "runtime",
        "tokenizer",
    }
    if unknown:
        raise EdgepackError(f"manifest_fields: unknown key {sorted(unknown)[0]!r}")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for f in sorted(onnx_dir.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                _copy(f, tmp / "onnx" / f.name)
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                _copy(tokenizer_dir / name, tmp / "tokenizer" / name)
        reference_rel = None
        if reference_path is not None:
            reference_rel = "reference/reference.safetensors"
            _copy(Path(reference_path), tmp / reference_rel)
        safetensors_rel = None
        if safetensors_dir is not None:
            safetensors_rel = "safetensors"
            for f in sorted(Path(safetensors_dir).rglob("*")):
                if not f.is_file() or f.name.startswith("."):
                    continue
                if f.suffix not in SAFE_SUFFIXES:
                    raise EdgepackError(f"{f}: not allowed in a bundle (only {', '.join(SAFE_SUFFIXES)}; no pickles)")
                _copy(f, tmp / safetensors_rel / f.relative_to(safetensors_dir))

        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = f.relative_to(tmp).as_posix()
            files[rel] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
        tok = _tokenizer_facts(tmp / "tokenizer")
        runtime = {
            "requires": {"onnxruntime": f">={ORT_MIN_VERSION}", "tokenizers": ">=0.20"},
            **manifest_fields.get("runtime", {}),
            "onnx": f"onnx/{models[0].name}",
            "reference": reference_rel,
            "safetensors": safetensors_rel,
        }
        tokenizer = {**tok, **manifest_fields.get("tokenizer", {}), "directory": "tokenizer"}
        manifest = build_manifest(
            model=manifest_fields["model"],
            recipe=manifest_fields["recipe"],
            files=files,
            generation=manifest_fields["generation"],
            quality=manifest_fields["quality"],
            runtime=runtime,
            tokenizer=tokenizer,
            created_by=manifest_fields["created_by"],
            created_at=manifest_fields.get("created_at"),
        )
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if archive:
        write_archive(out_dir)
    return out_dir


def archive_path(bundle_dir) -> Path:
    bundle_dir = Path(bundle_dir)
    return bundle_dir.parent / f"{bundle_dir.name}.edgepack"


def write_archive(bundle_dir, path: Path | None = None) -> Path:
    """The bundle directory as one uncompressed zip (manifest.json first, then manifest.sig when the bundle
    is signed, then the files the manifest lists: nothing else), written atomically."""
    bundle_dir = Path(bundle_dir)
    path = Path(path) if path else archive_path(bundle_dir)
    from runtime.bundle import read_manifest

    manifest = read_manifest(bundle_dir)
    with atomic_open(path) as out, zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        signed = (bundle_dir / SIGNATURE_NAME).is_file()
        for rel in [MANIFEST_NAME, *([SIGNATURE_NAME] if signed else []), *manifest["files"]]:
            src = bundle_dir / rel
            info = zipfile.ZipInfo(rel, date_time=ZIP_DATE)
            info.external_attr = 0o100644 << 16  # a regular file, rw-r--r--
            info.file_size = src.stat().st_size  # lets zipfile pick zip64 for > 2 GiB members up front
            with open(src, "rb") as fi, zf.open(info, "w") as fo:
                shutil.copyfileobj(fi, fo, 1 << 20)
    return path


def _tokenizer_facts(directory: Path) -> dict:
    """The tokenizer block's facts, read with the runtime's own tokenizer class."""
    from runtime.tokenizer import TextTokenizer

    tok = TextTokenizer(directory)
    return {
        "chat_template": tok.chat_template is not None,
        "vocab_size": tok.vocab_size,
        "eos_token": tok.eos_token,
        "bos_token": tok.bos_token,
    }


def _copy(src: Path, dst: Path) -> None:
    # Streamed copy into the temporary bundle directory; atomicity comes from renaming the whole directory.
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not src.is_file():
        raise EdgepackError(f"{src}: file not found")
    shutil.copyfile(src, dst)


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing target is moved aside first and deleted after."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, old / "bundle")
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)
    os.chmod(target, 0o755)
