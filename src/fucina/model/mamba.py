"""Mamba (mixer "mamba"): the selective state-space layer of Gu & Dao, 2023, in plain PyTorch.

What and why: a recurrent layer whose state transition depends on the input ("selective"), so it can
choose what to remember, yet trains in parallel over the sequence. Generation keeps a fixed-size state
per layer (conv window + SSM state) instead of a cache that grows with every token, and costs the same
per token at any length.

The layer (Mamba-1, section 3.4 of the paper):
    x, z  = in_proj(h)                                (B, T, d_inner) each, d_inner = expand * d_model
    x     = SiLU(causal depthwise conv1d(x))          kernel d_conv = 4
    dt, B, C = x_proj(x)                              dt rank R, B and C of size N = d_state per step
    delta = softplus(dt_proj(dt))                     (B, T, d_inner), the input-dependent step size
    A     = -exp(A_log)                               (d_inner, N), S4D-real init A[:, n] = -(n + 1)
    h_t   = exp(delta_t A) * h_{t-1} + delta_t B_t x_t    (zero-order-hold A, Euler B, as the paper)
    y_t   = C_t . h_t + D * x_t
    out   = out_proj(y * SiLU(z))

Design choices:
- The scan is a custom autograd Function with chunked recomputation (`selective_scan`): the forward
  walks the sequence chunk by chunk (`mamba_chunk_size` steps), keeping only the state entering each
  chunk; the backward recomputes one chunk at a time and runs the adjoint recurrence
  lambda_t = dL/dh_t + exp(delta_{t+1} A) lambda_{t+1} backwards. Memory is O(B T (d_inner + N)) plus
  one chunk's (B, chunk, d_inner, N) temporaries, not the O(B T d_inner N) of an autograd-traced loop,
  and it is exact (no log-space division that can overflow when decays get strong).
- Inside a chunk the recurrence (and the backward's adjoint recurrence) runs either as a parallel
  Hillis-Steele scan, log2(chunk) whole-chunk steps (few kernel launches: what a GPU needs), or step by
  step (chunk steps). On a CPU the loop wins, since the parallel scan does log2(chunk) times the memory
  traffic (measured on 2 cores, batch 4 x 256 steps, d_inner 384, N 16, forward + backward: 0.8 s loop,
  2.2 s parallel); on a GPU the loop's per-step kernel launches dominate instead. `mamba_scan: auto` (default) picks the
  parallel scan on accelerators and the loop on the CPU; "parallel" / "sequential" force one. Both
  compute the same recurrence (tests check them against each other and against
  `selective_scan_reference`, the recurrence traced by autograd).
- The scan runs in float32 (autocast off inside), as Mamba does: the state accumulates over thousands
  of steps and bf16 rounding would drift.
- Generation: the cache holds, per layer, the last d_conv - 1 conv inputs and the SSM state (float32),
  (B, d_inner, d_conv - 1) + (B, d_inner, N) values, whatever the length. Prefill and decoding run the
  same code from the cached state, so cached generation equals the full forward.
- Left-padded rows (batched generation): padding tokens get a zero conv input and a zero step size
  (decay 1, input 0), so the state after the padding is exactly the empty state.
- No positions: the recurrence is ordered by itself; learned or RoPE settings only affect attention.
- in_proj, x_proj and out_proj come from make_linear (BitNet applies); dt_proj stays a dense layer
  with Mamba's init (bias = softplus^-1 of a step log-uniform in [0.001, 0.1]), as does the conv.
  Biases follow Mamba (none on in/x/out projections), whatever `config.bias` says.
- Not here: mamba_ssm's fused CUDA kernel (not installed in this project's environment, so it could not
  be tested); the plain scan runs on any device.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fucina.model.linear import make_linear

if TYPE_CHECKING:
    from fucina.model.config import ModelConfig
    from fucina.model.context import ForwardContext

DT_MIN, DT_MAX, DT_FLOOR = 0.001, 0.1, 1e-4


def _discretize(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decays exp(delta A) and inputs delta B u, each (B, L, d_inner, N)."""
    decay = torch.exp(delta.unsqueeze(-1) * A)
    inputs = (delta * u).unsqueeze(-1) * Bm.unsqueeze(2)
    return decay, inputs


