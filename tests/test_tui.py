"""The chat app (tui/) driven with Textual's Pilot at 80x24.

Most tests run the runtime's real Generator and ChatSession over a scripted decoder (each step's logits
point at the next byte of a fixed reply; `delay` seconds per step), so streaming, stopping and the
context policy are deterministic. The end-to-end tests use the real tiny bundle (ONNX model, tokenizer,
chat template, quality claims) built in the test by tests/tiny_bundle.py.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
from runtime.generation import Generator, SamplingSettings

EOS = 3
VOCAB = 256
REPLY = (
    "Sure. Here is the idea in **two** steps:\n\n1. Read the file.\n2. Count the words.\n\n"
    "```python\nwords = open('a.txt').read().split()\nprint(len(words))\n```\n"
)


class ByteTokenizer:
    eos_id, bos_id, pad_id, vocab_size = EOS, None, 0, VOCAB

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i >= 9 and i != EOS).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class ScriptedDecoder:
    """OnnxDecoder's interactive protocol; every reply is `reply`, `delay` seconds per decode step."""

    eos_token_ids = [EOS]

    def __init__(self, reply: str = REPLY, max_len: int = 4096, delay: float = 0.0):
        self.reply = list(reply.encode("utf-8"))
        self.max_len, self.delay = max_len, delay
        self.length = 0
        self.step = 0

    def reset(self) -> None:
        self.length = 0

    def _logits(self) -> np.ndarray:
        x = np.zeros(VOCAB, np.float32)
        x[self.reply[self.step] if self.step < len(self.reply) else EOS] = 20.0
        return x

    def prefill(self, ids) -> np.ndarray:
        self.length += len(ids)
        self.step = 0
        return self._logits()

    def decode(self, token: int) -> np.ndarray:
        if self.delay:
            time.sleep(self.delay)
        self.length += 1
        self.step += 1
        return self._logits()


class FakeBundle:
    """What ChatApp needs of runtime.bundle.Bundle."""

    def __init__(self, reply: str = REPLY, max_len: int = 4096, delay: float = 0.0, max_new_tokens: int = 512):
        self.tokenizer = ByteTokenizer()
        self.reply, self.max_len, self.delay, self.max_new_tokens = reply, max_len, delay, max_new_tokens
        self.system_prompt = "You are a helpful assistant."
        self.manifest = {"quality": {}}

    def generator(self, threads=None, spin=True, draft="none") -> Generator:
        self.spin = spin  # the chat asks for sleeping onnxruntime threads (spin=False)
        return Generator(ScriptedDecoder(self.reply, self.max_len, self.delay), self.tokenizer)

    def sampling_defaults(self) -> SamplingSettings:
        return SamplingSettings(temperature=0.0, top_p=0.9, repetition_penalty=1.0, max_new_tokens=self.max_new_tokens)

    def describe(self) -> dict:
        return {
            "name": "SmolLM2-135M-Instruct D2+W1:8",
            "path": "/models/bundles/smollm2-d2-w1-8",
            "source": "/models/bundles/smollm2-d2-w1-8",
            "recipe": "D2+W1:8",
            "stages": ["depth: removed=2", "width: n=1, m=8", "gptq: bits=4, group_size=128"],
            "size_bytes": 91_000_000,
            "size_text": "86.8 MiB",
            "parameters": 119_000_000,
            "context_length": self.max_len,
            "created_by": "edgepack 0.1.0",
            "quality": [
                {"metric": "ppl", "label": "WikiText-2 perplexity", "value": 21.3, "text": "21.30", "n": 4088},
                {"metric": "top1", "label": "top-1 agreement vs reference", "value": 0.81, "text": "81.0 %", "n": 4088},
            ],
        }


