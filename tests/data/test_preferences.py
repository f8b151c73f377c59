"""Preference pairs: the two TRL formats, errors with file:line, what is scored on each side, dropped pairs."""

from __future__ import annotations

import json

import pytest

from fucina.data.preferences import (
    PreferenceDataset,
    PreferencePair,
    collate_pairs,
    read_preference_pairs,
)
from fucina.data.sft import IGNORE_INDEX
from fucina.errors import DataError
from fucina.tokenizer import train_tokenizer

TEXTS = [
    "Qual è la capitale d'Italia?",
    "La capitale d'Italia è Roma.",
    "Non lo so, forse Milano.",
    "Sei un assistente gentile.",
    "Come si dice grazie in inglese?",
    "Si dice thank you.",
]


@pytest.fixture(scope="module", params=["picodac", "chatml"])
def tokenizer(request):
    return train_tokenizer(TEXTS * 30, vocab_size=300, template=request.param, show_progress=False)


def _write(tmp_path, records) -> str:
    path = tmp_path / "prefs.jsonl"
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_both_trl_formats_are_read_into_the_same_pair(tmp_path):
    plain = {"prompt": TEXTS[0], "chosen": TEXTS[1], "rejected": TEXTS[2]}
    conversational = {
        "prompt": [{"role": "user", "content": TEXTS[0]}],
        "chosen": [{"role": "assistant", "content": TEXTS[1]}],
        "rejected": [{"role": "assistant", "content": TEXTS[2]}],
    }
    pairs = list(read_preference_pairs([_write(tmp_path, [plain, conversational])]))
    expected = PreferencePair([{"role": "user", "content": TEXTS[0]}], TEXTS[1], TEXTS[2])
    assert pairs == [expected, expected]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "ciao", "chosen": "sì"}, "missing rejected"),
        ({"prompt": "", "chosen": "sì", "rejected": "no"}, "field 'prompt' is empty"),
        ({"prompt": "ciao", "chosen": 3, "rejected": "no"}, "field 'chosen' must be"),
        (
            {"prompt": [{"role": "assistant", "content": "x"}], "chosen": "sì", "rejected": "no"},
            "last message must be a user message",
        ),
        (
            {"prompt": "ciao", "chosen": [{"role": "user", "content": "x"}], "rejected": "no"},
            "exactly one assistant message",
        ),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_records_are_refused_naming_file_and_line(tmp_path, record, message):
    good = {"prompt": "ciao", "chosen": "sì", "rejected": "no"}
    path = _write(tmp_path, [good, record])
    with pytest.raises(DataError, match=message) as caught:
        list(read_preference_pairs([path]))
    assert f"{path}:2:" in str(caught.value)


def test_prompt_ids_are_identical_and_only_answers_and_end_marker_are_scored(tokenizer):
    system = {"role": "system", "content": TEXTS[3]}
    pair = PreferencePair([system, {"role": "user", "content": TEXTS[0]}], TEXTS[1], TEXTS[2])
    dataset = PreferenceDataset([pair], tokenizer, context_length=256)
    item = dataset[0]
    prompt = tokenizer.template.encode_prompt(tokenizer, pair.prompt)
    end = tokenizer.template.stop_token_ids(tokenizer)[0]
    for side, answer in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        inputs, labels = item[f"{side}_input_ids"], item[f"{side}_labels"]
        assert inputs[: len(prompt)] == prompt
        assert all(label == IGNORE_INDEX for label in labels[: len(prompt) - 1])  # the prompt never scored
        scored = [label for label in labels if label != IGNORE_INDEX]
        assert scored[-1] == end  # the end marker is scored
        assert tokenizer.decode(scored[:-1]).strip() == answer


def test_identical_and_unscorable_pairs_are_dropped_and_counted(tokenizer):
    prompt = [{"role": "user", "content": TEXTS[0]}]
    good = PreferencePair(prompt, TEXTS[1], TEXTS[2])
    same = PreferencePair(prompt, TEXTS[1], TEXTS[1])
    long_prompt = [{"role": "user", "content": " ".join(TEXTS * 4)}]
    cut = PreferencePair(long_prompt, TEXTS[1], TEXTS[2])
    dataset = PreferenceDataset([good, same, cut], tokenizer, context_length=40)
    assert len(dataset) == 1
    assert (dataset.identical, dataset.unscored) == (1, 1)


def test_a_batch_stacks_chosen_rows_then_rejected_rows(tokenizer):
    prompt = [{"role": "user", "content": TEXTS[0]}]
    pairs = [PreferencePair(prompt, TEXTS[1], TEXTS[2]), PreferencePair(prompt, TEXTS[5], TEXTS[2] + " Boh.")]
    dataset = PreferenceDataset(pairs, tokenizer, context_length=256)
    batch = collate_pairs([dataset[0], dataset[1]], tokenizer.pad_id)
    assert batch["input_ids"].shape[0] == 4
    for row, (index, side) in enumerate([(0, "chosen"), (1, "chosen"), (0, "rejected"), (1, "rejected")]):
        ids = dataset[index][f"{side}_input_ids"]
        assert batch["input_ids"][row, : len(ids)].tolist() == ids
        assert (batch["labels"][row, len(ids) :] == IGNORE_INDEX).all()
