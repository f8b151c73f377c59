"""The next-token loss, computed from the final hidden states without keeping float32 logits.

Design choices:
- Labels follow the INTERFACES convention: already shifted (labels[b, t] follows input_ids[b, t]),
  IGNORE_INDEX where nothing is trained. The loss is the SUM of token losses in nats, float32, so the
  trainer can divide by the supervised-token count of a whole optimizer step.
- Why not `cross_entropy(lm_head(h).float(), labels)`: with a 32k vocabulary the logits are the largest
  tensors of a small model's step (8 x 256 tokens -> 65 M values). The plain path writes them, copies
  them to float32, writes a log-softmax of the same size, and walks them several more times in backward;
  measured on the 2-core CPU that was ~35% of a bf16 llama-30m step. `LinearCrossEntropy` makes the
  logits with one matmul in the compute dtype, then, a chunk of rows at a time (on a CPU float32 rows
  few enough to stay in cache), takes the log-sum-exp and turns those rows in place into the gradient of the loss
  (softmax - one-hot, zero on ignored rows). Backward is then two matmuls with that saved gradient.
- The softmax is taken in float32 (where low precision hurts); the gradient is stored in the compute
  dtype, like the gradient the plain path would feed to the LM-head matmul under autocast.
- Inside torch.compile the plain path is used: inductor fuses the cast, log-softmax and gather itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fucina.model.context import compute_dtype

IGNORE_INDEX = -100
# float32 values per chunk of rows: on a CPU what stays in cache (32 rows of a 32k vocabulary = 4 MB);
# on a GPU, where each chunk costs a few kernel launches, far more (a 32k vocabulary: 512 rows).
CHUNK_VALUES = {"cpu": 1 << 20}
DEFAULT_CHUNK_VALUES = 1 << 24


def chunk_rows(vocab_size: int, device: torch.device) -> int:
    """Rows of logits turned into loss and gradient at a time."""
    return max(1, CHUNK_VALUES.get(device.type, DEFAULT_CHUNK_VALUES) // vocab_size)


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (nats, float32) of logits (..., V) over non-ignored labels (...)."""
    return F.cross_entropy(
        logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def linear_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """cross_entropy_sum(hidden @ weight.T, labels) without materialising float32 logits.

    hidden: (..., d) final hidden states; weight: (V, d) the LM head; labels: (...) already shifted.
    """
    if torch.compiler.is_compiling():
        return cross_entropy_sum(F.linear(hidden, weight), labels)
    # Grad mode is read here: inside Function.forward it is always off, and evaluation needs no gradient.
    return LinearCrossEntropy.apply(hidden.flatten(0, -2), weight, labels.flatten(), torch.is_grad_enabled())


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (hidden @ weight.T); the gradient is formed during the forward pass."""

    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, grad_enabled: bool
    ) -> torch.Tensor:
        dtype = compute_dtype(hidden)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            logits = hidden @ weight.t()  # (N, V) in the compute dtype
        trained = labels != IGNORE_INDEX  # (N,)
        targets = labels.clamp(min=0)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        want_grad = grad_enabled and any(ctx.needs_input_grad[:2])
        step = chunk_rows(logits.shape[1], hidden.device)
        rows = torch.arange(step, device=hidden.device)
        for start in range(0, logits.shape[0], step):
            end = min(start + step, logits.shape[0])
            chunk = logits[start:end].float()  # (c, V)
            log_norm = torch.logsumexp(chunk, dim=-1)  # (c,)
            target_logits = chunk.gather(1, targets[start:end, None]).squeeze(1)
            keep = trained[start:end]
            total += ((log_norm - target_logits) * keep).sum()
            if want_grad:  # d loss / d logits = softmax - one_hot, zero where not trained
                chunk.sub_(log_norm[:, None]).exp_()
                chunk[rows[: end - start], targets[start:end]] -= 1.0
                chunk.mul_(keep[:, None])
                logits[start:end] = chunk
        if want_grad:
            ctx.save_for_backward(logits, hidden, weight)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_logits, hidden, weight = ctx.saved_tensors  # (N, V), (N, d), (V, d)
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad_logits @ weight).to(hidden_dtype) * grad_total
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_logits.t() @ hidden).to(weight_dtype) * grad_total
        return grad_hidden, grad_weight, None, None
