"""Atomic file writes and digests.

Every file edgepack writes goes through here: write to a temporary file in the same directory,
fsync, then rename over the target, so a crash or Ctrl-C never leaves a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_open(path: str | os.PathLike):
    """Binary file handle on a temporary sibling of `path`; flushed, fsynced and renamed over `path` when
    the block succeeds, deleted when it fails. For large outputs written in pieces (archives)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w+b") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_open(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


MAX_JSON_BYTES = 64 << 20  # tokenizer.json of a large vocabulary is ~10-20 MB
MAX_JSON_DEPTH = 64  # bundles' JSON files nest a handful of levels; deeper is a nesting bomb


def read_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES, finite: bool = False) -> Any:
    """Read a JSON file as untrusted input; every problem (missing, not a regular file, too large, not
    UTF-8, malformed, nested deeper than MAX_JSON_DEPTH, and with finite=True NaN/Infinity) raises one
    EdgepackError naming it. NaN/Infinity are accepted by default: edgepack's own records may hold them
    (a diverged evaluation), and json.dumps writes them."""
    return parse_json(_read_capped(path, max_bytes), str(path), finite=finite)


def check_json_text(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES) -> None:
    """read_json's checks short of building the Python objects: for a file another parser reads next (such as
    tokenizer.json, read by the tokenizers library, whose own errors the caller turns into one line)."""
    _checked_text(_read_capped(path, max_bytes), str(path))


def _read_capped(path: str | os.PathLike, max_bytes: int) -> bytes:
    from runtime.errors import EdgepackError

    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise EdgepackError(f"{path}: not a regular file")
        if st.st_size > max_bytes:
            raise EdgepackError(f"{path}: {st.st_size} bytes, more than the {max_bytes >> 20} MiB allowed for JSON")
        with open(path, "rb") as f:
            return f.read(max_bytes + 1)
    except FileNotFoundError:
        raise EdgepackError(f"{path}: file not found") from None
    except OSError as e:
        raise EdgepackError(f"{path}: cannot read ({e.strerror or e})") from None


def _checked_text(data: bytes | str, where: str) -> str:
    """Strict UTF-8, nested at most MAX_JSON_DEPTH levels (checked on the text, before any parser sees it)."""
    from runtime.errors import EdgepackError

    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    except UnicodeDecodeError as e:
        raise EdgepackError(f"{where}: not valid UTF-8 (byte {e.start})") from None
    if json_depth(text) > MAX_JSON_DEPTH:
        raise EdgepackError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return text


def parse_json(data: bytes | str, where: str, finite: bool = True) -> Any:
    """json.loads for untrusted bytes: strict UTF-8, at most MAX_JSON_DEPTH levels of nesting (checked on
    the text first, so a nesting bomb never reaches the recursive parser), integers of more than 4300
    digits refused, and with finite=True (the default: manifests, signatures, ONNX metadata) no NaN,
    Infinity or numbers that overflow a float; errors are one EdgepackError line naming `where`."""
    from runtime.errors import EdgepackError

    text = _checked_text(data, where)

    def no_constant(name):
        raise ValueError(f"{name} is not allowed")

    def finite_float(s):
        value = float(s)
        if not math.isfinite(value):
            raise ValueError(f"number {s[:20]} is out of range")
        return value

    try:
        if not finite:
            return json.loads(text)
        return json.loads(text, parse_constant=no_constant, parse_float=finite_float)
    except json.JSONDecodeError as e:
        raise EdgepackError(f"{where}: malformed JSON ({e.msg} at line {e.lineno})") from None
    except (ValueError, RecursionError) as e:  # NaN/Infinity, integers of more than 4300 digits
        raise EdgepackError(f"{where}: malformed JSON ({str(e).splitlines()[0][:120]})") from None


def json_depth(text: str) -> int:
    """The deepest nesting of [ and { outside strings. Written by hand because the json module has no depth
    limit (it recurses until RecursionError). One regex pass cuts out the strings (escapes included) and
    numpy sums the brackets left, so a 33 MB tokenizer.json (Gemma's 262k vocabulary) takes ~0.3 s, not the
    ~2.4 s of a Python loop over its million brackets. A string left open runs to the end of the text (as
    every JSON parser reads it): requiring the closing quote made the regex retry from every later quote,
    quadratic time on crafted text such as '"' followed by many '\\"'."""
    import re

    import numpy as np

    strings = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.S)
    bare = np.frombuffer(strings.sub("", text).encode("utf-8"), np.uint8)
    step = ((bare == ord("[")) | (bare == ord("{"))).view(np.int8) - ((bare == ord("]")) | (bare == ord("}"))).view(
        np.int8
    )
    return int(np.cumsum(step[step != 0], dtype=np.int64).max(initial=0))


@contextmanager
def atomic_directory(out_dir: str | os.PathLike):
    """Yield a fresh sibling directory that replaces `out_dir` only when the block succeeds.

    For outputs written by other libraries (save_pretrained, gptqmodel) that cannot go through
    atomic_write_*: everything lands in the staging directory and is published with one rename; a crash
    leaves the previous `out_dir` (or none) and a `.staging` folder that the next call deletes."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
