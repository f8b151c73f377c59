"""Structured pruning: remove whole head groups, FFN channels and blocks, and save an ordinary model.

Design choices, and why:
- Structured, not sparse: what is removed leaves the matrices smaller, so the result is a plain fucina
  model directory (config.json says the new n_heads, n_kv_heads, d_ff, n_layers) that every command,
  the Hugging Face export (strict load) and the GGUF export read with no pruning-specific code, and that
  decodes faster with no sparse kernels.
- The same number of structures goes in every layer (the least important by prune_importance.py's
  scores, ranked per layer), so every block keeps one shape and the config stays one flat set of sizes.
  `layers` removes that many whole blocks, ranked by their importance across the model.
- Everything is ranked on the unpruned model and removed in one surgery (Minitron's one-shot
  estimate): scores of the removed blocks do not move the ranking of the kept ones.
- Counts are fractions rounded down; a fraction that removes nothing (e.g. 0.25 of 2 KV groups) is an
  error naming the smallest step, never a silent no-op. `ffn_multiple` rounds the kept channels down
  to a multiple (32 keeps int4 groups and GGUF q8_0 blocks whole).
- The kept heads keep their size: head_dim is written explicitly when heads go, since d_model / n_heads
  would no longer give it. GPT-2's Hugging Face and llama.cpp layouts cannot hold that, so head pruning of
  a GPT-2-style model is refused (its FFN and blocks can still be pruned); nothing removed means
  nothing changed (the same config and bit-identical weights).
- Only standard attention + MLP blocks with dense projections are pruned; MoE, latent attention, Mamba
  and BitNet layers are refused by name (their structures are not heads and channels of this kind).
- `prune_model_dir` also reports parameters and held-out bits per byte before and after, and records
  what was removed in `pruning.json` beside the model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fucina.compress.prune_importance import (
    METHODS,
    Importance,
    activation_importance,
    head_units,
    heads_per_unit,
    magnitude_importance,
)
from fucina.errors import CheckpointError, ConfigError
from fucina.fsutil import staged_output, write_atomically, write_json_atomically
from fucina.model.config import ModelConfig
from fucina.model.io import load_model, save_model
from fucina.model.transformer import Transformer
from fucina.model_dir import FULL_KIND, TOKENIZER_FILE, TOKENIZER_FILES, model_kind, resolve_model_dir
from fucina.tokenizer import FucinaTokenizer

log = logging.getLogger(__name__)

PRUNING_FILE = "pruning.json"


@dataclass(frozen=True)
class PruneSpec:
    """What to remove: fractions of head units and FFN channels per layer, a number of blocks."""

    heads: float = 0.0  # fraction of each layer's head units (KV groups) to remove
    ffn: float = 0.0  # fraction of each layer's FFN channels to remove
    layers: int = 0  # whole blocks to remove
    method: str = "activation"  # "activation" (needs calibration text) or "magnitude"
    ffn_multiple: int = 1  # kept channels rounded down to a multiple of this

    def __post_init__(self) -> None:
        for name in ("heads", "ffn"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"--{name} must be a fraction in [0, 1), got {value}")
        if self.layers < 0:
            raise ConfigError(f"--layers must be >= 0, got {self.layers}")
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.ffn_multiple < 1:
            raise ConfigError(f"--ffn-multiple must be >= 1, got {self.ffn_multiple}")


@dataclass
class PruneRecord:
    """What one pruning removed, in the unpruned model's indices; saved as pruning.json."""

    method: str
    spec: dict[str, Any]
    before: dict[str, int]  # the unpruned sizes
    after: dict[str, int]
    removed_layers: list[int]
    removed_head_units: list[list[int]] = field(default_factory=list)  # per kept layer
    removed_channels: list[list[int]] = field(default_factory=list)  # per kept layer
    layer_importance: list[float] = field(default_factory=list)
    head_importance: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_prunable(config: ModelConfig) -> None:
    """ConfigError unless every block is standard attention + MLP with dense projections."""
    from fucina.interop.architecture import unsupported_parts

    problems = unsupported_parts(config)
    if problems:
        raise ConfigError(
            f"fucina prune handles attention + MLP blocks with dense projections (GPT-2, LLaMA, Mistral, "
            f"PicoDAC layouts); this model has {'; '.join(problems)}"
        )


