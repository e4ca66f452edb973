"""Files written whole or not at all, and the few file helpers every layer needs.

Every file mtlxray writes goes through `atomic_path`: the content goes to a uniquely named temp
file in the destination folder, which is renamed over the destination only when complete, so a
reader (or a killed writer) never sees a half-written file. `tempfile.mkstemp` creates its file
with mode 0600; the temp file is given the mode a plain `open()` would have given it (0666 minus
the umask) before the rename, so teammates on a shared cluster can read checkpoints and reports.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from mtlxray.errors import MtlxError
from mtlxray.resources import proc_status

__all__ = ["atomic_path", "write_text_atomic", "write_json_atomic", "json_safe",
           "sha256_file", "free_port", "default_file_mode", "free_space", "write_error", "write_stdout"]


def default_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0666 minus the process umask."""
    umask = proc_status("Umask")  # Linux exposes the umask without changing it (os.umask would, racing other threads)
    if umask is not None:
        return 0o666 & ~int(umask, 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it is renamed onto `path`, else removed.

    Creates the parent folder. The temp name is unique, so concurrent writers never share one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def free_space(path: str | Path) -> str:
    """The free space of the file system `path` is (or would be) on, in MiB (e.g. "1432.7 MiB", one
    unit so that messages compare at a glance); "unknown" if no folder above it can be read."""
    folder = Path(path).absolute()
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown"
    return f"{free / 2**20:.1f} MiB"


def write_error(path: str | Path, error: Optional[BaseException], *, what: str = "", after: str = "",
                error_type: type[MtlxError] = MtlxError) -> MtlxError:
    """A one-line error for a failed write of `path` (`what` names it): the reason, the free space
    there, and `after` (what was kept). `error` None: another process failed to write its part.

    Writers report a full disk in their own words (OSError ENOSPC, safetensors' SafetensorError,
    torch's "file write failed"); the free space says which it was without parsing them. Torch's
    writer ends a multi-line message with the cause, so the last line is the reason."""
    if error is None:
        reason = "another process failed to write its part"
    elif isinstance(error, OSError) and error.strerror:
        reason = error.strerror
    else:
        lines = str(error).strip().splitlines()
        reason = lines[-1].strip()[:200] if lines else type(error).__name__
    message = f"{path}: cannot write{' ' + what if what else ''}: {reason} ({free_space(path)} free there)"
    return error_type(message + (f"; {after}" if after else ""))


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float replaced by None, so that it serialises as strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json_atomic(path: str | Path, value: Any, **dumps_kwargs: Any) -> Path:
    """Strict JSON (nan and inf become null) followed by a newline."""
    return write_text_atomic(path, json.dumps(json_safe(value), allow_nan=False, **dumps_kwargs) + "\n")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for single-machine rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_stdout(text: str) -> bool:
    """Write to stdout; when the reader has gone (`... | head`), stop quietly instead of raising
    BrokenPipeError (now and at interpreter exit). Returns False when the pipe was closed."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
        return True
    except BrokenPipeError:
        # Point stdout at /dev/null so the final flush at exit does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return False
