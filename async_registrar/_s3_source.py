"""Models already in S3: a prebuilt `.tar.gz` named by its `s3://` URI, copied inside S3.

A training job leaves its `model.tar.gz` in S3. Given that URI (`--model s3://...`, or
`RegistrationRequest(model_path="s3://...")`), the registrar does not download and upload
it again: it copies it into the run's temporary prefix on the server (a multipart copy:
concurrent UploadPartCopy requests, aborted on any failure as an upload is), so no byte of
the model passes through the container's network card. Meanwhile it reads the object once
for the sha256 the registry contract needs, with a few concurrent ranged GETs handed on in
order (a single GET stream is the slow part of a read from S3), checking it as a tar.gz on
the way (in a thread, as a local prebuilt archive is); or it reads a local copy instead,
when the job has one mounted (`model_local_copy`, REGISTRAR_MODEL_LOCAL_COPY), which must
have the object's size. The copy and the reads are pinned to the ETag the source had when
it was inspected: a source replaced in the meantime fails the run (exit 4) instead of
registering something else than what was hashed.

A source in another region than a target's temporary bucket is not copied there: that
read is streamed into an upload instead (the same ranged GETs, or the local copy, feed
both the sha256 and the upload's parts), so no request asks one region's S3 to pull a
multi-gigabyte object from another (an S3-compatible server, or a bucket per region behind
separate endpoints, cannot do it at all). Copies and uploads live under the run's prefix,
so the cleanup, the lifecycle and the resume rules are those of an upload.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import anyio
from botocore.exceptions import BotoCoreError, ClientError

from ._artifacts import MAX_OBJECT_SIZE, ArtifactSource, PrebuiltArchive, S3Archive, StreamedArchive, choose_part_size
from ._budget import MemoryBudget
from ._capabilities import Integrity
from ._concurrency import CleanupDeadline, run_all
from ._errors import InputError, StorageError
from ._multipart import MultipartUploads, OpenUploads, StoredObject, check_object, uploads_at
from ._prebuilt import stream_prebuilt
from ._progress import ProgressCallback, UploadProgress
from ._ranged_read import ranged_reader
from ._s3 import S3Client, S3Location, storage_errors
from ._settings import Settings, describe_field
from ._threads import Workers
from ._upload import DigestSink, UploadedArtifact, upload_to_all

__all__ = [
    "COPY_PART_SIZE",
    "bucket_region",
    "copy_inside",
    "copy_to_all",
    "digest_s3_archive",
    "inspect_s3_archive",
    "local_copy_of",
]

log = logging.getLogger("async_registrar.upload")

#: The smallest part of a multipart copy: few requests (each is a copy inside S3, cheap).
COPY_PART_SIZE = 512 * 1024**2


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
        if exc.code in ("404", "NoSuchKey", "NoSuchBucket"):  # a HEAD's 404 has no body: no code says which
            setting = describe_field("model_path") if role == "model" else f"the {role}'s setting"
            raise exc.restated(
                f"the {role} {uri} does not exist (HeadObject: 404; no such key, or no bucket "
                f"{location.bucket}); fix {setting}, or upload the archive there first"
            ) from exc
        raise exc.restated(f"the {role} {uri} cannot be read: {exc.message}") from exc
    size = int(head["ContentLength"])
    if size > MAX_OBJECT_SIZE:
        raise InputError(f"the {role} {uri} is {size} bytes, past S3's 5 TiB object limit", [uri])
    return S3Archive(location, size, head.get("ETag"))


def local_copy_of(source: S3Archive, found: ArtifactSource, given: Path) -> PrebuiltArchive:
    """The local copy of `source` (`found` at `given` by `inspect_artifact`), if it can be one:
    a .tar.gz of the object's size; else an `InputError` naming both (exit 3)."""
    setting = describe_field("model_local_copy")
    if not isinstance(found, PrebuiltArchive):
        raise InputError(
            f"the model's local copy {given} is not a .tar.gz (nor a directory holding one): it must be the "
            f"mounted copy of {source.location.uri}; fix the path, or unset {setting} to read the object from S3",
            [str(given)],
        )
    if found.size != source.size:
        raise InputError(
            f"the model's local copy {found.path} is {found.size} bytes, but {source.location.uri} is "
            f"{source.size}: it is not a copy of it; mount the same object, or unset {setting} "
            "to read the object from S3",
            [str(found.path), source.location.uri],
        )
    return found


