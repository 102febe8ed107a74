"""edgepack chat: a private, offline chat with a bundle in the terminal (Textual).

This module is the shell: layout, keys, drawing. What a reply is and how it starts, streams, finishes or
is taken back lives in tui.reply (no Textual there), which the tests drive directly.

Threading: generation runs in a worker thread (tui.reply.ReplyController.run) and never touches a widget.
It appends text to the reply's buffer under a lock; a 50 ms timer on the UI thread drains the buffer into a
MarkdownStream, so the keyboard stays responsive however fast tokens come, and the view is redrawn at most
~20 times a second. Esc sets the reply's `cancel` event; the generator checks it before every token.

Durability: the user's message is saved before generation starts, the partial reply every second while it
streams, and the final reply (or what was written when stopped) at the end. Files are written atomically
(tui.store), so a crash or power loss costs at most the last second of a reply.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, replace

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Footer, Header, Label, Markdown, Static
from textual.worker import WorkerFailed

from runtime.errors import EdgepackError
from runtime.generation import ChatSession, SamplingSettings
from tui.reply import ChatMessage, Reply, ReplyController, dropped_text, reply_note
from tui.screens import ConfirmScreen, HelpScreen, ModelScreen, RenameScreen, SettingsScreen
from tui.store import Conversation, ConversationStore, title_from
from tui.widgets import AssistantMessage, ConversationList, Note, PromptInput, StatusBar, UserMessage

FLUSH_S = 0.05  # how often streamed text is drawn
SAVE_S = 1.0  # how often a streaming reply is saved
SIDEBAR_MIN_WIDTH = 100  # terminal columns from which the conversation list is shown at start


@dataclass
class ReplyView:
    """The widgets of the reply being written (UI thread only)."""

    widget: AssistantMessage
    stream: object  # Textual's MarkdownStream into `widget`
    worker: object = None
    last_save: float = 0.0
    dropped_note: bool = False


@dataclass
class VerifyState:
    """The background verification's state, read by the model panel and the status bar."""

    running: bool = False
    done: int = 0
    total: int = 0
    step: str = ""
    checks: list | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return sum(not getattr(c, "passed", False) for c in self.checks or [])

    def summary(self) -> Text:
        if self.running:
            count = f" {self.done}/{self.total}" if self.total else ""
            return Text(f"verifying{count} {self.step}".rstrip() + " …", style="yellow")
        if self.error:
            return Text(f"verification failed to run: {self.error}", style="bold red")
        if self.checks is None:
            return Text("not verified on this machine yet: press v to re-measure (quick)", style="dim")
        if not self.checks:
            return Text("the bundle claims no quality metrics to check", style="yellow")
        if self.failed:
            return Text(
                f"✗ {self.failed} of {len(self.checks)} metrics outside tolerance ({self.seconds:.0f} s)",
                style="bold red",
            )
        return Text(f"✓ all {len(self.checks)} metrics within tolerance ({self.seconds:.0f} s)", style="bold green")

    def badge(self) -> Text:
        if self.running:
            return Text(f"verifying {self.done}/{self.total}" if self.total else "verifying", style="yellow")
        if self.error:
            return Text("verify error", style="red")
        if self.checks is None:
            return Text("unverified", style="dim")
        if self.failed:
            return Text(f"✗ {self.failed} failed", style="bold red")
        return Text("✓ verified", style="green")


class ReplyDone(Message):
    def __init__(self, job: Reply):
        super().__init__()
        self.job = job


class VerifyDone(Message):
    pass


