"""Mixture of experts feed-forward (ffn "moe"): a learned router sends each token to k of N expert MLPs.

What and why: a layer with N experts holds N times the feed-forward parameters, but each token runs
through only k of them, so capacity grows while the compute per token stays that of k MLPs (Shazeer et
al., 2017; GShard; Switch Transformer, Fedus et al., 2021; Mixtral, Jiang et al., 2024).

Design choices:
- Router: one bias-free linear d_model -> N, softmax in float32 (small logit differences decide routes).
- Top-k: k = 1 is Switch (the token's output is the expert's output times its router probability, so
  the router gets a gradient); k >= 2 is Mixtral (the k probabilities renormalised to sum to 1).
- Each expert is the config's own MLP (`mlp`: swiglu for Mixtral) of hidden size `moe_d_ff`, built with
  make_linear, so BitNet experts come for free. `moe_shared_experts` adds MLPs every token goes through
  (DeepSeekMoE), their outputs summed with the routed ones.
- Dispatch by gathering each expert's tokens (index_select, then index_add_ of the weighted outputs):
  no (tokens x experts x d) one-hot tensors, and only k expert MLPs of work per token.
- Dropless by default (every token gets its k experts, as Mixtral/MegaBlocks). With
  `moe_capacity_factor` c, expert e takes at most ceil(c * tokens * k / N) assignments, first choices
  before second choices, earlier tokens first (Switch/GShard); the rest are dropped and the token keeps
  only its residual (its other experts still count). Capacity applies in training only: in eval mode
  routing is dropless, so what a token gets never depends on how many tokens share its forward pass
  (cached generation then equals the full forward).
- Load balance (Switch, eq. 4): loss = N * sum_i f_i * P_i, f_i the share of the k * tokens assignments
  routed to expert i (before any drop), P_i the mean router probability of i. It is 1 for uniform
  routing and N when every token goes to one expert. `auxiliary_loss()` returns it times
  `moe_aux_loss_weight`, so the training loop just adds the model's `auxiliary_loss()` to the LM loss.
- Routing statistics for the training log, so users see collapse: `routing_statistics()` returns the
  last forward's assignments per expert as a `list[int]` of length N (a token counts once for each of
  its k experts, before any capacity drop, so the list sums to k * tokens; all zeros before any
  forward). The trainer collects it from every module with a callable `routing_statistics`;
  `routing_stats(model)` / `routing_metrics(model)` add the dropped count and flat per-layer numbers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from fucina.model.mlp import MLP

if TYPE_CHECKING:
    from fucina.model.config import ModelConfig


def load_balancing_loss(router_probs: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """Switch's N * sum_i f_i * P_i from probabilities (tokens, N) and chosen experts (tokens, k)."""
    num_experts = router_probs.size(-1)
    counts = torch.bincount(expert_ids.flatten(), minlength=num_experts)
    fraction = counts.to(router_probs.dtype) / expert_ids.numel()  # f_i, sums to 1
    mean_prob = router_probs.mean(dim=0)  # P_i, sums to 1
    return num_experts * (fraction * mean_prob).sum()


