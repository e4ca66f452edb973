"""The output folder of `predict` and `evaluate`: one command at a time, and never a mix of two runs.

A command takes its folder before it writes anything:

- an exclusive `fcntl.flock` on `OUT/.lock`, held until the command ends (the kernel releases it
  when the holder dies), so a second command into the same folder fails at once naming the
  holder's pid instead of writing beside the first; the folder is checked for emptiness only
  under the lock, so two commands can never both find a new folder empty (the check and the
  creation being separate steps, both did before);
- a folder holding anything besides the lock is refused unless `overwrite`, which first deletes
  what the command writes there (its `outputs`) and keeps everything else, so no file of an
  earlier run is left to read as current.

The lock file is removed when the command ends (one left by a killed command counts as empty).
A command that takes the lock checks that the file it locked is still the one at `OUT/.lock`, so a
holder removing it as it finishes cannot let two commands in.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from mtlxray.errors import ConfigError, MtlxError

__all__ = ["claim_output_dir", "OutputBusyError", "LOCK_NAME"]

LOCK_NAME = ".lock"


class OutputBusyError(MtlxError):
    """Another command is writing into the same output folder."""


def _holder(fd: int) -> str:
    text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    return f"pid {text}" if text.isdigit() else "another process"


def _remove(out: Path, name: str) -> None:
    path = out / name
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError as e:
        raise MtlxError(f"--out {out}: cannot remove the earlier {name}: {e.strerror or e}") from None


def _lock(out: Path, command: str) -> int:
    """An open descriptor of `out/.lock` holding its exclusive flock (OutputBusyError if held)."""
    path = out / LOCK_NAME
    for _ in range(5):  # the holder may remove the file between our open and our flock: take the new one
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise OutputBusyError(f"--out {out}: in use by {holder} (another `mtlxray {command}`); wait for "
                                  "it, or choose another folder") from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return fd
        os.close(fd)
    raise OutputBusyError(f"--out {out}: its lock keeps changing hands; is another `mtlxray {command}` looping?")


@contextlib.contextmanager
def claim_output_dir(out: str | Path, outputs: Sequence[str], *, overwrite: bool, command: str) -> Iterator[Path]:
    """Create `out` if needed and hold it for `command` until the block ends (see the module docstring).

    OutputBusyError while another command holds it; ConfigError (a usage error, exit 2) for a
    folder that is not empty, unless `overwrite`, which deletes `outputs` (names under `out`, or
    `*` patterns) first; MtlxError for a folder that cannot be created or written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = _lock(out, command)
    except OSError as e:
        raise MtlxError(f"--out {out}: cannot write there: {e.strerror or e}") from None
    try:
        if any(p.name != LOCK_NAME for p in out.iterdir()):
            if not overwrite:
                raise ConfigError(f"--out {out} is not empty: pass --overwrite to replace an earlier {command} "
                                  "there, or choose a new folder")
            for pattern in outputs:
                for name in ([p.name for p in out.glob(pattern)] if "*" in pattern else [pattern]):
                    _remove(out, name)
        try:
            with tempfile.TemporaryFile(dir=out):
                pass
        except OSError as e:
            raise MtlxError(f"--out {out}: cannot write there: {e.strerror or e}") from None
        yield out
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out / LOCK_NAME)  # while still held: a newcomer then locks a new file
        os.close(fd)  # releases the lock
