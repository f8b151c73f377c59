"""Weight-only quantized linear layers that multiply with torch's low-bit CPU kernels.

Design choices, and why:
- int8: one symmetric scale per output channel (row), scale = max|w_row| / 127, q = round(w / scale) in
  [-127, 127]. Two CPU kernels, both reading the weights as int8, never expanding them to a float matrix:
  * one row at a time (batch-1 decoding): `torch.ops.quantized.linear_dynamic` (fbgemm/onednn), which
    also quantizes the row's activations to int8 on the fly (one scale per token) and multiplies in int8
    with int32 accumulation; in our batch-1 measurements it was the fastest of the three candidates
    (1.3-4x faster than `_weight_int8pack_mm` on the larger matrices, see docs/quantize.md);
  * several rows (prompt prefill, evaluation, batched generation): `torch._weight_int8pack_mm`, weight-only
    (bf16 activations and scales), so the long-sequence numbers (bits per byte) carry no activation
    rounding; it crashes on input sizes that are not a multiple of 16, so those are zero-padded. `reduce_range` (7-bit activations) is kept on, as PyTorch does on x86, because CPUs
    without VNNI saturate the 8-bit products.
- int4: asymmetric groups of `group_size` consecutive inputs per row (32, 64, 128 or 256: the sizes the
  kernel takes), scale = (max - min) / 15, q = round((w - min) / scale) in [0, 15], w ~ q * scale + min.
  Asymmetric, because a group's weights are rarely centred on zero and 16 levels are too few to waste
  half of them. On CPU the product runs in `torch.ops.aten._weight_int4pack_mm_for_cpu` on the weights
  packed by `_convert_weight_to_int4pack_for_cpu` (that kernel's formula is (q - 8) * scale + zero, so
  zero = min + 8 * scale). The kernel needs the input size to be a multiple of the group size and the
  output size a multiple of 16: other shapes (PicoDAC's width 240) are zero-padded when packing, and
  the activations padded to match.
- Both kernels take bf16 activations: the input is cast to bf16 for the product and the result cast back
  (the same rounding as bf16 autocast inference). On other devices the weights are dequantized for a
  plain matmul (correct, not fast: the low-bit kernels here are CPU kernels).
- What is saved is kernel-independent: int8 rows, or int4 values two per byte (low nibble first) with
  float32 scales and minimums; the packed int4 layout is rebuilt on load, since it depends on the CPU
  kernel's version.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

INT4_GROUP_SIZES = (32, 64, 128, 256)
INT4_ROW_MULTIPLE = 16  # the int4 CPU kernel packs output rows in blocks of 16
KERNEL_DTYPE = torch.bfloat16
INT8_PACK_MULTIPLE = 16  # _weight_int8pack_mm crashes on inputs of other sizes: zero-padded to it
DYNAMIC_INT8_ENGINES = ("x86", "fbgemm", "onednn", "qnnpack")  # engines with quantized::linear_dynamic


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values (N, K), float32 scales (N,)) of a weight (N, K), symmetric per output row."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values 0..15 as uint8 (N, K'), scales (N, K'/g), minimums (N, K'/g)) with K' = K padded to g."""
    weight = weight.detach().float()
    rows, columns = weight.shape
    padded = -(-columns // group_size) * group_size
    weight = F.pad(weight, (0, padded - columns))
    groups = weight.view(rows, padded // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15.0).clamp(min=1e-12)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return q.view(rows, padded), scale, low


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values per byte: column 2j in the low nibble, 2j + 1 in the high one."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).view(packed.size(0), -1)


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and one scale per output channel (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("_kernel_scale", torch.ones(out_features, dtype=KERNEL_DTYPE), persistent=False)
        self._packed_dynamic = None  # quantized::linear_dynamic's packed weights (CPU), built by prepare()
        self.padded_in = -(-in_features // INT8_PACK_MULTIPLE) * INT8_PACK_MULTIPLE
        self._kernel_weight = self.weight  # the int8 rows zero-padded to padded_in for _weight_int8pack_mm

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        layer.weight, layer.scale = quantize_int8(linear.weight)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        layer.to(linear.weight.device).prepare()
        return layer

    def prepare(self) -> None:
        """Refresh the kernels' copies of the weights and scales (after loading a state dict)."""
        self._kernel_scale = self.scale.to(KERNEL_DTYPE)
        self._kernel_weight = F.pad(self.weight, (0, self.padded_in - self.in_features))
        self._packed_dynamic = None
        if self.weight.device.type == "cpu" and torch.backends.quantized.engine in DYNAMIC_INT8_ENGINES:
            with warnings.catch_warnings():  # torch marks quantized tensors deprecated; the kernel remains
                warnings.simplefilter("ignore", UserWarning)
                weight = torch._make_per_channel_quantized_tensor(
                    self.weight, self.scale.double(), torch.zeros(self.out_features, dtype=torch.long), 0
                )
            bias = None if self.bias is None else self.bias.float()
            self._packed_dynamic = torch.ops.quantized.linear_prepack(weight, bias)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and self._packed_dynamic is not None and x.numel() == self.in_features:
            row = x.reshape(1, self.in_features).float()  # (1, K): one token, bias inside the kernel
            y = torch.ops.quantized.linear_dynamic(row, self._packed_dynamic, True)
            return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        if x.device.type == "cpu":
            flat = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)  # (B*T, K)
            if self.padded_in != self.in_features:
                flat = F.pad(flat, (0, self.padded_in - self.in_features))  # (B*T, K')
            y = torch._weight_int8pack_mm(flat, self._kernel_weight, self._kernel_scale)  # (B*T, N)
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantized().to(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int4Linear(nn.Module):
    """A linear layer with group-wise asymmetric int4 weights (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int):
        super().__init__()
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.padded_in = -(-in_features // group_size) * group_size
        self.padded_out = -(-out_features // INT4_ROW_MULTIPLE) * INT4_ROW_MULTIPLE
        groups = self.padded_in // group_size
        self.register_buffer("weight", torch.zeros(out_features, self.padded_in // 2, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, groups))
        self.register_buffer("minimum", torch.zeros(out_features, groups))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed: torch.Tensor | None = None
        self._scale_and_zero: torch.Tensor | None = None

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        q, layer.scale, layer.minimum = quantize_int4(linear.weight, group_size)
        layer.weight = pack_nibbles(q)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        layer.to(linear.weight.device).prepare()
        return layer

    def prepare(self) -> None:
        """Build the CPU kernel's packed weights and (scale, zero) table from the saved values."""
        if self.weight.device.type != "cpu":
            self._packed = self._scale_and_zero = None
            return
        extra_rows = self.padded_out - self.out_features
        q = F.pad(unpack_nibbles(self.weight).to(torch.int32), (0, 0, 0, extra_rows))  # (N', K')
        self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        scale = F.pad(self.scale, (0, 0, 0, extra_rows), value=1.0)
        zero = F.pad(self.minimum, (0, 0, 0, extra_rows)) + 8 * scale
        self._scale_and_zero = (
            torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)
        )

    def dequantized(self) -> torch.Tensor:
        q = unpack_nibbles(self.weight).float().view(self.out_features, -1, self.group_size)
        weight = q * self.scale[..., None] + self.minimum[..., None]
        return weight.view(self.out_features, self.padded_in)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and self._packed is not None:
            flat = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)  # (B*T, K)
            if self.padded_in != self.in_features:
                flat = F.pad(flat, (0, self.padded_in - self.in_features))
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat, self._packed, self.group_size, self._scale_and_zero
            )
            if self.padded_out != self.out_features:
                y = y[:, : self.out_features]
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantized().to(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self.prepare()  # the packed layout belongs to the device the weights are on
        return result

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"int4 asymmetric, group_size={self.group_size}"
        )
