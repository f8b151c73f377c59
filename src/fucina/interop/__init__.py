"""Export a trained fucina model to other runtimes.

- hf.py: a Hugging Face transformers model directory (config.json, model.safetensors, tokenizer files with
  the chat template, generation_config.json, README.md model card), as the standard transformers class
  of each architecture (GPT-2, LLaMA, Mistral, Ministral; ImageGPT for PicoDAC, or on request a small
  remote-code module that loads through AutoModelForCausalLM).
- gguf.py: one GGUF file for llama.cpp (arch "llama" or "gpt2"), tokenizer and chat template included,
  in f32, f16 or q8_0.
- source.py loads what is exported (a model or run directory); output.py writes the result without ever
  replacing an existing path silently; architecture.py says which block layouts a format can hold;
  model_card.py writes README.md from the run's records.
"""
