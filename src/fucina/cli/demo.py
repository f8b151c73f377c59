"""`fucina demo` commands (being written)."""


def register(subparsers) -> None:
    subparsers.add_parser("demo", help="(not yet available)")
