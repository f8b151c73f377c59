"""Chat fine-tuning data: only assistant tokens carry labels; batches pad cleanly; sampling repeats."""

from __future__ import annotations

import logging
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fucina.data.readers import read_conversations
from fucina.data.sft import IGNORE_INDEX, LengthGroupedSampler, SFTDataset, collate_batch
from fucina.tokenizer import train_tokenizer

CHATS = [
    [
        {"role": "system", "content": "Sei un assistente gentile."},
        {"role": "user", "content": "Ciao! Come si dice grazie in inglese?"},
        {"role": "assistant", "content": "Si dice «thank you»."},
        {"role": "user", "content": "E perché?"},
        {"role": "assistant", "content": "Perché è così che si dice, città per città."},
    ],
    [
        {"role": "user", "content": "Qual è la capitale d'Italia?"},
        {"role": "assistant", "content": "Roma."},
    ],
    [
        {"role": "user", "content": "Scrivi <|im_end|> per favore."},
        {"role": "assistant", "content": "Ecco: <|im_start|>assistant"},
    ],
]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [m["content"] for chat in CHATS for m in chat] * 30
    return train_tokenizer(texts, vocab_size=400, template="chatml", show_progress=False)


def _supervised_runs(labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


def test_user_and_system_tokens_never_carry_labels(tokenizer):
    dataset = SFTDataset(CHATS, tokenizer, context_length=512)
    assert len(dataset) == len(CHATS) and dataset.dropped == 0
    for example, chat in zip(dataset, CHATS):
        runs = [
            tokenizer.decode(run, skip_special_tokens=False) for run in _supervised_runs(example["labels"])
        ]
        expected = [m["content"] + "<|im_end|>" for m in chat if m["role"] == "assistant"]
        assert runs == expected


def test_labels_are_the_next_token_where_the_template_trains(tokenizer):
    encoded = tokenizer.template.encode(tokenizer, CHATS[0])
    example = SFTDataset(CHATS[:1], tokenizer, context_length=512)[0]
    ids, mask = encoded.input_ids, encoded.assistant_mask
    assert example["input_ids"] == ids[:-1]
    assert example["labels"] == [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)]


def test_train_on_last_supervises_only_the_last_reply(tokenizer):
    example = SFTDataset(CHATS[:1], tokenizer, context_length=512, train_on="last")[0]
    runs = [tokenizer.decode(run, skip_special_tokens=False) for run in _supervised_runs(example["labels"])]
    assert runs == [CHATS[0][-1]["content"] + "<|im_end|>"]


def test_examples_without_supervised_tokens_after_truncation_are_dropped(tokenizer, caplog):
    # The long user prompt pushes the only assistant reply past the context.
    long_prompt = [{"role": "user", "content": "parola " * 200}, {"role": "assistant", "content": "Sì."}]
    context = 40
    with caplog.at_level(logging.WARNING, logger="fucina.data.sft"):
        dataset = SFTDataset([long_prompt, *CHATS], tokenizer, context_length=context)
    assert dataset.dropped == 1 and len(dataset) == len(CHATS)
    assert dataset.source_indices == [1, 2, 3]
    assert any("dropped 1 of 4" in r.getMessage() for r in caplog.records)
    for example, length in zip(dataset, dataset.lengths):
        assert len(example["input_ids"]) == len(example["labels"]) == length <= context
        assert any(label != IGNORE_INDEX for label in example["labels"])


def test_collate_pads_right_to_the_longest_example(tokenizer):
    examples = [{"input_ids": [5, 6, 7], "labels": [6, 7, -100]}, {"input_ids": [8], "labels": [9]}]
    batch = collate_batch(examples, pad_id=tokenizer.pad_id)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, tokenizer.pad_id, tokenizer.pad_id]]
    assert batch["labels"].tolist() == [[6, 7, -100], [9, -100, -100]]


def test_every_batch_has_a_finite_loss(tokenizer):
    dataset = SFTDataset(CHATS * 5, tokenizer, context_length=24)
    loader = DataLoader(
        dataset,
        batch_size=2,
        sampler=LengthGroupedSampler(dataset.lengths, batch_size=2, seed=0),
        collate_fn=partial(collate_batch, pad_id=tokenizer.pad_id),
    )
    generator = torch.Generator().manual_seed(0)
    for batch in loader:
        logits = torch.randn(*batch["input_ids"].shape, tokenizer.vocab_size, generator=generator)
        supervised = (batch["labels"] != IGNORE_INDEX).sum()
        loss = F.cross_entropy(
            logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum"
        ) / supervised.clamp(min=1)
        assert supervised > 0 and torch.isfinite(loss)


def test_length_grouped_sampler_is_deterministic_and_groups_lengths():
    lengths = torch.randint(1, 500, (1000,), generator=torch.Generator().manual_seed(0)).tolist()
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    first = list(sampler)
    assert first == list(LengthGroupedSampler(lengths, batch_size=8, seed=3))
    assert sorted(first) == list(range(1000))
    assert lengths[first[0]] == max(lengths), "the longest example comes first"
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(1000))

    def padding_waste(order):
        batches = [order[i : i + 8] for i in range(0, len(order), 8)]
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    shuffled = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).tolist()
    assert padding_waste(first) < padding_waste(shuffled) / 5


def test_real_chat_data_trains_only_on_assistant_turns(shared_data, tokenizer):
    conversations = read_conversations(shared_data / "chatterbot-it" / "chatterbot_it.chat.jsonl")[:40]
    dataset = SFTDataset(conversations, tokenizer, context_length=256)
    assert dataset.dropped == 0
    for example, index in zip(dataset, dataset.source_indices):
        runs = [
            tokenizer.decode(run, skip_special_tokens=False) for run in _supervised_runs(example["labels"])
        ]
        expected = [
            m["content"].strip() + "<|im_end|>" for m in conversations[index] if m["role"] == "assistant"
        ]
        assert runs == expected
