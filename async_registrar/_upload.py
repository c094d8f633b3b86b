"""The upload pipeline: an artifact streamed as parts into S3, with bounded memory.

    worker thread (+ gzip threads)                              N upload tasks
    read -> tar -> gzip -> cut + sha256 + part checksum -> [part] -> upload_part x N -> complete

The producer runs in a worker thread and blocks when the stream is full
(backpressure), so memory stays near (concurrency + queue + 2) x part size
whatever the artifact's size, within the registrar's memory budget; full parts live in
reused buffers.  The archive is hashed as it is cut, while the bytes are fresh in the
cache.  An artifact that fits in one part goes up in a single PutObject.
On any error or cancellation the producer stops, the parts in flight are cancelled and
the multipart upload is aborted (see `MultipartUpload`).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import mmap
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio
import anyio.from_thread
from anyio.streams.memory import MemoryObjectReceiveStream

from ._archive import BLOCK, Sink, stream_archive, tar_size
from ._artifacts import MAX_OBJECT_SIZE, ArtifactSource, DirectorySource, StreamedArchive, choose_part_size
from ._budget import Lease, MemoryBudget, allocate
from ._capabilities import Integrity, settings_integrity
from ._checksums import Checksummer, PartCheck, is_full_object
from ._concurrency import CleanupDeadline, first_error, run_all
from ._errors import InputError, StorageError
from ._multipart import MultipartUpload, MultipartUploads, OpenUploads, StoredObject, check_object, put_object
from ._prebuilt import stream_prebuilt
from ._progress import ProgressCallback, UploadProgress
from ._s3 import S3Client, S3Location, storage_errors
from ._settings import MAX_PARTS, Settings
from ._threads import Workers

__all__ = ["DigestSink", "UploadedArtifact", "buffer_bound", "digest_artifact", "upload_artifact", "upload_to_all"]

log = logging.getLogger("async_registrar.upload")

#: What the parts carry for each integrity level (the others carry nothing).
_PART_CHECKS: dict[str, PartCheck] = {"crc32": "CRC32", "crc64nvme": "CRC64NVME", "md5": "MD5"}


def assumed_integrity(settings: Settings) -> Integrity:
    """The integrity the settings ask for, where the server was not probed: its CRC
    (`when_supported`), or a signed payload (`when_required`, where botocore signs them)."""
    return settings_integrity(settings.s3_checksums, settings.s3_checksum_algorithm)


#: How much of a part is copied before it is hashed: well within a core's L2 cache.
_HASH_STRIDE = 256 * 1024


@dataclass(frozen=True, slots=True)
class UploadedArtifact:
    """An archive that arrived whole in S3."""

    location: S3Location
    size: int
    sha256: str
    parts: int
    #: What S3 reported once the upload was complete: the ETag and the checksum (with any
    #: "-N" part count) of `checksum_algorithm`.  A resumed run compares them again.
    etag: str | None = None
    checksum: str | None = None
    checksum_algorithm: str | None = None
    #: What the server checked the bytes with on their way in (see `_capabilities`):
    #: "crc32", "crc64nvme", "md5", "sigv4-payload", or "size-only" (nothing: the object's
    #: integrity rests on its size and the registry's sha256 check).
    integrity: str | None = None

    @property
    def uri(self) -> str:
        """The `s3://bucket/key` of the archive."""
        return self.location.uri


@dataclass(frozen=True, slots=True)
class _Part:
    number: int
    #: The part's bytes: a view of a pooled buffer (handed back once the part is sent).
    data: memoryview
    last: bool
    checksum: str | None = None  # base64, as S3 wants it
    buffer: mmap.mmap | None = None  # the pooled buffer `data` views
    #: The part's hex sha256, where its payload is signed (the signer takes it as it is).
    payload_sha256: str | None = None

    @property
    def size(self) -> int:
        return len(self.data)


class _BufferPool:
    """Part buffers handed back by the uploaders (event loop), for the producer (its thread)."""

    def __init__(self) -> None:
        self._buffers: deque[mmap.mmap] = deque()
        self._ready = threading.Condition()
        self._replaced = 0  # buffers not given back, which the producer may make again

    def put(self, buffer: mmap.mmap) -> None:
        with self._ready:
            self._buffers.append(buffer)
            self._ready.notify()

    def replace(self) -> None:
        """A buffer that must not be refilled (a request given up on may still be sending from
        it) is not given back: the producer may make another in its place, within the share of
        the budget that one held (the old one is freed once nothing sends from it)."""
        with self._ready:
            self._replaced += 1
            self._ready.notify()

    def take(self, timeout: float = 0.0) -> mmap.mmap | None:
        """A buffer, waiting up to `timeout` seconds for one; None if none came."""
        with self._ready:
            if not self._buffers and not self._replaced and timeout > 0:
                self._ready.wait(timeout)
            return self._buffers.pop() if self._buffers else None

    def replaced(self) -> bool:
        """Whether a buffer was replaced (`replace`) that the producer may make again; it is
        then counted as made."""
        with self._ready:
            if not self._replaced:
                return False
            self._replaced -= 1
            return True


class _PartCutter:
    """The producer's sink: cuts the archive into numbered parts, hashing it on the way.

    The archive's sha256 and each part's checksum are computed here, in order, on the bytes
    just copied into the part, every `_HASH_STRIDE` bytes, while they are fresh in the cache
    (hashing a part that went cold runs at half the speed on a machine whose memory is slow).
    Full parts are written into part-sized buffers (see `allocate`) taken from `pool` (or
    allocated while the pool warms up) and given back by the uploader, so steady state
    allocates nothing (keeping the compressor's output instead of copying it was measured:
    40 uploads at once grew to 1.5 GiB of RSS under a 512 MiB budget).  At most
    queue + concurrency + 2 buffers ever exist, because the bounded stream blocks the
    producer before it can take another; fewer when the memory budget (`lease`) has no room
    for another: the producer then waits for a buffer to come back.

    Every part but the last is exactly `part_size` bytes; a full part is handed on only
    once a byte after it exists, so the last part is always flagged as such.
    """

    def __init__(
        self,
        part_size: int,
        emit: Callable[[_Part], object],
        pool: _BufferPool,
        lease: Lease | None = None,
        *,
        source: str = "the archive",
        max_size: int = MAX_OBJECT_SIZE,
        checksummer: Checksummer | None = None,
        payload_hashes: bool = False,
    ) -> None:
        self._part_size = part_size
        self._emit = emit
        self._pool = pool
        self._lease = lease
        self._source = source
        self._max_size = max_size
        self._checksummer = checksummer
        self.sha256 = hashlib.sha256()
        #: Each part's own sha256, for a server that checks signed payloads (see `_Part`).
        self._payload = hashlib.sha256() if payload_hashes else None
        self._allocated = 0
        self._buffer: mmap.mmap | None = None
        self._fill = 0
        self._hashed = 0  # bytes of the buffer already hashed
        self._number = 0
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        if self.size > self._max_size:  # S3 would refuse it at CompleteMultipartUpload
            raise InputError(
                f"{self._source} compresses to more than S3's {self._max_size / 2**40:g} TiB object limit; "
                "try a higher REGISTRAR_COMPRESSION_LEVEL with REGISTRAR_COMPRESSION_MIN_SAVING=0, "
                "or split it into smaller artifacts",
                [self._source],
            )
        view = memoryview(data)
        while view:
            if self._buffer is None:
                self._buffer = self._take()
            elif self._fill == self._part_size:
                self._send(last=False)
                self._buffer = self._take()
            n = min(len(view), self._part_size - self._fill)
            self._buffer[self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill - self._hashed >= _HASH_STRIDE:
                self._hash()

    def _hash(self) -> None:
        """Hash what was copied into the buffer since the last time: in strides of a few
        hundred KiB, still in the cache, but not once per write (deflate pieces can be 5 bytes)."""
        assert self._buffer is not None
        with memoryview(self._buffer) as whole:
            piece = whole[self._hashed : self._fill]
            self.sha256.update(piece)
            if self._checksummer is not None:
                self._checksummer.update(piece)
            if self._payload is not None:
                self._payload.update(piece)
            piece.release()
        self._hashed = self._fill

    def finish(self) -> None:
        if self._buffer is None:
            self._buffer = self._take()
        self._send(last=True)

    def _take(self) -> mmap.mmap:
        self._fill = self._hashed = 0
        buffer = self._pool.take()
        if buffer is not None:
            return buffer
        # The lease's first part is this upload's own; any more must fit the budget (or take the
        # place of one that was not given back).
        if (
            self._lease is None
            or self._allocated == 0
            or self._pool.replaced()
            or self._lease.take_more(self._part_size)
        ):
            self._allocated += 1
            return allocate(self._part_size)
        while (buffer := self._pool.take(timeout=0.1)) is None:  # over budget: wait for one back
            if self._pool.replaced():
                return allocate(self._part_size)
            anyio.from_thread.check_cancelled()
        return buffer

    def _send(self, *, last: bool) -> None:
        if self._number >= MAX_PARTS:  # before S3 refuses part 10,001, after the whole upload
            raise StorageError(
                f"the archive grew past S3's limit of {MAX_PARTS:,} parts of {self._part_size >> 20} MiB "
                f"(more than {self._part_size * MAX_PARTS / 2**30:.1f} GiB); raise REGISTRAR_PART_SIZE",
                operation="UploadPart",
                code="TooManyParts",
            )
        assert self._buffer is not None
        self._hash()
        self._number += 1
        checksum = self._checksummer.part_done() if self._checksummer is not None else None
        payload = None
        if self._payload is not None:
            payload, self._payload = self._payload.hexdigest(), hashlib.sha256()
        # The last part is a view of its buffer, not a copy: the copy would be memory outside
        # the budget, up to a part per upload.
        data = memoryview(self._buffer)[: self._fill]
        self._emit(_Part(self._number, data, last, checksum, self._buffer, payload))
        self._buffer = None


class _Tracker:
    """Counts what has been read and uploaded, and reports it."""

    def __init__(self, artifact: str, location: S3Location, total: int, on_progress: ProgressCallback | None) -> None:
        self.artifact = artifact
        self.location = location
        self.total = total
        self.on_progress = on_progress
        self.started = time.monotonic()
        self.bytes_read = 0  # updated from the producer thread
        self.bytes_archived = 0  # likewise
        self.bytes_uploaded = 0
        self.parts_done = 0

    def add_read(self, size: int) -> None:
        self.bytes_read += size

    def add_archived(self, size: int) -> None:
        self.bytes_archived += size

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
                    bytes_total=self.total,
                    bytes_archived=self.bytes_archived,
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
    workers: Workers | None = None,
    budget: MemoryBudget | None = None,
    integrity: Integrity | None = None,
) -> UploadedArtifact:
    """Stream `source` (archived on the fly, or as it is if prebuilt) to `location`.

    Returns once S3 holds the whole archive and its size has been confirmed.  Raises
    `InputError` if the input changes while it is read and `StorageError` if S3 fails;
    in every case, and on cancellation, no multipart upload is left open.  Its threads come
    from `workers` (its own, sized from the settings, if not given).
    """
    (uploaded,) = await upload_to_all(
        source,
        [(s3, location)],
        settings,
        artifact=artifact,
        on_progress=on_progress,
        workers=workers,
        budget=budget,
        integrity=[integrity] if integrity else None,
    )
    return uploaded


def buffer_bound(parts: int, part_size: int, settings: Settings) -> int:
    """The part buffers an upload of `parts` parts holds at most: those in flight, those
    queued (cut, hashed), the one being filled, and the spare ones handed back for reuse;
    never more than the memory budget holds (but always one); plus the gzip blocks."""
    count = min(parts + 1, settings.upload_concurrency + settings.upload_queue_parts + 4)
    overhead = stream_overhead(settings)
    return min(count, max(1, (settings.memory_limit - overhead) // part_size)) * part_size + overhead


def stream_overhead(settings: Settings) -> int:
    """What an upload holds besides its part buffers: the 1 MiB blocks the gzip threads work
    on (two per thread, input and output) and the one being filled.  It comes out of the
    budget with the upload's first part, so that many uploads at once stay within it too."""
    return (4 * settings.compression_threads + 2) * BLOCK


