"""`checkpointing`: activation memory and step time with gradient checkpointing off, per attention,
per block and selective (ours), and MONAI's `use_checkpoint` on its Swin-T encoder, side by side.

Each configuration lives in its own worker process, so one's freed memory never hides another's
peak (smoke runs, which only prove the suite works, host every configuration in one worker).
Activation memory = peak RSS during one training step minus RSS just before it (the kernel's
high-water mark is reset through /proc/self/clear_refs). The parent steps the workers in turn,
round after round, so machine noise hits every configuration alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mtlxray.bench.common import Context, SuiteResult, SuiteUnavailable, Target
from mtlxray.resources import proc_status_kib

CONFIGS = {
    "ours_none": ["model.grad_checkpoint=none"],
    "ours_attention": ["model.grad_checkpoint=attention"],
    "ours_block": ["model.grad_checkpoint=block"],
    "ours_selective": ["model.grad_checkpoint=selective"],
    "monai_off": [],
    "monai_on": [],
}


def _worker(names: list[str], batch: int, size: int, smoke: bool) -> None:
    """Build each named configuration, then serve `mem NAME`, `time NAME` and `quit` on stdin;
    answer one JSON line each."""
    import gc

    import torch

    from mtlxray.bench.workloads import TINY, monai_swin_t, ours, train_step

    steps = {}
    for name in names:
        torch.manual_seed(0)
        if name.startswith("monai"):
            model = monai_swin_t(use_checkpoint=name == "monai_on", tiny=smoke)
        else:
            model = ours(CONFIGS[name] + (TINY if smoke else []))
        model.train()
        steps[name] = train_step(model, torch.randn(batch, 1, size, size))
        steps[name]()  # warm-up: one-time allocations are not activations
    print(json.dumps({"ready": names}), flush=True)
    for line in sys.stdin:
        cmd, _, name = line.strip().partition(" ")
        if cmd == "mem":
            gc.collect()
            before = proc_status_kib("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            t0 = time.perf_counter()
            steps[name]()
            reply = {"act_mib": (proc_status_kib("VmHWM") - before) / 1024, "rss_before_mib": before / 1024,
                     "s": time.perf_counter() - t0}
        elif cmd == "time":
            t0 = time.perf_counter()
            steps[name]()
            reply = {"s": time.perf_counter() - t0}
        else:
            return
        print(json.dumps(reply), flush=True)


class _Worker:
    def __init__(self, names: list[str], batch: int, size: int, smoke: bool, for_memory: bool):
        # For memory, a fixed mmap threshold makes glibc return every large freed block to the
        # kernel, so RSS before a step holds no cached activations from the previous one. That
        # makes every allocation a fresh mapping, which would tax the configurations that allocate
        # more (the recomputing ones) in time, so step time is measured by separate workers with
        # the allocator's defaults.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if for_memory else dict(os.environ)
        cmd = [sys.executable, "-m", "mtlxray.bench.recompute", "--worker", ",".join(names),
               "--batch", str(batch), "--size", str(size)] + (["--smoke"] if smoke else [])
        self.names = names
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def wait_ready(self) -> None:
        reply = self._read()
        if "ready" not in reply:
            raise SuiteUnavailable(f"checkpointing worker {self.names}: {reply.get('error', reply)}")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"checkpointing worker {self.names} exited with {self.proc.wait()}")
        return json.loads(line)

    def ask(self, cmd: str, name: str) -> dict:
        self.proc.stdin.write(f"{cmd} {name}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def _interleaved(names: list[str], batch: int, size: int, smoke: bool, rounds: dict[str, int]) -> dict[str, dict]:
    """`mem` and `time` samples per configuration, asked in turn, round after round (the order
    rotating), so machine noise hits every configuration alike. Memory and time each get their own
    workers, one per configuration; a smoke run asks one worker holding everything."""
    key = {"mem": "act_mib", "time": "s"}
    samples: dict[str, dict] = {cmd: {n: [] for n in names} for cmd in rounds}
    # smoke: one worker, memory rounds only, their step times standing in for the time samples
    plans = [(["mem"], [names], True)] if smoke else [([cmd], [[n] for n in names], cmd == "mem") for cmd in rounds]
    for cmds, groups, for_memory in plans:
        workers = [_Worker(g, batch, size, smoke, for_memory) for g in groups]
        owner = {n: w for w in workers for n in w.names}
        try:
            for w in workers:
                w.wait_ready()
            for cmd in cmds:
                for r in range(rounds[cmd]):
                    for n in names[r % len(names):] + names[: r % len(names)]:
                        reply = owner[n].ask(cmd, n)
                        samples[cmd][n].append(reply[key[cmd]])
                        if smoke and "time" in samples:
                            samples["time"][n].append(reply["s"])
        finally:
            for w in workers:
                w.close()
    return samples


def _recommend(rows: dict[str, dict]) -> str:
    """Most memory saved among settings within +25% step time; else the cheapest in time."""
    cands = [n for n in ("ours_attention", "ours_block", "ours_selective") if n in rows]
    ok = [n for n in cands if rows[n]["time_overhead"] <= 0.25 and rows[n]["mem_saving"] is not None]
    if ok:
        return max(ok, key=lambda n: rows[n]["mem_saving"])
    return min(cands, key=lambda n: rows[n]["time_overhead"])


def run(ctx: Context) -> SuiteResult:
    batch = ctx.pick(8, 2, 2)
    size = ctx.pick(256, 256, 64)
    rounds = ctx.pick(3, 1, 1)  # activation memory repeats to the MiB; step time gets more rounds
    names = list(CONFIGS)
    samples = _interleaved(names, batch, size, ctx.smoke, {"mem": rounds, "time": ctx.pick(5, 3, 1)})
    mem, times = samples["mem"], samples["time"]

    rows: dict[str, dict] = {}
    for n in names:
        base = "ours_none" if n.startswith("ours") else "monai_off"
        act, t = statistics.median(mem[n]), statistics.median(times[n])
        act0, t0 = statistics.median(mem[base]), statistics.median(times[base])
        rows[n] = {"config": n, "batch": batch, "act_mib": act, "step_s": t,
                   "mem_saving": 1 - act / act0 if act0 > 0 else None, "time_overhead": t / t0 - 1}
    result = SuiteResult("checkpointing", rows=list(rows.values()))
    result.details = {"rounds": rounds, "img_size": size, "samples_act_mib": mem, "samples_step_s": times}
    rec = _recommend(rows)
    result.details["recommended"] = rec
    result.targets = [
        Target(f"{rec}: activation memory saved", rows[rec]["mem_saving"], 0.5),
        Target(f"{rec}: step time overhead", rows[rec]["time_overhead"], 0.25, kind="max"),
    ]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="checkpointing benchmark worker (internal)")
    p.add_argument("--worker", required=True, help="comma-separated configurations: " + ",".join(CONFIGS))
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    try:
        _worker(a.worker.split(","), a.batch, a.size, a.smoke)
    except SuiteUnavailable as e:
        print(json.dumps({"error": str(e)}), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
