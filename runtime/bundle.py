"""Open a bundle (a directory or a BUNDLE.edgepack archive) and check it before anything is parsed.

A bundle is untrusted input (see the README's "Security" section for the threat model). Order of trust:
manifest.json is read as bytes, its signature (manifest.sig, runtime.signing) checked against them when
there is one, then parsed as plain JSON and validated (runtime.manifest); then every file it lists is
checked for presence (a regular file, no symlink in its path), size and sha256; only then are the
tokenizer, the ONNX model (its external-data locations and metadata first, runtime.onnx_check) and the
reference parsed, and only files the manifest lists are ever opened. Nothing is ever unpickled: the
formats are JSON, ONNX, safetensors and text.

An archive is an uncompressed zip of the bundle directory. It is extracted, once, into a cache directory
keyed by the archive's sha256 ($EDGEPACK_CACHE, or the platform's user cache dir / edgepack / bundles),
under these rules: only regular files (no symlinks, devices or other links), stored uncompressed and
unencrypted (so no member can expand beyond its listed size: no zip bombs); member names relative,
'/'-separated, without '..', control characters or over-long parts, and no two names that clash on a
case-insensitive file system; only manifest.json, manifest.sig and the files the manifest lists; at most
MAX_FILES members and MAX_TOTAL_BYTES in all; each member's size and sha256 checked while it is written.
The extraction goes to a temporary directory (named with the extracting process' id) that is renamed into
place when complete, so a killed extraction never leaves a half-extracted bundle that looks finished; the
next extraction deletes temporary directories whose process is gone, and a damaged or incomplete cache
entry is checked on every open and extracted afresh.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import stat
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path

from runtime.errors import EdgepackError
from runtime.fileio import parse_json, read_json, sha256_file
from runtime.manifest import (
    MANIFEST_NAME,
    MAX_FILES,
    MAX_MANIFEST_BYTES,
    METRICS,
    check_name_clashes,
    check_relative_path,
    validate_manifest,
)
from runtime.signing import SIGNATURE_NAME, SignatureCheck, TrustPolicy, check_signature
from runtime.tokenizer import TextTokenizer

ARCHIVE_SUFFIX = ".edgepack"
MAX_TOTAL_BYTES = 64 << 30  # 64 GiB: far above any small model, far below a zip bomb's claims
JSON_SUFFIXES = (".json",)
MAX_SIGNATURE_BYTES = 64 << 10


def cache_root() -> Path:
    env = os.environ.get("EDGEPACK_CACHE")
    if env:
        return Path(env).expanduser() / "bundles"
    import platformdirs

    return Path(platformdirs.user_cache_dir("edgepack")) / "bundles"


class Bundle:
    """An opened, digest-checked bundle.

    Attributes: path (the bundle directory; for an archive, its extraction in the cache), manifest (the
    validated manifest.json), tokenizer (runtime.tokenizer.TextTokenizer), onnx_path, reference_path (None
    when the bundle ships no reference), source (what was opened: the directory or the archive)."""

    def __init__(self, path: Path, manifest: dict, source: Path | None = None, signature: SignatureCheck | None = None):
        from runtime.onnx_check import check_onnx_model

        self.path = Path(path)
        self.manifest = manifest
        self.source = Path(source) if source else self.path
        self.signature = signature or SignatureCheck("unsigned")
        rt = manifest["runtime"]
        self.onnx_path: Path = self.path / rt["onnx"]
        self.reference_path: Path | None = self.path / rt["reference"] if rt.get("reference") else None
        self.safetensors_path: Path | None = self.path / rt["safetensors"] if rt.get("safetensors") else None
        self.tokenizer_path = self.path / manifest["tokenizer"]["directory"]
        self.draft_path: Path | None = check_draft(manifest, self.path)  # optional speculative-decoding draft
        from runtime.onnx_check import ORT_MIN_VERSION

        # edgepack's own floor first (a manifest cannot lower it), then what the bundle asks for.
        check_requirements({"onnxruntime": f">={ORT_MIN_VERSION}"}, "edgepack")
        check_requirements(rt.get("requires") or {}, self.path / MANIFEST_NAME)
        tok_prefix = manifest["tokenizer"]["directory"].rstrip("/") + "/"
        tok_files = {f[len(tok_prefix) :] for f in manifest["files"] if f.startswith(tok_prefix)}
        for f in sorted(tok_files):  # malformed JSON gets a clear error naming the file
            if f.endswith(JSON_SUFFIXES) and f != "tokenizer.json":  # that one: TextTokenizer checks and parses it
                read_json(self.tokenizer_path / f)
        # Only the tokenizer files the manifest lists (hence digest-checked) are read, never another file
        # that happens to lie in the directory.
        self.tokenizer = TextTokenizer(self.tokenizer_path, files=tok_files)
        self.onnx_metadata = check_onnx_model(self.onnx_path, rt["onnx"], manifest["files"])
        if self.draft_path is not None:  # the draft graph's external data and metadata, checked the same way
            check_onnx_model(self.draft_path, rt["draft"]["onnx"], manifest["files"])

    # ---------------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path, verify_digests: bool = True, trust: TrustPolicy | None = None) -> Bundle:
        """Open a bundle directory or archive. The manifest's signature is checked first (`trust`: whose
        keys to accept and whether a signature is required; default: the user's trust file, not required),
        then every file's size and sha256 against the manifest before any file is parsed
        (verify_digests=False checks presence and size only); any problem raises one EdgepackError naming
        the file. A bad signature is always refused; `bundle.signature` says what was found."""
        path = Path(path).expanduser()
        trust = trust if trust is not None else TrustPolicy.default()
        if path.is_dir():
            manifest, raw = _checked_directory(path, verify_digests)
            return cls(path, manifest, signature=check_signature(path, raw, trust))
        if path.is_file():
            directory = extract_archive(path, verify_digests=verify_digests)
            raw = _read_manifest_bytes(directory)
            manifest = validate_manifest(
                parse_json(raw, str(directory / MANIFEST_NAME)), str(directory / MANIFEST_NAME)
            )
            return cls(directory, manifest, source=path, signature=check_signature(directory, raw, trust))
        raise EdgepackError(f"{path}: no such bundle (give a bundle directory or a {ARCHIVE_SUFFIX} file)")

    # ---------------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.manifest["model"]["name"]

    @property
    def stop_ids(self) -> set[int]:
        ids = set(self.manifest["generation"]["eos_token_ids"])
        if self.tokenizer.eos_id is not None:
            ids.add(self.tokenizer.eos_id)
        return ids

    @property
    def context_length(self) -> int:
        return int(self.manifest["generation"]["context_length"])

    @property
    def system_prompt(self) -> str | None:
        """The manifest's default system prompt (None if it has none)."""
        return self.manifest["generation"].get("system_prompt")

    def sampling_defaults(self):
        """runtime.generation.SamplingSettings from the manifest's generation block."""
        from runtime.generation import SamplingSettings

        gen = self.manifest["generation"]
        base = SamplingSettings()
        return SamplingSettings(
            temperature=float(gen.get("temperature", base.temperature)),
            top_k=int(gen.get("top_k", base.top_k)),
            top_p=float(gen.get("top_p", base.top_p)),
            repetition_penalty=float(gen.get("repetition_penalty", base.repetition_penalty)),
            max_new_tokens=int(gen.get("max_new_tokens", base.max_new_tokens)),
        )

    def decoder(self, threads: int | None = None, max_len: int | None = None, spin: bool = True):
        """A fresh runtime.onnx_engine.OnnxDecoder on the bundle's ONNX model (errors name the file).
        spin=False: idle onnxruntime threads sleep between kernels (for a UI sharing the cores)."""
        from runtime.contract import INPUT_IDS, LOGITS, LOGITS_POSITIONS, SEQLENS_K, TOTAL_SEQUENCE_LENGTH
        from runtime.onnx_engine import OnnxDecoder

        dec = OnnxDecoder(self.onnx_path, threads=threads, max_len=max_len, pad_id=self.tokenizer.pad_id, spin=spin)
        if dec.vocab_size < self.tokenizer.vocab_size:
            raise EdgepackError(
                f"{self.onnx_path}: the model's vocabulary ({dec.vocab_size}) is smaller than the "
                f"tokenizer's ({self.tokenizer.vocab_size})"
            )
        inputs = {i.name for i in dec.session.get_inputs()}
        outputs = {o.name for o in dec.session.get_outputs()}
        needed_in = {INPUT_IDS, SEQLENS_K, TOTAL_SEQUENCE_LENGTH, LOGITS_POSITIONS}
        needed_in |= {layer[k] for layer in dec.kv_layers for k in ("past_key", "past_value")}
        needed_out = {LOGITS} | {layer[k] for layer in dec.kv_layers for k in ("present_key", "present_value")}
        missing = sorted((needed_in - inputs) | (needed_out - outputs))
        if missing:
            raise EdgepackError(
                f"{self.onnx_path}: the graph lacks {missing[0]!r}, which its metadata names "
                "(not an edgepack decoder graph)"
            )
        _check_graph_shapes(dec, self.onnx_path)
        return dec

    def generator(self, threads: int | None = None, max_len: int | None = None, draft: str = "auto", spin: bool = True):
        """A runtime.generation.Generator with the bundle's stop ids (manifest EOS + tokenizer EOS).
        draft: speculative decoding's proposer (runtime.speculative.make_proposer): "auto" (the default: the
        bundle's draft model where its measured acceptance pays, else prompt lookup, for greedy requests
        only), "lookup", "model" or "none". It changes the speed, not the tokens: greedy requests on graphs
        with int8 activations take every step through the multi-token path (generation.exact_step_tokens)."""
        from runtime.generation import Generator
        from runtime.speculative import make_proposer

        proposer = make_proposer(draft, self, threads)
        return Generator(self.decoder(threads, max_len, spin), self.tokenizer, stop_ids=self.stop_ids, draft=proposer)

    @property
    def has_draft(self) -> bool:
        return self.draft_path is not None

    @property
    def draft_cost(self) -> float:
        """One draft step's cost relative to one step of the bundle's model (as the exporter measured it)."""
        return float(self.manifest["runtime"]["draft"].get("cost_per_token", 0.3))

    def draft_decoder(self, threads: int | None = None, max_len: int | None = None):
        """An OnnxDecoder on the bundle's draft model (EdgepackError if it has none, or if its vocabulary
        differs from the model's)."""
        from runtime.onnx_engine import OnnxDecoder

        if self.draft_path is None:
            raise EdgepackError(f"{self.path}: the bundle has no draft model")
        dec = OnnxDecoder(self.draft_path, threads=threads, max_len=max_len, pad_id=self.tokenizer.pad_id)
        main_vocab = int(self.manifest["model"].get("vocab_size") or dec.vocab_size)
        if dec.vocab_size != main_vocab or dec.vocab_size < self.tokenizer.vocab_size:
            raise EdgepackError(
                f"{self.draft_path}: the draft's vocabulary ({dec.vocab_size}) differs from the model's ({main_vocab})"
            )
        return dec

    def chat(self, threads: int | None = None, system_prompt: str | None = None):
        """A runtime.generation.ChatSession with the manifest's system prompt unless one is given."""
        from runtime.generation import ChatSession

        return ChatSession(
            self.generator(threads), self.tokenizer, system_prompt if system_prompt is not None else self.system_prompt
        )

    def reference(self):
        """The bundle's reference log-probs (runtime.reference.Reference), or None."""
        if self.reference_path is None:
            return None
        from runtime.reference import Reference

        vocab = max(self.tokenizer.vocab_size, int(self.onnx_metadata["vocab_size"]))
        return Reference.load(self.reference_path, vocab_size=vocab)

    def size_bytes(self) -> int:
        return sum(int(f["size"]) for f in self.manifest["files"].values())

    def describe(self) -> dict:
        """For the TUI panel and `edgepack bench`: {"name", "path", "source", "recipe": name, "description", "stages":
        [stage strings], "size_bytes", "size_text", "parameters", "context_length", "quality": [{"metric",
        "label", "value", "text", "n"}] (the "full" claims), "created_by"}."""
        m = self.manifest
        size = self.size_bytes()
        quality = []
        for metric, claim in m["quality"].get("full", {}).items():
            quality.append(
                {
                    "metric": metric,
                    "label": METRICS[metric],
                    "value": claim["value"],
                    "text": format_metric(metric, claim["value"]),
                    "n": claim["n"],
                }
            )
        return {
            "name": m["model"]["name"],
            "path": str(self.path),
            "source": str(self.source),
            "recipe": m["recipe"]["name"],
            "description": m["recipe"].get("description"),
            "stages": [describe_stage(s) for s in m["recipe"]["stages"]],
            "size_bytes": size,
            "size_text": format_bytes(size),
            "parameters": int(m["model"]["parameters"]),
            "context_length": self.context_length,
            "quality": quality,
            "created_by": m["created_by"],
        }


