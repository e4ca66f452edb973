"""The shard tar reader: the same members as Python's tarfile, the same samples as webdataset's
stage, and a named error for corrupt or truncated archives."""

import io
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from mtlxray.data.tarstream import tar_members, tar_samples
from mtlxray.errors import ShardError

NAMES = ["covid_989.img.raw", "non_COVID (3300).lung.png", "Normal (84).cls.json",
         "d" * 120 + ".img.raw",  # longer than a ustar name field
         "sub/dir/" + "e" * 90 + ".inf.raw"]


def _tar(fmt: int, names=NAMES) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        dir_info = tarfile.TarInfo("a_directory")
        dir_info.type = tarfile.DIRTYPE
        tar.addfile(dir_info)
        for i, name in enumerate(names):
            data = bytes(range(256)) * (i * 3 + 1) + b"x" * i  # sizes on and off the 512-byte grid
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_members_equal_what_tarfile_reads(fmt):
    names = NAMES if fmt != tarfile.USTAR_FORMAT else [n for n in NAMES if len(n) <= 100]
    raw = _tar(fmt, names)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    assert list(tar_members(io.BytesIO(raw))) == expected
    assert [n for n, _ in expected] == names  # directories are skipped, long names kept


@pytest.mark.parametrize("opened", ["mapped", "piped"])
def test_samples_equal_webdatasets_on_a_real_shard(tiny_shards: Path, opened):
    shard = str(next((tiny_shards / "lung").glob("train-*.tar")))
    url = shard if opened == "mapped" else f"pipe:cat '{shard}'"
    ours = list(tar_samples([{"url": url}]))
    theirs = list(wds.tarfile_samples([{"url": url}]))
    assert len(ours) == len(theirs) > 0
    assert ours == theirs
    assert all(isinstance(v, memoryview if opened == "mapped" else bytes)
               for s in ours for k, v in s.items() if not k.startswith("__"))


def test_corrupt_header_is_a_shard_error():
    raw = bytearray(_tar(tarfile.GNU_FORMAT))
    raw[512 + 10] ^= 0xFF  # a byte of the first file's name: the checksum no longer matches
    with pytest.raises(ShardError, match="checksum mismatch"):
        list(tar_members(io.BytesIO(bytes(raw)), "bad.tar"))


def test_truncated_member_is_a_shard_error():
    raw = _tar(tarfile.GNU_FORMAT)
    with pytest.raises(ShardError, match=r"cut\.tar: truncated tar member"):
        list(tar_members(io.BytesIO(raw[:512 * 2 + 100]), "cut.tar"))
