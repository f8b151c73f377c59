"""From engine events to OpenAI choices: text through the streaming detokenizer, logprobs, finish reasons.

Design choices:
- Each choice reads its own event queue (scheduler.py) and passes tokens through a
  `StreamingDetokenizer`, so a piece never ends inside a UTF-8 character nor shows part of a stop
  string. A stop string found in the text ends the choice at once and cancels its engine request.
- The engine's "context" end is reported as "length", the only other reason OpenAI clients know.
- Prompt logprobs (completions `echo` with `logprobs`) come from one forward over the prompt: the
  log-probability of each token given the tokens before it, the numbers lm-evaluation-harness sums.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from fucina.errors import FucinaError
from fucina.inference.chat import StreamingDetokenizer
from fucina.inference.engine import StepEvent
from fucina.model.transformer import Transformer
from fucina.serve.protocol import APIError
from fucina.serve.scheduler import Ticket
from fucina.tokenizer import FucinaTokenizer


@dataclass
class TokenLogprob:
    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Piece:
    """Text that became safe to send, the tokens that produced it, and the finish reason at the end."""

    text: str
    tokens: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


async def choice_pieces(
    ticket: Ticket, events: asyncio.Queue, tokenizer: FucinaTokenizer, stop: list[str]
) -> AsyncIterator[Piece]:
    """Pieces of one choice as its tokens arrive; the last one carries the finish reason."""
    detokenizer = StreamingDetokenizer(tokenizer, stop)
    while True:
        event: StepEvent | Exception = await events.get()
        if isinstance(event, FucinaError):  # the engine refused the request
            raise APIError(400, str(event))
        if isinstance(event, Exception):  # a decoding step failed
            raise APIError(500, f"decoding failed: {event}", kind="server_error")
        tokens = []
        text = ""
        if event.token is not None:
            tokens.append(TokenLogprob(event.token, event.logprob, event.top_logprobs))
            text = detokenizer.push(event.token)
        if detokenizer.stopped:
            ticket.cancel()
            yield Piece(text, tokens, "stop")
            return
        if event.finished is not None:
            text += detokenizer.finish()
            yield Piece(text, tokens, "stop" if event.finished == "stop" else "length")
            return
        if text or tokens:
            yield Piece(text, tokens)


@dataclass
class ChoiceResult:
    text: str
    tokens: list[TokenLogprob]
    finish_reason: str


async def collect(pieces: AsyncIterator[Piece]) -> ChoiceResult:
    """A whole choice: its text, its tokens and why it ended."""
    text, tokens, reason = [], [], "length"
    async for piece in pieces:
        text.append(piece.text)
        tokens.extend(piece.tokens)
        reason = piece.finish_reason or reason
    return ChoiceResult("".join(text), tokens, reason)


def prompt_logprobs(model: Transformer, ids: list[int], top: int) -> list[TokenLogprob]:
    """Each token's log-probability given the ones before it (the first one has none)."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids], dtype=torch.long))[0].float()  # (T, vocab)
        logprobs = logits[:-1].log_softmax(dim=-1)  # (T - 1, vocab): predicts ids[1:]
        picked = logprobs.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist()
        best = logprobs.topk(top, dim=-1) if top > 0 else None
    result = [TokenLogprob(ids[0], None)]
    for position, (token, value) in enumerate(zip(ids[1:], picked)):
        pairs = ()
        if best is not None:
            pairs = tuple(zip(best.indices[position].tolist(), best.values[position].tolist()))
        result.append(TokenLogprob(token, value, pairs))
    return result


def token_text(tokenizer: FucinaTokenizer, token: int) -> str:
    """A token as text; a token holding part of a UTF-8 character shows its bytes as U+FFFD."""
    return tokenizer.token_bytes(token).decode("utf-8", errors="replace")
