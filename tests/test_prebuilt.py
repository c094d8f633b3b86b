"""Prebuilt archives: uploaded byte for byte, checked on the way, refused when unusable."""

from __future__ import annotations

import gzip
import io
import os
import random
import tarfile
from pathlib import Path

import pytest

from async_registrar import InputError
from async_registrar._artifacts import PrebuiltArchive, inspect_artifact
from async_registrar._prebuilt import stream_prebuilt

MiB = 1024 * 1024


class Collect:
    def __init__(self) -> None:
        self.buffer = io.BytesIO()

    def write(self, data: bytes | memoryview) -> None:
        self.buffer.write(data)


def tar_gz(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> Path:
    data = data or {}
    with tarfile.open(path, "w:gz") as tar:
        for info in members:
            payload = data.get(info.name, b"")
            info.size = len(payload) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(payload) if info.isfile() else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def source(path: Path) -> PrebuiltArchive:
    return PrebuiltArchive(path, path.stat().st_size)


def test_an_archive_given_by_a_link_is_read_from_its_target(tmp_path: Path) -> None:
    """A model path that is a link to a .tar.gz is followed, as a link to a directory is."""
    path = tar_gz(tmp_path / "m.tar.gz", [member("weights.bin")], {"weights.bin": b"w" * 1000})
    (tmp_path / "latest.tar.gz").symlink_to(path.name)
    found = inspect_artifact(tmp_path / "latest.tar.gz", role="model")
    sink = Collect()
    stream_prebuilt(found, sink)
    assert sink.buffer.getvalue() == path.read_bytes()


def test_a_good_archive_passes_unchanged(tmp_path: Path) -> None:
    """Bytes pass through untouched, read in small chunks; multi-member gzip is fine too."""
    weights = os.urandom(3 * MiB)
    path = tar_gz(
        tmp_path / "m.tar.gz", [member("weights.bin"), member("code", tarfile.DIRTYPE)], {"weights.bin": weights}
    )
    sink = Collect()
    stream_prebuilt(source(path), sink, chunk=64 * 1024)
    assert sink.buffer.getvalue() == path.read_bytes()
    # The same tar split over two gzip members (what pigz --independent or cat-ed files give).
    raw = gzip.decompress(path.read_bytes())
    (tmp_path / "multi.tar.gz").write_bytes(gzip.compress(raw[: 2 * MiB]) + gzip.compress(raw[2 * MiB :]))
    stream_prebuilt(source(tmp_path / "multi.tar.gz"), Collect())


@pytest.mark.parametrize(
    ("members", "problem"),
    [
        ([member("/etc/cron.d/x")], "absolute"),
        ([member("../escape.txt")], "outside the destination"),
        ([member("link", tarfile.SYMTYPE, "/etc/passwd")], "absolute"),
        ([member("link", tarfile.SYMTYPE, "../../etc")], "outside the destination"),
        ([member("fifo", tarfile.FIFOTYPE)], "special file"),
        ([member("dev", tarfile.CHRTYPE)], "special file"),
    ],
)
def test_members_the_data_filter_refuses(tmp_path: Path, members: list[tarfile.TarInfo], problem: str) -> None:
    """Absolute paths, `..`, links out of the tree and special files: InputError naming the member."""
    path = tar_gz(tmp_path / "bad.tar.gz", members)
    with pytest.raises(InputError, match=f"not a usable tar.gz .member {members[0].name!r}.*{problem}") as caught:
        stream_prebuilt(source(path), Collect())
    assert caught.value.paths == (str(path),)


def test_truncated_corrupt_and_not_gzip(tmp_path: Path) -> None:
    """A cut-off archive, flipped bytes anywhere in it, and plain data are all refused.

    Damage in different places fails in different layers (gzip's CRC, isal's inflate, tar's
    headers), each with its own exception class: every offset must end as an InputError.
    """
    weights = random.Random(0).randbytes(MiB)
    good = tar_gz(tmp_path / "good.tar.gz", [member("w.bin")], {"w.bin": weights}).read_bytes()
    cases = {
        "truncated": good[: len(good) // 2],
        "not-gzip": b"PK\x03\x04" + os.urandom(5000),
    }
    for offset in range(100, len(good) - 300, 8191):
        cases[f"corrupt-{offset}"] = (
            good[:offset] + bytes(b ^ 0xFF for b in good[offset : offset + 200]) + good[offset + 200 :]
        )
    for name, data in cases.items():
        path = tmp_path / f"{name}.tar.gz"
        path.write_bytes(data)
        with pytest.raises(InputError, match=r"is not a usable tar\.gz"):
            stream_prebuilt(source(path), Collect(), chunk=64 * 1024)


def test_size_changes_are_refused(tmp_path: Path) -> None:
    """A file that grows or shrinks after the scan is refused."""
    path = tar_gz(tmp_path / "m.tar.gz", [member("a")], {"a": b"x" * 1000})
    size = path.stat().st_size
    with pytest.raises(InputError, match="grew"):
        stream_prebuilt(PrebuiltArchive(path, size - 1), Collect())
    with pytest.raises(InputError, match="shrank"):
        stream_prebuilt(PrebuiltArchive(path, size + 1), Collect())
