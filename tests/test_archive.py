"""Archive streaming: deterministic tar.gz that GNU tar reads back byte for byte."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import tarfile
import zlib
from pathlib import Path

import pytest

from async_registrar import InputError
from async_registrar._archive import _deflate, _header, stream_archive, tar_size
from async_registrar._artifacts import DirectorySource, FileEntry, inspect_artifact

MiB = 1024 * 1024


class Collect:
    """A sink that keeps everything (fine for test-sized archives)."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    @property
    def data(self) -> bytes:
        return self.buffer.getvalue()


def make_tree(root: Path) -> None:
    (root / "code").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "weights.bin").write_bytes(os.urandom(3 * MiB + 17))
    (root / "config.json").write_text('{"layers": 2}')
    (root / "code" / "inference.py").write_text("def model_fn(d):\n    return d\n")
    (root / "code" / "run.sh").write_text("#!/bin/sh\n")
    (root / "code" / "run.sh").chmod(0o700)
    (root / ("n" * 150 + ".txt")).write_text("long name")
    (root / "ünïcode.txt").write_text("utf-8 name")


def archive(root: Path, *, mtime: int = 315532800, level: int = 1) -> bytes:
    source = inspect_artifact(root, role="model")
    assert isinstance(source, DirectorySource)
    sink = Collect()
    stream_archive(source, sink, level=level, mtime=mtime)
    return sink.data


def test_gnu_tar_extracts_every_file_byte_for_byte(tmp_path: Path) -> None:
    """GNU tar reads the stream back: same files, same bytes, empty directories kept."""
    make_tree(tmp_path / "in")
    (tmp_path / "model.tar.gz").write_bytes(archive(tmp_path / "in"))
    (tmp_path / "out").mkdir()
    subprocess.run(["tar", "-xzf", str(tmp_path / "model.tar.gz"), "-C", str(tmp_path / "out")], check=True)
    originals = sorted(p.relative_to(tmp_path / "in") for p in (tmp_path / "in").rglob("*"))
    extracted = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*"))
    assert originals == extracted
    for rel in originals:
        if (tmp_path / "in" / rel).is_file():
            assert (tmp_path / "out" / rel).read_bytes() == (tmp_path / "in" / rel).read_bytes()


def test_same_tree_same_bytes(tmp_path: Path) -> None:
    """Two runs over the same tree give the same sha256, whatever the files' own times and owners."""
    make_tree(tmp_path / "in")
    first = archive(tmp_path / "in")
    for path in (tmp_path / "in").rglob("*"):
        os.utime(path, (1_000_000_000, 1_000_000_000), follow_symlinks=False)
    second = archive(tmp_path / "in")
    assert hashlib.sha256(first).hexdigest() == hashlib.sha256(second).hexdigest()
    assert archive(tmp_path / "in", mtime=1_700_000_000) != first


def test_member_metadata_is_normalised(tmp_path: Path) -> None:
    """Fixed mtime, uid/gid 0, no owner names, modes 0644 or 0755."""
    make_tree(tmp_path / "in")
    with tarfile.open(fileobj=io.BytesIO(archive(tmp_path / "in", mtime=1_234_567_890)), mode="r:gz") as tar:
        members = tar.getmembers()
    assert {m.mtime for m in members} == {1_234_567_890}
    assert {(m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, "", "")}
    modes = {m.name: m.mode for m in members}
    assert modes["code/run.sh"] == 0o755
    assert modes["config.json"] == 0o644
    assert modes["empty-dir"] == 0o755
    assert all(tarfile.data_filter(m, "/x") is not None for m in members)


def test_a_file_that_grows_while_read_is_refused(tmp_path: Path) -> None:
    """The tar header already promised a size: growth is an InputError naming the file."""
    root = tmp_path / "in"
    root.mkdir()
    weights = root / "weights.bin"
    weights.write_bytes(os.urandom(2 * MiB))
    source = inspect_artifact(root, role="model")
    assert isinstance(source, DirectorySource)

    def grow(_: int) -> None:
        with weights.open("ab") as f:
            f.write(b"more")

    with pytest.raises(InputError, match=r"weights\.bin changed while it was being archived \(it grew"):
        stream_archive(source, Collect(), level=1, mtime=0, on_read=grow)


def test_a_file_that_shrinks_while_read_is_refused(tmp_path: Path) -> None:
    """A file truncated mid-read is an InputError naming the file."""
    root = tmp_path / "in"
    root.mkdir()
    weights = root / "weights.bin"
    weights.write_bytes(os.urandom(3 * MiB))
    source = inspect_artifact(root, role="model")
    assert isinstance(source, DirectorySource)

    def shrink(_: int) -> None:
        os.truncate(weights, MiB)

    with pytest.raises(InputError, match="it shrank while it was read"):
        stream_archive(source, Collect(), level=1, mtime=0, on_read=shrink)


def test_a_file_replaced_after_the_scan_is_refused(tmp_path: Path) -> None:
    """A size different from the scan's is caught before any byte of it is archived."""
    root = tmp_path / "in"
    root.mkdir()
    (root / "a.txt").write_text("short")
    source = inspect_artifact(root, role="model")
    (root / "a.txt").write_text("a lot longer now")
    with pytest.raises(InputError, match="its size changed from 5 to 16 bytes"):
        stream_archive(source, Collect(), level=1, mtime=0)  # type: ignore[arg-type]


