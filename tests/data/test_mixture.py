"""Phased data mixtures: rows drawn by weight per phase, a sampler whose state is the data position."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from fucina.data.loaders import DataPosition, DataShard
from fucina.data.mixture import MixtureBatches, check_mixture, mixture_phases
from fucina.data.packing import TokenShards, pack_corpus
from fucina.errors import ConfigError
from fucina.tokenizer import train_tokenizer
from fucina.train.config import MixturePhase, MixtureSection, MixtureSource

TEXTS = {
    "prose": "Era una notte buia e tempestosa, e il vento soffiava forte tra gli alberi del bosco.",
    "wiki": "Bologna è un comune italiano di 390 000 abitanti, capoluogo dell'omonima città metropolitana.",
    "chat": "Utente: ciao, come stai? Assistente: bene, grazie! Come posso aiutarti oggi?",
}
CONTEXT, BATCH, TOTAL = 8, 8, 200
SECTION = MixtureSection(
    sources=[MixtureSource(name, ["unused"]) for name in TEXTS],
    phases=[
        MixturePhase(0.0, {"prose": 0.55, "wiki": 0.35, "chat": 0.10}),
        MixturePhase(0.9, {"prose": 0.20, "wiki": 0.25, "chat": 0.55}),
    ],
)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, TokenShards]:
    tokenizer = train_tokenizer(
        list(TEXTS.values()) * 20, vocab_size=300, template="chatml", show_progress=False
    )
    packed = {}
    for number, (name, text) in enumerate(TEXTS.items()):
        directory = tmp_path_factory.mktemp(name) / "data"
        pack_corpus([f"{i} {text}" for i in range(10 + 5 * number)], tokenizer, directory)
        packed[name] = TokenShards(directory, "train", tokenizer)
    return packed


def _mixture(sources, shard: DataShard | None = None, grad_accum: int = 1) -> MixtureBatches:
    batches = MixtureBatches(sources, mixture_phases(SECTION), CONTEXT, BATCH, 11, grad_accum, shard)
    batches.plan(TOTAL, [])
    return batches


def _run(batches, first: int, last: int, position: DataPosition):
    out = []
    for step in range(first, last + 1):
        micro, position = batches.next_step(position, step)
        out.append(micro)
    return out, position


def test_realised_proportions_are_within_sampling_error(sources):
    batches = _mixture(sources)
    assert batches.phase_index(180) == 0 and batches.phase_index(181) == 1  # floor(0.9 * 200) + 1
    for phase, steps in ((0, range(1, 181)), (1, range(181, 201))):
        counts = np.zeros(3)
        for step in steps:
            counts += np.bincount(batches.step_sources(step), minlength=3)
        rows = counts.sum()
        assert rows == len(steps) * BATCH
        for share, wanted in zip(counts / rows, batches.phases[phase].probabilities):
            sigma = math.sqrt(wanted * (1 - wanted) / rows)
            assert abs(share - wanted) < 4 * sigma, (phase, share, wanted)
        realised = batches.realised_mixture(phase, TOTAL)
        assert list(realised.values()) == pytest.approx(list(counts / rows))


def test_each_source_reads_its_blocks_once_per_epoch(sources):
    batches = _mixture(sources)
    position, read = DataPosition(), {name: [] for name in TEXTS}
    for step in range(1, 41):
        rows, position = batches.step_blocks(position, step)
        for name, block in rows:
            read[name].append(block)
    for name, blocks in read.items():
        per_epoch = batches.num_blocks[name]
        for start in range(0, len(blocks) - per_epoch + 1, per_epoch):
            assert sorted(blocks[start : start + per_epoch]) == list(range(per_epoch))
        assert position.sources[name][0] == len(blocks) // per_epoch  # epochs completed
    assert position.index == 40 * BATCH


def test_resuming_from_a_saved_position_repeats_the_rows_across_a_phase_switch(sources):
    straight, _ = _run(_mixture(sources), 1, 190, DataPosition())
    _, position = _run(_mixture(sources), 1, 175, DataPosition())
    saved = copy.deepcopy(position)  # what a checkpoint holds
    resumed, _ = _run(_mixture(sources), 176, 190, saved)  # a fresh sampler, as after a restart
    for a, b in zip(straight[175:], resumed):
        assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))


def test_ranks_split_the_same_global_rows(sources):
    whole, _ = _run(_mixture(sources, grad_accum=2), 179, 182, DataPosition())
    parts = [_run(_mixture(sources, DataShard(r, 2)), 179, 182, DataPosition())[0] for r in range(2)]
    for step in range(4):
        joined = torch.cat([parts[r][step][0]["input_ids"] for r in range(2)])
        assert torch.equal(joined, torch.cat([m["input_ids"] for m in whole[step]]))


def test_curriculum_applies_to_mixture_rows(sources):
    batches = MixtureBatches(sources, mixture_phases(SECTION), CONTEXT, BATCH, 11)
    batches.plan(TOTAL, [[0.0, 2], [0.5, 8]])
    micro, _ = batches.next_step(DataPosition(), 1)
    assert micro[0]["input_ids"].shape == (BATCH * 4, 2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"phases": [MixturePhase(0.0, {"prose": 1.0, "news": 1.0})]}, "unknown source 'news'"),
        ({"phases": [MixturePhase(0.2, {"prose": 1.0})]}, "the first phase must start at 0.0"),
        ({"phases": [MixturePhase(0.0, {"prose": 0.0})]}, "positive sum"),
        ({"sources": [MixtureSource("a", ["x"]), MixtureSource("a", ["y"])]}, "must be unique"),
    ],
)
def test_bad_mixtures_are_refused_by_key(change, message):
    section = copy.deepcopy(SECTION)
    for key, value in change.items():
        setattr(section, key, value)
    with pytest.raises(ConfigError, match="data.mixture") as err:
        check_mixture(section)
    assert message in str(err.value)