def removed_count(fraction: float, total: int, what: str, option: str) -> int:
    """How many of `total` structures `fraction` removes (rounded down); ConfigError when none."""
    count = math.floor(fraction * total + 1e-9)
    if fraction > 0 and count == 0:
        raise ConfigError(
            f"{option} {fraction} removes no {what}: each layer has {total}, the smallest step is {1 / total:.3g}"
        )
    return count


def _removed_head_units(spec: PruneSpec, config: ModelConfig) -> int:
    return removed_count(spec.heads, head_units(config), "head group", "--heads")


def _kept_channels(spec: PruneSpec, config: ModelConfig) -> int:
    ff = config.ff_size
    kept = ff - removed_count(spec.ffn, ff, "FFN channel", "--ffn")
    if kept < ff:
        kept -= kept % spec.ffn_multiple
    if kept < 1:
        raise ConfigError(
            f"--ffn {spec.ffn} with --ffn-multiple {spec.ffn_multiple} leaves no channel of {ff}"
        )
    return kept


def pruned_config(config: ModelConfig, spec: PruneSpec, kept_layers: Sequence[int]) -> ModelConfig:
    """The config of the pruned model (unchanged when nothing is removed); ConfigError when impossible."""
    check_prunable(config)
    if spec.layers >= config.n_layers:
        raise ConfigError(f"--layers {spec.layers} would remove every one of the {config.n_layers} blocks")
    units = head_units(config)
    kept_units = units - _removed_head_units(spec, config)
    changes: dict[str, Any] = {}
    if kept_units < units:
        n_heads = kept_units * heads_per_unit(config)
        changes |= dict(n_heads=n_heads, head_dim=config.head_size)
        if config.n_kv_heads is not None:
            changes["n_kv_heads"] = 1 if config.kv_heads == 1 else kept_units
    kept_channels = _kept_channels(spec, config)
    if kept_channels < config.ff_size:
        changes["d_ff"] = kept_channels
    if len(kept_layers) < config.n_layers:
        changes |= _layer_changes(config, kept_layers)
    pruned = dataclasses.replace(config, **changes)
    if kept_units < units:
        _check_heads_exportable(config, pruned)
    return pruned


def _layer_changes(config: ModelConfig, kept_layers: Sequence[int]) -> dict[str, Any]:
    changes: dict[str, Any] = {"n_layers": len(kept_layers), "layer_mixers": None, "layer_ffns": None}
    if config.sliding_window is not None and config.sliding_window_layers is not None:
        windowed = [new for new, old in enumerate(kept_layers) if old in config.sliding_window_layers]
        changes["sliding_window_layers"] = windowed or None
        if not windowed:  # no windowed layer is left: plain causal attention everywhere
            changes["sliding_window"] = None
    return changes


def _check_heads_exportable(config: ModelConfig, pruned: ModelConfig) -> None:
    """Head pruning must not lose an export the unpruned model had (GPT-2 ties head size to d_model)."""
    from fucina.interop.gguf import gguf_architecture
    from fucina.interop.hf_export import hf_architecture
    from fucina.interop.source import ExportError

    for check in (lambda c: hf_architecture(c, "remote-code"), gguf_architecture):
        try:
            check(config)
        except ExportError:
            continue
        try:
            check(pruned)
        except ExportError as err:
            raise ConfigError(
                f"--heads: the pruned model could no longer be exported ({err}); prune --ffn and "
                "--layers only"
            ) from None
    # transformers' configs (LlamaConfig, MistralConfig, ...) insist that hidden_size be a multiple of
    # the head count even when head_dim is given: keep that when the unpruned model had it.
    d_model = config.d_model
    if d_model % config.n_heads == 0 and d_model % pruned.n_heads:
        units, per_unit = head_units(config), heads_per_unit(config)
        fractions = [
            f"{removed / units:.3g}"
            for removed in range(1, units)
            if d_model % ((units - removed) * per_unit) == 0
        ]
        raise ConfigError(
            f"--heads leaves {pruned.n_heads} heads, and Hugging Face configs need d_model ({d_model}) to "
            f"be a multiple of the head count; "
            + (f"--heads fractions that keep it: {', '.join(fractions)}" if fractions else "prune no heads")
        )