def fake_checks(passed: bool = True):
    """What runtime.verify.verify_bundle returns, for a verify_fn stand-in."""
    from runtime.verify import MetricCheck

    return [
        MetricCheck("ppl", 21.3, 21.31 if passed else 30.2, 0.426, passed, "relative 2 %; 1024 tokens, ctx=512"),
        MetricCheck("top1", 0.81, 0.80, 0.05, True, "absolute; 1024 tokens, ctx=512"),
    ]


# ---------------------------------------------------------------------------------------------------------
# Helpers


def make_app(tmp_path, bundle=None, **kw):
    from tui.app import ChatApp
    from tui.store import ConversationStore

    return ChatApp(bundle or FakeBundle(), ConversationStore(tmp_path / "data"), **kw)


async def wait_for(pilot, condition, timeout: float = 15.0) -> None:
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(0.02)


async def send(pilot, text: str, wait: bool = True) -> None:
    """Type `text` and press Enter; with wait=True, return once the reply is recorded."""
    app = pilot.app
    replies = sum(m["role"] == "assistant" for m in app.conv.messages)
    app.prompt_input.focus()
    app.prompt_input.load_text(text)
    await pilot.press("enter")
    if wait:
        await wait_for(
            pilot, lambda: app.job is None and sum(m["role"] == "assistant" for m in app.conv.messages) > replies
        )
        await pilot.pause()
    else:
        await wait_for(pilot, lambda: app.job is not None)


def saved(tmp_path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "data" / "conversations").glob("*.json"))]


def text_of(widget) -> str:
    """The plain text of a Static's content (str, rich Text or a rich Table)."""
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(widget.content)
    return console.file.getvalue()


def log_texts(app) -> list[tuple[str, str]]:
    from tui.widgets import AssistantMessage, Note, UserMessage

    out = []
    for w in app.log_view.children:
        if isinstance(w, UserMessage):
            out.append(("user", str(w.render())))
        elif isinstance(w, AssistantMessage):
            out.append(("assistant", w.source))
        elif isinstance(w, Note):
            out.append(("note", str(w.render())))
    return out


# ---------------------------------------------------------------------------------------------------------
# Streaming, stopping, saving


def test_reply_streams_into_the_log_and_is_saved(tmp_path, monkeypatch):
    import tui.app

    monkeypatch.setattr(tui.app, "SAVE_S", 0.05)

    async def run():
        app = make_app(tmp_path, FakeBundle(delay=0.01))
        async with app.run_test(size=(80, 24)) as pilot:
            await send(pilot, "How do I count words in a file?", wait=False)
            view = app.view  # the widgets of the reply being written
            # the user's turn is on disk before the reply is written
            assert saved(tmp_path)[0]["messages"][0] == {"role": "user", "content": "How do I count words in a file?"}
            await wait_for(pilot, lambda: 10 < len(view.widget.source) < len(REPLY) - 10)
            partial = view.widget.source
            assert REPLY.startswith(partial)  # drawn while streaming, a prefix of the reply
            await wait_for(
                pilot, lambda: len(saved(tmp_path)[0]["messages"]) == 2 and saved(tmp_path)[0]["messages"][1]["content"]
            )
            disk = saved(tmp_path)[0]["messages"][1]
            assert disk["partial"] is True and REPLY.startswith(disk["content"])  # partial reply saved
            await wait_for(pilot, lambda: app.job is None)
            await pilot.pause()
            assert log_texts(app)[-2:] == [("user", "How do I count words in a file?"), ("assistant", REPLY)]
            conv = saved(tmp_path)[0]
            reply = conv["messages"][1]
            assert reply["content"] == REPLY and reply["stop_reason"] == "eos" and "partial" not in reply
            assert reply["stats"]["new_tokens"] == len(REPLY.encode()) and reply["stats"]["tokens_per_s"] > 0
            assert conv["title"] == "How do I count words in a file?"
            status = text_of(app.query_one("#status"))
            assert "tok/s" in status and f"/{app.generator.context_length:,}" in status
            # code block rendered by the Markdown widget as a fence
            from textual.widgets._markdown import MarkdownFence

            assert app.log_view.query(MarkdownFence)

    asyncio.run(run())


