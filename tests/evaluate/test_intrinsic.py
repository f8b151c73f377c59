"""Loss, perplexity and bits per byte: exact on hand-checkable cases, every token scored exactly once."""

from __future__ import annotations

import json
import math

import pytest
from scoring_doubles import BigramModel, UniformModel

from fucina.errors import ConfigError
from fucina.evaluate.heldout import heldout_conversations, heldout_texts
from fucina.evaluate.intrinsic import evaluate_conversations, evaluate_file, evaluate_texts

TEXTS = [
    "La nonna prepara il caffè e le tagliatelle al ragù.",
    "Perché non vieni anche tu? È già tardi: il treno parte alle 7.",
    "Sull’isola d’Elba l’estate è lunga.",
]
CONVERSATIONS = [
    [
        {"role": "system", "content": "Sei un assistente gentile."},
        {"role": "user", "content": "Ciao, come stai?"},
        {"role": "assistant", "content": "Bene, grazie! E tu?"},
        {"role": "user", "content": "Dove si trova Palermo?"},
        {"role": "assistant", "content": "Palermo è in Sicilia, sul mare."},
    ],
    [{"role": "user", "content": "Che ore sono?"}, {"role": "assistant", "content": "Sono le tre e mezza."}],
]


def _stream(tokenizer, texts):
    ids = [tokenizer.eos_id]
    for text in texts:
        ids += tokenizer.encode(text) + [tokenizer.eos_id]
    return ids


def test_uniform_model_costs_log2_vocab_bits_per_token(tokenizer):
    model = UniformModel(tokenizer.vocab_size, context_length=16)
    result = evaluate_texts(model, tokenizer, TEXTS, show_progress=False)
    tokens = len(_stream(tokenizer, TEXTS)) - 1  # every token but the leading EOS
    num_bytes = sum(len(text.encode("utf-8")) for text in TEXTS)
    assert result.tokens == tokens
    assert result.bytes == num_bytes
    assert result.loss == pytest.approx(math.log(tokenizer.vocab_size))
    assert result.perplexity == pytest.approx(tokenizer.vocab_size)
    assert result.bits_per_byte == pytest.approx(math.log2(tokenizer.vocab_size) * tokens / num_bytes)


@pytest.mark.parametrize(("stride", "batch_size"), [(None, 32), (16, 1), (5, 3), (1, 64)])
def test_every_token_is_scored_once_whatever_the_stride_and_batch(tokenizer, stride, batch_size):
    model = BigramModel(tokenizer.vocab_size, context_length=16)
    stream = _stream(tokenizer, TEXTS)
    result = evaluate_texts(
        model, tokenizer, TEXTS, stride=stride, batch_size=batch_size, show_progress=False
    )
    assert result.tokens == len(stream) - 1
    assert result.nll_nats == pytest.approx(-model.logprob(stream), rel=1e-6)


def test_stride_outside_the_context_is_rejected(tokenizer):
    model = UniformModel(tokenizer.vocab_size, context_length=8)
    with pytest.raises(ConfigError, match="stride must be between 1 and the context length 8"):
        evaluate_texts(model, tokenizer, TEXTS, stride=9, show_progress=False)


def test_chat_loss_counts_only_assistant_tokens_and_bytes(tokenizer):
    model = BigramModel(tokenizer.vocab_size, context_length=12)
    result = evaluate_conversations(model, tokenizer, CONVERSATIONS, stride=7, show_progress=False)
    expected_nll, expected_tokens = 0.0, 0
    for messages in CONVERSATIONS:
        encoded = tokenizer.template.encode(tokenizer, messages)
        ids, mask = encoded.input_ids, encoded.assistant_mask
        for position in range(1, len(ids)):
            if mask[position]:
                expected_nll -= model.logprob(ids[position - 1 : position + 1])
                expected_tokens += 1
    assistant_bytes = sum(
        len(m["content"].encode("utf-8"))
        for messages in CONVERSATIONS
        for m in messages
        if m["role"] == "assistant"
    )
    assert result.tokens == expected_tokens
    assert result.nll_nats == pytest.approx(expected_nll, rel=1e-6)
    assert result.bytes == assistant_bytes


def test_file_scoring_detects_chat_jsonl_and_plain_text(tokenizer, tmp_path):
    model = UniformModel(tokenizer.vocab_size, context_length=16)
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS), encoding="utf-8")
    prose = tmp_path / "prose.jsonl"
    prose.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    chat_result = evaluate_file(model, tokenizer, chat, show_progress=False)
    prose_result = evaluate_file(model, tokenizer, prose, limit=2, show_progress=False)
    assert chat_result.documents == 2
    assert chat_result.bytes < sum(len(json.dumps(m, ensure_ascii=False)) for m in CONVERSATIONS)
    assert prose_result.documents == 2
    assert prose_result.bytes == sum(len(t.encode("utf-8")) for t in TEXTS[:2])


def test_heldout_splits_are_the_documents_listed_in_splits_json(shared_data):
    splits = json.loads((shared_data / "splits.json").read_text(encoding="utf-8"))
    assert len(heldout_texts(shared_data, "eltec")) == 8
    wikipedia = heldout_texts(shared_data, "wikipedia")
    assert len(wikipedia) == len(splits["exams-it/exams_it_wikipedia_snippets.jsonl.xz"]["test"]) == 1000
    conversations = heldout_conversations(shared_data, "xpersona")
    assert len(conversations) == 140
    assert all(any(m["role"] == "assistant" for m in c) for c in conversations)
