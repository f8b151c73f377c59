"""LoRA adapters in PEFT's format, both ways, for fucina's Hugging Face export of the base.

PEFT (`peft.PeftModel.from_pretrained(hf_model, dir)`) reads `adapter_config.json` and
`adapter_model.safetensors`, whose keys are `base_model.model.<HF module>.lora_A.weight` / `.lora_B.weight`
with A (rank, in) and B (out, rank) and the update (lora_alpha / r) * B A (alpha / sqrt(r) with rsLoRA).

Design choices, and why:
- The HF module names and row blocks come from interop/hf_mapping.py's table of the class fucina's
  HF export writes (LlamaForCausalLM, MistralForCausalLM, MinistralForCausalLM, GPT2LMHeadModel, ...):
  the same table as the weights', so a name or a split fixed there is fixed here. The HF export applies
  no row permutation to q/k (fucina's RoPE already uses HF's rotate_half layout; only GGUF permutes), so
  the adapters' B rows are split exactly as the weights' rows are.
- fucina's adapter parts map to HF modules by their rows. A part inside one HF module (q of a fused
  qkv_proj on LLaMA's q_proj) is exported as is. Several parts inside one HF module (q, k and v on
  GPT-2's fused c_attn) become one adapter of rank r_q + r_k + r_v: A stacked, B block-diagonal (zeros
  outside each part's rows), which is the same update; its alpha keeps the scale (`rank_pattern`,
  `alpha_pattern`). A part covering several HF modules (a c_attn adapter imported from PEFT, exported
  for LLaMA) gives each module the shared A and its rows of B. Parts of one module with different
  scales have the ratio folded into B.
- GPT-2's projections are Conv1D ((in, out) weights): `fan_in_fan_out: true`, which PEFT applies to the
  base weight only (A and B keep their orientation). PEFT has one such flag per adapter, so a GPT-2
  adapter that also adapts the (nn.Linear) LM head is refused, as is an adapter on a tied LM head
  (PEFT would have to untie it: merge with `fucina lora merge` instead).
- Import accepts plain LoRA only (no DoRA, no LoRA biases, no modules_to_save, no embedding adapters)
  and safetensors only (no pickle): anything else is refused by name, never silently dropped.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from fucina.adapt.adapter_dir import base_dir_of, read_lora_config, save_adapter_dir
from fucina.adapt.lora import PartLayout, apply_layout, is_lora_model, load_adapter_state_dict, lora_layers
from fucina.adapt.lora_config import lora_scale
from fucina.errors import CheckpointError
from fucina.fsutil import atomic_path, staged_output, write_atomically, write_json_atomically
from fucina.interop.hf_export import hf_architecture
from fucina.interop.hf_mapping import TABLES
from fucina.interop.source import ExportError
from fucina.model.io import read_safetensors
from fucina.model_dir import TOKENIZER_FILES, load_model_dir, load_pretrained, resolve_model_dir

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
# fucina's part names for the row blocks of its fused layers, and for a whole layer
SPLIT_PARTS = {"qkv_proj": ("q", "k", "v"), "gate_up_proj": ("gate", "up")}
WHOLE_PARTS = {
    "qkv_proj": "qkv",
    "gate_up_proj": "gate_up",
    "out_proj": "o",
    "up_proj": "up",
    "down_proj": "down",
    "lm_head": "lm_head",
}
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA biases",
    "modules_to_save": "modules_to_save",
    "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable tokens",
}


@dataclass(frozen=True)
class HFModule:
    """One HF module holding rows [start, stop) of a fucina layer."""

    name: str
    layer: str
    start: int
    stop: int
    conv1d: bool  # GPT-2's Conv1D: fan_in_fan_out


@dataclass(frozen=True)
class PeftExport:
    """What export_peft wrote."""

    path: Path
    architecture: str
    modules: int
    parameters: int


@dataclass(frozen=True)
class PeftImport:
    """What import_peft wrote."""

    path: Path
    architecture: str
    modules: int
    parameters: int


def hf_modules(model: nn.Module, architecture: str) -> dict[str, list[HFModule]]:
    """fucina layer name -> the HF modules holding its rows, from hf_mapping's table of `architecture`."""
    config = model.config
    found: dict[str, list[HFModule]] = {}
    for row in TABLES[architecture].expand(config):
        if not row.ours.endswith(".weight") or not row.when(config) or row.pad_rows:
            continue
        layer = row.ours.removesuffix(".weight")
        try:
            module = model.get_submodule(layer)
        except AttributeError:
            continue
        out_features = getattr(module, "out_features", None)
        if out_features is None:
            continue  # an embedding or a norm
        sizes = row.sizes(config) if row.sizes is not None else [int(out_features)]
        start = 0
        for name, size in zip(row.theirs, sizes, strict=True):
            found.setdefault(layer, []).append(
                HFModule(name.removesuffix(".weight"), layer, start, start + size, row.transpose)
            )
            start += size
    return found


