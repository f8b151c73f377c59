"""The factory for the projection layers inside blocks, chosen by `config.linear`.

Why a factory: quantization-aware variants (BitNet's ternary BitLinear) replace every projection of the
attention and feed-forward without touching those modules: register a class with nn.Linear's signature
`(in_features, out_features, bias=...)` in LINEARS. Embeddings and the LM head stay plain (as in BitNet).
Registered: "dense" (plain nn.Linear; decoding swaps in faster kernels on its own copy of the model,
fucina.inference.cpu_kernels), "bitnet" (BitNet b1.58's BitLinear, bitnet.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from fucina.model.bitnet import BitLinear

if TYPE_CHECKING:
    from fucina.model.config import ModelConfig

LINEARS: dict[str, type[nn.Module]] = {"dense": nn.Linear, "bitnet": BitLinear}


def make_linear(
    config: ModelConfig, in_features: int, out_features: int, bias: bool | None = None
) -> nn.Module:
    """A projection of the kind `config.linear` names; `bias` defaults to `config.bias`."""
    return LINEARS[config.linear](in_features, out_features, bias=config.bias if bias is None else bias)
