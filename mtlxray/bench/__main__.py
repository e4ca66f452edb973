"""`python -m mtlxray.bench [suite] [--quick] [--out DIR]`: the same as `mtlxray bench`."""

import sys

from mtlxray.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
