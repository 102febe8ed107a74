"""The bundle manifest (manifest.json): its schema, and the one validator every reader goes through.

The manifest is the root of trust of a bundle: it is the only file read before the digests are checked,
so it is parsed as plain JSON and validated field by field; everything else is hashed against it first.

Schema, format_version 1 (keys marked * are required; other keys inside the blocks are kept as they are):

    format*          "edgepack.bundle"
    format_version*  1
    created_by*      str, e.g. "edgepack 0.1.0"
    created_at       str, ISO 8601
    model*           {name*: str, source*: str or object (where the uncompressed weights came from),
                      parameters*: int (parameters of the compressed model, pruned zeros not counted),
                      architecture: str, vocab_size: int, layers: int, ...}
    recipe*          {name*: str, description: str,
                      stages*: [{stage*: "depth"|"width"|"channels"|"lora"|"gptq"|"eora"|..., settings: {...}, ...}]}
    files*           {relative/posix/path: {size*: int, sha256*: 64 hex}}, every file of the bundle except
                     manifest.json itself; paths may not be absolute, contain "..", "\\" or empty parts
    generation*      {eos_token_ids*: [int], bos_token_id: int|null, context_length*: int,
                      temperature, top_k, top_p, repetition_penalty, max_new_tokens: sampling defaults,
                      system_prompt: str|null}
    quality*         {LEVEL: {METRIC: CLAIM}} with LEVEL "full" (the headline numbers) and optionally "quick"
                     (what `verify --quick` checks). METRIC is one of METRICS below. CLAIM:
                       value*      float: what the exporter measured on the bundle's ONNX model, with the
                                   runtime's own harness (runtime.verify.measure_quality)
                       limits*     runtime.harness.EvalLimits as a dict (ctx, ppl_windows, qa_questions, ...):
                                   verify re-measures with exactly these
                       n*          int: sample size (scored tokens for ppl/kld/top1 and chat_kld/chat_top1,
                                   questions for TriviaQA, replies for chat_match32)
                       tolerance*  {kind*: "relative"|"absolute", value*: float, rule: str}
    runtime*         {onnx*: path in files, reference: path in files or null,
                      safetensors: directory (a prefix of paths in files) or null,
                      requires: {package: version spec}, accuracy_level: int}
    tokenizer*       {directory*: str (tokenizer.json must be in files), chat_template: bool, vocab_size: int}

Tolerance rule (runtime.verify.tolerance_for writes it into each claim; verify only reads the claim):
    ppl                          relative 2 %  (|measured - claimed| <= 0.02 * claimed)
    kld                          absolute max(0.01, 0.05 * claimed) nats
    chat_kld                     as kld
    top1, triviaqa_*, chat_top1, chat_match32
                                 absolute, a binomial-noise margin for the sample size n:
                                 max(2 * sqrt(p (1 - p) / n), 2 / n)   (two standard errors, at least 2 items)
"""

from __future__ import annotations

import math
import re
import unicodedata
from pathlib import PurePosixPath

from runtime.errors import EdgepackError

FORMAT = "edgepack.bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20

METRICS = {
    "ppl": "WikiText-2 perplexity",
    "kld": "KL divergence vs reference",
    "top1": "top-1 agreement vs reference",
    "triviaqa_closed_contains": "TriviaQA closed book (contains)",
    "triviaqa_closed_exact": "TriviaQA closed book (exact)",
    "triviaqa_open_contains": "TriviaQA open book (contains)",
    "triviaqa_open_exact": "TriviaQA open book (exact)",
    "chat_kld": "chat KL divergence vs source replies",
    "chat_top1": "chat top-1 agreement vs source replies",
    "chat_match32": "chat replies matching the source's first 32 tokens",
}
QUALITY_LEVELS = ("full", "quick")
TOLERANCE_KINDS = ("relative", "absolute")
REQUIRED = (
    "format",
    "format_version",
    "created_by",
    "model",
    "recipe",
    "files",
    "generation",
    "quality",
    "runtime",
    "tokenizer",
)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
MAX_FILES = 1000
MAX_NAME_BYTES = 255  # one path component (the limit of ext4, APFS and NTFS)
MAX_PATH_CHARS = 1024
MAX_CONTEXT = 1 << 20
# What a claim's limits may hold, and their ranges (runtime.harness.EvalLimits). The evaluation sets are
# names of the copies shipped in runtime/data, never paths: a manifest must not point verify at local files.
LIMIT_RANGES = {
    "ctx": (2, 1 << 16),
    "ppl_windows": (1, 100_000),
    "qa_questions": (1, 100_000),
    "qa_max_new_tokens": (1, 4096),
    "batch_size": (1, 256),
    "chat_prompts": (0, 100_000),
    "chat_max_new_tokens": (1, 4096),
    "chat_prompt_tokens": (1, 1 << 16),
}
LIMIT_OPTIONAL = ("ppl_windows", "qa_questions", "chat_prompts")
EVAL_SETS = {
    "wikitext": ("wikitext2-test", "tiny-wikitext"),
    "triviaqa": ("triviaqa", "tiny-triviaqa"),
    "chat": ("chat-instructions",),
}


