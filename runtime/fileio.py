"""Atomic file writes and digests.

Every file edgepack writes goes through here: write to a temporary file in the same directory,
fsync, then rename over the target, so a crash or Ctrl-C never leaves a half-written file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
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


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a missing or malformed file raises EdgepackError naming it."""
    from runtime.errors import EdgepackError

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise EdgepackError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise EdgepackError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None


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
