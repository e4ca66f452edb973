"""Shards streamed from real servers on the loopback address: nginx over HTTP, moto's S3 server, and
a fault-injecting proxy in front of them. The loader either yields exactly the local samples or
fails in one line naming the URL; it never yields a truncated sample."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mtlxray.config import DataConfig
from mtlxray.data.loader import build_eval_loader, build_train_loader, train_batches_per_epoch
from mtlxray.data.manifest import read_manifest
from mtlxray.data.remote import RetryPolicy, fetch_bytes, normalise_root
from mtlxray.errors import ShardError
from servers import FaultProxy, MotoS3, Nginx

SPLITS = [("lung", "train"), ("lung", "val"), ("infection", "test")]


def _cfg(shards, **kw) -> DataConfig:
    kw.setdefault("workers", 0)
    kw.setdefault("shuffle_buffer", 8)
    kw.setdefault("remote_backoff_s", 0.01)
    kw.setdefault("remote_timeout_s", 5.0)
    return DataConfig(shards=str(shards), batch_size=kw.pop("batch_size", 4), **kw)


def _eval_samples(cfg: DataConfig, splits=SPLITS, world_size: int = 1) -> dict:
    out = {}
    for subset, split in splits:
        for rank in range(world_size):
            for b in build_eval_loader(cfg, subset=subset, split=split, rank=rank, world_size=world_size,
                                       batch_size=3):
                for i, key in enumerate(b["key"]):
                    out[key] = (b["img"][i].numpy().tobytes(), b["lung"][i].numpy().tobytes(),
                                b["inf"][i].numpy().tobytes(), int(b["label"][i]), json.dumps(b["boxes"][i]))
    return out


def _train_keys(cfg: DataConfig) -> list:
    return [(b["key"], b["img"].numpy().tobytes()) for b in build_train_loader(cfg, seed=2, epoch=1, rank=0, world_size=1)]


@pytest.fixture(scope="module")
def local(tiny_shards):
    return _eval_samples(_cfg(tiny_shards))


@pytest.fixture(scope="module")
def nginx(tiny_shards, tmp_path_factory):
    server = Nginx(tiny_shards, tmp_path_factory.mktemp("nginx"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def moto(tiny_shards):
    server = MotoS3()
    server.upload_folder(tiny_shards, "xray", "sets/tiny")
    yield server
    server.close()


@pytest.fixture
def s3_env(moto, monkeypatch):
    for k, v in moto.env().items():
        monkeypatch.setenv(k, v)
    return moto


def test_http_shards_read_exactly_as_local_ones(nginx, tiny_shards, local):
    cfg = _cfg(nginx.url)
    assert read_manifest(nginx.url) == read_manifest(tiny_shards)
    assert _eval_samples(cfg) == local
    assert _eval_samples(cfg, world_size=2) == local  # ranks' pieces start mid-shard
    assert _train_keys(cfg) == _train_keys(_cfg(tiny_shards))
    assert train_batches_per_epoch(cfg, 1) == train_batches_per_epoch(_cfg(tiny_shards), 1)


def test_a_url_passed_through_pathlib_still_works(nginx, tiny_shards):
    from pathlib import Path

    assert normalise_root(Path(nginx.url + "/")) == nginx.url
    assert read_manifest(Path(nginx.url)) == read_manifest(tiny_shards)


def test_s3_shards_read_exactly_as_local_ones(s3_env, tiny_shards, local):
    cfg = _cfg("s3://xray/sets/tiny", workers=1)
    assert _eval_samples(cfg) == local
    assert _train_keys(cfg) == _train_keys(_cfg(tiny_shards, workers=1))


def test_s3_credentials_come_from_the_environment_only(s3_env, monkeypatch, tmp_path):
    from mtlxray.data import remote

    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = FROM-A-FILE\naws_secret_access_key = file-secret\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    signer = remote._s3_client(5.0)._request_signer
    assert signer._credentials.access_key == MotoS3.ACCESS  # the environment's keys sign
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert remote._s3_client(5.0)._request_signer._credentials is None  # unsigned; the file is never read
    # The bucket is private: unsigned, the request is refused at once (moto accepts any signed one).
    with pytest.raises(ShardError, match=r"^s3://xray/sets/tiny/manifest\.json: S3 403"):
        read_manifest("s3://xray/sets/tiny", RetryPolicy(retries=5, backoff_s=10))


def test_flaky_http_recovers_with_identical_samples(nginx, local, tmp_path):
    with FaultProxy(nginx.port, tmp_path / "stats.json", drop=0.35, error=0.2, slow=0.05, slow_s=1.5,
                     max_cut=40_000, seed=3) as proxy:
        cfg = _cfg(proxy.url, remote_retries=12, remote_timeout_s=0.5)
        assert _eval_samples(cfg) == local
        counts = proxy.counts()
    assert counts["drop"] >= 3 and counts["error"] >= 2 and counts["slow"] >= 1, counts


def test_flaky_s3_recovers_with_identical_samples(moto, local, tmp_path, monkeypatch):
    with FaultProxy(moto.port, tmp_path / "stats.json", drop=0.35, error=0.2, max_cut=40_000, seed=5) as proxy:
        for k, v in moto.env(proxy.url).items():
            monkeypatch.setenv(k, v)
        assert _eval_samples(_cfg("s3://xray/sets/tiny", remote_retries=12)) == local
        counts = proxy.counts()
    assert counts["drop"] >= 3 and counts["error"] >= 2, counts


def _collect_until_error(cfg: DataConfig, local: dict) -> tuple[list, ShardError]:
    seen = []
    with pytest.raises(ShardError) as err:
        for b in build_eval_loader(cfg, subset="lung", split="train", rank=0, world_size=1, batch_size=1):
            got = (b["img"][0].numpy().tobytes(), b["lung"][0].numpy().tobytes(), b["inf"][0].numpy().tobytes(),
                   int(b["label"][0]), json.dumps(b["boxes"][0]))
            assert got == local[b["key"][0]]  # every sample yielded is whole and right
            seen.append(b["key"][0])
    return seen, err.value


def test_a_server_that_keeps_failing_gives_one_line_naming_the_url(nginx, local, tmp_path):
    shard = "/lung/train-000001.tar"
    # Cut inside the body (after the headers): without retries the read fails there, and the
    # samples of the shard that came whole before the cut are the only ones yielded.
    with FaultProxy(nginx.port, tmp_path / "s1.json", drop=1.0, min_cut=6_000, max_cut=40_000, only=shard) as proxy:
        seen, err = _collect_until_error(_cfg(proxy.url, remote_retries=0), local)
    assert "\n" not in str(err) and str(err).startswith(f"{proxy.url}{shard}: connection closed early at byte ")
    assert "gave up after 1 attempt" in str(err)
    assert seen  # shard 000000 came through before 000001 failed

    # Cut inside the headers, every time: no progress, so the retries run out.
    with FaultProxy(nginx.port, tmp_path / "s2.json", drop=1.0, max_cut=60, only=shard) as proxy:
        seen, err = _collect_until_error(_cfg(proxy.url, remote_retries=2), local)
    assert "\n" not in str(err) and str(err).startswith(f"{proxy.url}{shard}: ")
    assert "gave up after 3 attempt" in str(err)

    with FaultProxy(nginx.port, tmp_path / "s3.json", error=1.0, status=502) as proxy:
        with pytest.raises(ShardError, match=r"manifest\.json: HTTP 502 .*gave up after 2 attempt"):
            read_manifest(proxy.url, RetryPolicy(retries=1, backoff_s=0.01))


def test_missing_objects_fail_at_once_without_retrying(nginx, tmp_path, tiny_shards):
    with pytest.raises(ShardError, match=r"/nothing-here/manifest\.json: shard manifest not found"):
        read_manifest(nginx.url + "/nothing-here", RetryPolicy(retries=50, backoff_s=10))
    with pytest.raises(ShardError, match="HTTP 404"):
        fetch_bytes(nginx.url + "/lung/none.tar", RetryPolicy(retries=50, backoff_s=10))


def test_a_remote_shard_of_another_size_than_the_manifest_is_refused(tiny_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)
    shard = copy / "lung" / "val-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-1024])  # the end-of-archive blocks gone: reads as complete
    server = Nginx(copy, tmp_path / "nginx")
    try:
        with pytest.raises(ShardError, match=r"val-000000\.tar: \d+ bytes, but the manifest says \d+"):
            _eval_samples(_cfg(server.url), splits=[("lung", "val")])
    finally:
        server.close()


def test_training_skips_a_failing_shard_only_when_allowed_and_counts_it(nginx, tiny_shards, tmp_path):
    proxy = FaultProxy(nginx.port, tmp_path / "stats.json", error=1.0, only="/lung/train-000002", seed=0)
    try:
        cfg = _cfg(proxy.url, remote_retries=1, skip_failed_shards=True, batch_size=2)
        loader = build_train_loader(cfg, seed=0, epoch=0, rank=0, world_size=1)
        batches = list(loader)
        assert len(batches) == len(loader) == train_batches_per_epoch(cfg, 1)
        assert not any("train_" not in k for b in batches for k in b["key"])
        assert all("__skipped__" not in b for b in batches)
        assert loader.skipped_shards and all(url == f"{proxy.url}/lung/train-000002.tar"
                                             for url, _ in loader.skipped_shards)
        assert "HTTP 503" in loader.skipped_shards[0][1]

        # With loader workers the skips travel with the batches to the main process.
        loader = build_train_loader(_cfg(proxy.url, remote_retries=0, skip_failed_shards=True, batch_size=2,
                                         workers=2), seed=0, epoch=0, rank=0, world_size=1)
        assert len(list(loader)) == len(loader) and loader.skipped_shards

        with pytest.raises(ShardError, match=r"lung/train-000002\.tar: HTTP 503"):
            list(build_train_loader(_cfg(proxy.url, remote_retries=1, batch_size=2), seed=0, epoch=0, rank=0,
                                    world_size=1))
        # Evaluation never skips, whatever the config says.
        with pytest.raises(ShardError, match=r"lung/train-000002\.tar: HTTP 503"):
            _eval_samples(cfg, splits=[("lung", "train")])
    finally:
        proxy.close()


def test_cli_info_reads_a_remote_manifest(nginx, tmp_path):
    res = subprocess.run([sys.executable, "-m", "mtlxray.cli", "shards", "info", nginx.url, "--json"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["lung"]["train"] == {"Normal": 6, "Non-COVID": 6, "COVID-19": 6}


def test_remote_verify_streams_each_shard_through_sha256(nginx):
    urls = build_train_loader(_cfg(nginx.url, verify=True), seed=0, epoch=0, rank=0, world_size=1)
    assert len(urls) > 0
    assert np.all([len(b["key"]) == 4 for b in urls])
