"""`fucina quantize`: post-training weight quantization of a trained model into a new model directory.

`fucina quantize --model RUN --bits 8 --out DIR` stores the blocks' projections as int8 with one scale
per output channel; `--bits 4 [--group-size 32|64|128|256]` as int4 with a scale and minimum per group.
Embeddings and norms stay in float32. DIR is a model directory: `fucina generate --model DIR` and
`fucina chat --model DIR` run it on CPU with torch's int8/int4 kernels. An existing --out is refused
unless --overwrite is given.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    quantize = subparsers.add_parser(
        "quantize", help="quantize a trained model to int8 or int4", description=__doc__.split("\n\n")[1]
    )
    quantize.add_argument("--model", required=True, help="run directory (uses best/) or model directory")
    quantize.add_argument("--bits", required=True, type=int, choices=(8, 4), help="8 or 4")
    quantize.add_argument(
        "--group-size", type=int, default=None, help="int4 inputs per scale: 32 (default), 64, 128 or 256"
    )
    quantize.add_argument("--out", required=True, help="the quantized model directory to write")
    quantize.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    quantize.set_defaults(func=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    from fucina.compress import quantize_model_dir
    from fucina.errors import ConfigError

    if args.group_size is not None and args.bits != 4:
        raise ConfigError("--group-size applies to --bits 4 only")
    result = quantize_model_dir(args.model, args.out, args.bits, args.group_size, overwrite=args.overwrite)
    layers = len(result.spec.layers)
    print(
        f"wrote {result.path}: {result.spec.method}"
        + (f" (group {result.spec.group_size})" if result.spec.group_size else "")
        + f", {layers} layers, weights {result.source_bytes / 1e6:.1f} MB -> {result.quantized_bytes / 1e6:.1f} MB"
    )
    return 0
