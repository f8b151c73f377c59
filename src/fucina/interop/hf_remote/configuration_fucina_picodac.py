"""Configuration of a PicoDAC-style decoder for Hugging Face transformers (exported by fucina).

The fields are LLaMA's (hidden_size, intermediate_size, num_attention_heads, num_key_value_heads,
head_dim, hidden_act, max_position_embeddings, rms_norm_eps, attention_bias, mlp_bias,
tie_word_embeddings); only the model type differs. `max_position_embeddings` is the number of learned
position embeddings (the context length), and `hidden_act` the activation of the non-gated MLP.
"""

from transformers.models.llama.configuration_llama import LlamaConfig


class FucinaPicoDACConfig(LlamaConfig):
    model_type = "fucina_picodac"