def check_draft(manifest: dict, directory: Path) -> Path | None:
    """The draft model's ONNX path from the manifest's optional `runtime.draft` block ({"onnx": "draft/....onnx",
    "cost_per_token", "acceptance", ...}), or None. The ONNX file must be listed in `files` (so its digest was
    checked like every file), and so must every file lying in its directory: onnxruntime would load an
    unlisted external-data file next to it without any check."""
    draft = manifest["runtime"].get("draft")
    if draft is None:
        return None
    where = Path(directory) / MANIFEST_NAME
    if not isinstance(draft, dict) or not isinstance(draft.get("onnx"), str):
        raise EdgepackError(f"{where}: manifest field 'runtime.draft' must be an object with an 'onnx' path")
    rel = check_relative_path(draft["onnx"], str(where), "runtime.draft.onnx")
    if not rel.startswith("draft/"):
        raise EdgepackError(f"{where}: manifest field 'runtime.draft.onnx' must be under draft/, got {rel!r}")
    if rel not in manifest["files"]:
        raise EdgepackError(f"{where}: manifest field 'runtime.draft.onnx' names {rel!r}, which is not in 'files'")
    cost = draft.get("cost_per_token", 0.3)
    if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not 0 <= cost <= 10:
        raise EdgepackError(f"{where}: manifest field 'runtime.draft.cost_per_token' must be a number in [0, 10]")
    folder = (Path(directory) / rel).parent
    for f in sorted(folder.rglob("*")):
        name = f.relative_to(directory).as_posix()
        if f.is_file() and name not in manifest["files"]:
            raise EdgepackError(f"{f}: file in the draft's directory is not listed in the manifest (refused)")
    return Path(directory) / rel


