"""OpenAI's response shapes, whole and streamed, for chat and text completions.

Design choices:
- Every chunk of a stream carries the same `id` and `created`; a chat stream opens each choice with
  `delta.role = "assistant"`, sends text as it becomes safe, closes each choice with an empty delta and
  its `finish_reason`, adds the usage chunk (empty `choices`) when `stream_options.include_usage` asks,
  and ends with `[DONE]`.
- The `n` choices of a request stream interleaved, each piece sent as soon as its choice has it.
- Logprobs follow OpenAI: chat's `{"content": [{token, logprob, bytes, top_logprobs}]}`, completions'
  `{tokens, token_logprobs, top_logprobs, text_offset}` (with `echo`, the prompt's tokens come first; a
  prompt's first token has no logprob only when nothing precedes it).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fucina.serve.generation import ChoiceResult, Piece, TokenLogprob, token_text
from fucina.serve.protocol import GenerationRequest
from fucina.tokenizer import FucinaTokenizer


async def interleaved(pieces: list[AsyncIterator[Piece]]) -> AsyncIterator[tuple[int, Piece]]:
    """(choice index, piece) from every choice, as each arrives."""
    arrived: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, source: AsyncIterator[Piece]) -> None:
        try:
            async for piece in source:
                await arrived.put((index, piece))
        except Exception as err:  # noqa: BLE001 - handed to the consumer, which raises it
            await arrived.put((index, err))
        finally:
            await arrived.put((index, None))

    tasks = [asyncio.create_task(pump(i, source)) for i, source in enumerate(pieces)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await arrived.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


class _Reply:
    object_name = ""
    chunk_name = ""
    prefix = ""

    def __init__(self, tokenizer: FucinaTokenizer, model: str, gen: GenerationRequest):
        self.tokenizer = tokenizer
        self.model = model
        self.gen = gen
        self.id = f"{self.prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def head(self, name: str) -> dict[str, Any]:
        return {"id": self.id, "object": name, "created": self.created, "model": self.model}

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        total = prompt_tokens + completion_tokens
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}

    def chunk(self, choices: list[dict]) -> dict[str, Any]:
        chunk = {**self.head(self.chunk_name), "choices": choices}
        if self.gen.include_usage:
            chunk["usage"] = None
        return chunk


class ChatReply(_Reply):
    """The answer to /v1/chat/completions."""

    object_name = "chat.completion"
    chunk_name = "chat.completion.chunk"
    prefix = "chatcmpl"

    def __init__(self, tokenizer: FucinaTokenizer, model: str, prompt_tokens: int, gen: GenerationRequest):
        super().__init__(tokenizer, model, gen)
        self.prompt_tokens = prompt_tokens

    def logprobs(self, tokens: list[TokenLogprob]) -> dict | None:
        if self.gen.logprobs is None:
            return None
        return {"content": [self._entry(t.token, t.logprob, t.top) for t in tokens]}

    def _entry(self, token: int, logprob: float | None, top=()) -> dict[str, Any]:
        text = token_text(self.tokenizer, token)
        entry = {"token": text, "logprob": logprob, "bytes": list(self.tokenizer.token_bytes(token))}
        if self.gen.logprobs is not None:
            entry["top_logprobs"] = [self._entry(i, value) for i, value in top]
        return entry

    def whole(self, results: list[ChoiceResult]) -> dict[str, Any]:
        choices = [
            {
                "index": index,
                "message": {"role": "assistant", "content": result.text},
                "logprobs": self.logprobs(result.tokens),
                "finish_reason": result.finish_reason,
            }
            for index, result in enumerate(results)
        ]
        produced = sum(len(r.tokens) for r in results)
        return {
            **self.head(self.object_name),
            "choices": choices,
            "usage": self.usage(self.prompt_tokens, produced),
        }

    async def stream(self, pieces: list[AsyncIterator[Piece]]) -> AsyncIterator[dict | str]:
        for index in range(len(pieces)):
            delta = {"role": "assistant", "content": ""}
            yield self.chunk([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}])
        produced = 0
        async for index, piece in interleaved(pieces):
            produced += len(piece.tokens)
            if piece.text or (piece.tokens and self.gen.logprobs is not None):
                choice = {"index": index, "delta": {"content": piece.text}, "finish_reason": None}
                choice["logprobs"] = self.logprobs(piece.tokens)
                yield self.chunk([choice])
            if piece.finish_reason is not None:
                yield self.chunk(
                    [{"index": index, "delta": {}, "logprobs": None, "finish_reason": piece.finish_reason}]
                )
        if self.gen.include_usage:
            yield {
                **self.head(self.chunk_name),
                "choices": [],
                "usage": self.usage(self.prompt_tokens, produced),
            }
        yield "[DONE]"


class CompletionReply(_Reply):
    """The answer to /v1/completions: `n` choices for each prompt, prompt `p`'s at `p * n ...`."""

    object_name = "text_completion"
    chunk_name = "text_completion"
    prefix = "cmpl"

    def __init__(
        self,
        tokenizer: FucinaTokenizer,
        model: str,
        prompt_lengths: list[int],
        gen: GenerationRequest,
        echoed: list[list[TokenLogprob]],
    ):
        super().__init__(tokenizer, model, gen)
        self.prompt_lengths = prompt_lengths
        self.echoed = echoed  # per prompt, when echo: its tokens with their logprobs

    def _prompt_of(self, index: int) -> list[TokenLogprob]:
        return self.echoed[index // len(self.gen.samplings)] if self.gen.echo else []

    def logprobs(self, tokens: list[TokenLogprob], offset: int = 0) -> dict | None:
        if self.gen.logprobs is None:
            return None
        texts = [token_text(self.tokenizer, t.token) for t in tokens]
        offsets, seen = [], b""  # a token's offset: the whole characters of the bytes before it
        for t in tokens:
            offsets.append(offset + len(seen.decode("utf-8", errors="ignore")))
            seen += self.tokenizer.token_bytes(t.token)
        return {
            "tokens": texts,
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [
                {token_text(self.tokenizer, i): value for i, value in t.top}
                if t.logprob is not None
                else None
                for t in tokens
            ],
            "text_offset": offsets,
        }

    def whole(self, results: list[ChoiceResult]) -> dict[str, Any]:
        choices = []
        for index, result in enumerate(results):
            echoed = self._prompt_of(index)
            prefix = self.tokenizer.decode([t.token for t in echoed])
            choices.append(
                {
                    "index": index,
                    "text": prefix + result.text,
                    "logprobs": self.logprobs(echoed + result.tokens),
                    "finish_reason": result.finish_reason,
                }
            )
        produced = sum(len(r.tokens) for r in results)
        return {
            **self.head(self.object_name),
            "choices": choices,
            "usage": self.usage(sum(self.prompt_lengths), produced),
        }

    async def stream(self, pieces: list[AsyncIterator[Piece]]) -> AsyncIterator[dict | str]:
        offsets = [0] * len(pieces)
        for index in range(len(pieces)):
            echoed = self._prompt_of(index)
            if echoed:
                text = self.tokenizer.decode([t.token for t in echoed])
                logprobs = self.logprobs(echoed)
                offsets[index] = len(text)
                yield self.chunk(
                    [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}]
                )
        produced = 0
        async for index, piece in interleaved(pieces):
            produced += len(piece.tokens)
            if (
                piece.text
                or piece.finish_reason is not None
                or (piece.tokens and self.gen.logprobs is not None)
            ):
                choice = {
                    "index": index,
                    "text": piece.text,
                    "logprobs": self.logprobs(piece.tokens, offsets[index]),
                    "finish_reason": piece.finish_reason,
                }
                offsets[index] += len(piece.text)
                yield self.chunk([choice])
        if self.gen.include_usage:
            usage = self.usage(sum(self.prompt_lengths), produced)
            yield {**self.head(self.chunk_name), "choices": [], "usage": usage}
        yield "[DONE]"
