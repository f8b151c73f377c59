"""Named model shapes: the systems fucina reproduces, and small LLaMA/Mistral-style ones.

- picodac: PicoDAC's TinyGPT (6 layers, d 240, 6 heads, non-gated SiLU FFN 960, context 64, vocab
  1920, RMSNorm, learned positions, tied head). The PicoDAC whitepaper shows no biases in its
  blocks; without them the model has 4,626,480 parameters (its "~8M" estimate double-counts).
- microdac: microDAC (HF GPT-2 layout: 16 layers, d 512, 8 heads, FFN 2048, gelu_new, learned
  positions, context 2048, vocab 32000, LayerNorm, biases, tied head): 67.9M ("~70M").
- gpt2-real: GPT-2 small with an untied head (163.0M); gpt2-demo (6 layers, d 768), gpt2-deep
  (12 layers, d 384) and gpt2-balanced (6 layers, d 384) are the shapes of the "LLM from scratch"
  study, same layout (64-dimensional heads). gpt2-tiny is for tests.
- llama-tiny / llama-30m: LLaMA layout (RoPE, RMSNorm, SwiGLU, GQA, no biases, untied head);
  mistral-tiny / mistral-30m add a sliding window on every layer.
Counts are checked in tests/model/test_presets.py; `fucina model info NAME` prints them.

Architecture presets (ARCHITECTURE_PRESETS, beyond attention + MLP; counts checked in
tests/model/test_moe.py and test_elleci.py):
- mixtral-tiny: Mixtral's layout at toy size (4 layers, d 256, GQA 8/2, RoPE, RMSNorm, untied head;
  every feed-forward is 8 SwiGLU experts of 896 = 3.5 d, Mixtral's ratio, top-2): 26.8M total, 10.3M
  active per token.
- elleci: the Elleci hybrid (d 2048 x 24 layers, vocab 32128, context 1024, SwiGLU 5632, RMSNorm, untied
  head, BitNet b1.58 projections) with the layer pattern mamba, mamba, mla repeated 8 times: 16 Mamba-1
  layers (d_state 16, expand 2) and 8 MLA layers (16 heads of 128, kv latent 512, rope 64). That is
  1,495,308,288 parameters (~1.5B). Alternating mamba/mla gives 1.44B, three Mamba per MLA 1.52B; the
  period of 3 also divides elleci-tiny's 6 layers, so both presets share the pattern exactly. The
  preset stores the pattern itself (`layer_mixers: [mamba, mamba, mla]`, repeated over the layers), so
  `model.layer_mixers=[mamba,mla]` or `model.n_layers=12` overrides keep a consistent hybrid.
- elleci-tiny: the same pattern and parts at d 192, 6 layers, vocab 2048, context 256 (3.9M): trains on
  a CPU in minutes.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib

from fucina.errors import ConfigError
from fucina.model.config import ModelConfig

_GPT2 = dict(
    vocab_size=50257,
    context_length=1024,
    positions="learned",
    norm="layernorm",
    norm_eps=1e-5,
    mlp="gelu_tanh",
    bias=True,
    tie_embeddings=False,
)
_LLAMA = dict(
    positions="rope",
    rope_base=10000.0,
    norm="rmsnorm",
    norm_eps=1e-5,
    mlp="swiglu",
    bias=False,
    tie_embeddings=False,
)

PRESETS: dict[str, ModelConfig] = {
    "picodac": ModelConfig(
        vocab_size=1920,
        context_length=64,
        n_layers=6,
        d_model=240,
        n_heads=6,
        d_ff=960,
        positions="learned",
        norm="rmsnorm",
        mlp="silu",
        bias=False,
        tie_embeddings=True,
    ),
    "microdac": ModelConfig(
        vocab_size=32000,
        context_length=2048,
        n_layers=16,
        d_model=512,
        n_heads=8,
        d_ff=2048,
        positions="learned",
        norm="layernorm",
        mlp="gelu_tanh",
        bias=True,
        tie_embeddings=True,
    ),
    "gpt2-real": ModelConfig(n_layers=12, d_model=768, n_heads=12, d_ff=3072, **_GPT2),
    "gpt2-demo": ModelConfig(n_layers=6, d_model=768, n_heads=12, d_ff=3072, **_GPT2),
    "gpt2-deep": ModelConfig(n_layers=12, d_model=384, n_heads=6, d_ff=1536, **_GPT2),
    "gpt2-balanced": ModelConfig(n_layers=6, d_model=384, n_heads=6, d_ff=1536, **_GPT2),
    "gpt2-tiny": ModelConfig(
        **{**_GPT2, "vocab_size": 512, "context_length": 128}, n_layers=2, d_model=64, n_heads=4, d_ff=256
    ),
    "llama-tiny": ModelConfig(
        vocab_size=8000,
        context_length=256,
        n_layers=6,
        d_model=256,
        n_heads=8,
        n_kv_heads=4,
        d_ff=704,
        **_LLAMA,
    ),
    "llama-30m": ModelConfig(
        vocab_size=16000,
        context_length=1024,
        n_layers=12,
        d_model=384,
        n_heads=6,
        n_kv_heads=2,
        d_ff=1024,
        **_LLAMA,
    ),
}
PRESETS["mistral-tiny"] = dataclasses.replace(PRESETS["llama-tiny"], sliding_window=64)
PRESETS["mistral-30m"] = dataclasses.replace(PRESETS["llama-30m"], sliding_window=256)

PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)

ELLECI_PATTERN = ("mamba", "mamba", "mla")
_ELLECI = dict(
    positions="rope",  # no absolute positions: MLA rotates its own key part, Mamba needs none
    norm="rmsnorm",
    mlp="swiglu",
    bias=False,
    tie_embeddings=False,
    linear="bitnet",
)


ARCHITECTURE_PRESETS: dict[str, ModelConfig] = {
    "mixtral-tiny": ModelConfig(
        vocab_size=8000,
        context_length=256,
        n_layers=4,
        d_model=256,
        n_heads=8,
        n_kv_heads=2,
        d_ff=896,
        ffn="moe",
        moe_num_experts=8,
        moe_top_k=2,
        **_LLAMA,
    ),
    "elleci": ModelConfig(
        vocab_size=32128,
        context_length=1024,
        n_layers=24,
        d_model=2048,
        n_heads=16,
        d_ff=5632,
        layer_mixers=list(ELLECI_PATTERN),
        **_ELLECI,
    ),
    "elleci-tiny": ModelConfig(
        vocab_size=2048,
        context_length=256,
        n_layers=6,
        d_model=192,
        n_heads=6,
        d_ff=512,
        layer_mixers=list(ELLECI_PATTERN),
        **_ELLECI,
    ),
}
ARCHITECTURE_PRESET_NAMES: tuple[str, ...] = tuple(ARCHITECTURE_PRESETS)
ALL_PRESETS: dict[str, ModelConfig] = {**PRESETS, **ARCHITECTURE_PRESETS}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of the preset `name`; ConfigError suggests close names for a typo."""
    if name not in ALL_PRESETS:
        close = difflib.get_close_matches(name, list(ALL_PRESETS), n=3)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise ConfigError(f"unknown model preset {name!r}{hint}; known: {', '.join(ALL_PRESETS)}")
    return copy.deepcopy(ALL_PRESETS[name])  # deep: the per-layer lists must not be shared
