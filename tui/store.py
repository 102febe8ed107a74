"""Conversations and prompt history on disk: one JSON file per conversation, written atomically.

Why JSON files and not SQLite: a conversation is read and written whole, there are tens of them, and a
user can read, back up or delete a file by hand. Every write goes through runtime.fileio (temp file +
fsync + rename), so a crash mid-write leaves the previous version intact; the app saves the user's turn
before generating and the partial reply while it streams, so nothing typed is lost.

Where: `--data-dir`, else $EDGEPACK_DATA_DIR, else platformdirs' user data dir for "edgepack".

Failures never stop the app: a conversation file that cannot be read or parsed is skipped with a warning
and left on disk untouched (`list_with_warnings`); a write that fails (full disk, read-only directory) is
reported through `on_error` when the app sets it (else raised as one EdgepackError), and the conversation
stays in memory, to be written with its next change.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, UTC
from pathlib import Path

from collections.abc import Callable

from runtime.errors import EdgepackError
from runtime.fileio import atomic_write_json, atomic_write_text, read_json

DATA_DIR_ENV = "EDGEPACK_DATA_DIR"
HISTORY_LIMIT = 500  # prompts kept for the up-arrow history
TITLE_CHARS = 48


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The directory edgepack keeps conversations in (created on first write, not here)."""
    if override:
        return Path(override).expanduser()
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("edgepack", appauthor=False))


def now_iso() -> str:
    return datetime.now(UTC).astimezone().isoformat(timespec="seconds")


