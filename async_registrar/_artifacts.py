"""Input artifacts: what a model or payload path holds, checked before any upload.

A path is either a directory whose contents are archived on the fly, or (when
the directory holds exactly one file, and that file is a gzip-compressed tar)
a prebuilt archive uploaded as it is.  Archives contain only regular files and
directories: the scan lists every link, special file or unusable name at once,
so the user fixes them in one go, before a single byte is uploaded.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ._errors import InputError
from ._s3 import S3Location
from ._settings import MAX_PART_SIZE, MAX_PARTS, MiB

__all__ = [
    "ArtifactSource",
    "DirectorySource",
    "FileEntry",
    "PrebuiltArchive",
    "StreamedArchive",
    "choose_part_size",
    "file_stamp",
    "inspect_artifact",
]

GZIP_MAGIC = b"\x1f\x8b"
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
#: S3's largest object.
MAX_OBJECT_SIZE = 5 * 1024**4


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One member of a directory archive: a regular file or a directory."""

    name: str  # POSIX path relative to the archive root
    path: str  # as the directory scan gives it (a Path per entry costs more than the entry)
    is_dir: bool
    size: int
    executable: bool
    #: The file as the scan saw it (`file_stamp`); None: not compared (synthetic sources).
    stamp: int | None = None


@dataclass(frozen=True, slots=True)
class DirectorySource:
    """A directory to archive, its members in archive order."""

    root: Path
    entries: tuple[FileEntry, ...]

    @property
    def content_bytes(self) -> int:
        """The total size of the files' contents."""
        return sum(e.size for e in self.entries)

    @property
    def size_bound(self) -> int:
        """An upper bound of the compressed archive's size.

        A tar member costs at most its padded data plus a header block and, for long or
        non-ASCII names, a PAX header; deflate at worst adds a little over 0.1 %.
        """
        tar = sum(_BLOCK * 4 + len(e.name.encode()) + _padded(e.size) for e in self.entries)
        tar = _padded(tar + 2 * _BLOCK, _RECORD)
        return tar + tar // 100 + MiB


@dataclass(frozen=True, slots=True)
class PrebuiltArchive:
    """A `.tar.gz` file found in the input, uploaded without recompression."""

    path: Path
    size: int
    #: The file as the inspection saw it (`file_stamp`); None: not compared.
    stamp: int | None = None

    @property
    def size_bound(self) -> int:
        """The archive's size, known exactly."""
        return self.size


ArtifactSource = DirectorySource | PrebuiltArchive


def file_stamp(st: os.stat_result) -> int:
    """What tells a file from another, or from itself rewritten: its device and inode, size and
    mtime (which every write moves).  Not its ctime, which also moves when the file is removed
    or renamed over while it is read: what was read is then still one whole version of it.

    Folded into one int (a scan of 200,000 files keeps one each, not a 4-tuple): the stamp is
    only ever compared with the same file's own, where a collision would need a change that
    hashes alike.  Reading with `O_NOFOLLOW` protects only the last component of a path; a
    directory above swapped for a link, or the whole tree renamed away, gives other inodes.
    """
    return hash((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))


class BlockingReader(Protocol):
    """A file object read from a thread (`read` blocks until bytes come; empty at the end)."""

    def read(self, size: int = -1, /) -> bytes | memoryview: ...


@dataclass(frozen=True, slots=True)
class StreamedArchive:
    """A prebuilt `.tar.gz` read from a stream, not a file: an object in S3 read by ranged
    GETs (see `_s3_source`), uploaded as it is and checked on the way, like a `PrebuiltArchive`."""

    #: What messages name: the object's URI.
    path: str
    size: int
    reader: BlockingReader = field(compare=False)

    @property
    def size_bound(self) -> int:
        return self.size


def is_s3_uri(value: object) -> bool:
    """Whether `value` is an `s3://` URI (a model or payload already in S3)."""
    return isinstance(value, str) and value.startswith("s3://")


@dataclass(frozen=True, slots=True)
class S3Archive:
    """A prebuilt `.tar.gz` in S3, as it was when it was inspected."""

    location: S3Location
    size: int
    #: The ETag when inspected: the copy and the read are pinned to it.
    etag: str | None

    @property
    def size_bound(self) -> int:
        return self.size

    @property
    def path(self) -> str:
        """Its URI (what messages name, as a local archive's path)."""
        return self.location.uri


