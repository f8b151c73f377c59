"""The OpenAI-compatible HTTP app: chat and text completions, models, tokenize, health, the web page.

Design choices:
- One model per server, loaded at start from a model directory; the `model` field of a request must be
  absent or name the served model (else 404 `model_not_found`): no request can load another model or
  name a file, and the only files served are the web page's own (serve/static/).
- Generation goes through one `Scheduler` (scheduler.py) that steps one `Engine` for all requests
  (continuous batching); handlers only tokenize, submit, and turn events into OpenAI JSON or SSE.
- Security by default: the CLI binds 127.0.0.1; with an API key every path but /health and the web
  page's own files needs `Authorization: Bearer <key>` (401 otherwise, guard.py); bodies above `max_body_bytes` are refused (413) before
  they are read; `max_tokens` may not exceed the model's context.
- A client that disconnects cancels its engine requests, so their rows are free at the next step:
  a stream's generator is cancelled (its `finally` cancels them); a whole-response request polls for
  the disconnect while it waits.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from fucina.errors import FucinaError
from fucina.inference.engine import Engine
from fucina.model_dir import BEST_DIR, FINAL_DIR, load_pretrained, resolve_model_dir
from fucina.serve import responses
from fucina.serve.generation import choice_pieces, collect, prompt_logprobs
from fucina.serve.guard import Guard
from fucina.serve.protocol import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    APIError,
    check_fields,
    invalid,
    parse_generation,
    parse_messages,
)
from fucina.serve.scheduler import QueueFullError, Scheduler

STATIC_DIR = Path(__file__).parent / "static"
MAX_BODY_BYTES = 1 << 20
DISCONNECT_POLL_S = 0.05  # how often a non-streaming request checks that its client is still there


def served_name(model_dir: str | Path) -> str:
    """The model's name for clients: its directory's name (the run's, for a run's best/ or final/)."""
    path = Path(model_dir).resolve()
    return path.parent.name if path.name in (BEST_DIR, FINAL_DIR) else path.name


def create_app(
    model_dir: str | Path,
    *,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    compile: bool = False,
    model_name: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The app serving the model of `model_dir` (see the module docstring)."""
    if max_queue < 0:
        raise FucinaError(f"max_queue must be >= 0, got {max_queue}")
    directory = resolve_model_dir(model_dir)
    model, tokenizer = load_pretrained(directory)
    model.eval()
    name = model_name or served_name(model_dir)
    context = model.config.context_length
    scheduler = Scheduler(Engine(model, max_batch=max_batch, compile=compile), max_queue=max_queue)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="fucina", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler
    app.state.model_name = name

    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return _error(err)

    async def read_body(request: Request, allowed: set[str] | None = None) -> dict:
        raw = bytearray()
        async for part in request.stream():  # counted as it arrives: a body without a length is bounded too
            raw += part
            if len(raw) > max_body_bytes:
                raise APIError(413, f"the request body is larger than {max_body_bytes} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise invalid(f"the request body is not valid JSON: {err}") from None
        if allowed is not None:
            check_fields(body, allowed)
            requested = body.get("model")
            if requested is not None and requested != name:
                raise APIError(
                    404,
                    f"model {requested!r} is not served here; this server serves {name!r}",
                    "model",
                    "model_not_found",
                )
        elif not isinstance(body, dict):
            raise invalid("the request body must be a JSON object")
        return body

    def render_chat(messages: list[dict[str, str]]) -> list[int]:
        """The prompt ids of a conversation, by the model's chat template; a 400 if it cannot render it."""
        try:
            return tokenizer.template.encode_prompt(tokenizer, messages)
        except FucinaError as err:
            raise invalid(str(err), "messages") from None

    def check_prompt_length(ids: list[int], param: str) -> int:
        """Tokens left for the reply; a 400 naming the limit when the prompt leaves none."""
        if len(ids) >= context:
            raise invalid(
                f"the prompt has {len(ids)} tokens but the model's context is {context} tokens, "
                "which must also hold at least one generated token",
                param,
            )
        return context - len(ids)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, **scheduler.load}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": "fucina"}],
        }

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await read_body(request)
        if "messages" in body:
            ids = render_chat(parse_messages(body))
        elif isinstance(body.get("prompt"), str):
            ids = tokenizer.encode(body["prompt"])
        else:
            raise invalid("give a prompt string or messages", "prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": context}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await read_body(request)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(
            isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids
        ):
            raise invalid(f"tokens must be a list of ids in 0..{tokenizer.vocab_size - 1}", "tokens")
        return {"text": tokenizer.decode(ids)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request, CHAT_FIELDS)
        messages = parse_messages(body)
        prompt = render_chat(messages)
        room = check_prompt_length(prompt, "messages")
        stops = tokenizer.template.stop_token_ids(tokenizer)
        gen = parse_generation(body, stop_token_ids=stops, room=room, max_tokens_limit=context, chat=True)
        handles = submit(scheduler, [(prompt, s, gen.logprobs) for s in gen.samplings])
        reply = responses.ChatReply(tokenizer, name, len(prompt), gen)
        pieces = [choice_pieces(t, q, tokenizer, gen.stop) for t, q in handles]
        tickets = [t for t, _ in handles]
        if gen.stream:
            return _sse(reply.stream(pieces), tickets)
        return reply.whole(await _collect_while_connected(request, pieces, tickets))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request, COMPLETION_FIELDS)
        prompts, start = _completion_prompts(body, tokenizer)
        room = min(check_prompt_length(ids, "prompt") for ids in prompts)
        stops = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        gen = parse_generation(body, stop_token_ids=stops, room=room, max_tokens_limit=context, chat=False)
        echoed = []
        if gen.echo:
            for ids in prompts:
                scored = await asyncio.to_thread(prompt_logprobs, model, ids, gen.logprobs or 0)
                echoed.append(scored[len(start) :])
        jobs = [(ids, s, gen.logprobs) for ids in prompts for s in gen.samplings]
        handles = submit(scheduler, jobs)
        reply = responses.CompletionReply(tokenizer, name, [len(ids) for ids in prompts], gen, echoed)
        pieces = [choice_pieces(t, q, tokenizer, gen.stop) for t, q in handles]
        tickets = [t for t, _ in handles]
        if gen.stream:
            return _sse(reply.stream(pieces), tickets)
        return reply.whole(await _collect_while_connected(request, pieces, tickets))

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            raise APIError(
                404, "this installation has no web page (serve/static/index.html)", code="not_found"
            )
        return FileResponse(page, media_type="text/html")

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    return app