@pytest.mark.parametrize("min_saving", [0, 10])
def test_output_does_not_depend_on_the_gzip_threads(tmp_path: Path, min_saving: int) -> None:
    """Blocks sit at fixed offsets, stored or not by their own bytes: one thread or three give
    the same bytes."""
    make_tree(tmp_path / "in")
    source = inspect_artifact(tmp_path / "in", role="model")
    assert isinstance(source, DirectorySource)
    outputs = []
    for threads in (1, 3):
        sink = Collect()
        stream_archive(source, sink, level=1, mtime=0, threads=threads, min_saving=min_saving)
        outputs.append(sink.data)
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("min_saving", [0, 10, 99])
def test_blocks_that_do_not_pay_are_stored_and_the_rest_compressed(tmp_path: Path, min_saving: int) -> None:
    """Weights-like bytes (random) go stored past a block's first 64 KiB, text is compressed,
    and whatever was chosen, the archive is the same files and one gzip member gzip accepts."""
    root = tmp_path / "in"
    make_tree(root)
    (root / "vocab.txt").write_bytes(b"".join(b"token-%d\n" % i for i in range(400_000)))  # ~4.5 MiB
    source = inspect_artifact(root, role="model")
    assert isinstance(source, DirectorySource)
    sink = Collect()
    stream_archive(source, sink, level=1, mtime=0, min_saving=min_saving)
    data = sink.data
    (tmp_path / "a.tar.gz").write_bytes(data)
    subprocess.run(["gzip", "-t", str(tmp_path / "a.tar.gz")], check=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for name in ("weights.bin", "vocab.txt", "config.json"):
            member = tar.extractfile(name)
            assert member is not None, name
            assert member.read() == (root / name).read_bytes(), name
    random, text = 3 * MiB + 17, (root / "vocab.txt").stat().st_size
    if min_saving == 0:  # everything compressed: igzip expands random bytes a little
        assert len(data) > random
    elif min_saving == 10:  # random bytes stored (5 bytes per 64 KiB), the text still compressed
        assert random < len(data) < random * 1.003 + text / 3
    else:  # nothing saves 99 %: all stored but each block's 64 KiB sample
        assert len(data) > random + text - (text // MiB + 1) * 64 * 1024


def test_stored_blocks_frame_every_length() -> None:
    """Stored framing at the edges of a stored block's 65,535 bytes inflates back."""
    for length in (1, 65_534, 65_535, 65_536, 2 * 65_535, 2 * 65_535 + 1):
        block = bytearray(os.urandom(length))
        pieces, crc, size = _deflate(block, length, b"", 0, 0)
        assert zlib.decompressobj(-zlib.MAX_WBITS).decompress(b"".join(pieces)) == bytes(block)
        assert (crc, size) == (zlib.crc32(block), length)


def test_stream_readers_accept_the_blocked_gzip(tmp_path: Path) -> None:
    """The parallel blocks form one gzip member: tarfile's stream mode and gzip -t read it."""
    make_tree(tmp_path / "in")
    data = archive(tmp_path / "in")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|gz") as tar:
        names = [member.name for member in tar]
    assert "weights.bin" in names
    (tmp_path / "a.tar.gz").write_bytes(data)
    subprocess.run(["gzip", "-t", str(tmp_path / "a.tar.gz")], check=True)


@pytest.mark.parametrize("mtime", [315532800, 8**11])  # the second needs a PAX header for every member
def test_tar_size_is_the_length_of_the_tar_stream(tmp_path: Path, mtime: int) -> None:
    """What progress counts against: exact, with directories, PAX headers (long and non-ASCII
    names) and the record padding."""
    make_tree(tmp_path / "in")
    (tmp_path / "in" / "code" / ("d" * 120)).mkdir()
    source = inspect_artifact(tmp_path / "in", role="model")
    assert isinstance(source, DirectorySource)
    tar = gzip.decompress(archive(tmp_path / "in", mtime=mtime))
    assert tar_size(source, mtime) == len(tar)


@pytest.mark.parametrize(
    ("name", "is_dir", "size", "executable"),
    [
        ("a.txt", False, 5, False),
        ("dir", True, 0, True),
        ("x/y/run.sh", False, 8**11 - 1, True),
        ("n" * 100, False, 0, False),
        ("n" * 100, True, 0, True),  # 101 with the slash: PAX
        ("ü.txt", False, 1, False),  # non-ASCII: PAX
        ("big.bin", False, 8**11, False),  # 8 GiB: PAX
    ],
)
def test_fast_headers_are_what_tarfile_writes(name: str, is_dir: bool, size: int, executable: bool) -> None:
    """The directly packed ustar header is byte for byte tarfile's PAX-format header."""
    entry = FileEntry(name, Path("unused"), is_dir, size, executable)
    for mtime in (0, 315532800, 8**11 - 1):
        info = tarfile.TarInfo(name)
        info.mtime, info.uid, info.gid, info.uname, info.gname = mtime, 0, 0, "", ""
        if is_dir:
            info.type, info.mode = tarfile.DIRTYPE, 0o755
        else:
            info.mode, info.size = (0o755 if executable else 0o644), size
        assert _header(entry, mtime) == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
