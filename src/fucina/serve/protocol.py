"""The OpenAI request fields fucina honours, checked; everything else is refused, never ignored.

Design choices:
- A request is a JSON object whose every key must be known: a field fucina does not implement
  (tools, response_format, logit_bias, ...) is a 400 naming it, because silently ignoring it would
  answer a different question than the client asked.
- `temperature` defaults to 1, OpenAI's documented default; 0 means greedy. `max_tokens` defaults to
  what is left of the context and may not exceed the server's bound.
- `n` choices of one request decode as `n` engine requests side by side; with a `seed`, choice `i`
  draws with `seed + i`, so they differ from each other yet repeat run to run, streamed or not.
- `top_k`, `repetition_penalty` and `ignore_eos` (generate exactly `max_tokens`, for load tests) are
  vLLM's extensions, which OpenAI clients send through `extra_body`.
- Errors are `APIError`s carrying the HTTP status and OpenAI's error body shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fucina.inference.sampling import SamplingConfig

MAX_N = 8
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 4

_COMMON = {
    "model", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop", "n",
    "stream", "stream_options", "user", "frequency_penalty", "presence_penalty", "logprobs", "ignore_eos",
}  # fmt: skip
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo"}
ROLES = ("system", "user", "assistant")


class APIError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


@dataclass
class GenerationRequest:
    """One checked request: its choices' sampling, stop strings and output options."""

    samplings: list[SamplingConfig]
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: none; k: each token's logprob and k alternatives
    echo: bool = False
    extras: dict[str, Any] = field(default_factory=dict)


def _number(body: dict, name: str, default: float, low: float, high: float, *, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(f"{name} must be a number", name)
    if integer and int(value) != value:
        raise invalid(f"{name} must be an integer", name)
    if not low <= value <= high:
        raise invalid(f"{name} must be between {low} and {high}, got {value}", name)
    return int(value) if integer else float(value)


def check_fields(body: Any, allowed: set[str]) -> dict:
    """The body as a dict, or a 400 naming the first field fucina does not support."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    for key in body:
        if key not in allowed:
            raise invalid(f"the field {key!r} is not supported by this server", key)
    for key in ("frequency_penalty", "presence_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise invalid(f"{key} is not supported (use repetition_penalty); only 0 is accepted", key)
    return body


def parse_generation(
    body: dict, *, stop_token_ids: list[int], room: int, max_tokens_limit: int, chat: bool
) -> GenerationRequest:
    """Check the sampling and output fields; `room` is the context left after the prompt."""
    max_tokens = body.get("max_completion_tokens") if chat else None
    name = "max_completion_tokens" if max_tokens is not None else "max_tokens"
    limit = min(max_tokens_limit, room)
    if body.get(name) is None:
        max_tokens = limit if chat else min(16, limit)  # OpenAI's completions default is 16 tokens
    else:
        # A completion may ask for none: echo with logprobs scores the prompt alone.
        max_tokens = _number(body, name, 0, 1 if chat else 0, max_tokens_limit, integer=True)
    max_tokens = min(max_tokens, room)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise invalid("top_p must be above 0", "top_p")
    top_k = _number(body, "top_k", 0, 0, 1 << 30, integer=True)
    penalty = _number(body, "repetition_penalty", 1.0, 0.01, 10.0)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise invalid("seed must be an integer", "seed")
    n = _number(body, "n", 1, 1, MAX_N, integer=True)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise invalid("stop must be a non-empty string or a list of them", "stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise invalid(f"stop takes at most {MAX_STOP_STRINGS} strings", "stop")
    stream = bool(body.get("stream", False))
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise invalid("stream_options is only allowed with stream: true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise invalid("stream_options supports only include_usage", "stream_options")
    include_usage = bool((options or {}).get("include_usage", False))
    logprobs = _logprobs(body, chat)
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise invalid("ignore_eos must be a boolean", "ignore_eos")
    samplings = [
        SamplingConfig(
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=penalty,
            stop_token_ids=() if ignore_eos else tuple(stop_token_ids),
            seed=None if seed is None else seed + index,
        )
        for index in range(n)
    ]
    echo = bool(body.get("echo", False))
    return GenerationRequest(samplings, stop, stream, include_usage, logprobs, echo)


def _logprobs(body: dict, chat: bool) -> int | None:
    if chat:
        wanted = body.get("logprobs")
        if wanted not in (None, True, False):
            raise invalid("logprobs must be a boolean", "logprobs")
        top = body.get("top_logprobs")
        if top is not None and not wanted:
            raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
        if not wanted:
            return None
        return _number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True)
    if body.get("logprobs") is None:
        return None
    return _number(body, "logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True)


def parse_messages(body: dict) -> list[dict[str, str]]:
    """The conversation as {"role", "content"} dicts with text content."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list", "messages")
    checked = []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise invalid("each message must be an object", param)
        extra = set(message) - {"role", "content"}
        if extra:
            raise invalid(f"message fields {sorted(extra)} are not supported", param)
        if message.get("role") not in ROLES:
            raise invalid(f"role must be one of {', '.join(ROLES)}", f"{param}.role")
        content = message.get("content")
        if isinstance(content, list):  # OpenAI's content parts: text parts only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise invalid("only text content parts are supported", f"{param}.content")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise invalid("content must be a string", f"{param}.content")
        checked.append({"role": message["role"], "content": content})
    return checked
