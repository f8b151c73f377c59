"""Preference pairs for DPO: reading TRL-style JSONL, encoding both sides, padded pair batches.

Design choices:
- Two record formats, the ones TRL users already have: `{"prompt", "chosen", "rejected"}` as strings
  (the prompt becomes one user message), or conversational (`prompt` a list of messages, `chosen` and
  `rejected` each a list holding one assistant message, or an assistant message object). Errors name
  the file and line, as every other reader does.
- The prompt is encoded ONCE with the chat template's generation prompt, and each answer is the suffix
  of its full conversation after those ids (checked to be a prefix), so the prompt ids are identical on
  both sides by construction and only each answer's tokens and its end marker are scored.
- Long pairs are cut at context_length from the right, like SFT. A pair whose answers encode to the
  same ids, or which leaves one side with nothing scored, teaches nothing: it is dropped and counted.
- A batch stacks the chosen rows first and the rejected rows after them, padded to one length, so the
  policy scores both sides in one forward and the objective splits the rows in half.
- A dataset can carry the reference model's log-probabilities of each pair (`reference_logps`, computed
  once by the DPO objective when `dpo.precompute_reference` is set); batches then hold them, in the
  same chosen-then-rejected order, and the reference model is not needed while training.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fucina.data.readers import iter_json_records
from fucina.data.sft import IGNORE_INDEX, shifted_labels
from fucina.errors import DataError
from fucina.tokenizer import FucinaTokenizer

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (messages ending with a user turn) and two assistant answers, the better one first."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str


def _messages(value: Any, key: str, path: Path, line: int) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"field '{key}' must be a non-empty list of {{role, content}} messages", path, line)
    messages = []
    for number, message in enumerate(value, 1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise DataError(f"{key} message {number} must be an object with a 'role'", path, line)
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            raise DataError(f"{key} message {number} has no text 'content'", path, line)
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _answer(value: Any, key: str, path: Path, line: int) -> str:
    """An answer: a string, an assistant message, or a list holding exactly one assistant message."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"field '{key}' is empty", path, line)
        return value
    if isinstance(value, dict):
        value = [value]
    messages = _messages(value, key, path, line)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise DataError(f"field '{key}' must hold exactly one assistant message", path, line)
    return messages[0]["content"]