def _check_graph_shapes(dec, where) -> None:
    """The graph's fixed dimensions agree with its metadata (KV heads, head size, vocabulary), so a crafted
    metadata block fails here with one line instead of inside onnxruntime mid-generation."""
    shapes = {v.name: v.shape for v in [*dec.session.get_inputs(), *dec.session.get_outputs()]}
    expected = {}
    for layer in dec.kv_layers:
        for k in ("past_key", "past_value", "present_key", "present_value"):
            expected[layer[k]] = {1: int(layer["kv_heads"]), 3: dec.head_dim}
    expected["logits"] = {2: dec.vocab_size}
    for name, dims in expected.items():
        shape = shapes.get(name) or []
        for axis, want in dims.items():
            got = shape[axis] if axis < len(shape) else None
            if isinstance(got, int) and got != want:
                raise EdgepackError(f"{where}: {name} has dimension {got} at axis {axis}, the metadata says {want}")


def check_requirements(requires: dict, where) -> None:
    """The manifest's minimum package versions ({"onnxruntime": ">=1.20"}) against what is installed.
    Only ">=" is understood (written by hand: `packaging` is not a runtime dependency); others are skipped."""
    from importlib.metadata import PackageNotFoundError, version

    for package, spec in requires.items():
        if not isinstance(spec, str) or not spec.startswith(">="):
            continue
        try:
            installed = version(package)
        except PackageNotFoundError:
            raise EdgepackError(f"{where}: the bundle needs {package}{spec}, which is not installed") from None
        if _version_tuple(installed) < _version_tuple(spec[2:]):
            raise EdgepackError(
                f"{where}: the bundle needs {package}{spec}, installed is {installed} (pip install -U {package})"
            )


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.strip().split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