async def upload_to_all(
    source: ArtifactSource | StreamedArchive,
    targets: Sequence[tuple[S3Client, S3Location]],
    settings: Settings,
    *,
    artifact: str = "artifact",
    on_progress: ProgressCallback | None = None,
    cleanup: CleanupDeadline | None = None,
    workers: Workers | None = None,
    budget: MemoryBudget | None = None,
    ledger: OpenUploads | None = None,
    integrity: Sequence[Integrity] | None = None,
) -> list[UploadedArtifact]:
    """Like `upload_artifact`, to several places at once: archived and hashed once, each part
    sent to every target (one multipart upload per target, all aborted if any fails).

    Aborts (and the delete of an object found damaged) run under `cleanup`, the deadline of
    the caller's exit, so that they count against the same bound as the rest of its cleanup.
    Part buffers come out of `budget` (the caller's, shared by its uploads; else one of
    `settings.memory_limit` for this upload alone).  `integrity` says, per target, what its
    server checks (see `_capabilities`); without it, what the settings assume: the CRC
    (`when_supported`) or a signed payload (`when_required`).
    """
    budget = budget or MemoryBudget(settings.memory_limit)
    part_size = choose_part_size(source.size_bound, settings.part_size)
    lease = await budget.lease(part_size + stream_overhead(settings))
    try:
        levels = list(integrity) if integrity else [assumed_integrity(settings)] * len(targets)
        return await _upload_to_all(
            source, targets, settings, part_size, lease, artifact, on_progress, cleanup, workers, ledger, levels
        )
    finally:
        lease.release()


