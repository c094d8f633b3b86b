"""Prebuilt archives: uploaded byte for byte, and checked while they stream past.

A `.tar.gz` found in the input is not recompressed.  It is still read as a tar
archive on the way, in a thread of its own: a file that is not gzip, is
corrupt or truncated, or holds a member that `tarfile`'s `data` filter refuses
(absolute paths, `..`, links out of the tree, special files) is an `InputError`
raised before the upload can complete, so the upload is aborted instead.
"""

from __future__ import annotations

import io
import os
import queue
import tarfile
import threading
import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

from isal import igzip, isal_zlib

from ._archive import Sink, changed, check_unchanged, open_regular
from ._artifacts import BlockingReader, PrebuiltArchive, StreamedArchive
from ._errors import InputError
from ._members import MemberCheck, members

__all__ = ["stream_prebuilt"]

#: What isal raises for corrupt deflate data: its own class, not a `zlib.error` (its stub
#: declares an instance, hence the cast).
_ISAL_ERROR: type[Exception] = isal_zlib.error  # type: ignore[assignment]


def stream_prebuilt(
    source: PrebuiltArchive | StreamedArchive,
    sink: Sink,
    *,
    chunk: int = 1024 * 1024,
    check: bool = True,
    on_read: Callable[[int], object] | None = None,
) -> None:
    """Copy a prebuilt archive to `sink` as it is, checking its size and (if `check`) its contents.

    Each chunk is read into bytes of its own, which the sink may keep (the part cutter
    does, instead of copying it) and the check shares.  A streamed archive is read from its
    reader (views of immutable bytes, of at most `chunk` bytes each).
    """
    total = 0
    file: io.FileIO | None = None
    if isinstance(source, StreamedArchive):
        opened: AbstractContextManager[BlockingReader] = nullcontext(source.reader)
    else:
        opened = file = open_regular(source.path, source.stamp)
    with _TarGzCheck(source) if check else _NoCheck() as checker, opened as f:
        while data := f.read(chunk):
            n = len(data)
            total += n
            if total > source.size:
                raise changed(source.path, "it grew while it was read")
            checker.feed(data)
            sink.write(data)
            if on_read is not None:
                on_read(n)
        if total != source.size:
            raise changed(source.path, "it shrank while it was read")
        if file is not None and not isinstance(source, StreamedArchive):  # rewritten in place, same size
            check_unchanged(source.path, source.stamp, os.fstat(file.fileno()), "while it was read")
        checker.finish()


class _TarGzCheck:
    """Reads the archive as a tar.gz in a thread of its own, from the chunks it is fed.

    The reader always consumes chunks up to the end marker, even after it found a
    problem, so the feeder never waits forever; the feeder stops early once it is told.
    """

    def __init__(self, source: PrebuiltArchive | StreamedArchive) -> None:
        self._path = source.path
        self._chunks: queue.Queue[bytes | memoryview | None] = queue.Queue(maxsize=8)
        self._problem: str | None = None
        self._crash: Exception | None = None  # a bug here, not a bad archive: raised as it is
        self._thread = threading.Thread(target=self._read, name="registrar-tar-check", daemon=True)
        self._ended = False

    def __enter__(self) -> _TarGzCheck:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._end()  # after an early exit too: the reader sees the end and stops

    def feed(self, data: bytes | memoryview) -> None:
        """Hand on `data` (immutable, or a view of immutable bytes: shared, not copied); raise
        at once if the archive is already known to be bad."""
        self._raise_if_bad()
        self._chunks.put(data)

    def finish(self) -> None:
        """Wait for the reader to reach the end; raise if the archive is bad."""
        self._end()
        self._raise_if_bad()

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._chunks.put(None)
            self._thread.join()

    def _raise_if_bad(self) -> None:
        if self._crash is not None:
            raise RuntimeError("checking the prebuilt archive failed") from self._crash
        if self._problem is not None:
            raise InputError(
                f"{self._path} is not a usable tar.gz ({self._problem}); rebuild the archive, or put "
                "the unpacked files in the directory instead",
                [str(self._path)],
            )

    def _read(self) -> None:
        reader = _ChunkReader(self._chunks)
        try:
            with (
                igzip.IGzipFile(fileobj=reader, mode="rb") as gz,  # type: ignore[no-untyped-call]
                tarfile.open(fileobj=gz, mode="r|", bufsize=1024 * 1024) as tar,
            ):
                check = MemberCheck()
                holds_files = False
                for member in members(tar):
                    self._problem = check.problem(member)
                    if self._problem is not None:
                        break
                    holds_files = holds_files or not member.isdir()
                if self._problem is None and not holds_files:  # as a directory of directories would be
                    self._problem = "it holds no files, only directories"
                while self._problem is None and gz.read(1024 * 1024):  # on to the gzip trailer
                    pass
        except (tarfile.TarError, EOFError, OSError, zlib.error, _ISAL_ERROR) as exc:
            self._problem = str(exc) or type(exc).__name__
        except Exception as exc:  # reported to the feeding thread, not lost in this one
            self._crash = exc
        finally:
            reader.drain()


class _NoCheck:
    """Stands in for the check when it is turned off."""

    def __enter__(self) -> _NoCheck:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def feed(self, data: bytes | memoryview) -> None:
        pass

    def finish(self) -> None:
        pass


class _ChunkReader:
    """A blocking file object over the queue of chunks (for the reader thread)."""

    def __init__(self, chunks: queue.Queue[bytes | memoryview | None]) -> None:
        self._chunks = chunks
        self._buffer = memoryview(b"")
        self._ended = False

    def readable(self) -> bool:
        return True

    def readinto(self, target: memoryview | bytearray) -> int:
        view = self._next(len(target))
        target[: len(view)] = view
        return len(view)

    def read(self, size: int = -1) -> bytes:
        return bytes(self._next(size))

    def _next(self, size: int) -> memoryview:
        """Up to `size` bytes (all of the current chunk if negative); empty only at the end."""
        if not self._buffer and not self._ended:
            chunk = self._chunks.get()
            self._ended = chunk is None
            self._buffer = memoryview(chunk or b"")
        if size < 0 or size >= len(self._buffer):
            data, self._buffer = self._buffer, memoryview(b"")
        else:
            data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def drain(self) -> None:
        """Consume (and drop) chunks up to the end marker."""
        while not self._ended:
            self._ended = self._chunks.get() is None
