"""Offline distillation: the teacher's top-k log-probabilities, computed once and stored in shards.

Why and how:
- A large teacher need not sit in memory beside the student for the whole run: it runs once over every
  training and validation example, and the student then reads its targets from disk.
- Each example (a packed window, or a conversation) is stored under a key hashed from its token ids up
  to its last supervised position, so the cache does not depend on data order, padding, batch size or
  the number of processes; an example the cache lacks is a clear error, never a silent zero.
- Per position the cache holds the ids of the teacher's k most likely tokens, their log-probabilities at
  the run's temperature and the log of the remaining mass. The divergence is then computed between two
  distributions over k + 1 outcomes (the k tokens, and "any other token"), exact for those buckets; with
  k equal to the vocabulary it is the full divergence.
- `meta.json` records k, the temperature and the vocabulary; it is written last (the directory is
  staged and renamed), so a cache interrupted while being built is rebuilt, never half-read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from fucina.errors import ConfigError, DataError
from fucina.fsutil import staged_output
from fucina.train.objectives import IGNORE_INDEX, Batch, Model

log = logging.getLogger(__name__)

META_FILE = "meta.json"
SHARD_ROWS = 512  # examples per shard file
_LOG_FLOOR = -80.0  # log-probability standing in for an empty bucket (exp(-80) is negligible, never NaN)


def example_key(input_ids: torch.Tensor, labels: torch.Tensor) -> int:
    """A stable 63-bit key of one example: its ids up to the last supervised position."""
    supervised = (labels != IGNORE_INDEX).nonzero()
    end = int(supervised[-1]) + 1 if len(supervised) else 0
    digest = hashlib.blake2b(input_ids[:end].to(torch.int64).numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _split_batches(split) -> Iterator[Batch]:
    """Every example of a training or validation split once, in batches of the split's size."""
    if hasattr(split, "num_windows"):  # packed training windows
        for start in range(0, split.num_windows, split.batch_size):
            indices = list(range(start, min(start + split.batch_size, split.num_windows)))
            yield split.shards.batch(indices, split.context_length)
    elif hasattr(split, "dataset") and hasattr(split, "collate"):  # conversations
        dataset = split.dataset
        for start in range(0, len(dataset), split.batch_size):
            stop = min(start + split.batch_size, len(dataset))
            yield split.collate([dataset[i] for i in range(start, stop)], split.pad_id)
    else:  # validation splits
        for batch, _ in split.batches(None):
            yield batch


def _rest_logprob(top_logprobs: torch.Tensor, vocab: int) -> torch.Tensor:
    """log(1 - sum(exp(top))) along the last axis, floored so an empty bucket stays finite.

    When the k tokens are the whole vocabulary the bucket is empty by definition (not by rounding)."""
    if top_logprobs.shape[-1] >= vocab:
        return torch.full(top_logprobs.shape[:-1], _LOG_FLOOR, dtype=top_logprobs.dtype)
    covered = torch.logsumexp(top_logprobs, dim=-1).clamp(max=0.0)
    return torch.log(-torch.expm1(covered)).clamp(min=_LOG_FLOOR)


@torch.no_grad()
def build_teacher_topk(
    teacher: Model, splits: list, out: Path, top_k: int, temperature: float, device: torch.device
) -> None:
    """Run `teacher` once over every example of `splits` and store its top-k targets in `out`."""
    with staged_output(out, overwrite=True) as tmp:
        rows: dict[str, list[torch.Tensor]] = {"keys": [], "ids": [], "logprobs": [], "rest": []}
        seen: set[int] = set()
        shards = 0

        def flush() -> None:
            nonlocal shards
            if not rows["keys"]:
                return
            tensors = {name: torch.stack(values) for name, values in rows.items()}
            save_file(tensors, str(tmp / f"topk-{shards:05d}.safetensors"))
            shards += 1
            for values in rows.values():
                values.clear()

        vocab = None
        for split in splits:
            for batch in _split_batches(split):
                logits = teacher(batch["input_ids"].to(device)).float() / temperature
                vocab = logits.shape[-1]
                logprobs = F.log_softmax(logits, dim=-1)
                top = logprobs.topk(min(top_k, vocab), dim=-1)
                for row in range(batch["input_ids"].shape[0]):
                    key = example_key(batch["input_ids"][row], batch["labels"][row])
                    if key in seen:
                        continue
                    seen.add(key)
                    rows["keys"].append(torch.tensor(key, dtype=torch.int64))
                    rows["ids"].append(top.indices[row].to(torch.int32).cpu())
                    rows["logprobs"].append(top.values[row].cpu())
                    rows["rest"].append(_rest_logprob(top.values[row].cpu(), vocab))
                    if len(rows["keys"]) == SHARD_ROWS:
                        flush()
        flush()
        meta = {"top_k": top_k, "temperature": temperature, "vocab_size": vocab, "examples": len(seen)}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    log.info("teacher top-%d targets of %d examples stored in %s", top_k, len(seen), out)


class TeacherTopK:
    """The stored targets, read lazily by example key; stands where the teacher model would."""

    def __init__(self, directory: str | Path, temperature: float):
        self.directory = Path(directory)
        meta_path = self.directory / META_FILE
        if not meta_path.is_file():
            raise ConfigError(f"distill.teacher_topk: {self.directory} holds no finished top-k cache")
        self.meta = json.loads(meta_path.read_text())
        if abs(self.meta["temperature"] - temperature) > 1e-12:
            raise ConfigError(
                f"distill.temperature {temperature} differs from the {self.meta['temperature']} "
                f"the top-k cache {self.directory} was built at"
            )
        self._files = [safe_open(str(p), "pt") for p in sorted(self.directory.glob("topk-*.safetensors"))]
        self._where: dict[int, tuple[int, int]] = {}
        for number, handle in enumerate(self._files):
            for row, key in enumerate(handle.get_tensor("keys").tolist()):
                self._where[key] = (number, row)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def lookup(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids (B, T, k), log-probabilities (B, T, k), rest (B, T)) of a batch's examples."""
        input_ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
        width = input_ids.shape[1]
        picked: list[tuple[torch.Tensor, ...]] = []
        for row in range(input_ids.shape[0]):
            key = example_key(input_ids[row], labels[row])
            if key not in self._where:
                raise DataError(
                    f"an example is missing from the teacher top-k cache {self.directory} "
                    "(built for other data, tokenizer or context length?); delete it to rebuild"
                )
            number, index = self._where[key]
            handle = self._files[number]
            picked.append(
                tuple(_fit(handle.get_slice(name)[index], width) for name in ("ids", "logprobs", "rest"))
            )
        ids, logprobs, rest = (torch.stack(parts) for parts in zip(*picked, strict=True))
        return ids.long(), logprobs, rest


def _fit(values: torch.Tensor, width: int) -> torch.Tensor:
    """Cut or pad (with zeros, never read) the stored positions to the batch's width."""
    if values.shape[0] >= width:
        return values[:width]
    pad = torch.zeros((width - values.shape[0], *values.shape[1:]), dtype=values.dtype)
    return torch.cat([values, pad])


def bucket_logprobs(student_logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """The student's log-probabilities over the teacher's k tokens and the rest bucket, (N, k + 1)."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    top = student.gather(-1, ids)
    rest = _rest_logprob(top, student.shape[-1]).to(top.device)
    return torch.cat([top, rest.unsqueeze(-1)], dim=-1)


def stored_bucket_logprobs(logprobs: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """The teacher's stored targets as (N, k + 1) log-probabilities."""
    return torch.cat([logprobs.float(), rest.float().unsqueeze(-1)], dim=-1)
