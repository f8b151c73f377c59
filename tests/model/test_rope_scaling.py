"""RoPE scaling (linear / PI, static NTK-aware, YaRN): the frequencies, the config checks, and the same
logits in transformers after export (and back through import), and llama.cpp's keys in the GGUF."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from fucina.errors import ConfigError
from fucina.interop.gguf import export_gguf
from fucina.interop.hf_export import export_hf
from fucina.interop.hf_import import import_hf_model
from fucina.interop.source import ExportError, load_source
from fucina.model.config import ModelConfig
from fucina.model.io import save_model
from fucina.model.rope_scaling import ntk_base, parse_rope_scaling, rope_frequencies
from fucina.model.transformer import Transformer
from fucina.resources import builtin_prose_files
from fucina.tokenizer import train_tokenizer

HEAD_DIM, BASE, ORIGINAL, FACTOR = 16, 10000.0, 16, 4.0
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": FACTOR, "original_context_length": ORIGINAL},
    "ntk": {"rope_type": "ntk", "factor": FACTOR, "original_context_length": ORIGINAL},
    "yarn": {"rope_type": "yarn", "factor": FACTOR, "original_context_length": ORIGINAL},
    "yarn-betas": {
        "rope_type": "yarn",
        "factor": FACTOR,
        "original_context_length": ORIGINAL,
        "beta_fast": 16.0,
        "beta_slow": 2.0,
        "attention_factor": 1.2,
    },
}


def _default_frequencies() -> torch.Tensor:
    return rope_frequencies(HEAD_DIM, BASE, None)[0]


def test_linear_divides_every_frequency_by_the_factor():
    inv_freq, multiplier = rope_frequencies(HEAD_DIM, BASE, parse_rope_scaling(SCALINGS["linear"]))
    assert torch.equal(inv_freq, _default_frequencies() / FACTOR) and multiplier == 1.0


def test_ntk_keeps_the_fastest_frequency_and_interpolates_the_slowest():
    inv_freq, _ = rope_frequencies(HEAD_DIM, BASE, parse_rope_scaling(SCALINGS["ntk"]))
    default = _default_frequencies()
    assert inv_freq[0] == default[0] == 1.0
    # the slowest pair: base^-(d-2)/d becomes (base * F^(d/(d-2)))^-(d-2)/d = default / F
    assert inv_freq[-1].item() == pytest.approx(default[-1].item() / FACTOR, rel=1e-5)
    assert ntk_base(BASE, FACTOR, HEAD_DIM) == pytest.approx(BASE * FACTOR ** (16 / 14))


@pytest.mark.parametrize("name", ["yarn", "yarn-betas"])
def test_yarn_frequencies_and_attention_factor_equal_transformers(name):
    scaling = SCALINGS[name]
    parameters = {"rope_type": "yarn", "rope_theta": BASE, "factor": FACTOR}
    parameters["original_max_position_embeddings"] = ORIGINAL
    for key in ("beta_fast", "beta_slow", "attention_factor"):
        if key in scaling:
            parameters[key] = scaling[key]
    hf_config = LlamaConfig(
        hidden_size=HEAD_DIM * 2,
        num_attention_heads=2,
        max_position_embeddings=ORIGINAL * 4,
        rope_parameters=parameters,
    )
    expected, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    inv_freq, multiplier = rope_frequencies(HEAD_DIM, BASE, parse_rope_scaling(scaling))
    torch.testing.assert_close(inv_freq, expected, rtol=1e-6, atol=0)
    assert multiplier == pytest.approx(expected_factor)
    if name == "yarn":
        assert multiplier == pytest.approx(0.1 * math.log(FACTOR) + 1)
    # YaRN sits between the two: the fastest pair is extrapolated, the slowest interpolated.
    assert inv_freq[0] == _default_frequencies()[0]
    assert inv_freq[-1] == pytest.approx((_default_frequencies()[-1] / FACTOR).item())


@pytest.mark.parametrize(
    ("scaling", "message"),
    [
        ({"rope_type": "dynamic", "factor": 2.0, "original_context_length": 8}, "rope_type: 'dynamic'"),
        (
            {"rope_type": "linear", "factor": 0.5, "original_context_length": 8},
            "factor: must be a number >= 1",
        ),
        ({"rope_type": "yarn", "factor": 2.0}, "original_context_length: must be a positive integer"),
        (
            {"rope_type": "yarn", "factor": 2.0, "original_context_length": 8, "mscale": 1},
            "unknown key 'mscale'",
        ),
    ],
)
def test_bad_scalings_are_refused_naming_the_key(scaling, message):
    with pytest.raises(ConfigError, match="model.rope_scaling") as err:
        ModelConfig(positions="rope", rope_scaling=scaling)
    assert message in str(err.value)


def test_learned_positions_refuse_rope_scaling():
    with pytest.raises(ConfigError, match="model.rope_scaling needs RoPE"):
        ModelConfig(positions="learned", rope_scaling=SCALINGS["linear"])


def test_config_json_of_an_unscaled_model_has_no_rope_scaling_key():
    assert "rope_scaling" not in ModelConfig().to_dict()
    scaled = ModelConfig(positions="rope", rope_scaling=SCALINGS["yarn"])
    assert ModelConfig.from_dict(scaled.to_dict()) == scaled


# --- the peers --------------------------------------------------------------------------------------------


def _llama(scaling: dict | None) -> ModelConfig:
    return ModelConfig(
        vocab_size=320,
        context_length=ORIGINAL * 4,
        n_layers=2,
        d_model=32,
        n_heads=2,
        n_kv_heads=1,
        d_ff=64,
        positions="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
        tie_embeddings=False,
        rope_scaling=scaling,
    )


def _random(config: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3) if parameter.dim() > 1 else parameter.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    texts = [path.read_text(encoding="utf-8") for path in builtin_prose_files()[:3]]
    return train_tokenizer(texts, 320, template="chatml", show_progress=False)


@pytest.fixture(scope="module", params=list(SCALINGS))
def exported(request, tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp(request.param)
    model = _random(_llama(SCALINGS[request.param]))
    save_model(model, root / "model")
    tokenizer.save(root / "model")
    export_hf(load_source(root / "model"), root / "hf")
    return request.param, model, root


def test_hf_logits_equal_fucina_logits_past_the_original_context(exported):
    name, model, root = exported
    hf_model = AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    ids = torch.randint(0, 320, (2, ORIGINAL * 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(ids).logits
        unscaled = _random(_llama(None))(ids)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    assert (ours - unscaled).abs().max() > 1e-2, (
        "the scaling must change the logits for this test to mean anything"
    )


def test_import_reads_the_scaling_back(exported):
    name, model, root = exported
    imported = import_hf_model(root / "hf")
    ids = torch.randint(0, 320, (1, ORIGINAL * 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(imported(ids), model(ids), atol=1e-4, rtol=0)
    if name == "ntk":  # static NTK is plain RoPE with the raised base: the same numbers
        assert imported.config.rope_scaling is None
        assert imported.config.rope_base == pytest.approx(ntk_base(BASE, FACTOR, HEAD_DIM))
    else:
        assert imported.config.rope_scaling["rope_type"] == SCALINGS[name]["rope_type"]
        assert imported.config.rope_scaling["factor"] == FACTOR


def test_gguf_holds_llama_cpp_rope_scaling_keys(exported):
    import gguf

    name, _, root = exported
    if name == "yarn-betas":  # llama.cpp derives YaRN's attention factor from the factor
        with pytest.raises(ExportError, match="rope_scaling.attention_factor"):
            export_gguf(load_source(root / "model"), root / "model.gguf", quant="f32")
        return
    export_gguf(load_source(root / "model"), root / "model.gguf", quant="f32")
    reader = gguf.GGUFReader(root / "model.gguf")

    def value(key: str):
        field = reader.fields.get(f"llama.{key}")
        return None if field is None else field.contents()

    scaling = SCALINGS[name]
    if name == "ntk":
        assert value("rope.freq_base") == pytest.approx(ntk_base(BASE, FACTOR, HEAD_DIM), rel=1e-6)
        assert value("rope.scaling.type") is None
        return
    assert value("rope.freq_base") == pytest.approx(BASE)
    assert value("rope.scaling.type") == scaling["rope_type"]
    assert value("rope.scaling.factor") == pytest.approx(FACTOR)
    if scaling["rope_type"] == "yarn":
        assert value("rope.scaling.original_context_length") == ORIGINAL
        assert value("rope.scaling.yarn_beta_fast") == pytest.approx(scaling.get("beta_fast", 32.0))
        assert value("rope.scaling.yarn_beta_slow") == pytest.approx(scaling.get("beta_slow", 1.0))