def _lowest(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the `count` lowest scores, ascending; ties go to the earlier index."""
    if count == 0:
        return []
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
    return sorted(order[:count])


def _kept(total: int, removed: Sequence[int]) -> torch.Tensor:
    gone = set(removed)
    return torch.tensor([i for i in range(total) if i not in gone], dtype=torch.long)


@torch.no_grad()
def prune_model(
    model: Transformer, importance: Importance, spec: PruneSpec
) -> tuple[Transformer, PruneRecord]:
    """A new, smaller model without the least important structures of `model`, and what was removed."""
    config = model.config
    removed_layers = _lowest(importance.layers, spec.layers)
    kept_layers = [i for i in range(config.n_layers) if i not in set(removed_layers)]
    new_config = pruned_config(config, spec, kept_layers)
    units, rep, hd = head_units(config), heads_per_unit(config), config.head_size
    removed_units = _removed_head_units(spec, config)
    removed_channels = config.ff_size - new_config.ff_size
    state = {name: t.detach() for name, t in model.state_dict().items()}
    new_state = {name: t for name, t in state.items() if not name.startswith("blocks.")}
    record = PruneRecord(
        method=importance.method,
        spec=dataclasses.asdict(spec),
        before=_sizes(config),
        after=_sizes(new_config),
        removed_layers=removed_layers,
        layer_importance=[float(x) for x in importance.layers],
        head_importance=[[float(x) for x in row] for row in importance.heads],
    )
    for new_index, old_index in enumerate(kept_layers):
        gone_units = _lowest(importance.heads[old_index], removed_units)
        gone_channels = _lowest(importance.channels[old_index], removed_channels)
        record.removed_head_units.append(gone_units)
        record.removed_channels.append(gone_channels)
        heads = _kept(units, gone_units)
        if config.kv_heads == 1:  # MQA: units are query heads; the one kv head stays
            q_heads, kv_heads = heads, torch.zeros(1, dtype=torch.long)
        else:
            q_heads = (heads[:, None] * rep + torch.arange(rep)).flatten()
            kv_heads = heads
        channels = _kept(config.ff_size, gone_channels)
        old, new = f"blocks.{old_index}.", f"blocks.{new_index}."
        for name, tensor in state.items():
            if name.startswith(old):
                part = name.removeprefix(old)
                new_state[new + part] = _cut(part, tensor, config, q_heads, kv_heads, channels, hd)
    with torch.device(model.token_embedding.weight.device):
        pruned = Transformer(new_config)
    pruned.load_state_dict(new_state, strict=True)
    return pruned.to(model.token_embedding.weight.dtype).train(model.training), record


def _rows_of_heads(heads: torch.Tensor, head_dim: int, offset: int = 0) -> torch.Tensor:
    """Row indices of `heads` in a matrix whose rows are head after head, from row `offset`."""
    return (offset + heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _cut(
    part: str,
    tensor: torch.Tensor,
    config: ModelConfig,
    q_heads: torch.Tensor,
    kv_heads: torch.Tensor,
    channels: torch.Tensor,
    head_dim: int,
) -> torch.Tensor:
    """One block tensor with the removed heads' and channels' rows or columns left out."""
    H, KV, ff = config.n_heads, config.kv_heads, config.ff_size
    if part.startswith("mixer.qkv_proj."):  # rows q | k | v, head after head
        rows = torch.cat(
            (
                _rows_of_heads(q_heads, head_dim),
                _rows_of_heads(kv_heads, head_dim, H * head_dim),
                _rows_of_heads(kv_heads, head_dim, (H + KV) * head_dim),
            )
        )
        return _select(tensor, 0, rows, len(rows) == H * head_dim + 2 * KV * head_dim)
    if part == "mixer.out_proj.weight":  # columns: the heads' outputs
        columns = _rows_of_heads(q_heads, head_dim)
        return _select(tensor, 1, columns, len(columns) == H * head_dim)
    if part.startswith("ffn.gate_up_proj."):  # rows gate | up
        return _select(tensor, 0, torch.cat((channels, ff + channels)), len(channels) == ff)
    if part.startswith("ffn.up_proj."):
        return _select(tensor, 0, channels, len(channels) == ff)
    if part == "ffn.down_proj.weight":
        return _select(tensor, 1, channels, len(channels) == ff)
    return tensor  # norms, output biases: one value per model dimension, untouched


def _select(tensor: torch.Tensor, dim: int, index: torch.Tensor, everything: bool) -> torch.Tensor:
    """`tensor` itself when nothing goes (bit-identical), else the kept slices along `dim`."""
    return tensor if everything else tensor.index_select(dim, index.to(tensor.device)).contiguous()


def _sizes(config: ModelConfig) -> dict[str, int]:
    return {
        "n_layers": config.n_layers,
        "n_heads": config.n_heads,
        "n_kv_heads": config.kv_heads,
        "head_dim": config.head_size,
        "d_ff": config.ff_size,
    }


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters of `model`, a tied matrix counted once."""
    return sum(p.numel() for p in model.parameters())


# --- calibration text and the model-directory entry point ---------------------------------------------------


def calibration_batches(
    tokenizer: FucinaTokenizer,
    texts: Iterator[str] | Sequence[str],
    context_length: int,
    max_tokens: int,
    batch_size: int = 8,
) -> list[torch.Tensor]:
    """Token windows (B, context_length) of the documents, EOS-separated, up to `max_tokens` tokens."""
    if tokenizer.eos_id is None:
        raise ConfigError("the tokenizer has no EOS token to separate calibration documents")
    stream: list[int] = []
    for text in texts:
        stream += tokenizer.encode(text) + [tokenizer.eos_id]
        if len(stream) >= max_tokens:
            break
    stream = stream[:max_tokens]
    windows = len(stream) // context_length
    if windows == 0:
        raise ConfigError(
            f"the calibration text gives {len(stream)} tokens, fewer than one window of {context_length}"
        )
    ids = torch.tensor(stream[: windows * context_length], dtype=torch.long).view(windows, context_length)
    return list(ids.split(batch_size))


@dataclass
class PruneResult:
    """Where the pruned model went, what was removed, and its size and bits per byte before and after."""

    path: Path
    record: PruneRecord
    parameters_before: int
    parameters_after: int
    bits_per_byte: dict[str, dict[str, float]]  # held-out name -> {"before": ..., "after": ...}


def prune_model_dir(
    path: str | Path,
    out: str | Path,
    spec: PruneSpec,
    calibration: Sequence[str] | Iterator[str] | None = None,
    calibration_tokens: int = 32768,
    heldout: dict[str, Sequence[str]] | None = None,
    overwrite: bool = False,
) -> PruneResult:
    """Prune the model of a model or run directory into the model directory `out`.

    `calibration` is the text activation importance is measured on; `heldout` maps a name to the
    documents whose bits per byte are reported before and after.
    """
    from fucina.evaluate.intrinsic import evaluate_texts

    source_dir = resolve_model_dir(path)
    kind = model_kind(source_dir)
    if kind != FULL_KIND:  # quantized weights, a LoRA adapter on a base: not plain matrices to cut
        raise ConfigError(
            f"{source_dir} is a {kind} model directory; prune a full-precision model (merge an adapter "
            "first with fucina lora merge)"
        )
    if not (source_dir / TOKENIZER_FILE).is_file():
        raise CheckpointError(f"{source_dir} has no {TOKENIZER_FILE}: a pruned model directory needs it")
    if spec.method == "activation" and calibration is None:
        raise ConfigError("--method activation needs --calibration FILE (text to measure activations on)")
    model = load_model(source_dir)
    tokenizer = FucinaTokenizer.load(source_dir)
    pruned_config(model.config, spec, list(range(model.config.n_layers - spec.layers)))  # fail fast
    if spec.method == "activation":
        window = min(model.config.context_length, 256)
        batches = calibration_batches(tokenizer, calibration, window, calibration_tokens)
        log.info("activation importance on %d calibration tokens", sum(b.numel() for b in batches))
        importance = activation_importance(model, batches)
    else:
        importance = magnitude_importance(model)
    pruned, record = prune_model(model, importance, spec)
    scores: dict[str, dict[str, float]] = {}
    for name, texts in (heldout or {}).items():
        scores[name] = {
            when: evaluate_texts(m, tokenizer, texts, name=name, show_progress=False).bits_per_byte
            for when, m in (("before", model), ("after", pruned))
        }
    result = PruneResult(Path(out), record, parameter_count(model), parameter_count(pruned), scores)
    with staged_output(out, overwrite=overwrite, is_dir=True, protected=source_dir) as tmp:
        save_model(pruned, tmp)
        for name in TOKENIZER_FILES:
            if (source_dir / name).is_file():
                write_atomically(tmp / name, (source_dir / name).read_bytes())
        summary = {
            "source": str(source_dir),
            "parameters_before": result.parameters_before,
            "parameters_after": result.parameters_after,
            "bits_per_byte": scores,
            **record.to_dict(),
        }
        write_json_atomically(tmp / PRUNING_FILE, summary, ensure_ascii=True)
    return result


def read_pruning_record(directory: str | Path) -> dict[str, Any]:
    """The pruning.json of a pruned model directory (CheckpointError when absent or unreadable)."""
    path = Path(directory) / PRUNING_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: no readable pruning record ({err})") from None
