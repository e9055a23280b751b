"""The ``jobctl`` command."""

from __future__ import annotations

import sys

from jobctl._cli import main

if __name__ == "__main__":
    sys.exit(main())
