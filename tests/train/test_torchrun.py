"""Several processes under torchrun (gloo on CPU): DDP and FSDP2 train what one process trains on the same
global batch, sharded (DCP) checkpoints resume at another world size, rank 0 alone writes, and a dead rank
ends the others with a message instead of a hang."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from train_helpers import merge, sft_config, tiny_config, write_config

STEPS = 20
# A small learning rate: Adam normalises each update, so the rounding of a gradient summed in another
# order moves the weights by about lr x (relative change); 3e-4 keeps 20 steps well inside 1e-5.
SETTINGS = {
    "optim": {"lr": 3.0e-4},
    "eval": {"every": 10, "max_batches": 2},
    "checkpoint": {"every": 10},
}


def _config(tmp_path: Path, name: str, batch_size: int, strategy: str = "none", **changes) -> Path:
    base = {
        **SETTINGS,
        "train": {"max_steps": STEPS, "batch_size": batch_size, "num_threads": 1, "seed": 7},
        "dist": {"strategy": strategy},
    }
    return write_config(tmp_path, tiny_config(None, **merge(base, changes)), f"{name}.yaml")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _fucina(config: Path, out: Path, *extra: str, processes: int = 1) -> subprocess.CompletedProcess:
    """`python -m fucina train` alone, or under torchrun with `processes` ranks."""
    launcher = [sys.executable, "-m", "fucina"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    str(processes), "-m", "fucina"]  # fmt: skip
    command = [*launcher, "train", str(config), "--out", str(out), *extra]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _max_difference(a: Path, b: Path) -> float:
    left, right = load_file(a / "final/model.safetensors"), load_file(b / "final/model.safetensors")
    assert left.keys() == right.keys()
    return max(float((left[k] - right[k]).abs().max()) for k in left)


def _train_records(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """One process, 8 rows per step."""
    root = tmp_path_factory.mktemp("single")
    _fucina(_config(root, "one", 8), root / "run")
    return root / "run"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_what_one_process_trains(tmp_path, single, strategy):
    run = tmp_path / "run"
    done = _fucina(_config(tmp_path, strategy, 4, strategy), run, processes=2)
    assert _max_difference(single, run) < 1e-5
    # Rank 0 alone logs and speaks: every step once in metrics.jsonl, one summary on stdout.
    steps = [r["step"] for r in _train_records(run)]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS
    assert done.stdout.count("trained 20/20 steps") == 1
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in single.iterdir())
    # The sharded checkpoint holds every rank's RNG and the DCP shards; best/ and final/ are full models.
    newest = sorted((run / "checkpoints").iterdir())[-1]
    assert {"dcp", "rng-rank-0.pt", "rng-rank-1.pt", "manifest.json"} <= {p.name for p in newest.iterdir()}
    assert (
        load_file(run / "final/model.safetensors").keys()
        == load_file(single / "final/model.safetensors").keys()
    )


def test_sft_with_uneven_masks_gives_the_single_process_loss(tmp_path, pretrained_run):
    """Conversations supervise different numbers of tokens per rank: the loss is normalised globally."""
    changes = {**SETTINGS, "train": {"max_steps": 6, "batch_size": 8, "num_threads": 1, "seed": 7}}
    one = write_config(tmp_path, sft_config(pretrained_run, **changes), "one.yaml")
    changes["train"] = {**changes["train"], "batch_size": 4}
    two = write_config(tmp_path, sft_config(pretrained_run, **changes, dist={"strategy": "ddp"}), "two.yaml")
    _fucina(one, tmp_path / "one")
    _fucina(two, tmp_path / "two", processes=2)
    alone, together = _train_records(tmp_path / "one"), _train_records(tmp_path / "two")
    assert [r["loss"] for r in together] == pytest.approx([r["loss"] for r in alone], rel=1e-5)
    assert _max_difference(tmp_path / "one", tmp_path / "two") < 1e-5


def test_a_mixture_of_experts_trains_under_ddp_as_in_one_process(tmp_path):
    """16 tokens per rank routed to 1 of 32 experts: most experts get no gradient on a rank, and DDP must
    neither fail nor wait for theirs. The load-balancing loss is per micro-batch, so one process
    accumulates the same one-row micro-batches."""
    moe = {"preset": "mixtral-tiny", "context_length": 16, "n_layers": 2, "d_model": 64, "n_heads": 4}
    moe.update(n_kv_heads=2, d_ff=32, moe_num_experts=32, moe_top_k=1)
    changes = {"model": moe, "eval": {"every": 3}, "checkpoint": {"every": 3}}
    one = _config(tmp_path, "one", 1, train={"max_steps": 6, "grad_accum": 2}, **changes)
    _fucina(one, tmp_path / "one")
    two = _config(tmp_path, "two", 1, "ddp", train={"max_steps": 6}, **changes)
    _fucina(two, tmp_path / "two", processes=2)
    assert _max_difference(tmp_path / "one", tmp_path / "two") < 1e-5


@pytest.mark.parametrize(("first", "then"), [(2, 1), (1, 2)])
def test_a_sharded_checkpoint_resumes_at_another_world_size(tmp_path, first, then):
    """Saved at `first` processes after 10 steps; resumed at `then` it ends where continuing at `first` ends."""
    # The global batch is 8 rows either way: 4 per rank at 2 ranks, 4 x 2 accumulated at 1.
    data = tiny_config(
        None,
        **SETTINGS,
        train={
            "max_steps": 10,
            "batch_size": 4,
            "grad_accum": 2 if first == 1 else 1,
            "num_threads": 1,
            "seed": 7,
        },
        dist={"strategy": "fsdp"},
    )
    config = write_config(tmp_path, data, "fsdp.yaml")
    _fucina(config, tmp_path / "start", processes=first)
    for name in ("moved", "stayed"):
        subprocess.run(["cp", "-r", str(tmp_path / "start"), str(tmp_path / name)], check=True)
    longer = ("--set", f"train.max_steps={STEPS}")
    _fucina(config, tmp_path / "moved", *longer, processes=then)
    _fucina(config, tmp_path / "stayed", *longer, processes=first)
    assert _max_difference(tmp_path / "moved", tmp_path / "stayed") < 1e-5
    assert _train_records(tmp_path / "moved")[-1]["step"] == STEPS


def test_launching_several_processes_without_a_strategy_is_refused(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fucina", "train", str(_config(tmp_path, "none", 4)), "--out", str(tmp_path / "run")]  # fmt: skip
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert "dist.strategy is none" in done.stderr


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_dead_rank_ends_the_others_with_a_message(tmp_path):
    """Two ranks started by hand (as torchrun would); rank 1 is killed mid-run; rank 0 must not hang."""
    config = _config(tmp_path, "ddp", 4, "ddp", eval={"every": 0}, checkpoint={"every": 5})
    port, run = _free_port(), tmp_path / "run"
    ranks = []
    for rank in (0, 1):
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        command = [sys.executable, "-m", "fucina", "train", str(config), "--out", str(run),
                   "--set", "train.max_steps=100000", "--set", "dist.timeout_s=30"]  # fmt: skip
        ranks.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints").is_dir() or not list((run / "checkpoints").glob("step-*")):
            assert time.monotonic() < deadline, "the run did not reach its first checkpoint"
            time.sleep(0.2)
        ranks[1].send_signal(signal.SIGKILL)
        _, stderr = ranks[0].communicate(timeout=60)  # a hang fails here
    finally:
        for process in ranks:
            process.kill()
    assert ranks[0].returncode != 0
    assert "another process of the run stopped" in stderr and "last checkpoint" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_distillation_under_two_processes_equals_one(tmp_path, pretrained_run, strategy):
    """A stage with a frozen second model: each rank holds its own copy of the teacher."""
    distill = {
        "stage": "distill",
        "distill": {"teacher": str(pretrained_run), "alpha": 0.5, "temperature": 2.0},
    }
    shared = {"tokenizer": {"path": str(pretrained_run)}, "train": {"max_steps": 6}, **distill}
    _fucina(_config(tmp_path, "one", 8, **shared), tmp_path / "one")
    _fucina(_config(tmp_path, strategy, 4, strategy, **shared), tmp_path / "two", processes=2)
    assert _max_difference(tmp_path / "one", tmp_path / "two") < 1e-5


def test_dpo_under_two_processes_equals_one(tmp_path, pretrained_run):
    """Preference pairs split over ranks: each rank scores its pairs against its own frozen reference."""
    from test_dpo import _dpo_config, _write_pairs

    prefs = tmp_path / "prefs.jsonl"
    _write_pairs(prefs, 32)
    runs = {}
    for name, batch, strategy, processes in (("one", 4, "none", 1), ("two", 2, "ddp", 2)):
        changes = {**SETTINGS, "train": {"max_steps": 6, "batch_size": batch, "num_threads": 1, "seed": 7}}
        data = _dpo_config(pretrained_run, prefs, dist={"strategy": strategy}, **changes)
        _fucina(write_config(tmp_path, data, f"{name}.yaml"), tmp_path / name, processes=processes)
        runs[name] = tmp_path / name
    assert _max_difference(runs["one"], runs["two"]) < 1e-5
