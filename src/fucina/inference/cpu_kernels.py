"""Dense projections that decode through oneDNN-packed copies of their weights on CPU.

Why: a decoding step at batch 1 multiplies one row by every weight matrix, so its speed is the speed at
which the matmul kernel streams weights from memory. On our 2-core CPU torch's default float32 kernel
(MKL) reads a row-major (out, in) weight at 11-17 GB/s; oneDNN reading its own blocked copy of the same
weight ("packed" once, with `mkldnn._reorder_linear_weight`) streams it several times faster (one
32000 x 384 matrix-vector product: 3.3 ms vs 0.6 ms), and llama-30m decodes 1.7-1.9x faster with the
same numbers up to float rounding (~1e-5).

- `DenseLinear` is nn.Linear (same parameters, state_dict, initialisation): only its forward differs,
  and only while `packed_decoding()` is active (generation enters it around each step).
- `pack_linears(model)` makes the packed copies before a generation, and remakes one whenever its weight
  changed since: another tensor (`model.to(...)` round trips, a replaced Parameter) or the same tensor
  modified in place (its version counter moves on optimizer steps and load_state_dict), so a model
  trained between two generations never decodes stale weights. The copies stay on the modules for the
  next generation (chat, server): one extra copy of the weights in memory; they are never saved,
  pickled or deep-copied.
- float32 weights on CPU are packed when oneDNN is available, bfloat16 ones when the CPU also has native
  bf16 dot products (AVX512-BF16/AMX; oneDNN then accumulates in float32): llama-30m's bf16 weight
  chain takes 1.9 ms per token packed against 4.2 ms through F.linear on our CPU. Anything else (other
  dtypes, other devices) keeps F.linear.
- Cost: the first packed product of a process takes ~1 s (oneDNN starting up; later shapes take
  milliseconds), so one short generation in a fresh process gets slower (llama-30m, 60 tokens: 0.5 s ->
  1.5 s) while every later one, a chat session or a server gets faster (0.53 -> 0.33 s).
- Under torch.compile (compiled decoding) a single row is not sent to oneDNN at all: `row_times_weight`
  writes the product as a sum that inductor compiles into its own loop over the plain weight, which
  costs no library call (~10 µs each for oneDNN at these sizes; picodac's 25 products chained: 668 ->
  173 µs, llama-30m's: 4.3 -> 3.1 ms). Several rows still use the packed copy, as an opaque custom op
  (inductor cannot lower oneDNN's packed layout) called between the fused kernels.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

_decoding = False  # True inside packed_decoding(): DenseLinear uses its packed copy when it has one


@contextmanager
def packed_decoding() -> Iterator[None]:
    """Within this block DenseLinear layers that `pack_linears` packed multiply by their packed copy."""
    global _decoding
    previous, _decoding = _decoding, True
    try:
        yield
    finally:
        _decoding = previous


def packing_available() -> bool:
    """Whether this torch build has oneDNN's packed linear (CPU builds normally do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@functools.cache
def packable_dtypes() -> tuple[torch.dtype, ...]:
    """Weight dtypes packed on this CPU: float32, and bfloat16 where the CPU computes it natively."""
    if not packing_available():
        return ()
    native_bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()
    return (torch.float32, torch.bfloat16) if native_bf16 else (torch.float32,)


@torch.library.custom_op("fucina::packed_linear", mutates_args=())
def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """x (..., in) times a weight packed by `pack_linears`, plus bias: (..., out_features)."""
    return _packed_product(x, packed, bias)


def _packed_product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@packed_linear.register_fake
def _packed_linear_shape(x, packed, bias, out_features):  # what torch.compile needs to trace the op
    return x.new_empty((*x.shape[:-1], out_features))


def row_times_weight(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One row x (..., in) times weight (out, in)ᵀ written as a sum over `in`, accumulated in float32.

    Only for torch.compile: inductor turns it into its own vectorised, parallel loop over the weight's
    rows (the product is never materialised), with no library call around it; eagerly it would build
    the whole (out, in) product.
    """
    y = (x.unsqueeze(-2).float() * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


class DenseLinear(nn.Linear):
    """nn.Linear that multiplies by its packed weight inside `packed_decoding()` (module docstring)."""

    packed: torch.Tensor | None = None  # oneDNN copy of `weight`, made by pack_linears
    packed_key: tuple | None = None  # (storage address, version) of the weight `packed` was made from

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _decoding and x.device.type == "cpu":
            compiling = torch.compiler.is_compiling()
            if compiling and x.numel() == x.size(-1):  # one row, compiled
                return row_times_weight(x, self.weight, self.bias)
            if self.packed is not None and x.dtype == self.packed.dtype:
                if compiling:  # an opaque op to inductor (eagerly a direct call: 1.5 µs less)
                    return packed_linear(x, self.packed, self.bias, self.out_features)
                return _packed_product(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)

    def repack(self) -> None:
        """Make (or drop) the packed copy so that it matches the current weight."""
        weight = self.weight
        if weight.dtype not in packable_dtypes() or weight.device.type != "cpu":
            self.packed = None
            return
        version = _version(weight)
        key = (weight.data_ptr(), version)
        if self.packed is None or version is None or key != self.packed_key:
            with torch.no_grad():
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
            self.packed_key = key

    def __getstate__(self) -> dict:  # pickle and deepcopy: the packed copy is a cache, never state
        state = dict(super().__getstate__())
        state.pop("packed", None)
        state.pop("packed_key", None)
        return state


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place modification counter; None for inference tensors, which have none."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def pack_linears(model: nn.Module) -> bool:
    """Pack (or refresh) every DenseLinear of `model`; False, packing nothing, when oneDNN is missing."""
    if not packing_available():
        return False
    for module in model.modules():
        if type(module) is DenseLinear:
            module.repack()
    return True
