"""The chat's reply handling, with no Textual import: start a reply, stream it (in a worker thread), finish
it (record it with its numbers, or take the turn back when nothing was generated). tui.app is the thin shell
that draws what this module decides; tests drive this module directly (tests/test_reply_controller.py).

Threading: `ReplyController.run` is the worker thread's whole body. It touches only its `Reply`: the
text and counters under `reply.lock`, the rest once, before `reply.done` is set. Everything else (start,
finish, the conversation's messages) runs on the UI thread.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from runtime.errors import EdgepackError
from runtime.generation import ChatSession, GenerationResult, SamplingSettings
from tui.store import Conversation


@dataclass
class ChatMessage:
    """One message of a conversation; `to_dict` is the store's JSON layout (tui.store)."""

    role: Literal["user", "assistant"]
    content: str = ""
    partial: bool = False  # still being written, or stopped before its end
    stop_reason: str | None = None  # runtime.generation.STOP_REASONS
    stats: dict | None = None  # ttft_s, tokens_per_s, new_tokens, prompt_tokens, cached_tokens, context_*
    dropped: int = 0  # oldest messages left out of the context for this reply
    error: str | None = None  # the engine failed after writing part of the reply

    def to_dict(self) -> dict:
        d: dict = {"role": self.role, "content": self.content}
        if self.partial:
            d["partial"] = True
        for key in ("stop_reason", "stats", "dropped", "error"):
            if getattr(self, key):
                d[key] = getattr(self, key)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ChatMessage:
        return cls(
            role=d["role"],
            content=d.get("content", ""),
            partial=bool(d.get("partial")),
            stop_reason=d.get("stop_reason"),
            stats=d.get("stats"),
            dropped=int(d.get("dropped") or 0),
            error=d.get("error"),
        )


@dataclass
class Reply:
    """One reply being generated. The worker writes `parts`/`pending`/counters under `lock`."""

    conv: Conversation
    message: ChatMessage
    record: dict  # the message's dict in conv.messages (what the store saves), kept in step by sync()
    settings: SamplingSettings
    user_text: str | None  # None: regenerate the reply to the last user message
    cancel: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    parts: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    result: GenerationResult | None = None  # from the stream's final event
    error: str | None = None
    done: bool = False  # the worker finished
    finished: bool = False  # finish() ran

    @property
    def text(self) -> str:
        with self.lock:
            return "".join(self.parts)

    def take_pending(self) -> str:
        """The text streamed since the last call (the UI draws it)."""
        with self.lock:
            chunk = "".join(self.pending)
            self.pending.clear()
        return chunk

    def sync(self) -> None:
        """Copy the message into its dict in the conversation (before the store saves it)."""
        self.record.clear()
        self.record.update(self.message.to_dict())


@dataclass
class Progress:
    """What the status line shows while a reply is written."""

    state: Literal["stopping", "reading", "writing"]
    tokens: int = 0
    ttft_s: float = 0.0
    tokens_per_s: float = 0.0


@dataclass
class Finished:
    """What finish() decided, for the UI to draw."""

    recorded: bool  # False: nothing was generated and the turn was taken back
    user_removed: bool = False  # the user's message was taken back too (its text goes back to the input)
    error: str | None = None
    note: tuple[str, str] | None = None  # (text, kind) shown after the reply


