"""`python -m fucina`: the `fucina` command, as torchrun launches it (`torchrun ... -m fucina train ...`)."""

import sys

from fucina.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