class ChatApp(App[int]):
    """The chat. `bundle` needs: describe(), sampling_defaults(), system_prompt, tokenizer, generator(threads).
    `generator` (optional) is used instead of bundle.generator(); `verify_fn` defaults to
    runtime.verify.verify_bundle."""

    CSS_PATH = "app.tcss"
    TITLE = "edgepack chat"
    BINDINGS = [
        Binding("escape", "stop", "Stop", show=False),  # the status line says "Esc stops" while writing
        Binding("ctrl+n", "new_chat", "New"),
        Binding("ctrl+r", "regenerate", "Regen"),
        Binding("ctrl+s", "settings", "Settings"),
        Binding("ctrl+o", "model", "Model"),
        Binding("ctrl+b", "toggle_sidebar", "Chats"),
        Binding("f1,question_mark", "help", "Help"),
        Binding("ctrl+l", "copy_reply", "Copy reply", show=False),
        Binding("f2", "rename", "Rename", show=False),
        Binding("f3", "export", "Export", show=False),
        Binding("f8", "delete", "Delete", show=False),
    ]

    def __init__(self, bundle, store: ConversationStore, generator=None, threads: int | None = None, verify_fn=None):
        super().__init__()
        self.bundle, self.store, self.verify_fn = bundle, store, verify_fn
        self.info = bundle.describe()
        self.generator = generator if generator is not None else chat_generator(bundle, threads)
        self.defaults: SamplingSettings = bundle.sampling_defaults()
        self.default_system_prompt: str | None = bundle.system_prompt
        self.session = ChatSession(self.generator, bundle.tokenizer, self.default_system_prompt)
        self.replies = ReplyController(self.session)
        self.conversations: list[Conversation] = []
        self.conv = self._new_conversation()
        self.job: Reply | None = None
        self.view: ReplyView | None = None
        self.verify_state = VerifyState()
        self._flush_timer = None
        self.sub_title = str(self.info.get("name", ""))

    # ------------------------------------------------------------------------------------------------
    # Layout

    def compose(self) -> ComposeResult:
        yield Header(icon="◆")
        with Horizontal(id="body"):
            with Vertical(id="sidebar"):
                yield Label(Text.assemble(("Chats", "bold"), ("  ^n new · ^b hide", "dim")), id="sidebar-title")
                yield ConversationList(id="chats")
                yield Static("No saved chats yet: the first message you send starts one.", id="no-chats")
            with Vertical(id="main"):
                yield VerticalScroll(id="log")
                yield PromptInput(
                    history=self.store.load_history(),
                    id="prompt",
                    placeholder="Message · Enter send · Ctrl+J new line · F1 keys",
                )
        yield StatusBar(id="status")
        yield Footer()

    async def on_mount(self) -> None:
        # The list starts hidden on narrow terminals (80 columns leave the chat too little room): Ctrl+B.
        self.query_one("#sidebar").display = self.size.width >= SIDEBAR_MIN_WIDTH
        # A failed write (full disk) is shown and the app goes on; unreadable files are skipped, kept, and named.
        self.store.on_error = lambda message: self._say(message, title="Not saved", severity="error", timeout=10)
        self.conversations, skipped = self.store.list_with_warnings()
        for warning in skipped:
            self._say(warning, title="Conversation skipped", severity="warning", timeout=10)
        if self.conversations:
            self.conv = self.conversations[0]
        await self._show_conversation(self.conv)
        self._refresh_sidebar()
        self.query_one("#prompt", PromptInput).focus()

    @property
    def log_view(self) -> VerticalScroll:
        return self.query_one("#log", VerticalScroll)

    @property
    def prompt_input(self) -> PromptInput:
        return self.query_one("#prompt", PromptInput)

    def _new_conversation(self) -> Conversation:
        return Conversation(bundle=str(self.info.get("name", "")))

    def _settings(self, conv: Conversation) -> SamplingSettings:
        known = {k: v for k, v in conv.settings.items() if k in SamplingSettings.__dataclass_fields__}
        return replace(self.defaults, **known)

    def _system_prompt(self, conv: Conversation) -> str | None:
        return self.default_system_prompt if conv.system_prompt is None else (conv.system_prompt or None)

    def _refresh_sidebar(self) -> None:
        items = [(c.id, c.title) for c in self.conversations]
        self.query_one(ConversationList).set_conversations(items, self.conv.id)
        self.query_one("#no-chats").display = not items

    async def _show_conversation(self, conv: Conversation) -> None:
        """Rebuild the log from a conversation's messages."""
        self.conv = conv
        log = self.log_view
        await log.remove_children()
        widgets = []
        for m in conv.messages:
            if m["role"] == "user":
                widgets.append(UserMessage(m.get("content", "")))
                continue
            message = ChatMessage.from_dict(m)
            if message.dropped:
                widgets.append(Note(dropped_text(message.dropped, self.generator.context_length), "warning"))
            widgets.append(AssistantMessage(message.content))
            note = reply_note(message)
            if note:
                widgets.append(Note(*note))
        if not widgets:
            widgets.append(Note(_welcome(self.info), "welcome"))
        await log.mount_all(widgets)
        log.anchor()  # stick to the newest message (Textual then also aligns a short chat to the bottom)
        self.replies.estimate_context(conv, self._system_prompt(conv))
        self._update_status()

    # ------------------------------------------------------------------------------------------------
    # Status line

    def _update_status(self) -> None:
        ctx_len = self.generator.context_length
        parts: list[Text] = []
        if self.job is not None:
            progress = self.replies.progress(self.job)
            if progress.state == "stopping":
                parts.append(Text("■ stopping", style="bold yellow"))
            elif progress.state == "reading":
                parts.append(Text("● reading the prompt (Esc stops)", style="bold yellow"))
            else:
                parts.append(Text(f"● writing {progress.tokens} tok (Esc stops)", style="bold yellow"))
                parts.append(Text(f"TTFT {progress.ttft_s:.2f} s"))
                if progress.tokens_per_s:
                    parts.append(Text(f"{progress.tokens_per_s:.1f} tok/s"))
            used = self.replies.context_used + progress.tokens
        else:
            stats = next(
                (m.get("stats") for m in reversed(self.conv.messages) if m["role"] == "assistant" and m.get("stats")),
                None,
            )
            if stats:
                parts.append(Text(f"TTFT {stats.get('ttft_s', 0):.2f} s"))
                parts.append(Text(f"{stats.get('tokens_per_s', 0):.1f} tok/s"))
            else:
                parts.append(Text("ready", style="green"))
            used = self.replies.context_used
        frac = used / ctx_len if ctx_len else 0
        parts.append(Text(f"ctx {used:,}/{ctx_len:,}", style="bold red" if frac > 0.9 else ""))
        parts.append(self.verify_state.badge())
        self.query_one(StatusBar).update(Text(" · ").join(parts))

    # ------------------------------------------------------------------------------------------------
    # Sending and streaming

    @on(PromptInput.Submitted)
    async def _submitted(self, event: PromptInput.Submitted) -> None:
        if self.job is not None:
            self._say("A reply is being written: Esc stops it.", severity="warning")
            return
        text = self.prompt_input.take()
        prompt = self.prompt_input
        prompt.prompts = self.store.add_history(prompt.prompts, text)
        conv = self.conv
        conv.messages.append({"role": "user", "content": text})
        if not conv.titled_by_user and conv.title == "New chat":
            conv.title = title_from(text)
        self.store.save(conv)  # the user's turn is on disk before any generation
        if conv not in self.conversations:
            self.conversations.insert(0, conv)
        else:  # most recent first
            self.conversations.remove(conv)
            self.conversations.insert(0, conv)
        self._refresh_sidebar()
        for note in self.log_view.query(".welcome"):
            await note.remove()
        await self.log_view.mount(UserMessage(text))
        await self._start_reply(user_text=text)

    async def _start_reply(self, user_text: str | None) -> None:
        conv = self.conv
        job = self.replies.start(conv, self._settings(conv), self._system_prompt(conv), user_text)
        widget = AssistantMessage(classes="streaming")
        await self.log_view.mount(widget)
        self.log_view.anchor()
        self.job, self.view = job, ReplyView(widget, Markdown.get_stream(widget), last_save=time.perf_counter())
        self._flush_timer = self.set_interval(FLUSH_S, self._flush_reply)
        self.view.worker = self._generate(job)
        self.refresh_bindings()
        self._update_status()

    @work(thread=True, group="reply", exit_on_error=False)
    def _generate(self, job: Reply) -> None:
        """Worker thread: runs the reply (tui.reply), touches no widget."""
        try:
            self.replies.run(job)
        finally:
            self.post_message(ReplyDone(job))

    async def _flush_reply(self) -> None:
        """Timer on the UI thread: draw what the worker produced since the last flush; save now and then."""
        job, view = self.job, self.view
        if job is None or job.finished:
            return
        chunk = job.take_pending()
        if chunk:
            await view.stream.write(chunk)
            job.message.content = job.text
            job.sync()
            if time.perf_counter() - view.last_save >= SAVE_S:
                view.last_save = time.perf_counter()
                self.store.save(job.conv)
        self._update_status()

    @on(ReplyDone)
    async def _reply_done(self, event: ReplyDone) -> None:
        await self._finish_reply(event.job)

    async def _finish_reply(self, job: Reply) -> None:
        """Draw the rest, then let tui.reply record the reply (or take the turn back); save and show the
        outcome. Idempotent (called on ReplyDone and when a conversation switch waits for a stopped reply)."""
        if job.finished:
            return
        view = self.view
        if self._flush_timer is not None:
            self._flush_timer.stop()
            self._flush_timer = None
        chunk = job.take_pending()
        if chunk:
            await view.stream.write(chunk)
        await view.stream.stop()
        view.widget.remove_class("streaming")
        shown = view.widget.is_attached and job.conv is self.conv
        outcome = self.replies.finish(job)
        if outcome.recorded:
            self.store.save(job.conv)
            if shown:
                await self._draw_reply_notes(job, view)
        else:
            await self._take_back(job, view, shown, outcome.user_removed)
            self._say(outcome.error, title="Not sent", severity="error", timeout=8)
        if self.job is job:
            self.job, self.view = None, None
        self.refresh_bindings()
        self._update_status()

    async def _draw_reply_notes(self, job: Reply, view: ReplyView) -> None:
        if job.message.dropped and not view.dropped_note:
            view.dropped_note = True
            await self.log_view.mount(
                Note(dropped_text(job.message.dropped, self.generator.context_length), "warning"), before=view.widget
            )
        note = reply_note(job.message)
        if note:
            await self.log_view.mount(Note(*note), after=view.widget)

    async def _take_back(self, job: Reply, view: ReplyView, shown: bool, user_removed: bool) -> None:
        """Nothing was generated: remove the reply (and the user's turn, whose text goes back to the input)."""
        conv = job.conv
        if shown:
            await view.widget.remove()
            if user_removed:
                users = self.log_view.query(UserMessage)
                if users:
                    await users.last().remove()
                if not self.prompt_input.text.strip():
                    self.prompt_input.load_text(job.user_text)
        if conv.messages:
            self.store.save(conv)
        else:
            self.store.delete(conv)
            if conv in self.conversations:
                self.conversations.remove(conv)
            self._refresh_sidebar()

    async def _stop_reply(self) -> None:
        """Stop the running reply and wait until it is recorded (before switching conversations)."""
        job = self.job
        if job is None:
            return
        job.cancel.set()
        try:
            await self.view.worker.wait()
        except WorkerFailed:
            pass
        await self._finish_reply(job)

    # ------------------------------------------------------------------------------------------------
    # Actions

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "regenerate":
            return None if self.job is not None or not any(m["role"] == "user" for m in self.conv.messages) else True
        return True

    def action_stop(self) -> None:
        if self.job is not None:
            self.job.cancel.set()
            self._update_status()
        else:
            self.prompt_input.focus()

    async def action_regenerate(self) -> None:
        if self.job is not None:
            return
        conv = self.conv
        if not any(m["role"] == "user" for m in conv.messages):
            self._say("Nothing to regenerate yet.", severity="warning")
            return
        if conv.messages[-1]["role"] == "assistant":
            conv.messages.pop()
            # remove the last reply's widgets (the reply and its notes after the last user message)
            children = list(self.log_view.children)
            last_user = max(i for i, w in enumerate(children) if isinstance(w, UserMessage))
            for w in children[last_user + 1 :]:
                await w.remove()
        await self._start_reply(user_text=None)

    def action_copy_reply(self) -> None:
        text = self.conv.last_reply()
        if not text:
            self._say("No reply to copy yet.", severity="warning")
            return
        self.copy_to_clipboard(text)
        self._say(f"Copied the last reply ({len(text)} characters).")

    async def action_new_chat(self) -> None:
        await self._stop_reply()
        await self._show_conversation(self._new_conversation())
        self._refresh_sidebar()
        self.prompt_input.focus()

    def action_toggle_sidebar(self) -> None:
        sidebar = self.query_one("#sidebar")
        sidebar.display = not sidebar.display
        chats = self.query_one(ConversationList)
        if sidebar.display and self.conversations:
            chats.focus()
        else:
            self.prompt_input.focus()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_model(self) -> None:
        if not isinstance(self.screen, ModelScreen):
            self.push_screen(ModelScreen(self.info))

    def action_settings(self) -> None:
        conv = self.conv

        def apply(result: dict | None) -> None:
            if result is None:
                return
            conv.system_prompt = result["system_prompt"] or ""
            if conv.system_prompt == (self.default_system_prompt or ""):
                conv.system_prompt = None  # follows the bundle's default
            conv.settings = result["settings"]
            if conv.messages:
                self.store.save(conv, touch=False)
            self._say("Settings saved for this conversation.")
            self._update_status()

        self.push_screen(
            SettingsScreen(self._system_prompt(conv), self._settings(conv), self.defaults, self.default_system_prompt),
            apply,
        )

    def _target(self) -> Conversation | None:
        """The conversation an action applies to: the highlighted one while the list has focus."""
        sidebar = self.query_one(ConversationList)
        if self.focused is sidebar and sidebar.index is not None and sidebar.index < len(self.conversations):
            return self.conversations[sidebar.index]
        return self.conv if self.conv in self.conversations else None

    def action_rename(self) -> None:
        conv = self._target()
        if conv is None:
            self._say("Send a message first: an empty chat is not saved.", severity="warning")
            return

        def apply(title: str | None) -> None:
            if title:
                self.store.rename(conv, title)
                self._refresh_sidebar()

        self.push_screen(RenameScreen(conv.title), apply)

    def action_export(self) -> None:
        conv = self._target()
        if conv is None:
            self._say("Nothing to export yet.", severity="warning")
            return
        path = self.store.export_markdown(conv)
        if path is not None:
            self._say(str(path), title="Exported as Markdown", timeout=8)

    def action_delete(self) -> None:
        conv = self._target()
        if conv is None:
            return

        async def apply(yes: bool | None) -> None:
            if not yes:
                return
            if conv is self.conv:
                await self._stop_reply()
            self.store.delete(conv)
            if conv in self.conversations:
                self.conversations.remove(conv)
            if conv is self.conv:
                nxt = self.conversations[0] if self.conversations else self._new_conversation()
                await self._show_conversation(nxt)
            self._refresh_sidebar()
            self._say(f"Deleted “{conv.title}”.")

        self.push_screen(ConfirmScreen(f"Delete “{conv.title}”? This cannot be undone."), apply)

    @on(ConversationList.Selected)
    async def _selected(self, event: ConversationList.Selected) -> None:
        sidebar = self.query_one(ConversationList)
        index = sidebar.index
        if index is None or index >= len(self.conversations):
            return
        conv = self.conversations[index]
        if conv is not self.conv:
            await self._stop_reply()
            await self._show_conversation(conv)
        self.prompt_input.focus()

    # ------------------------------------------------------------------------------------------------
    # Verification

    def action_verify(self) -> None:
        if self.verify_state.running:
            return
        verify_fn = self.verify_fn
        if verify_fn is None:
            try:
                from runtime.verify import verify_bundle as verify_fn
            except ImportError:
                self._say("This runtime has no verification (runtime.verify).", severity="error")
                return
        self.verify_state = VerifyState(running=True)
        self._verify(verify_fn)
        self._update_status()

    @work(thread=True, group="verify", exit_on_error=False)
    def _verify(self, verify_fn) -> None:
        state = self.verify_state
        t0 = time.perf_counter()

        def on_progress(done: int, total: int, step: str) -> None:  # runtime.verify.verify_bundle's callback
            state.done, state.total, state.step = int(done), int(total), str(step)

        try:
            state.checks = list(verify_fn(self.bundle, quick=True, progress=False, on_progress=on_progress))
        except EdgepackError as e:
            state.error = str(e)
        except Exception as e:
            state.error = f"{type(e).__name__}: {e}"
        finally:
            state.seconds = time.perf_counter() - t0
            state.running = False
            self.post_message(VerifyDone())

    @on(VerifyDone)
    def _verify_done(self) -> None:
        state = self.verify_state
        self._say(
            state.summary().plain,
            title="Verification",
            severity="error" if state.error or state.failed else "information",
            timeout=10,
        )
        self._update_status()

    # ------------------------------------------------------------------------------------------------

    def _say(self, message: str, **kwargs) -> None:
        """A toast; plain text, since paths and error messages may contain [brackets]."""
        self.notify(message, markup=False, **kwargs)

    def get_system_commands(self, screen):
        yield from super().get_system_commands(screen)
        for title, help_, action in (
            ("New conversation", "Start a new chat (Ctrl+N)", self.action_new_chat),
            ("Regenerate reply", "Write the last reply again (Ctrl+R)", self.action_regenerate),
            ("Copy last reply", "To the clipboard (Ctrl+L)", self.action_copy_reply),
            ("Conversation settings", "System prompt, temperature, top-p, max tokens (Ctrl+S)", self.action_settings),
            ("Rename conversation", "F2", self.action_rename),
            ("Export conversation", "As a Markdown file (F3)", self.action_export),
            ("Delete conversation", "F8", self.action_delete),
            ("Model panel", "What this bundle is and its claimed quality (Ctrl+O)", self.action_model),
            ("Verify the bundle now", "Re-measure its quality on this machine (quick)", self.action_verify),
            ("Toggle conversation list", "Ctrl+B", self.action_toggle_sidebar),
        ):
            yield SystemCommand(title, help_, action)

    async def action_quit(self) -> None:
        if self.job is not None:
            await self._stop_reply()
        self.exit(0)

    def on_unmount(self) -> None:
        if self.job is not None:  # however the app ends, the generation thread must not run on
            self.job.cancel.set()