def test_escape_stops_the_reply_and_keeps_what_was_written(tmp_path):
    async def run():
        app = make_app(tmp_path, FakeBundle(delay=0.02))
        async with app.run_test(size=(80, 24)) as pilot:
            await send(pilot, "Tell me everything.", wait=False)
            view = app.view
            await wait_for(pilot, lambda: len(view.widget.source) > 5)
            t0 = time.monotonic()
            await pilot.press("escape")
            await wait_for(pilot, lambda: app.job is None)
            assert time.monotonic() - t0 < 2.0  # not the ~3 s the whole reply takes
            reply = saved(tmp_path)[0]["messages"][1]
            assert reply["stop_reason"] == "cancelled" and reply["partial"] is True
            assert 5 < len(reply["content"]) < len(REPLY) and REPLY.startswith(reply["content"])
            assert log_texts(app)[-2:] == [("assistant", reply["content"]), ("note", "■ stopped")]
            # the next turn goes on from the stopped one
            app.bundle.delay = 0
            app.generator.decoder.delay = 0
            await send(pilot, "Go on.")
            assert [m["role"] for m in saved(tmp_path)[0]["messages"]] == ["user", "assistant", "user", "assistant"]

    asyncio.run(run())


def test_conversation_and_prompt_history_survive_a_restart(tmp_path):
    async def first():
        app = make_app(tmp_path)
        async with app.run_test(size=(80, 24)) as pilot:
            await send(pilot, "First question")
            await send(pilot, "Second question")

    async def second():
        app = make_app(tmp_path)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            # the most recent conversation is open again, with every turn
            assert log_texts(app) == [
                ("user", "First question"),
                ("assistant", REPLY),
                ("user", "Second question"),
                ("assistant", REPLY),
            ]
            sidebar = app.query_one("#chats")
            assert len(sidebar.children) == 1 and "First question" in str(
                sidebar.children[0].query_one("Label").render()
            )
            assert "tok/s" in text_of(app.query_one("#status"))  # the last reply's numbers
            # Up recalls the prompts, newest first; Down comes back to the draft
            app.prompt_input.focus()
            await pilot.press("d", "r", "a", "f", "t", "up")
            assert app.prompt_input.text == "Second question"
            await pilot.press("up")
            assert app.prompt_input.text == "First question"
            await pilot.press("down", "down")
            assert app.prompt_input.text == "draft"

    asyncio.run(first())
    asyncio.run(second())


