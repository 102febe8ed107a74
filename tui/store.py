"""Conversations and prompt history on disk: one JSON file per conversation, written atomically.

Why JSON files and not SQLite: a conversation is read and written whole, there are tens of them, and a
user can read, back up or delete a file by hand. Every write goes through runtime.fileio (temp file +
fsync + rename), so a crash mid-write leaves the previous version intact; the app saves the user's turn
before generating and the partial reply while it streams, so nothing typed is lost.

Where: `--data-dir`, else $EDGEPACK_DATA_DIR, else platformdirs' user data dir for "edgepack".
"""
from __future__ import annotations

import json
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from runtime.errors import EdgepackError
from runtime.fileio import atomic_write_json, atomic_write_text

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
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


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
    def from_dict(cls, d: dict) -> "Conversation":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        conv = cls(**known)
        conv.messages = [m for m in conv.messages if isinstance(m, dict) and m.get("role") in ("user", "assistant")]
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

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = data_dir(root)
        self.conv_dir = self.root / "conversations"
        self.history_path = self.root / "prompt_history.json"
        self.export_dir = self.root / "exports"

    def _path(self, conv_id: str) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", conv_id):
            raise EdgepackError(f"conversation id {conv_id!r}: not a valid file name")
        return self.conv_dir / f"{conv_id}.json"

    def list(self) -> list[Conversation]:
        """All readable conversations, most recently updated first. A damaged file is skipped, not fatal:
        the sidebar must open even if one file was hand-edited badly."""
        out = []
        if not self.conv_dir.is_dir():
            return out
        for p in self.conv_dir.glob("*.json"):
            try:
                out.append(Conversation.from_dict(json.loads(p.read_text(encoding="utf-8"))))
            except (OSError, ValueError, TypeError):
                continue
        out.sort(key=lambda c: (c.updated, c.id), reverse=True)
        return out

    def load(self, conv_id: str) -> Conversation:
        path = self._path(conv_id)
        try:
            return Conversation.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise EdgepackError(f"{path}: conversation not found") from None
        except (ValueError, TypeError) as e:
            raise EdgepackError(f"{path}: damaged conversation file ({e})") from None

    def save(self, conv: Conversation, touch: bool = True) -> Path:
        if touch:
            conv.updated = now_iso()
        return atomic_write_json(self._path(conv.id), conv.to_dict())

    def rename(self, conv: Conversation, title: str) -> None:
        title = " ".join(title.split())
        if not title:
            raise EdgepackError("rename: the title is empty")
        conv.title, conv.titled_by_user = title, True
        self.save(conv, touch=False)

    def delete(self, conv: Conversation) -> None:
        self._path(conv.id).unlink(missing_ok=True)

    def export_markdown(self, conv: Conversation, directory: str | os.PathLike | None = None) -> Path:
        """Write the conversation as a Markdown file; returns its path (never overwrites another export)."""
        directory = Path(directory) if directory else self.export_dir
        slug = re.sub(r"[^A-Za-z0-9]+", "-", conv.title).strip("-").lower()[:40] or "chat"
        path = directory / f"{slug}-{conv.id}.md"
        atomic_write_text(path, conversation_markdown(conv))
        return path

    # Prompt history (shared by all conversations, like a shell's)

    def load_history(self) -> list[str]:
        try:
            items = json.loads(self.history_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        return [s for s in items if isinstance(s, str)] if isinstance(items, list) else []

    def add_history(self, history: list[str], prompt: str) -> list[str]:
        """Append `prompt` (moving a repeat to the end), keep the last HISTORY_LIMIT, save."""
        if not prompt.strip():
            return history
        history = [h for h in history if h != prompt] + [prompt]
        history = history[-HISTORY_LIMIT:]
        atomic_write_json(self.history_path, history)
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
