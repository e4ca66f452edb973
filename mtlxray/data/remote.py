"""Shards on HTTP(S) and S3-compatible storage: streamed with resumable reads, retries and backoff.

`data.shards` may be a URL prefix instead of a folder:

    https://host/path/to/shards          (manifest at https://host/path/to/shards/manifest.json)
    s3://bucket/path/to/shards           (manifest at s3://bucket/path/to/shards/manifest.json)

A shard is read as a stream, never stored whole: `open_stream` returns a file-like object whose
`read(n)` hides faults. When a connection drops, times out or a server answers 5xx/408/429, the
stream waits (`backoff_s · 2^k`, capped at `max_backoff_s`) and asks again from the byte where it
stopped (an HTTP `Range` request), checking that the object's total size and ETag did not change,
so the bytes handed out are exactly the object's bytes. After `retries` failed attempts in a row
without progress it raises `ShardError`, one line naming the URL. Other 4xx answers fail at once.

Credentials come only from the standard environment variables, never from mtlxray's config files,
and are never logged:

- S3: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, optional `AWS_SESSION_TOKEN`; endpoint
  `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` (MinIO, Ceph, moto, ...); region `AWS_REGION` or
  `AWS_DEFAULT_REGION`. Without keys, requests are unsigned (public buckets). Needs boto3
  (`pip install 'mtlxray[s3]'`); boto3's own credential chain (files, instance metadata) is not used.
- HTTP(S): anonymous; urllib honours `https_proxy`/`http_proxy`/`no_proxy`.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import random
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Optional

from mtlxray.errors import ShardError, error_line

__all__ = ["RetryPolicy", "is_remote", "normalise_root", "join", "fetch_bytes", "open_stream", "sha256_url"]

log = logging.getLogger(__name__)

_SCHEMES = ("http://", "https://", "s3://")
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RetryPolicy:
    """How hard a remote read tries before it fails (see `data.remote_*`)."""

    retries: int = 5
    """Failed attempts in a row (without a byte of progress) before giving up; 0: no retry."""
    backoff_s: float = 0.5
    """Wait before the first retry; doubled each time, capped at `max_backoff_s`, with ±25% jitter."""
    max_backoff_s: float = 30.0
    timeout_s: float = 30.0
    """Socket timeout of each connect and read: a server slower than this counts as a failure."""

    def delay(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.backoff_s * 2 ** max(0, attempt - 1))
        return base * random.uniform(0.75, 1.25)

    @classmethod
    def from_config(cls, cfg) -> "RetryPolicy":
        """From a `DataConfig` (its `remote_retries`, `remote_backoff_s`, `remote_timeout_s`)."""
        return cls(retries=cfg.remote_retries, backoff_s=cfg.remote_backoff_s, timeout_s=cfg.remote_timeout_s)


def is_remote(url: object) -> bool:
    return isinstance(url, str) and url.startswith(_SCHEMES)


def normalise_root(root: object) -> str:
    """A shard root as a string. `Path("https://h/x")` collapses the `//` to `https:/h/x`; undo that,
    so callers may pass a URL through `Path` unharmed."""
    text = str(root)
    m = re.match(r"^(https?|s3):/(?!/)", text)
    return f"{m.group(1)}://{text[m.end():]}" if m else text


def join(root: str, rel: str) -> str:
    return normalise_root(root).rstrip("/") + "/" + rel


class _Fatal(Exception):
    """A failure that retrying cannot fix (404, 403, a changed object)."""


class _Retryable(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Transports: open(url, offset) -> (body with read(n) and close(), total size, etag)


def _http_open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": "mtlxray", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code in _RETRY_STATUS:
            raise _Retryable(f"HTTP {e.code} {e.reason}") from None
        if e.code == 416 and offset:
            raise _Fatal(f"HTTP 416: the object is shorter than {offset} bytes (changed while read?)") from None
        raise _Fatal(f"HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise _Retryable(_describe(e)) from None
    status = resp.status
    etag = resp.headers.get("ETag")
    if status == 206:
        m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("Content-Range", ""))
        if not m or int(m.group(1)) != offset:
            resp.close()
            raise _Retryable(f"bad Content-Range {resp.headers.get('Content-Range')!r}")
        total = int(m.group(3)) if m.group(3) != "*" else None
    else:
        length = resp.headers.get("Content-Length")
        total = int(length) if length is not None else None
        if offset:  # the server ignored Range: skip what we already have
            _discard(resp, offset)
    return resp, total, etag


def _discard(body, n: int) -> None:
    while n > 0:
        got = body.read(min(n, _CHUNK))
        if not got:
            raise _Retryable("connection closed while skipping to the resume offset")
        n -= len(got)


_S3_CLIENTS: dict = {}


def _s3_client(timeout: float):
    """One boto3 client per process (clients do not survive fork), credentials from the env only."""
    env = os.environ
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3",
             "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")
    key = (os.getpid(), timeout, hashlib.sha256(repr([env.get(n) for n in names]).encode()).hexdigest())
    if key in _S3_CLIENTS:
        return _S3_CLIENTS[key]
    try:
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config
    except ImportError:
        raise _Fatal("s3:// shards need boto3: pip install 'mtlxray[s3]'") from None
    access, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    config = Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=timeout,
                    read_timeout=timeout, signature_version=None if access and secret else UNSIGNED)
    import botocore.session

    core = botocore.session.Session()
    resolver = core.get_component("credential_provider")
    for provider in list(resolver.providers):  # no files, no instance metadata: the env keys or nothing
        resolver.remove(provider.METHOD)
    signed = bool(access and secret)
    session = boto3.session.Session(aws_access_key_id=access if signed else None,
                                    aws_secret_access_key=secret if signed else None,
                                    aws_session_token=env.get("AWS_SESSION_TOKEN") if signed else None,
                                    region_name=region, botocore_session=core)
    client = session.client("s3", endpoint_url=endpoint, config=config)
    _S3_CLIENTS[key] = client
    return client


def _s3_split(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket or not key:
        raise _Fatal("not an s3://BUCKET/KEY URL")
    return bucket, key


def _s3_errors() -> tuple:
    try:
        import botocore.exceptions as be
        import urllib3.exceptions as ue
        return (be.BotoCoreError, ue.HTTPError, OSError, http.client.HTTPException)
    except ImportError:  # pragma: no cover - boto3 missing is reported by _s3_client
        return (OSError,)


def _s3_open(url: str, offset: int, timeout: float):
    bucket, key = _s3_split(url)
    client = _s3_client(timeout)
    from botocore.exceptions import ClientError

    kw = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        resp = client.get_object(Bucket=bucket, Key=key, **kw)
    except ClientError as e:
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = e.response.get("Error", {}).get("Code", "?")
        if code == str(status):
            code = http.client.responses.get(status, code)
        if status in _RETRY_STATUS:
            raise _Retryable(f"S3 {status} {code}") from None
        raise _Fatal(f"S3 {status} {code}") from None
    except _s3_errors() as e:
        raise _Retryable(_describe(e)) from None
    total = None
    m = re.match(r"bytes (\d+)-(\d+)/(\d+)", resp.get("ContentRange") or "")
    if m:
        total = int(m.group(3))
    elif not offset:
        total = resp.get("ContentLength")
    return _S3Body(resp["Body"]), total, resp.get("ETag")


class _S3Body:
    """A botocore StreamingBody whose errors read as the retryable kind."""

    def __init__(self, body) -> None:
        self.body = body

    def read(self, n: int) -> bytes:
        try:
            return self.body.read(n)
        except _s3_errors() as e:
            raise _Retryable(_describe(e)) from None

    def close(self) -> None:
        try:
            self.body.close()
        except Exception:  # noqa: BLE001 - closing a broken stream
            pass


def _transport(url: str) -> Callable:
    return _s3_open if url.startswith("s3://") else _http_open


def _describe(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        e = e.reason if isinstance(e.reason, BaseException) else e
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timed out"
    text = error_line(e, default="")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ---------------------------------------------------------------------------------------------


class RemoteStream:
    """A read-only byte stream over one remote object that resumes after faults (see module doc)."""

    def __init__(self, url: str, policy: RetryPolicy, expected_size: Optional[int] = None) -> None:
        self.url, self.policy, self.expected = url, policy, expected_size
        self.pos = 0
        self.total: Optional[int] = None
        self.etag: Optional[str] = None
        self.body = None
        self.reconnects = 0
        self._buf, self._off = b"", 0
        self._open = _transport(url)

    def _fail(self, reason: str) -> ShardError:
        return ShardError(f"{self.url}: {reason}")

    def _connect(self) -> None:
        attempt, started = 0, time.monotonic()
        while True:
            try:
                body, total, etag = self._open(self.url, self.pos, self.policy.timeout_s)
            except _Fatal as e:
                raise self._fail(str(e)) from None
            except _Retryable as e:
                attempt += 1
                if attempt > self.policy.retries:
                    raise self._fail(f"{e} (gave up after {attempt} attempt(s) in "
                                     f"{time.monotonic() - started:.1f}s)") from None
                log.debug("%s: %s; retry %d in a moment", self.url, e, attempt)
                time.sleep(self.policy.delay(attempt))
                continue
            break
        if self.total is None:
            # Without a length from the server (or with its headers cut short), the manifest's
            # size is what a complete read must reach.
            self.total, self.etag = (total if total is not None else self.expected), etag
            if self.expected is not None and total is not None and total != self.expected:
                body.close()
                raise self._fail(f"{total} bytes, but the manifest says {self.expected} "
                                 "(truncated or replaced shard)")
        elif (total is not None and total != self.total) or (etag and self.etag and etag != self.etag):
            body.close()
            raise self._fail("the object changed while it was read (size or ETag differs)")
        self.body = body

    def read(self, n: int = -1) -> bytes:
        """Up to n bytes (fewer only at the end of the object); n < 0 reads the rest. Reads from the
        server in chunks of at least 1 MiB: a tar reader asks for 512-byte headers."""
        if n is None or n < 0:
            out, self._buf, self._off = self._buf[self._off:] + self._fetch(-1), b"", 0
            return out
        if len(self._buf) - self._off >= n:
            out = self._buf[self._off:self._off + n]
            self._off += n
            return out
        data = self._buf[self._off:]
        data += self._fetch(max(n - len(data), _CHUNK))
        out, self._buf, self._off = data[:n], data[n:], 0
        return out

    def _fetch(self, n: int) -> bytes:
        """Up to n bytes from the server, retrying and resuming (fewer only at the end of the object)."""
        if n is None or n < 0:
            n = (self.total - self.pos) if self.total is not None else 1 << 62
        out = bytearray()
        failures, started = 0, time.monotonic()
        while len(out) < n:
            if self.total is not None and self.pos >= self.total:
                break
            if self.body is None:
                self._connect()
            try:
                chunk = self.body.read(min(n - len(out), _CHUNK))
            except (_Retryable, OSError, http.client.HTTPException, ValueError) as e:
                chunk, why = b"", _describe(e) if not isinstance(e, _Retryable) else str(e)
            else:
                why = "connection closed early"
            if chunk:
                out += chunk
                self.pos += len(chunk)
                failures = 0
                continue
            if self.total is None:  # no length known: a clean end is the end
                break
            self._drop()
            failures += 1
            if failures > self.policy.retries:
                raise self._fail(f"{why} at byte {self.pos} of {self.total} (gave up after {failures} "
                                 f"attempt(s) in {time.monotonic() - started:.1f}s)")
            self.reconnects += 1
            log.debug("%s: %s at byte %d; resuming", self.url, why, self.pos)
            time.sleep(self.policy.delay(failures))
        return bytes(out)

    def _drop(self) -> None:
        if self.body is not None:
            try:
                self.body.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass
            self.body = None

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> "RemoteStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_stream(url: str, policy: Optional[RetryPolicy] = None, expected_size: Optional[int] = None) -> RemoteStream:
    """A resuming stream over `url` (http, https or s3); the first request is made at once, so a
    missing object or a size other than `expected_size` fails here."""
    stream = RemoteStream(url, policy or RetryPolicy(), expected_size)
    stream._connect()
    return stream


def fetch_bytes(url: str, policy: Optional[RetryPolicy] = None) -> bytes:
    """The whole object (for small ones: the manifest)."""
    with open_stream(url, policy) as s:
        return s.read()


def sha256_url(url: str, policy: Optional[RetryPolicy] = None, expected_size: Optional[int] = None) -> str:
    """sha256 of a remote object, streamed."""
    digest = hashlib.sha256()
    with open_stream(url, policy, expected_size) as s:
        while chunk := s.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