def parse_preference_record(record: dict, path: str | Path, line: int) -> PreferencePair:
    """One JSONL record as a PreferencePair; DataError (path, line) on a missing or malformed field."""
    path = Path(path)
    missing = [key for key in ("prompt", "chosen", "rejected") if key not in record]
    if missing:
        raise DataError(
            f"a preference record needs 'prompt', 'chosen' and 'rejected' (missing {', '.join(missing)})",
            path,
            line,
        )
    prompt = record["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError("field 'prompt' is empty", path, line)
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = _messages(prompt, "prompt", path, line)
        if messages[-1]["role"] != "user":
            raise DataError("the prompt's last message must be a user message", path, line)
    return PreferencePair(
        messages,
        _answer(record["chosen"], "chosen", path, line),
        _answer(record["rejected"], "rejected", path, line),
    )


def read_preference_pairs(paths: Sequence[str | Path]) -> Iterator[PreferencePair]:
    """The preference pairs of JSONL files (.xz/.gz too), in file order."""
    for path in paths:
        for line, record in iter_json_records(path):
            yield parse_preference_record(record, path, line)


@dataclass(frozen=True)
class EncodedSide:
    """One side of a pair: inputs and shifted labels (-100 on the prompt), and the answer's ids."""

    input_ids: list[int]
    labels: list[int]
    answer_ids: list[int]


def encode_side(
    tokenizer: FucinaTokenizer, prompt: list[dict[str, str]], prompt_ids: list[int], answer: str
) -> EncodedSide:
    """The conversation prompt + answer; only the answer's tokens and its end marker are labelled."""
    template = tokenizer.template
    encoded = template.encode(tokenizer, [*prompt, {"role": "assistant", "content": answer}], "last")
    if encoded.input_ids[: len(prompt_ids)] != prompt_ids:
        raise DataError(
            f"the {template.name!r} template does not render the prompt as a prefix of the conversation"
        )
    mask = [False] * len(prompt_ids) + encoded.assistant_mask[len(prompt_ids) :]
    inputs, labels = shifted_labels(encoded.input_ids, mask)
    return EncodedSide(inputs, labels, encoded.input_ids[len(prompt_ids) :])


class PreferenceDataset:
    """Encoded pairs, truncated to context_length; each kept pair has distinct, scored answers."""

    def __init__(self, pairs: Sequence[PreferencePair], tokenizer: FucinaTokenizer, context_length: int):
        self.identical = 0  # pairs dropped because both answers encode to the same ids
        self.unscored = 0  # pairs dropped because truncation left a side with nothing scored
        self._items: list[dict[str, np.ndarray]] = []
        for index, pair in enumerate(pairs):
            try:
                prompt_ids = tokenizer.template.encode_prompt(tokenizer, pair.prompt)
                chosen = encode_side(tokenizer, pair.prompt, prompt_ids, pair.chosen)
                rejected = encode_side(tokenizer, pair.prompt, prompt_ids, pair.rejected)
            except DataError as err:
                raise DataError(f"preference pair {index}: {err}") from err
            if chosen.answer_ids == rejected.answer_ids:
                self.identical += 1
                continue
            sides = [
                (side.input_ids[:context_length], side.labels[:context_length]) for side in (chosen, rejected)
            ]
            if any(all(label == IGNORE_INDEX for label in labels) for _, labels in sides):
                self.unscored += 1
                continue
            (c_in, c_lab), (r_in, r_lab) = sides
            self._items.append(
                {
                    "chosen_input_ids": np.asarray(c_in, dtype=np.int32),
                    "chosen_labels": np.asarray(c_lab, dtype=np.int32),
                    "rejected_input_ids": np.asarray(r_in, dtype=np.int32),
                    "rejected_labels": np.asarray(r_lab, dtype=np.int32),
                }
            )
        if self.identical or self.unscored:
            log.warning(
                "dropped %d preference pair(s) with identical answers and %d with nothing scored "
                "within context_length=%d",
                self.identical,
                self.unscored,
                context_length,
            )
        self.reference_logps: np.ndarray | None = None  # (N, 2) float32: chosen, rejected; see module doc
        # The sampler groups pairs by their longer side, the length a batch is padded to.
        self.lengths = [max(len(i["chosen_input_ids"]), len(i["rejected_input_ids"])) for i in self._items]

    @property
    def dropped(self) -> int:
        return self.identical + self.unscored

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, list]:
        item = {key: value.tolist() for key, value in self._items[index].items()}
        item["labels"] = item["chosen_labels"]  # the chosen side: what validation counts bytes on
        if self.reference_logps is not None:
            item["reference_logps"] = self.reference_logps[index].tolist()
        return item


def collate_pairs(examples: Sequence[dict[str, Sequence[int]]], pad_id: int) -> Batch:
    """Chosen rows then rejected rows, right-padded to one length: input_ids and labels, (2B, T)."""
    if not examples:
        raise ValueError("collate_pairs needs at least one pair")
    rows = [(e["chosen_input_ids"], e["chosen_labels"]) for e in examples]
    rows += [(e["rejected_input_ids"], e["rejected_labels"]) for e in examples]
    longest = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, labs) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        labels[row, : len(labs)] = torch.as_tensor(labs, dtype=torch.long)
    batch = {"input_ids": input_ids, "labels": labels}
    if "reference_logps" in examples[0]:
        chosen = [e["reference_logps"][0] for e in examples]
        batch["reference_logps"] = torch.tensor(chosen + [e["reference_logps"][1] for e in examples])
    return batch


def render_pair(tokenizer: FucinaTokenizer, pair: PreferencePair) -> str:
    """Both sides of a pair token by token, the scored tokens within ⟦ ⟧, and what each side scores."""
    from fucina.data.mask_view import token_texts

    prompt_ids = tokenizer.template.encode_prompt(tokenizer, pair.prompt)
    blocks = []
    for name, answer in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        side = encode_side(tokenizer, pair.prompt, prompt_ids, answer)
        ids = [*side.input_ids, side.answer_ids[-1]]
        scored = [False, *(label != IGNORE_INDEX for label in side.labels)]  # labels[t] scores ids[t + 1]
        parts, inside = [], False
        for text, is_scored in zip(token_texts(tokenizer, ids), scored, strict=True):
            if is_scored != inside:
                parts.append("⟦" if is_scored else "⟧")
                inside = is_scored
            parts.append(text)
        if inside:
            parts.append("⟧")
        count = sum(scored)
        blocks.append(
            f"== {name}: {len(ids)} tokens, {len(prompt_ids)} of prompt, {count} scored ==\n" + "".join(parts)
        )
    return "\n\n".join(blocks)