class ReplyController:
    """Starts, runs and finishes replies of one ChatSession; owns the context figure the status line shows."""

    def __init__(self, session: ChatSession):
        self.session = session
        self.context_used = 0  # tokens of the last prompt + its reply (or an estimate for a loaded chat)

    @property
    def context_length(self) -> int:
        return self.session.context_length

    def start(
        self, conv: Conversation, settings: SamplingSettings, system_prompt: str | None, user_text: str | None
    ) -> Reply:
        """Append the (empty, partial) assistant message to `conv` and hand the history to the session.
        `user_text`: the user's message, already the last one in `conv`; None regenerates."""
        history = conv.chat_messages()
        if user_text is not None:
            history = history[:-1]  # stream_reply appends the user message itself
        message = ChatMessage("assistant", partial=True)
        record = message.to_dict()
        conv.messages.append(record)
        self.session.system_prompt = system_prompt
        self.session.messages = history
        return Reply(conv=conv, message=message, record=record, settings=settings, user_text=user_text)

    def run(self, reply: Reply) -> None:
        """The worker thread: stream the reply into `reply`. Never raises; errors land in reply.error."""
        session = self.session
        try:
            if reply.user_text is not None:
                stream = session.stream_reply(reply.user_text, reply.settings, reply.cancel)
            else:
                stream = session.regenerate(reply.settings, reply.cancel)
            for event in stream:
                now = time.perf_counter()
                with reply.lock:
                    if event.token_id >= 0:
                        reply.tokens += 1
                        if reply.first_token is None:
                            reply.first_token = now
                    if event.text:
                        reply.parts.append(event.text)
                        reply.pending.append(event.text)
                if event.result is not None:
                    reply.result = event.result
        except EdgepackError as e:
            reply.error = str(e)
        except Exception as e:  # noqa: BLE001 - an engine failure must not take the conversation with it
            reply.error = f"{type(e).__name__}: {e}"
        finally:
            if reply.result is None and reply.parts:
                # The engine failed mid-reply, so the stream had no final event: keep what was written, with
                # the generator's record of it (runtime.generation keeps last_result for this case).
                reply.result = session.generator.last_result
            reply.done = True

    def progress(self, reply: Reply) -> Progress:
        with reply.lock:
            tokens, first = reply.tokens, reply.first_token
        if reply.cancel.is_set():
            return Progress("stopping", tokens)
        if first is None:
            return Progress("reading")
        elapsed = time.perf_counter() - first
        rate = (tokens - 1) / elapsed if elapsed > 0 and tokens > 1 else 0.0
        return Progress("writing", tokens, first - reply.started, rate)

    def finish(self, reply: Reply) -> Finished:
        """Record the reply with its numbers, or take the turn back if nothing was generated. Updates the
        conversation's messages only; the caller saves, draws and tells. Idempotent per reply."""
        if reply.finished:
            raise EdgepackError("finish: this reply was already finished")
        reply.finished = True
        conv, result = reply.conv, reply.result
        if result is None:  # failed before generating anything: take the turn back, keep the text
            conv.messages.remove(reply.record)
            user_removed = False
            if reply.user_text is not None and conv.messages and conv.messages[-1]["role"] == "user":
                conv.messages.pop()
                user_removed = True
            return Finished(recorded=False, user_removed=user_removed, error=reply.error or "generation failed")
        self.context_used = result.context_used
        m = reply.message
        m.content, m.stop_reason, m.partial = result.text, result.stop_reason, result.stop_reason == "cancelled"
        m.stats = {
            "ttft_s": round(result.ttft_s, 4),
            "tokens_per_s": round(result.decode_tokens_per_s, 2),
            "new_tokens": result.new_tokens,
            "prompt_tokens": result.prompt_tokens,
            "cached_tokens": result.cached_tokens,
            "context_used": result.context_used,
            "context_length": self.context_length,
        }
        m.dropped, m.error = result.dropped_messages, reply.error
        reply.sync()
        return Finished(recorded=True, error=reply.error, note=reply_note(m))

    def estimate_context(self, conv: Conversation, system_prompt: str | None) -> int:
        """Tokens a loaded conversation occupies: its last reply's record, else its rendered prompt."""
        last = next((m for m in reversed(conv.messages) if m["role"] == "assistant" and m.get("stats")), None)
        if last is not None and last is conv.messages[-1]:
            self.context_used = int(last["stats"].get("context_used", 0))
        elif not conv.messages:
            self.context_used = 0
        else:
            try:
                self.session.system_prompt = system_prompt
                self.context_used = len(self.session.build_prompt(conv.chat_messages(), 1)[0])
            except EdgepackError:
                self.context_used = 0
        return self.context_used


def dropped_text(n: int, ctx: int) -> str:
    what = "message" if n == 1 else "messages"
    return f"⚠ context full: the {n} oldest {what} no longer fit in the {ctx:,}-token context and were left out"


def reply_note(message: ChatMessage) -> tuple[str, str] | None:
    """The note under a reply, as (text, kind), or None."""
    reason = message.stop_reason
    if message.error:
        return f"✗ generation failed: {message.error}", "error"
    if reason == "cancelled":
        return "■ stopped", "info"
    if reason == "context_full":
        return "⚠ the reply filled the context and was cut", "warning"
    if reason == "max_tokens":
        n = (message.stats or {}).get("new_tokens")
        return f"… cut at {n} tokens, the max new tokens (Ctrl+S to change)", "info"
    if message.partial and reason is None:
        return "■ interrupted (the app stopped while writing)", "warning"
    return None