def _layer_suffix(name: str) -> str:
    """The module name after its layer index ("self_attn.q_proj"), or the name itself ("lm_head")."""
    match = re.match(r"^.*?\.\d+\.(.+)$", name)
    return match.group(1) if match else name


# --- export -----------------------------------------------------------------------------------------------


def peft_tensors(
    model: nn.Module, architecture: str
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, float]], bool]:
    """PEFT's tensors for the adapters of `model`, each HF module's (rank, scale), and fan_in_fan_out."""
    modules = hf_modules(model, architecture)
    tensors: dict[str, torch.Tensor] = {}
    settings: dict[str, tuple[int, float]] = {}
    conv1d: set[bool] = set()
    for layer_name, layer in lora_layers(model).items():
        if not layer.lora:
            continue  # a quantized layer wrapped for its gradient only (lora.py)
        if layer_name == "lm_head" and model.config.tie_embeddings:
            raise ExportError(
                "the adapter adapts the tied LM head, which PEFT cannot load without untying it: merge it "
                "with `fucina lora merge` and export the merged model"
            )
        if layer_name not in modules:
            raise ExportError(
                f"{layer_name} has no counterpart in {architecture}: its adapter cannot be exported"
            )
        parts = sorted(layer.lora.values(), key=lambda p: p.start)
        for hf in modules[layer_name]:
            inside = [p for p in parts if p.start < hf.stop and p.stop > hf.start]
            if not inside:
                continue
            scale = float(inside[0].scale)
            a = torch.cat([p.A.detach().float().cpu() for p in inside])  # (sum of ranks, in)
            b = torch.zeros(hf.stop - hf.start, a.shape[0])
            column = 0
            for p in inside:
                lo, hi = max(p.start, hf.start), min(p.stop, hf.stop)
                block = p.B.detach().float().cpu()[lo - p.start : hi - p.start]
                if p.scale != scale:
                    block = block * (p.scale / scale)
                b[lo - hf.start : hi - hf.start, column : column + p.rank] = block
                column += p.rank
            tensors[f"{KEY_PREFIX}{hf.name}.lora_A.weight"] = a.contiguous()
            tensors[f"{KEY_PREFIX}{hf.name}.lora_B.weight"] = b.contiguous()
            settings[hf.name] = (a.shape[0], scale)
            conv1d.add(hf.conv1d)
    if len(conv1d) > 1:
        raise ExportError(
            f"{architecture}: the adapter mixes Conv1D projections and the nn.Linear LM head, but PEFT's "
            "fan_in_fan_out is one setting per adapter; leave lm_head out of lora.targets"
        )
    return tensors, settings, conv1d == {True}


def _alpha(rank: int, scale: float, rslora: bool) -> float:
    return scale * (rank**0.5 if rslora else rank)


def peft_config(
    settings: dict[str, tuple[int, float]],
    all_modules: list[str],
    rslora: bool,
    fan_in_fan_out: bool,
    dropout: float,
    base: str | None,
) -> dict[str, Any]:
    """adapter_config.json: target modules by the shortest names that select exactly the adapted ones."""
    (rank, scale), _ = Counter(settings.values()).most_common(1)[0]
    targets: list[str] = []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    by_suffix: dict[str, list[str]] = {}
    for name in settings:
        by_suffix.setdefault(_layer_suffix(name), []).append(name)
    for suffix, names in sorted(by_suffix.items()):
        selected = [m for m in all_modules if m == suffix or m.endswith("." + suffix)]
        uniform = len({settings[n] for n in names}) == 1
        keys = [suffix] if set(selected) == set(names) and uniform else sorted(names)
        targets += keys
        for key in keys:
            r, s = settings[names[0] if key == suffix else key]
            if (r, s) != (rank, scale):
                rank_pattern[key] = r
                alpha_pattern[key] = _alpha(r, s, rslora)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": _alpha(rank, scale, rslora),
        "lora_dropout": dropout,
        "use_rslora": rslora,
        "target_modules": targets,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def export_peft(
    path: str | Path, out: str | Path, overwrite: bool = False, picodac_class: str = "imagegpt"
) -> PeftExport:
    """Write the LoRA model (directory or run) at `path` as a PEFT adapter directory `out`."""
    source = resolve_model_dir(path)
    model, tokenizer = load_pretrained(source)
    if not is_lora_model(model):
        raise ExportError(f"{source} holds no LoRA adapter; --format peft exports the adapter of a LoRA run")
    architecture = hf_architecture(model.config, picodac_class)
    tensors, settings, fan_in_fan_out = peft_tensors(model, architecture)
    _, marker = read_lora_config(source)
    all_modules = [m.name for mods in hf_modules(model, architecture).values() for m in mods]
    config = peft_config(
        settings,
        all_modules,
        bool(marker.get("rslora", False)),
        fan_in_fan_out,
        float(marker.get("dropout", 0.0)),
        str(base_dir_of(source)),
    )
    with staged_output(out, overwrite=overwrite, is_dir=True, protected=source) as tmp:
        with atomic_path(tmp / WEIGHTS_FILE) as weights:
            save_file(tensors, weights, metadata={"format": "pt"})
        write_json_atomically(tmp / CONFIG_FILE, config)
        tokenizer.save(tmp)
    parameters = sum(t.numel() for t in tensors.values())
    return PeftExport(Path(out), architecture, len(settings), parameters)


