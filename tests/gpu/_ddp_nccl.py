"""Run by torchrun (one process): DDP over NCCL around the model on this process's GPU.

    python -m torch.distributed.run --standalone --nproc_per_node 1 _ddp_nccl.py OUT.json

Builds the tiny multi-task model twice from one seed, wraps one copy in DistributedDataParallel
(NCCL, device_ids=[local rank]) and takes a bf16 training step with block checkpointing on both;
writes the backend, world size and the largest gradient difference between them (DDP averages
over one rank, so the gradients must agree).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist


def main() -> int:
    out = sys.argv[1]
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", timeout=timedelta(minutes=5))
    from mtlxray.bench.workloads import ours
    from mtlxray.memory_plan import place, tensor_sum
    from _gpu_support import TINY_MODEL

    def model():
        torch.manual_seed(0)
        m = ours([*TINY_MODEL, "model.grad_checkpoint=block", "model.drop_path_rate=0.0"], phase="phase2")
        return place(m, "bf16", "cuda").cuda().train()

    plain = model()
    ddp = torch.nn.parallel.DistributedDataParallel(model(), device_ids=[local])
    x = torch.rand(4, 1, 64, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    for m in (plain, ddp):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = tensor_sum(m(x))
        loss.backward()
    diffs = [(a.grad - b.grad).abs().max().item() for a, b in zip(plain.parameters(), ddp.module.parameters())
             if a.grad is not None]
    record = {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "loss": loss.item(),
              "max_grad_diff": max(diffs), "grads": len(diffs),
              "max_grad": max(p.grad.abs().max().item() for p in plain.parameters() if p.grad is not None)}
    with open(out, "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
