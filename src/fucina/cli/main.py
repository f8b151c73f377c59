"""Entry point of the `fucina` command.

Each command group lives in its own module with a `register(subparsers)` function that adds its
parser and sets `func` (called with the parsed namespace). Errors the user caused (`FucinaError`)
become one clear line and exit code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from fucina import __version__
from fucina.errors import FucinaError

COMMAND_MODULES = [
    "fucina.cli.tokenizer",
    "fucina.cli.data",
    "fucina.cli.model",
    "fucina.cli.train",
    "fucina.cli.generate",
    "fucina.cli.demo",
    "fucina.cli.eval",
    "fucina.cli.export",
    "fucina.cli.quantize",
    "fucina.cli.prune",
    "fucina.cli.lora",
    "fucina.cli.study",
    "fucina.cli.serve",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fucina", description="Build small Italian language models from scratch."
    )
    parser.add_argument("--version", action="version", version=f"fucina {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not hasattr(args, "func"):
        parser.print_help()
        return 1
    try:
        result = args.func(args)
    except FucinaError as err:
        if args.debug:
            raise
        print(f"fucina: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fucina: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
