"""CPU decoding kernels, swapped into a per-model decoding copy of the model when decoding starts.

Why: a decoding step at batch 1 multiplies one row by every weight matrix, so its speed is the speed at
which the matmul kernel streams weights from memory. On our 2-core CPU torch's default float32 kernel
(MKL) reads a row-major (out, in) weight at 11-17 GB/s; oneDNN reading its own blocked copy of the same
weight ("packed" once, with `mkldnn._reorder_linear_weight`) streams it several times faster (one
32000 x 384 matrix-vector product: 3.3 ms vs 0.6 ms), and llama-30m decodes 1.7-1.9x faster with the
same numbers up to float rounding (~1e-5).

- The model itself stays plain (nn.Linear, SDPA). `decoding_view(model)` builds, once per model, a copy
  of its module tree that shares every parameter and buffer with it (and every module with nothing to
  swap), in eval mode, in which each plain nn.Linear is a `PackedLinear` and each attention layer's
  `attend` is `decode_attend`. Decoding runs the view; the
  model is never modified, so training it, running it plainly, or decoding another model in another
  thread at the same time is unaffected: no flag, no state outside the view.
- The view's packed copies are remade before each generation (`DecodingView.refresh`) whenever a weight
  changed since: another tensor (`model.to(...)` round trips, a replaced Parameter) or the same tensor
  modified in place (its version counter moves on optimizer steps and load_state_dict), so a model
  trained between two generations never decodes stale weights. The view stays for the next generation
  (chat, server): one extra copy of the weights in memory, never saved; a model whose module tree
  changed (adapters or quantized layers swapped in) gets a new view.
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
- Attention of one query per row (`decode_attend`): compiled on CPU it is written as sums over the head
  and key axes (`one_query_attention`) that inductor fuses into its own loops (no 20-40 µs library call
  per layer); eagerly in half precision it attends on float32 copies, because torch's CPU bf16 kernel is
  slow for a lone query (43 µs for one bf16 query over 144 keys, 6 heads, 2 kv, hd 64; 18 µs on float32
  copies, casts included). Everything else goes to the model's own `attend`.
"""

from __future__ import annotations

