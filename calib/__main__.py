"""``python -m oscar_sglang.calib`` and the ``oscar-calib`` console script (see cli.py)."""

import sys

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