def new_id() -> str:
    """Sortable by creation time, unique without coordination."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def title_from(text: str) -> str:
    """A sidebar title from the first user message: its first line, cut at a word boundary."""
    line = " ".join(text.strip().split())
    if len(line) <= TITLE_CHARS:
        return line or "New chat"
    cut = line[:TITLE_CHARS].rsplit(" ", 1)[0] or line[:TITLE_CHARS]
    return cut + "…"


@dataclass
class Conversation:
    """A chat as saved. `messages` are {"role", "content"} dicts plus optional keys the app adds:
    "partial" (a reply cut short by a crash or a stop), "stop_reason", "stats" (ttft_s, tokens_per_s,
    new_tokens, context_used, context_length), "dropped" (messages left out of the context for it)."""

    id: str = field(default_factory=new_id)
    title: str = "New chat"
    created: str = field(default_factory=now_iso)
    updated: str = field(default_factory=now_iso)
    titled_by_user: bool = False
    system_prompt: str | None = None  # None = the bundle's default
    settings: dict = field(default_factory=dict)  # overrides of the bundle's sampling defaults
    bundle: str = ""  # the model it was held with (informative only)
    messages: list[dict] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> Conversation:
        """A conversation from its JSON; a field of the wrong type raises ValueError (the file is skipped)."""
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for key, types in (
            ("id", str),
            ("title", str),
            ("created", str),
            ("updated", str),
            ("titled_by_user", bool),
            ("system_prompt", (str, type(None))),
            ("settings", dict),
            ("bundle", str),
            ("messages", list),
        ):
            if key in known and not isinstance(known[key], types):
                raise ValueError(f"field {key!r} has the wrong type")
        if "id" in known and not re.fullmatch(r"[A-Za-z0-9_.-]+", known["id"]):
            raise ValueError("field 'id' is not a valid file name")
        if "settings" in known:  # sampling overrides: numbers only (anything else would fail at generation)
            known["settings"] = {
                k: v
                for k, v in known["settings"].items()
                if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
            }
        conv = cls(**known)
        conv.messages = [
            m
            for m in conv.messages
            if isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content", ""), str)
        ]
        return conv

    def to_dict(self) -> dict:
        return asdict(self)

    def chat_messages(self) -> list[dict]:
        """Only role and content, as the chat template wants them."""
        return [{"role": m["role"], "content": m.get("content", "")} for m in self.messages]

    def last_reply(self) -> str | None:
        for m in reversed(self.messages):
            if m["role"] == "assistant":
                return m.get("content", "")
        return None


class ConversationStore:
    """Conversations as DIR/conversations/ID.json, prompt history as DIR/prompt_history.json."""

    def __init__(self, root: str | os.PathLike | None = None, on_error: Callable[[str], None] | None = None):
        """on_error(message): called instead of raising when a write fails (the app shows it and goes on)."""
        self.root = data_dir(root)
        self.on_error = on_error
        self.conv_dir = self.root / "conversations"
        self.history_path = self.root / "prompt_history.json"
        self.export_dir = self.root / "exports"

    def _path(self, conv_id: str) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", conv_id):
            raise EdgepackError(f"conversation id {conv_id!r}: not a valid file name")
        return self.conv_dir / f"{conv_id}.json"

    def list(self) -> list[Conversation]:
        """All readable conversations, most recently updated first (see list_with_warnings)."""
        return self.list_with_warnings()[0]

    def list_with_warnings(self) -> tuple[list[Conversation], list[str]]:
        """(readable conversations, most recently updated first; one warning line per file skipped). A
        damaged file is skipped, not fatal, and kept on disk: the sidebar must open even if one file was
        hand-edited badly, and the user may still want to repair it."""
        out, warnings = [], []
        try:
            paths = sorted(self.conv_dir.glob("*.json")) if self.conv_dir.is_dir() else []
        except OSError as e:
            return [], [f"{self.conv_dir}: cannot list conversations ({e.strerror or e})"]
        for p in paths:
            try:
                out.append(self._read(p))
            except EdgepackError as e:
                warnings.append(f"skipped {e} (the file is kept)")
        out.sort(key=lambda c: (c.updated, c.id), reverse=True)
        return out, warnings

    def _read(self, path: Path) -> Conversation:
        try:
            return Conversation.from_dict(read_json(path))
        except (ValueError, TypeError) as e:
            raise EdgepackError(f"{path}: damaged conversation file ({e})") from None

    def load(self, conv_id: str) -> Conversation:
        path = self._path(conv_id)
        if not path.exists():
            raise EdgepackError(f"{path}: conversation not found")
        return self._read(path)

    def _failed(self, what: str, path: Path, e: OSError) -> None:
        message = f"{path}: could not {what} ({e.strerror or e}); it is kept in this window"
        if self.on_error is None:
            raise EdgepackError(message) from None
        self.on_error(message)

    def save(self, conv: Conversation, touch: bool = True) -> Path | None:
        """Write the conversation; None if the write failed (reported through on_error)."""
        if touch:
            conv.updated = now_iso()
        path = self._path(conv.id)
        try:
            return atomic_write_json(path, conv.to_dict())
        except OSError as e:
            self._failed("save the conversation", path, e)
            return None

    def rename(self, conv: Conversation, title: str) -> None:
        title = " ".join(title.split())
        if not title:
            raise EdgepackError("rename: the title is empty")
        conv.title, conv.titled_by_user = title, True
        self.save(conv, touch=False)

    def delete(self, conv: Conversation) -> None:
        path = self._path(conv.id)
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            self._failed("delete the conversation", path, e)

    def export_markdown(self, conv: Conversation, directory: str | os.PathLike | None = None) -> Path | None:
        """Write the conversation as a Markdown file; returns its path (never overwrites another export),
        None if the write failed (reported through on_error)."""
        directory = Path(directory) if directory else self.export_dir
        slug = re.sub(r"[^A-Za-z0-9]+", "-", conv.title).strip("-").lower()[:40] or "chat"
        path = directory / f"{slug}-{conv.id}.md"
        try:
            atomic_write_text(path, conversation_markdown(conv))
        except OSError as e:
            self._failed("export the conversation", path, e)
            return None
        return path

    # Prompt history (shared by all conversations, like a shell's)

    def load_history(self) -> list[str]:
        if not self.history_path.is_file():
            return []
        try:
            items = read_json(self.history_path)
        except EdgepackError:
            return []
        return [s for s in items if isinstance(s, str)] if isinstance(items, list) else []

    def add_history(self, history: list[str], prompt: str) -> list[str]:
        """Append `prompt` (moving a repeat to the end), keep the last HISTORY_LIMIT, save."""
        if not prompt.strip():
            return history
        history = [h for h in history if h != prompt] + [prompt]
        history = history[-HISTORY_LIMIT:]
        try:
            atomic_write_json(self.history_path, history)
        except OSError:
            pass  # the history is a convenience: the conversation's own save reports a full disk
        return history


def conversation_markdown(conv: Conversation) -> str:
    lines = [f"# {conv.title}", ""]
    meta = [f"created {conv.created}"]
    if conv.bundle:
        meta.append(f"model {conv.bundle}")
    lines += ["_" + ", ".join(meta) + "_", ""]
    if conv.system_prompt:
        lines += ["**System**", "", conv.system_prompt.strip(), ""]
    for m in conv.messages:
        who = "You" if m["role"] == "user" else "Assistant"
        note = " _(stopped)_" if m.get("partial") else ""
        lines += [f"**{who}**{note}", "", m.get("content", "").rstrip(), ""]
    return "\n".join(lines).rstrip() + "\n"
