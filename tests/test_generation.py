"""runtime.generation on a tiny bundle: greedy equals Hugging Face token for token, streaming equals
non-streaming, seeded sampling is reproducible, stop strings are never emitted, context policy."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from runtime.bundle import Bundle
from runtime.errors import EdgepackError
from runtime.generation import (
    ChatSession,
    IncrementalDetokenizer,
    Sampler,
    SamplingSettings,
    StopStringFilter,
)
from tiny_bundle import MAX_LEN, hf_model, tiny_bundle

GREEDY = SamplingSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=40)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_checkpoint):
    return Bundle.open(tiny_bundle(tmp_path_factory, tiny_checkpoint))


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    return hf_model(tiny_checkpoint)


def chat_ids(bundle, text="Tell me about the Cotswolds.") -> list[int]:
    return ChatSession(bundle.generator(), bundle.tokenizer, "You are tiny.").build_prompt(
        [{"role": "user", "content": text}], 16
    )[0]


def hf_generate(hf, ids, **kw) -> list[int]:
    out = hf.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        pad_token_id=0,
        eos_token_id=2,
        **kw,
    )[0, len(ids) :].tolist()
    return out[: out.index(2)] if 2 in out else out


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_equals_hf_generate(bundle, hf, penalty):
    gen = bundle.generator(threads=1)
    for ids in (chat_ids(bundle), bundle.tokenizer.encode("The quick brown fox")):
        got = gen.generate(ids, SamplingSettings(temperature=0.0, repetition_penalty=penalty, max_new_tokens=40))
        want = hf_generate(hf, ids, max_new_tokens=40, do_sample=False, repetition_penalty=penalty)
        assert got.token_ids == want
        assert got.stop_reason == ("eos" if len(want) < 40 else "max_tokens")
        assert got.new_tokens == len(want) and got.prompt_tokens == len(ids)


def test_sampler_candidates_match_hf_logits_processors():
    """Penalty, temperature, top-k, top-p leave the same tokens with the same probabilities as HF's."""
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(0)
    for top_k, top_p in ((50, 0.9), (0, 0.8), (0, 0.05), (20, 1.0), (5, 0.3)):
        s = SamplingSettings(temperature=0.8, top_k=top_k, top_p=top_p, repetition_penalty=1.2)
        logits = (rng.standard_normal(288) * 3).astype(np.float32)
        seen = rng.integers(0, 288, 30)
        ids, probs = Sampler(s, 288, seen).candidates(logits.copy())
        x = torch.from_numpy(logits)[None]
        x = RepetitionPenaltyLogitsProcessor(1.2)(torch.from_numpy(seen)[None], x)
        x = TemperatureLogitsWarper(0.8)(None, x)
        if top_k:
            x = TopKLogitsWarper(top_k)(None, x)
        x = TopPLogitsWarper(top_p)(None, x)
        want = torch.softmax(x, -1)[0].numpy()
        got = np.zeros(288)
        got[ids] = probs / probs.sum()
        assert set(np.flatnonzero(want)) == set(ids.tolist())
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_streaming_equals_non_streaming(bundle):
    gen = bundle.generator()
    ids = chat_ids(bundle)
    s = SamplingSettings(seed=3, max_new_tokens=60)
    events = list(gen.stream(ids, s))
    streamed = gen.last_result
    result = bundle.generator().generate(ids, s)
    assert "".join(e.text for e in events) == streamed.text == result.text
    assert streamed.token_ids == result.token_ids
    assert result.text == bundle.tokenizer.decode(result.token_ids)
    assert [e.token_id for e in events if e.token_id >= 0] == result.token_ids


def test_seeded_sampling_is_reproducible(bundle):
    gen = bundle.generator()
    ids = chat_ids(bundle)
    s = SamplingSettings(temperature=1.0, top_k=0, top_p=1.0, seed=7, max_new_tokens=30)
    a = gen.generate(ids, s)
    b = gen.generate(ids, s)  # second run reuses the cached prompt prefix
    assert b.cached_tokens == len(ids) - 1
    c = bundle.generator().generate(ids, s)
    assert a.token_ids == b.token_ids == c.token_ids and a.new_tokens > 5
    others = {
        tuple(
            gen.generate(
                ids, SamplingSettings(temperature=1.0, top_k=0, top_p=1.0, seed=k, max_new_tokens=30)
            ).token_ids
        )
        for k in range(4)
    }
    assert len(others) > 1  # the seed matters


