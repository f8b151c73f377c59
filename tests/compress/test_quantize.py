"""Quantized model directories: saved with scales.json, loaded by load_pretrained, close to the float model."""

from __future__ import annotations

import json

import pytest
import torch
from quantize_helpers import make_model_dir
from safetensors import safe_open
from torch import nn

from fucina.compress import Int4Linear, Int8Linear, is_quantized_dir, quantize_model_dir
from fucina.compress.quantize import quantizable_linears
from fucina.errors import CheckpointError, ConfigError
from fucina.fsutil import OutputExistsError
from fucina.inference.generate import SamplingConfig, generate
from fucina.model.io import load_model
from fucina.model_dir import load_pretrained


def _quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear | Int4Linear)}


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_dir_loads_through_load_pretrained_and_generates(model_dir, tmp_path, bits):
    float_model = load_model(model_dir)
    projections = set(quantizable_linears(float_model))
    quantize_model_dir(model_dir, tmp_path / "q", bits=bits)
    assert is_quantized_dir(tmp_path / "q") and not is_quantized_dir(model_dir)

    model, tok = load_pretrained(tmp_path / "q")
    layers = _quantized_layers(model)
    assert set(layers) == projections
    for name, layer in layers.items():  # an untied head is always int8; the rest has the bits asked
        assert isinstance(layer, Int8Linear if bits == 8 or name == "lm_head" else Int4Linear)
    assert not any(type(m) is nn.Linear for m in model.modules() if m is not model.lm_head)
    prompt = tok.encode("La cucina italiana")
    out = generate(model, [prompt, prompt[:2]], SamplingConfig(max_new_tokens=10, greedy=True))
    single = generate(model, [prompt], SamplingConfig(max_new_tokens=10, greedy=True))
    assert [len(o) for o in out] == [10, 10]
    assert all(0 <= t < model.config.vocab_size for t in single[0])


@pytest.mark.parametrize("bits", [8, 4])
def test_scales_json_describes_every_quantized_tensor_and_what_stayed_float(model_dir, tmp_path, bits):
    float_model = load_model(model_dir)
    quantize_model_dir(model_dir, tmp_path / "q", bits=bits)
    manifest = json.loads((tmp_path / "q" / "scales.json").read_text())
    assert manifest["bits"] == bits
    assert set(manifest["quantized"]) == set(quantizable_linears(float_model))
    with safe_open(tmp_path / "q" / "model.safetensors", framework="pt") as handle:
        stored = {name: handle.get_tensor(name) for name in handle.keys()}
    for name, entry in manifest["quantized"].items():
        rows, columns = entry["shape"]
        assert (rows, columns) == tuple(float_model.get_submodule(name).weight.shape)
        values, scales = stored[entry["values"]], stored[entry["scales"]]
        if entry["bits"] == 8:
            assert values.dtype == torch.int8 and values.shape == (rows, columns)
            assert scales.shape == (rows,)
        else:
            group = entry["group_size"]
            groups = -(-columns // group)
            assert values.dtype == torch.uint8 and values.shape == (rows, groups * group // 2)
            assert scales.shape == stored[entry["minimums"]].shape == (rows, groups)
        assert 0 < entry["mean_abs_error"] <= entry["max_abs_error"]
    kept = set(manifest["kept_in_float32"])
    assert "token_embedding.weight" in kept and "final_norm.weight" in kept
    assert {f"blocks.{i}.mixer_norm.weight" for i in range(float_model.config.n_layers)} <= kept
    assert all(stored[name].dtype == torch.float32 for name in kept)


def test_int8_scales_are_symmetric_per_output_channel(model_dir, tmp_path):
    float_model = load_model(model_dir)
    quantize_model_dir(model_dir, tmp_path / "q", bits=8)
    model, _ = load_pretrained(tmp_path / "q")
    for name, layer in _quantized_layers(model).items():
        weight = float_model.get_submodule(name).weight.detach()
        torch.testing.assert_close(layer.scale, weight.abs().amax(dim=1) / 127)
        assert layer.weight.abs().amax(dim=1).eq(127).all()  # each row's largest weight hits the top
        assert (layer.dequantized() - weight).abs().le(layer.scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_kernels_compute_the_product_with_the_dequantized_weights(bits):
    torch.manual_seed(0)
    linear = nn.Linear(200, 72, bias=True)  # neither size a multiple of int4's 32 / 16: padded inside
    layer = Int8Linear.from_float(linear) if bits == 8 else Int4Linear.from_float(linear, 32)
    for x in (torch.randn(1, 200), torch.randn(3, 5, 200)):  # one row (decoding) and many (prefill)
        expected = x @ layer.dequantized().T + linear.bias.detach()
        got = layer(x)
        assert got.shape == expected.shape
        # bf16 activations (many rows) or per-token int8 activations (one row): about 1% of the scale
        assert (got - expected).abs().max() < 0.03 * expected.abs().max()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_logits_stay_close_to_float_logits(model_dir, tmp_path, bits):
    float_model = load_model(model_dir)
    quantize_model_dir(model_dir, tmp_path / "q", bits=bits)
    model, _ = load_pretrained(tmp_path / "q")
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids), float_model(ids)
        one_ours, one_theirs = model(ids[:1, :1]), float_model(ids[:1, :1])  # the one-row kernel
    spread = theirs.std()
    tolerance = 0.05 if bits == 8 else 0.25
    assert (ours - theirs).abs().max() < tolerance * spread * 10
    assert (ours - theirs).pow(2).mean().sqrt() < tolerance * spread
    assert (one_ours - one_theirs).pow(2).mean().sqrt() < tolerance * spread
    if bits == 8:
        agreement = (ours.argmax(-1) == theirs.argmax(-1)).float().mean()
        assert agreement > 0.9


def test_a_model_without_tokenizer_is_refused_and_nothing_is_written(tmp_path):
    source = make_model_dir(tmp_path / "model", "llama", tokenizer=None)
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        quantize_model_dir(source, tmp_path / "q", bits=8)
    assert not (tmp_path / "q").exists()


def test_an_existing_output_is_never_overwritten(model_dir, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="already exists"):
        quantize_model_dir(model_dir, out, bits=8)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(OutputExistsError, match="model being read"):
        quantize_model_dir(model_dir, model_dir, bits=8, overwrite=True)
    assert not is_quantized_dir(model_dir)


@pytest.mark.parametrize(("bits", "group_size"), [(3, None), (16, None), (4, 48)])
def test_bad_bits_or_group_size_are_refused(model_dir, tmp_path, bits, group_size):
    with pytest.raises(ConfigError, match="bits|group size"):
        quantize_model_dir(model_dir, tmp_path / "q", bits=bits, group_size=group_size)
    assert not (tmp_path / "q").exists()


def test_a_quantized_model_is_not_quantized_again(model_dir, tmp_path):
    quantize_model_dir(model_dir, tmp_path / "q", bits=8)
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_model_dir(tmp_path / "q", tmp_path / "q4", bits=4)


def test_cli_quantize_reports_errors_in_one_line(model_dir, tmp_path, capsys):
    from fucina.cli.main import main

    assert main(["quantize", "--model", str(model_dir), "--bits", "8", "--out", str(tmp_path / "q")]) == 0
    assert "int8" in capsys.readouterr().out
    code = main(["quantize", "--model", str(model_dir), "--bits", "8", "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "already exists" in err and "\n" not in err