def _run_states(
    decay: torch.Tensor, inputs: torch.Tensor, state: torch.Tensor, parallel: bool = False
) -> torch.Tensor:
    """h_t = decay_t h_{t-1} + inputs_t from h_{-1} = state; returns every h_t, (B, L, d_inner, N)."""
    if parallel:
        return _parallel_states(decay, inputs, state)
    states = torch.empty_like(inputs)
    for t in range(inputs.size(1)):
        state = torch.addcmul(inputs[:, t], decay[:, t], state)
        states[:, t] = state
    return states


def _parallel_states(decay: torch.Tensor, inputs: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """The same recurrence as a Hillis-Steele scan: log2(L) steps, each over the whole chunk.

    Step k composes every position with the one 2^k before it: (a, b) then (a', b') is
    (a a', a' b + b'). Only products of decays <= 1 appear, so nothing overflows (unlike log-space scans).
    """
    length = inputs.size(1)
    b = torch.cat((torch.addcmul(inputs[:, :1], decay[:, :1], state.unsqueeze(1)), inputs[:, 1:]), dim=1)
    a = decay
    offset = 1
    while offset < length:
        b = torch.cat((b[:, :offset], torch.addcmul(b[:, offset:], a[:, offset:], b[:, :-offset])), dim=1)
        if 2 * offset < length:
            a = torch.cat((a[:, :offset], a[:, offset:] * a[:, :-offset]), dim=1)
        offset *= 2
    return b


def _adjoints(decay: torch.Tensor, direct: torch.Tensor, carry: torch.Tensor, parallel: bool) -> torch.Tensor:
    """lambda_t = direct_t + decay_{t+1} lambda_{t+1}, with lambda_L's contribution `carry` already decayed.

    The backward recurrence of the scan, run as the forward one over the reversed chunk.
    """
    if not parallel:
        adjoint = torch.empty_like(direct)
        for t in reversed(range(direct.size(1))):
            carry = direct[:, t] + carry
            adjoint[:, t] = carry
            carry = decay[:, t] * carry  # dL/dh_{t-1} through h_t
        return adjoint
    shifted = torch.cat((decay[:, 1:], torch.ones_like(decay[:, :1])), dim=1)  # decay_{t+1}; 1 at the end
    return _parallel_states(shifted.flip(1), direct.flip(1), carry).flip(1)


class _SelectiveScan(torch.autograd.Function):
    """y_t = C_t . h_t over the recurrence above, with chunked recomputation in the backward pass."""

    @staticmethod
    def forward(ctx, u, delta, A, Bm, Cm, h0, chunk_size: int, parallel: bool = False):
        with torch.autocast(u.device.type, enabled=False):
            batch, length, inner = u.shape
            starts = list(range(0, length, chunk_size))
            entering = u.new_empty((batch, len(starts), inner, A.size(1)))  # state entering each chunk
            y = torch.empty_like(u)
            state = h0
            for index, start in enumerate(starts):
                chunk = slice(start, start + chunk_size)
                entering[:, index] = state
                decay, inputs = _discretize(u[:, chunk], delta[:, chunk], A, Bm[:, chunk])
                states = _run_states(decay, inputs, state, parallel)  # (B, L, d_inner, N)
                y[:, chunk] = torch.einsum("bldn,bln->bld", states, Cm[:, chunk])
                state = states[:, -1].clone()  # frees the chunk's states
        ctx.save_for_backward(u, delta, A, Bm, Cm, entering)
        ctx.chunk_size, ctx.parallel = chunk_size, parallel
        return y, state

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        u, delta, A, Bm, Cm, entering = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        with torch.autocast(u.device.type, enabled=False):
            grad_u, grad_delta = torch.zeros_like(u), torch.zeros_like(delta)
            grad_A, grad_B, grad_C = torch.zeros_like(A), torch.zeros_like(Bm), torch.zeros_like(Cm)
            grad_y = grad_y.contiguous()
            carry = torch.zeros_like(entering[:, 0]) if grad_last is None else grad_last.clone()
            for index in reversed(range(entering.size(1))):
                chunk = slice(index * chunk_size, (index + 1) * chunk_size)
                u_c, delta_c, B_c, C_c, gy = (
                    u[:, chunk],
                    delta[:, chunk],
                    Bm[:, chunk],
                    Cm[:, chunk],
                    grad_y[:, chunk],
                )
                decay, inputs = _discretize(u_c, delta_c, A, B_c)
                state0 = entering[:, index]
                states = _run_states(decay, inputs, state0, ctx.parallel)
                grad_C[:, chunk] = torch.einsum("bld,bldn->bln", gy, states)
                direct = gy.unsqueeze(-1) * C_c.unsqueeze(2)  # dL/dh_t through y_t, (B, L, d_inner, N)
                adjoint = _adjoints(decay, direct, carry, ctx.parallel)  # lambda_t = total dL/dh_t
                carry = decay[:, 0] * adjoint[:, 0]  # dL/dh entering this chunk
                previous = torch.cat((state0.unsqueeze(1), states[:, :-1]), dim=1)  # h_{t-1}
                grad_log_decay = adjoint * previous * decay  # dL/d(delta A)
                grad_A += torch.einsum("bldn,bld->dn", grad_log_decay, delta_c)
                through_B = torch.einsum("bldn,bln->bld", adjoint, B_c)  # dL/d(delta u)
                grad_delta[:, chunk] = (grad_log_decay * A).sum(-1) + through_B * u_c
                grad_u[:, chunk] = through_B * delta_c
                grad_B[:, chunk] = torch.einsum("bldn,bld->bln", adjoint, delta_c * u_c)
        return grad_u, grad_delta, grad_A, grad_B, grad_C, carry, None, None


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    h0: torch.Tensor | None = None,
    chunk_size: int = 64,
    parallel: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (B, T, d_inner), last state (B, d_inner, N)) of the selective recurrence, in float32 (or 64).

    u, delta: (B, T, d_inner); A: (d_inner, N); Bm, Cm: (B, T, N); h0: state before the first step.
    `parallel`: Hillis-Steele scan inside each chunk (True), step by step (False), or None: parallel on
    accelerators, step by step on the CPU (see the module docstring).
    """
    if parallel is None:
        parallel = u.device.type != "cpu"
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32  # never below float32
    u, delta, A, Bm, Cm = (t.to(dtype) for t in (u, delta, A, Bm, Cm))
    h0 = u.new_zeros((u.size(0), u.size(2), A.size(1))) if h0 is None else h0.to(dtype)
    return _SelectiveScan.apply(u, delta, A, Bm, Cm, h0, chunk_size, parallel)


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    h0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same recurrence written one step at a time and traced by autograd (for tests)."""
    h = u.new_zeros((u.size(0), u.size(2), A.size(1))) if h0 is None else h0
    ys = []
    for t in range(u.size(1)):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[:, :, None] * Bm[:, t, None, :]
        ys.append((h * Cm[:, t, None, :]).sum(-1))
    return torch.stack(ys, dim=1), h


