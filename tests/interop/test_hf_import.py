"""Importing Hugging Face checkpoints: same logits and greedy tokens as transformers, clear refusals."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)

from fucina.cli.main import main
from fucina.errors import CheckpointError, TokenizerError
from fucina.inference.generate import SamplingConfig, generate
from fucina.interop.hf_import import (
    UnsupportedCheckpointError,
    hf_model_config,
    import_hf_checkpoint,
    import_hf_model,
    import_hf_tokenizer,
)
from fucina.model_dir import load_pretrained

VOCAB = 120
LLAMA_SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    rope_theta=5000.0,
)


def gpt2(**overrides) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    shape = dict(
        vocab_size=VOCAB, n_positions=48, n_embd=48, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(GPT2Config(**{**shape, **overrides})).eval()


def llama(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**LLAMA_SHAPE, **overrides})).eval()


def mistral(**overrides) -> MistralForCausalLM:
    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(**{**LLAMA_SHAPE, "sliding_window": 6, **overrides})).eval()


def randomise_norms(model) -> None:
    """HF initialises norm scales to 1 and biases to 0: perturb them so a swapped norm would show."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                parameter.add_(torch.randn_like(parameter) * 0.1)


def saved(model, directory):
    randomise_norms(model)
    model.save_pretrained(directory)
    return directory


def assert_same_logits(hf_model, ours, length: int = 40) -> None:
    ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = hf_model(ids).logits
        actual = ours(ids)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def assert_same_greedy_tokens(hf_model, ours, new_tokens: int = 20) -> None:
    prompt = [5, 17, 99, 3, 42]
    with torch.inference_mode():
        hf_out = hf_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    assert generate(ours, [prompt], SamplingConfig(max_new_tokens=new_tokens, greedy=True)) == [hf_out]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gpt2_imports_with_equal_logits_and_greedy_tokens(tmp_path, tied):
    hf_model = gpt2(tie_word_embeddings=tied)
    ours = import_hf_model(saved(hf_model, tmp_path))
    assert ours.config.tie_embeddings is tied
    assert (ours.lm_head.weight is ours.token_embedding.weight) is tied
    assert_same_logits(hf_model, ours)
    assert_same_greedy_tokens(hf_model, ours)


def test_llama_with_grouped_query_attention_imports_with_equal_logits_and_greedy_tokens(tmp_path):
    hf_model = llama()
    ours = import_hf_model(saved(hf_model, tmp_path))
    assert (ours.config.n_heads, ours.config.kv_heads, ours.config.rope_base) == (6, 2, 5000.0)
    assert_same_logits(hf_model, ours)
    assert_same_greedy_tokens(hf_model, ours)


def test_mistral_sliding_window_imports_with_equal_logits_and_greedy_tokens(tmp_path):
    hf_model = mistral()
    ours = import_hf_model(saved(hf_model, tmp_path))
    assert ours.config.sliding_window == 6
    assert_same_logits(hf_model, ours)  # 40 tokens: the window of 6 cuts most of the context
    assert_same_greedy_tokens(hf_model, ours)


def test_llama_with_all_biases_and_explicit_head_dim_imports(tmp_path):
    hf_model = llama(attention_bias=True, mlp_bias=True, head_dim=16, tie_word_embeddings=True)
    ours = import_hf_model(saved(hf_model, tmp_path))
    assert ours.config.bias and ours.config.head_size == 16
    assert_same_logits(hf_model, ours)


def test_sharded_safetensors_and_pytorch_bin_checkpoints_import(tmp_path):
    hf_model = llama()
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert_same_logits(hf_model, import_hf_model(tmp_path / "sharded"))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    torch.save(hf_model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert_same_logits(hf_model, import_hf_model(tmp_path / "bin"))


def test_import_in_bf16_gives_bf16_weights(tmp_path):
    ours = import_hf_model(saved(gpt2(), tmp_path), dtype=torch.bfloat16)
    assert ours.blocks[0].mixer.qkv_proj.weight.dtype == torch.bfloat16


def edit_config(directory, **changes):
    path = directory / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "changes, key",
    [
        (
            {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
            "rope_parameters.rope_type",
        ),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 4.0}}, "rope_scaling.rope_type"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "qwen3_moe"}, "model_type"),
    ],
)
def test_unsupported_llama_features_are_refused_naming_the_key(tmp_path, changes, key):
    edit_config(saved(llama(), tmp_path), **changes)
    with pytest.raises(UnsupportedCheckpointError, match=rf"config\.json: {re.escape(key)}="):
        import_hf_model(tmp_path)