# ---------------------------------------------------------------------------------------------------------
# Directory checks


def _read_manifest_bytes(directory: Path) -> bytes:
    mpath = Path(directory) / MANIFEST_NAME
    try:
        st = mpath.lstat()
    except FileNotFoundError:
        raise EdgepackError(f"{mpath}: manifest not found (not an edgepack bundle)") from None
    except OSError as e:
        raise EdgepackError(f"{mpath}: cannot read the manifest ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise EdgepackError(f"{mpath}: the manifest is not a regular file (links are refused)")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise EdgepackError(f"{mpath}: manifest larger than {MAX_MANIFEST_BYTES >> 20} MiB")
    try:
        return mpath.read_bytes()
    except OSError as e:
        raise EdgepackError(f"{mpath}: cannot read the manifest ({e.strerror or e})") from None


def read_manifest(directory: Path) -> dict:
    """The validated manifest of a bundle directory (its files are not checked here)."""
    mpath = Path(directory) / MANIFEST_NAME
    return validate_manifest(parse_json(_read_manifest_bytes(directory), str(mpath)), str(mpath))


def _checked_directory(directory: Path, verify_digests: bool) -> tuple[dict, bytes]:
    """(validated manifest, its raw bytes) once every listed file is a regular file reached through no
    symlink, of the listed size and (verify_digests) sha256."""
    raw = _read_manifest_bytes(directory)
    manifest = validate_manifest(parse_json(raw, str(directory / MANIFEST_NAME)), str(directory / MANIFEST_NAME))
    for rel, info in manifest["files"].items():
        p = directory / rel
        size = _regular_file_size(directory, rel)
        if size != info["size"]:
            raise EdgepackError(f"{p}: {size} bytes, the manifest says {info['size']} (truncated or modified)")
    if verify_digests:
        for rel, info in manifest["files"].items():
            p = directory / rel
            try:
                digest = sha256_file(p)
            except OSError as e:
                raise EdgepackError(f"{p}: cannot read ({e.strerror or e})") from None
            if digest != info["sha256"]:
                raise EdgepackError(f"{p}: sha256 does not match the manifest (the file was modified or corrupted)")
    return manifest, raw


def _regular_file_size(directory: Path, rel: str) -> int:
    """The size of directory/rel, which must be a regular file with no symlink anywhere below `directory`
    (lstat of every component: a link inside the bundle could point anywhere on the user's disk)."""
    here = Path(directory)
    parts = rel.split("/")
    for i, part in enumerate(parts):
        here = here / part
        try:
            st = here.lstat()
        except FileNotFoundError:
            raise EdgepackError(f"{directory / rel}: file listed in the manifest is missing") from None
        except OSError as e:
            raise EdgepackError(f"{here}: cannot read ({e.strerror or e})") from None
        if stat.S_ISLNK(st.st_mode):
            raise EdgepackError(f"{here}: is a symlink; bundles hold regular files only (refused)")
        last = i == len(parts) - 1
        if last and not stat.S_ISREG(st.st_mode):
            raise EdgepackError(f"{here}: not a regular file (devices, FIFOs and directories are refused)")
        if not last and not stat.S_ISDIR(st.st_mode):
            raise EdgepackError(f"{here}: expected a directory")
    return st.st_size


# ---------------------------------------------------------------------------------------------------------
# Archives


def extract_archive(
    archive: Path,
    verify_digests: bool = True,
    cache: Path | None = None,
    max_files: int = MAX_FILES,
    max_total_bytes: int = MAX_TOTAL_BYTES,
) -> Path:
    """Extract a bundle archive safely into the cache (once per archive content) and return the directory."""
    archive = Path(archive)
    try:
        digest = sha256_file(archive)
    except OSError as e:
        raise EdgepackError(f"{archive}: cannot read ({e.strerror or e})") from None
    root = Path(cache) if cache else cache_root()
    target = root / digest[:32]
    if target.exists() or target.is_symlink():
        try:  # the cache is on the user's disk: check it again, and extract afresh if damaged or incomplete
            _checked_directory(target, verify_digests)
            return target
        except EdgepackError:
            _remove_cache_entry(target, root)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise EdgepackError(f"{archive}: not a bundle archive ({str(e)[:200]})") from None
    try:
        with zf:
            return _extract(zf, archive, target, root, verify_digests, max_files, max_total_bytes)
    except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError, ValueError, struct.error) as e:
        raise EdgepackError(f"{archive}: corrupt archive ({str(e)[:200]})") from None
    except OSError as e:  # read-only or full cache directory, or a name the file system refuses
        raise EdgepackError(
            f"{root}: cannot write the bundle cache ({e.strerror or e}); free some space or "
            "set EDGEPACK_CACHE to a writable directory"
        ) from None


