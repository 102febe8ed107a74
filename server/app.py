"""The FastAPI application: OpenAI's /v1/models, /v1/chat/completions and /v1/completions over a
runtime.batching.BatchScheduler, plus /health and /v1/bundle (the manifest's recipe, size and claims).

Every 4xx/5xx answers in OpenAI's error shape. Generation runs on the scheduler's thread; its events reach
the request's coroutine through `loop.call_soon_threadsafe`. A client that disconnects cancels its request
(the slot is freed at the scheduler's next iteration). No route takes a path from the request."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import replace

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.batching import BatchScheduler, QueueFull
from runtime.errors import EdgepackError
from runtime.generation import SamplingSettings
from server.config import ServeConfig
from server.protocol import ApiError, ChatCompletionRequest, CompletionRequest, error_body

log = logging.getLogger("edgepack.server")

FINISH = {"eos": "stop", "stop_string": "stop", "max_tokens": "length", "context_full": "length"}
RETRY_AFTER_S = "1"


def create_app(bundle, scheduler: BatchScheduler, config: ServeConfig) -> FastAPI:
    """The app for one opened bundle and its scheduler (both owned by the caller)."""
    app = FastAPI(title="edgepack", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    model_id = bundle.name
    created = int(time.time())
    defaults = bundle.sampling_defaults()
    system_prompt = bundle.system_prompt
    tokenizer = bundle.tokenizer

    async def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise ApiError(
                401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key"
            )

    authorized = [Depends(check_key)]

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        body = (
            exc.detail
            if isinstance(exc.detail, dict) and "error" in exc.detail
            else error_body(str(exc.detail), "invalid_request_error" if exc.status_code < 500 else "server_error")
        )
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse(validation_body(exc.errors()), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        log.exception("request failed")
        return JSONResponse(error_body("internal server error (see the server's log)", "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, **scheduler.status()}

    @app.get("/v1/models", dependencies=authorized)
    async def models():
        return {"object": "list", "data": [model_card(model_id, created)]}

    @app.get("/v1/models/{model}", dependencies=authorized)
    async def model(model: str):
        check_model(model, model_id)
        return model_card(model_id, created)

    @app.get("/v1/bundle", dependencies=authorized)
    async def bundle_info():
        d = bundle.describe()
        m = bundle.manifest
        return {
            "id": model_id,
            "recipe": m["recipe"],
            "stages": d["stages"],
            "size_bytes": d["size_bytes"],
            "size_text": d["size_text"],
            "parameters": d["parameters"],
            "context_length": d["context_length"],
            "quality": m["quality"],
            "created_by": d["created_by"],
        }

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_request(body, model_id)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        if system_prompt and messages[0]["role"] != "system":  # as `edgepack generate` and `edgepack chat`
            messages.insert(0, {"role": "system", "content": system_prompt})
        for m in messages:
            unicode_text(m["content"], "messages")
        try:  # the bundle's chat template, as ChatSession renders it; special tokens typed in a message stay text
            prompt = tokenizer.encode_chat(messages, add_generation_prompt=True)
        except EdgepackError as e:
            raise ApiError(400, str(e), param="messages") from None
        settings = sampling(body, defaults, len(prompt), scheduler.context, "messages")
        return await respond(request, body, prompt, settings, "chat")

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(body: CompletionRequest, request: Request):
        check_request(body, model_id)
        prompt = tokenizer.encode_text(
            unicode_text(body.prompt_text(), "prompt"), add_special_tokens=True
        )  # as generate --raw
        settings = sampling(body, defaults, len(prompt), scheduler.context, "prompt")
        return await respond(request, body, prompt, settings, "text")

    async def respond(request: Request, body, prompt: list[int], settings: SamplingSettings, kind: str):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(event):  # scheduler thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            handle = scheduler.submit(prompt, settings, on_event)
        except QueueFull as e:
            raise ApiError(
                429,
                f"{e}; retry later",
                type="rate_limit_error",
                code="server_busy",
                headers={"Retry-After": RETRY_AFTER_S},
            ) from None
        except EdgepackError as e:
            raise ApiError(400, str(e)) from None
        ident = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        # Also when a stream is dropped before its first chunk (its generator's `finally` never runs).
        watcher = asyncio.create_task(cancel_on_disconnect(request, handle))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                sse(handle, watcher, events, ident, model_id, kind, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        try:
            while await events.get() is not None:
                pass
        finally:
            watcher.cancel()
            handle.cancel()
        if handle.error is not None:
            raise ApiError(500, f"generation failed: {handle.error}", type="server_error")
        return completion_body(handle.result, ident, model_id, kind)

    return app


def check_request(body, model_id: str) -> None:
    check_model(body.model, model_id)
    bad = body.unsupported()
    if bad:
        raise ApiError(
            400, f"'{bad}' is not supported by edgepack serve (leave it unset)", param=bad, code="unsupported_parameter"
        )
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "'stream_options' is only allowed with stream=true", param="stream_options")


def unicode_text(text: str, param: str) -> str:
    """JSON can carry lone UTF-16 surrogates ("\\ud800") that no tokenizer accepts: a 400, not a 500."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(
            400,
            f"'{param}' contains text that is not valid Unicode (a lone surrogate)",
            param=param,
            code="invalid_value",
        ) from None
    return text


