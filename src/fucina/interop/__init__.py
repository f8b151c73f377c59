"""Fucina models to and from other runtimes.

- hf_mapping.py: one table per Hugging Face architecture (names, transposes, fused q/k/v and gate/up,
  tied head, config sizes), read by both directions below.
- hf_export.py: a Hugging Face transformers model directory (config.json, model.safetensors, tokenizer
  files with the chat template, generation_config.json, README.md model card), as the standard
  transformers class of each architecture (GPT-2, LLaMA, Mistral, Ministral; ImageGPT for PicoDAC, or on
  request a small remote-code module, hf_remote/, that loads through AutoModelForCausalLM).
- hf_import.py: a local HF checkpoint (GPT-2, LLaMA, Mistral) into a fucina model directory.
- gguf.py: one GGUF file for llama.cpp (arch "llama" or "gpt2"), tokenizer and chat template included,
  in f32, f16 or q8_0.
- ternary.py: a BitNet model's packed 2-bit file (the format is compress/ternary.py).
- source.py loads what is exported (a model or run directory); architecture.py says which block layouts
  a format can hold; model_card.py writes README.md from the run's records. Outputs are written through
  fucina.fsutil (staged, never replacing an existing path silently).
"""
