"""A fast reader of shard tar files, as a drop-in for webdataset's `tarfile_to_samples` stage.

webdataset expands tar streams with Python's `tarfile`, which decodes every 512-byte header field
by field and copies every member: on raw shards (five members per sample) that was ~60% of a
loader core's time, more than decoding and batching together (see benchmarks/README.md). The
shards are ustar archives of regular files, so a header needs only its name, size, type and
checksum. Local shards are memory-mapped and members are handed out as zero-copy memoryviews (a
raw image then goes from the page cache straight into the batch); http(s):// and s3:// URLs are
streamed by `mtlxray.data.remote` (resuming reads, retries with backoff); other URLs (`pipe:`) are
opened with webdataset's `gopen`. Members are grouped into samples as webdataset's `group_by_keys`
groups them. GNU long names and pax `path` records are honoured, so any tar of regular files reads
as `tarfile` would read it.
"""

from __future__ import annotations

import logging
import mmap
import os
from typing import BinaryIO, Iterable, Iterator

from webdataset import filters
from webdataset.gopen import gopen
from webdataset.handlers import reraise_exception
from webdataset.tariterators import base_plus_ext

from mtlxray.data import remote
from mtlxray.data.remote import RetryPolicy
from mtlxray.errors import ShardError

__all__ = ["tar_members", "tar_samples", "tar_to_samples", "ShardSkips"]

log = logging.getLogger(__name__)

_BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file


def _octal(field: bytes, what: str, where: str) -> int:
    try:
        return int(field.rstrip(b"\0 ").strip() or b"0", 8)
    except ValueError:
        raise ShardError(f"{where}: corrupt tar header ({what} field {field!r})") from None


def _pax_path(records: bytes) -> str | None:
    """The `path` of a pax extended header ("<len> <key>=<value>\\n" records), if it has one."""
    pos = 0
    while pos < len(records):
        space = records.index(b" ", pos)
        length = int(records[pos:space])
        key, _, value = records[space + 1:pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8")
        pos += length
    return None


class _MappedFile:
    """`read(n)` over a memory-mapped file, returning memoryview slices instead of copies."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            # mmap cannot map an empty file; an empty shard reads as an empty archive
            self.view = memoryview(mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                             prot=mmap.PROT_READ) if size else b"")
        self.pos = 0

    def read(self, n: int) -> memoryview:
        out = self.view[self.pos:self.pos + n]
        self.pos += len(out)
        return out


def tar_members(stream: BinaryIO | _MappedFile, where: str = "<tar>") -> Iterator[tuple[str, bytes | memoryview]]:
    """(name, data) of every regular file in a tar stream, in order; ShardError on a corrupt or
    truncated archive. `data` is bytes, or a memoryview when `stream` is a mapped file."""
    read = stream.read
    long_name: str | None = None
    while True:
        header = bytes(read(_BLOCK))
        if len(header) < _BLOCK:
            if not header:
                return  # no end-of-archive blocks: tolerated, as tarfile does
            raise ShardError(f"{where}: truncated tar header")
        if header[0] == 0 and not header.strip(b"\0"):
            return  # end-of-archive block
        stored = _octal(header[148:156], "checksum", where)
        if stored != sum(header) - sum(header[148:156]) + 8 * 32:  # the checksum field counts as spaces
            raise ShardError(f"{where}: corrupt tar header (checksum mismatch)")
        size = _octal(header[124:136], "size", where)
        data = read(size)
        if len(data) < size:
            raise ShardError(f"{where}: truncated tar member ({len(data)} of {size} bytes)")
        if size % _BLOCK:
            read(_BLOCK - size % _BLOCK)
        kind = header[156:157]
        if kind == b"L":  # GNU long name of the next member
            long_name = bytes(data).rstrip(b"\0").decode("utf-8")
            continue
        if kind == b"x":  # pax extended header of the next member
            long_name = _pax_path(bytes(data)) or long_name
            continue
        if kind not in _REGULAR:
            long_name = None
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            if header[257:262] == b"ustar" and header[345]:
                name = header[345:500].split(b"\0", 1)[0].decode("utf-8") + "/" + name
        yield name, data


def _local_path(url: str) -> str | None:
    path = url[len("file:"):] if url.startswith("file:") else url
    return path if os.path.isfile(path) else None


def _open(source: dict, policy: RetryPolicy | None):
    """(stream, is_mapped) for a source record {"url", optional "bytes"}."""
    url = source["url"]
    path = _local_path(url)
    if path is not None:
        return _MappedFile(path), True
    if remote.is_remote(url):
        return remote.open_stream(url, policy, source.get("bytes")), False
    if "://" not in url and not url.startswith("pipe:"):
        raise ShardError(f"{url}: shard not found")
    return gopen(url), False


def _shard_samples(source: dict, policy: RetryPolicy | None) -> Iterator[dict]:
    """The samples of one shard: members grouped by key (as webdataset's `group_by_keys` does:
    the key is the name up to the first dot of its last path part, the suffix lower-cased). A
    sample is yielded only once the next key starts or the archive ends cleanly, so a read that
    fails mid-shard never yields the sample it was reading."""
    url = source["url"]
    stream, mapped = _open(source, policy)
    current: dict | None = None
    try:
        for name, data in tar_members(stream, url):
            if name.startswith("__"):  # webdataset metadata members (__index__ and the like)
                continue
            prefix, suffix = base_plus_ext(name)
            if prefix is None:
                continue
            suffix = suffix.lower()
            if current is None or prefix != current["__key__"]:
                if current is not None:
                    yield current
                current = {"__key__": prefix, "__url__": url}
            if suffix in current:
                raise ShardError(f"{url}: duplicate member {name!r}")
            current[suffix] = data
    finally:
        if not mapped:
            stream.close()
    if current is not None:
        yield current


class ShardSkips:
    """Shards a training stream skipped (`data.skip_failed_shards`): (url, reason) pairs, in order."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.items)


def tar_samples(src: Iterable[dict], handler=reraise_exception, *, policy: RetryPolicy | None = None,
                skip_failed: bool = False, skips: ShardSkips | None = None,
                max_consecutive_failures: int | None = None) -> Iterator[dict]:
    """Samples from a stream of {"url": ..., optional "bytes": ...} records, like
    `webdataset.tarfile_samples`; member data is bytes or a zero-copy memoryview.

    A shard that cannot be read raises `ShardError` naming it. With `skip_failed`, the shard is
    recorded in `skips` and the stream goes on with the next one (the sample being read when it
    failed is dropped, never yielded incomplete); `max_consecutive_failures` failed shards in a row
    (default: 3 or the number of distinct URLs seen, whichever is larger) still raise.
    """
    failures = 0
    urls: set[str] = set()
    for source in src:
        urls.add(source["url"])
        try:
            yield from _shard_samples(source, policy)
            failures = 0
        except ShardError as e:
            if not skip_failed:
                raise
            failures += 1
            if skips is not None:
                skips.items.append((source["url"], str(e)))
            log.warning("skipping shard: %s", e)
            limit = max_consecutive_failures or max(3, len(urls))
            if failures >= limit:
                raise ShardError(f"{e} ({failures} shards failed in a row; giving up)") from None


tar_to_samples = filters.pipelinefilter(tar_samples)
