"""runtime.batching on a tiny bundle: every request of a continuously batched pool yields exactly what the
Generator yields for it alone (greedy, seeded sampling, stop strings, context full), slots are reused,
cancellation frees a slot at once, one request's failure leaves the others alone, a full queue refuses."""

from __future__ import annotations

import threading

import pytest

from runtime.batching import BatchScheduler, PoolConfig, QueueFull
from runtime.bundle import Bundle
from runtime.errors import EdgepackError
from runtime.generation import Generator, SamplingSettings
from tiny_bundle import tiny_bundle

GREEDY = SamplingSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=24)
WAIT = 120  # seconds: upper bound of every wait below (never reached unless something hangs)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_checkpoint):
    return Bundle.open(tiny_bundle(tmp_path_factory, tiny_checkpoint))


def prompts(bundle, n: int) -> list[list[int]]:
    """n prompts of different lengths: chat-templated questions and plain text."""
    out = []
    for i in range(n):
        if i % 2:
            text = f"Question {i}: what is {'very ' * (i % 5)}interesting about number {i * 7}?"
            chat = bundle.tokenizer.apply_chat_template([{"role": "user", "content": text}])
            out.append(bundle.tokenizer.encode(chat, add_special_tokens=False))
        else:
            out.append(bundle.tokenizer.encode(f"Story {i}: once upon a time " + "la " * i))
    return out


def solo(bundle, ids, settings, max_len=None):
    """The request alone through the plain Generator (one sequence, no batching)."""
    gen = Generator(bundle.decoder(threads=1, max_len=max_len), bundle.tokenizer, stop_ids=bundle.stop_ids)
    return gen.generate(ids, settings)


def run_all(scheduler, jobs):
    """Submit all (ids, settings) at once; wait; return the results in order."""
    requests = [scheduler.submit(ids, s, lambda e: None) for ids, s in jobs]
    for r in requests:
        assert r.done.wait(WAIT)
        assert r.error is None, r.error
    return [r.result for r in requests]


def same(got, want):
    assert got.token_ids == want.token_ids
    assert got.text == want.text
    assert got.stop_reason == want.stop_reason
    assert got.prompt_tokens == want.prompt_tokens and got.new_tokens == want.new_tokens


@pytest.mark.parametrize("slots", [16, 4])
def test_sixteen_concurrent_greedy_requests_equal_solo(bundle, slots):
    """16 requests at once; with 4 slots the other 12 wait and join as slots free (continuous batching).
    Different max_new_tokens make requests finish at different steps."""
    jobs = [
        (ids, SamplingSettings(temperature=0.0, repetition_penalty=1.0 + 0.1 * (i % 3), max_new_tokens=8 + 3 * i))
        for i, ids in enumerate(prompts(bundle, 16))
    ]
    with BatchScheduler(
        bundle.decoder(threads=1), bundle.tokenizer, bundle.stop_ids, PoolConfig(slots=slots, queue=16)
    ) as scheduler:
        results = run_all(scheduler, jobs)
        status = scheduler.status()
    assert status["active"] == 0 and status["waiting"] == 0 and status["completed"] == 16
    for (ids, s), got in zip(jobs, results):
        same(got, solo(bundle, ids, s))
    assert sum(r.new_tokens for r in results) > 100


def test_chunked_prefill_and_seeded_sampling_equal_solo(bundle):
    """Prompts longer than the prefill chunk are prefilled over several iterations while others decode;
    seeded sampling and stop strings give the solo results too."""
    ps = prompts(bundle, 6)
    jobs = [(ids, SamplingSettings(temperature=0.9, seed=i, max_new_tokens=20)) for i, ids in enumerate(ps)]
    fox = bundle.tokenizer.encode("The quick brown fox")  # a prompt whose reply has printable text
    text = solo(bundle, fox, SamplingSettings(temperature=0.0, repetition_penalty=1.3, max_new_tokens=60)).text
    at = next(i for i in range(5, len(text) - 3) if text[i : i + 3].isprintable() and "\ufffd" not in text[i : i + 3])
    stop_text = text[at : at + 3]
    jobs.append(
        (fox, SamplingSettings(temperature=0.0, repetition_penalty=1.3, max_new_tokens=60, stop_strings=(stop_text,)))
    )
    with BatchScheduler(
        bundle.decoder(threads=1), bundle.tokenizer, bundle.stop_ids, PoolConfig(slots=3, prefill_chunk=7)
    ) as scheduler:
        results = run_all(scheduler, jobs)
    for (ids, s), got in zip(jobs, results):
        same(got, solo(bundle, ids, s))
    assert results[-1].stop_reason == "stop_string" and stop_text not in results[-1].text


