"""The chat screen's widgets: prompt box, message views, sidebar, status line."""

from __future__ import annotations

from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.widgets import Label, ListItem, ListView, Markdown, Static, TextArea

# Keys that insert a newline instead of sending. What a terminal delivers: Enter is CR ("enter");
# Ctrl+J is LF ("ctrl+j") everywhere; Shift+Enter is only distinct in terminals speaking the kitty keyboard
# protocol (kitty, WezTerm, foot, Ghostty, iTerm2 with CSI u), elsewhere it arrives as a plain Enter;
# Alt+Enter arrives as ESC CR ("alt+enter") in most terminals, but some window managers take it.
NEWLINE_KEYS = ("shift+enter", "ctrl+j", "newline", "alt+enter")


class PromptInput(TextArea):
    """Multi-line prompt: Enter sends, Shift+Enter / Ctrl+J / Alt+Enter insert a newline, Up on the first
    line and Down on the last line walk the prompt history (the draft being typed is kept)."""

    class Submitted(Message):
        def __init__(self, prompt_input: PromptInput, text: str):
            super().__init__()
            self.prompt_input, self.text = prompt_input, text

    def __init__(self, history: list[str] | None = None, **kwargs):
        kwargs.setdefault("soft_wrap", True)
        kwargs.setdefault("show_line_numbers", False)
        kwargs.setdefault("tab_behavior", "focus")
        kwargs.setdefault("compact", True)
        super().__init__(**kwargs)
        self.prompts: list[str] = list(history or [])
        self._pos: int | None = None  # index into history while browsing it, None while editing a draft
        self._draft = ""

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            text = self.text
            if text.strip():
                self.post_message(self.Submitted(self, text))
            return
        if event.key in NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            if not self.read_only:
                start, end = self.selection
                self._replace_via_keyboard("\n", start, end)
            return
        # everything else: TextArea's own handler (it runs next in the MRO unless prevented)

    def _show(self, text: str) -> None:
        self.load_text(text)
        last = self.document.line_count - 1
        self.move_cursor((last, len(self.document[last])))

    def action_cursor_up(self, select: bool = False) -> None:
        if not select and self.prompts and self.navigator.is_first_wrapped_line(self.cursor_location):
            if self._pos is None:
                self._draft, self._pos = self.text, len(self.prompts) - 1
            elif self._pos > 0:
                self._pos -= 1
            else:
                return
            self._show(self.prompts[self._pos])
            return
        super().action_cursor_up(select)

    def action_cursor_down(self, select: bool = False) -> None:
        if not select and self._pos is not None and self.navigator.is_last_wrapped_line(self.cursor_location):
            self._pos += 1
            if self._pos >= len(self.prompts):
                self._pos = None
                self._show(self._draft)
            else:
                self._show(self.prompts[self._pos])
            return
        super().action_cursor_down(select)

    def take(self) -> str:
        """The text to send; clears the box and leaves history browsing."""
        text = self.text
        self.clear()
        self._pos, self._draft = None, ""
        return text


class UserMessage(Static):
    """What the user typed, shown verbatim (not as Markdown: a prompt is not a document)."""

    def __init__(self, text: str, **kwargs):
        super().__init__(Text(text), **kwargs)


class AssistantMessage(Markdown):
    """A reply rendered as Markdown (fenced code is highlighted by Textual's Markdown widget). Links are
    not opened on click: a model's output should not start a browser on its own."""

    def __init__(self, markdown: str | None = None, **kwargs):
        super().__init__(markdown, open_links=False, **kwargs)


class Note(Static):
    """A one-line remark in the log: stopped replies, context dropped, errors."""

    def __init__(self, text: str, kind: str = "info", **kwargs):
        super().__init__(Text(text), classes=f"note {kind}", **kwargs)


class ConversationList(ListView):
    """The sidebar: conversations, most recent first."""

    BINDINGS = [
        Binding("r,f2", "app.rename", "Rename", show=False),
        Binding("d,delete,f8", "app.delete", "Delete", show=False),
        Binding("e,f3", "app.export", "Export", show=False),
        Binding("n", "app.new_chat", "New", show=False),
    ]

    def set_conversations(self, items: list[tuple[str, str]], current: str | None):
        """items: (conversation id, title). Rebuilds the list; returns the AwaitComplete of the rebuild."""
        self.ids = [cid for cid, _ in items]
        index = self.ids.index(current) if current in self.ids else None
        self.clear()
        self.extend(ListItem(Label(Text(title, no_wrap=True, overflow="ellipsis"))) for _, title in items)
        self.index = index


class StatusBar(Static):
    """One line: model state, time to first token, speed, context used / context length, quality."""