def _fail(where: str, field: str, what: str):
    raise EdgepackError(f"{where}: manifest field '{field}' {what}")


def _need(obj: dict, key: str, types, where: str, prefix: str = "", optional: bool = False):
    field = f"{prefix}{key}"
    if key not in obj:
        if optional:
            return None
        _fail(where, field, "is missing")
    val = obj[key]
    if optional and val is None:
        return None
    if isinstance(val, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        _fail(where, field, f"must be {_type_names(types)}, not a boolean")
    if not isinstance(val, types):
        _fail(where, field, f"must be {_type_names(types)}, got {type(val).__name__}")
    return val


def _type_names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        dict: "an object",
        list: "a list",
        bool: "a boolean",
    }
    return " or ".join(names.get(t, t.__name__) for t in types)


def check_relative_path(rel: str, where: str, field: str) -> str:
    """A bundle path: relative, '/'-separated, no '..', no empty or '.' parts, no backslash or NUL."""
    if not isinstance(rel, str):
        _fail(where, field, "must be a path string")
    if not rel or "\\" in rel or _CONTROL.search(rel) or rel.startswith("/") or re.match(r"^[A-Za-z]:", rel):
        _fail(where, field, f"has an unsafe path {rel[:80]!r} (must be relative, '/'-separated, no control characters)")
    parts = PurePosixPath(rel).parts
    if any(p in ("..", ".", "") for p in rel.split("/")) or not parts:
        _fail(where, field, f"has an unsafe path {rel[:80]!r} (no '..', '.' or empty parts)")
    if len(rel) > MAX_PATH_CHARS or any(len(p.encode("utf-8", "replace")) > MAX_NAME_BYTES for p in parts):
        _fail(
            where,
            field,
            f"has an over-long path {rel[:80]!r}... (at most {MAX_NAME_BYTES} bytes a name, "
            f"{MAX_PATH_CHARS} characters in all)",
        )
    return rel


def check_name_clashes(names, where: str, field: str) -> None:
    """Refuse two paths that would land on the same file (case or Unicode normalisation differs only, as
    on macOS and Windows file systems) and a path that is both a file and another path's directory."""
    seen: dict[str, str] = {}
    for rel in names:
        key = unicodedata.normalize("NFC", rel).casefold()
        if key in seen:
            _fail(where, f"{field}[{rel!r}]", f"collides with {seen[key]!r} on case-insensitive file systems")
        seen[key] = rel
    directories: dict[str, str] = {}
    for rel in names:
        spelled = unicodedata.normalize("NFC", rel).split("/")
        for i in range(1, len(spelled)):
            prefix = "/".join(spelled[:i])
            key = prefix.casefold()
            if key in seen:
                _fail(where, f"{field}[{rel!r}]", f"needs {seen[key]!r} to be a directory, but it is a file")
            if directories.setdefault(key, prefix) != prefix:
                _fail(
                    where,
                    f"{field}[{rel!r}]",
                    f"directory {prefix!r} collides with {directories[key]!r} on case-insensitive file systems",
                )


def _int_in(obj: dict, key: str, lo: int, hi: int, where: str, prefix: str, optional: bool = False):
    val = _need(obj, key, int, where, prefix, optional=optional)
    if val is not None and not lo <= val <= hi:
        _fail(where, f"{prefix}{key}", f"is {val}, must be in [{lo}, {hi}]")
    return val


def _number_in(
    obj: dict, key: str, lo: float, hi: float, where: str, prefix: str, optional: bool = False, open_low: bool = False
):
    val = _need(obj, key, (int, float), where, prefix, optional=optional)
    if val is None:
        return None
    if not math.isfinite(val) or val < lo or val > hi or (open_low and val == lo):
        _fail(where, f"{prefix}{key}", f"is {val}, must be a finite number in {'(' if open_low else '['}{lo}, {hi}]")
    return val


