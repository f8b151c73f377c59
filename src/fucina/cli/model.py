"""`fucina model` commands (being written)."""


def register(subparsers) -> None:
    subparsers.add_parser("model", help="(not yet available)")
