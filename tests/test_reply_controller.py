"""The chat's reply controller (tui.reply) without Textual: start, stream, finish, take back; messages as
a dataclass; the stream's final event carries its result; the chat's onnxruntime threads do not spin.

Runs the runtime's real Generator and ChatSession over tests/test_tui.py's scripted decoder (each step's
logits point at the next byte of a fixed reply), so every outcome is deterministic."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from runtime.generation import ChatSession, Generator, SamplingSettings
from test_tui import REPLY, ByteTokenizer, ScriptedDecoder
from tui.reply import ChatMessage, ReplyController, dropped_text, reply_note
from tui.store import Conversation

GREEDY = SamplingSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=512)


def controller(reply: str = REPLY, max_len: int = 4096, decoder=None) -> ReplyController:
    tok = ByteTokenizer()
    gen = Generator(decoder or ScriptedDecoder(reply, max_len), tok)
    return ReplyController(ChatSession(gen, tok, "Be brief."))


def say(ctl: ReplyController, conv: Conversation, text: str, settings=GREEDY, cancel=False):
    conv.messages.append({"role": "user", "content": text})
    reply = ctl.start(conv, settings, "Be brief.", text)
    if cancel:
        reply.cancel.set()
    ctl.run(reply)  # the worker thread's body, run inline
    return reply, ctl.finish(reply)


def test_the_controller_module_imports_no_textual():
    code = "import sys, tui.reply; print('textual' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_a_reply_is_streamed_and_recorded_with_its_numbers():
    ctl, conv = controller(), Conversation()
    reply, done = say(ctl, conv, "hi")
    assert done.recorded and done.error is None and done.note is None  # ended on EOS: no note
    assert reply.done and reply.take_pending() == REPLY and reply.text == REPLY  # everything streamed
    assert reply.tokens == len(REPLY.encode()) and reply.first_token is not None
    assert [m["role"] for m in conv.messages] == ["user", "assistant"]
    stored = conv.messages[-1]
    assert stored is reply.record and stored["content"] == REPLY and "partial" not in stored
    assert stored["stop_reason"] == "eos" and "dropped" not in stored and "error" not in stored
    stats = stored["stats"]
    assert stats["new_tokens"] == len(REPLY.encode()) and stats["context_length"] == 4096
    assert stats["context_used"] == stats["prompt_tokens"] + stats["new_tokens"] == ctl.context_used
    assert ChatMessage.from_dict(stored) == reply.message  # the dataclass and the stored dict agree
    assert ctl.session.system_prompt == "Be brief."


def test_the_stream_s_final_event_carries_the_result():
    tok = ByteTokenizer()
    gen = Generator(ScriptedDecoder("abc"), tok)
    events = list(gen.stream(tok.encode("<user>x\n<assistant>"), GREEDY))
    assert [e.result is not None for e in events] == [False] * (len(events) - 1) + [True]
    final = events[-1]
    assert (final.text, final.token_id) == ("", -1)
    assert final.result.text == "".join(e.text for e in events) == "abc" and final.result.stop_reason == "eos"
    assert final.result is gen.last_result  # the old attribute still works for callers not yet moved
    chat = ChatSession(Generator(ScriptedDecoder("x" * 50, max_len=120), tok), tok)
    for text in ("one", "two", "three"):
        *_, last = chat.stream_reply(text, SamplingSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=40))
    assert last.result.dropped_messages == chat.last_dropped > 0
    assert last.result.context_used == chat.context_used


def test_max_tokens_and_stop_give_their_notes():
    ctl, conv = controller(), Conversation()
    _, done = say(ctl, conv, "hi", SamplingSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=5))
    assert done.note == ("… cut at 5 tokens, the max new tokens (Ctrl+S to change)", "info")
    assert conv.messages[-1]["stop_reason"] == "max_tokens" and conv.messages[-1]["stats"]["new_tokens"] == 5
    reply, done = say(ctl, conv, "again", cancel=True)  # Esc before the first token
    assert done.recorded and done.note == ("■ stopped", "info")
    assert conv.messages[-1]["partial"] is True and conv.messages[-1]["stop_reason"] == "cancelled"


def test_a_message_too_long_for_the_context_is_taken_back():
    ctl, conv = controller(max_len=64), Conversation()
    conv.messages.append({"role": "user", "content": "earlier"})
    conv.messages.append({"role": "assistant", "content": "reply"})
    reply, done = say(ctl, conv, "word " * 40, SamplingSettings(temperature=0.0, max_new_tokens=8))
    assert not done.recorded and done.user_removed and "too long" in done.error
    assert conv.messages == [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "reply"}]
    assert reply.result is None and reply.user_text == "word " * 40  # the shell puts it back in the input


def test_old_turns_that_no_longer_fit_are_dropped_and_recorded():
    ctl = controller(reply="x" * 100, max_len=200)
    settings = SamplingSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=60)
    conv = Conversation()
    for text in ("one", "two"):
        say(ctl, conv, text, settings)
    assert not any(m.get("dropped") for m in conv.messages)
    reply, done = say(ctl, conv, "three", settings)
    assert reply.message.dropped >= 2 and conv.messages[-1]["dropped"] == reply.message.dropped
    assert conv.messages[-1]["stats"]["context_used"] <= 200
    assert dropped_text(2, 200).startswith("⚠ context full: the 2 oldest messages")


class FailingDecoder(ScriptedDecoder):
    """Fails on the 4th decode step, after 3 tokens were streamed."""

    def decode(self, token: int) -> np.ndarray:
        if self.step == 3:
            raise RuntimeError("kernel failed")
        return super().decode(token)


def test_an_engine_failure_mid_reply_keeps_what_was_written():
    ctl, conv = controller(decoder=FailingDecoder("abcdef")), Conversation()
    reply, done = say(ctl, conv, "hi")
    assert done.recorded and done.error == "RuntimeError: kernel failed"
    assert conv.messages[-1]["content"] == reply.text == "abcd"[: len(reply.text)] and reply.text
    assert done.note == ("✗ generation failed: RuntimeError: kernel failed", "error")


def test_regenerate_answers_the_last_user_message_again():
    ctl, conv = controller(), Conversation()
    say(ctl, conv, "hi")
    conv.messages.pop()  # the shell removes the old reply first
    reply = ctl.start(conv, GREEDY, None, None)
    ctl.run(reply)
    done = ctl.finish(reply)
    assert done.recorded and [m["role"] for m in conv.messages] == ["user", "assistant"]
    assert conv.messages[-1]["content"] == REPLY and ctl.session.system_prompt is None
    with pytest.raises(Exception, match="already finished"):
        ctl.finish(reply)


def test_progress_and_context_estimate_of_a_loaded_chat():
    ctl, conv = controller(), Conversation()
    reply, _ = say(ctl, conv, "hi")
    p = ctl.progress(reply)
    assert p.state == "writing" and p.tokens == reply.tokens and p.ttft_s >= 0
    assert ctl.estimate_context(conv, None) == conv.messages[-1]["stats"]["context_used"]
    loaded = Conversation(messages=[{"role": "user", "content": "hello"}])
    assert ctl.estimate_context(loaded, None) == len(ByteTokenizer().encode("<user>hello\n<assistant>"))
    assert ctl.estimate_context(Conversation(), None) == 0


def test_chat_message_round_trips_the_store_layout():
    m = ChatMessage("assistant", "hi", partial=True)
    assert m.to_dict() == {"role": "assistant", "content": "hi", "partial": True}
    full = {
        "role": "assistant",
        "content": "x",
        "stop_reason": "max_tokens",
        "stats": {"new_tokens": 3},
        "dropped": 2,
        "error": "E",
    }
    assert ChatMessage.from_dict(full).to_dict() == full
    assert reply_note(ChatMessage("assistant", partial=True)) == (
        "■ interrupted (the app stopped while writing)",
        "warning",
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_checkpoint):
    from runtime.bundle import Bundle
    from tiny_bundle import tiny_bundle

    return Bundle.open(tiny_bundle(tmp_path_factory, tiny_checkpoint))


def test_the_chat_s_onnxruntime_threads_sleep_between_tokens(tiny):
    from tui.app import chat_generator

    key = "session.intra_op.allow_spinning"
    chat = chat_generator(tiny, threads=1).decoder.session.get_session_options()
    default = tiny.generator(threads=1).decoder.session.get_session_options()
    assert chat.get_session_config_entry(key) == "0"
    with pytest.raises(RuntimeError, match="does not have configuration"):
        default.get_session_config_entry(key)  # other callers keep ORT's spinning default (entry unset)
