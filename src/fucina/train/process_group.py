"""Training on several processes with PyTorch's own engine: torchrun, DDP, FSDP2.

Design choices:
- The process group starts from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
  gloo on CPU, `cuda:nccl,cpu:gloo` on CUDA (collectives on GPU tensors use NCCL, the CPU ones gloo), each
  rank pinned to `cuda:LOCAL_RANK`. A run with `dist.strategy` ddp or fsdp started without torchrun is a
  group of one, so its checkpoints are the same sharded kind and resume at any world size.
- Strategy `none` is today's single process; launching several processes with it is refused (each
  would train alone and they would overwrite each other's files).
- DDP wraps the model; FSDP2 (`fully_shard`) shards every block, then the root, with a
  MixedPrecisionPolicy (bf16 parameters for compute, fp32 gradient reduction) when training in bf16 on
  CUDA. Both average gradients over ranks; the loop scales its loss by the world size so a step's
  gradient is that of the token-mean loss over the GLOBAL batch, as one process would compute it.
- The timeout of the process group (`dist.timeout_s`) bounds every collective: a rank that dies makes
  the others fail with a message instead of waiting forever (torchrun also stops them at once).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from fucina.errors import ConfigError, FucinaError

log = logging.getLogger(__name__)

STRATEGIES = ("none", "ddp", "fsdp")
PEER_FAILURE_EXIT_CODE = 3
_PEER_FAILURE = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout")


class PeerFailureError(FucinaError):
    """Another process of the run stopped or stopped answering: this one ends instead of waiting."""


def peer_failure(err: BaseException, group: ProcessGroup, where: str) -> PeerFailureError | None:
    """A one-line error for a collective broken by a dead or silent peer; None for any other error."""
    if not group.distributed or not isinstance(err, RuntimeError):
        return None
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if not (isinstance(err, dist.DistError) or any(word in first.lower() for word in _PEER_FAILURE)):
        return None
    return PeerFailureError(
        f"rank {group.rank}: another process of the run stopped or stopped answering ({first[:200]}); "
        f"the last checkpoint in {where} is intact: resume with the same command"
    )


T = TypeVar("T")


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in the run: rank among world_size, and the strategy that joins them."""

    strategy: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """Whether a torch.distributed process group joins the ranks (strategy ddp or fsdp)."""
        return self.strategy != "none"

    @property
    def is_writer(self) -> bool:
        """Rank 0 alone writes logs, metrics, plots, the run's config and best/ and final/."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def finish(self) -> None:
        """The last collective of a run that ended well: a barrier whose handle lives until the process
        exits (see _LAST_WORK)."""
        if self.distributed:
            work = dist.barrier(async_op=True)
            work.wait()
            _LAST_WORK.append(work)

    def writer_first(self, work: Callable[[], T]) -> T:
        """Run `work` on rank 0, then on the other ranks (which then find what rank 0 wrote)."""
        if not self.distributed:
            return work()
        if self.is_writer:
            result = work()
            dist.barrier()
            return result
        dist.barrier()
        return work()

    def broadcast(self, value: T) -> T:
        """Rank 0's `value` on every rank (a small picklable object)."""
        if not self.distributed:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks (float64 on the CPU: exact for counts)."""
        if not self.distributed or self.world_size == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def max(self, value: int) -> int:
        if not self.distributed or self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())


SINGLE_PROCESS = ProcessGroup()


def exit_after_peer_failure(failure: PeerFailureError) -> NoReturn:
    """Print the one line and end the process at once.

    A process group whose peer died cannot be shut down cleanly: destroying it, or the interpreter's
    exit freeing gloo's pending work, can wait forever. The checkpoints are already on disk."""
    sys.stderr.write(f"fucina: error: {failure}\n")
    sys.stderr.flush()
    os._exit(PEER_FAILURE_EXIT_CODE)


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_process_group(strategy: str, device_name: str, timeout_s: float) -> tuple[ProcessGroup, str]:
    """Join (or, alone, create) the process group; returns it and the device name this rank uses."""
    world = launched_world_size()
    if strategy not in STRATEGIES:
        raise ConfigError(f"dist.strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy == "none":
        if world > 1:
            raise ConfigError(
                f"launched as {world} processes but dist.strategy is none: each would train alone; "
                "set --set dist.strategy=ddp (or fsdp)"
            )
        return SINGLE_PROCESS, device_name
    if not dist.is_available():
        raise ConfigError("dist.strategy needs torch.distributed, which this PyTorch build lacks")
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world == 1 and "MASTER_ADDR" not in os.environ:  # not under torchrun: a group of one
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
    cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if cuda:
        torch.cuda.set_device(local_rank)
        device_name = f"cuda:{local_rank}"
    elif device_name == "auto":
        device_name = "cpu"
    if not dist.is_initialized():
        backend = "cuda:nccl,cpu:gloo" if cuda else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    group = ProcessGroup(strategy, rank, world, local_rank)
    if group.is_writer:
        log.info("%s over %d process(es) (%s)", strategy, world, "nccl" if cuda else "gloo")
    return group, device_name


# Gloo's worker threads free a finished collective when they drop its last reference; if it holds
# tensors Python made, that takes the GIL, which the main thread holds while the group's destructor (run
# when DDP's reducer is freed) joins those threads: a deadlock at exit, in about one 2-rank DDP run of
# three here. The final barrier holds every collective still pending when it started; its handle, kept
# here for the life of the process, makes the main thread, never a worker, free them.
_LAST_WORK: list = []


def stop_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, group: ProcessGroup, device: torch.device, bf16: bool) -> nn.Module:
    """The module the training step calls: DDP around `model`, or `model` itself sharded by FSDP2."""
    if group.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # A mixture of experts may route no token of a rank's micro-batch to some expert: without unused-
        # parameter detection DDP then fails ("expected to have finished reduction") or waits forever for
        # that expert's gradient. Dense models skip the detection's graph walk.
        routed = any(callable(getattr(m, "routing_statistics", None)) for m in model.modules())
        # No buffers need syncing (RoPE tables are computed), and evaluation calls the bare module.
        return DistributedDataParallel(
            model, device_ids=ids, broadcast_buffers=False, find_unused_parameters=routed
        )
    if group.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy()
        if bf16 and device.type == "cuda":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    return model
