"""A `mtlxray train` process for the tests, with one test-controlled event and a parameter digest.

    python _worker.py OUT_DIR MODE STEP CONFIG [KEY=VALUE ...]

MODE `none` trains normally; `term` sends this process SIGTERM while it writes the checkpoint of
optimizer step STEP (a save step: the trainer acts on it at its next log or save step, as on a
signal that arrives between two of them); `kill-in-save` SIGKILLs it there. After training,
each rank writes OUT_DIR/rank<R>.json with its world size, final step, exit code and a sha256 of
its full parameters (gathered under ZeRO-3).
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import json
import os
import signal
import sys
from pathlib import Path


def digest(trainer) -> str:
    model = trainer.raw_model
    params = list(model.named_parameters())
    gather = contextlib.nullcontext()
    if trainer.cfg.run.backend == "deepspeed":
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in params])
    h = hashlib.sha256()
    with gather:
        for name, p in params:
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def deepspeed_shm_comm() -> bool:
    """Whether DeepSpeed routes this process's all-reduces through its shared-memory kernel."""
    if "deepspeed" not in sys.modules:
        return False
    from deepspeed.comm import comm

    return getattr(comm.cdb, "shm_comm_op", None) is not None


def install_event(mode: str, step: int) -> None:
    """Hook the checkpoint writer's weight file (safetensors' save_file) for the event of `mode`."""
    import safetensors.torch

    save = safetensors.torch.save_file
    signum = {"term": signal.SIGTERM, "kill-in-save": signal.SIGKILL}.get(mode)
    if signum is None:
        return

    def save_file(tensors, filename, *args, **kwargs):
        save(tensors, filename, *args, **kwargs)
        if f".tmp-step-{step:06d}" in str(filename):
            os.kill(os.getpid(), signum)

    safetensors.torch.save_file = save_file


def main() -> int:
    from mtlxray.config import load_config
    from mtlxray.train.trainer import Trainer

    out, mode, step, config, *overrides = sys.argv[1:]
    # A hung collective prints every thread's stack and exits before the test's own timeout.
    faulthandler.dump_traceback_later(float(os.environ.get("MTLXRAY_TEST_HANG_S", "240")), exit=True)
    install_event(mode, int(step))
    trainer = Trainer(load_config(config, overrides), "auto")
    try:
        code = trainer.fit()
        record = {"rank": trainer.rank, "world_size": trainer.world, "step": trainer.state.step,
                  "code": code, "digest": digest(trainer), "deepspeed_shm_comm": deepspeed_shm_comm(),
                  "ddp_comm_hooks": [h.__name__ for h, _ in getattr(trainer.model, "_comm_hooks", [])]}
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, f"rank{trainer.rank}.json").write_text(json.dumps(record))
    finally:
        trainer.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
