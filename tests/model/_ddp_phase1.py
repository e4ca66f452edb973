"""Two-rank DDP (gloo) phase-1 training of a tiny Swin-UNet, for test_net.py.

    python _ddp_phase1.py OUT_DIR PORT

Each rank freezes the infection decoder and head, wraps the model in DDP with
find_unused_parameters=False, takes three AdamW steps on its own batch, and writes
OUT_DIR/rank<R>.json with the world size, a digest of its parameters and whether the frozen
parameters moved.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from mtlxray.config import ModelConfig
from mtlxray.model import build_model


def run(rank: int, out_dir: str, port: int) -> None:
    torch.set_num_threads(1)  # two ranks share the cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    cfg = ModelConfig(img_size=32, window_size=4, embed_dim=12, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4],
                      ppm_channels=8, decoder_channels=[32, 16, 16, 8], cross_attn_heads=[4, 2, 2, 1],
                      head_channels=8, cls_channels=8, grad_checkpoint="attention")
    model = build_model(cfg)
    for name in ("inf_decoder", "inf_head"):
        getattr(model, name).requires_grad_(False)
    model.set_mode("phase1")
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("inf_decoder", "inf_head"))}
    ddp = DDP(model, find_unused_parameters=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(100 + rank)  # a different batch on each rank
    for _ in range(3):
        x = torch.rand(2, 1, 32, 32)
        out = ddp(x)
        loss = out["lung"].sigmoid().mean() + out["cls"].logsumexp(dim=1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().numpy().tobytes())
    frozen_same = all(torch.equal(v, model.state_dict()[k]) for k, v in frozen_before.items())
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "world_size": dist.get_world_size(), "digest": digest.hexdigest(), "frozen_same": frozen_same,
    }))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1], int(sys.argv[2])), nprocs=2)
