"""The OpenAI API's request bodies as pydantic models, and its error shape.

Bodies are validated by these models (types, ranges, unknown fields refused). Parameters that the API
defines but edgepack does not implement are declared too, so that setting one to anything but its neutral
value gets a 400 naming it (`unsupported`), never a silent ignore."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field


class ApiError(HTTPException):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(status, detail=error_body(message, type, param, code), headers=headers)


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _Sampling(BaseModel):
    """Fields shared by both endpoints. top_k and repetition_penalty are extensions (as in vLLM and
    llama.cpp's server); unset fields take the bundle's defaults."""

    model_config = ConfigDict(extra="forbid")
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    seed: int | None = None
    stop: str | list[str] | None = Field(None)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the caller's records; changes nothing here
    # Declared so that using them is refused by name (see `unsupported`):
    n: int | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 16:
            raise ApiError(400, "'stop' takes at most 16 strings", param="stop")
        return tuple(s for s in stops if s)

    def unsupported(self) -> str | None:
        """The first parameter set to something edgepack does not do, or None."""
        neutral = {
            "n": (None, 1),
            "logprobs": (None, False, 0),
            "top_logprobs": (None, 0),
            "frequency_penalty": (None, 0),
            "presence_penalty": (None, 0),
            "logit_bias": (None, {}),
        }
        for name, ok in (neutral | self._neutral_extra()).items():
            if getattr(self, name) not in ok:
                return name
        return None

    def _neutral_extra(self) -> dict:
        return {}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: dict | None = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None

    def _neutral_extra(self) -> dict:
        return {
            "tools": (None, []),
            "tool_choice": (None, "none"),
            "functions": (None, []),
            "function_call": (None, "none"),
            "parallel_tool_calls": (None,),
            "response_format": (None, {"type": "text"}),
            "modalities": (None, ["text"]),
            "audio": (None,),
            "prediction": (None,),
            "reasoning_effort": (None,),
        }

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int | None = Field(16, ge=1)  # the API's default for completions
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def _neutral_extra(self) -> dict:
        return {"echo": (False,), "suffix": (None, ""), "best_of": (None, 1)}

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError(
                400,
                "'prompt': give one prompt per request (batches of prompts are not supported)",
                param="prompt",
                code="unsupported_parameter",
            )
        return self.prompt[0]

    def requested_tokens(self) -> int | None:
        return self.max_tokens