def test_context_full_equals_solo(bundle):
    ids = prompts(bundle, 3)[2]
    s = SamplingSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=100)
    room = len(ids) + 5
    with BatchScheduler(
        bundle.decoder(threads=1), bundle.tokenizer, bundle.stop_ids, PoolConfig(slots=2, context=room)
    ) as scheduler:
        got = run_all(scheduler, [(ids, s)])[0]
        with pytest.raises(EdgepackError, match="prompt too long"):
            scheduler.submit(list(ids) * 3, s, lambda e: None)
        with pytest.raises(EdgepackError, match="token ids"):
            scheduler.submit([bundle.decoder().vocab_size], s, lambda e: None)
    want = solo(bundle, ids, s, max_len=room)
    same(got, want)
    assert got.stop_reason in ("context_full", "eos")


def test_stream_events_concatenate_to_the_result(bundle):
    ids = prompts(bundle, 2)[1]
    with BatchScheduler(bundle.decoder(threads=1), bundle.tokenizer, bundle.stop_ids) as scheduler:
        events = list(scheduler.stream(ids, GREEDY))
    want = solo(bundle, ids, GREEDY)
    assert "".join(e.text for e in events) == want.text
    assert [e.token_id for e in events if e.token_id >= 0] == want.token_ids


def test_cancel_frees_the_slot_within_one_token(bundle):
    ps = prompts(bundle, 3)
    long = SamplingSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=200)
    with BatchScheduler(bundle.decoder(threads=1), bundle.tokenizer, bundle.stop_ids, PoolConfig(slots=2)) as scheduler:
        seen = []

        def listener(event):
            if event is not None and event.token_id >= 0:
                seen.append(event.token_id)
                if len(seen) == 3:
                    victim.cancel()  # the scheduler thread sees it before the next token

        victim = scheduler.submit(ps[0], long, listener)
        other = scheduler.submit(ps[1], GREEDY, lambda e: None)
        assert victim.done.wait(WAIT) and other.done.wait(WAIT)
        assert victim.result.stop_reason == "cancelled" and victim.result.new_tokens == 3 == len(seen)
        same(other.result, solo(bundle, ps[1], GREEDY))
        status = scheduler.status()
        assert status["active"] == 0 and status["cancelled"] == 1


def test_a_failing_request_leaves_the_others_alone(bundle):
    ps = prompts(bundle, 4)
    with BatchScheduler(bundle.decoder(threads=1), bundle.tokenizer, bundle.stop_ids, PoolConfig(slots=4)) as scheduler:

        def boom(event):
            if event is not None and event.token_id >= 0:
                raise RuntimeError("listener crashed")

        bad = scheduler.submit(ps[0], GREEDY, boom)
        good = [scheduler.submit(ids, GREEDY, lambda e: None) for ids in ps[1:]]
        for r in [bad, *good]:
            assert r.done.wait(WAIT)
        assert isinstance(bad.error, EdgepackError) and bad.result is None
        for ids, r in zip(ps[1:], good):
            same(r.result, solo(bundle, ids, GREEDY))
        after = scheduler.generate(ps[0], GREEDY)  # the scheduler still serves
        same(after, solo(bundle, ps[0], GREEDY))
        assert scheduler.status()["failed"] == 1