async def _upload_to_all(
    source: ArtifactSource | StreamedArchive,
    targets: Sequence[tuple[S3Client, S3Location]],
    settings: Settings,
    part_size: int,
    lease: Lease,
    artifact: str,
    on_progress: ProgressCallback | None,
    cleanup: CleanupDeadline | None,
    workers: Workers | None,
    ledger: OpenUploads | None,
    levels: list[Integrity],
) -> list[UploadedArtifact]:
    location = targets[0][1]
    cleanup = cleanup or CleanupDeadline(settings.cleanup_timeout)
    workers = workers or Workers.for_settings(settings)
    # What each part carries for the server to check: its CRC (and with CRC64NVME S3 checks
    # the whole object's too), or its Content-MD5; one kind for all the targets (a target
    # whose server checks another kind only is left with what else it checks).
    check = _PART_CHECKS.get(levels[0])
    for index, level in enumerate(levels):
        if _PART_CHECKS.get(level, check) != check:
            log.warning(
                "%s: its server checks %s, but the parts carry %s for the others", targets[index][1], level, check
            )
            levels[index] = "size-only"
    checksummer = Checksummer(check) if check else None
    # producer thread (reads, gzips, cuts and hashes in order) -> [parts] -> uploaders
    send_cut, receive_cut = anyio.create_memory_object_stream[_Part](settings.upload_queue_parts)

    def emit(part: _Part) -> None:  # in the producer thread: blocks while the stream is full
        tracker.add_archived(part.size)
        anyio.from_thread.run(send_cut.send, part)

    pool = _BufferPool()
    name = str(source.root if isinstance(source, DirectorySource) else source.path)
    # Where a server checks signed payloads, each part's sha256 is computed here, with the
    # archive's, while the bytes are in the cache: the signer takes it instead of reading
    # the part again (see `_s3.sign_known_payloads`).
    signed = "sigv4-payload" in levels
    cutter = _PartCutter(part_size, emit, pool, lease, source=name, checksummer=checksummer, payload_hashes=signed)
    if isinstance(source, DirectorySource):  # a loop over every entry: off the event loop
        directory = source
        total = await workers.compute(lambda: tar_size(directory, settings.archive_mtime))
    else:
        total = source.size
    tracker = _Tracker(artifact, location, total, on_progress)

    def produce_blocking() -> None:
        _write_archive(source, cutter, settings, check=settings.check_prebuilt, on_read=tracker.add_read)
        cutter.finish()

    async def produce() -> None:
        try:
            await workers.stream(produce_blocking)
        except anyio.BrokenResourceError:
            return  # the consumers went away; their error is the one to report
        # Closed only on success: consumers that see the end without a last part never
        # complete the upload; on failure they are cancelled by the task group instead.
        await send_cut.aclose()

    log.info("uploading %s to %s (parts of %d MiB)", artifact, location, part_size >> 20)
    stored_all = False  # from when every target holds the whole object
    try:
        # The send side is closed early on success only; on failure it is closed here, once
        # the task group has cancelled and collected every task.
        with send_cut, first_error():
            async with anyio.create_task_group() as tg:
                tg.start_soon(produce)
                async with receive_cut:
                    parts, expected, etag = await _consume(
                        receive_cut, targets, settings, checksummer, tracker, pool, cleanup, ledger
                    )
                    stored_all = True
        return await _confirm_all(
            targets, cutter, checksummer, parts, expected, etag, levels, tracker, artifact, cleanup
        )
    except anyio.get_cancelled_exc_class():
        if stored_all:  # its cleanup (a run's prefix) removes it; an upload's target keeps it
            uris = ", ".join(target.uri for _, target in targets)
            log.warning("stopped after %s was uploaded, before it was read back: %s is there", artifact, uris)
        raise


