"""`fucina lora`: merge a LoRA run into an ordinary model, or import a PEFT LoRA adapter.

`fucina lora merge --model RUN_OR_LORA_DIR --out DIR` writes W + scale * B A into an ordinary model
directory (a tied LM head that carries an adapter is untied; a quantized base is dequantized).
`fucina lora import --peft PEFT_DIR --base MODEL_DIR --out DIR` turns a PEFT LoRA adapter trained on the
Hugging Face export of MODEL_DIR into a LoRA model directory that generate, chat, eval and serve run.
An existing --out is refused unless --overwrite is given.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    lora = subparsers.add_parser(
        "lora", help="merge LoRA adapters, import PEFT adapters", description=__doc__.split("\n\n")[1]
    )
    commands = lora.add_subparsers(dest="lora_command", metavar="COMMAND", required=True)
    merge = commands.add_parser("merge", help="merge a LoRA run's adapters into an ordinary model directory")
    merge.add_argument(
        "--model", required=True, help="LoRA run directory (uses best/) or LoRA model directory"
    )
    merge.add_argument("--out", required=True, help="the merged model directory to write")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    merge.set_defaults(func=run_merge)
    imported = commands.add_parser("import", help="import a PEFT LoRA adapter as a LoRA model directory")
    imported.add_argument(
        "--peft", required=True, help="PEFT adapter directory (adapter_config.json + safetensors)"
    )
    imported.add_argument(
        "--base", required=True, help="the fucina model whose HF export the adapter was trained on"
    )
    imported.add_argument("--out", required=True, help="the LoRA model directory to write")
    imported.add_argument(
        "--picodac-class",
        default="imagegpt",
        choices=("imagegpt", "remote-code"),
        help="HF class the base was exported as, for a PicoDAC-style base (default imagegpt)",
    )
    imported.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    imported.set_defaults(func=run_import)


def run_merge(args: argparse.Namespace) -> int:
    from fucina.adapt.merge import merge_lora_dir

    result = merge_lora_dir(args.model, args.out, overwrite=args.overwrite)
    notes = []
    if result.untied_head:
        notes.append("LM head untied from the embedding")
    if result.dequantized_layers:
        notes.append(f"{result.dequantized_layers} quantized layers dequantized")
    extra = f" ({'; '.join(notes)})" if notes else ""
    print(f"wrote {result.path}: {result.merged_layers} layers merged{extra}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from fucina.adapt.peft_format import import_peft

    result = import_peft(args.peft, args.base, args.out, args.overwrite, args.picodac_class)
    print(
        f"wrote {result.path}: {result.modules} {result.architecture} modules, "
        f"{result.parameters:,} adapter parameters"
    )
    return 0
