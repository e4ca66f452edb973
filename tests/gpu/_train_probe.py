"""`python _train_probe.py RECORD.json mtlxray-args...`: run the mtlxray CLI and record what it used.

Records, in RECORD.json at exit: the process-group backend and world size it initialised (if any),
whether a DistributedDataParallel or a DeepSpeed engine was built, the device of the model's
parameters, and the exit code. Environment switches for the tests:

- MTLXRAY_TEST_DETERMINISTIC=1: `torch.use_deterministic_algorithms(True, warn_only=True)` (the
  model's bilinear upsampling and adaptive pooling have no deterministic CUDA backward; they warn);
- MTLXRAY_TEST_TERM_AFTER_STEP=K: SIGTERM to this process after the K-th optimizer step (a
  preemption: the trainer saves `last` and exits 75).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys
from pathlib import Path


def main() -> int:
    record_path, *argv = sys.argv[1:]
    record: dict = {"process_group": None, "ddp": False, "deepspeed_engine": False, "param_device": None}

    def write() -> None:
        Path(record_path).write_text(json.dumps(record))

    atexit.register(write)
    import torch
    import torch.distributed as dist
    from torch.optim.optimizer import register_optimizer_step_post_hook

    if os.environ.get("MTLXRAY_TEST_DETERMINISTIC") == "1":
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False

    init = dist.init_process_group

    def init_process_group(*args, **kwargs):
        out = init(*args, **kwargs)
        record["process_group"] = {"backend": dist.get_backend(), "world_size": dist.get_world_size()}
        return out

    dist.init_process_group = init_process_group

    ddp_init = torch.nn.parallel.DistributedDataParallel.__init__

    def ddp(self, module, *args, **kwargs):
        record["ddp"] = True
        record["param_device"] = str(next(module.parameters()).device)
        return ddp_init(self, module, *args, **kwargs)

    torch.nn.parallel.DistributedDataParallel.__init__ = ddp

    steps = {"n": 0}
    term_after = int(os.environ.get("MTLXRAY_TEST_TERM_AFTER_STEP", "0"))

    def after_step(optimizer, args, kwargs) -> None:
        steps["n"] += 1
        record["optimizer_steps"] = steps["n"]
        if record["param_device"] is None:
            record["param_device"] = str(optimizer.param_groups[0]["params"][0].device)
        if term_after and steps["n"] == term_after:
            os.kill(os.getpid(), signal.SIGTERM)

    register_optimizer_step_post_hook(after_step)
    try:
        import deepspeed

        engine_init = deepspeed.runtime.engine.DeepSpeedEngine.__init__

        def engine(self, *args, **kwargs):
            record["deepspeed_engine"] = True
            return engine_init(self, *args, **kwargs)

        deepspeed.runtime.engine.DeepSpeedEngine.__init__ = engine
    except ImportError:
        pass

    from mtlxray.cli import main as cli

    code = cli(argv)
    record["exit_code"] = code
    return code


if __name__ == "__main__":
    sys.exit(main())
