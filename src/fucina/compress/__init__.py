"""Post-training weight quantization (int8 per channel, int4 per group) with real low-bit CPU kernels.

layers.py holds the quantized linear layers and their kernels; model_dir.py quantizes a model and saves
or loads a quantized model directory (a model directory with a `fucina_quantization` marker in
config.json, which `fucina generate` / `fucina chat` load through fucina.model_dir).
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