def check_model(name: str, model_id: str) -> None:
    if name != model_id:
        raise ApiError(
            404,
            f"The model '{name}' does not exist; this server serves '{model_id}'",
            param="model",
            code="model_not_found",
        )


def sampling(body, defaults: SamplingSettings, prompt_tokens: int, context: int, what: str) -> SamplingSettings:
    """The request's settings over the bundle's defaults; the reply must fit the context."""
    requested = body.requested_tokens()
    if prompt_tokens >= context or (requested is not None and prompt_tokens + requested > context):
        asked = prompt_tokens + (requested or 1)
        raise ApiError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{asked} tokens ({prompt_tokens} in the {what}, {asked - prompt_tokens} in the "
            "completion). Please reduce the length of the prompt or of the completion.",
            param=what,
            code="context_length_exceeded",
        )
    overrides = {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "repetition_penalty": body.repetition_penalty,
        "seed": body.seed,
    }
    max_new = requested if requested is not None else min(defaults.max_new_tokens, context - prompt_tokens)
    settings = replace(
        defaults,
        **{k: v for k, v in overrides.items() if v is not None},
        max_new_tokens=max_new,
        stop_strings=body.stop_strings(),
    )
    try:
        settings.check()
    except EdgepackError as e:
        raise ApiError(400, str(e)) from None
    return settings


async def cancel_on_disconnect(request: Request, handle) -> None:
    """Cancel `handle` when the client goes away (the body has been read, so the next message is the
    disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            handle.cancel()
            return


async def sse(
    handle, watcher: asyncio.Task, events: asyncio.Queue, ident: str, model_id: str, kind: str, include_usage: bool
):
    """Server-sent events: one chunk per text delta, a last chunk with finish_reason, optionally a usage
    chunk, then `data: [DONE]`. Closing the stream (a disconnect) cancels the request."""
    created = int(time.time())
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(choices: list, usage: dict | None = None) -> str:
        payload = {"id": ident, "object": obj, "created": created, "model": model_id, "choices": choices}
        if include_usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def choice(text: str | None, finish: str | None, role: bool = False) -> dict:
        if kind == "chat":
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    try:
        if kind == "chat":
            yield chunk([choice("", None, role=True)])
        while True:
            event = await events.get()
            if event is None:
                break
            if event.text:
                yield chunk([choice(event.text, None)])
        if handle.error is not None:
            yield f"data: {json.dumps(error_body(f'generation failed: {handle.error}', 'server_error'))}\n\n"
        else:
            result = handle.result
            yield chunk([choice(None if kind == "chat" else "", FINISH.get(result.stop_reason, "stop"))])
            if include_usage:
                yield chunk([], usage(result))
        yield "data: [DONE]\n\n"
    finally:
        watcher.cancel()
        handle.cancel()  # no-op when finished; frees the slot when the client went away


def usage(result) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.new_tokens,
        "total_tokens": result.prompt_tokens + result.new_tokens,
    }


def completion_body(result, ident: str, model_id: str, kind: str) -> dict:
    finish = FINISH.get(result.stop_reason, "stop")
    if kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": result.text},
            "logprobs": None,
            "finish_reason": finish,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {
        "id": ident,
        "object": obj,
        "created": int(time.time()),
        "model": model_id,
        "choices": [choice],
        "usage": usage(result),
    }


def model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "edgepack"}


def validation_body(errors) -> dict:
    """OpenAI's shape for pydantic's first complaint: bad JSON, a wrong type, an unknown field."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return error_body(
            "We could not parse the JSON body of your request: it must be valid JSON.", code="invalid_json"
        )
    if first.get("type") == "extra_forbidden":
        return error_body(f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    if first.get("type") == "missing":
        return error_body(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    msg = first.get("msg", "invalid request")
    return error_body(
        f"Invalid value for '{param}': {msg}." if param else f"Invalid request: {msg}.",
        param=param,
        code="invalid_value",
    )


class BodyLimit:
    """ASGI middleware: request bodies over `max_bytes` get 413 (by Content-Length, or while streaming in)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = ApiError(413, f"request body larger than {self.max_bytes} bytes", code="body_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            response = JSONResponse(too_large.detail, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_large  # FastAPI passes HTTPExceptions from body reading through
            return message

        await self.app(scope, limited, send)
