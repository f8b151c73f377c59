"""Rank-aware loaders: each step's global batch and the order of documents do not depend on the ranks."""

from __future__ import annotations

import pytest
import torch

from fucina.data.loaders import DataPosition, DataShard, PretrainBatches, SFTBatches
from fucina.data.packing import TokenShards, pack_corpus
from fucina.data.sft import SFTDataset
from fucina.errors import DataError
from fucina.tokenizer import train_tokenizer

SENTENCES = [
    "La città di Bologna è famosa per la sua cucina e per l'università più antica d'Europa.",
    "Perché non andiamo al mare domani? Il tempo sarà bello, così dicono.",
    "Nel mezzo del cammin di nostra vita mi ritrovai per una selva oscura.",
    "Il treno delle 7:45 per Milano è in ritardo di 20 minuti.",
]
CONTEXT = 8
BATCH = 3


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(SENTENCES * 20, vocab_size=400, template="chatml", show_progress=False)


@pytest.fixture(scope="module")
def shards(tokenizer, tmp_path_factory) -> TokenShards:
    directory = tmp_path_factory.mktemp("packed") / "data"
    docs = [f"Documento {i}. {SENTENCES[i % len(SENTENCES)]}" for i in range(40)]
    pack_corpus(docs, tokenizer, directory)
    return TokenShards(directory, "train", tokenizer)


@pytest.fixture(scope="module")
def conversations(tokenizer) -> SFTDataset:
    chats = [
        [
            {"role": "user", "content": f"Domanda {i}: {SENTENCES[i % 4][: 10 + 3 * (i % 7)]}"},
            {"role": "assistant", "content": SENTENCES[(i + 1) % 4][: 8 + 5 * (i % 5)]},
        ]
        for i in range(37)
    ]
    return SFTDataset(chats, tokenizer, context_length=64)


def _pretrain(shards, grad_accum: int, shard: DataShard) -> PretrainBatches:
    return PretrainBatches(shards, CONTEXT, BATCH, seed=3, grad_accum=grad_accum, shard=shard)


def _sft(dataset, grad_accum: int, shard: DataShard) -> SFTBatches:
    return SFTBatches(dataset, BATCH, seed=3, pad_id=0, grad_accum=grad_accum, shard=shard)


def _steps(make, world_size: int, steps: int, start: DataPosition | None = None):
    """Per step: the micro-batches of every rank in rank order, and the position each rank reached."""
    loaders = [make(DataShard(rank, world_size)) for rank in range(world_size)]
    positions = [start or DataPosition()] * world_size
    out = []
    for _ in range(steps):
        step_batches, reached = [], []
        for rank, loader in enumerate(loaders):
            micro, positions[rank] = loader.next_step(positions[rank])
            assert len(micro) == loader.grad_accum
            step_batches.extend(micro)
            reached.append(positions[rank])
        assert all(p == reached[0] for p in reached), "ranks advance together"
        out.append((step_batches, reached[0]))
    return out


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
        for x, y in zip(a, b)
    )


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_pretraining_ranks_together_take_the_single_process_batch(shards, world_size):
    grad_accum = 2
    steps = shards.num_windows(CONTEXT) // (BATCH * grad_accum) + 2  # past one epoch even for one rank
    sharded = _steps(lambda s: _pretrain(shards, grad_accum, s), world_size, steps)
    single = _steps(lambda s: _pretrain(shards, grad_accum * world_size, s), 1, steps)
    assert sharded[-1][1].epoch >= 1, "the steps cross an epoch boundary"
    for (rows, position), (expected, expected_position) in zip(sharded, single):
        assert torch.equal(
            torch.cat([b["input_ids"] for b in rows]), torch.cat([b["input_ids"] for b in expected])
        )
        assert position == expected_position


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_fine_tuning_ranks_together_take_the_single_process_batch(conversations, world_size):
    grad_accum = 2
    steps = len(conversations) // (BATCH * grad_accum) + 2  # past one epoch even for one rank
    sharded = _steps(lambda s: _sft(conversations, grad_accum, s), world_size, steps)
    single = _steps(lambda s: _sft(conversations, grad_accum * world_size, s), 1, steps)
    assert sharded[-1][1].epoch >= 1, "the steps cross an epoch boundary"
    for (rows, position), (expected, expected_position) in zip(sharded, single):
        assert _same(rows, expected)
        assert position == expected_position


def test_one_process_takes_consecutive_micro_batches_of_the_epoch_order(shards):
    loader = _pretrain(shards, 2, DataShard())
    order = loader.epoch_order(0)
    micro, position = loader.next_step(DataPosition())
    for number, batch in enumerate(micro):
        windows = order[number * BATCH : (number + 1) * BATCH]
        assert torch.equal(batch["input_ids"], shards.batch(windows, CONTEXT)["input_ids"])
    assert position == DataPosition(0, 2 * BATCH)


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_resuming_from_a_saved_position_continues_exactly(shards, conversations, kind):
    def make(shard):
        return _pretrain(shards, 2, shard) if kind == "pretrain" else _sft(conversations, 1, shard)

    through = _steps(make, 2, steps=9)
    saved = through[3][1]  # the position a checkpoint after step 4 stores
    resumed = _steps(make, 2, steps=5, start=DataPosition(saved.epoch, saved.index))
    for (rows, position), (expected, expected_position) in zip(resumed, through[4:]):
        assert _same(rows, expected)
        assert position == expected_position


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(DataError, match="rank 2"):
        DataShard(rank=2, world_size=2)
