"""An object in S3 read by concurrent ranged GETs, handed on in order to a worker thread.

One GET stream is the slow part of reading a large object from S3; a few ranged GETs in
flight are not. `ranged_reader` reads the object that way in a task of its own and gives a
blocking file object over its bytes, in order, for a thread (the tar.gz check, the sha256,
the part cutter of an upload read it as they read a local archive):

    event loop: GET range 1 | GET range 2 | ... (at most `in_flight` held) -> [range] -> thread: read()

Every GET is pinned to the ETag the object had when it was inspected (a replaced object is
a `StorageError`, never a mix), a range whose answer breaks off is asked for again, and a
server that ignores the `Range` header is refused before its answer is read. Memory: the
ranges in flight, the one being read and one a tar check may still hold views of
(`read_bound`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anyio
import anyio.abc
import anyio.from_thread
import anyio.lowlevel
import stamina
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._artifacts import S3Archive
from ._concurrency import first_error
from ._errors import StorageError
from ._s3 import S3Client, S3Location, storage_errors, without_checksum_mode
from ._settings import MiB, Settings, describe_field

__all__ = [
    "MAX_RANGES_IN_FLIGHT",
    "MIN_RANGES_IN_FLIGHT",
    "RANGE_SIZE",
    "in_flight",
    "ranged_reader",
    "read_bound",
    "read_ranges",
]

#: One ranged GET: a request's own cost is small against it, and a few in flight are cheap.
RANGE_SIZE = 8 * MiB
#: Ranged GETs in flight at once: the upload concurrency, within these bounds (the ranges
#: held are memory outside the part budget).
MIN_RANGES_IN_FLIGHT = 4
MAX_RANGES_IN_FLIGHT = 8
#: A ranged GET whose answer broke off on the way is asked for again, up to this many times.
RANGE_ATTEMPTS = 3
#: What an answer that broke off on the way becomes (see `storage_errors`, `_read_body`).
_BROKEN_BODY = frozenset({"ResponseStreamingError", "IncompleteReadError", "ReadTimeoutError", "AioReadTimeoutError"})


def in_flight(settings: Settings | None) -> int:
    """How many ranged GETs a read keeps in flight with these settings."""
    wanted = settings.upload_concurrency if settings is not None else 0
    return min(MAX_RANGES_IN_FLIGHT, max(MIN_RANGES_IN_FLIGHT, wanted))


def read_bound(settings: Settings | None) -> int:
    """The bytes a read holds at most: the ranges in flight, the one the thread reads, and one
    more whose views a tar check may still hold."""
    return (in_flight(settings) + 2) * RANGE_SIZE


@contextlib.asynccontextmanager
async def ranged_reader(
    s3: S3Client,
    source: S3Archive,
    *,
    settings: Settings | None = None,
    range_size: int = RANGE_SIZE,
    opened: anyio.Event | None = None,
) -> AsyncIterator[_Chunks]:
    """A blocking file object over `source`'s bytes (for a worker thread), read by
    `read_ranges` in a task of its own while the block runs; see the module.

    If the read fails, or is cancelled, the stream is closed under the thread: its next
    `read` raises instead of waiting for a range that will never come (a thread cannot be
    cancelled, and the task waiting for it cannot go on without it), and the read's error,
    or the cancellation, is what the block raises.
    """
    send, receive = anyio.create_memory_object_stream[bytes](0)

    async def read() -> None:
        try:
            await read_ranges(s3, source, send, in_flight=in_flight(settings), range_size=range_size, opened=opened)
        except BaseException:
            receive.close()
            raise

    with send, receive, first_error():
        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            try:
                yield _Chunks(receive)
            except anyio.ClosedResourceError:
                # The read failed or was cancelled and closed the stream under the thread: its
                # error (the task group's), or the cancellation, is the one to raise.
                await anyio.lowlevel.checkpoint()
                raise
            tg.cancel_scope.cancel()  # the block is done with the bytes (it read them all)


async def read_ranges(
    s3: S3Client,
    source: S3Archive,
    send: MemoryObjectSendStream[bytes],
    *,
    in_flight: int = MIN_RANGES_IN_FLIGHT,
    range_size: int = RANGE_SIZE,
    opened: anyio.Event | None = None,
) -> None:
    """Read `source` with `in_flight` concurrent ranged GETs (pinned to its ETag) and send its
    bytes to `send` in order, a range per item; at most `in_flight` ranges are held, besides
    the one being sent. `send` is closed at the end, only once every byte was sent (so a
    reader that sees the end has the whole object). `opened` is set once S3 answered a GET:
    the source is there, readable, and still the one seen."""
    ranges = [(start, min(start + range_size, source.size) - 1) for start in range(0, source.size, range_size)]
    held = anyio.Semaphore(in_flight)
    arrived = [anyio.Event() for _ in ranges]
    data: dict[int, bytes] = {}

    async def fetch(index: int) -> None:
        first, last = ranges[index]
        data[index] = await _get_range(s3, source, first, last, opened)
        arrived[index].set()

    async def launch(tg: anyio.abc.TaskGroup) -> None:
        for index in range(len(ranges)):
            await held.acquire()  # given back once the range was sent on
            tg.start_soon(fetch, index)

    with first_error():
        async with anyio.create_task_group() as tg:
            tg.start_soon(launch, tg)
            for index, event in enumerate(arrived):
                await event.wait()
                await send.send(data.pop(index))
                held.release()
    if not ranges and opened is not None:  # an empty object: nothing to GET (the check refuses it)
        opened.set()
    await send.aclose()


async def _get_range(s3: S3Client, source: S3Archive, first: int, last: int, opened: anyio.Event | None) -> bytes:
    """Bytes `first`..`last` (inclusive) of `source`, pinned to its ETag; asked for again if
    the answer breaks off on the way."""
    where = source.location
    pinned = {"IfMatch": source.etag} if source.etag else {}
    expected = last - first + 1
    async for attempt in stamina.retry_context(on=_broken_body, attempts=RANGE_ATTEMPTS, wait_max=2.0):
        # No checksum mode: a range has no checksum of its own to check (the whole archive's
        # sha256 is), and a server refusing the flexible-checksum headers (B2) refuses the mode.
        with attempt, storage_errors("GetObject", where.bucket, where.key), without_checksum_mode():
            response = await s3.get_object(Bucket=where.bucket, Key=where.key, Range=f"bytes={first}-{last}", **pinned)
            if opened is not None:
                opened.set()
            async with response["Body"] as body:
                if response.get("ContentLength") != expected:  # before reading: it may be the whole object
                    raise StorageError(
                        f"S3 GetObject of bytes {first}-{last} of {where} answered {response.get('ContentLength')} "
                        f"bytes: the server ignores the Range header (or the object changed); run again, or "
                        f"give a local copy of the model ({describe_field('model_local_copy')})",
                        operation="GetObject",
                        bucket=where.bucket,
                        key=where.key,
                    )
                chunk = await _read_body(body, where, first, last)
    if len(chunk) != expected:
        raise StorageError(
            f"{where} changed while it was read (bytes {first}-{last} came as {len(chunk)}); run again",
            operation="GetObject",
            bucket=where.bucket,
            key=where.key,
        )
    return chunk


async def _read_body(body: Any, where: S3Location, first: int, last: int) -> bytes:
    """A GET's whole body; one that broke off on the way is a `StorageError` to retry (aiohttp
    raises its own `ClientPayloadError` for it, which aiobotocore does not turn into botocore's)."""
    try:
        return bytes(await body.read())
    except aiohttp.ClientPayloadError as exc:
        raise StorageError(
            f"S3 GetObject failed for {where} (bytes {first}-{last}): the answer broke off ({exc}); run again",
            operation="GetObject",
            bucket=where.bucket,
            key=where.key,
            code="ResponseStreamingError",
        ) from exc


def _broken_body(exc: Exception) -> bool:
    return isinstance(exc, StorageError) and exc.code in _BROKEN_BODY


class _Chunks:
    """What `read_ranges` sends, as a blocking file object for a thread: `read` waits for the
    next range if the current one is used up, and returns views of it (no copy) of at most
    `size` bytes (so a tar check's queue of chunks holds what it holds for a local file);
    empty at the end."""

    def __init__(self, receive: MemoryObjectReceiveStream[bytes]) -> None:
        self._receive = receive
        self._range = memoryview(b"")

    def read(self, size: int = -1, /) -> memoryview:
        if not self._range:
            try:
                self._range = memoryview(anyio.from_thread.run(self._receive.receive))
            except anyio.EndOfStream:
                return memoryview(b"")
        n = len(self._range) if size < 0 else min(size, len(self._range))
        piece, self._range = self._range[:n], self._range[n:]
        return piece
