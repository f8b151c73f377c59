"""Packed export of a BitNet model: 2 bits per ternary weight, 4 weights per byte, one scale per matrix.

What and why: a BitNet b1.58 model (bitnet.py) only ever multiplies by W_q = t * s, t in {-1, 0, +1}
and s = mean|W| one float per matrix. Storing t in 2 bits instead of the 32-bit latent weight makes the
projections 16x smaller than fp32 and 8x smaller than bf16; embeddings, LM head, norms and the other
dense parameters are stored as they are (in `dtype`).

Format (one safetensors file, so loading never runs code):
- for each BitLinear weight NAME: `NAME.ternary` (uint8, ceil(numel / 4) bytes; code 0 -> 0, 1 -> +1,
  2 -> -1, weight i in bits 2*(i % 4) of byte i // 4, row-major) and `NAME.scale` (float32, shape (1,));
- every other tensor of the state dict under its own name (a tied LM head once, as io.py does);
- metadata: format "fucina-ternary", version, and the ModelConfig as JSON.

`load_ternary` rebuilds the model with each BitLinear replaced by a TernaryLinear that holds the codes
(int8, one byte per weight in memory) and the scale, and computes exactly what BitLinear computes
without gradients: same normalisation, same 8-bit activations, weight t * s. Its logits equal the
exported model's bit for bit. It is an inference model: its state dict names codes and scales, so
train from the latent-weight checkpoint (io.py), not from this file (the latent weights are gone).

Users write it with `fucina export --format ternary` (or `fucina model export-ternary`), both through
interop/ternary.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fucina.errors import CheckpointError, ConfigError
from fucina.fsutil import staged_output
from fucina.model.bitnet import NORM_EPS, BitLinear, quantize_activations, ternary_codes, weight_scale
from fucina.model.config import ModelConfig
from fucina.model.transformer import Transformer

FORMAT = "fucina-ternary"
VERSION = 1
TIED_HEAD = "lm_head.weight"
_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
_VALUES = torch.tensor([0, 1, -1, 0], dtype=torch.int8)  # code -> ternary value (code 3 is never written)


def pack_ternary(values: torch.Tensor) -> torch.Tensor:
    """Ternary values (any shape, in {-1, 0, 1}) -> uint8 codes, 4 per byte, zero-padded."""
    codes = torch.remainder(values.flatten().to(torch.int16), 3).to(torch.uint8)  # -1 -> 2
    padding = (-codes.numel()) % 4
    codes = torch.cat((codes, codes.new_zeros(padding))).view(-1, 4)
    return (codes << _SHIFTS.to(codes.device)).sum(dim=1, dtype=torch.uint8)


def unpack_ternary(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """uint8 codes -> int8 ternary values of `shape` (the inverse of pack_ternary)."""
    numel = int(torch.Size(shape).numel())
    codes = (packed.unsqueeze(1) >> _SHIFTS.to(packed.device)) & 3  # (bytes, 4)
    return _VALUES.to(packed.device)[codes.flatten()[:numel].long()].view(shape)


class TernaryLinear(nn.Module):
    """Inference twin of a BitLinear: int8 codes in {-1, 0, 1} and the matrix scale, no latent weight."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("scale", scale.float().reshape(()))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = quantize_activations(F.rms_norm(x, (x.size(-1),), eps=NORM_EPS))
        return F.linear(x, self.codes.to(self.scale.dtype) * self.scale, self.bias)


def _bitlinear_weights(model: torch.nn.Module) -> set[str]:
    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, BitLinear)}


def export_ternary(
    model: Transformer,
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    protected: Path | None = None,
) -> int:
    """Write `model` to `path` in the packed format above; returns the file size in bytes.

    `dtype` is for the tensors that are not ternary (float32 keeps them exact; bfloat16 halves them).
    The file is staged and renamed into place (fucina.fsutil): an existing `path` is refused unless
    `overwrite`, and `protected` (the model directory being read) is never replaced.
    """
    ternary = _bitlinear_weights(model)
    if not ternary:
        raise ConfigError(
            f"the ternary format needs a BitNet model (linear: bitnet): this model's linear is "
            f"{model.config.linear!r}, it has no BitLinear layer"
        )
    state = {}
    for name, tensor in model.state_dict().items():
        if model.config.tie_embeddings and name == TIED_HEAD:
            continue
        tensor = tensor.detach().to("cpu")
        if name in ternary:
            weight = tensor.float()
            state[f"{name}.ternary"] = pack_ternary(ternary_codes(weight))
            state[f"{name}.scale"] = weight_scale(weight).reshape(1)
        else:
            state[name] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()
    metadata = {"format": FORMAT, "version": str(VERSION), "config": json.dumps(model.config.to_dict())}
    with staged_output(path, overwrite=overwrite, is_dir=False, protected=protected) as tmp:
        save_file(state, tmp, metadata=metadata)
    return Path(path).stat().st_size


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    if not path.is_file():
        raise CheckpointError(f"{path}: ternary model file not found")
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            return handle.metadata() or {}, {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({err})") from None


def load_ternary(path: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """The model saved by export_ternary at `path`, TernaryLinear projections, on `device`, in eval mode."""
    path = Path(path)
    metadata, tensors = _read(path)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fucina ternary export (format {metadata.get('format')!r})")
    if int(metadata.get("version", "0")) > VERSION:
        raise CheckpointError(f"{path}: ternary format version {metadata['version']} is newer than {VERSION}")
    try:
        config = ModelConfig.from_dict(json.loads(metadata["config"]))
    except (KeyError, json.JSONDecodeError, ConfigError) as err:
        raise CheckpointError(f"{path}: bad model config in the metadata ({err})") from None
    with torch.device(device):
        model = Transformer(config)  # the BitLinear latents are built, then replaced
    ternary = _bitlinear_weights(model)
    dense = {}
    for name, expected in model.state_dict().items():
        if (config.tie_embeddings and name == TIED_HEAD) or name in ternary:
            continue
        if name not in tensors:
            raise CheckpointError(f"{path}: missing tensor {name}")
        dense[name] = _checked(path, name, tensors[name], expected.shape).to(expected.dtype)
    model.load_state_dict(dense, strict=False)
    for module_name, module in list(model.named_modules()):
        if isinstance(module, BitLinear):
            name = f"{module_name}.weight"
            if f"{name}.ternary" not in tensors or f"{name}.scale" not in tensors:
                raise CheckpointError(f"{path}: missing {name}.ternary or {name}.scale")
            packed = _checked(
                path, f"{name}.ternary", tensors[f"{name}.ternary"], (-(-module.weight.numel() // 4),)
            )
            codes = unpack_ternary(packed, module.weight.shape)
            replacement = TernaryLinear(codes, tensors[f"{name}.scale"], dense.get(f"{module_name}.bias"))
            parent_name, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, replacement)
    return model.to(device).eval()


def _checked(path: Path, name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(shape):
        raise CheckpointError(
            f"{path}: tensor {name} has shape {tuple(tensor.shape)}, the config implies {tuple(shape)}"
        )
    return tensor