def _welcome(info: dict) -> str:
    return (
        f"Chatting with {info.get('name', 'the model')}, offline. Type below and press Enter. "
        "Ctrl+O shows what this model is and verifies it; F1 lists the keys."
    )


def chat_generator(bundle, threads: int | None = None, draft: str = "auto"):
    """The bundle's generator, with onnxruntime's worker threads sleeping instead of spinning between
    kernels (runtime.onnx_engine: spinning threads steal time slices from other threads on the same cores,
    here the UI's)."""
    return bundle.generator(threads=threads, spin=False, draft=draft)


def run_chat(
    bundle_path: str, data_dir: str | None = None, threads: int | None = None, trust=None, draft: str = "auto"
) -> int:
    """Open the bundle (digests checked), load the model, run the chat. Returns the exit code."""
    from runtime.bundle import Bundle

    try:
        print(f"opening {bundle_path} …", file=sys.stderr, flush=True)
        bundle = Bundle.open(bundle_path, trust=trust)  # trust: runtime.signing.TrustPolicy (None: trust file)
        print(f"edgepack: {bundle.signature.message(bundle.name)}", file=sys.stderr, flush=True)
        generator = chat_generator(bundle, threads, draft)
        store = ConversationStore(data_dir)
    except EdgepackError as e:
        print(f"edgepack: error: {e}", file=sys.stderr)
        return 2
    app = ChatApp(bundle, store, generator=generator)
    app.run()
    code = app.return_code or 0
    if app.verify_state.running:
        # A verification cannot be interrupted and Python would wait for its thread at exit; everything
        # worth keeping is already on disk (conversations are written atomically as they change).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
