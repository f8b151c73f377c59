"""Log-likelihood of continuations given a context, batched: the engine of multiple-choice scoring.

A *group* is one context with its continuations (a question with its choices); every continuation is
scored as the summed log-probability (nats) of its tokens given the context.

Design choices, and why:
- Tokenization as lm-evaluation-harness: trailing whitespace of the context moves to the continuation,
  then a continuation's tokens are those of `context + continuation` after the context's own tokens (so
  a merge across the seam is scored as the model would see it); if the context's tokens are not a prefix
  of the joint ones, the continuation is encoded alone.
- The context starts with EOS, the token every pretraining document follows, so the first word of the
  prompt is read as the start of a document.
- Too long for the model: the context is cut from the LEFT so that it fits beside the group's longest
  continuation, and every continuation is kept whole. All choices of a question therefore see the same
  context (lm-eval cuts per choice, so there a longer choice may see less context than a shorter one).
  Only a continuation longer than the model's context itself loses its first tokens, which are then not
  scored (after one token of context).
- Batches are filled to a token budget (`batch_tokens`, 8192 slots, padding included), rows sorted by
  length so padding stays small; bf16 autocast where the CPU/GPU has native bf16 (see `runtime`).
  Log-probabilities are taken only at the scored positions: gather the target logit, subtract an fp32
  logsumexp.
- Plain path (`share_context=False`, or a model without plain KV caches): each (context, continuation)
  row on its own, right-padded per batch.
- Shared context (the default for a fucina Transformer whose layers all keep plain key/value
  caches): each context runs once into a KV cache; its last position scores every choice's first token,
  then each question's k-th longest choice (k = 1, 2, ...) runs after its context from the same cache,
  rewound between steps (no copies). On ITALIC it runs 1.0 M padded token positions instead of the
  plain path's 1.78 M; timings on the shared 2-core machine were too noisy to rank the paths (see
  bench/eval_speed.py, which times both in one run). Both paths give the same numbers (tested).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fucina.errors import DataError
from fucina.evaluate.runtime import context_length_of, picked_logprobs, scoring_mode
from fucina.tokenizer import FucinaTokenizer

DEFAULT_BATCH_TOKENS = 8192  # token slots per forward (padding included)


@dataclass(frozen=True)
class ContinuationScore:
    """Summed log-probability (nats) of a continuation's scored tokens, and how its row was cut."""

    logprob: float
    tokens: int  # continuation tokens scored
    context_truncated: bool  # the context lost tokens on the left
    continuation_truncated: bool  # the continuation itself was longer than the model's context


@dataclass
class _EncodedGroup:
    context: list[int]  # already cut to fit
    continuations: list[list[int]]  # already cut to fit
    context_truncated: bool
    continuation_truncated: list[bool]


def _split_whitespace(context: str, continuation: str) -> tuple[str, str]:
    stripped = context.rstrip()
    return stripped, context[len(stripped) :] + continuation