def test_full_queue_refuses_and_slots_are_reused(bundle):
    ps = prompts(bundle, 3)
    gate = threading.Event()
    with BatchScheduler(
        bundle.decoder(threads=1), bundle.tokenizer, bundle.stop_ids, PoolConfig(slots=1, queue=1)
    ) as scheduler:
        first = scheduler.submit(ps[0], GREEDY, lambda e: gate.wait(WAIT))  # holds the scheduler thread
        second = scheduler.submit(ps[1], GREEDY, lambda e: None)
        with pytest.raises(QueueFull, match="busy"):
            scheduler.submit(ps[2], GREEDY, lambda e: None)
        gate.set()
        assert first.done.wait(WAIT) and second.done.wait(WAIT)
        same(second.result, solo(bundle, ps[1], GREEDY))
        same(scheduler.generate(ps[2], GREEDY), solo(bundle, ps[2], GREEDY))


def test_pool_config_is_checked(bundle):
    dec = bundle.decoder(threads=1)
    for bad in (
        PoolConfig(slots=0),
        PoolConfig(queue=-1),
        PoolConfig(context=dec.max_len + 1),
        PoolConfig(prefill_chunk=0),
    ):
        with pytest.raises(EdgepackError):
            BatchScheduler(dec, bundle.tokenizer, bundle.stop_ids, bad)


def test_shared_prefix_is_copied_not_prefilled(bundle):
    """A pool given the chat template's shared prefix copies its KV into each newcomer whose prompt starts with
    it: the rows hold what a full prefill writes, replies equal solo, other prompts are prefilled as before."""
    import numpy as np

    from server.run import shared_chat_prefix

    prefix = shared_chat_prefix(bundle)
    head = [{"role": "system", "content": bundle.system_prompt}] if bundle.system_prompt else []
    chats = [
        bundle.tokenizer.encode_chat(head + [{"role": "user", "content": f"Tell me about number {i * 7}."}])
        for i in range(4)
    ]
    assert len(prefix) >= 2 and all(p[: len(prefix)] == list(prefix) for p in chats)
    jobs = [(ids, GREEDY) for ids in chats + prompts(bundle, 4)]
    pool = PoolConfig(slots=8, queue=8, prefix=prefix)
    with BatchScheduler(bundle.decoder(threads=1), bundle.tokenizer, bundle.stop_ids, pool) as scheduler:
        results = run_all(scheduler, jobs)
        assert scheduler.status()["prefix_reused"] == 4
        copied = {k: v.copy() for k, v in scheduler._prefix_kv.items()}
        arrays = scheduler.cache.arrays
    for (ids, s), got in zip(jobs, results):
        same(got, solo(bundle, ids, s))
    dec = bundle.decoder(threads=1)  # the prefix's KV = the first positions of a full prompt's prefill
    dec.prefill(chats[0])
    for key, want in copied.items():
        full = next(v for k, v in dec._cache.values.items() if k == key).numpy()[0, :, : len(prefix)]
        np.testing.assert_allclose(want, full, atol=1e-5)
        assert want.shape == arrays[key][0, :, : len(prefix)].shape
    with pytest.raises(EdgepackError, match="prefix"):
        PoolConfig(prefix=tuple(range(64)), context=64).check(64)


def test_prompt_cuts_never_leave_a_one_token_pass(bundle, monkeypatch):
    """A prompt cut across iterations keeps >= 2 tokens on both sides of every cut (a one-token pass is
    onnxruntime's decode path, which rounds differently), and replies still equal solo."""
    calls = []
    original = BatchScheduler._run_prefill

    def recording(self, row, ids, past):
        calls.append((row, len(ids), past))
        return original(self, row, ids, past)

    monkeypatch.setattr(BatchScheduler, "_run_prefill", recording)
    ps = [p for p in prompts(bundle, 8) if len(p) > 5]
    jobs = [(ids, GREEDY) for ids in ps]
    with BatchScheduler(
        bundle.decoder(threads=1), bundle.tokenizer, bundle.stop_ids, PoolConfig(slots=4, prefill_chunk=3)
    ) as scheduler:
        results = run_all(scheduler, jobs)
    assert calls and min(n for _, n, _ in calls) >= 2
    assert any(past > 0 for _, _, past in calls)  # prompts really were cut
    for (ids, s), got in zip(jobs, results):
        same(got, solo(bundle, ids, s))