def test_unsupported_gpt2_features_are_refused_naming_the_key(tmp_path):
    edit_config(saved(gpt2(), tmp_path), activation_function="relu")
    with pytest.raises(UnsupportedCheckpointError, match="activation_function='relu'"):
        hf_model_config(tmp_path)
    edit_config(tmp_path, activation_function="gelu_new", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(UnsupportedCheckpointError, match="scale_attn_by_inverse_layer_idx"):
        import_hf_model(tmp_path)


def test_missing_or_extra_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    saved(llama(), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file(
        {**weights, "model.layers.0.self_attn.q_norm.weight": torch.ones(8)}, tmp_path / "model.safetensors"
    )
    with pytest.raises(UnsupportedCheckpointError, match=r"\(model\.layers\.0\.self_attn\.q_norm\.weight\)"):
        import_hf_model(tmp_path)
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'layers\.1\.mlp\.up_proj\.weight' is missing"):
        import_hf_model(tmp_path)


def test_missing_directory_and_weights_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="directory not found"):
        import_hf_model(tmp_path / "nowhere")
    saved(gpt2(), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        import_hf_model(tmp_path)


def byte_level_tokenizer(directory, vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    """A tiny GPT-2-style tokenizer (byte-level BPE, one <|endoftext|> special) saved the HF way."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:100],
        show_progress=False,
    )
    texts = ["la casa è bella", "il gatto dorme sulla casa", "una bella giornata di sole"] * 20
    backend.train_from_iterator(texts, trainer=trainer)
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    hf_tokenizer.save_pretrained(directory)
    return hf_tokenizer


def test_gpt2_with_its_tokenizer_becomes_a_fucina_model_directory(tmp_path):
    hf_tokenizer = byte_level_tokenizer(tmp_path / "hf")
    own_size = len(hf_tokenizer)
    hf_model = gpt2(vocab_size=own_size, tie_word_embeddings=True)
    saved(hf_model, tmp_path / "hf")
    result = import_hf_checkpoint(tmp_path / "hf", tmp_path / "out")
    assert result.tokenizer_imported and result.added_tokens == ("<|im_start|>", "<|im_end|>")
    model, tokenizer = load_pretrained(tmp_path / "out")
    assert tokenizer.template.name == "chatml"
    assert model.config.vocab_size == tokenizer.vocab_size == own_size + 2
    assert tokenizer.token_to_id("<|im_end|>") == own_size + 1
    text = "la bella casa dorme al sole"
    assert tokenizer.encode(text) == hf_tokenizer.encode(text)
    assert AutoTokenizer.from_pretrained(tmp_path / "out").encode(text) == hf_tokenizer.encode(text)
    # The original vocabulary still computes HF's logits; an added token scores the average logit.
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.inference_mode():
        logits = model(ids)
        torch.testing.assert_close(logits[..., :own_size], hf_model(ids).logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[..., own_size], logits[..., :own_size].mean(-1), atol=1e-4, rtol=0)


def test_tokenizer_that_is_not_byte_level_bpe_is_refused(tmp_path):
    backend = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    backend.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="byte-level BPE"):
        import_hf_tokenizer(tmp_path)
    hf_dir = saved(gpt2(), tmp_path / "hf")
    backend.save(str(hf_dir / "tokenizer.json"))
    result = import_hf_checkpoint(hf_dir, tmp_path / "out")  # the model alone, with the reason
    assert not result.tokenizer_imported and "byte-level BPE" in result.note
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_cli_import_hf_writes_a_loadable_model(tmp_path, capsys):
    hf_dir = saved(llama(), tmp_path / "hf")
    byte_level_tokenizer(hf_dir)
    assert main(["model", "import-hf", str(hf_dir), "--out", str(tmp_path / "out")]) in (0, None)
    assert "llama" in capsys.readouterr().out
    model, tokenizer = load_pretrained(tmp_path / "out")
    assert model.config.positions == "rope" and tokenizer.vocab_size <= model.config.vocab_size
