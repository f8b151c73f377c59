"""PicoDAC's TinyGPT for Hugging Face transformers: learned absolute positions, RMSNorm, non-gated MLP.

The default PicoDAC export needs no code: transformers' ImageGPTForCausalImageModeling computes this
network exactly (see fucina/export/hf.py). But that class is not in AutoModelForCausalLM's mapping, so
pipelines and chat front-ends cannot load it; `fucina export --picodac-class remote-code` ships this
file instead, for `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. It reuses LLaMA's
classes and changes the three parts that differ:
- the token embeddings are summed with learned position embeddings (`embed_positions`) before the first
  block, at the positions generate() passes (or the cache length onwards);
- the rotary embedding is replaced by the identity rotation (cos 1, sin 0), which leaves queries and
  keys exactly as projected;
- each MLP is `down_proj(act(up_proj(x)))` with `config.hidden_act` (SiLU for PicoDAC).
Everything else (pre-norm blocks, attention with its KV cache, final RMSNorm, tied LM head) is LLaMA's.
"""

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaModel

from .configuration_fucina_picodac import FucinaPicoDACConfig


class FucinaPicoDACMLP(nn.Module):
    """The non-gated feed-forward: up-projection, activation, down-projection."""

    def __init__(self, config):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)))


class IdentityRotation(nn.Module):
    """Takes the place of LLaMA's rotary embedding: cos 1 and sin 0 rotate nothing."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim

    def forward(self, x, position_ids):
        shape = (*position_ids.shape, self.head_dim)
        return x.new_ones(shape), x.new_zeros(shape)


class FucinaPicoDACModel(LlamaModel):
    config_class = FucinaPicoDACConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.rotary_emb = IdentityRotation(config.head_dim)
        for layer in self.layers:
            layer.mlp = FucinaPicoDACMLP(config)
        self.post_init()

    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            start = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(
                start, start + inputs_embeds.shape[1], device=inputs_embeds.device
            ).unsqueeze(0)
        inputs_embeds = inputs_embeds + self.embed_positions(position_ids)
        return super().forward(inputs_embeds=inputs_embeds, position_ids=position_ids, **kwargs)


class FucinaPicoDACForCausalLM(LlamaForCausalLM):
    config_class = FucinaPicoDACConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = FucinaPicoDACModel(config)
        self.post_init()
