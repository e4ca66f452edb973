"""Real servers on the loopback address for the remote-shard tests: nginx (Debian package), moto's
standalone S3 server (PyPI `moto[server]`) and the fault-injecting proxy in faultproxy.py.

Where a server cannot run here (nginx missing and no root/apt-get to install it, moto missing),
the tests are skipped with the reason; under CI=true they fail instead, as the Slurm tests do.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtlxray.io import free_port

HERE = Path(__file__).resolve().parent


def unavailable(what: str, reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} unavailable under CI: {reason}", pytrace=False)
    pytest.skip(f"{what} unavailable: {reason}")


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise RuntimeError(f"{what} exited with {proc.returncode}: {out[-2000:]}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def start_server(cmd: list[str], port: int, what: str, timeout: float = 30.0) -> subprocess.Popen:
    """`cmd` started and listening on `port`; a server that cannot start is `unavailable`."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc, what, timeout=timeout)
    except RuntimeError as e:
        stop(proc)
        unavailable(what, str(e))
    return proc


# ---------------------------------------------------------------------------------------------
# nginx


def _nginx_binary() -> str | None:
    return shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def ensure_nginx() -> str:
    """The nginx binary, installing Debian's package first where it is missing and we are root.
    The package's init script would start the distro's own nginx on port 80: a policy-rc.d that
    exits 101 forbids that while installing (ours only where none exists)."""
    found = _nginx_binary()
    if found:
        return found
    if os.geteuid() != 0:
        unavailable("nginx", "not installed, and not root to apt-get install it")
    if shutil.which("apt-get") is None:
        unavailable("nginx", "not installed, and no apt-get to install it")
    policy = Path("/usr/sbin/policy-rc.d")
    own = not policy.exists()
    if own:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "nginx"]):
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
            if res.returncode != 0:
                unavailable("nginx", f"{' '.join(cmd)} failed ({res.returncode}): {(res.stderr or res.stdout)[-500:]}")
    finally:
        if own:
            policy.unlink(missing_ok=True)
    found = _nginx_binary()
    if not found:
        unavailable("nginx", "apt-get install nginx left no nginx binary")
    return found


class Nginx:
    """nginx serving `root` on 127.0.0.1:port, one process in the foreground, files under `work`."""

    def __init__(self, root: Path, work: Path) -> None:
        self.binary = ensure_nginx()
        self.root, self.work = Path(root), Path(work)
        self.port = free_port()
        self.work.mkdir(parents=True, exist_ok=True)
        for d in ("logs", "tmp"):
            (self.work / d).mkdir(exist_ok=True)
        conf = self.work / "nginx.conf"
        conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {self.work}/nginx.pid;
error_log {self.work}/logs/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {self.work}/tmp/body;
    proxy_temp_path {self.work}/tmp/proxy;
    fastcgi_temp_path {self.work}/tmp/fastcgi;
    uwsgi_temp_path {self.work}/tmp/uwsgi;
    scgi_temp_path {self.work}/tmp/scgi;
    types {{ application/json json; application/x-tar tar; }}
    default_type application/octet-stream;
    sendfile on;
    server {{
        listen 127.0.0.1:{self.port};
        root {self.root};
    }}
}}
""")
        self.proc = start_server([self.binary, "-c", str(conf), "-p", str(self.work)], self.port, "nginx")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        stop(self.proc)


# ---------------------------------------------------------------------------------------------
# moto's standalone S3 server


class MotoS3:
    """moto_server on 127.0.0.1:port (a real HTTP server speaking the S3 API, in its own process)."""

    ACCESS, SECRET = "mtlxray-test-key", "mtlxray-test-secret"

    def __init__(self) -> None:
        try:
            import boto3  # noqa: F401
            import moto.server  # noqa: F401
        except ImportError as e:
            unavailable("moto S3 server", f"{e} (pip install 'moto[server]' boto3; in the dev extra)")
        self.port = free_port()
        self.proc = start_server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                 self.port, "moto S3 server", timeout=60)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.ACCESS,
                            aws_secret_access_key=self.SECRET, region_name="us-east-1")

    def upload_folder(self, folder: Path, bucket: str, prefix: str) -> str:
        """Upload every file of `folder` under s3://bucket/prefix/; returns that URL."""
        s3 = self.client()
        s3.create_bucket(Bucket=bucket)
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
        return f"s3://{bucket}/{prefix}"

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """The standard variables a user sets (to point at the proxy, pass its URL as endpoint)."""
        return {"AWS_ACCESS_KEY_ID": self.ACCESS, "AWS_SECRET_ACCESS_KEY": self.SECRET,
                "AWS_ENDPOINT_URL_S3": endpoint or self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def close(self) -> None:
        stop(self.proc)


# ---------------------------------------------------------------------------------------------
# The fault-injecting proxy


class FaultProxy:
    """faultproxy.py in its own process between the loader and `upstream` (host:port)."""

    def __init__(self, upstream_port: int, stats: Path, **faults) -> None:
        self.port = free_port()
        self.stats = Path(stats)
        args = [sys.executable, str(HERE / "faultproxy.py"), "--listen", str(self.port),
                "--upstream", f"127.0.0.1:{upstream_port}", "--stats", str(self.stats)]
        for k, v in faults.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc, "faultproxy")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def counts(self) -> dict[str, int]:
        import json

        return json.loads(self.stats.read_text()) if self.stats.is_file() else {}

    def close(self) -> None:
        stop(self.proc)

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