def validate_manifest(obj: dict, where: str) -> dict:
    """Check every field the runtime relies on; return the manifest unchanged. `where` names the file in
    the error message. Unknown extra keys are allowed (forward-compatible additions within a version)."""
    if not isinstance(obj, dict):
        raise EdgepackError(f"{where}: the manifest must be a JSON object")
    for key in REQUIRED:
        if key not in obj:
            _fail(where, key, "is missing")
    if obj["format"] != FORMAT:
        _fail(where, "format", f"is {str(obj['format'])[:40]!r}, expected {FORMAT!r} (not an edgepack bundle)")
    version = obj["format_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        _fail(where, "format_version", "must be an integer")
    if version != FORMAT_VERSION:
        _fail(
            where,
            "format_version",
            f"is {version}: this edgepack reads format version {FORMAT_VERSION} "
            f"({'upgrade edgepack' if version > FORMAT_VERSION else 're-export the bundle'})",
        )
    _one_line(_need(obj, "created_by", str, where), where, "created_by")

    model = _need(obj, "model", dict, where)
    _one_line(_need(model, "name", str, where, "model."), where, "model.name")
    _need(model, "source", (str, dict), where, "model.")
    params = _need(model, "parameters", int, where, "model.")
    if params < 0:
        _fail(where, "model.parameters", "must be >= 0")

    recipe = _need(obj, "recipe", dict, where)
    _need(recipe, "name", str, where, "recipe.")
    stages = _need(recipe, "stages", list, where, "recipe.")
    for i, st in enumerate(stages):
        if not isinstance(st, dict):
            _fail(where, f"recipe.stages[{i}]", "must be an object")
        _need(st, "stage", str, where, f"recipe.stages[{i}].")

    files = _need(obj, "files", dict, where)
    if not files:
        _fail(where, "files", "is empty")
    if len(files) > MAX_FILES:
        _fail(where, "files", f"lists {len(files)} files, more than the limit of {MAX_FILES}")
    for rel, info in files.items():
        field = f"files[{rel!r}]"
        check_relative_path(rel, where, field)
        if rel == MANIFEST_NAME:
            _fail(where, field, "must not list the manifest itself")
        if not isinstance(info, dict):
            _fail(where, field, "must be an object {size, sha256}")
        size = _need(info, "size", int, where, f"{field}.")
        if size < 0:
            _fail(where, f"{field}.size", "must be >= 0")
        digest = _need(info, "sha256", str, where, f"{field}.")
        if not _SHA256.match(digest):
            _fail(where, f"{field}.sha256", "must be 64 lowercase hex digits")
    check_name_clashes([*files, MANIFEST_NAME], where, "files")

    gen = _need(obj, "generation", dict, where)
    eos = _need(gen, "eos_token_ids", list, where, "generation.")
    if len(eos) > 64 or not all(isinstance(e, int) and not isinstance(e, bool) and 0 <= e < 1 << 31 for e in eos):
        _fail(where, "generation.eos_token_ids", "must be a list of at most 64 token ids")
    _int_in(gen, "bos_token_id", 0, (1 << 31) - 1, where, "generation.", optional=True)
    _int_in(gen, "context_length", 2, MAX_CONTEXT, where, "generation.")
    _number_in(gen, "temperature", 0, 100, where, "generation.", optional=True)
    _int_in(gen, "top_k", 0, 1 << 31, where, "generation.", optional=True)
    _number_in(gen, "top_p", 0, 1, where, "generation.", optional=True, open_low=True)
    _number_in(gen, "repetition_penalty", 0, 100, where, "generation.", optional=True, open_low=True)
    _int_in(gen, "max_new_tokens", 1, MAX_CONTEXT, where, "generation.", optional=True)
    _need(gen, "system_prompt", str, where, "generation.", optional=True)

    quality = _need(obj, "quality", dict, where)
    for level, claims in quality.items():
        if level not in QUALITY_LEVELS:
            _fail(where, f"quality.{level}", f"is not a known level (use {', '.join(QUALITY_LEVELS)})")
        if not isinstance(claims, dict):
            _fail(where, f"quality.{level}", "must be an object {metric: claim}")
        for metric, claim in claims.items():
            _validate_claim(claim, where, f"quality.{level}.{metric}", metric)

    runtime = _need(obj, "runtime", dict, where)
    onnx = _need(runtime, "onnx", str, where, "runtime.")
    if onnx not in files:
        _fail(where, "runtime.onnx", f"names {onnx!r}, which is not in 'files'")
    ref = _need(runtime, "reference", str, where, "runtime.", optional=True)
    if ref is not None and ref not in files:
        _fail(where, "runtime.reference", f"names {ref!r}, which is not in 'files'")
    st_dir = _need(runtime, "safetensors", str, where, "runtime.", optional=True)
    if st_dir is not None and not any(f.startswith(st_dir.rstrip("/") + "/") for f in files):
        _fail(where, "runtime.safetensors", f"names {st_dir!r}, but no file in 'files' is under it")
    requires = _need(runtime, "requires", dict, where, "runtime.", optional=True) or {}
    for package, spec in requires.items():
        if (
            not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", package)
            or not isinstance(spec, str)
            or len(spec) > 64
            or _CONTROL.search(spec)
        ):
            _fail(where, f"runtime.requires[{package[:40]!r}]", "must map a package name to a version spec string")
    _need(runtime, "accuracy_level", int, where, "runtime.", optional=True)

    tok = _need(obj, "tokenizer", dict, where)
    tok_dir = _need(tok, "directory", str, where, "tokenizer.")
    check_relative_path(tok_dir, where, "tokenizer.directory")
    if tok_dir in files:
        _fail(where, "tokenizer.directory", f"names {tok_dir!r}, which is a file")
    if f"{tok_dir.rstrip('/')}/tokenizer.json" not in files:
        _fail(where, "tokenizer.directory", f"has no {tok_dir}/tokenizer.json in 'files'")
    return obj


def _validate_claim(claim, where: str, field: str, metric: str) -> None:
    if metric not in METRICS:
        _fail(where, field, f"is not a known metric (use {', '.join(METRICS)})")
    if not isinstance(claim, dict):
        _fail(where, field, "must be an object {value, limits, n, tolerance}")
    value = _need(claim, "value", (int, float), where, f"{field}.")
    if not math.isfinite(value):
        _fail(where, f"{field}.value", "must be a finite number")
    _validate_limits(_need(claim, "limits", dict, where, f"{field}."), where, f"{field}.limits.")
    _int_in(claim, "n", 1, 1 << 40, where, f"{field}.")
    tol = _need(claim, "tolerance", dict, where, f"{field}.")
    kind = _need(tol, "kind", str, where, f"{field}.tolerance.")
    if kind not in TOLERANCE_KINDS:
        _fail(where, f"{field}.tolerance.kind", f"is {kind!r}; use one of {', '.join(TOLERANCE_KINDS)}")
    tv = _need(tol, "value", (int, float), where, f"{field}.tolerance.")
    if not math.isfinite(tv) or tv < 0:
        _fail(where, f"{field}.tolerance.value", "must be a finite number >= 0")


def _validate_limits(limits: dict, where: str, prefix: str) -> None:
    """A claim's evaluation limits: known keys, integers in range, and evaluation sets that are names of
    the shipped copies (a path, '~/...', a device or a FIFO is refused here, before anything is opened)."""
    unknown = sorted(set(limits) - set(LIMIT_RANGES) - set(EVAL_SETS))
    if unknown:
        _fail(where, f"{prefix}{unknown[0][:40]}", "is not a known evaluation limit (written by a newer edgepack?)")
    for key in ("ctx", "ppl_windows", "qa_questions", "qa_max_new_tokens"):
        if key not in limits:
            _fail(where, f"{prefix}{key}", "is missing")
    for key, (lo, hi) in LIMIT_RANGES.items():
        if key in limits:
            _int_in(limits, key, lo, hi, where, prefix, optional=key in LIMIT_OPTIONAL)
    for key, names in EVAL_SETS.items():
        if key in limits and limits[key] not in names:
            shown = limits[key][:80] if isinstance(limits[key], str) else limits[key]
            _fail(
                where,
                f"{prefix}{key}",
                f"is {shown!r}; a bundle's claims may name only the built-in evaluation "
                f"sets ({', '.join(names)}), never a file",
            )


def _one_line(text: str, where: str, field: str) -> str:
    if len(text) > 200 or _CONTROL.search(text):
        _fail(where, field, "must be one line of at most 200 printable characters")
    return text


def build_manifest(
    *,
    model: dict,
    recipe: dict,
    files: dict,
    generation: dict,
    quality: dict,
    runtime: dict,
    tokenizer: dict,
    created_by: str,
    created_at: str | None = None,
) -> dict:
    """Assemble a manifest in the documented key order and validate it (raises EdgepackError naming the
    field on anything wrong, so a bad bundle is never written)."""
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": created_by,
    }
    if created_at:
        manifest["created_at"] = created_at
    manifest.update(
        model=model,
        recipe=recipe,
        files=dict(sorted(files.items())),
        generation=generation,
        quality=quality,
        runtime=runtime,
        tokenizer=tokenizer,
    )
    return validate_manifest(manifest, "manifest")
