"""Models already in S3: a prebuilt `.tar.gz` named by its `s3://` URI, copied inside S3.

A training job leaves its `model.tar.gz` in S3. Given that URI (`--model s3://...`, or
`RegistrationRequest(model_path="s3://...")`), the registrar does not download and upload
it again: it copies it into the run's temporary prefix on the server (a multipart copy:
concurrent UploadPartCopy requests, aborted on any failure as an upload is), so no byte of
the model passes through the container's network card. Meanwhile it reads the object once (a
streaming GET) for the sha256 the registry contract needs, checking it as a tar.gz on the
way (in a thread, as a local prebuilt archive is). Both are pinned to the ETag the source had
when it was inspected: a source replaced in the meantime fails the run (exit 4) instead of
registering something else than what was hashed. The copy lives under the run's prefix, so
the cleanup, the lifecycle and the resume rules are those of an upload.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from collections.abc import Sequence

import anyio

from ._artifacts import MAX_OBJECT_SIZE, S3Archive, choose_part_size
from ._concurrency import CleanupDeadline, run_all
from ._errors import InputError, StorageError
from ._multipart import MultipartUploads, OpenUploads, check_object
from ._prebuilt import _NoCheck, _TarGzCheck
from ._progress import ProgressCallback, UploadProgress
from ._s3 import S3Client, S3Location, storage_errors
from ._settings import Settings
from ._threads import Workers
from ._upload import UploadedArtifact

__all__ = ["COPY_PART_SIZE", "copy_to_all", "digest_s3_archive", "inspect_s3_archive"]

log = logging.getLogger("async_registrar.upload")

#: The smallest part of a multipart copy: few requests (each is a copy inside S3, cheap).
COPY_PART_SIZE = 512 * 1024**2
#: How much of the object one read of the streaming GET asks for.
READ_CHUNK = 1024**2


async def inspect_s3_archive(s3: S3Client, uri: str, *, role: str) -> S3Archive:
    """The `.tar.gz` at `uri`: its size and ETag (HeadObject). An object the job's role cannot
    read, or that does not exist, is a `StorageError` naming it (exit 4), before anything is
    written."""
    location = S3Location.parse(uri, what=f"{role} URI")
    if not re.search(r"\.(tar\.gz|tgz)$", location.key):
        raise InputError(
            f"the {role} {uri} is not a .tar.gz: a {role} in S3 must be the prebuilt archive (a training "
            "job's model.tar.gz); a directory cannot be read from S3, give its local path instead",
            [uri],
        )
    try:
        with storage_errors("HeadObject", location.bucket, location.key):
            head = await s3.head_object(Bucket=location.bucket, Key=location.key)
    except StorageError as exc:
        raise exc.restated(f"the {role} {uri} cannot be read: {exc.message}") from exc
    size = int(head["ContentLength"])
    if size > MAX_OBJECT_SIZE:
        raise InputError(f"the {role} {uri} is {size} bytes, past S3's 5 TiB object limit", [uri])
    return S3Archive(location, size, head.get("ETag"))


async def digest_s3_archive(
    s3: S3Client, source: S3Archive, workers: Workers, *, check: bool = True, opened: anyio.Event | None = None
) -> tuple[int, str]:
    """The size and sha256 of `source`, read once with a streaming GET (pinned to its ETag)
    and, if `check`, read as a tar.gz on the way (a bad archive is an `InputError`). `opened`
    is set once S3 answered the GET: the source is there, readable, and still the one seen."""
    where = source.location
    sha256 = hashlib.sha256()
    total = 0
    checker = _TarGzCheck(source) if check else _NoCheck()  # type: ignore[arg-type]  # has .path
    checker.__enter__()
    try:
        with storage_errors("GetObject", where.bucket, where.key):
            pinned = {"IfMatch": source.etag} if source.etag else {}
            response = await s3.get_object(Bucket=where.bucket, Key=where.key, **pinned)
            if opened is not None:
                opened.set()
            stream = response["Body"]
            async with stream:
                while chunk := await stream.read(READ_CHUNK):
                    total += len(chunk)
                    if total > source.size:
                        break

                    def take(data: bytes = chunk) -> None:
                        sha256.update(data)
                        checker.feed(data)  # may wait for the checking thread: a stream, not compute

                    await workers.stream(take)
        if total != source.size:
            raise StorageError(
                f"{where} changed while it was read ({total} bytes read, {source.size} expected); run again",
                operation="GetObject",
                bucket=where.bucket,
                key=where.key,
            )
        await workers.stream(checker.finish)
    finally:
        with anyio.CancelScope(shield=True):  # the checking thread always sees the end
            await workers.stream(lambda: checker.__exit__(None, None, None))
    return total, sha256.hexdigest()


async def copy_to_all(
    s3: S3Client,
    source: S3Archive,
    targets: Sequence[tuple[S3Client, S3Location]],
    settings: Settings,
    *,
    artifact: str,
    workers: Workers,
    cleanup: CleanupDeadline,
    ledger: OpenUploads | None = None,
    on_progress: ProgressCallback | None = None,
    copy_part_size: int = COPY_PART_SIZE,
) -> list[UploadedArtifact]:
    """Copy `source` to every target inside S3 (a multipart copy: UploadPartCopy parts of at
    least `copy_part_size`, concurrently), and read it once (with `s3`) for its sha256, at the
    same time. On any failure the copies are aborted, or deleted if complete; a copy found
    other than the source (its size) is deleted (exit 4)."""
    started = anyio.current_time()
    log.info(
        "copying %s from %s to %s inside S3 (no byte through this process; read once for its sha256)",
        artifact,
        source.location,
        ", ".join(str(target) for _, target in targets),
    )
    digest: list[tuple[int, str]] = []
    parts = [0] * len(targets)
    # The copies start once the GET was answered: a source that is gone, unreadable or replaced
    # fails the read first, before anything is opened at the targets.
    opened = anyio.Event()

    async def read() -> None:
        digest.append(await digest_s3_archive(s3, source, workers, check=settings.check_prebuilt, opened=opened))

    async def copy(index: int) -> None:
        # Always a multipart copy, even of one part: a CopyObject cut off by a failure or a
        # cancellation may still complete on the server, after the cleanup looked; a part copy
        # that lands after the upload was aborted leaves nothing.
        client, target = targets[index]
        await opened.wait()
        part_size = choose_part_size(source.size, max(settings.part_size, copy_part_size))
        ranges = [(start, min(start + part_size, source.size) - 1) for start in range(0, source.size, part_size)]
        limiter = anyio.CapacityLimiter(settings.upload_concurrency)
        async with MultipartUploads([(client, target)], checksum=None, cleanup=cleanup, ledger=ledger) as uploads:
            (upload,) = uploads

            async def one(number: int, first: int, last: int) -> None:
                async with limiter:
                    await upload.copy_part(number, source.location, first, last, source.etag)

            await run_all(functools.partial(one, n, first, last) for n, (first, last) in enumerate(ranges, 1))
            await upload.complete()
        parts[index] = len(ranges)
        problem, _ = await check_object(client, target, source.size, None)
        if problem is not None:
            with cleanup.shield(), storage_errors("DeleteObject", target.bucket, target.key):
                await client.delete_object(Bucket=target.bucket, Key=target.key)
            raise StorageError(
                f"the copy of {source.location} at {target} is not whole: {problem}; it was deleted, run again",
                operation="HeadObject",
                bucket=target.bucket,
                key=target.key,
            )

    try:
        await run_all([read, *(functools.partial(copy, index) for index in range(len(targets)))])
    except BaseException:
        # A copy that got through before another step failed (or that ran on a server that
        # ignores CopySourceIfMatch, as moto does) is not left behind. One still running on
        # the server when this runs is the run's cleanup's (it empties the prefix) or sweep's.
        with cleanup.shield():
            await run_all(functools.partial(_remove, client, target) for client, target in targets)
        raise
    size, sha256 = digest[0]
    elapsed = anyio.current_time() - started
    if on_progress is not None:
        on_progress(
            UploadProgress(
                artifact, targets[0][1].uri, size, size, parts[0], elapsed, True, bytes_total=size, bytes_archived=size
            )
        )
    for (_, target), count in zip(targets, parts, strict=True):
        log.info("copied %s: %s, %d bytes, %d part(s), inside S3", artifact, target, size, count)
    return [
        UploadedArtifact(target, size, sha256, count, integrity="server-copy")
        for (_, target), count in zip(targets, parts, strict=True)
    ]


async def _remove(s3: S3Client, target: S3Location) -> None:
    """Remove what a failed copy may have left at `target`: the object, and a multipart upload
    whose CreateMultipartUpload was cut off before it answered (the server may have opened it).
    A failure is logged (the run's cleanup tries again)."""
    try:
        with storage_errors("DeleteObject", target.bucket, target.key):
            await s3.delete_object(Bucket=target.bucket, Key=target.key)
        with storage_errors("ListMultipartUploads", target.bucket, target.key):
            listed = await s3.list_multipart_uploads(Bucket=target.bucket, Prefix=target.key)
        for upload in listed.get("Uploads", []):
            if upload.get("Key") == target.key:
                with storage_errors("AbortMultipartUpload", target.bucket, target.key):
                    await s3.abort_multipart_upload(Bucket=target.bucket, Key=target.key, UploadId=upload["UploadId"])
    except StorageError as exc:
        log.warning("%s", exc.message)