async def _confirm_all(
    targets: Sequence[tuple[S3Client, S3Location]],
    cutter: _PartCutter,
    checksummer: Checksummer | None,
    parts: int,
    expected: str | None,
    etag: str | None,
    levels: list[Integrity],
    tracker: _Tracker,
    artifact: str,
    cleanup: CleanupDeadline,
) -> list[UploadedArtifact]:
    """Read every target's object back (size, checksum) and say what was uploaded."""
    size, digest = cutter.size, cutter.sha256.hexdigest()
    algorithm = checksummer.algorithm if checksummer is not None else None
    composite = parts > 1 and not is_full_object(algorithm)  # a single PutObject's is the whole object's
    stored: list[StoredObject | None] = [None] * len(targets)

    async def confirm(index: int) -> None:
        s3, target = targets[index]
        stored[index] = await _confirm(s3, target, size, expected, algorithm, composite, cleanup, etag)

    await run_all(functools.partial(confirm, index) for index in range(len(targets)))
    tracker.report(done=True)
    for (_, target), level in zip(targets, levels, strict=True):
        log.info("uploaded %s: %s, %d bytes, %d part(s), checked by %s", artifact, target, size, parts, level)
    return [
        UploadedArtifact(
            target,
            size,
            digest,
            parts,
            etag=found.etag if found else None,
            checksum=found.checksum if found else None,
            checksum_algorithm=algorithm if found and found.checksum else None,
            integrity=level,
        )
        for (_, target), found, level in zip(targets, stored, levels, strict=True)
    ]


