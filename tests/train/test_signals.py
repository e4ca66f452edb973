"""Stop signals: recorded from the first moment of `mtlxray train`, acted on at a step boundary."""

import signal
import subprocess
import sys
import time

from _train_support import DEMO, REPO, cli_env, tiny_overrides
from mtlxray.errors import EXIT_REQUEUE
from mtlxray.train.signals import StopFlag


def test_stop_flag_records_the_first_signal_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
        flag = StopFlag.install()
        signal.raise_signal(sig)
        signal.raise_signal(signal.SIGTERM)  # a second signal does not overwrite the first
        assert flag.requested == sig.name
        flag.close()
    assert signal.getsignal(signal.SIGTERM) is before


def test_install_is_idempotent_and_keeps_an_early_signal():
    first = StopFlag.install()
    signal.raise_signal(signal.SIGUSR1)
    again = StopFlag.install()
    assert again is first and again.requested == "SIGUSR1"
    first.close()


def _wait_for_handler(pid: int, sig: signal.Signals, timeout: float = 30.0) -> None:
    """Wait until process `pid` catches `sig` (its SigCgt mask in /proc shows a handler)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("SigCgt:") and int(line.split()[1], 16) >> (sig - 1) & 1:
                return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} never installed a {sig.name} handler")


def test_sigusr1_during_start_up_exits_75_with_nothing_saved(tiny_shards, tmp_path):
    args = tiny_overrides(tiny_shards, tmp_path, "schedule.max_steps=3")
    proc = subprocess.Popen([sys.executable, "-m", "mtlxray.cli", "train", "--config", str(DEMO), *args],
                            cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_handler(proc.pid, signal.SIGUSR1)  # `mtlxray train` has started; torch is still importing
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE, err[-2000:]
    assert "SIGUSR1" in err and "nothing to save" in err
    assert not (tmp_path / "t" / "checkpoints").exists()