def submit(scheduler: Scheduler, jobs: list) -> list:
    try:
        return scheduler.submit(jobs)
    except QueueFullError as err:
        raise APIError(429, str(err), code="rate_limit_exceeded", kind="rate_limit_error") from None


def _completion_prompts(body: dict, tokenizer) -> tuple[list[list[int]], list[int]]:
    """(the prompts as token ids, the start they were given): text prompts follow an EOS, as documents
    do in training; prompts given as token ids are taken exactly as they are.
    """
    prompt = body.get("prompt")
    vocab = tokenizer.vocab_size
    start = [tokenizer.eos_id] if tokenizer.eos_id is not None else []

    def ids_ok(ids: Any) -> bool:
        return isinstance(ids, list) and bool(ids) and all(isinstance(i, int) and 0 <= i < vocab for i in ids)

    if isinstance(prompt, str):
        return [start + tokenizer.encode(prompt)], start
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return [start + tokenizer.encode(p) for p in prompt], start
    if ids_ok(prompt):
        return [prompt], []
    if isinstance(prompt, list) and prompt and all(ids_ok(p) for p in prompt):
        return list(prompt), []
    raise invalid("prompt must be a string, a list of strings, or token ids", "prompt")


async def _collect_while_connected(request: Request, pieces: list, tickets: list) -> list:
    """Every choice whole; a client that disconnects first cancels them (its rows free at once)."""
    whole = asyncio.ensure_future(asyncio.gather(*(collect(p) for p in pieces)))
    try:
        while True:
            done, _ = await asyncio.wait({whole}, timeout=DISCONNECT_POLL_S)
            if done:
                return whole.result()
            if await request.is_disconnected():
                whole.cancel()
                raise APIError(499, "the client closed the connection", code="client_closed_request")
    finally:
        for ticket in tickets:
            ticket.cancel()


def _error(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _sse(chunks: AsyncIterator[dict | str], tickets: list) -> StreamingResponse:
    """Server-sent events; whatever ends the stream (done, error, disconnect) cancels the requests."""

    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {chunk if isinstance(chunk, str) else json.dumps(chunk, ensure_ascii=False)}\n\n"
        except APIError as err:
            yield f"data: {json.dumps(err.body(), ensure_ascii=False)}\n\n"
        finally:
            for ticket in tickets:
                ticket.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
