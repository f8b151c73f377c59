"""`fucina model` commands: describe a model shape (parameters, FLOPs, cache, memory), list presets,
import a Hugging Face checkpoint, export a BitNet model's packed ternary weights."""

from __future__ import annotations

import argparse
from pathlib import Path

from fucina.errors import CheckpointError
from fucina.model.config import ModelConfig


def register(subparsers) -> None:
    model = subparsers.add_parser(
        "model", help="inspect model shapes", description="Inspect model shapes and presets."
    )
    commands = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)

    info = commands.add_parser(
        "info",
        help="parameters, FLOPs per token, KV cache and memory of a preset or saved model",
        description=(
            "Print total and per-component parameters, FLOPs per token, KV-cache bytes per token and the "
            "memory needed to train (AdamW) and to run a preset or a saved model."
        ),
    )
    info.add_argument("model", help="a preset name (see `fucina model presets`), or a model/run directory")
    info.add_argument("--batch-size", type=int, default=8, help="batch size for the training-memory estimate")
    info.add_argument("--context", type=int, default=None, help="sequence length (default: the model's)")
    info.set_defaults(func=_info)

    presets = commands.add_parser("presets", help="list the model presets with their sizes")
    presets.set_defaults(func=_presets)

    import_hf = commands.add_parser(
        "import-hf",
        help="turn a local Hugging Face GPT-2 / LLaMA / Mistral checkpoint into a fucina model directory",
        description=(
            "Read a checkpoint saved with save_pretrained (config.json + safetensors or pytorch_model.bin) "
            "from a local directory and write a fucina model directory computing the same logits. A "
            "byte-level BPE tokenizer.json is imported too, with the chat template's special tokens added."
        ),
    )
    import_hf.add_argument("hf_dir", help="directory of the Hugging Face checkpoint (nothing is downloaded)")
    import_hf.add_argument("--out", required=True, help="fucina model directory to write")
    import_hf.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer.json (or its directory) to import instead of HF_DIR's own",
    )
    import_hf.add_argument(
        "--template", default="chatml", help="chat template to attach to the tokenizer (default chatml)"
    )
    import_hf.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of the saved weights"
    )
    import_hf.set_defaults(func=_import_hf)

    ternary = commands.add_parser(
        "export-ternary",
        help="write a BitNet (linear: bitnet) model's projections packed at 2 bits per weight",
        description=(
            "Pack every BitLinear weight of a BitNet b1.58 model into 2-bit ternary codes plus one scale "
            "per matrix (one safetensors file, see fucina/compress/ternary.py) and print the file size next "
            "to the bf16 size of the same model. Same as `fucina export --format ternary`."
        ),
    )
    ternary.add_argument("model", help="run directory (uses best/) or model directory of a BitNet model")
    ternary.add_argument("--out", required=True, help="the .safetensors file to write")
    ternary.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="dtype of the tensors that are not ternary (embeddings, head, norms; default bfloat16)",
    )
    ternary.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ternary.set_defaults(func=_export_ternary)


def _config_for(name_or_path: str) -> tuple[str, ModelConfig]:
    """A preset by name, or the config.json of a model directory (or a run's best/ or final/)."""
    from fucina.model.io import load_config
    from fucina.model_dir import BEST_DIR, CONFIG_FILE, FINAL_DIR
    from fucina.presets import get_preset

    path = Path(name_or_path)
    if not path.exists():
        if len(path.parts) > 1:
            raise CheckpointError(f"model directory not found: {path}")
        return name_or_path, get_preset(name_or_path)
    for candidate in (path, path / BEST_DIR, path / FINAL_DIR):
        if (candidate / CONFIG_FILE).is_file():
            return str(candidate), load_config(candidate)
    raise CheckpointError(f"{path} holds no {CONFIG_FILE} (nor does its best/ or final/ subdirectory)")


def _info(args: argparse.Namespace) -> None:
    from fucina.model.info import describe

    name, config = _config_for(args.model)
    print(describe(config, name, batch_size=args.batch_size, context_length=args.context))


def _presets(args: argparse.Namespace) -> None:
    from fucina.model.info import count_parameters
    from fucina.presets import ALL_PRESETS

    for name, config in ALL_PRESETS.items():
        counts = count_parameters(config)
        mixers = sorted({config.mixer_name(i) for i in range(config.n_layers)})
        ffns = sorted({config.ffn_name(i) for i in range(config.n_layers)})
        parts = [
            part for part in (*mixers, *ffns, config.linear) if part not in ("attention", "mlp", "dense")
        ]
        print(
            f"{name:14s} {counts.total / 1e6:8.2f}M  {config.n_layers:2d} layers, d {config.d_model}, "
            f"{config.n_heads} heads/{config.kv_heads} kv, {config.mlp}, {config.positions}, {config.norm}, "
            f"context {config.context_length}, vocab {config.vocab_size}"
            + (f", window {config.sliding_window}" if config.sliding_window else "")
            + (f", {'+'.join(parts)}" if parts else "")
            + (f" ({counts.active / 1e6:.2f}M active)" if counts.active != counts.total else "")
        )


def _import_hf(args: argparse.Namespace) -> None:
    import torch

    from fucina.interop.hf_import import import_hf_checkpoint, read_hf_config

    model_type = read_hf_config(args.hf_dir).get("model_type")
    result = import_hf_checkpoint(
        args.hf_dir,
        args.out,
        tokenizer=args.tokenizer,
        template=args.template,
        dtype=getattr(torch, args.dtype),
    )
    config = result.config
    print(
        f"imported {model_type} from {args.hf_dir} -> {result.out_dir}: {config.n_layers} layers, "
        f"d_model {config.d_model}, {config.n_heads} heads ({config.kv_heads} kv), vocab {config.vocab_size}"
    )
    if result.tokenizer_imported:
        added = f", added {', '.join(result.added_tokens)}" if result.added_tokens else ""
        print(f"tokenizer imported with the {args.template} chat template{added}")
    else:
        print(f"no tokenizer imported: {result.note}")


def _export_ternary(args: argparse.Namespace) -> None:
    import torch

    from fucina.interop.ternary import export_ternary_model

    result = export_ternary_model(args.model, args.out, getattr(torch, args.dtype), args.overwrite)
    print(result.summary())