def test_stop_strings_are_never_emitted(bundle):
    gen = bundle.generator()
    ids = bundle.tokenizer.encode("The quick brown fox")
    full = gen.generate(ids, SamplingSettings(temperature=0.0, repetition_penalty=1.3, max_new_tokens=60))
    text = full.text
    printable = [
        i for i in range(5, len(text) - 3) if text[i : i + 3].isprintable() and "\ufffd" not in text[i : i + 3]
    ]
    assert printable, text
    stop = text[printable[0] : printable[0] + 3]
    cut = text.index(stop)
    events = list(
        gen.stream(
            ids,
            SamplingSettings(
                temperature=0.0, repetition_penalty=1.3, max_new_tokens=60, stop_strings=("\x00never", stop)
            ),
        )
    )
    out = "".join(e.text for e in events)
    assert out == text[:cut] == gen.last_result.text
    assert gen.last_result.stop_reason == "stop_string"
    assert all(stop not in e.text for e in events) and stop not in out
    # A stop string that never completes: the held-back start is released, nothing is lost.
    never = stop[:2] + "\x01"
    events = list(
        gen.stream(
            ids, SamplingSettings(temperature=0.0, repetition_penalty=1.3, max_new_tokens=60, stop_strings=(never,))
        )
    )
    assert "".join(e.text for e in events) == text


def test_stop_string_filter_holds_back_partial_matches():
    f = StopStringFilter(["</s>", "User:"])
    assert f.push("Hello <") == "Hello "  # "<" may start "</s>"
    assert f.push("b>") == "<b>"
    assert f.push(" Us") == " "
    assert f.push("er:") == "" and f.hit
    assert f.push("more") == ""
    g = StopStringFilter(["abc"])
    assert g.push("xab") == "x" and g.flush() == "ab"


def test_incremental_detokenizer_matches_full_decode(bundle):
    tok = bundle.tokenizer
    rng = np.random.default_rng(0)
    texts = ["héllo wörld ✓ — 日本語", "plain ascii", "\ufffd odd"]
    seqs = [tok.encode(t, add_special_tokens=False) for t in texts]
    seqs.append(rng.integers(0, 288, 200).tolist())  # random bytes: invalid UTF-8 and special tokens
    for ids in seqs:
        d = IncrementalDetokenizer(tok)
        out = "".join(d.push(i) for i in ids) + d.flush()
        assert out == tok.decode(ids)
        assert len(d.ids) <= 40  # the window stays small however long the text


def test_prompt_too_long_raises(bundle):
    gen = bundle.generator()
    with pytest.raises(EdgepackError, match="prompt too long: 512 tokens"):
        gen.stream(list(range(3, 259)) * 2, GREEDY)  # raised when the stream is made, before any work
    assert gen.decoder.length == 0
    chat = ChatSession(gen, bundle.tokenizer)
    with pytest.raises(EdgepackError, match="message too long"):
        list(chat.stream_reply("x" * 600, GREEDY))
    assert chat.messages == []  # the failed message is not kept


def test_generation_stops_when_context_is_full(bundle):
    gen = bundle.generator()
    prompt = bundle.tokenizer.encode("abcdefgh" * 100)[: MAX_LEN - 3]
    r = gen.generate(prompt, SamplingSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=50))
    assert r.stop_reason == "context_full"
    assert r.new_tokens == 4 and gen.decoder.length == MAX_LEN  # the 4th token is emitted, never decoded


def test_chat_session_history_system_prompt_and_dropping(bundle):
    gen = bundle.generator(max_len=160)
    chat = ChatSession(gen, bundle.tokenizer, system_prompt="Be brief.")
    s = SamplingSettings(seed=1, max_new_tokens=8)
    for turn in range(4):
        reply = "".join(e.text for e in chat.stream_reply(f"question {turn}: " + "tell me more " * 3, s))
        assert chat.messages[-1] == {"role": "assistant", "content": reply}
        assert chat.context_used == gen.last_result.prompt_tokens + gen.last_result.new_tokens <= 160
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 4
    ids, dropped = chat.build_prompt(chat.messages + [{"role": "user", "content": "last"}], 8)
    text = bundle.tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert dropped > 0 and dropped % 2 == 0 and len(ids) + 8 <= 160
    assert "question 0" not in text and "last" in text
    assert chat.last_dropped > 0  # the 4th turn already needed room


def test_chat_second_turn_reuses_the_cache_and_equals_a_fresh_run(bundle):
    chat = ChatSession(bundle.generator(), bundle.tokenizer)
    g = SamplingSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=6)
    list(chat.stream_reply("hello", g))
    list(chat.stream_reply("and again", g))
    second = chat.generator.last_result
    assert second.cached_tokens > 0
    ids, _ = chat.build_prompt(chat.messages[:-1], 6)
    fresh = bundle.generator().generate(ids, g)
    assert fresh.token_ids == second.token_ids


def test_cancel_keeps_partial_reply_and_regenerate_replaces_it(bundle):
    chat = ChatSession(bundle.generator(), bundle.tokenizer)
    cancel = threading.Event()
    s = SamplingSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=50)
    events = []
    for e in chat.stream_reply("hi", s, cancel):
        events.append(e)
        if len(events) == 3:
            cancel.set()
    assert chat.generator.last_result.stop_reason == "cancelled"
    assert chat.generator.last_result.new_tokens == 3
    partial = chat.messages[-1]["content"]
    assert partial == "".join(e.text for e in events)
    again = "".join(e.text for e in chat.regenerate(s))
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]
    assert chat.messages[-1]["content"] == again and again.startswith(partial)