def _remove_cache_entry(target: Path, root: Path) -> None:
    try:
        if target.is_symlink() or target.is_file():
            target.unlink()
        else:
            shutil.rmtree(target)
    except OSError as e:
        raise EdgepackError(
            f"{target}: damaged cache entry that cannot be removed ({e.strerror or e}); "
            "delete it by hand or set EDGEPACK_CACHE"
        ) from None


def clean_stale_extractions(root: Path) -> int:
    """Delete temporary extraction directories left by processes that are gone (killed mid-extraction);
    returns how many. Names are .DIGEST.tmp-PID-XXXX (see _extract)."""
    removed = 0
    for tmp in root.glob(".*.tmp-*"):
        try:
            pid = int(tmp.name.split(".tmp-", 1)[1].split("-", 1)[0])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _process_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)
            removed += 1
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _extract(
    zf: zipfile.ZipFile,
    archive: Path,
    target: Path,
    root: Path,
    verify_digests: bool,
    max_files: int,
    max_total_bytes: int,
) -> Path:
    members = _checked_members(zf, archive, max_files, max_total_bytes)
    if MANIFEST_NAME not in members:
        raise EdgepackError(f"{archive}: no {MANIFEST_NAME} in the archive (not an edgepack bundle)")
    info = members[MANIFEST_NAME]
    if info.file_size > MAX_MANIFEST_BYTES:
        raise EdgepackError(f"{archive}!{MANIFEST_NAME}: manifest larger than {MAX_MANIFEST_BYTES >> 20} MiB")
    where = f"{archive}!{MANIFEST_NAME}"
    raw_manifest = _read_capped(zf, info, MAX_MANIFEST_BYTES, archive)
    manifest = validate_manifest(parse_json(raw_manifest, where), where)
    files = manifest["files"]
    extra = sorted(set(members) - set(files) - {MANIFEST_NAME, SIGNATURE_NAME})
    if extra:
        raise EdgepackError(f"{archive}!{extra[0]}: archive member not listed in the manifest")
    for rel, meta in files.items():
        if rel not in members:
            raise EdgepackError(f"{archive}!{rel}: file listed in the manifest is missing from the archive")
        if members[rel].file_size != meta["size"]:
            raise EdgepackError(
                f"{archive}!{rel}: {members[rel].file_size} bytes, the manifest says "
                f"{meta['size']} (truncated or modified)"
            )

    root.mkdir(parents=True, exist_ok=True)
    clean_stale_extractions(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=root))
    try:
        for rel, meta in files.items():
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            written = 0
            # Streamed copy (weights can be large); atomicity comes from renaming the whole directory.
            with zf.open(members[rel]) as src, open(out, "xb") as dst:
                while block := src.read(1 << 20):
                    written += len(block)
                    if written > meta["size"]:
                        raise EdgepackError(f"{archive}!{rel}: longer than the manifest's {meta['size']} bytes")
                    h.update(block)
                    dst.write(block)
            if written != meta["size"]:
                raise EdgepackError(f"{archive}!{rel}: {written} bytes, the manifest says {meta['size']} (truncated)")
            if verify_digests and h.hexdigest() != meta["sha256"]:
                raise EdgepackError(
                    f"{archive}!{rel}: sha256 does not match the manifest (the file was modified or corrupted)"
                )
        with open(tmp / MANIFEST_NAME, "xb") as dst:
            dst.write(raw_manifest)  # the very bytes validated above
        if SIGNATURE_NAME in members:
            with open(tmp / SIGNATURE_NAME, "xb") as dst:
                dst.write(_read_capped(zf, members[SIGNATURE_NAME], MAX_SIGNATURE_BYTES, archive))
        try:
            os.replace(tmp, target)
        except OSError:  # another process extracted the same archive meanwhile
            if not (target / MANIFEST_NAME).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _checked_members(zf: zipfile.ZipFile, archive: Path, max_files: int, max_total: int) -> dict:
    infos = zf.infolist()
    if len(infos) > max_files:
        raise EdgepackError(f"{archive}: {len(infos)} archive members, more than the limit of {max_files}")
    members, total = {}, 0
    for info in infos:
        name = info.filename
        mode = info.external_attr >> 16
        _check_member_name(name.rstrip("/") if info.is_dir() else name, archive)
        if info.flag_bits & 0x1:
            raise EdgepackError(f"{archive}!{name}: archive member is encrypted; bundles are never encrypted")
        if info.is_dir():
            continue
        if info.compress_type != zipfile.ZIP_STORED:
            raise EdgepackError(
                f"{archive}!{name}: archive member is compressed (method {info.compress_type}); "
                "bundle archives store members uncompressed (no expansion, no zip bombs)"
            )
        kind = stat.S_IFMT(mode)  # 0 when the writer stored permissions only (or a non-Unix zip)
        if kind and kind != stat.S_IFREG:
            kind = "a symlink" if kind == stat.S_IFLNK else "not a regular file"
            raise EdgepackError(f"{archive}!{name}: archive member is {kind}; bundles hold regular files only")
        if name in members:
            raise EdgepackError(f"{archive}!{name}: archive member appears twice")
        total += info.file_size
        if total > max_total:
            raise EdgepackError(f"{archive}: more than {max_total} bytes uncompressed, over the limit")
        members[name] = info
    try:
        check_name_clashes(list(members), str(archive), "archive member")
    except EdgepackError as e:
        raise EdgepackError(str(e).replace("manifest field ", "")) from None
    return members


