"""`fucina tokenizer` commands (being written)."""


def register(subparsers) -> None:
    subparsers.add_parser("tokenizer", help="(not yet available)")
