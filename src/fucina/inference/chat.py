"""Between a loaded model and text: prompts that fit the context, streamed text, chat sessions.

Design choices:
- A prompt never fills the whole context: `fit_prompt` keeps its last tokens and reserves room for a
  reply (the requested budget, at most half the context), so a long conversation still gets an answer.
- `chat_prompt` drops the oldest turns, a user/assistant pair at a time, never the system message, and
  renders what is left with the model's own chat template (the one training and export use).
- `StreamingDetokenizer` turns token ids into text as they arrive. Byte-level BPE splits characters
  across tokens (Italian accents are two bytes in UTF-8), so the text of the tokens not yet settled is
  held until it decodes to whole characters; once settled, tokens are never decoded again (each push
  decodes only the unsettled tail). Text that could still become a stop string is held back too, and
  a stop string ends the stream with the text before it: a client never sees half of a stop string.
- `ChatSession` keeps one conversation's history and streams each reply through the above; the same
  pieces serve `fucina chat` and the server.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from fucina.inference.generate import SamplingConfig, stream

if TYPE_CHECKING:
    from fucina.model.transformer import Transformer
    from fucina.tokenizer import FucinaTokenizer

_INCOMPLETE = "\ufffd"  # what decoding yields for the bytes of a character not yet complete


def reply_reserve(context_length: int, max_new_tokens: int) -> int:
    """Context slots kept free for the reply: the budget, but at most half the context (at least 1)."""
    return min(max_new_tokens, max(1, context_length // 2))


def fit_prompt(prompt_ids: list[int], context_length: int, max_new_tokens: int) -> tuple[list[int], int]:
    """Keep the prompt's last tokens so that some reply fits; returns (prompt, max new tokens)."""
    reserve = reply_reserve(context_length, max_new_tokens)
    if len(prompt_ids) > context_length - reserve:
        prompt_ids = prompt_ids[-(context_length - reserve) :]
    return prompt_ids, min(max_new_tokens, context_length - len(prompt_ids))


def chat_prompt(
    tokenizer: FucinaTokenizer, messages: Sequence[Mapping], context_length: int, max_new_tokens: int
) -> list[int]:
    """Prompt ids for `messages`, dropping the oldest turns (never the system message) to fit."""
    reserve = reply_reserve(context_length, max_new_tokens)
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = list(messages[len(system) :])
    while True:
        ids = tokenizer.template.encode_prompt(tokenizer, system + turns)
        if len(ids) <= context_length - reserve or len(turns) <= 1:
            return ids
        turns = turns[2:] if len(turns) > 2 else turns[-1:]


class StreamingDetokenizer:
    """Token ids in, text pieces out: whole characters only, never a part of a stop string.

    `push(id)` returns the text that became safe to show (often ""); `finish()` returns what was held
    back at the end. After a stop string, `stopped` is True and further pushes return "". `text` is all
    the text handed out so far.
    """

    def __init__(self, tokenizer: FucinaTokenizer, stop_strings: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.stopped = False
        self._ids: list[int] = []
        self._settled = 0  # ids[:settled] are decoded into _text
        self._text = ""  # text of the settled ids: whole characters only
        self._released = 0  # characters of _text handed out

    @property
    def text(self) -> str:
        return self._text[: self._released]

    def push(self, token_id: int) -> str:
        """Add one generated token; the text now safe to show."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        tail = self.tokenizer.decode(self._ids[self._settled :])
        if tail.endswith(_INCOMPLETE):
            return ""  # a character split across tokens: wait for its other bytes
        self._settle(tail)
        return self._release(final=False)

    def finish(self) -> str:
        """The text still held back (a dangling byte sequence shows as U+FFFD)."""
        if self.stopped:
            return ""
        if self._settled < len(self._ids):
            self._settle(self.tokenizer.decode(self._ids[self._settled :]))
        return self._release(final=True)

    def _settle(self, tail: str) -> None:
        self._text += tail
        self._settled = len(self._ids)

    def _release(self, final: bool) -> str:
        end = len(self._text)
        if self.stop_strings:
            hits = [i for s in self.stop_strings if (i := self._text.find(s, self._released)) >= 0]
            if hits:
                end = min(hits)
                self.stopped = True
                self._text = self._text[:end]
            elif not final:
                end -= self._held_back(self._text[self._released :])
        piece = self._text[self._released : end]
        self._released = end
        return piece

    def _held_back(self, pending: str) -> int:
        """Length of the longest end of `pending` that begins some stop string."""
        for size in range(min(len(pending), max(map(len, self.stop_strings)) - 1), 0, -1):
            end = pending[-size:]
            if any(s.startswith(end) for s in self.stop_strings):
                return size
        return 0


def stream_text(
    model: Transformer,
    tokenizer: FucinaTokenizer,
    prompt: list[int],
    sampling: SamplingConfig,
    stop_strings: Sequence[str] = (),
    compile: bool = False,
) -> Iterator[str]:
    """Text pieces of the model's continuation of `prompt`, through a StreamingDetokenizer."""
    detokenizer = StreamingDetokenizer(tokenizer, stop_strings)
    for token in stream(model, prompt, sampling, compile=compile):
        piece = detokenizer.push(token)
        if piece:
            yield piece
        if detokenizer.stopped:
            return
    piece = detokenizer.finish()
    if piece:
        yield piece


class ChatSession:
    """One conversation with a model: the history, fitted to the context, and streamed replies."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: FucinaTokenizer,
        sampling: SamplingConfig,
        system: str | None = None,
        compile: bool = False,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.system = [{"role": "system", "content": system}] if system else []
        self.compile = compile
        self.history: list[dict] = []

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.history = []

    def prompt(self) -> tuple[list[int], int]:
        """(prompt ids, reply budget) for the conversation so far."""
        context = self.model.config.context_length
        ids = chat_prompt(self.tokenizer, self.system + self.history, context, self.sampling.max_new_tokens)
        return fit_prompt(ids, context, self.sampling.max_new_tokens)

    def send(self, message: str) -> Iterator[str]:
        """Add a user message and stream the reply; the reply joins the history when it is complete."""
        self.history.append({"role": "user", "content": message})
        prompt, budget = self.prompt()
        pieces: list[str] = []
        sampling = replace(self.sampling, max_new_tokens=budget)
        for piece in stream_text(self.model, self.tokenizer, prompt, sampling, compile=self.compile):
            pieces.append(piece)
            yield piece
        self.history.append({"role": "assistant", "content": "".join(pieces).strip() or "…"})
