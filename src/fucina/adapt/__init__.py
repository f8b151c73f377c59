"""Low-rank adapters (LoRA): wrap a frozen model's projections, merge them, read and write PEFT's format.

- lora_config.py  the `lora:` section of a training config (rank, alpha, dropout, rsLoRA, targets)
- targets.py      which projections a target name selects, per architecture; the refusals
- lora.py         LoRALinear (a frozen base layer plus one low-rank update per row block) and apply_lora
- adapter_dir.py  the LoRA model directory (base reference + adapter), registered with fucina.model_dir
- merge.py        W + scale * B A into an ordinary model directory
- peft_format.py  adapter_config.json + adapter_model.safetensors, both ways, on fucina's HF export

The package imports nothing heavy on import: train/config.py reads lora_config.py alone.
"""
