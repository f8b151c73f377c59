"""Sequence-length curriculum: the window grows at run fractions, tokens per step stay constant, and a
switch neither loses nor repeats a window of the packed data."""

from __future__ import annotations

import pytest
import torch

from fucina.data.curriculum import build_curriculum, check_curriculum
from fucina.data.loaders import DataPosition, DataShard, PretrainBatches
from fucina.data.packing import TokenShards, pack_corpus
from fucina.errors import ConfigError
from fucina.tokenizer import train_tokenizer

SENTENCES = [
    "La città di Bologna è famosa per la sua cucina e per l'università più antica d'Europa.",
    "Perché non andiamo al mare domani? Il tempo sarà bello, così dicono.",
    "Nel mezzo del cammin di nostra vita mi ritrovai per una selva oscura.",
]
CONTEXT = 16  # the full window (the block)
BATCH = 3
ACCUM = 2
CURRICULUM = [[0.0, 4], [0.35, 8], [0.7, 16]]
TOTAL = 20


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> TokenShards:
    tokenizer = train_tokenizer(SENTENCES * 20, vocab_size=300, template="chatml", show_progress=False)
    directory = tmp_path_factory.mktemp("packed") / "data"
    pack_corpus(
        [f"Documento {i}. {SENTENCES[i % 3]} {SENTENCES[(i + 1) % 3]}" for i in range(12)],
        tokenizer,
        directory,
    )
    return TokenShards(directory, "train", tokenizer)


def _batches(shards, curriculum=CURRICULUM, shard: DataShard | None = None) -> PretrainBatches:
    batches = PretrainBatches(shards, CONTEXT, BATCH, seed=5, grad_accum=ACCUM, shard=shard or DataShard())
    batches.plan(TOTAL, curriculum)
    return batches


def test_window_switches_at_the_configured_fractions():
    curriculum = build_curriculum(CURRICULUM, CONTEXT, TOTAL)
    # floor(0.35 * 20) = 7 and floor(0.7 * 20) = 14: the new windows start at steps 8 and 15.
    assert curriculum.switch_steps() == [8, 15]
    assert [curriculum.window_at(s) for s in (1, 7, 8, 14, 15, 20)] == [4, 4, 8, 8, 16, 16]


def test_tokens_per_step_stay_constant_while_the_batch_shrinks(shards):
    batches, position = _batches(shards), DataPosition()
    for step in range(1, TOTAL + 1):
        micro, position = batches.next_step(position, step)
        window = batches.curriculum.window_at(step)
        assert len(micro) == ACCUM
        assert all(b["input_ids"].shape == (BATCH * CONTEXT // window, window) for b in micro)
        assert sum(b["input_ids"].numel() for b in micro) == BATCH * ACCUM * CONTEXT


def test_no_window_is_lost_or_repeated_across_a_switch(shards):
    """Each step's windows, laid end to end, are exactly the full-length windows a run without a
    curriculum reads at that step; and over an epoch every full-length window is read once."""
    with_curriculum, plain = _batches(shards), _batches(shards, curriculum=[])
    a, b = DataPosition(), DataPosition()
    steps_per_epoch = plain.num_windows // (BATCH * ACCUM)
    seen: list[int] = []
    windows_read = {4: 0, 8: 0, 16: 0}
    for step in range(1, TOTAL + 1):
        blocks, _ = with_curriculum.step_windows(a)
        if step <= steps_per_epoch:
            seen.extend(blocks)
        micro_c, a = with_curriculum.next_step(a, step)
        micro_p, b = plain.next_step(b, step)
        assert a == b  # the data position does not depend on the window
        for key in ("input_ids", "labels"):
            flat_c = torch.cat([m[key].reshape(-1) for m in micro_c])
            flat_p = torch.cat([m[key].reshape(-1) for m in micro_p])
            assert torch.equal(flat_c, flat_p), f"step {step}: {key} differ from the plain run's"
        windows_read[with_curriculum.curriculum.window_at(step)] += sum(len(m["input_ids"]) for m in micro_c)
    assert steps_per_epoch < TOTAL  # the run crosses an epoch boundary as well as both switches
    assert len(set(seen)) == len(seen) == steps_per_epoch * BATCH * ACCUM  # each block once per epoch
    # 7 steps of 6 blocks cut in 4, 7 steps cut in 2, 6 steps whole.
    assert windows_read == {4: 7 * 6 * 4, 8: 7 * 6 * 2, 16: 6 * 6}


def test_ranks_split_the_same_global_rows(shards):
    single = _batches(shards)
    ranks = [_batches(shards, shard=DataShard(r, 2)) for r in range(2)]
    for r in ranks:
        r.grad_accum = ACCUM // 2  # the same global batch over two processes
    position = DataPosition()
    for step in (1, 8, 15):
        whole, _ = single.next_step(position, step)
        parts = [r.next_step(position, step)[0] for r in ranks]
        joined = torch.cat([m["input_ids"] for part in parts for m in part])
        assert torch.equal(joined, torch.cat([m["input_ids"] for m in whole]))


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([[0.1, 4]], "must start at fraction 0.0"),
        ([[0.0, 4], [0.5, 8], [0.4, 16]], "fractions must increase"),
        ([[0.0, 4], [1.0, 8]], "must be in [0, 1)"),
        ([[0.0, 4, 2]], "expected [fraction of the run, window]"),
    ],
)
def test_bad_curricula_are_refused_by_key(entries, message):
    with pytest.raises(ConfigError, match="data.curriculum") as err:
        check_curriculum(entries)
    assert message in str(err.value)


def test_a_window_that_does_not_divide_the_context_is_refused(shards):
    with pytest.raises(
        ConfigError, match=r"data.curriculum\[1\]: window 6 must divide the run's context length 16"
    ):
        _batches(shards, curriculum=[[0.0, 4], [0.5, 6]])