def test_a_reply_cut_by_a_crash_reopens_marked_interrupted(tmp_path):
    from tui.store import Conversation, ConversationStore

    conv = Conversation(
        title="Crashed",
        messages=[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Half an ans", "partial": True}],
    )
    ConversationStore(tmp_path / "data").save(conv)

    async def run():
        app = make_app(tmp_path)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            assert log_texts(app) == [
                ("user", "Q"),
                ("assistant", "Half an ans"),
                ("note", "■ interrupted (the app stopped while writing)"),
            ]
            await send(pilot, "Again?")  # the conversation goes on
            assert [m["role"] for m in saved(tmp_path)[0]["messages"]] == ["user", "assistant", "user", "assistant"]

    asyncio.run(run())


def test_multiline_input_and_help_keys(tmp_path):
    async def run():
        app = make_app(tmp_path)
        async with app.run_test(size=(80, 24)) as pilot:
            from tui.screens import HelpScreen

            app.prompt_input.focus()
            await pilot.press("a", "ctrl+j", "b", "?")  # "?" types into the prompt, it opens no help there
            assert app.prompt_input.text == "a\nb?" and not isinstance(app.screen, HelpScreen)
            await pilot.press("f1")
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape")
            assert not isinstance(app.screen, HelpScreen)
            await pilot.press("enter")
            await wait_for(pilot, lambda: app.job is None and len(app.conv.messages) == 2)
            assert app.conv.messages[0]["content"] == "a\nb?"

    asyncio.run(run())


# ---------------------------------------------------------------------------------------------------------
# Conversation management


def test_rename_export_delete_switch(tmp_path):
    async def run():
        app = make_app(tmp_path)
        async with app.run_test(size=(80, 24)) as pilot:
            from tui.screens import ConfirmScreen, RenameScreen

            await send(pilot, "Alpha question")
            await pilot.press("ctrl+n")
            await send(pilot, "Beta question")
            assert {c["title"] for c in saved(tmp_path)} == {"Alpha question", "Beta question"}
            # rename the open one (F2)
            await pilot.press("f2")
            assert isinstance(app.screen, RenameScreen)
            await pilot.press(*"Beta renamed", "enter")
            await pilot.pause()
            titles = {c["title"] for c in saved(tmp_path)}
            assert titles == {"Alpha question", "Beta renamed"}
            # export it (F3) as Markdown
            await pilot.press("f3")
            exports = list((tmp_path / "data" / "exports").glob("*.md"))
            assert len(exports) == 1
            md = exports[0].read_text()
            assert md.startswith("# Beta renamed") and "**You**\n\nBeta question" in md and "```python" in md
            # the sidebar (Ctrl+B) switches to the other conversation
            await pilot.press("ctrl+b")
            sidebar = app.query_one("#chats")
            assert app.query_one("#sidebar").display and app.focused is sidebar
            await pilot.press("down", "enter")
            await pilot.pause()
            assert log_texts(app)[0] == ("user", "Alpha question") and app.focused is app.prompt_input
            # delete it (F8, confirm with y): the other one opens
            await pilot.press("f8")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("y")
            await wait_for(pilot, lambda: len(saved(tmp_path)) == 1)
            assert saved(tmp_path)[0]["title"] == "Beta renamed"
            assert log_texts(app)[0] == ("user", "Beta question")
            assert len(sidebar.children) == 1
            # "n" declines
            await pilot.press("f8", "n")
            assert len(saved(tmp_path)) == 1

    asyncio.run(run())


def test_settings_regenerate_and_copy(tmp_path):
    async def run():
        app = make_app(tmp_path)
        async with app.run_test(size=(80, 24)) as pilot:
            from textual.widgets import Input, TextArea

            from tui.screens import SettingsScreen

            await send(pilot, "Hi")
            await pilot.press("ctrl+s")
            screen = app.screen
            assert isinstance(screen, SettingsScreen)
            assert screen.query_one("#system", TextArea).text == "You are a helpful assistant."
            screen.query_one("#temperature", Input).value = "hot"
            await pilot.press("ctrl+s")
            assert app.screen is screen and "not a number" in text_of(screen.query_one("#settings-error"))
            screen.query_one("#temperature", Input).value = "0.3"
            screen.query_one("#max_new_tokens", Input).value = "20"
            screen.query_one("#system", TextArea).load_text("Answer in French.")
            await pilot.press("ctrl+s")
            await pilot.pause()
            conv = saved(tmp_path)[0]
            assert conv["settings"] == {"temperature": 0.3, "top_p": 0.9, "max_new_tokens": 20}
            assert conv["system_prompt"] == "Answer in French."
            # regenerate uses them: the reply is cut at 20 tokens, and replaces the old one
            await pilot.press("ctrl+r")
            await wait_for(pilot, lambda: app.job is None and app.conv.messages[-1].get("stop_reason") == "max_tokens")
            await pilot.pause()
            msgs = saved(tmp_path)[0]["messages"]
            assert [m["role"] for m in msgs] == ["user", "assistant"]
            assert msgs[1]["content"] == REPLY.encode()[:20].decode() and msgs[1]["stats"]["new_tokens"] == 20
            assert app.session.system_prompt == "Answer in French."
            assert [k for k, _ in log_texts(app)] == ["user", "assistant", "note"]
            # copy the last reply
            await pilot.press("ctrl+l")
            assert app.clipboard == msgs[1]["content"]

    asyncio.run(run())


# ---------------------------------------------------------------------------------------------------------
# Context policy


def test_context_overflow_drops_oldest_turns_with_a_note(tmp_path):
    async def run():
        # 200-token context, 60-token replies: the third exchange no longer fits with the first
        app = make_app(tmp_path, FakeBundle(reply="x" * 100, max_len=200, max_new_tokens=60))
        async with app.run_test(size=(80, 24)) as pilot:
            await send(pilot, "one")
            await send(pilot, "two")
            assert not any(m.get("dropped") for m in app.conv.messages)
            await send(pilot, "three")
            reply = app.conv.messages[-1]
            assert reply["dropped"] >= 2 and reply["stop_reason"] == "max_tokens"
            notes = [t for k, t in log_texts(app) if k == "note"]
            assert any("oldest messages no longer fit" in n for n in notes)
            assert saved(tmp_path)[0]["messages"][-1]["dropped"] == reply["dropped"]
            assert reply["stats"]["context_used"] <= 200

    asyncio.run(run())


def test_a_message_longer_than_the_context_is_given_back(tmp_path):
    async def run():
        app = make_app(tmp_path, FakeBundle(max_len=64, max_new_tokens=8))
        async with app.run_test(size=(80, 24)) as pilot:
            long = "word " * 40
            app.prompt_input.load_text(long)
            await pilot.press("enter")
            await wait_for(pilot, lambda: app.job is None and any(app._notifications))
            await pilot.pause()
            assert app.prompt_input.text == long  # nothing typed is lost
            assert app.conv.messages == [] and saved(tmp_path) == []
            assert any("too long" in n.message for n in app._notifications)

    asyncio.run(run())


# ---------------------------------------------------------------------------------------------------------
# The real tiny bundle (ONNX model, byte-level tokenizer, chat template, quality claims)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_checkpoint):
    from runtime.bundle import Bundle
    from tiny_bundle import tiny_bundle

    return Bundle.open(tiny_bundle(tmp_path_factory, tiny_checkpoint))


def test_chat_with_the_tiny_bundle_shows_what_the_runtime_generates(tmp_path, tiny):
    greedy = {"temperature": 0.0, "max_new_tokens": 24, "repetition_penalty": 1.0}

    async def run():
        app = make_app(tmp_path, tiny, threads=1)
        async with app.run_test(size=(80, 24)) as pilot:
            app.conv.settings = dict(greedy)
            await send(pilot, "Hello, who are you?")
            await send(pilot, "And then?")
            return app.conv.messages, text_of(app.query_one("#status"))

    messages, status = asyncio.run(run())
    # the same two turns straight through the runtime's ChatSession
    session = tiny.chat(threads=1)
    want = []
    for text in ("Hello, who are you?", "And then?"):
        want.append("".join(e.text for e in session.stream_reply(text, SamplingSettings(**greedy))))
    assert [m["content"] for m in messages if m["role"] == "assistant"] == want
    assert any(want) and f"ctx {session.context_used:,}/{tiny.context_length:,}" in status
    assert messages[-1]["stats"]["context_used"] == session.context_used
    assert messages[-1]["stats"]["cached_tokens"] > 0  # the second turn reused the first one's KV cache


def test_model_panel_verifies_the_bundle_in_the_background(tmp_path, tiny):
    async def run():
        app = make_app(tmp_path, tiny, threads=1)
        async with app.run_test(size=(80, 24)) as pilot:
            from tui.screens import ModelScreen

            await pilot.press("ctrl+o")
            assert isinstance(app.screen, ModelScreen)
            facts = text_of(app.screen.query_one("#model-facts"))
            assert "tiny-llama-test" in facts and "export: projections=fp32" in facts
            claims = text_of(app.screen.query_one("#claims"))
            assert "WikiText-2 perplexity" in claims and "n=" in claims
            assert "unverified" in text_of(app.query_one("#status"))
            await pilot.press("v")
            await wait_for(pilot, lambda: not app.verify_state.running, timeout=60)
            await pilot.pause(0.3)  # the panel refreshes every 0.2 s
            state = app.verify_state
            assert state.error is None and state.checks and all(c.passed for c in state.checks)
            table = text_of(app.screen.query_one("#checks"))
            assert "✓ pass" in table and "Measured" in table
            assert f"all {len(state.checks)} metrics within tolerance" in text_of(
                app.screen.query_one("#verify-status")
            )
            assert "✓ verified" in text_of(app.query_one("#status"))

    asyncio.run(run())


def test_a_failed_check_is_shown_as_failed(tmp_path):
    async def run():
        app = make_app(tmp_path, verify_fn=lambda bundle, **kw: fake_checks(passed=False))
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("ctrl+o", "v")
            await wait_for(pilot, lambda: app.verify_state.checks is not None)
            await pilot.pause(0.3)
            assert "✗ FAIL" in text_of(app.screen.query_one("#checks"))
            assert "1 of 2 metrics outside tolerance" in text_of(app.screen.query_one("#verify-status"))
            assert "✗ 1 failed" in text_of(app.query_one("#status"))

    asyncio.run(run())


# ---------------------------------------------------------------------------------------------------------
# Snapshot and layering


def snapshot_app(tmp_path):
    """A fixed conversation on the scripted decoder: no clock, no measured timings on screen."""
    from tui.store import Conversation, ConversationStore

    store = ConversationStore(tmp_path / "data")
    stats = {
        "ttft_s": 0.12,
        "tokens_per_s": 48.5,
        "new_tokens": 120,
        "prompt_tokens": 40,
        "cached_tokens": 0,
        "context_used": 160,
        "context_length": 4096,
    }
    for i, title in enumerate(("Word count in Python", "Trip to the Cotswolds")):
        conv = Conversation(
            id=f"2024010{i}-120000-abcdef",
            title=title,
            created="2024-01-01T12:00:00+00:00",
            messages=[
                {"role": "user", "content": "How do I count words in a file?"},
                {"role": "assistant", "content": REPLY, "stop_reason": "eos", "stats": stats},
            ],
        )
        store.save(conv)
        conv.updated = f"2024-01-0{i + 1}T12:00:00+00:00"
        store.save(conv, touch=False)
    return make_app(tmp_path)


def test_main_screen_snapshot(tmp_path, snap_compare):
    async def before(pilot):
        pilot.app.prompt_input.cursor_blink = False
        await pilot.press("ctrl+b")  # show the conversation list (hidden at start below 100 columns)
        pilot.app.prompt_input.focus()
        await pilot.pause()

    assert snap_compare(snapshot_app(tmp_path), terminal_size=(80, 24), run_before=before)


def test_tui_imports_no_heavy_stack_and_chat_command_parses():
    code = (
        "import sys, argparse\n"
        "import tui.cli\n"
        "light = 'textual' not in sys.modules\n"
        "p = argparse.ArgumentParser(); sub = p.add_subparsers(dest='command')\n"
        "tui.cli.add_chat_command(sub)\n"
        "a = p.parse_args(['chat', 'B', '--data-dir', 'D', '--threads', '2'])\n"
        "import tui.reply\n"
        "light = light and 'textual' not in sys.modules  # the reply controller needs no Textual\n"
        "import tui.app, tui.screens, tui.widgets, tui.store\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'gptqmodel', 'optimum') if m in sys.modules]\n"
        "print(light, a.bundle, a.data_dir, a.threads, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "B", "D", "2", "[]"]


def test_run_chat_reports_a_bad_bundle_in_one_line(tmp_path, capsys):
    from tui.app import run_chat

    assert run_chat(str(tmp_path / "missing"), str(tmp_path / "data")) == 2
    err = capsys.readouterr().err
    assert "edgepack: error:" in err and "missing" in err and "Traceback" not in err
