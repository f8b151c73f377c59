"""fucina's decoder-only transformer, assembled from small parts chosen by one ModelConfig.

Read in this order: config.py (every choice), norms.py, positions.py (learned / RoPE), attention.py
(MHA/GQA/MQA, sliding window, fused SDPA + a plain-math reference), mlp.py, registry.py (names ->
mixer / feed-forward classes), block.py, transformer.py; cache.py and context.py carry the state of a
forward pass; io.py saves and loads; info.py counts parameters, FLOPs and memory.
"""

from fucina.model.cache import KVCache
from fucina.model.config import ModelConfig
from fucina.model.io import load_model, save_model
from fucina.model.transformer import Transformer, maybe_compile

__all__ = ["KVCache", "ModelConfig", "Transformer", "load_model", "maybe_compile", "save_model"]