import copy
import functools
import math
import threading
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fucina.model.attention import attend


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
    """x (..., in) times a weight packed by `PackedLinear.repack`, plus bias: (..., out_features)."""
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
    the whole (out, in) product. `as_strided` makes inductor store the row once (its lowering realises
    its input): fused into the loop, the norm before it (a square root, and the residual sums before
    that) would be recomputed for every row of the weight.
    """
    x = x.as_strided(x.shape, x.stride())
    y = (x.unsqueeze(-2).float() * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


class PackedLinear(nn.Module):
    """Decoding stand-in for one nn.Linear: the same weight, multiplied through a packed copy on CPU."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        object.__setattr__(self, "linear", linear)  # not a submodule: the view never changes its mode
        self.training = False
        self.out_features = linear.out_features
        self.packed: torch.Tensor | None = None  # oneDNN copy of the weight, made by repack
        self.packed_key: tuple | None = None  # (storage address, version) of the weight it was made from

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._traced_forward(x)
        # Eager decoding calls this tens of times per token: the packed product comes first and
        # directly (a packed copy exists only for a CPU weight, so x is on the CPU too).
        packed = self.packed
        if packed is not None and x.dtype == packed.dtype and x.device.type == "cpu":
            return _packed_product(x, packed, self.linear.bias)
        return F.linear(x, self.linear.weight, self.linear.bias)

    def _traced_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Under torch.compile: one row as inductor's own loop, several rows as an opaque packed op."""
        weight, bias = self.linear.weight, self.linear.bias
        if x.device.type == "cpu":
            if x.numel() == x.size(-1):  # one row
                return row_times_weight(x, weight, bias)
            if self.packed is not None and x.dtype == self.packed.dtype:
                return packed_linear(x, self.packed, bias, self.out_features)
        return F.linear(x, weight, bias)

    def repack(self) -> None:
        """Make (or drop) the packed copy so that it matches the current weight."""
        weight = self.linear.weight
        if weight.dtype not in packable_dtypes() or weight.device.type != "cpu":
            self.packed = None
            return
        version = _version(weight)
        key = (weight.data_ptr(), version)
        if self.packed is None or version is None or key != self.packed_key:
            with torch.no_grad():
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
            self.packed_key = key


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place modification counter; None for inference tensors, which have none."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def one_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention of one query per row written as sums over the head and key axes, in float32.

    Only for torch.compile on CPU: inductor fuses it into a few loops of its own instead of a library
    call (the decoding step's attention). GQA: the query heads of one kv head share its keys, no copies.
    """
    B, H, _, hd = q.shape
    KV = k.size(1)
    q4 = q.float().view(B, KV, H // KV, 1, hd) * (1.0 / math.sqrt(hd))
    scores = (q4 * k.float().unsqueeze(2)).sum(-1)  # (B, KV, n_rep, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # (B or 1, 1, 1, S) broadcasts over heads
    probs = scores.softmax(dim=-1)
    out = (probs.unsqueeze(-1) * v.float().unsqueeze(2)).sum(-2)  # (B, KV, n_rep, hd)
    return out.view(B, H, 1, v.size(-1)).to(q.dtype)


def decode_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """`attention.attend` with the one-query CPU kernels of the module docstring; same contract."""
    if q.size(-2) == 1 and dropout_p == 0.0 and q.device.type == "cpu":
        if torch.compiler.is_compiling():
            return one_query_attention(q, k, v, mask)
        if q.dtype in (torch.bfloat16, torch.float16):
            return attend(q.float(), k.float(), v.float(), mask, is_causal).to(q.dtype)
    return attend(q, k, v, mask, is_causal, dropout_p)


def _decoding_copy(module: nn.Module) -> nn.Module:
    """`module` with the decoding kernels in: copies along the way to a swap, the rest shared as is.

    A copy is shallow (it shares the _parameters and _buffers dicts: no weight is copied) and in eval
    mode, as are copied dropouts; a module with nothing to swap below it (an embedding, a norm, a
    quantized layer with its own kernel state) is the model's own object, so it never goes stale.
    """
    if type(module) is nn.Linear:
        return PackedLinear(module)
    children = {
        name: None if child is None else _decoding_copy(child) for name, child in module._modules.items()
    }
    swaps_attend = hasattr(type(module), "attend")
    unchanged = all(new is old for new, old in zip(children.values(), module._modules.values()))
    if unchanged and not swaps_attend and not isinstance(module, nn.Dropout):
        return module
    clone = copy.copy(module)
    clone._modules = children
    clone.training = False
    if swaps_attend:
        clone.attend = decode_attend
    return clone


def _tree_of(model: nn.Module) -> tuple[int, ...]:
    """Identity of the model's module tree: replacing a submodule changes it."""
    return tuple(id(module) for module in model.modules())


class DecodingView:
    """The decoding copy of one model (module docstring), plus its compiled step once one is made."""

    def __init__(self, model: nn.Module):
        self.tree = _tree_of(model)
        self.module = _decoding_copy(model)
        self.compiled_forward: Callable | None = None

    def refresh(self) -> None:
        """Remake every packed copy whose weight changed since it was made."""
        if not packing_available():
            return
        for module in self.module.modules():
            if type(module) is PackedLinear:
                module.repack()


_views: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its DecodingView
_views_lock = threading.Lock()  # two threads starting to decode one model make one view


def decoding_view(model: nn.Module) -> DecodingView:
    """The model's DecodingView, made on first use or when its module tree changed, packed afresh."""
    with _views_lock:
        view = _views.get(model)
        if view is None or view.tree != _tree_of(model):
            view = _views[model] = DecodingView(model)
    view.refresh()
    return view
