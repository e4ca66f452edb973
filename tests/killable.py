"""`subprocess.run` for launchers (torchrun, accelerate launch, spawn): on timeout, kill the whole tree.

A plain `subprocess.run(timeout=...)` kills only the launcher; its worker processes survive as
orphans, and a worker stuck in a collective keeps a core busy for the rest of the test session.
"""

from __future__ import annotations

import os
import signal
import subprocess


def run(cmd: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Run `cmd` in its own session with stdout/stderr captured as text; kill its group when done."""
    check = kwargs.pop("check", False)
    with subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
        finally:
            try:  # workers a finished launcher left behind
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check:
        result.check_returncode()
    return result
