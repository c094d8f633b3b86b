"""Archive streaming: a directory as a deterministic tar.gz, written to any sink.

The same tree always gives the same bytes: members in the scan's sorted order,
fixed mtime, uid/gid 0, no user or group names, modes 0644 or 0755.  Gzip is
python-isal's igzip, many times faster than zlib at the low levels that suit
model weights (they barely compress).  Nothing is staged on disk: the bytes go
to `sink.write` as they are produced.

Everything here blocks; the upload pipeline runs it in a worker thread.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Callable
from typing import Protocol

from isal import isal_zlib

from ._artifacts import DirectorySource, PrebuiltArchive
from ._errors import InputError

__all__ = ["Sink", "stream_archive", "stream_prebuilt"]

#: Read size for file contents, and the batch size handed to the compressor.
CHUNK = 1024 * 1024
_SMALL = 256 * 1024
_GZIP_WBITS = 16 + isal_zlib.MAX_WBITS


class Sink(Protocol):
    """Where archive bytes go."""

    def write(self, data: bytes, /) -> object: ...


class _GzipWriter:
    """The file object tarfile writes to: batches small writes, compresses, passes on."""

    def __init__(self, sink: Sink, level: int, on_read: Callable[[int], object] | None) -> None:
        self._sink = sink
        self._on_read = on_read
        self._compressor = isal_zlib.compressobj(level, isal_zlib.DEFLATED, _GZIP_WBITS)
        self._pending = bytearray()
        self._offset = 0

    def write(self, data: bytes) -> int:
        size = len(data)
        self._offset += size
        if size >= _SMALL:
            self._flush_pending()
            self._compress(data)
        else:
            self._pending += data
            if len(self._pending) >= _SMALL:
                self._flush_pending()
        return size

    def tell(self) -> int:
        return self._offset

    def finish(self) -> None:
        self._flush_pending()
        self._sink.write(self._compressor.flush())

    def _flush_pending(self) -> None:
        if self._pending:
            self._compress(bytes(self._pending))
            self._pending.clear()

    def _compress(self, data: bytes) -> None:
        if self._on_read is not None:
            self._on_read(len(data))
        out = self._compressor.compress(data)
        if out:
            self._sink.write(out)


def stream_archive(
    source: DirectorySource,
    sink: Sink,
    *,
    level: int,
    mtime: int,
    on_read: Callable[[int], object] | None = None,
) -> None:
    """Write `source` as a deterministic tar.gz to `sink`.

    Raises `InputError` if a file changes kind or size while it is read: a tar header
    has already promised its size, so the archive can't be finished truthfully.
    """
    gz = _GzipWriter(sink, level, on_read)
    with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT, copybufsize=CHUNK) as tar:  # type: ignore[call-overload]
        for entry in source.entries:
            info = tarfile.TarInfo(entry.name)
            info.mtime = mtime
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if entry.is_dir:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
                continue
            info.mode = 0o755 if entry.executable else 0o644
            with _open_regular(entry.path) as f:
                info.size = os.fstat(f.fileno()).st_size
                if info.size != entry.size:
                    raise _changed(entry.path, f"its size changed from {entry.size} to {info.size} bytes")
                try:
                    tar.addfile(info, f)
                except OSError as exc:
                    if "unexpected end of data" in str(exc):
                        raise _changed(entry.path, "it shrank while it was read") from None
                    raise
                if f.read(1):
                    raise _changed(entry.path, "it grew while it was read")
    gz.finish()


def stream_prebuilt(
    source: PrebuiltArchive,
    sink: Sink,
    *,
    chunk: int = CHUNK,
    on_read: Callable[[int], object] | None = None,
) -> None:
    """Copy a prebuilt archive to `sink` as it is, checking that its size holds still."""
    total = 0
    with _open_regular(source.path) as f:
        while block := f.read(chunk):
            total += len(block)
            if total > source.size:
                raise _changed(source.path, "it grew while it was read")
            sink.write(block)
            if on_read is not None:
                on_read(len(block))
    if total != source.size:
        raise _changed(source.path, "it shrank while it was read")


def _open_regular(path: os.PathLike[str]) -> io.FileIO:
    """Open for reading without blocking on a FIFO that replaced a scanned file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise InputError(f"{path}: cannot open for reading ({exc.strerror})", [str(path)]) from None
    f = io.FileIO(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise _changed(path, "it is no longer a regular file")
    os.set_blocking(fd, True)
    return f


def _changed(path: os.PathLike[str], what: str) -> InputError:
    return InputError(
        f"{path} changed while it was being archived ({what}); make sure nothing writes to the "
        "input while the registration runs, then run again",
        [str(path)],
    )
