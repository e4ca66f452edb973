import re
import signal

import pytest

from mtlxray.errors import NonFiniteLossError
from mtlxray.checkpoint import find_resume, read_state
from mtlxray.train.signals import NonFiniteGuard, StopFlag

from _train_support import DEMO, run_cli, tiny_overrides


def test_stop_flag_is_set_by_sigusr1_and_sigterm_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        flag = StopFlag()
        signal.raise_signal(sig)
        assert flag.requested == sig.name
        flag.close()
    assert signal.getsignal(signal.SIGTERM) is before


def test_non_finite_guard_skips_within_budget_then_names_the_step():
    guard = NonFiniteGuard(budget=1)
    guard.skip(4, {"loss": float("nan")})
    with pytest.raises(NonFiniteLossError, match="step 7"):
        guard.skip(7, {"loss": float("inf")})


def test_nan_loss_fails_with_named_error_and_keeps_last_good_checkpoint(tiny_shards, tmp_path):
    # A learning rate of 1e37 blows the weights up in the first update: the next loss is non-finite.
    args = tiny_overrides(tiny_shards, tmp_path, "schedule.max_steps=6", "run.save_every=1",
                          "optim.lr=1e37", "optim.grad_clip=0", "schedule.warmup_steps=0")
    res = run_cli(["train", "--config", str(DEMO), *args])
    assert res.returncode == NonFiniteLossError.exit_code
    err = res.stderr.strip().splitlines()[-1]
    assert "non-finite loss at step" in err and "Traceback" not in res.stderr
    failed_at = int(re.search(r"non-finite loss at step (\d+)", err).group(1))
    kept = read_state(find_resume(tmp_path / "t" / "checkpoints"))
    assert kept.step == failed_at - 1  # the checkpoint of the last good step is still there
