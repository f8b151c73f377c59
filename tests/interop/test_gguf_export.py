"""The GGUF export read back with gguf.GGUFReader: tensors, metadata and the tokenizer llama.cpp will see."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from export_helpers import architecture_model_dir

from fucina.cli.export import GGUF_QUANTS as CLI_QUANTS
from fucina.interop.gguf import GGUF_QUANTS, export_gguf, permute_for_llama_cpp
from fucina.interop.gguf_weights import load_gguf_weights
from fucina.interop.source import load_source
from fucina.model.positions import apply_rotary, rope_tables
from fucina.model.transformer import Transformer
from fucina.tokenizer import LLAMA_CPP_PRETOKENIZER, bpe_merges

T = gguf.GGMLQuantizationType


def _fields(reader: gguf.GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def _tensors(reader: gguf.GGUFReader) -> dict:
    # GGUF lists shapes fastest dimension first: (in_features, out_features) for a matrix.
    return {t.name: (tuple(int(n) for n in reversed(t.shape)), t.tensor_type) for t in reader.tensors}


@pytest.fixture(scope="module")
def llama_source(tmp_path_factory):
    # d_ff 80: the ffn_down rows (80 inputs) are not a multiple of q8_0's block of 32.
    return load_source(architecture_model_dir(tmp_path_factory.mktemp("llama") / "model", "llama", d_ff=80))


@pytest.fixture(scope="module")
def gpt2_source(tmp_path_factory):
    return load_source(architecture_model_dir(tmp_path_factory.mktemp("gpt2") / "model", "gpt2", bias=False))


@pytest.mark.parametrize("quant", GGUF_QUANTS)
def test_llama_gguf_holds_every_tensor_with_llama_cpp_names_shapes_and_types(llama_source, tmp_path, quant):
    config = llama_source.model.config
    reader = gguf.GGUFReader(export_gguf(llama_source, tmp_path / "m.gguf", quant=quant).path)
    tensors = _tensors(reader)
    d, ff, kv = config.d_model, config.ff_size, config.kv_heads * config.head_size
    matrix = T[quant.upper()]
    blocks = quant.startswith("q")
    outer = T.Q8_0 if quant in ("q5_1", "q5_0", "q4_1", "q4_0") else matrix  # embedding and head
    expected = {"token_embd.weight": ((config.vocab_size, d), outer), "output_norm.weight": ((d,), T.F32)}
    expected["output.weight"] = ((config.vocab_size, d), outer)
    for i in range(config.n_layers):
        expected |= {
            f"blk.{i}.attn_norm.weight": ((d,), T.F32),
            f"blk.{i}.attn_q.weight": ((d, d), matrix),
            f"blk.{i}.attn_k.weight": ((kv, d), matrix),
            f"blk.{i}.attn_v.weight": ((kv, d), matrix),
            f"blk.{i}.attn_output.weight": ((d, d), matrix),
            f"blk.{i}.ffn_norm.weight": ((d,), T.F32),
            f"blk.{i}.ffn_gate.weight": ((ff, d), matrix),
            f"blk.{i}.ffn_up.weight": ((ff, d), matrix),
            # rows of 80 inputs cannot be cut into blocks of 32: f16 instead
            f"blk.{i}.ffn_down.weight": ((d, ff), T.F16 if blocks else matrix),
        }
    assert tensors == expected


def test_llama_gguf_metadata_describes_the_model(llama_source, tmp_path):
    config = llama_source.model.config
    fields = _fields(gguf.GGUFReader(export_gguf(llama_source, tmp_path / "m.gguf", quant="f16").path))
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert fields["llama.context_length"] == config.context_length
    assert fields["llama.embedding_length"] == config.d_model
    assert fields["llama.block_count"] == config.n_layers
    assert fields["llama.feed_forward_length"] == config.ff_size
    assert fields["llama.attention.head_count"] == config.n_heads
    assert fields["llama.attention.head_count_kv"] == config.kv_heads
    assert fields["llama.rope.dimension_count"] == config.head_size
    assert fields["llama.rope.freq_base"] == pytest.approx(config.rope_base)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.norm_eps)


@pytest.mark.parametrize("pretokenizer", ["italian", "bytelevel"])
def test_gguf_carries_the_tokenizer_and_chat_template(tmp_path, pretokenizer):
    source = load_source(architecture_model_dir(tmp_path / "model", "llama", pretokenizer=pretokenizer))
    tok, vocab = source.tokenizer, source.model.config.vocab_size
    fields = _fields(gguf.GGUFReader(export_gguf(source, tmp_path / "m.gguf", quant="f32").path))
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == LLAMA_CPP_PRETOKENIZER[pretokenizer]
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == vocab  # the model's rows; those beyond the tokenizer are padding
    assert tokens[: tok.vocab_size] == [tok.id_to_token(i) for i in range(tok.vocab_size)]
    types = fields["tokenizer.ggml.token_type"]
    for i in range(vocab):
        if i >= tok.vocab_size:
            assert types[i] == gguf.TokenType.UNUSED
        else:
            assert types[i] == (gguf.TokenType.CONTROL if i in tok.special_ids else gguf.TokenType.NORMAL)
    assert fields["tokenizer.ggml.merges"] == [f"{a} {b}" for a, b in bpe_merges(tok.backend)]
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_id
    assert fields["tokenizer.ggml.padding_token_id"] == tok.pad_id
    assert fields["tokenizer.ggml.eot_token_id"] == tok.token_to_id("<|im_end|>")  # chatml's other stop
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == tok.template.jinja


def test_gpt2_gguf_fuses_qkv_and_gives_a_model_without_biases_zero_biases(gpt2_source, tmp_path):
    config = gpt2_source.model.config
    reader = gguf.GGUFReader(export_gguf(gpt2_source, tmp_path / "m.gguf", quant="f32").path)
    fields, tensors = _fields(reader), _tensors(reader)
    assert fields["general.architecture"] == "gpt2"
    assert fields["gpt2.attention.layer_norm_epsilon"] == pytest.approx(config.norm_eps)
    d = config.d_model
    assert tensors["position_embd.weight"] == ((config.context_length, d), T.F32)
    assert tensors["blk.0.attn_qkv.weight"] == ((3 * d, d), T.F32)
    assert tensors["output_norm.bias"] == ((d,), T.F32)
    data = {t.name: np.array(t.data) for t in reader.tensors}
    assert not data["blk.1.ffn_down.bias"].any()
    state = gpt2_source.model.state_dict()
    np.testing.assert_array_equal(
        data["blk.1.attn_qkv.weight"], state["blocks.1.mixer.qkv_proj.weight"].numpy()
    )


def test_f32_llama_weights_round_trip_with_q_and_k_permuted(llama_source, tmp_path):
    config = llama_source.model.config
    reader = gguf.GGUFReader(export_gguf(llama_source, tmp_path / "m.gguf", quant="f32").path)
    data = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    state = llama_source.model.state_dict()
    q_size, kv_size = config.n_heads * config.head_size, config.kv_heads * config.head_size
    q, k, v = state["blocks.0.mixer.qkv_proj.weight"].split([q_size, kv_size, kv_size])
    assert torch.equal(data["blk.0.attn_v.weight"], v)
    assert torch.equal(data["blk.0.attn_q.weight"], permute_for_llama_cpp(q, config.n_heads))
    assert torch.equal(data["blk.0.attn_k.weight"], permute_for_llama_cpp(k, config.kv_heads))
    assert not torch.equal(data["blk.0.attn_q.weight"], q)
    assert torch.equal(data["token_embd.weight"], state["token_embedding.weight"])


def test_permuted_rows_with_interleaved_rope_equal_our_rotate_half_rope():
    """llama.cpp rotates pairs (2i, 2i+1); after the permutation that equals our halves rotation."""
    heads, head_dim, d_model, length = 3, 8, 12, 5
    torch.manual_seed(0)
    weight, x = torch.randn(heads * head_dim, d_model), torch.randn(length, d_model)
    cos, sin = rope_tables(head_dim, length, 10000.0)
    signed_sin = torch.cat((-sin[:, : head_dim // 2], sin[:, head_dim // 2 :]), dim=-1)
    ours = apply_rotary((x @ weight.T).view(1, length, heads, head_dim), cos[:, None], signed_sin[:, None])

    pairs = (x @ permute_for_llama_cpp(weight, heads).T).view(length, heads, head_dim // 2, 2)
    angle_cos, angle_sin = cos[:, None, : head_dim // 2], sin[:, None, : head_dim // 2]
    even = pairs[..., 0] * angle_cos - pairs[..., 1] * angle_sin
    odd = pairs[..., 0] * angle_sin + pairs[..., 1] * angle_cos
    theirs = torch.stack((even, odd), dim=-1).view(length, heads, head_dim)  # llama.cpp's layout
    unpermuted = (
        theirs.view(length, heads, head_dim // 2, 2).transpose(-1, -2).reshape(length, heads, head_dim)
    )
    torch.testing.assert_close(unpermuted, ours[0], rtol=1e-5, atol=1e-5)


def test_the_cli_offers_every_gguf_type_the_exporter_writes():
    assert CLI_QUANTS == GGUF_QUANTS


# Worst weight error of each level, relative to the largest weight of the tensor (one block's scale step).
LEVEL_ERROR = {"f32": 0, "f16": 1e-3, "bf16": 4e-3, "q8_0": 5e-3, "q5_1": 0.06, "q5_0": 0.06, "q4_1": 0.1}


@pytest.mark.parametrize("quant", [*LEVEL_ERROR, "q4_0"])
def test_every_level_reads_back_as_our_weights_within_its_rounding(llama_source, tmp_path, quant):
    model = llama_source.model
    path = export_gguf(llama_source, tmp_path / "m.gguf", quant=quant).path
    restored = load_gguf_weights(Transformer(model.config), path)  # q and k permuted back, fused again
    tolerance = LEVEL_ERROR.get(quant, 0.16)
    for name, theirs in restored.state_dict().items():
        ours = model.state_dict()[name]
        assert (theirs - ours).abs().max() <= tolerance * ours.abs().max() + 1e-7, name
    if quant != "f32":  # rounding happened, and it is not the same at every level
        assert not torch.equal(
            restored.state_dict()["blocks.0.mixer.qkv_proj.weight"],
            model.state_dict()["blocks.0.mixer.qkv_proj.weight"],
        )
