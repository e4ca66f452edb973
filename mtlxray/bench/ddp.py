"""`ddp`: weak scaling on the tiny model, 2 gloo ranks × 1 thread against 1 rank × 1 thread
(efficiency = throughput(2) / (2 × throughput(1))), and DeepSpeed ZeRO-2 against DDP, all in one
pair of processes, round after round, so machine noise hits every variant alike.

Each round: rank 0 trains alone without communication while rank 1 waits at a barrier (1 rank);
then both train their own model with no communication (what sharing the machine alone costs);
then both train under DDP; under DDP with fp16-compressed gradient all-reduce (DDP's
`fp16_compress_hook`); then under a DeepSpeed ZeRO-2 engine. Every variant keeps its own model and
AdamW state, built from the same seed.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtlxray.bench.common import Context, SuiteResult, Target
from mtlxray.bench.workloads import TINY
from mtlxray.io import free_port

BATCH = 8
WORLD = 2


def _model():
    from mtlxray.bench.workloads import ours

    torch.manual_seed(0)
    return ours(TINY, phase="phase2").train()


def _loss(model, x: torch.Tensor) -> torch.Tensor:
    from mtlxray.memory_plan import tensor_sum

    return tensor_sum(model(x))


def _params_equal_across_ranks(model: torch.nn.Module) -> bool:
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def _worker(rank: int, port: int, rounds: int, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(minutes=5))
    import deepspeed
    from torch.nn.parallel import DistributedDataParallel as DDP

    from mtlxray.train.accelerator import keep_deepspeed_collectives_on_gloo

    keep_deepspeed_collectives_on_gloo()  # compare DDP and ZeRO over the same gloo all-reduce

    size = int(next(o for o in TINY if o.startswith("model.img_size=")).split("=")[1])
    x = torch.rand(BATCH, 1, size, size, generator=torch.Generator().manual_seed(rank))

    single = _model()
    single_opt = torch.optim.AdamW(single.parameters(), lr=1e-4)
    ddp = DDP(_model(), find_unused_parameters=False)
    ddp_opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
    # The same, with gradients all-reduced in fp16 (half the bytes; DDP's own comm hook).
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    ddp_fp16 = DDP(_model(), find_unused_parameters=False, gradient_as_bucket_view=True)
    ddp_fp16.register_comm_hook(None, default_hooks.fp16_compress_hook)
    ddp_fp16_opt = torch.optim.AdamW(ddp_fp16.parameters(), lr=1e-4)
    zero_model = _model()
    engine, *_ = deepspeed.initialize(
        model=zero_model, optimizer=torch.optim.AdamW(zero_model.parameters(), lr=1e-4),
        config={"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
                "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
                "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})

    def torch_step(model, opt) -> None:
        opt.zero_grad(set_to_none=True)
        _loss(model, x).backward()
        opt.step()

    def zero_step() -> None:
        engine.backward(_loss(engine, x))
        engine.step()

    def timed(fn, active: bool) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        if active:
            for _ in range(steps):
                fn()
        dist.barrier()
        return (time.perf_counter() - t0) / steps

    times: dict[str, list[float]] = {"1_rank": [], "2_ranks_no_comm": [], "ddp_2_ranks": [],
                                     "ddp_fp16_grads_2_ranks": [], "zero2_2_ranks": []}
    for r in range(rounds + 1):  # round 0 is the warm-up
        t = {"1_rank": timed(lambda: torch_step(single, single_opt), active=rank == 0),
             "2_ranks_no_comm": timed(lambda: torch_step(single, single_opt), active=True),
             "ddp_2_ranks": timed(lambda: torch_step(ddp, ddp_opt), active=True),
             "ddp_fp16_grads_2_ranks": timed(lambda: torch_step(ddp_fp16, ddp_fp16_opt), active=True),
             "zero2_2_ranks": timed(zero_step, active=True)}
        if r > 0:
            for k, v in t.items():
                times[k].append(v)
    from mtlxray.bench.profiling import top_ops

    # both ranks step (the all-reduce needs its peer); rank 0's operators are the ones reported
    profile = top_ops(lambda: torch_step(ddp, ddp_opt), warmup=0) if rank == 0 else torch_step(ddp, ddp_opt)
    same = {"ddp": _params_equal_across_ranks(ddp.module), "ddp_fp16_grads": _params_equal_across_ranks(ddp_fp16.module),
            "zero2": _params_equal_across_ranks(zero_model)}
    from deepspeed.comm import comm as ds_comm

    if rank == 0:
        Path(out).write_text(json.dumps({"world_size": dist.get_world_size(), "times": times,
                                         "deepspeed_shm_comm": ds_comm.cdb.shm_comm_op is not None,
                                         "params_identical": same, "threads": torch.get_num_threads(),
                                         "profile_ddp_rank0": profile}))
    dist.barrier()
    dist.destroy_process_group()


def _spawn_with_deadline(fn, args: tuple, deadline_s: float) -> None:
    """`mp.start_processes`, but a rank stuck past the deadline is killed rather than waited on forever
    (a rank spinning in a collective never trips the gloo timeout)."""
    context = mp.start_processes(fn, args=args, nprocs=WORLD, start_method="spawn", join=False)
    end = time.monotonic() + deadline_s
    try:
        while not context.join(timeout=5):
            if time.monotonic() > end:
                raise TimeoutError(f"ddp benchmark ranks still running after {deadline_s:.0f} s")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()


def run(ctx: Context) -> SuiteResult:
    rounds = ctx.pick(5, 3, 1)
    steps = ctx.pick(10, 5, 1)
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        out = Path(tmp) / "ddp.json"
        _spawn_with_deadline(_worker, (free_port(), rounds, steps, str(out)), ctx.pick(1800, 900, 300))
        data = json.loads(out.read_text())
    step_s = {k: statistics.median(v) for k, v in data["times"].items()}
    thr = {k: (1 if k == "1_rank" else WORLD) * BATCH / v for k, v in step_s.items()}
    result = SuiteResult("ddp")
    for k in thr:
        result.rows.append({"variant": k, "step_s": step_s[k], "samples/s": thr[k],
                            "efficiency": thr[k] / (thr["1_rank"] * (1 if k == "1_rank" else WORLD)),
                            "vs_ddp": thr[k] / thr["ddp_2_ranks"]})
    result.targets = [Target("DDP weak-scaling efficiency, 2 gloo ranks", thr["ddp_2_ranks"] / (WORLD * thr["1_rank"]), 0.9)]
    result.details = {"world_size": data["world_size"], "threads_per_rank": data["threads"],
                      "params_identical_across_ranks": data["params_identical"], "batch_per_rank": BATCH,
                      "zero2_collectives": "deepspeed shm" if data["deepspeed_shm_comm"] else "gloo",
                      "rounds": rounds, "steps_per_round": steps, "model": "TINY overrides, phase2",
                      "samples_step_s": data["times"],
                      "profile_top_ops_ddp_rank0": data["profile_ddp_rank0"],
                      "note": "2_ranks_no_comm isolates the cost of sharing the cores from the cost of gradient "
                              "communication"}
    return result
