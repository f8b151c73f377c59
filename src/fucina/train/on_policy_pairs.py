"""On-policy preference pairs: the reference answer is chosen, the model's own sampled answer rejected.

Design choices:
- No Italian preference set is openly available, so pairs are built from chat data the model was (or
  could be) fine-tuned on: for each conversation the prompt is everything before its LAST assistant
  turn, `chosen` that turn, `rejected` what the model samples for the same prompt. DPO then moves the
  policy from its own answers towards the reference ones (on-policy, as in SPIN).
- Sampling is seeded (one seed for the whole call), so the same model, data and seed give the same
  pairs. A conversation is skipped (and counted) when it has no assistant turn after a user turn, when
  its prompt leaves no room to answer within the model's context, or when the sample coincides with
  the reference answer.
- Lives in train/, not data/: it runs a model (inference), which the data layer never imports.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from fucina.data.preferences import PreferencePair
from fucina.fsutil import write_atomically
from fucina.inference.generate import generate
from fucina.inference.sampling import SamplingConfig
from fucina.model.transformer import Transformer
from fucina.tokenizer import FucinaTokenizer


@dataclass
class OnPolicyPairs:
    """The pairs made and how many conversations were skipped, by reason."""

    pairs: list[PreferencePair]
    no_prompt: int = 0  # no assistant turn right after a user turn
    too_long: int = 0  # the prompt leaves no room for an answer in the context
    coincide: int = 0  # the sample equals the reference answer


def make_preference_pairs(
    model: Transformer,
    tokenizer: FucinaTokenizer,
    conversations: Sequence[Sequence[dict]],
    sampling: SamplingConfig,
) -> OnPolicyPairs:
    """One pair per usable conversation: chosen = its last assistant answer, rejected = a sample."""
    result = OnPolicyPairs([])
    prompts, kept = [], []
    room = model.config.context_length - 1
    for messages in conversations:
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None or last == 0 or messages[last - 1]["role"] != "user":
            result.no_prompt += 1
            continue
        prompt = [dict(m) for m in messages[:last]]
        ids = tokenizer.template.encode_prompt(tokenizer, prompt)
        if len(ids) >= room:
            result.too_long += 1
            continue
        prompts.append(ids)
        kept.append((prompt, messages[last]["content"]))
    if not prompts:
        return result
    longest = max(len(ids) for ids in prompts)
    stops = tuple(tokenizer.template.stop_token_ids(tokenizer))
    budget = min(sampling.max_new_tokens, model.config.context_length - longest)
    settings = replace(sampling, max_new_tokens=budget, stop_token_ids=stops)
    samples = generate(model.eval(), prompts, settings)
    for (prompt, chosen), sample in zip(kept, samples, strict=True):
        rejected = tokenizer.decode(sample).strip()
        if not rejected or rejected == chosen.strip():
            result.coincide += 1
            continue
        result.pairs.append(PreferencePair(prompt, chosen, rejected))
    return result


def write_preference_pairs(path: str | Path, pairs: Sequence[PreferencePair]) -> None:
    """Conversational TRL-format JSONL, written atomically (the file data/preferences.py reads)."""
    lines = [
        json.dumps(
            {
                "prompt": pair.prompt,
                "chosen": [{"role": "assistant", "content": pair.chosen}],
                "rejected": [{"role": "assistant", "content": pair.rejected}],
            },
            ensure_ascii=False,
        )
        for pair in pairs
    ]
    write_atomically(Path(path), "".join(line + "\n" for line in lines))
