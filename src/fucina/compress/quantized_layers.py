"""Quantized linear layers (int8 per channel, int4 group-wise) that multiply with low-bit CPU kernels.

Design choices, and why:
- int8: one symmetric scale per output channel (row), scale = max|w_row| / 127, q = round(w / scale) in
  [-127, 127]. Activations are quantized the same way on the fly, one symmetric scale per row (token),
  and the product is exact in integers: y = (xq . wq) * x_scale * w_scale (W8A8, as llama.cpp's q8_0
  products quantize their activations to 8 bits). Why: every CPU path then computes the same numbers up
  to float32 rounding of the two scales, so one row, several rows, eager and compiled decoding agree,
  and a row's result never depends on the other rows of its batch (per-row scales). Kernels:
  * eager, any number of rows: `torch._int_mm` (oneDNN int8 GEMM, int32 accumulation), which reads the
    int8 weight as it is: nothing is dequantized;
  * under torch.compile, one row: the product written as a sum over the input (`int8_row_product`)
    that inductor fuses into one loop reading the int8 weight and converting it in registers (as
    cpu_kernels.row_times_weight does for float weights); several rows: `_int_mm` as eagerly.
- int4: asymmetric groups of `group_size` consecutive inputs per row (32, 64, 128 or 256: the sizes the
  kernel takes), scale = (max - min) / 15, q = round((w - min) / scale) in [0, 15], w ~ q * scale + min.
  Asymmetric, because a group's weights are rarely centred on zero and 16 levels are too few to waste
  half of them. On CPU the product runs in `torch.ops.aten._weight_int4pack_mm_for_cpu` on the weights
  packed by `_convert_weight_to_int4pack_for_cpu` (that kernel's formula is (q - 8) * scale + zero, so
  zero = min + 8 * scale). The kernel needs the input size to be a multiple of the group size and the
  output size a multiple of 16: other shapes (PicoDAC's width 240) are zero-padded when packing, and
  the activations padded to match.
- int4 takes bf16 activations: the input is cast to bf16 for the product (the same rounding as bf16
  autocast inference). The packed kernel serves one row and several, eager and compiled (inductor
  calls it between its fused kernels): it reads the nibbles with AVX-512/AMX and was several times
  faster on one row than the sum over unpacked nibbles that inductor writes (docs/quantize.md), so
  compiled and eager int4 decoding compute the same numbers. On other devices the weights are
  dequantized for a plain matmul (correct, not fast: the low-bit kernels here are CPU kernels).
- What is saved is kernel-independent: int8 rows, or int4 values two per byte (low nibble first) with
  float32 scales and minimums; the packed int4 layout is rebuilt on load, since it depends on the CPU
  kernel's version.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INT4_GROUP_SIZES = (32, 64, 128, 256)
INT4_ROW_MULTIPLE = 16  # the int4 CPU kernel packs output rows in blocks of 16
KERNEL_DTYPE = torch.bfloat16


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


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(integers in [-127, 127] held in float32 (M, K), scales (M, 1)) of rows x (M, K), symmetric per row.

    Multiplying by 127 / max|x| (never above 127 in magnitude) needs no clamp; eager and compiled code
    compute it with the same two float operations, so they round every value alike.
    """
    peak = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)  # (M, 1)
    return torch.round(x.float() * (127.0 / peak)), peak / 127.0


def int8_row_product(xq: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One quantized row xq (1, K) times the int8 weight (N, K)ᵀ, summed in float32: (1, N).

    Exact while |sum| < 2²⁴ (127² K: K up to 1040), then within float32 rounding of the int32 sum.
    Only for torch.compile: inductor fuses the weight's conversion into its own loop over the int8
    weight (the float weight never exists). `as_strided` makes inductor store the quantized row once
    (its lowering realises its input) rather than recompute it for each of the N outputs.
    """
    xq = xq.as_strided(xq.shape, xq.stride())
    return (xq.unsqueeze(-2) * weight.float()).sum(-1)


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and one scale per output channel (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        layer.weight, layer.scale = quantize_int8(linear.weight)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        layer.to(linear.weight.device).prepare()
        return layer

    def prepare(self) -> None:
        """Nothing to rebuild: the kernels read the saved int8 rows and scales as they are.

        Kept so that loaders can call `prepare()` on every quantized layer after load_state_dict.
        """

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":  # the int8 kernels here are CPU kernels: correct, not fast
            y = F.linear(x, self.dequantized().to(x.dtype))
            return y if self.bias is None else y + self.bias.to(y.dtype)
        xq, x_scale = quantize_rows(x.reshape(-1, self.in_features))  # (M, K) integers, (M, 1)
        if torch.compiler.is_compiling() and xq.size(0) == 1:
            products = int8_row_product(xq, self.weight)  # (1, N), inductor's fused loop
        else:
            products = torch._int_mm(xq.to(torch.int8), self.weight.t()).float()  # (M, N), int32 sums
        y = products * x_scale * self.scale.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

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