def _check_member_name(name: str, archive: Path) -> None:
    try:
        check_relative_path(name, str(archive), "archive member")
    except EdgepackError:
        raise EdgepackError(
            f"{archive}!{name[:80]!r}: unsafe archive member path (absolute, '..', '\\', control "
            "characters or over-long)"
        ) from None


def archive_with_signature(archive: Path, signature: bytes) -> Path:
    """Re-write a bundle archive with `signature` as its manifest.sig member (right after manifest.json,
    replacing any earlier one), atomically; the signature must verify for the archive's own manifest."""
    from runtime.fileio import atomic_open
    from runtime.signing import verify_signature_bytes

    archive = Path(archive)
    try:
        with zipfile.ZipFile(archive) as src:
            members = _checked_members(src, archive, MAX_FILES + 2, MAX_TOTAL_BYTES)
            if MANIFEST_NAME not in members:
                raise EdgepackError(f"{archive}: no {MANIFEST_NAME} in the archive (not an edgepack bundle)")
            manifest_bytes = _read_capped(src, members[MANIFEST_NAME], MAX_MANIFEST_BYTES, archive)
            verify_signature_bytes(signature, manifest_bytes, f"{archive} (new signature)")
            order = [MANIFEST_NAME, SIGNATURE_NAME] + [n for n in members if n not in (MANIFEST_NAME, SIGNATURE_NAME)]
            with atomic_open(archive) as out, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as dst:
                for name in order:
                    if name == SIGNATURE_NAME:
                        info = zipfile.ZipInfo(SIGNATURE_NAME, date_time=members[MANIFEST_NAME].date_time)
                        info.external_attr = 0o100644 << 16
                        dst.writestr(info, signature)
                        continue
                    old = members[name]
                    info = zipfile.ZipInfo(name, date_time=old.date_time)
                    info.external_attr, info.file_size = old.external_attr, old.file_size
                    with src.open(old) as fi, dst.open(info, "w") as fo:
                        shutil.copyfileobj(fi, fo, 1 << 20)
    except (zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError) as e:
        raise EdgepackError(f"{archive}: corrupt archive ({str(e)[:200]})") from None
    return archive


