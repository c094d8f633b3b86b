"""Input inspection: what a model or payload path holds, checked before any upload."""

from __future__ import annotations

import io
import os
import socket
import tarfile
from pathlib import Path

import pytest

from async_registrar import InputError
from async_registrar._artifacts import (
    DirectorySource,
    PrebuiltArchive,
    choose_part_size,
    inspect_artifact,
)

MiB = 1024 * 1024


def make_tar_gz(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_directory_is_scanned_in_archive_order(tmp_path: Path) -> None:
    """Entries come sorted, directories first at each level, with sizes and exec bits."""
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("z")
    (tmp_path / "a.bin").write_bytes(b"1234")
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    source = inspect_artifact(tmp_path, role="model")
    assert isinstance(source, DirectorySource)
    assert [e.name for e in source.entries] == ["a.bin", "b", "run.sh", "b/z.txt"]
    assert [e.executable for e in source.entries if not e.is_dir] == [False, True, False]
    assert source.content_bytes == 4 + 10 + 1
    assert source.size_bound > source.content_bytes


def test_one_tar_gz_is_uploaded_as_it_is(tmp_path: Path) -> None:
    """A directory holding only a gzip-compressed tar is a prebuilt archive, whatever its name."""
    make_tar_gz(tmp_path / "whatever.bin", {"weights": b"x" * 100})
    source = inspect_artifact(tmp_path, role="model")
    assert isinstance(source, PrebuiltArchive)
    assert source.size == (tmp_path / "whatever.bin").stat().st_size


def test_a_single_gzip_that_is_not_a_tar_is_archived(tmp_path: Path) -> None:
    """A lone gzip file without a tar inside is a model file, archived like any other."""
    import gzip

    (tmp_path / "weights.npy.gz").write_bytes(gzip.compress(b"\x93NUMPY" + b"\0" * 600))
    assert isinstance(inspect_artifact(tmp_path, role="model"), DirectorySource)


def test_a_corrupt_tar_gz_is_an_input_error(tmp_path: Path) -> None:
    """A file named .tar.gz that is not one (here: truncated garbage) is refused by name."""
    (tmp_path / "model.tar.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(InputError, match=r"model\.tar\.gz is named like a tar\.gz archive but is not one"):
        inspect_artifact(tmp_path, role="model")


def test_missing_and_empty_paths_are_input_errors(tmp_path: Path) -> None:
    """A missing path and a directory without files both name the path and what to do."""
    with pytest.raises(InputError, match="does not exist; mount the model there or pass its directory with --model"):
        inspect_artifact(tmp_path / "absent", role="model")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(InputError, match="holds no files") as caught:
        inspect_artifact(tmp_path / "empty", role="payload")
    assert caught.value.paths == (str(tmp_path / "empty"),)


def test_every_offending_entry_is_listed_at_once(tmp_path: Path) -> None:
    """Links, special files and unusable names are all reported together; FIFOs don't block."""
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "outside").symlink_to("/etc/passwd")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "inside").symlink_to(tmp_path / "ok.txt")
    os.link(tmp_path / "ok.txt", tmp_path / "hard")
    os.mkfifo(tmp_path / "pipe")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
        (tmp_path / "bad\x07name").write_text("x")
        (tmp_path / os.fsdecode(b"latin\xe9")).write_text("x")
        with pytest.raises(InputError) as caught:
            inspect_artifact(tmp_path, role="model")
    message = str(caught.value)
    for needle in (
        "outside: symbolic link",
        "dangling: symbolic link",
        "inside: symbolic link",
        "pipe: named pipe",
        "sock: socket",
        "control characters",
        "not valid UTF-8",
        "hard link",
    ):
        assert needle in message
    # ok.txt and hard are both names of one inode: both are hard links.
    assert len(caught.value.paths) == 9


def test_device_files_are_refused(tmp_path: Path) -> None:
    """A device node is not archived."""
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null")
    try:
        os.mknod(tmp_path / "null", 0o666 | 0o020000, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating device nodes needs root")
    with pytest.raises(InputError, match="null: device file"):
        inspect_artifact(tmp_path, role="model")


@pytest.mark.parametrize(
    ("size", "configured", "expected"),
    [
        (1 * MiB, 16 * MiB, 16 * MiB),  # small: the configured size
        (160_000 * MiB, 16 * MiB, 16 * MiB),  # exactly 10,000 parts of 16 MiB
        (160_000 * MiB + 1, 16 * MiB, 17 * MiB),  # one byte more: grow by a whole MiB
        (4 * 1024**4, 16 * MiB, 420 * MiB),  # 4 TiB
        (5 * 1024**4, 5 * MiB, 525 * MiB),
    ],
)
def test_part_size_keeps_uploads_within_10000_parts(size: int, configured: int, expected: int) -> None:
    """The part size grows in whole MiB just enough to stay within S3's 10,000 parts."""
    part = choose_part_size(size, configured)
    assert part == expected
    assert -(-size // part) <= 10_000
