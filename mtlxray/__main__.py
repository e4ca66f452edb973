"""`python -m mtlxray`: the command line, as the `mtlxray` script runs it."""

import sys

from mtlxray.cli import main

if __name__ == "__main__":
    sys.exit(main())
