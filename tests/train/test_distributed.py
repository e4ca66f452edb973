"""Real two-process training on CPU (gloo): DDP through accelerate launch, ZeRO-2/3 through DeepSpeed."""

import json
import os
import shutil
from pathlib import Path

import killable
import pytest

from _train_support import DEMO, REPO, cli_env, tiny_overrides

WORKER = Path(__file__).with_name("_worker.py")
BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"


def _accelerate() -> str:
    return shutil.which("accelerate", path=str(BIN)) or shutil.which("accelerate")


def _torchrun() -> str:
    return shutil.which("torchrun", path=str(BIN)) or shutil.which("torchrun")


def _launch(launcher: list[str], out: Path, args: list[str], env: dict) -> list[dict]:
    res = killable.run([*launcher, str(WORKER), str(out), "none", "0", str(DEMO), *args], cwd=REPO, env=env,
                       timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "Grad strides do not match" not in res.stderr  # gradients keep their parameters' layout
    if "run.backend=deepspeed" not in args:
        assert "Setting accelerator to CPU" not in res.stdout + res.stderr  # DeepSpeed is never imported
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _assert_two_ranks_agree(ranks: list[dict], run_dir: Path, steps: int) -> None:
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["step"] for r in ranks] == [steps, steps]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # identical parameters on both ranks
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["world_size"] for r in lines if r["type"] == "train"} == {2}


@pytest.mark.distributed
@pytest.mark.parametrize("grad_allreduce,hooks", [("fp32", []), ("fp16", ["fp16_compress_hook"])])
def test_ddp_two_ranks_via_accelerate_launch(tiny_shards, tmp_path, grad_allreduce, hooks):
    env = {**cli_env(), "ACCELERATE_USE_CPU": "1"}
    launcher = [_accelerate(), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    args = tiny_overrides(tiny_shards, tmp_path, "schedule.max_steps=3", f"run.grad_allreduce={grad_allreduce}",
                          "run.precision=auto")
    ranks = _launch(launcher, tmp_path / "out", args, env)
    _assert_two_ranks_agree(ranks, tmp_path / "t", 3)
    assert [r["ddp_comm_hooks"] for r in ranks] == [hooks, hooks]
    # --mixed_precision no is honoured over run.precision=auto, and the start-up line says how it trained
    info = json.loads((tmp_path / "t" / "run.json").read_text())
    assert info["precision"] == "fp32" and info["precision_source"] == "accelerate launch --mixed_precision no"
    assert info["world_size"] == 2 and info["backend"] == "ddp/gloo" and info["compile"] is False
    assert info["device"].startswith("cpu") and info["attention"] in ("sdpa", "explicit")
    assert {"mtlxray_version", "torch_version", "git_commit", "config_hash"} <= info.keys()
    header = (tmp_path / "t" / "config.yaml").read_text().splitlines()[0]
    assert header.startswith("# device cpu") and "precision fp32 (accelerate launch --mixed_precision no)" in header
    assert "world size 2, backend ddp/gloo" in header


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_ranks_and_exact_state_round_trip(tiny_shards, tmp_path, stage):
    # ZeRO-2 under torchrun, ZeRO-3 under accelerate launch with the shipped accelerate config.
    launcher = [_torchrun(), "--standalone", "--nproc_per_node", "2"] if stage == 2 else [
        _accelerate(), "launch", "--config_file", str(REPO / "configs" / "accelerate" / "zero3.yaml"),
        "--num_processes", "2", "--main_process_port", "0"]
    args = tiny_overrides(tiny_shards, tmp_path, "schedule.max_steps=3", "run.backend=deepspeed",
                          f"run.deepspeed_config={REPO}/configs/deepspeed/zero{stage}.json", "run.precision=bf16")
    trained = _launch(launcher, tmp_path / "trained", args, cli_env())
    _assert_two_ranks_agree(trained, tmp_path / "t", 3)
    assert not any(r["deepspeed_shm_comm"] for r in trained)  # collectives stay on gloo
    # A second launch loads the saved state (load_state) and must see exactly the same parameters.
    reloaded = _launch(launcher, tmp_path / "reloaded", args, cli_env())
    assert [r["digest"] for r in reloaded] == [r["digest"] for r in trained]