# --- import -----------------------------------------------------------------------------------------------


def _read_peft_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (a PEFT adapter directory holds {CONFIG_FILE})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: not a PEFT LoRA adapter (peft_type {config.get('peft_type')!r})")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise CheckpointError(f"{path}: {what} ({key}) is not supported; only plain LoRA adapters import")
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"{path}: bias {config['bias']!r} is not supported (LoRA without biases only)")
    return config


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matching the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _part_name(hf: HFModule, modules: list[HFModule]) -> str:
    leaf = hf.layer.rpartition(".")[2]
    if len(modules) > 1 and leaf in SPLIT_PARTS:
        return SPLIT_PARTS[leaf][modules.index(hf)]
    return WHOLE_PARTS.get(leaf, leaf)


def import_peft(
    peft_dir: str | Path,
    base: str | Path,
    out: str | Path,
    overwrite: bool = False,
    picodac_class: str = "imagegpt",
) -> PeftImport:
    """Turn the PEFT LoRA adapter `peft_dir` (trained on the HF export of `base`) into a LoRA model directory."""
    peft_dir, base_dir = Path(peft_dir), resolve_model_dir(base)
    config = _read_peft_config(peft_dir)
    if not (peft_dir / WEIGHTS_FILE).is_file():
        raise CheckpointError(
            f"{peft_dir / WEIGHTS_FILE}: missing (only safetensors adapters are read, never pickle)"
        )
    weights = read_safetensors(peft_dir / WEIGHTS_FILE, "a PEFT adapter")
    model = load_model_dir(base_dir)
    architecture = hf_architecture(model.config, picodac_class)
    by_name = {m.name: (m, mods) for mods in hf_modules(model, architecture).values() for m in mods}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = re.fullmatch(rf"{re.escape(KEY_PREFIX)}(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if match is None or match.group(1) not in by_name:
            raise CheckpointError(
                f"{peft_dir / WEIGHTS_FILE}: {key} is no LoRA weight of a {architecture} projection"
            )
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    rslora = bool(config.get("use_rslora", False))
    layout, state = [], {}
    for name, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{peft_dir / WEIGHTS_FILE}: {name} has lora_A or lora_B alone")
        hf, modules = by_name[name]
        rank = ab["A"].shape[0]
        if (
            ab["B"].shape != (hf.stop - hf.start, rank)
            or ab["A"].shape[1] != model.get_submodule(hf.layer).in_features
        ):
            raise CheckpointError(
                f"{peft_dir / WEIGHTS_FILE}: {name} has A {tuple(ab['A'].shape)} and B {tuple(ab['B'].shape)}, "
                f"which do not fit this base ({base_dir})"
            )
        alpha = float(_pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8)))
        expected_rank = int(_pattern_value(config.get("rank_pattern"), name, config.get("r", rank)))
        if expected_rank != rank:
            raise CheckpointError(f"{peft_dir}: {name} has rank {rank} but the config says {expected_rank}")
        part = _part_name(hf, modules)
        layout.append(PartLayout(hf.layer, part, hf.start, hf.stop, rank, lora_scale(rank, alpha, rslora)))
        state[f"{hf.layer}.lora.{part}.A"] = ab["A"].float()
        state[f"{hf.layer}.lora.{part}.B"] = ab["B"].float()
    if not layout:
        raise CheckpointError(f"{peft_dir / WEIGHTS_FILE}: no LoRA weights in it")
    apply_layout(model, layout, float(config.get("lora_dropout", 0.0)))
    load_adapter_state_dict(model, state, peft_dir / WEIGHTS_FILE)
    extra = {
        "imported_from": str(peft_dir.resolve()),
        "rslora": rslora,
        "dropout": float(config.get("lora_dropout", 0.0)),
    }
    with staged_output(out, overwrite=overwrite, is_dir=True, protected=base_dir) as tmp:
        save_adapter_dir(model, tmp, base_dir, extra=extra)
        for name in TOKENIZER_FILES:
            if (base_dir / name).is_file():
                write_atomically(tmp / name, (base_dir / name).read_bytes())
    parameters = sum(t.numel() for t in state.values())
    return PeftImport(Path(out), architecture, len(layout), parameters)
