"""The LM objective: SFT trains on assistant tokens only, the loss is a token mean, never NaN."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fucina.data.sft import SFTDataset, collate_batch
from fucina.model.transformer import Transformer
from fucina.presets import get_preset
from fucina.tokenizer import FucinaTokenizer
from fucina.train.objectives import IGNORE_INDEX, lm_loss, lm_loss_sum

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