def inspect_artifact(path: Path, *, role: str, dereference: bool = False) -> ArtifactSource:
    """Scan `path` and describe what will be uploaded; raise `InputError` if it can't be.

    `role` ("model", "payload") names the input in messages.  With `dereference`, symbolic
    links are followed (a link to a file is archived as a regular file of the target's bytes
    under the link's name, a link to a directory as that directory) and hard-linked files
    are archived as regular files; loops, dangling links and links to anything else are
    refused.  Blocking: run it in a worker thread for large trees.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        fix = (
            "give the path of an existing directory (or of a directory holding one .tar.gz)"
            if role == "upload"
            else f"mount the {role} there or pass its directory with --{role}"
        )
        raise InputError(f"{role} path {path} does not exist; {fix}", [str(path)]) from None
    except OSError as exc:
        raise InputError(f"{role} path {path} cannot be read ({exc.strerror})", [str(path)]) from None
    if stat.S_ISREG(info.st_mode):
        if _is_tar_gz(path):
            # Read by its target's path: a link given as the input is followed, as a directory's
            # is, and the file is opened without following links (a link there is a swap).
            return _prebuilt(Path(os.path.realpath(path)), info.st_size, role, file_stamp(info))
        raise InputError(
            f"{role} path {path} is a file but not a gzip-compressed tar archive; pass the directory "
            f"that holds the {role} files, or a .tar.gz",
            [str(path)],
        )
    if not stat.S_ISDIR(info.st_mode):
        raise InputError(f"{role} path {path} is neither a directory nor a file", [str(path)])

    entries, problems = _scan(path, dereference=dereference)
    if problems:
        raise InputError(
            f"{role} directory {path} holds entries that can't go into an archive (only regular files "
            f"and directories can); remove or replace each of these and run again:\n"
            + "\n".join(f"  - {p}" for p in problems),
            [p.split(":", 1)[0] for p in problems],
        )
    files = [e for e in entries if not e.is_dir]
    if not files:
        raise InputError(
            f"{role} directory {path} holds no files; put the {role} files (or one {role}.tar.gz) there",
            [str(path)],
        )
    if len(entries) == 1 and files[0].name.count("/") == 0:
        single = files[0]
        problem = _tar_gz_problem(Path(single.path))
        if problem is None:
            return _prebuilt(Path(single.path), single.size, role, single.stamp)
        if single.name.lower().endswith((".tar.gz", ".tgz")):
            raise InputError(
                f"{single.path} is named like a tar.gz archive but is not one ({problem}); rebuild it, "
                "or put the unpacked files in the directory instead",
                [str(single.path)],
            )
    # No refusal here when the bound passes S3's 5 TiB object limit: weights compress by
    # about 7 %, so only the compressed stream can tell; the part cutter stops it at the limit.
    return DirectorySource(path, tuple(entries))


def _prebuilt(path: Path, size: int, role: str, stamp: int | None) -> PrebuiltArchive:
    if size > MAX_OBJECT_SIZE:  # uploaded as it is: nothing can make it smaller
        raise InputError(
            f"{role} archive {path} is larger than S3's 5 TiB object limit; split the {role} into smaller artifacts",
            [str(path)],
        )
    return PrebuiltArchive(path, size, stamp)


def choose_part_size(size_bound: int, configured: int) -> int:
    """The configured part size, grown (in whole MiB) so the upload needs at most 10,000 parts.

    A bound past S3's 5 TiB object limit sizes parts for the limit itself: an archive that
    compresses below it fits, and one that doesn't is stopped at the limit.
    """
    needed = -(-min(size_bound, MAX_OBJECT_SIZE) // MAX_PARTS)
    needed = -(-needed // MiB) * MiB
    return min(max(configured, needed), MAX_PART_SIZE)


#: What the messages about links say when `dereference` is off.
_DEREFERENCE = "or pass --dereference (REGISTRAR_DEREFERENCE=true) to archive its target's bytes"


def _scan(root: Path, *, dereference: bool = False) -> tuple[list[FileEntry], list[str]]:
    """Walk `root` in archive order (by UTF-8 name, depth first); collect entries and problems."""
    entries: list[FileEntry] = []
    problems: list[str] = []
    top = os.stat(root)
    # Each directory to list, its name in the archive, and the directories above it (device,
    # inode): a followed link back to one of them would be a loop.
    stack: list[tuple[str, str, frozenset[tuple[int, int]]]] = [
        (os.fspath(root), "", frozenset({(top.st_dev, top.st_ino)}))
    ]
    while stack:
        directory, prefix, above = stack.pop()
        try:
            with os.scandir(directory) as it:
                children = sorted(it, key=lambda e: os.fsencode(e.name))
        except OSError as exc:
            problems.append(f"{directory}: cannot list directory ({exc.strerror})")
            continue
        subdirs = []
        for child in children:
            full = child.path
            member, reason = _member_name(child.name)
            if reason:
                problems.append(f"{os.fsencode(full)!r}: {reason}; rename it")
                continue
            name = prefix + member
            try:
                st = child.stat(follow_symlinks=False)
            except OSError as exc:
                problems.append(f"{full}: cannot stat ({exc.strerror})")
                continue
            path = full
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(full)
                if not dereference:
                    problems.append(
                        f"{full}: symbolic link (to {target}); replace it with a copy of its target, {_DEREFERENCE}"
                    )
                    continue
                try:
                    st = os.stat(full)  # followed, through every link of a chain
                except FileNotFoundError:
                    problems.append(f"{full}: dangling symbolic link (to {target}); remove it or restore its target")
                    continue
                except OSError as exc:
                    why = "a loop of symbolic links" if exc.errno == errno.ELOOP else exc.strerror
                    problems.append(f"{full}: symbolic link (to {target}) cannot be followed ({why})")
                    continue
                if stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) in above:
                    problems.append(f"{full}: symbolic link (to {target}) loops back to a directory above it")
                    continue
                if stat.S_ISREG(st.st_mode):
                    path = os.path.realpath(full)  # opened without following links, as every file is
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                entries.append(FileEntry(name, full, True, 0, True))
                subdirs.append((full, name + "/", above | {(st.st_dev, st.st_ino)}))
            elif stat.S_ISREG(mode):
                if st.st_nlink > 1 and not dereference:
                    problems.append(
                        f"{full}: hard link ({st.st_nlink} names for one file); replace it with a copy, "
                        "or pass --dereference (REGISTRAR_DEREFERENCE=true) to archive it as a regular file"
                    )
                elif not readable(st, path):
                    problems.append(
                        f"{full}: cannot be read by this process (mode {stat.filemode(mode)}, owner uid {st.st_uid}); "
                        "make it readable by the user the job runs as (chmod a+r), or remove it"
                    )
                else:
                    executable = bool(mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH))
                    entries.append(FileEntry(name, path, False, st.st_size, executable, file_stamp(st)))
            else:
                problems.append(f"{full}: {_special_kind(mode)}; archives hold only regular files and directories")
        # Depth first in sorted order: push subdirectories in reverse so the first pops first.
        # Their members are appended after all of this directory's direct entries, which
        # keeps the order a pure function of the tree.
        stack.extend(reversed(subdirs))
    return entries, problems


def readable(st: os.stat_result, path: str) -> bool:
    """Whether this process can read the file `st` describes: its mode bits say so for almost
    every file, at no cost; only a file they grant nobody here is asked about (`os.access`,
    which knows ACLs and root's capabilities), so a tree of 200,000 files costs no syscall more."""
    mode = st.st_mode
    if mode & stat.S_IROTH:
        return True
    if mode & stat.S_IRUSR and st.st_uid == os.geteuid():
        return True
    if mode & stat.S_IRGRP and (st.st_gid == os.getegid() or st.st_gid in os.getgroups()):
        return True
    return os.access(path, os.R_OK)


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1 (category Cc)


def _member_name(name: str) -> tuple[str, str | None]:
    """A directory entry's name in the archive (UTF-8, as tar's PAX headers hold it), and the
    problem that keeps it out, if any.

    The name is decoded from its bytes, not taken as Python gives it: with Python's UTF-8 mode
    off and an ASCII locale (`LC_ALL=C PYTHONUTF8=0`), a valid UTF-8 name comes as surrogate
    escapes."""
    if not name.isascii():
        try:
            name = os.fsencode(name).decode("utf-8")
        except UnicodeDecodeError:
            return name, "name is not valid UTF-8"
    if _CONTROL.search(name):
        return name, "name contains control characters"
    return name, None


def _special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    return "special file"


def _is_tar_gz(path: Path) -> bool:
    """True if `path` starts with gzip magic bytes and the first member decompresses to a tar header."""
    return _tar_gz_problem(path) is None


def _tar_gz_problem(path: Path) -> str | None:
    """Why `path` is not a tar.gz (see `_is_tar_gz`), for a message; None if it is one."""
    corrupt = "corrupt, truncated or not gzip"
    try:
        with path.open("rb") as f:
            head = f.read(64 * 1024)
    except OSError:
        return corrupt
    if not head.startswith(GZIP_MAGIC):
        return corrupt
    try:
        block = zlib.decompressobj(31).decompress(head, _BLOCK)
    except zlib.error:
        return corrupt
    if len(block) == _BLOCK and not any(block):
        return "an empty tar: it holds no files"
    try:
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except tarfile.TarError:
        return corrupt
    return None


def _padded(size: int, unit: int = _BLOCK) -> int:
    return -(-size // unit) * unit
