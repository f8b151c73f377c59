"""`fucina export`: write a trained model as a Hugging Face model directory, a llama.cpp GGUF file or a
packed ternary file.

`fucina export --model RUN_OR_MODEL_DIR --format hf --out DIR` writes config.json, model.safetensors,
the tokenizer with its chat template, generation_config.json and a README.md model card, loadable with
`AutoModelForCausalLM.from_pretrained(DIR)` (GPT-2, LLaMA, Mistral, Ministral classes); PicoDAC-style
models become transformers' ImageGPTForCausalImageModeling (no custom code), or with
`--picodac-class remote-code` a small remote-code module for AutoModelForCausalLM. `--format gguf --out
FILE.gguf [--quant f32|f16|bf16|q8_0|q5_1|q5_0|q4_1|q4_0]` writes one GGUF file for llama.cpp
(LLaMA- and GPT-2-style models).
`--format ternary --out FILE.safetensors [--dtype bfloat16|float32]` packs a BitNet model's projections
at 2 bits per weight (load it with fucina.compress.ternary.load_ternary). `--format ollama --out DIR
[--quant ...]` writes DIR/model.gguf and DIR/Modelfile with the chat template in Ollama's syntax, ready
for `ollama create NAME -f DIR/Modelfile`. `--format peft --out DIR` writes a LoRA run's adapter as
adapter_config.json + adapter_model.safetensors for PEFT on the `--format hf` export of its base. An
existing --out is refused
unless --overwrite is given (the old output is replaced only once the new one is complete).
"""

from __future__ import annotations

import argparse

FORMATS = ("hf", "gguf", "ternary", "ollama", "peft")
# fucina.interop.gguf.GGUF_QUANTS, spelled out: parsing arguments imports neither torch nor gguf
GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


def register(subparsers) -> None:
    export = subparsers.add_parser(
        "export",
        help="export a model to Hugging Face transformers, llama.cpp (GGUF) or packed ternary weights",
        description=__doc__.split("\n\n")[1],
    )
    export.add_argument("--model", required=True, help="run directory (uses best/) or model directory")
    export.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="hf, ollama or peft (a directory), gguf or ternary (a file)",
    )
    export.add_argument(
        "--out",
        required=True,
        help="output directory (hf, ollama, peft), .gguf file (gguf) or .safetensors file (ternary)",
    )
    export.add_argument(
        "--quant",
        default="f16",
        choices=GGUF_QUANTS,
        help="GGUF matrix type, gguf and ollama (default f16; q4_*/q5_* keep embedding and head in q8_0)",
    )
    export.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float32"),
        help="ternary: dtype of the tensors that are not ternary (embeddings, head, norms; default bfloat16)",
    )
    export.add_argument(
        "--picodac-class",
        default="imagegpt",
        choices=("imagegpt", "remote-code"),
        help="hf class of a PicoDAC-style model: standard ImageGPT (default) or remote code for AutoModel",
    )
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    export.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from fucina.interop.source import load_source

    if args.format == "ternary":  # the model alone: no tokenizer needed (interop/ternary.py)
        import torch

        from fucina.interop.ternary import export_ternary_model

        result = export_ternary_model(args.model, args.out, getattr(torch, args.dtype), args.overwrite)
        print(result.summary())
        return 0
    if args.format == "peft":  # the adapter of a LoRA run, for PEFT on the HF export of its base
        from fucina.adapt.peft_format import export_peft

        peft = export_peft(args.model, args.out, overwrite=args.overwrite, picodac_class=args.picodac_class)
        print(f"wrote {peft.path}: {peft.modules} {peft.architecture} modules, {peft.parameters:,} weights")
        return 0
    source = load_source(args.model)
    if args.format == "hf":
        from fucina.interop.hf_export import export_hf

        result = export_hf(source, args.out, overwrite=args.overwrite, picodac_class=args.picodac_class)
        print(f"wrote {result.path}: {result.architecture}, {result.parameters:,} parameters")
        if result.remote_code:
            print("this architecture ships as remote code: load it with trust_remote_code=True")
    elif args.format == "ollama":
        from fucina.interop.ollama import export_ollama

        result = export_ollama(source, args.out, quant=args.quant, overwrite=args.overwrite)
        print(
            f"wrote {result.path}: {result.gguf.path.name} (llama.cpp arch {result.gguf.architecture}, "
            f"{result.gguf.quant}) and {result.modelfile.name}; "
            f"load it with: ollama create NAME -f {result.modelfile}"
        )
    else:
        from fucina.interop.gguf import export_gguf

        result = export_gguf(source, args.out, quant=args.quant, overwrite=args.overwrite)
        print(
            f"wrote {result.path}: llama.cpp arch {result.architecture}, {result.quant}, {result.tensors} tensors"
        )
    return 0
