"""The HF name tables: each direction inverts the other, and no row serves one direction only."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from export_helpers import ARCHITECTURES, random_model

from fucina.errors import CheckpointError
from fucina.interop.hf_export import hf_architecture
from fucina.interop.hf_mapping import GPT2, TABLES, HFTable

# (architecture of export_helpers, config overrides, picodac_class): every table, with and without biases
CASES = {
    "gpt2": ("gpt2", {}, "imagegpt"),
    "gpt2-no-bias-tied": ("gpt2", {"bias": False, "tie_embeddings": True}, "imagegpt"),
    "llama": ("llama", {}, "imagegpt"),
    "llama-bias-tied": ("llama", {"bias": True, "tie_embeddings": True}, "imagegpt"),
    "mistral": ("mistral", {}, "imagegpt"),
    "ministral": ("ministral", {}, "imagegpt"),
    "picodac-imagegpt": ("picodac", {}, "imagegpt"),
    "picodac-imagegpt-untied": ("picodac", {"tie_embeddings": False}, "imagegpt"),
    "picodac-remote-code": ("picodac", {"bias": True}, "remote-code"),
}


def case(name: str) -> tuple[HFTable, torch.nn.Module]:
    architecture, overrides, picodac_class = CASES[name]
    config = dataclasses.replace(ARCHITECTURES[architecture][0], **overrides)
    return TABLES[hf_architecture(config, picodac_class)], random_model(config)


class Checkpoint:
    """HF tensors by name, recording which ones were read."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        self.weights, self.read = weights, set()

    def take(self, name: str) -> torch.Tensor:
        self.read.add(name)
        return self.weights[name]


def test_the_cases_cover_every_table():
    tables = {id(case(name)[0]) for name in CASES}
    assert tables == {id(mapping) for mapping in TABLES.values()}


@pytest.mark.parametrize("name", CASES)
def test_export_then_import_through_the_table_returns_the_state_dict_exactly(name):
    mapping, model = case(name)
    state = model.state_dict()
    checkpoint = Checkpoint(mapping.to_hf(state, model.config))
    back = mapping.from_hf(checkpoint.take, model.config, "test")
    assert back.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(back[key], tensor), key


@pytest.mark.parametrize("name", CASES)
def test_every_row_is_used_in_both_directions(name):
    mapping, model = case(name)
    state = model.state_dict()
    rows = mapping.expand(model.config)
    exported = mapping.to_hf(state, model.config)
    checkpoint = Checkpoint(exported)
    imported = mapping.from_hf(checkpoint.take, model.config, "test")
    # Every HF name of every row is written by export and read by import, and nothing else is.
    hf_names = [theirs for row in rows for theirs in row.theirs]
    assert len(hf_names) == len(set(hf_names))
    assert set(exported) == set(hf_names) == checkpoint.read
    # Every row on our side names a tensor of the model, and the rows cover the whole state dict
    # (the tied head, left out of the HF file, is the embedding again).
    ours = {row.ours for row in rows if row.when(model.config)}
    assert ours <= state.keys()
    assert state.keys() - ours <= {"lm_head.weight"} and imported.keys() == state.keys()


def test_import_refuses_a_bias_the_model_would_drop_unless_it_is_zero():
    config = dataclasses.replace(ARCHITECTURES["gpt2"][0], bias=False)
    model = random_model(config)
    weights = GPT2.to_hf(model.state_dict(), config)
    assert not weights["transformer.h.1.mlp.c_fc.bias"].any()  # written as zeros: changes no output
    weights["transformer.h.1.mlp.c_fc.bias"][0] = 1.0
    with pytest.raises(CheckpointError, match=r"transformer\.h\.1\.mlp\.c_fc\.bias is not zero"):
        GPT2.from_hf(weights.__getitem__, config, "test")