def capacity_positions(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """For assignments (tokens, k): each one's place in its expert's queue, first choices first.

    The queue order is Switch/GShard's priority: all first choices in token order, then all second
    choices, and so on; an assignment whose place is >= the capacity is dropped.
    """
    by_priority = expert_ids.t().reshape(-1)  # (k * tokens,) slot-major
    one_hot = torch.nn.functional.one_hot(by_priority, num_experts)  # (k * tokens, N)
    place = (one_hot.cumsum(dim=0) - 1).gather(1, by_priority.unsqueeze(1)).squeeze(1)
    return place.view(expert_ids.size(1), expert_ids.size(0)).t()  # (tokens, k)


@dataclass
class RoutingStats:
    """Where the last forward sent its tokens: assignments per expert, and how many were dropped."""

    tokens_per_expert: list[int]
    dropped: int


class MixtureOfExperts(nn.Module):
    """Routed expert MLPs of one layer (registered as ffn "moe"); see the module docstring."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_experts = config.moe_num_experts
        self.top_k = config.moe_top_k
        self.capacity_factor = config.moe_capacity_factor
        self.aux_loss_weight = config.moe_aux_loss_weight
        expert_config = dataclasses.replace(config, d_ff=config.expert_ff_size)
        self.router = nn.Linear(config.d_model, self.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(expert_config, layer_index) for _ in range(self.num_experts))
        self.shared_experts = nn.ModuleList(
            MLP(expert_config, layer_index) for _ in range(config.moe_shared_experts)
        )
        self._balance_loss: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None  # (N,) assignments per expert in the last forward
        self._dropped: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router probabilities (tokens, N) fp32, chosen experts (tokens, k), their weights (tokens, k))."""
        probs = torch.softmax(self.router(x).float(), dim=-1)  # (tokens, N)
        weights, expert_ids = probs.topk(self.top_k, dim=-1)  # (tokens, k) each
        if self.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, expert_ids, weights

    def capacity(self, num_tokens: int) -> int | None:
        """Most assignments one expert takes in a forward of `num_tokens` tokens (None: no limit)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (tokens, d_model)
        probs, expert_ids, weights = self.route(x)
        self._balance_loss = load_balancing_loss(probs, expert_ids)
        keep = torch.ones_like(expert_ids, dtype=torch.bool)
        capacity = self.capacity(x.size(0)) if self.training else None
        if capacity is not None:
            keep = capacity_positions(expert_ids, self.num_experts) < capacity
        self._counts = torch.bincount(expert_ids.flatten(), minlength=self.num_experts).detach()
        self._dropped = (~keep).sum().detach()

        out = torch.zeros_like(x)
        token_ids, slots = keep.nonzero(as_tuple=True)  # the kept assignments
        chosen = expert_ids[token_ids, slots]
        order = chosen.argsort(stable=True)  # grouped by expert
        token_ids, slots = token_ids[order], slots[order]
        ends = torch.bincount(chosen, minlength=self.num_experts).cumsum(0).tolist()  # one host sync
        start = 0
        for expert, end in zip(self.experts, ends):
            if end > start:
                tokens = token_ids[start:end]
                gate = weights[tokens, slots[start:end]].unsqueeze(1)  # (n, 1) fp32
                out.index_add_(0, tokens, (expert(x[tokens]) * gate).to(out.dtype))
            start = end
        for shared in self.shared_experts:
            out = out + shared(x)
        return out.view(shape)

    def auxiliary_loss(self) -> torch.Tensor:
        """The weighted load-balancing loss of the last forward (0 before any)."""
        if self._balance_loss is None:
            return self.router.weight.new_zeros((), dtype=torch.float32)
        return self.aux_loss_weight * self._balance_loss

    def balance_loss(self) -> torch.Tensor | None:
        """The unweighted Switch loss of the last forward (1 = perfectly balanced)."""
        return self._balance_loss

    def routing_statistics(self) -> list[int]:
        """Tokens routed to each expert in the last forward, a list of N ints summing to k * tokens.

        Counted before capacity drops (the router's choice, which is what collapse shows in); all zeros
        before any forward. One host sync: call it at logging steps, not every step.
        """
        if self._counts is None:
            return [0] * self.num_experts
        return [int(n) for n in self._counts.tolist()]

    def routing_stats(self) -> RoutingStats | None:
        """Assignments per expert and dropped assignments of the last forward (None before any)."""
        if self._counts is None:
            return None
        return RoutingStats(self._counts.tolist(), int(self._dropped))

    def active_parameters(self) -> int:
        """Parameters one token uses: router, shared experts and k routed experts."""
        expert = sum(p.numel() for p in self.experts[0].parameters())
        shared = sum(p.numel() for p in self.shared_experts.parameters())
        return self.router.weight.numel() + shared + self.top_k * expert

    @staticmethod
    def activation_elements_per_token(config: ModelConfig, layer_index: int) -> int:
        """Input, router probabilities, and what k routed plus the shared experts keep."""
        expert_config = dataclasses.replace(config, d_ff=config.expert_ff_size)
        per_expert = MLP.activation_elements_per_token(expert_config, layer_index)
        used = config.moe_top_k + config.moe_shared_experts
        return config.d_model + config.moe_num_experts + used * per_expert


def routing_stats(model: nn.Module) -> dict[int, RoutingStats]:
    """Layer index -> routing statistics of the last forward, for every MoE layer of `model`."""
    stats = {}
    for module in model.modules():
        if isinstance(module, MixtureOfExperts) and module.routing_stats() is not None:
            stats[module.layer_index] = module.routing_stats()
    return stats


def routing_metrics(model: nn.Module) -> dict[str, float]:
    """Flat numbers to log per MoE layer: the busiest expert's load over the mean, the dropped share."""
    metrics = {}
    for layer, stats in routing_stats(model).items():
        total = sum(stats.tokens_per_expert)
        mean = total / len(stats.tokens_per_expert)
        metrics[f"moe/{layer}/max_load"] = max(stats.tokens_per_expert) / mean if mean else 0.0
        metrics[f"moe/{layer}/dropped"] = stats.dropped / total if total else 0.0
    return metrics