def _read_capped(zf: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int, archive: Path) -> bytes:
    with zf.open(info) as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise EdgepackError(f"{archive}!{info.filename}: larger than {cap} bytes")
    return data


# ---------------------------------------------------------------------------------------------------------
# Display helpers (also used by the TUI and the CLI)


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_metric(metric: str, value: float) -> str:
    if metric == "ppl":
        return f"{value:.2f}"
    if metric in ("kld", "chat_kld"):
        return f"{value:.4f}"
    return f"{100 * value:.1f} %"


BOOKKEEPING = {"stage", "fingerprint", "input", "input_dir", "seconds", "finished_at", "calibration", "eval", "output"}


def describe_stage(stage: dict, max_items: int = 5) -> str:
    """'depth: remove=2, method=ppl' style one-liner for a recipe stage record: its `settings` when it has
    them, else its own scalar fields, without the pipeline's bookkeeping."""
    name = stage.get("stage", "?")
    source = stage["settings"] if isinstance(stage.get("settings"), dict) else stage
    items = [
        (k, v) for k, v in source.items() if k not in BOOKKEEPING and v is not None and not isinstance(v, (dict, list))
    ][:max_items]
    rest = ", ".join(f"{k}={v}" for k, v in items)
    return f"{name}: {rest}" if rest else name