async def bucket_region(s3: S3Client, bucket: str) -> str | None:
    """The region of `bucket` (HeadBucket's `x-amz-bucket-region`, which AWS sends with a 403
    too); None where the server does not say, or cannot be asked."""
    try:
        head = await s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        head = exc.response
    except (BotoCoreError, aiohttp.ClientError) as exc:  # a hint only: a copy that matters fails itself
        log.debug("the region of %s is unknown (%r)", bucket, exc)
        return None
    region = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")
    return str(region) if region else None


async def digest_s3_archive(
    s3: S3Client,
    source: S3Archive,
    workers: Workers,
    *,
    check: bool = True,
    opened: anyio.Event | None = None,
    local_copy: PrebuiltArchive | None = None,
    settings: Settings | None = None,
) -> tuple[int, str]:
    """The size and sha256 of `source`, read once, and (if `check`) read as a tar.gz on the
    way (a bad archive is an `InputError`): from `local_copy` if given (of the same size,
    checked when the request was read), else with concurrent ranged GETs pinned to its ETag.
    `opened` is set once the read began: S3 answered (the source is there, readable, and
    still the one seen), or the local copy is open."""
    sink = DigestSink()
    if local_copy is not None:
        if opened is not None:
            opened.set()
        await workers.stream(lambda: stream_prebuilt(local_copy, sink, check=check))
        return sink.size, sink.sha256.hexdigest()
    async with ranged_reader(s3, source, settings=settings, opened=opened) as reader:
        archive = StreamedArchive(source.path, source.size, reader)
        await workers.stream(lambda: stream_prebuilt(archive, sink, check=check))
    return sink.size, sink.sha256.hexdigest()


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
    local_copy: PrebuiltArchive | None = None,
    budget: MemoryBudget | None = None,
    integrity: Sequence[Integrity] | None = None,
) -> list[UploadedArtifact]:
    """Copy `source` to every target inside S3 (a multipart copy: UploadPartCopy parts of at
    least `copy_part_size`, concurrently), and read it once (with `s3`, or from `local_copy`)
    for its sha256, at the same time. A target whose bucket is in another region than the
    source's (where both are known: see `bucket_region`) gets an upload of that same read
    instead (`budget` and `integrity` as for `upload_to_all`). On any failure the copies and
    uploads are aborted, or deleted if complete; a copy found other than the source (its
    size) is deleted (exit 4)."""
    started = anyio.current_time()
    home, regions = await _regions(s3, source, targets)
    streamed = [i for i in range(len(targets)) if home is not None and regions[i] not in (None, home)]
    copied = [i for i in range(len(targets)) if i not in streamed]
    if copied:
        log.info(
            "copying %s from %s to %s inside S3 (no byte through this process; read once for its sha256)",
            artifact,
            source.location,
            ", ".join(str(targets[i][1]) for i in copied),
        )
    if streamed:
        log.info(
            "streaming %s from %s (%s) to %s: another region, not copied inside S3",
            artifact,
            local_copy.path if local_copy is not None else source.location,
            home,
            ", ".join(f"{targets[i][1]} ({regions[i]})" for i in streamed),
        )
    digest: list[tuple[int, str]] = []
    results: dict[int, UploadedArtifact] = {}
    # The copies start once the read began: a source that is gone, unreadable or replaced
    # fails the read first, before anything is opened at the targets.
    opened = anyio.Event()

    async def read() -> None:
        digest.append(
            await digest_s3_archive(
                s3,
                source,
                workers,
                check=settings.check_prebuilt,
                opened=opened,
                local_copy=local_copy,
                settings=settings,
            )
        )

    async def stream() -> None:
        """One read of the source (or its local copy), uploaded to the other regions' targets."""
        levels = [integrity[i] for i in streamed] if integrity else None
        upload = functools.partial(
            upload_to_all,
            targets=[targets[i] for i in streamed],
            settings=settings,
            artifact=artifact,
            on_progress=on_progress,
            cleanup=cleanup,
            workers=workers,
            budget=budget,
            ledger=ledger,
            integrity=levels,
        )
        if local_copy is not None:
            opened.set()
            uploaded = await upload(local_copy)
        else:
            async with ranged_reader(s3, source, settings=settings, opened=opened) as reader:
                uploaded = await upload(StreamedArchive(source.path, source.size, reader))
        for index, result in zip(streamed, uploaded, strict=True):
            results[index] = result
        digest.append((uploaded[0].size, uploaded[0].sha256))

    async def copy(index: int) -> None:
        client, target = targets[index]
        await opened.wait()
        parts, _ = await copy_inside(
            client, source, target, settings, cleanup=cleanup, ledger=ledger, copy_part_size=copy_part_size
        )
        results[index] = UploadedArtifact(target, source.size, "", parts, integrity="server-copy")

    try:
        await run_all([stream if streamed else read, *(functools.partial(copy, index) for index in copied)])
    except BaseException:
        # A copy (or upload) that got through before another step failed (or that ran on a
        # server that ignores CopySourceIfMatch, as moto does) is not left behind. One still
        # running on the server when this runs is the run's cleanup's (it empties the prefix)
        # or sweep's.
        with cleanup.shield():
            await run_all(functools.partial(_remove, client, target) for client, target in targets)
        raise
    size, sha256 = digest[0]
    if copied and on_progress is not None:
        elapsed = anyio.current_time() - started
        on_progress(
            UploadProgress(
                artifact,
                targets[copied[0]][1].uri,
                size,
                size,
                results[copied[0]].parts,
                elapsed,
                True,
                bytes_total=size,
                bytes_archived=size,
            )
        )
    for index in copied:
        log.info(
            "copied %s: %s, %d bytes, %d part(s), inside S3", artifact, targets[index][1], size, results[index].parts
        )
        results[index] = UploadedArtifact(
            targets[index][1], size, sha256, results[index].parts, integrity="server-copy"
        )
    return [results[index] for index in range(len(targets))]


