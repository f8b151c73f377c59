"""See which tokens of a conversation the model is trained on, as the trainer sees them.

The conversation is encoded with the tokenizer's chat template (the same call SFT uses), then printed
token by token: supervised tokens highlighted (with ANSI colors: two alternating green backgrounds, so
token boundaries show; without colors: supervised spans wrapped in ⟦ ⟧), special tokens shown by name
(`<|im_end|>`, bold cyan), and a summary line. Token texts come from each token's raw bytes through an
incremental UTF-8 decoder, so a character split over two tokens is printed once, with the token that
completes it, and the printed text is exactly the encoded text.
"""

from __future__ import annotations

import codecs
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fucina.tokenizer import FucinaTokenizer

# Supervised tokens alternate two greens so that token boundaries stay visible.
SUPERVISED_STYLES = ("\033[30;42m", "\033[30;102m")
SPECIAL_STYLE = "\033[1;36m"  # bold cyan
SUPERVISED_SPECIAL_STYLE = "\033[1;30;42m"
RESET = "\033[0m"
OPEN, CLOSE = "⟦", "⟧"


def token_texts(tokenizer: FucinaTokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds; a special token is shown by its name."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    texts = []
    for token_id in ids:
        if token_id in tokenizer.special_ids:
            texts.append(decoder.decode(b"", final=True) + tokenizer.id_to_token(token_id))
            decoder.reset()
        else:
            texts.append(decoder.decode(tokenizer.token_bytes(token_id)))
    if texts:
        texts[-1] += decoder.decode(b"", final=True)
    return texts


def _paint(text: str, style: str) -> str:
    if not style:
        return text
    # Style each line on its own so a highlight never bleeds past a line break in terminals.
    return "\n".join(f"{style}{line}{RESET}" if line else line for line in text.split("\n"))


def _colored(tokenizer: FucinaTokenizer, ids: Sequence[int], texts: list[str], mask: Sequence[bool]) -> str:
    runs: list[tuple[str, str]] = []  # (style, text), neighbours with one style merged
    for position, (token_id, text, supervised) in enumerate(zip(ids, texts, mask)):
        special = token_id in tokenizer.special_ids
        if supervised:
            style = SUPERVISED_SPECIAL_STYLE if special else SUPERVISED_STYLES[position % 2]
        else:
            style = SPECIAL_STYLE if special else ""
        if runs and runs[-1][0] == style:
            runs[-1] = (style, runs[-1][1] + text)
        else:
            runs.append((style, text))
    return "".join(_paint(text, style) for style, text in runs)


def _bracketed(texts: list[str], mask: Sequence[bool]) -> str:
    parts: list[str] = []
    in_span = False
    for text, supervised in zip(texts, mask):
        if supervised != in_span:
            parts.append(OPEN if supervised else CLOSE)
            in_span = supervised
        parts.append(text)
    if in_span:
        parts.append(CLOSE)
    return "".join(parts)


def render_mask(
    tokenizer: FucinaTokenizer, messages: Sequence[Mapping], train_on: str = "all", color: bool = True
) -> str:
    """The rendered conversation with supervised tokens highlighted, and an "N tokens, M supervised" line."""
    encoded = tokenizer.template.encode(tokenizer, messages, train_on)
    ids, mask = encoded.input_ids, encoded.assistant_mask
    texts = token_texts(tokenizer, ids)
    body = _colored(tokenizer, ids, texts, mask) if color else _bracketed(texts, mask)
    total, supervised = len(ids), sum(mask)
    share = 100.0 * supervised / total if total else 0.0
    summary = f"{total} tokens, {supervised} supervised ({share:.1f}%), train_on={train_on}"
    return body.rstrip("\n") + "\n\n" + summary
