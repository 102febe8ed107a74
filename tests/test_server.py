"""`edgepack serve` as a real process on a free 127.0.0.1 port, driven by the official `openai` client (and
raw httpx where the client would hide the wire): models, chat and completions (streaming and not), greedy
equal to `edgepack generate`, 16 concurrent streams equal to their solo results, disconnect frees the slot,
every bad request gets its 4xx in OpenAI's error shape, API keys, a full queue answers 429."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import replace

import httpx
import openai
import pytest

from conftest import ROOT
from runtime.bundle import Bundle
from runtime.generation import ChatSession, Generator
from tiny_bundle import tiny_bundle

KEY = "test-key-0123456789"
START_S = 90  # upper bound for a server to come up
WAIT_S = 120  # upper bound of every other wait


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, tiny_checkpoint):
    return tiny_bundle(tmp_path_factory, tiny_checkpoint)


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return Bundle.open(bundle_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(bundle_dir, *args: str):
    """`edgepack serve` in a subprocess; yields its base URL; stopped at the end."""
    port = free_port()
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env.pop("EDGEPACK_API_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgepack", "serve", str(bundle_dir), "--port", str(port), "--threads", "1", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_S
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def server(bundle_dir):
    with running_server(bundle_dir, "--parallel", "16") as url:
        yield url


def client(url: str, key: str = "none", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, timeout=WAIT_S, max_retries=0, **kw)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


def greedy(bundle, n: int):
    return replace(bundle.sampling_defaults(), temperature=0.0, max_new_tokens=n)


def solo_chat(bundle, text: str, settings):
    """What `edgepack generate BUNDLE TEXT` computes: the bundle's system prompt, chat template, plain
    Generator (one sequence, no batching)."""
    gen = Generator(bundle.decoder(threads=1), bundle.tokenizer, stop_ids=bundle.stop_ids)
    for _ in ChatSession(gen, bundle.tokenizer, bundle.system_prompt).stream_reply(text, settings):
        pass
    return gen.last_result


def solo_completion(bundle, prompt: str, settings):
    gen = Generator(bundle.decoder(threads=1), bundle.tokenizer, stop_ids=bundle.stop_ids)
    return gen.generate(bundle.tokenizer.encode(prompt, add_special_tokens=True), settings)


def edgepack_generate(bundle_dir, prompt: str, max_new_tokens: int, *extra: str) -> subprocess.CompletedProcess:
    """`edgepack generate` greedy, one thread, in its own process: the reference an HTTP reply must equal."""
    args = ["generate", str(bundle_dir), prompt, *extra, "--temperature", "0"]
    args += ["--max-new-tokens", str(max_new_tokens), "--threads", "1"]
    return subprocess.run(
        [sys.executable, "-m", "edgepack", *args], cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S
    )


def assert_error_shape(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


# -------------------------------------------------------------------------------------------------------------


def test_models_health_and_bundle_info(server, bundle):
    c = client(server)
    assert [m.id for m in c.models.list().data] == [bundle.name]
    assert c.models.retrieve(bundle.name).id == bundle.name
    h = health(server)
    assert h["status"] == "ok" and h["slots"] == 16 and h["model"] == bundle.name
    info = httpx.get(f"{server}/v1/bundle", timeout=10).json()
    assert info["recipe"] == bundle.manifest["recipe"] and info["size_bytes"] == bundle.size_bytes()
    assert info["quality"] == bundle.manifest["quality"] and "path" not in info


def test_chat_greedy_equals_edgepack_generate(server, bundle, bundle_dir):
    prompt = "Tell me about the Cotswolds."
    reply = client(server).chat.completions.create(
        model=bundle.name, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=20
    )
    cli = edgepack_generate(bundle_dir, prompt, 20)
    assert cli.returncode == 0, cli.stderr
    text = reply.choices[0].message.content
    assert cli.stdout == text + "\n"
    want = solo_chat(bundle, prompt, greedy(bundle, 20))
    assert text == want.text and reply.usage.completion_tokens == want.new_tokens
    assert reply.usage.prompt_tokens == want.prompt_tokens
    assert reply.usage.total_tokens == want.prompt_tokens + want.new_tokens
    assert reply.choices[0].finish_reason == ("length" if want.stop_reason == "max_tokens" else "stop")
    assert reply.choices[0].message.role == "assistant" and reply.object == "chat.completion"


def test_completion_greedy_equals_edgepack_generate_raw(server, bundle, bundle_dir):
    prompt = "The quick brown fox"
    reply = client(server).completions.create(model=bundle.name, prompt=prompt, temperature=0, max_tokens=24)
    cli = edgepack_generate(bundle_dir, prompt, 24, "--raw")
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout == reply.choices[0].text + "\n"
    assert reply.usage.completion_tokens == solo_completion(bundle, prompt, greedy(bundle, 24)).new_tokens


def test_streaming_equals_non_streaming(server, bundle):
    c = client(server)
    kw = dict(
        model=bundle.name,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
        temperature=0.8,
        top_p=0.95,
        seed=11,
        max_completion_tokens=30,
        stop=["zz", "qq"],
    )
    whole = c.chat.completions.create(**kw)
    chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # The wire: server-sent events ending with [DONE]; completions stream too.
    with httpx.stream(
        "POST",
        f"{server}/v1/completions",
        timeout=WAIT_S,
        json={"model": bundle.name, "prompt": "Once", "max_tokens": 5, "stream": True},
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert all(e["object"] == "text_completion" for e in events)
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_sixteen_concurrent_greedy_streams_equal_solo(server, bundle):
    jobs = [(f"Question {i}: what is {'very ' * (i % 4)}odd about {i * 13}?", 6 + 2 * i) for i in range(16)]
    ac = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="none", timeout=WAIT_S, max_retries=0)

    async def one(i, text, n):
        if i % 2:  # half through chat, half through completions
            stream = await ac.chat.completions.create(
                model=bundle.name,
                messages=[{"role": "user", "content": text}],
                temperature=0,
                max_tokens=n,
                stream=True,
            )
            return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
        stream = await ac.completions.create(model=bundle.name, prompt=text, temperature=0, max_tokens=n, stream=True)
        return "".join([ch.choices[0].text async for ch in stream if ch.choices])

    async def all_of_them():
        return await asyncio.wait_for(asyncio.gather(*(one(i, t, n) for i, (t, n) in enumerate(jobs))), WAIT_S)

    got = asyncio.run(all_of_them())
    for i, ((text, n), reply) in enumerate(zip(jobs, got)):
        want = (solo_chat if i % 2 else solo_completion)(bundle, text, greedy(bundle, n))
        assert reply == want.text, i
    h = health(server)
    assert h["active"] == 0 and h["failed"] == 0


def test_disconnect_frees_the_slot(server, bundle):
    before = health(server)
    body = {"model": bundle.name, "prompt": "Go on", "max_tokens": 480, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=WAIT_S) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    # The client has gone after the first token: the request is cancelled, not run to 480 tokens.
    deadline = time.monotonic() + WAIT_S
    while (h := health(server))["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert h["active"] == 0
    assert h["cancelled"] == before["cancelled"] + 1 and h["completed"] == before["completed"]
    assert h["tokens"] - before["tokens"] < 480


def test_bad_requests_get_openai_errors(server, bundle):
    url = f"{server}/v1/chat/completions"
    ok = {"model": bundle.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    def post(body=None, content=None, path=url, **kw):
        return httpx.post(path, json=body, content=content, timeout=WAIT_S, **kw)

    assert post(ok).status_code == 200
    assert_error_shape(post(content=b'{"model": ', headers={"content-type": "application/json"}), 400, "invalid_json")
    assert assert_error_shape(post(ok | {"temperature": "hot"}), 400)["param"] == "temperature"
    assert assert_error_shape(post(ok | {"max_tokens": 0}), 400)["param"] == "max_tokens"
    assert assert_error_shape(post(ok | {"messages": [{"role": "robot", "content": "x"}]}), 400)["param"].startswith(
        "messages"
    )
    assert assert_error_shape(post(ok | {"bogus": 1}), 400, "unknown_parameter")["param"] == "bogus"
    assert_error_shape(post({"messages": ok["messages"]}), 400, "missing_required_parameter")
    assert_error_shape(post(ok | {"model": "gpt-4o"}), 404, "model_not_found")
    for bad in (
        {"n": 2},
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        {"response_format": {"type": "json_object"}},
        {"logprobs": True},
        {"presence_penalty": 0.5},
    ):
        err = assert_error_shape(post(ok | bad), 400, "unsupported_parameter")
        assert err["param"] == next(iter(bad))
    long = {"role": "user", "content": "word " * 600}
    assert_error_shape(post(ok | {"messages": [long]}), 400, "context_length_exceeded")
    assert_error_shape(post(ok | {"max_tokens": 100_000}), 400, "context_length_exceeded")
    assert_error_shape(post(content=b"x" * ((1 << 20) + 1), headers={"content-type": "application/json"}), 413)
    assert_error_shape(
        post({"model": bundle.name, "prompt": ["a", "b"]}, path=f"{server}/v1/completions"),
        400,
        "unsupported_parameter",
    )
    assert_error_shape(httpx.get(f"{server}/v1/files/etc/passwd", timeout=10), 404)
    surrogate = b'{"model": "%s", "prompt": "hi \\ud800", "max_tokens": 2}' % bundle.name.encode()
    assert (
        assert_error_shape(
            post(content=surrogate, path=f"{server}/v1/completions", headers={"content-type": "application/json"}), 400
        )["param"]
        == "prompt"
    )
    # The official client raises its typed errors from these bodies.
    c = client(server)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=bundle.name, messages=ok["messages"], n=2)
    assert e.value.code == "unsupported_parameter"
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="hi")
    assert health(server)["status"] == "ok"  # still serving


def test_api_key_required_and_checked(bundle_dir, bundle):
    with running_server(bundle_dir, "--api-key", KEY) as url:
        chat = {"model": bundle.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert_error_shape(httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=WAIT_S), 401, "invalid_api_key")
        wrong = {"Authorization": "Bearer " + KEY[:-1] + "x"}
        assert_error_shape(httpx.get(f"{url}/v1/models", headers=wrong, timeout=10), 401, "invalid_api_key")
        with pytest.raises(openai.AuthenticationError):
            client(url, key="wrong-key").models.list()
        reply = client(url, key=KEY).chat.completions.create(**chat)
        assert reply.usage.completion_tokens >= 1
        assert health(url)["status"] == "ok"  # the health check needs no key


def test_refuses_to_listen_beyond_loopback_without_a_key(bundle_dir):
    env = dict(os.environ)
    env.pop("EDGEPACK_API_KEY", None)
    out = subprocess.run(
        [sys.executable, "-m", "edgepack", "serve", str(bundle_dir), "--host", "0.0.0.0", "--port", str(free_port())],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "API key" in lines[0] and lines[0].startswith("edgepack: error:")


def test_full_queue_answers_429_and_keeps_serving(bundle_dir, bundle):
    """One slot, no queue: a burst of requests gets 200s and 429s (with Retry-After), nothing else."""
    with running_server(bundle_dir, "--parallel", "1", "--queue", "0") as url:
        body = {"model": bundle.name, "prompt": "Count", "max_tokens": 400, "temperature": 0}

        async def burst():
            async with httpx.AsyncClient(timeout=WAIT_S) as ac:
                return await asyncio.gather(*(ac.post(f"{url}/v1/completions", json=body) for _ in range(12)))

        responses = asyncio.run(asyncio.wait_for(burst(), WAIT_S))
        codes = sorted(r.status_code for r in responses)
        assert set(codes) == {200, 429}, codes
        for r in responses:
            if r.status_code == 429:
                assert_error_shape(r, 429, "server_busy")
                assert int(r.headers["retry-after"]) >= 1
        reply = client(url).completions.create(model=bundle.name, prompt="Count", max_tokens=3)
        assert reply.usage.completion_tokens >= 1


def test_a_crashing_request_gets_a_500_and_the_next_is_served(bundle):
    """In process (the crash is injected): an unexpected exception answers 500 in OpenAI's shape."""
    from starlette.testclient import TestClient

    from runtime.batching import BatchScheduler
    from server.app import create_app
    from server.config import ServeConfig

    with BatchScheduler(bundle.decoder(threads=1), bundle.tokenizer, bundle.stop_ids) as scheduler:
        submit, calls = scheduler.submit, []

        def crash_once(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("injected crash")
            return submit(*args, **kwargs)

        scheduler.submit = crash_once
        body = {"model": bundle.name, "prompt": "hi", "max_tokens": 3, "temperature": 0}
        with TestClient(create_app(bundle, scheduler, ServeConfig()), raise_server_exceptions=False) as tc:
            err = assert_error_shape(tc.post("/v1/completions", json=body), 500)
            assert err["type"] == "server_error" and "injected" not in err["message"]
            reply = tc.post("/v1/completions", json=body)
            assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
