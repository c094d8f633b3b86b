"""Archive streaming: a directory as a deterministic tar.gz, written to any sink.

The same tree always gives the same bytes: members in the scan's sorted order,
fixed mtime, uid/gid 0, no user or group names, modes 0644 or 0755, PAX headers
(from `tarfile`) where names or sizes need them.  Gzip is python-isal's igzip,
many times faster than zlib at the low levels that suit model weights (they
barely compress).  Nothing is staged on disk: compressed bytes go to
`sink.write` as they are produced.

File contents are read with `readinto` straight into 1 MiB blocks, which a few
threads compress in parallel (pigz's scheme) while the calling thread reads on;
block buffers are reused, which keeps the allocator (and so the RSS) quiet.

Everything here blocks; the upload pipeline runs it in a worker thread.  The
gzip threads are a bounded pool owned by `stream_archive` and always joined
before it returns or raises.
"""

from __future__ import annotations

import errno
import io
import mmap
import os
import stat
import struct
import tarfile
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from isal import isal_zlib

from ._artifacts import DirectorySource, FileEntry, file_stamp
from ._budget import allocate
from ._errors import InputError, out_of_descriptors

__all__ = ["BLOCK", "Sink", "changed", "check_unchanged", "open_regular", "stream_archive", "tar_size"]

#: The unit of parallel compression: fixed, so the output does not depend on the threads.
BLOCK = 1024 * 1024
_WINDOW = 32 * 1024  # deflate's window: the dictionary handed from block to block
_SAMPLE = 64 * 1024  # the part of a block compressed to judge whether the rest is worth it
_STORED_MAX = 65535  # bytes in one stored deflate block, at most
_FULL_STORED_HEADER = struct.pack("<BHH", 0, _STORED_MAX, _STORED_MAX ^ 0xFFFF)  # BFINAL 0, BTYPE 00
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_ZEROS = bytes(_RECORD)
#: A gzip member header: deflate, no name, mtime 0, OS unknown (the same on every machine).
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


class Sink(Protocol):
    """Where archive bytes go (views are only valid during the call)."""

    def write(self, data: bytes | memoryview, /) -> object: ...


