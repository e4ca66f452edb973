"""Training: the loop and its components (losses, phases, optimizer, logs, validation, signals).

Importing this package is cheap (no torch): `mtlxray train` installs its signal handlers first.
"""

from mtlxray.train.main import run_training

__all__ = ["run_training"]