async def copy_inside(
    client: S3Client,
    source: S3Archive,
    target: S3Location,
    settings: Settings,
    *,
    cleanup: CleanupDeadline,
    ledger: OpenUploads | None = None,
    copy_part_size: int = COPY_PART_SIZE,
) -> tuple[int, StoredObject | None]:
    """Copy `source` (pinned to its ETag) to `target` inside S3: UploadPartCopy parts of at
    least `copy_part_size`, `upload_concurrency` at once; the part count, and what S3 reports
    of the copy.  Aborted on any failure; a copy found other than the source (its size) is
    deleted (`StorageError`)."""
    # Always a multipart copy, even of one part: a CopyObject cut off by a failure or a
    # cancellation may still complete on the server, after the cleanup looked; a part copy
    # that lands after the upload was aborted leaves nothing.
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
    # Its size (and ETag) only: no checksum was sent to compare, and no checksum mode asked
    # for, which a server refusing the flexible-checksum headers (B2) refuses.
    problem, stored = await check_object(client, target, source.size, None, algorithm=None)
    if problem is not None:
        with cleanup.shield(), storage_errors("DeleteObject", target.bucket, target.key):
            await client.delete_object(Bucket=target.bucket, Key=target.key)
        raise StorageError(
            f"the copy of {source.location} at {target} is not whole: {problem}; it was deleted, run again",
            operation="HeadObject",
            bucket=target.bucket,
            key=target.key,
        )
    return len(ranges), stored


async def _regions(
    s3: S3Client, source: S3Archive, targets: Sequence[tuple[S3Client, S3Location]]
) -> tuple[str | None, list[str | None]]:
    """The region of the source's bucket and of each target's (None where unknown); each
    bucket asked once, all at once."""
    buckets = {(id(s3), source.location.bucket): (s3, source.location.bucket)}
    buckets.update({(id(client), target.bucket): (client, target.bucket) for client, target in targets})
    found: dict[tuple[int, str], str | None] = {}

    async def ask(key: tuple[int, str]) -> None:
        found[key] = await bucket_region(*buckets[key])

    await run_all(functools.partial(ask, key) for key in buckets)
    return found[(id(s3), source.location.bucket)], [found[(id(client), target.bucket)] for client, target in targets]


async def _remove(s3: S3Client, target: S3Location) -> None:
    """Remove what a failed copy may have left at `target`: the object, and a multipart upload
    whose CreateMultipartUpload was cut off before it answered (the server may have opened it).
    A failure is logged (the run's cleanup tries again)."""
    try:
        with storage_errors("DeleteObject", target.bucket, target.key):
            await s3.delete_object(Bucket=target.bucket, Key=target.key)
        for upload in await uploads_at(s3, target):
            with storage_errors("AbortMultipartUpload", target.bucket, target.key):
                await s3.abort_multipart_upload(Bucket=target.bucket, Key=target.key, UploadId=upload["UploadId"])
    except StorageError as exc:
        log.warning("%s", exc.message)