class _ParallelGzip:
    """A gzip stream compressed in fixed 1 MiB blocks by a few threads, written in order.

    Each block is raw deflate primed with the previous block's last 32 KiB and ended
    with a sync flush, as pigz does; the blocks concatenate into one ordinary gzip
    member.  Block boundaries sit at fixed offsets of the tar stream, so the output
    is the same bytes whatever the number of threads.  At most 2 x threads blocks
    are in flight; block buffers are reused.
    """

    def __init__(
        self, sink: Sink, level: int, threads: int, on_read: Callable[[int], object] | None, min_saving: int = 0
    ) -> None:
        self._sink = sink
        self._level = level
        self._min_saving = min_saving
        self._on_read = on_read
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="registrar-gzip")
        self._window = 2 * threads
        self._pending: deque[tuple[Future[tuple[list[bytes | memoryview], int, int]], mmap.mmap]] = deque()
        self._free: list[mmap.mmap] = []
        self._block = allocate(BLOCK)
        self._fill = 0
        self._dictionary = b""
        self._crc = 0
        self._size = 0
        self.offset = 0  # tar bytes so far
        sink.write(_GZIP_HEADER)

    def write(self, data: bytes | memoryview) -> None:
        """Append a piece of the tar stream (a header, padding, a small file)."""
        view = memoryview(data)
        self.offset += len(view)
        while view:
            n = min(len(view), BLOCK - self._fill)
            self._block[self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == BLOCK:
                self._submit()

    def read_from(self, fd: int, count: int) -> int:
        """Append up to `count` bytes read from `fd` straight into the blocks; fewer only at EOF."""
        total = 0
        while total < count:
            room = min(BLOCK - self._fill, count - total)
            n = os.readv(fd, [memoryview(self._block)[self._fill : self._fill + room]])
            if not n:
                break
            self._fill += n
            total += n
            if self._fill == BLOCK:
                self._submit()
        self.offset += total
        return total

    def finish(self) -> None:
        """Compress what is left and end the gzip member."""
        if self._fill:
            self._submit()
        while self._pending:
            self._write_next()
        self._sink.write(isal_zlib.compress(b"", wbits=-isal_zlib.MAX_WBITS))  # the final, empty block
        self._sink.write(struct.pack("<II", self._crc, self._size & 0xFFFFFFFF))

    def close(self) -> None:
        """Stop the threads (after an error: without compressing the blocks still queued)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self) -> None:
        block, length = self._block, self._fill
        dictionary = self._dictionary
        tail = memoryview(block)[max(0, length - _WINDOW) : length]
        self._dictionary = bytes(tail) if length >= _WINDOW else (dictionary + bytes(tail))[-_WINDOW:]
        future = self._pool.submit(_deflate, block, length, dictionary, self._level, self._min_saving)
        self._pending.append((future, block))
        self._block = self._free.pop() if self._free else allocate(BLOCK)
        self._fill = 0
        if self._on_read is not None:
            self._on_read(length)
        while len(self._pending) >= self._window:
            self._write_next()

    def _write_next(self) -> None:
        future, block = self._pending.popleft()
        pieces, crc, length = future.result()
        self._crc = isal_zlib.crc32_combine(self._crc, crc, length)
        self._size += length
        for piece in pieces:  # stored pieces are views of `block`: written before it is reused
            self._sink.write(piece)
        del pieces
        self._free.append(block)


def _deflate(
    block: mmap.mmap | bytearray, length: int, dictionary: bytes, level: int, min_saving: int
) -> tuple[list[bytes | memoryview], int, int]:
    """One block as raw deflate ending byte-aligned (a sync flush, or a stored block), in
    pieces (joining them would copy them), with its CRC32 (runs in a gzip thread).

    With `min_saving`, the block's first 64 KiB are compressed as a sample; if that saved
    less than `min_saving` percent, the rest of the block is stored, not compressed:
    float32 and float16 weights save about 8 % at igzip's level 1 for about 1.3 CPU-seconds
    per GiB, more than the bytes saved cost to hash and send.  The choice depends on the
    block's bytes only, so the archive is the same whatever the threads."""
    data = memoryview(block)[:length]
    crc = isal_zlib.crc32(data)
    if level == 0:  # stored blocks (5 bytes per 64 KiB): isal's level 0 expands weights by ~23 %
        return _stored(data), crc, length
    if dictionary:
        compressor = isal_zlib.compressobj(level, isal_zlib.DEFLATED, -isal_zlib.MAX_WBITS, zdict=dictionary)
    else:
        compressor = isal_zlib.compressobj(level, isal_zlib.DEFLATED, -isal_zlib.MAX_WBITS)
    if not min_saving or length <= _SAMPLE:
        return [compressor.compress(data), compressor.flush(isal_zlib.Z_SYNC_FLUSH)], crc, length
    sample = compressor.compress(data[:_SAMPLE]) + compressor.flush(isal_zlib.Z_SYNC_FLUSH)
    if len(sample) * 100 > _SAMPLE * (100 - min_saving):
        return [sample, *_stored(data[_SAMPLE:])], crc, length
    return [sample, compressor.compress(data[_SAMPLE:]), compressor.flush(isal_zlib.Z_SYNC_FLUSH)], crc, length


def _stored(data: memoryview) -> list[bytes | memoryview]:
    """`data` as non-final stored deflate blocks: a 5-byte header before each 65,535 bytes
    (the most one holds), the bytes themselves as views, not copies."""
    pieces: list[bytes | memoryview] = []
    for start in range(0, len(data), _STORED_MAX):
        chunk = data[start : start + _STORED_MAX]
        n = len(chunk)
        pieces.append(_FULL_STORED_HEADER if n == _STORED_MAX else struct.pack("<BHH", 0, n, n ^ 0xFFFF))
        pieces.append(chunk)
    return pieces


def stream_archive(
    source: DirectorySource,
    sink: Sink,
    *,
    level: int,
    mtime: int,
    threads: int = 2,
    on_read: Callable[[int], object] | None = None,
    min_saving: int = 0,
) -> None:
    """Write `source` as a deterministic tar.gz to `sink`, gzipping on `threads` threads.

    Raises `InputError` if a file changes kind or size while it is read: a tar header
    has already promised its size, so the archive can't be finished truthfully.
    """
    out = _ParallelGzip(sink, level, threads, on_read, min_saving)
    try:
        for entry in source.entries:
            out.write(_header(entry, mtime))
            if entry.is_dir:
                continue
            fd, info = _open_regular_fd(entry.path)
            try:
                size = info.st_size
                if size != entry.size:
                    raise changed(entry.path, f"its size changed from {entry.size} to {size} bytes")
                check_unchanged(entry.path, entry.stamp, info, "since the scan")
                if out.read_from(fd, size) != size:
                    raise changed(entry.path, "it shrank while it was read")
                if os.read(fd, 1):
                    raise changed(entry.path, "it grew while it was read")
                check_unchanged(entry.path, entry.stamp, os.fstat(fd), "while it was read")
            finally:
                os.close(fd)
            out.write(_ZEROS[: -size % _BLOCK])
        # End of archive: two zero blocks, then zeros up to a whole record, as tar writes it.
        out.write(_ZEROS[: 2 * _BLOCK])
        out.write(_ZEROS[: -out.offset % _RECORD])
        out.finish()
    finally:
        out.close()


def _header(entry: FileEntry, mtime: int) -> bytes:
    """The member's header: the bytes `tarfile` writes in PAX format, built directly when simple.

    `tarfile` takes ~35 us a header, which is most of the time for trees of many small
    files; a plain ustar header (ASCII name of at most 100 bytes, size below 8 GiB) is
    packed here instead, byte for byte what `tarfile` gives (a test checks it).  Anything
    else (long or non-ASCII names, huge files) goes to `tarfile` for its PAX headers.
    """
    name = entry.name + "/" if entry.is_dir else entry.name
    size = 0 if entry.is_dir else entry.size
    if _simple(name, size, mtime):
        mode = 0o755 if entry.is_dir or entry.executable else 0o644
        header = bytearray(_USTAR_TEMPLATE)
        header[0 : len(name)] = name.encode("ascii")
        header[100:108] = b"%07o\0" % mode
        header[124:136] = b"%011o\0" % size
        header[136:148] = b"%011o\0" % mtime
        header[156:157] = tarfile.DIRTYPE if entry.is_dir else tarfile.REGTYPE
        header[148:155] = b"%06o\0" % (sum(header[:157]) + _USTAR_FIXED_SUM)
        return bytes(header)
    info = tarfile.TarInfo(entry.name)
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if entry.is_dir:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.mode = 0o755 if entry.executable else 0o644
        info.size = entry.size
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _simple(name: str, size: int, mtime: int) -> bool:
    """Whether a member's header is one plain ustar block (no PAX header needed)."""
    return len(name) <= 100 and name.isascii() and size < _USTAR_MAX_SIZE and mtime < _USTAR_MAX_TIME


def tar_size(source: DirectorySource, mtime: int) -> int:
    """The exact length of `stream_archive`'s tar stream, before gzip (what progress counts)."""
    total = 0
    for entry in source.entries:
        if entry.is_dir:
            total += _BLOCK if _simple(entry.name + "/", 0, mtime) else len(_header(entry, mtime))
        else:
            simple = _simple(entry.name, entry.size, mtime)
            total += (_BLOCK if simple else len(_header(entry, mtime))) + entry.size + (-entry.size % _BLOCK)
    total += 2 * _BLOCK
    return total + (-total % _RECORD)


_USTAR_MAX_SIZE = 8**11
_USTAR_MAX_TIME = 8**11
#: A ustar header with the fields every member shares: uid/gid 0, no owner names,
#: no device numbers, the checksum field blank (eight spaces) until it is computed.
_USTAR_TEMPLATE = (
    bytes(100)  # name
    + b"0000000\0" * 3  # mode, uid, gid
    + b"00000000000\0" * 2  # size, mtime
    + b" " * 8  # checksum
    + b"0"  # type
    + bytes(100)  # linkname
    + tarfile.POSIX_MAGIC
    + bytes(64)  # uname, gname
    + bytes(16 + 155 + 12)  # devmajor, devminor (empty for files and directories), prefix, padding
)
assert len(_USTAR_TEMPLATE) == tarfile.BLOCKSIZE
#: The checksum's share of the bytes after the type flag, which every simple header shares.
_USTAR_FIXED_SUM = sum(_USTAR_TEMPLATE[157:])


def open_regular(path: str | os.PathLike[str], stamp: int | None = None) -> io.FileIO:
    """Open for reading without blocking on a FIFO that replaced a scanned file; refused if
    the file is not the one `stamp` (`file_stamp`) describes."""
    fd, info = _open_regular_fd(path)
    try:
        check_unchanged(path, stamp, info, "since it was inspected")
    except BaseException:
        os.close(fd)
        raise
    os.set_blocking(fd, True)
    return io.FileIO(fd, "rb")


def check_unchanged(path: str | os.PathLike[str], stamp: int | None, info: os.stat_result, when: str) -> None:
    """Raise `changed` unless the file `info` describes is the one `stamp` was taken of, as it was:
    the same inode (not another file renamed over it, or reached through a directory swapped
    for a link), not written to (its size can stay the same: a tear the sizes do not show)."""
    if stamp is not None and file_stamp(info) != stamp:
        raise changed(path, f"it was replaced or written to {when}")


def _open_regular_fd(path: str | os.PathLike[str]) -> tuple[int, os.stat_result]:
    """A descriptor open for reading, and the file's status; refused (and not blocked on)
    unless a regular file.

    O_NONBLOCK keeps a FIFO that replaced a scanned file from blocking the open; it has no
    effect on reading a regular file, so the descriptor can be read as it is.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise changed(path, "it was removed") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a link where the scan found a file
            raise changed(path, "it was replaced by a symbolic link") from None
        if exc.errno in (errno.EMFILE, errno.ENFILE):  # not the file's fault: the process's limit
            raise out_of_descriptors(f"{path}: cannot open for reading", exc) from None
        raise InputError(
            f"{path}: cannot open for reading ({exc.strerror}); make it readable by the user the job runs as "
            "(chmod a+r), or remove it",
            [str(path)],
        ) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise changed(path, "it is no longer a regular file")
    return fd, info


def changed(path: str | os.PathLike[str], what: str) -> InputError:
    return InputError(
        f"{path} changed while it was being archived ({what}); make sure nothing writes to the "
        "input while the registration runs, then run again",
        [str(path)],
    )
