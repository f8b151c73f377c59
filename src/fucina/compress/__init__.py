"""Compression after training: int8/int4 weight quantization with real low-bit CPU kernels, ternary export.

quantized_layers.py holds the quantized linear layers and their kernels; quantize.py quantizes a model
and saves or loads a quantized model directory (a model directory with a `fucina_quantization` marker in
config.json), a kind it registers with fucina.model_dir so `fucina generate` / `fucina chat` load it;
ternary.py packs a BitNet model's weights into 2-bit codes.
"""

from fucina.compress.quantize import (
    QuantizationSpec,
    QuantizeResult,
    is_quantized_dir,
    load_quantized,
    quantize_model,
    quantize_model_dir,
    save_quantized,
)
from fucina.compress.quantized_layers import Int4Linear, Int8Linear

__all__ = [
    "Int4Linear",
    "Int8Linear",
    "QuantizationSpec",
    "QuantizeResult",
    "is_quantized_dir",
    "load_quantized",
    "quantize_model",
    "quantize_model_dir",
    "save_quantized",
]