def encode_requests(
    tokenizer: FucinaTokenizer, requests: Sequence[tuple[str, str]]
) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) of each (context, continuation) string pair, uncut."""
    start = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    split = [_split_whitespace(context, continuation) for context, continuation in requests]
    contexts = sorted({context for context, _ in split})
    context_ids = dict(zip(contexts, tokenizer.encode_batch(contexts), strict=True))
    joint_ids = tokenizer.encode_batch([context + continuation for context, continuation in split])
    encoded = []
    for (context, continuation), joint in zip(split, joint_ids, strict=True):
        if not continuation:
            raise DataError(f"empty continuation after the context {context[-60:]!r}")
        ids = context_ids[context]
        continuation_ids = joint[len(ids) :] if joint[: len(ids)] == ids else []
        encoded.append((start + ids, continuation_ids or tokenizer.encode(continuation)))
    return encoded


def _encode_groups(
    tokenizer: FucinaTokenizer, groups: Sequence[tuple[str, Sequence[str]]], context_length: int
) -> list[_EncodedGroup]:
    requests = [
        (context, continuation) for context, continuations in groups for continuation in continuations
    ]
    encoded = iter(encode_requests(tokenizer, requests))
    result = []
    for _, continuations in groups:
        pairs = [next(encoded) for _ in continuations]
        context = pairs[0][0]
        longest = max(len(ids) for _, ids in pairs)
        keep_context = max(1, context_length + 1 - longest)
        keep_continuation = context_length + 1 - keep_context
        result.append(
            _EncodedGroup(
                context[-keep_context:],
                [ids[-keep_continuation:] for _, ids in pairs],
                len(context) > keep_context,
                [len(ids) > keep_continuation for _, ids in pairs],
            )
        )
    return result


def _kv_cache_rewindable(model: nn.Module) -> bool:
    """Whether the model has a KV cache whose every layer is a plain (B, heads, slots, dim) key/value store."""
    if not callable(getattr(model, "new_cache", None)):
        return False
    from fucina.model.cache import LayerKV

    try:
        cache = model.new_cache(1, max_length=1)
    except (TypeError, ValueError):
        return False
    return all(
        isinstance(layer, LayerKV)
        and isinstance(getattr(layer, "keys", None), torch.Tensor)
        and isinstance(getattr(layer, "values", None), torch.Tensor)
        and layer.keys.dim() == 4
        for layer in getattr(cache, "layers", [None])
    )


def token_batches(lengths: Sequence[int], batch_tokens: int, batch_size: int | None) -> list[range]:
    """Consecutive runs of items, each padded to its longest item, within a token budget.

    A run grows while (items x longest item) stays within `batch_tokens` and, when given, items within
    `batch_size`; an item longer than the budget is a run of its own. Sort the items longest first for
    the least padding.
    """
    runs, start, longest = [], 0, 0
    for end, length in enumerate(lengths):
        widest = max(longest, length)
        full = batch_size is not None and end - start >= batch_size
        if end > start and (full or (end - start + 1) * widest > batch_tokens):
            runs.append(range(start, end))
            start, widest = end, length
        longest = widest
    if start < len(lengths):
        runs.append(range(start, len(lengths)))
    return runs


def _padded(rows: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> torch.Tensor:
    """(len(rows), longest) LongTensor of the rows, right-padded (or left-padded) with pad_id."""
    width = max(len(row) for row in rows)
    tokens = np.full((len(rows), width), pad_id, dtype=np.int64)
    for r, row in enumerate(rows):
        if left:
            tokens[r, width - len(row) :] = row
        else:
            tokens[r, : len(row)] = row
    return torch.from_numpy(tokens)


def _score_plain(model, groups, batch_tokens, batch_size, pad_id, device, progress) -> list[list[float]]:
    """Each (context, continuation) row on its own; rows sorted by length, right-padded per batch."""
    rows, starts, owners = [], [], []
    for g, group in enumerate(groups):
        for c, continuation in enumerate(group.continuations):
            rows.append(group.context + continuation)
            starts.append(len(group.context) - 1)  # the first input position whose target is scored
            owners.append((g, c))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]), reverse=True)
    scores = [[0.0] * len(group.continuations) for group in groups]
    for run in token_batches([len(rows[i]) - 1 for i in order], batch_tokens, batch_size):
        batch = [order[k] for k in run]
        tokens = _padded([rows[i] for i in batch], pad_id).to(device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        lengths = torch.as_tensor([len(rows[i]) - 1 for i in batch], device=device)
        first = torch.as_tensor([starts[i] for i in batch], device=device)
        positions = torch.arange(inputs.shape[1], device=device)
        mask = (positions >= first[:, None]) & (positions < lengths[:, None])  # (B, T) scored targets
        picked = picked_logprobs(model(inputs)[mask], targets[mask])  # (M,) row after row
        row_of = torch.arange(len(batch), device=device)[:, None].expand_as(mask)[mask]
        sums = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, row_of, picked)
        for i, value in zip(batch, sums.tolist(), strict=True):
            g, c = owners[i]
            scores[g][c] = value
        progress.update(len(batch))
    return scores


def _score_shared(model, groups, batch_tokens, batch_size, pad_id, device, progress) -> list[list[float]]:
    """Each context once into a KV cache, then its choices continue from that cache, one after another.

    Contexts are batched by length (little left padding) within the token budget (context slots plus
    room for the longest continuation). The last context position scores every choice's first token.
    Then, for k = 1, 2, ..., each question's k-th longest choice is fed after the context in one forward
    (right-padded to the longest), and the cache is rewound to the end of the contexts before the next
    k: no cache copies, the context keys and values are reused in place.
    """
    # Questions whose choices have similar lengths share batches: little padding at each step k.
    order = sorted(
        range(len(groups)),
        key=lambda g: sorted(map(len, groups[g].continuations), reverse=True),
        reverse=True,
    )
    scores = [[0.0] * len(group.continuations) for group in groups]
    # The LM head is needed only at the last context position (the fucina Transformer can skip the rest).
    last_only = {"last_only": True} if "last_only" in inspect.signature(model.forward).parameters else {}
    # Under autocast the keys and values are computed in bf16: a bf16 cache stores them without casts.
    autocast = torch.is_autocast_enabled(device.type)
    cache_dtype = {"dtype": torch.get_autocast_dtype(device.type)} if autocast else {}
    slots = [len(groups[g].context) + max(map(len, groups[g].continuations)) - 1 for g in order]
    for run in token_batches(slots, batch_tokens, batch_size):
        owners = [order[k] for k in run]
        batch = [groups[g] for g in owners]
        contexts = _padded([group.context for group in batch], pad_id, left=True).to(device)
        width = contexts.shape[1]
        extra = max(len(ids) for group in batch for ids in group.continuations) - 1
        pads = [width - len(group.context) for group in batch]
        cache = model.new_cache(len(batch), max_length=width + max(extra, 1), pad_lengths=pads, **cache_dtype)
        last = model(contexts, cache=cache, **last_only)[:, -1]  # (B, V)
        pairs = [(r, c) for r, group in enumerate(batch) for c in range(len(group.continuations))]
        pair_rows = torch.as_tensor([r for r, _ in pairs], device=device)
        first_tokens = torch.as_tensor([batch[r].continuations[c][0] for r, c in pairs], device=device)
        firsts = picked_logprobs(last.index_select(0, pair_rows), first_tokens).tolist()
        for (r, c), value in zip(pairs, firsts, strict=True):
            scores[owners[r]][c] = value
        # ranked[r]: the choices of row r that need more than their first token, longest first
        ranked = [
            sorted(
                (c for c, ids in enumerate(group.continuations) if len(ids) > 1),
                key=lambda c, g=group: -len(g.continuations[c]),
            )
            for group in batch
        ]
        for k in range(max(map(len, ranked))):
            step = [(r, choices[k]) for r, choices in enumerate(ranked) if len(choices) > k]
            inputs = [[pad_id] for _ in batch]
            for r, c in step:
                inputs[r] = batch[r].continuations[c]
            tokens = _padded(inputs, pad_id).to(device)
            if tokens.shape[1] < 2:
                continue
            sizes = torch.as_tensor([len(ids) - 1 for ids in inputs], device=device)
            mask = torch.arange(tokens.shape[1] - 1, device=device) < sizes[:, None]  # (B, T-1)
            cache.length = width  # rewind to the end of the contexts
            logits = model(tokens[:, :-1], cache=cache)
            picked = picked_logprobs(logits[mask], tokens[:, 1:][mask])
            row_of = torch.arange(len(batch), device=device)[:, None].expand_as(mask)[mask]
            sums = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, row_of, picked)
            sums = sums.tolist()
            for r, c in step:
                scores[owners[r]][c] += sums[r]
        progress.update(len(batch))
    return scores


def score_groups(
    model: nn.Module,
    tokenizer: FucinaTokenizer,
    groups: Sequence[tuple[str, Sequence[str]]],
    *,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    batch_size: int | None = None,
    bf16: bool | None = None,
    share_context: bool | None = None,
    show_progress: bool = True,
    desc: str = "loglikelihood",
) -> list[list[ContinuationScore]]:
    """Score each group's continuations given its context (see the module doc); results in input order.

    Batches hold up to `batch_tokens` token slots (padding included) and, when `batch_size` is given, at
    most that many rows: (context, continuation) rows, or questions when sharing contexts.
    `share_context`: None/True = the shared-context path when the model allows it; False = plain.
    `bf16`: None = bf16 autocast where the device has native bf16 (see `runtime`), True/False forces it.
    """
    if batch_tokens < 1 or (batch_size is not None and batch_size < 1):
        raise ValueError(f"batch_tokens and batch_size must be at least 1, got {batch_tokens}, {batch_size}")
    encoded = _encode_groups(tokenizer, groups, context_length_of(model))
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    shared = share_context is not False and _kv_cache_rewindable(model)
    # Progress counts questions on the shared path, (question, choice) rows on the plain one.
    total = len(encoded) if shared else sum(len(group.continuations) for group in encoded)
    with (
        scoring_mode(model, bf16) as device,
        tqdm(total=total, desc=desc, unit="q" if shared else "row", disable=not show_progress) as progress,
    ):
        score = _score_shared if shared else _score_plain
        logprobs = score(model, encoded, batch_tokens, batch_size, pad_id, device, progress)
    return [
        [
            ContinuationScore(value, len(ids), group.context_truncated, cut)
            for value, ids, cut in zip(values, group.continuations, group.continuation_truncated, strict=True)
        ]
        for values, group in zip(logprobs, encoded, strict=True)
    ]


def score_requests(
    model: nn.Module, tokenizer: FucinaTokenizer, requests: Sequence[tuple[str, str]], **options
) -> list[ContinuationScore]:
    """Log-likelihood of each (context, continuation) pair on its own (options as `score_groups`)."""
    groups = [(context, [continuation]) for context, continuation in requests]
    return [scores[0] for scores in score_groups(model, tokenizer, groups, **options)]
