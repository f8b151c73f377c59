"""`fucina data` commands (being written)."""


def register(subparsers) -> None:
    subparsers.add_parser("data", help="(not yet available)")
