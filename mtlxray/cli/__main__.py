"""`python -m mtlxray.cli`: the command line, as the `mtlxray` script runs it (accelerate launch -m, srun)."""

import sys

from mtlxray.cli import main

sys.exit(main())
