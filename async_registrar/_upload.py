"""The upload pipeline: an artifact streamed as parts into S3, with bounded memory.

    worker thread                  bounded stream            N upload tasks
    read -> tar -> gzip -> sha256 -> [part][part] ->  upload_part x N -> complete

The producer runs in a worker thread and blocks when the stream is full
(backpressure), so memory stays near (concurrency + queue + 1) x part size
whatever the artifact's size.  An artifact that fits in one part goes up in a
single PutObject.  On any error or cancellation the producer stops, the parts in
flight are cancelled and the multipart upload is aborted (see `MultipartUpload`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import anyio.from_thread
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream

from ._archive import stream_archive, stream_prebuilt
from ._artifacts import ArtifactSource, DirectorySource, choose_part_size
from ._concurrency import first_error
from ._errors import StorageError
from ._multipart import MultipartUpload, put_object
from ._progress import ProgressCallback, UploadProgress
from ._s3 import S3Client, S3Location, storage_errors
from ._settings import Settings

__all__ = ["UploadedArtifact", "upload_artifact"]

log = logging.getLogger("async_registrar.upload")


@dataclass(frozen=True, slots=True)
class UploadedArtifact:
    """An archive that arrived whole in S3."""

    location: S3Location
    size: int
    sha256: str
    parts: int

    @property
    def uri(self) -> str:
        """The `s3://bucket/key` of the archive."""
        return self.location.uri


@dataclass(frozen=True, slots=True)
class _Part:
    number: int
    data: bytes
    last: bool


class _PartCutter:
    """The producer's sink: hashes the archive and cuts it into numbered parts.

    Every part but the last is exactly `part_size` bytes; a part is handed on only once
    a byte after it exists, so the last part is always flagged as such.
    """

    def __init__(self, part_size: int, emit: Callable[[_Part], object]) -> None:
        self._part_size = part_size
        self._emit = emit
        self._buffer = bytearray()
        self._number = 0
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.sha256.update(data)
        self.size += len(data)
        self._buffer += data
        while len(self._buffer) > self._part_size:
            self._send(bytes(memoryview(self._buffer)[: self._part_size]), last=False)
            del self._buffer[: self._part_size]

    def finish(self) -> None:
        self._send(bytes(self._buffer), last=True)
        self._buffer = bytearray()

    def _send(self, data: bytes, *, last: bool) -> None:
        self._number += 1
        self._emit(_Part(self._number, data, last))


class _Tracker:
    """Counts what has been read and uploaded, and reports it."""

    def __init__(self, artifact: str, location: S3Location, on_progress: ProgressCallback | None) -> None:
        self.artifact = artifact
        self.location = location
        self.on_progress = on_progress
        self.started = time.monotonic()
        self.bytes_read = 0  # updated from the producer thread
        self.bytes_uploaded = 0
        self.parts_done = 0

    def add_read(self, size: int) -> None:
        self.bytes_read += size

    def part_done(self, size: int, *, done: bool = False) -> None:
        self.bytes_uploaded += size
        self.parts_done += 1
        self.report(done=done)

    def report(self, *, done: bool) -> None:
        if self.on_progress is not None:
            self.on_progress(
                UploadProgress(
                    artifact=self.artifact,
                    uri=self.location.uri,
                    bytes_read=self.bytes_read,
                    bytes_uploaded=self.bytes_uploaded,
                    parts_done=self.parts_done,
                    elapsed=time.monotonic() - self.started,
                    done=done,
                )
            )


async def upload_artifact(
    s3: S3Client,
    source: ArtifactSource,
    location: S3Location,
    settings: Settings,
    *,
    artifact: str = "artifact",
    on_progress: ProgressCallback | None = None,
) -> UploadedArtifact:
    """Stream `source` (archived on the fly, or as it is if prebuilt) to `location`.

    Returns once S3 holds the whole archive and its size has been confirmed.  Raises
    `InputError` if the input changes while it is read and `StorageError` if S3 fails;
    in every case, and on cancellation, no multipart upload is left open.
    """
    part_size = choose_part_size(source.size_bound, settings.part_size)
    checksum = "CRC32" if settings.s3_checksums == "when_supported" else None
    send, receive = anyio.create_memory_object_stream[_Part](settings.upload_queue_parts)

    def emit(part: _Part) -> None:  # in the producer thread: blocks while the stream is full
        anyio.from_thread.run(send.send, part)

    cutter = _PartCutter(part_size, emit)
    tracker = _Tracker(artifact, location, on_progress)

    def produce_blocking() -> None:
        if isinstance(source, DirectorySource):
            stream_archive(
                source,
                cutter,
                level=settings.compression_level,
                mtime=settings.archive_mtime,
                on_read=tracker.add_read,
            )
        else:
            stream_prebuilt(source, cutter, on_read=tracker.add_read)
        cutter.finish()

    async def produce() -> None:
        try:
            await anyio.to_thread.run_sync(produce_blocking)
        except anyio.BrokenResourceError:
            return  # the consumers went away; their error is the one to report
        # Closed only on success: consumers that see the end without a last part never
        # complete the upload; on failure they are cancelled by the task group instead.
        await send.aclose()

    log.info("uploading %s to %s (parts of %d MiB)", artifact, location, part_size >> 20)
    # `send` is closed early by the producer on success only; on failure it is closed
    # here, once the task group has cancelled and collected every task.
    with send, first_error():
        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)
            async with receive:
                parts = await _consume(s3, receive, location, settings, checksum, tracker)

    size, digest = cutter.size, cutter.sha256.hexdigest()
    await _confirm(s3, location, size)
    tracker.report(done=True)
    log.info("uploaded %s: %s, %d bytes, %d part(s)", artifact, location, size, parts)
    return UploadedArtifact(location, size, digest, parts)


async def _consume(
    s3: S3Client,
    receive: MemoryObjectReceiveStream[_Part],
    location: S3Location,
    settings: Settings,
    checksum: str | None,
    tracker: _Tracker,
) -> int:
    """Upload the parts as they come; return how many there were."""
    first = await receive.receive()
    if first.last:
        await put_object(s3, location, first.data, checksum=checksum)
        tracker.part_done(len(first.data))
        return 1

    seen_last = False

    async def upload_parts(
        mpu: MultipartUpload, parts: MemoryObjectReceiveStream[_Part], initial: _Part | None
    ) -> None:
        nonlocal seen_last
        async with parts:
            if initial is not None:
                await mpu.upload_part(initial.number, initial.data)
                tracker.part_done(len(initial.data))
            async for part in parts:
                seen_last = seen_last or part.last
                await mpu.upload_part(part.number, part.data)
                tracker.part_done(len(part.data))

    async with MultipartUpload(s3, location, checksum=checksum, abort_timeout=settings.cleanup_timeout) as mpu:
        with first_error():
            async with anyio.create_task_group() as tg:
                for i in range(settings.upload_concurrency):
                    tg.start_soon(upload_parts, mpu, receive.clone(), first if i == 0 else None)
        if not seen_last:  # the stream ended early: never complete a partial archive
            raise RuntimeError("the archive stream ended without its last part")
        await mpu.complete()
    return tracker.parts_done


async def _confirm(s3: S3Client, location: S3Location, size: int) -> None:
    """Check that S3 holds an object of the size written; delete it if not."""
    with storage_errors("HeadObject", location.bucket, location.key):
        head = await s3.head_object(Bucket=location.bucket, Key=location.key)
    if head["ContentLength"] != size:
        with anyio.CancelScope(shield=True), storage_errors("DeleteObject", location.bucket, location.key):
            await s3.delete_object(Bucket=location.bucket, Key=location.key)
        raise StorageError(
            f"{location} holds {head['ContentLength']} bytes after the upload, {size} were sent; "
            "the object was deleted",
            operation="HeadObject",
            bucket=location.bucket,
            key=location.key,
        )