class DigestSink:
    """A sink that only hashes (and counts) what it is given, in a worker thread: a cancelled
    run stops at its next write, not at the end."""

    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        anyio.from_thread.check_cancelled()
        self.sha256.update(data)
        self.size += len(data)


async def digest_artifact(
    source: ArtifactSource, settings: Settings, *, workers: Workers | None = None
) -> tuple[int, str]:
    """The size and sha256 of the archive `upload_artifact` would upload, without uploading it.

    A resumed run uses it to tell whether the inputs are the ones an earlier run registered.
    It reads and gzips the whole input (in a worker thread, gzip on the usual threads) and
    stops within a block of being cancelled.
    """

    def digest_blocking() -> tuple[int, str]:
        sink = DigestSink()
        _write_archive(source, sink, settings, check=False)
        return sink.size, sink.sha256.hexdigest()

    return await (workers or Workers.for_settings(settings)).stream(digest_blocking)


def _write_archive(
    source: ArtifactSource | StreamedArchive,
    sink: Sink,
    settings: Settings,
    *,
    check: bool,
    on_read: Callable[[int], object] | None = None,
) -> None:
    """The archive of `source` into `sink` (blocking): built from a directory, or a prebuilt one
    as it is (read as a tar.gz on the way if `check`)."""
    if isinstance(source, DirectorySource):
        stream_archive(
            source,
            sink,
            level=settings.compression_level,
            mtime=settings.archive_mtime,
            threads=settings.compression_threads,
            on_read=on_read,
            min_saving=settings.compression_min_saving,
        )
    else:
        stream_prebuilt(source, sink, check=check, on_read=on_read)


