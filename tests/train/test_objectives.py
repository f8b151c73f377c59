"""Objectives: SFT trains on assistant tokens only, the loss is a token mean, never NaN; sequence log-probs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fucina.data.sft import SFTDataset, collate_batch
from fucina.model.transformer import Transformer
from fucina.presets import get_preset
from fucina.tokenizer import FucinaTokenizer
from fucina.train.objectives import (
    IGNORE_INDEX,
    LanguageModelingObjective,
    lm_loss,
    lm_loss_sum,
    sequence_logprobs,
    token_logprobs,
)

CONVERSATIONS = [
    [
        {"role": "system", "content": "Sei un assistente gentile."},
        {"role": "user", "content": "Qual è la capitale d'Italia?"},
        {"role": "assistant", "content": "La capitale d'Italia è Roma."},
        {"role": "user", "content": "E della Francia?"},
        {"role": "assistant", "content": "Parigi."},
    ],
    [
        {"role": "user", "content": "Ciao, come stai?"},
        {"role": "assistant", "content": "Bene, grazie!"},
        {"role": "user", "content": "Grazie mille, a presto!"},
    ],
]


def _model(vocab_size: int) -> Transformer:
    torch.manual_seed(0)
    config = get_preset("gpt2-tiny")
    config.vocab_size = vocab_size
    return Transformer(config)


def test_user_turns_never_contribute_to_loss(tokenizer_dir):
    tokenizer = FucinaTokenizer.load(tokenizer_dir)
    model = _model(tokenizer.vocab_size)
    batch = collate_batch(list(SFTDataset(CONVERSATIONS, tokenizer, context_length=128)), tokenizer.pad_id)
    logits = model(batch["input_ids"]).detach().requires_grad_(True)
    loss = lm_loss(logits, batch["labels"])
    loss.backward()

    # The same loss computed independently from the chat template's assistant mask.
    terms = []
    trained_positions = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
    for row, messages in enumerate(CONVERSATIONS):
        encoded = tokenizer.template.encode(tokenizer, messages)
        for t in range(len(encoded.input_ids) - 1):
            if encoded.assistant_mask[t + 1]:  # token t+1 is assistant text or its end marker
                target = torch.tensor([encoded.input_ids[t + 1]])
                terms.append(F.cross_entropy(logits[row, t : t + 1].detach(), target))
                trained_positions[row, t] = True
    assert torch.allclose(loss.detach(), torch.stack(terms).mean(), atol=1e-6)
    # No gradient reaches the predictions at system/user/header/padding positions.
    assert torch.count_nonzero(logits.grad[~trained_positions]) == 0
    assert torch.count_nonzero(logits.grad[trained_positions].abs().sum(-1)) == trained_positions.sum()


def test_user_text_targets_do_not_change_loss_or_gradient(tokenizer_dir):
    """Rewriting what the labels would say at user positions (still masked) changes nothing."""
    tokenizer = FucinaTokenizer.load(tokenizer_dir)
    model = _model(tokenizer.vocab_size)
    batch = collate_batch(list(SFTDataset(CONVERSATIONS, tokenizer, context_length=128)), tokenizer.pad_id)
    first = lm_loss(model(batch["input_ids"]), batch["labels"])
    first.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # Replace the closing user message (after the last assistant token): nothing trained depends on it.
    last_trained = int((batch["labels"][1] != IGNORE_INDEX).nonzero().max())
    tampered = batch["input_ids"].clone()
    assert (batch["input_ids"][1, last_trained + 2 :] != tokenizer.pad_id).sum() > 3  # real user tokens
    tampered[1, last_trained + 1 :] = tokenizer.token_to_id("<UNK>")
    second = lm_loss(model(tampered), batch["labels"])
    second.backward()
    assert torch.equal(first, second)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


def test_no_supervised_token_gives_zero_not_nan():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.full((2, 5), IGNORE_INDEX)
    loss = lm_loss(logits, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_summed_micro_batch_losses_give_the_token_mean_of_the_whole_step():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 13)
    labels = torch.randint(0, 13, (4, 6))
    labels[0, :4] = IGNORE_INDEX  # micro-batches with different supervised counts
    labels[3, 1:] = IGNORE_INDEX
    sums = [lm_loss_sum(logits[i : i + 2], labels[i : i + 2]) for i in (0, 2)]
    total = sum(n for _, n in sums)
    accumulated = sum(s for s, _ in sums) / total
    assert torch.allclose(accumulated, lm_loss(logits, labels), atol=1e-6)


def test_sequence_logprobs_match_a_plain_log_softmax():
    model = _model(97)
    ids = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(2))
    labels[0, :4] = IGNORE_INDEX
    labels[2, 7:] = IGNORE_INDEX
    got = sequence_logprobs(model, ids, labels)
    assert got.dtype == torch.float32 and got.shape == (3,)
    with torch.no_grad():
        log_probs = F.log_softmax(model(ids).double(), dim=-1)
    expected = [
        sum(float(log_probs[b, t, labels[b, t]]) for t in range(10) if labels[b, t] != IGNORE_INDEX)
        for b in range(3)
    ]
    torch.testing.assert_close(
        got.detach().double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=1e-5
    )
    # The LM loss is the same quantity, negated and summed over the batch.
    total, _ = lm_loss_sum(model(ids), labels)
    torch.testing.assert_close(-got.sum(), total, atol=1e-4, rtol=1e-5)


def test_masked_tokens_never_contribute_to_sequence_logprobs():
    logits = torch.randn(2, 6, 11, generator=torch.Generator().manual_seed(0), requires_grad=True)
    labels = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(1))
    labels[0, ::2] = IGNORE_INDEX
    labels[1] = IGNORE_INDEX  # nothing supervised in this row
    per_token = token_logprobs(logits, labels)
    assert torch.all(per_token[labels == IGNORE_INDEX] == 0)
    per_token.sum().backward()
    assert torch.count_nonzero(logits.grad[labels == IGNORE_INDEX]) == 0
    assert torch.count_nonzero(logits.grad[labels != IGNORE_INDEX].abs().sum(-1)) == int(
        (labels != IGNORE_INDEX).sum()
    )
    # Whatever the logits say at masked positions, the sums do not move.
    tampered = logits.detach().clone()
    tampered[labels == IGNORE_INDEX] = 1e4
    assert torch.equal(token_logprobs(tampered, labels).sum(-1), per_token.detach().sum(-1))
    assert per_token[1].sum().item() == 0.0


def test_lm_objective_uses_the_fused_loss_and_counts_supervised_tokens(tokenizer_dir):
    tokenizer = FucinaTokenizer.load(tokenizer_dir)
    model = _model(tokenizer.vocab_size)
    batch = collate_batch(list(SFTDataset(CONVERSATIONS, tokenizer, context_length=128)), tokenizer.pad_id)
    objective = LanguageModelingObjective()
    output = objective(model, batch)
    count = int((batch["labels"] != IGNORE_INDEX).sum())
    assert output.count == objective.supervised_count(batch) == count < batch["labels"].numel()
    reference, _ = lm_loss_sum(model(batch["input_ids"]), batch["labels"])
    torch.testing.assert_close(output.loss_sum, reference, atol=1e-4, rtol=1e-5)
