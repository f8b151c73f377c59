"""The Hugging Face export, checked by the real transformers loader on one tiny model per architecture."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from export_helpers import ARCHITECTURES, ITALIAN_SAMPLES, architecture_model_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from fucina.inference.generate import SamplingConfig, generate
from fucina.interop.hf_export import export_hf
from fucina.interop.source import load_source

EXPECTED_CLASS = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "ministral": "MinistralForCausalLM",
    "picodac": "ImageGPTForCausalImageModeling",  # the one standard class with learned positions + RMS norm
    "picodac-remote-code": "FucinaPicoDACForCausalLM",
}
# export name -> (architecture of export_helpers.ARCHITECTURES, picodac_class)
EXPORTS = {name: (name, "imagegpt") for name in ARCHITECTURES} | {
    "picodac-remote-code": ("picodac", "remote-code")
}
CONVERSATION = [
    {"role": "system", "content": "Rispondi in italiano."},
    {"role": "user", "content": "Che tempo fa a Roma?"},
    {"role": "assistant", "content": "C'è il sole."},
    {"role": "user", "content": "E domani?"},
]


@dataclass
class Exported:
    name: str
    source: object  # ExportSource: the fucina model and tokenizer that were exported
    result: object  # HFExport
    hf_model: torch.nn.Module
    hf_tokenizer: object


@pytest.fixture(scope="module", params=list(EXPORTS), ids=list(EXPORTS))
def exported(request, tmp_path_factory) -> Exported:
    architecture, picodac_class = EXPORTS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    source = load_source(architecture_model_dir(root / "model", architecture))
    result = export_hf(source, root / "hf", picodac_class=picodac_class)
    # Only the remote-code PicoDAC export carries code; the others must load without trusting any.
    trust = picodac_class == "remote-code" and architecture == "picodac"
    if EXPECTED_CLASS[request.param] == "ImageGPTForCausalImageModeling":  # not in AutoModelForCausalLM
        hf_model = transformers.ImageGPTForCausalImageModeling.from_pretrained(root / "hf").eval()
    else:
        hf_model = AutoModelForCausalLM.from_pretrained(root / "hf", trust_remote_code=trust).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(root / "hf", trust_remote_code=trust)
    return Exported(request.param, source, result, hf_model, hf_tokenizer)


def test_each_architecture_loads_as_its_standard_transformers_class(exported):
    assert type(exported.hf_model).__name__ == EXPECTED_CLASS[exported.name]
    assert exported.result.architecture == EXPECTED_CLASS[exported.name]
    config = json.loads((exported.result.path / "config.json").read_text())
    assert config["architectures"] == [EXPECTED_CLASS[exported.name]]
    remote = exported.name == "picodac-remote-code"
    assert ("auto_map" in config) == remote == exported.result.remote_code


def test_hf_logits_equal_fucina_logits_within_1e_4(exported):
    tok = exported.source.tokenizer
    ids = sum((tok.encode(text) for text in ITALIAN_SAMPLES), [])[
        : exported.source.model.config.context_length
    ]
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        ours = exported.source.model(input_ids)
        theirs = exported.hf_model(input_ids).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4


def test_hf_tokenizer_gives_fucina_ids_for_italian_text(exported):
    tok = exported.source.tokenizer
    for text in ITALIAN_SAMPLES:
        assert exported.hf_tokenizer(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
        assert exported.hf_tokenizer(text)["input_ids"] == tok.encode(text)  # no BOS/EOS added


def test_apply_chat_template_gives_fucina_prompt_ids(exported):
    tok = exported.source.tokenizer
    ids = exported.hf_tokenizer.apply_chat_template(
        CONVERSATION, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert list(ids) == tok.template.encode_prompt(tok, CONVERSATION)


def test_hf_greedy_generation_equals_fucina_for_32_tokens(exported):
    tok = exported.source.tokenizer
    prompt = tok.template.encode_prompt(tok, CONVERSATION[1:2])
    stops = tok.template.stop_token_ids(tok)
    ours = generate(
        exported.source.model, [prompt], SamplingConfig(max_new_tokens=32, greedy=True, stop_token_ids=stops)
    )[0]
    input_ids = torch.tensor([prompt])
    output = exported.hf_model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=32, do_sample=False
    )[0, len(prompt) :].tolist()
    theirs = []
    for token in output:  # HF keeps the stop token (then pads); fucina stops before it
        if token in stops:
            break
        theirs.append(token)
    assert theirs == ours
    assert len(ours) > 0


def test_special_token_ids_and_stop_tokens_are_recorded(exported):
    tok = exported.source.tokenizer
    path: Path = exported.result.path
    config = json.loads((path / "config.json").read_text())
    generation = json.loads((path / "generation_config.json").read_text())
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        tok.bos_id,
        tok.eos_id,
        tok.pad_id,
    )
    assert generation["eos_token_id"] == tok.template.stop_token_ids(tok)
    assert tokenizer_config["chat_template"] == tok.template.jinja
    decoder = {int(i): entry["content"] for i, entry in tokenizer_config["added_tokens_decoder"].items()}
    assert decoder == {i: tok.id_to_token(i) for i in tok.special_ids}
    assert exported.hf_tokenizer.eos_token_id == tok.eos_id
    assert exported.hf_tokenizer.pad_token_id == tok.pad_id


def test_export_holds_the_model_card_and_no_fucina_files(exported):
    files = {p.name for p in exported.result.path.iterdir()}
    expected = {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "README.md",
    }
    if exported.name == "picodac-remote-code":
        expected |= {"configuration_fucina_picodac.py", "modeling_fucina_picodac.py"}
    assert files == expected
    card = (exported.result.path / "README.md").read_text()
    assert EXPECTED_CLASS[exported.name] in card
    assert f"{exported.result.parameters:,}" in card
