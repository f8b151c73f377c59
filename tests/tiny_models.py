"""Tiny models for the model tests (d_model 32-64, 2 layers: each test runs in well under a second)."""

from __future__ import annotations

import dataclasses

import torch

from fucina.model.config import ModelConfig
from fucina.model.transformer import Transformer

TINY = ModelConfig(vocab_size=97, context_length=48, n_layers=2, d_model=32, n_heads=4, d_ff=64)

# Every attention variant the cache and the generator must handle.
VARIANTS = {
    "mha-learned-gpt2": dict(positions="learned", norm="layernorm", mlp="gelu_tanh", bias=True),
    "gqa-rope-llama": dict(
        positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_heads=2, tie_embeddings=False
    ),
    "mqa-rope": dict(positions="rope", norm="rmsnorm", mlp="silu", n_kv_heads=1),
    "sliding-window-rope": dict(
        positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, sliding_window=5
    ),
    "sliding-window-some-layers-learned": dict(
        positions="learned", sliding_window=4, sliding_window_layers=[1]
    ),
    "wide-heads-gelu": dict(positions="rope", head_dim=16, mlp="gelu", n_kv_heads=2),
}


def tiny_config(**overrides) -> ModelConfig:
    return dataclasses.replace(TINY, **overrides)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_config(**overrides)).eval()


def captured_calls(fn, *args) -> list[str]:
    """The torch functions and tensor methods Dynamo captures when compiling fn(*args).

    A recording backend instead of inductor: it shows which path the compiled code takes, in milliseconds.
    """
    calls: list[str] = []

    def record(graph_module, example_inputs):
        nodes = graph_module.graph.nodes
        calls.extend(str(n.target) for n in nodes if n.op in ("call_function", "call_method"))
        return graph_module.forward

    torch.compile(fn, backend=record, dynamic=False)(*args)
    return calls