async def _consume(
    receive: MemoryObjectReceiveStream[_Part],
    targets: Sequence[tuple[S3Client, S3Location]],
    settings: Settings,
    checksummer: Checksummer | None,
    tracker: _Tracker,
    pool: _BufferPool,
    cleanup: CleanupDeadline,
    ledger: OpenUploads | None,
) -> tuple[int, str | None, str | None]:
    """Upload the parts as they come to every target, handing each part's buffer back to `pool`.

    Returns how many parts there were, the object's expected checksum (with a CRC) and its
    expected ETag (with Content-MD5: compared where the server follows S3's convention).
    """
    algorithm = checksummer.algorithm if checksummer is not None else None
    first = await receive.receive()
    if first.last:
        data = bytes(first.data)
        await run_all(
            functools.partial(
                put_object,
                s3,
                location,
                data,
                checksum=algorithm,
                value=first.checksum,
                payload_sha256=first.payload_sha256,
            )
            for s3, location in targets
        )
        tracker.part_done(first.size)
        if algorithm == "MD5":
            return 1, None, base64.b64decode(first.checksum).hex() if first.checksum else None
        return 1, first.checksum, None

    seen_last = False

    async def upload_parts(
        uploads: list[MultipartUpload], parts: MemoryObjectReceiveStream[_Part], initial: _Part | None
    ) -> None:
        nonlocal seen_last
        async with parts:
            if initial is not None:
                await upload(uploads, initial)
            async for part in parts:
                seen_last = seen_last or part.last
                await upload(uploads, part)

    async def upload(uploads: list[MultipartUpload], part: _Part) -> None:
        resent: list[bool] = []

        async def to(mpu: MultipartUpload) -> None:
            sent = mpu.upload_part(part.number, part.data, checksum=part.checksum, payload_sha256=part.payload_sha256)
            resent.append(await sent)

        await run_all(functools.partial(to, mpu) for mpu in uploads)
        tracker.part_done(part.size)
        # Only after success, and only if each target took it at the first send: a request
        # that failed, or one given up on before a retry, may still be sending from the buffer.
        if part.buffer is not None and not part.last:
            if any(resent):
                pool.replace()
            else:
                pool.put(part.buffer)

    # Every upload is aborted if any step fails, all at once, within the exit's deadline.
    async with MultipartUploads(targets, checksum=algorithm, cleanup=cleanup, ledger=ledger) as uploads:
        await run_all(
            functools.partial(upload_parts, uploads, receive.clone(), first if i == 0 else None)
            for i in range(settings.upload_concurrency)
        )
        if not seen_last:  # the stream ended early: never complete a partial archive
            raise RuntimeError("the archive stream ended without its last part")
        whole = checksummer.whole if checksummer is not None else None  # every part was hashed
        await run_all(functools.partial(mpu.complete, whole) for mpu in uploads)
    return tracker.parts_done, uploads[0].expected_checksum, uploads[0].expected_etag


async def _confirm(
    s3: S3Client,
    location: S3Location,
    size: int,
    checksum: str | None,
    algorithm: str | None,
    composite: bool,
    cleanup: CleanupDeadline,
    etag: str | None = None,
) -> StoredObject | None:
    """Check that S3 holds the object whole (size, and checksum where known); delete it if not.

    Returns what S3 reported about it."""
    # A failed HeadObject is a problem too.
    problem, found = await check_object(
        s3, location, size, checksum, algorithm=algorithm, composite=composite, etag=etag
    )
    if problem is None:
        return found
    not_deleted: str | None = f"no answer within the cleanup's {cleanup.timeout:g} s"
    with cleanup.shield():
        try:
            with storage_errors("DeleteObject", location.bucket, location.key):
                await s3.delete_object(Bucket=location.bucket, Key=location.key)
            not_deleted = None
        except StorageError as exc:  # the damage is still the error to report, with this
            not_deleted = exc.message.splitlines()[0]
    fix = "add that permission and run again" if found is None and "needs s3:" in problem else "run again"
    if not_deleted is None:
        outcome = f"the object was deleted, {fix}"
    else:
        outcome = f"it could not be deleted ({not_deleted}): delete it by hand (aws s3 rm {location.uri}), then {fix}"
    if found is None:  # HeadObject itself failed: nothing was compared
        message = f"{location} was uploaded but could not be checked: {problem}; {outcome}"
    else:
        message = f"{location} is not what was uploaded: {problem}; {outcome}"
    raise StorageError(
        message,
        operation="HeadObject",
        bucket=location.bucket,
        key=location.key,
    )
