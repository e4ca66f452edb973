"""Fixtures for the launch tests: a real two-node Slurm cluster (tests/slurm/cluster.sh) and tiny shards.

The cluster is started once per session and stopped at the end (jobs cancelled first). Where the
machine cannot run it (not root, no apt-get), `slurm` tests are skipped with the reason; under
CI=true a cluster that fails to start fails them instead.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from _launch_support import TINY_RUN

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SH = ROOT / "tests" / "slurm" / "cluster.sh"
VENV_BIN = Path(sys.executable).parent
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE"}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _cannot_run() -> str | None:
    """Why this machine cannot host the cluster, or None."""
    if os.geteuid() != 0:
        return "not root: the local Slurm cluster needs root"
    if shutil.which("slurmctld", path=os.environ.get("PATH", "") + ":/usr/sbin") is None \
            and shutil.which("apt-get") is None:
        return "no Slurm packages and no apt-get to install them"
    return None


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"local Slurm cluster unavailable under CI: {reason}", pytrace=False)
    pytest.skip(f"local Slurm cluster unavailable: {reason}")


@dataclass
class SlurmCluster:
    """A running local cluster; commands run with its SLURM_CONF and the project's venv on PATH."""

    dir: Path
    env: dict[str, str]

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True,
                              check=check, timeout=timeout, cwd=kw.pop("cwd", ROOT), **kw)

    def sacct(self, job_id: str) -> dict[str, str]:
        """The allocation line of a job: State, Start, End, ExitCode, Restarts."""
        out = self.run("sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State,Start,End,ExitCode").stdout
        for line in out.splitlines():
            jid, state, start, end, code = line.split("|")
            if jid == job_id:
                return {"State": state.split()[0], "Start": start, "End": end, "ExitCode": code}
        return {}

    def job_field(self, job_id: str, name: str) -> str | None:
        """A field of `scontrol show job` (None once the controller has forgotten the job)."""
        res = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        m = re.search(rf"\b{name}=(\S+)", res.stdout)
        return m.group(1) if m else None

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> str:
        """Poll the controller until the job is in one of `states`; returns it."""
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in states:
                return state
            time.sleep(0.5)
        log = self.run("scontrol", "show", "job", job_id, check=False).stdout
        raise AssertionError(f"job {job_id} still {state} after {timeout:.0f}s, wanted {sorted(states)}\n{log}")

    def wait_done(self, job_id: str, timeout: float) -> str:
        return self.wait_state(job_id, TERMINAL, timeout)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> SlurmCluster:
    reason = _cannot_run()
    if reason:
        _unavailable(reason)
    cdir = tmp_path_factory.mktemp("slurm")
    ctld, dbd, node1, node2, db = _free_ports(5)
    env = {
        **os.environ,
        "MTLX_SLURMCTLD_PORT": str(ctld), "MTLX_SLURMDBD_PORT": str(dbd),
        "MTLX_SLURMD_PORTS": f"{node1},{node2}", "MTLX_MARIADB_PORT": str(db),
    }
    try:
        subprocess.run(["bash", str(CLUSTER_SH), "start", str(cdir)], env=env, capture_output=True,
                       text=True, check=True, timeout=600, stdin=subprocess.DEVNULL)
    except subprocess.CalledProcessError as e:
        subprocess.run(["bash", str(CLUSTER_SH), "stop", str(cdir)], env=env, capture_output=True, timeout=120)
        _unavailable(f"cluster.sh start failed (exit {e.returncode}): {(e.stderr or e.stdout).strip()[-500:]}")
    except subprocess.TimeoutExpired:
        subprocess.run(["bash", str(CLUSTER_SH), "stop", str(cdir)], env=env, capture_output=True, timeout=120)
        _unavailable("cluster.sh start timed out")
    # Jobs inherit the submitting environment (sbatch --export=ALL): the venv and the cluster.
    job_env = {
        **os.environ,
        "SLURM_CONF": str(cdir / "etc" / "slurm.conf"),
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        "MTLX_VENV": str(VENV_BIN.parent),
        "MTLXRAY_PG_TIMEOUT_S": "120",
    }
    cluster = SlurmCluster(cdir, job_env)
    try:
        yield cluster
    finally:
        cluster.run("scancel", "--user=root", check=False)
        subprocess.run(["bash", str(CLUSTER_SH), "stop", str(cdir)], env=env, capture_output=True, timeout=180)


@pytest.fixture
def slurm_env(slurm_cluster, monkeypatch) -> SlurmCluster:
    """The cluster, with this process's environment pointed at it (for in-process submitit)."""
    for key in ("SLURM_CONF", "PATH", "MTLX_VENV", "MTLXRAY_PG_TIMEOUT_S"):
        monkeypatch.setenv(key, slurm_cluster.env[key])
    return slurm_cluster


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Tiny synthetic shards (raw encoding, 128² like configs/demo.yaml), built once."""
    from tiny_data import make_tiny_shards

    return make_tiny_shards(tmp_path_factory.mktemp("tiny"), format="raw", image_size=128)


def _demo_overrides(shards: Path, out: Path, steps: int) -> list[str]:
    """TINY_RUN on `shards`, `steps` steps, writing under `out`."""
    return [*TINY_RUN, f"data.shards={shards}", f"run.output_dir={out}", f"schedule.max_steps={steps}"]


@pytest.fixture
def demo_overrides(tiny_shards):
    """`demo_overrides(out, steps)`: tiny-shard overrides for configs/demo*.yaml writing under `out`."""
    return lambda out, steps: _demo_overrides(tiny_shards, out, steps)


@pytest.fixture
def third_phase(tmp_path) -> Path:
    """A third tiny phase: configs/demo_phase2.yaml again, as its own run (`phase3`)."""
    path = tmp_path / "demo_phase3.yaml"
    path.write_text(f"extends: {ROOT / 'configs' / 'demo_phase2.yaml'}\nrun:\n  name: phase3\n")
    return path
