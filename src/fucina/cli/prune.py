"""`fucina prune`: structured pruning of a trained model into a new, smaller model directory.

`fucina prune --model RUN --heads 0.25 --ffn 0.25 --layers 2 --calibration FILE --out DIR` removes,
in every layer, the least important quarter of the attention head groups (whole KV groups under GQA)
and of the FFN channels, and the 2 least important blocks, ranked by activations on the calibration
text (`--method magnitude`: by weight norms, no text needed). DIR is an ordinary model directory
(export, generate, eval, train init_from); heal it with a distill run from the unpruned model
(configs/llama-pruned-heal.yaml). Parameters and held-out bits per byte are printed before and after.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELDOUT_NAMES = ("eltec", "wikipedia")


def register(subparsers) -> None:
    prune = subparsers.add_parser(
        "prune",
        help="remove attention heads, FFN channels and blocks from a trained model",
        description=__doc__.split("\n\n")[1],
    )
    prune.add_argument("--model", required=True, help="run directory (uses best/) or model directory")
    prune.add_argument("--out", required=True, help="the pruned model directory to write")
    prune.add_argument("--heads", type=float, default=0.0, help="fraction of head groups to remove per layer")
    prune.add_argument("--ffn", type=float, default=0.0, help="fraction of FFN channels to remove per layer")
    prune.add_argument("--layers", type=int, default=0, help="number of whole blocks to remove")
    prune.add_argument(
        "--method", choices=("activation", "magnitude"), default="activation", help="how importance is scored"
    )
    prune.add_argument("--calibration", help="text file (.txt/.jsonl, .xz/.gz) for activation importance")
    prune.add_argument(
        "--calibration-tokens", type=int, default=32768, help="calibration tokens to read (default 32768)"
    )
    prune.add_argument(
        "--ffn-multiple",
        type=int,
        default=32,
        help="round the kept FFN channels down to a multiple of this (default 32: int4 groups, q8_0 blocks)",
    )
    prune.add_argument(
        "--heldout",
        action="append",
        metavar="NAME_OR_FILE",
        help="bits per byte before/after on held-out eltec, wikipedia (of --data-dir) or a text file; "
        "repeatable (default: wikipedia; 'none' to skip)",
    )
    prune.add_argument(
        "--heldout-chars", type=int, default=100_000, help="characters scored per held-out set"
    )
    prune.add_argument("--data-dir", help="the data root of the held-out sets (default ../shared/data)")
    prune.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    prune.set_defaults(func=run_prune)


def run_prune(args: argparse.Namespace) -> int:
    from fucina.compress.prune import PruneSpec, prune_model_dir
    from fucina.data.readers import iter_texts
    from fucina.errors import ConfigError

    spec = PruneSpec(args.heads, args.ffn, args.layers, args.method, args.ffn_multiple)
    if args.calibration_tokens < 1 or args.heldout_chars < 1:
        raise ConfigError("--calibration-tokens and --heldout-chars must be positive")
    if args.method == "magnitude" and args.calibration:
        raise ConfigError("--calibration is read by --method activation only")
    heldout = {name: _heldout_texts(name, args.data_dir, args.heldout_chars) for name in _heldout_names(args)}
    calibration = iter_texts(args.calibration) if args.calibration else None
    result = prune_model_dir(
        args.model,
        args.out,
        spec,
        calibration=calibration,
        calibration_tokens=args.calibration_tokens,
        heldout=heldout,
        overwrite=args.overwrite,
    )
    before, after = result.record.before, result.record.after
    print(f"wrote {result.path} ({result.record.method} importance)")
    for key in before:
        if before[key] != after[key]:
            print(f"  {key}: {before[key]} -> {after[key]}")
    share = 1 - result.parameters_after / result.parameters_before
    print(f"  parameters: {result.parameters_before:,} -> {result.parameters_after:,} ({share:.1%} fewer)")
    for name, bpb in result.bits_per_byte.items():
        print(f"  bits per byte on {name}: {bpb['before']:.4f} -> {bpb['after']:.4f}")
    return 0


def _heldout_names(args: argparse.Namespace) -> list[str]:
    names = args.heldout or ["wikipedia"]
    return [] if names == ["none"] else names


def _heldout_texts(name: str, data_dir: str | None, max_chars: int) -> list[str]:
    """The first `max_chars` characters of a held-out set (by name) or of a text file."""
    from fucina.data.readers import iter_texts
    from fucina.errors import ConfigError
    from fucina.evaluate.heldout import heldout_texts

    if name in HELDOUT_NAMES:
        texts = iter(heldout_texts(data_dir, name))
    elif Path(name).is_file():
        texts = iter_texts(name)
    else:
        raise ConfigError(f"--heldout {name!r} is neither {', '.join(HELDOUT_NAMES)} nor a file")
    kept, total = [], 0
    for text in texts:
        kept.append(text[: max_chars - total])
        total += len(kept[-1])
        if total >= max_chars:
            break
    return kept