class MambaState:
    """Generation state of one Mamba layer: last conv inputs (B, d_inner, d_conv - 1), SSM state (B, d_inner, N)."""

    def __init__(
        self,
        batch_size: int,
        inner: int,
        d_conv: int,
        d_state: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.conv = torch.zeros((batch_size, inner, d_conv - 1), device=device, dtype=dtype)
        self.ssm = torch.zeros((batch_size, inner, d_state), device=device, dtype=torch.float32)

    def copy_row(self, row: int, source: MambaState, length: int) -> None:
        """Row `row` takes row 0's state of `source` (a prompt prefilled alone); its length is moot."""
        self.conv[row] = source.conv[0]
        self.ssm[row] = source.ssm[0]


class Mamba(nn.Module):
    """The selective state-space mixer of one layer (registered as mixer "mamba")."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.inner, self.d_state = config.mamba_inner, config.mamba_d_state
        self.d_conv, self.dt_rank = config.mamba_d_conv, config.mamba_dt_size
        self.chunk_size = config.mamba_chunk_size
        self.parallel_scan = {"auto": None, "parallel": True, "sequential": False}[config.mamba_scan]
        self.in_proj = make_linear(config, config.d_model, 2 * self.inner, bias=False)
        self.conv = nn.Conv1d(self.inner, self.inner, self.d_conv, groups=self.inner, bias=True)
        self.x_proj = make_linear(config, self.inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.inner, self.d_state))
        self.A_log._no_weight_decay = True  # Mamba's convention: A and D are not decayed
        self.D = nn.Parameter(torch.empty(self.inner))
        self.out_proj = make_linear(config, self.inner, config.d_model, bias=False)
        self.out_proj.is_residual_output = True  # scaled at init (see transformer.py)
        self.resid_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.init_special_parameters()

    @torch.no_grad()
    def init_special_parameters(self) -> None:
        """Mamba's init: S4D-real A, D = 1, dt_proj weights ~ U(±R^-1/2), bias = softplus^-1(dt)."""
        device = self.A_log.device
        n = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=device)
        self.A_log.copy_(torch.log(n).expand(self.inner, -1))
        self.D.fill_(1.0)
        self.dt_proj.weight.uniform_(-(self.dt_rank**-0.5), self.dt_rank**-0.5)
        log_dt = torch.rand(self.inner, device=device) * (math.log(DT_MAX) - math.log(DT_MIN))
        dt = torch.exp(log_dt + math.log(DT_MIN)).clamp(min=DT_FLOOR)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(bias) = dt

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x.shape
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (B, T, d_inner) each
        state: MambaState | None = None if ctx.cache is None else ctx.cache.layers[self.layer_index]
        # Continue from the cached state; with per-row slots (a tensor start) every row does: a row that
        # starts afresh holds a zero state, which is what an empty history means.
        resume = state is not None and (isinstance(ctx.start, torch.Tensor) or ctx.start > 0)
        real = None
        if ctx.pad_lengths is not None:  # left padding must leave the state empty
            slots = torch.arange(ctx.start, ctx.start + T, device=x.device)
            real = (slots.unsqueeze(0) >= ctx.pad_lengths.unsqueeze(1)).unsqueeze(-1)  # (B, T, 1)
            u = u * real
        u = u.transpose(1, 2)  # (B, d_inner, T)
        if resume:
            history = state.conv.to(u.dtype)
        else:
            history = u.new_zeros((B, self.inner, self.d_conv - 1))
        window = torch.cat((history, u), dim=-1)  # (B, d_inner, d_conv - 1 + T)
        if state is not None and self.d_conv > 1:
            state.conv.copy_(window[..., -(self.d_conv - 1) :])
        u = F.silu(F.conv1d(window, self.conv.weight, self.conv.bias, groups=self.inner)).transpose(1, 2)
        dt, Bm, Cm = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt).float())  # (B, T, d_inner)
        if real is not None:
            delta = delta * real
        A = -torch.exp(self.A_log.float())  # (d_inner, N)
        y, last = selective_scan(
            u, delta, A, Bm, Cm, state.ssm if resume else None, self.chunk_size, self.parallel_scan
        )
        if state is not None:
            state.ssm.copy_(last)
        y = y + u.float() * self.D.float()
        y = y.to(z.dtype) * F.silu(z)
        return self.resid_dropout(self.out_proj(y))

    def new_layer_cache(
        self, batch_size: int, max_length: int, device: torch.device, dtype: torch.dtype
    ) -> MambaState:
        """This layer's part of a KVCache: a fixed-size state (max_length does not matter)."""
        return MambaState(batch_size, self.inner, self.d_conv, self.d_state, device, dtype)

    # Accounting hooks read by info.py ---------------------------------------------------------------
    @staticmethod
    def cache_bytes_per_token(config: ModelConfig, layer_index: int, dtype_bytes: int) -> int:
        """Nothing grows with the sequence: the state is fixed (see state_bytes)."""
        return 0

    @staticmethod
    def state_bytes(config: ModelConfig, layer_index: int, dtype_bytes: int) -> int:
        """Bytes of generation state per sequence: conv window (cache dtype) + SSM state (float32)."""
        inner = config.mamba_inner
        return inner * (config.mamba_d_conv - 1) * dtype_bytes + inner * config.mamba_d_state * 4

    @staticmethod
    def sequence_flops_per_token(config: ModelConfig, layer_index: int, context_length: int) -> int:
        """Work beyond the projections, per token: depthwise conv + scan (discretise, update, read out)."""
        inner = config.mamba_inner
        return 2 * config.mamba_d_conv * inner + 7 * inner * config.mamba_d_state

    @staticmethod
    def activation_elements_per_token(config: ModelConfig, layer_index: int) -> int:
        """Input, x and z, conv output and its SiLU, x_proj output, delta, y and the gated y.

        The chunked scan keeps no (d_inner x N) state per token, only one chunk's while it runs.
        """
        inner = config.mamba_inner
        return config.d_model + 6 * inner + config.mamba_dt_size + 2 * config.mamba_d_state
