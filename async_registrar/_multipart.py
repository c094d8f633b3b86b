"""One S3 multipart upload, driven by hand so that it is always finished or aborted.

aioboto3's `upload_fileobj` buffers up to 100 parts and does not abort when it
is cancelled; this drives `create_multipart_upload` / `upload_part` /
`complete_multipart_upload` / `abort_multipart_upload` itself.  Leaving the
context without completing (an error, a cancellation) aborts the upload,
shielded from cancellation and bounded by the exit's cleanup deadline.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any

import anyio
from botocore.exceptions import BotoCoreError, ClientError

from ._checksums import composite_crc32, is_full_object, multipart_etag
from ._concurrency import CleanupDeadline
from ._credentials import credential_problem, is_credential_failure
from ._errors import REMOVE_BY_HAND, StorageError
from ._s3 import S3Client, S3Location, error_code, storage_errors

__all__ = [
    "MultipartUpload",
    "MultipartUploads",
    "OpenUploads",
    "PartBody",
    "StoredObject",
    "check_object",
    "put_object",
    "uploads_at",
]

log = logging.getLogger("async_registrar.upload")

#: What S3 answers when a part's bytes do not match its checksum or Content-MD5.
DAMAGED_PART_CODES = ("BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch")
#: How many times a part found damaged is sent.
DAMAGED_PART_ATTEMPTS = 3
#: How long at most a part answered NoSuchUpload waits for the parts still on their way to
#: answer, one of them perhaps that it arrived damaged (see `MultipartUpload.upload_part`):
#: only the error reported depends on it.
DAMAGE_SETTLE = 5.0


class PartBody(io.BytesIO):
    """A read-only, seekable file over a part's buffer, without copying it.

    botocore hashes a body by reading it in chunks and aiohttp sends a `BytesIO` in
    64 KiB chunks with flow control; both accept the memoryview slices this returns.
    Handing them the bare bytearray instead would make aiohttp push the whole part into
    the socket's buffer at once (a second copy per part in flight); a real `BytesIO`
    would copy the part up front.
    """

    def __init__(self, data: bytes | bytearray | memoryview, payload_sha256: str | None = None) -> None:
        super().__init__()
        self._view = memoryview(data)
        self._position = 0
        #: The hex sha256 of the whole body, where known: the signer takes it instead of
        #: hashing the body again (see `_s3.sign_known_payloads`).
        self.payload_sha256 = payload_sha256

    def __len__(self) -> int:
        return len(self._view) - self._position

    def read(self, size: int | None = -1, /) -> memoryview:  # type: ignore[override]
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._position + size)
        chunk = self._view[self._position : end]
        self._position = end
        return chunk

    def readinto(self, buffer: Any, /) -> int:
        """Copy the next bytes into `buffer` (the AWS CRT's signer reads a body this way: the
        inherited method would read BytesIO's own, empty, buffer and sign an empty payload)."""
        with memoryview(buffer) as target:
            chunk = self.read(len(target))
            target[: len(chunk)] = chunk
            return len(chunk)

    readinto1 = readinto

    def seek(self, offset: int, whence: int = io.SEEK_SET, /) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}[whence]
        self._position = max(0, min(base + offset, len(self._view)))
        return self._position

    def tell(self) -> int:
        return self._position

    def getbuffer(self) -> memoryview:
        return self._view[:]  # a view of its own: callers release it with `with`


class OpenUploads:
    """The multipart uploads a run opened and has not closed (completed or aborted), and the
    creations it sent whose answer never came.

    The cleanup lists a prefix's open uploads to abort them; when a server cannot list them
    (rclone answers ListMultipartUploads with NoSuchUpload, a role may lack the permission),
    this says whether anything could be open there at all.
    """

    def __init__(self) -> None:
        self._open: dict[str, tuple[str, str]] = {}  # upload id -> (bucket, key)
        self._unanswered: list[tuple[str, str]] = []

    def creating(self, bucket: str, key: str) -> None:
        self._unanswered.append((bucket, key))

    def answered(self, bucket: str, key: str, upload_id: str | None, *, strays: bool = False) -> None:
        """The creation was answered: with an upload id, or refused (None).  With `strays`,
        an earlier attempt of it (whose answer was lost) may have opened another upload there
        that no abort reached: the place stays among the unanswered."""
        if not strays:
            self._unanswered.remove((bucket, key))
        if upload_id is not None:
            self._open[upload_id] = (bucket, key)

    def closed(self, upload_id: str) -> None:
        self._open.pop(upload_id, None)

    def none_open_under(self, bucket: str, prefix: str) -> bool:
        """True if no upload this run opened under `prefix` can still be open."""
        places = [*self._open.values(), *self._unanswered]
        return not any(b == bucket and k.startswith(prefix) for b, k in places)


#: How long a CreateMultipartUpload or CompleteMultipartUpload already sent is still waited
#: for once its caller is cancelled (at most a fifth of the cleanup's time, out of the exit's
#: deadline): the upload a creation opens is then aborted; an object a completion made is
#: then known to be there.
ANSWER_WAIT = 5.0


class MultipartUpload:
    """A multipart upload to `location`: created on entry, aborted on exit unless completed.

    `checksum` names the algorithm S3 checks each part with (None: no checksums); with
    CRC64NVME, S3 also checks the whole object's checksum given to `complete`.
    """

    def __init__(
        self,
        s3: S3Client,
        location: S3Location,
        *,
        checksum: str | None,
        cleanup: CleanupDeadline,
        ledger: OpenUploads | None = None,
    ) -> None:
        self._s3 = s3
        self.location = location
        self._ledger = ledger
        self._checksum = checksum
        self._full_object = is_full_object(checksum)
        self._cleanup = cleanup
        self.upload_id: str | None = None
        self._parts: dict[int, dict[str, Any]] = {}
        self._sizes: dict[int, int] = {}
        self._md5s: dict[int, str] = {}  # with Content-MD5: each part's (base64)
        self._opaque_etags = False  # a part's ETag was not its MD5: no ETag to compare
        self._damaged: set[int] = set()  # the parts S3 found damaged on their way
        self._sending: set[int] = set()  # the parts on their way, not answered yet
        self._answer: anyio.Event | None = None  # set as a part answers, for `_explain_dropped`
        self._whole: str | None = None
        self._completed = False
        self._completion_sent = False
        self._aborted = False
        self._abort_failed = False
        self._entered = False

    async def __aenter__(self) -> MultipartUpload:
        if self._entered:
            raise RuntimeError("a MultipartUpload can be entered only once")
        self._entered = True
        extra = {"ChecksumAlgorithm": self._checksum} if self._checksum in _CRC else {}
        if self._full_object:
            extra["ChecksumType"] = "FULL_OBJECT"
        bucket, key = self.location.bucket, self.location.key
        if self._ledger is not None:
            self._ledger.creating(bucket, key)
        started = anyio.current_time()
        try:
            response = await self._create(extra)
        except StorageError as exc:
            # A 4xx at the first attempt: S3 opened nothing.  At a later one, the attempt
            # before it may have opened an upload and lost the answer: it stays unanswered.
            if self._ledger is not None and _refused(exc) and not _retried(exc.__cause__):
                self._ledger.answered(bucket, key, None)
            raise
        self.upload_id = response["UploadId"]
        strays = False
        if _retried(response):  # an attempt whose answer was lost may have opened another
            try:
                strays = not await self._abort_strays(anyio.current_time() - started)
            except BaseException:  # cancelled while it looked: no exit follows a failed entry
                if self._ledger is not None:  # the cleanup lists the place
                    self._ledger.answered(bucket, key, self.upload_id, strays=True)
                else:
                    log.warning(
                        "stopped while looking for an upload to %s that a lost attempt of its creation may "
                        "have opened; if one is there, abort it (aws s3api list-multipart-uploads) or let "
                        "the bucket's lifecycle rule do it",
                        self.location,
                    )
                await self.__aexit__(None, None, None)  # so this one is aborted here
                raise
        if self._ledger is not None:
            self._ledger.answered(bucket, key, self.upload_id, strays=strays)
        log.debug("started multipart upload to %s", self.location)
        return self

    async def _create(self, extra: dict[str, str]) -> dict[str, Any]:
        """CreateMultipartUpload, seen through to its answer (see `_seen_through`): S3 opens the
        upload all the same, and only its id lets it be aborted (where no listing of a prefix of
        the run's own will find it: `upload`)."""
        bucket, key = self.location.bucket, self.location.key

        async def opened(response: dict[str, Any]) -> None:  # after a cancellation: abort it
            self.upload_id = response["UploadId"]
            if self._ledger is not None:
                self._ledger.answered(bucket, key, self.upload_id, strays=_retried(response))
            await self.__aexit__(None, None, None)

        return await self._seen_through(
            "CreateMultipartUpload",
            functools.partial(self._s3.create_multipart_upload, Bucket=bucket, Key=key, **extra),
            opened,
        )

    async def _seen_through(
        self,
        operation: str,
        request: Callable[[], Awaitable[dict[str, Any]]],
        answered_late: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> dict[str, Any]:
        """Send `request` (S3's `operation`) and return its answer.  If the caller is cancelled
        meanwhile, the request is seen through to its answer for a while (`ANSWER_WAIT`, out of
        the exit's cleanup deadline): S3 acts on it all the same, and only its answer tells what
        it did; a success that comes then goes to `answered_late` before the cancellation goes on."""
        bucket, key = self.location.bucket, self.location.key
        outcome: list[dict[str, Any] | Exception] = []
        answered = anyio.Event()
        sent = anyio.CancelScope(shield=True)

        async def send() -> None:
            try:
                with sent, storage_errors(operation, bucket, key):
                    outcome.append(await request())
            except Exception as exc:  # handed to the caller, as it is
                outcome.append(exc)
            finally:
                answered.set()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(send)
                try:
                    await answered.wait()
                except anyio.get_cancelled_exc_class():
                    # This is the exit: the wait comes out of its cleanup deadline, which the
                    # abort that may follow shares, so the whole exit stays within its timeout.
                    wait = anyio.current_time() + min(ANSWER_WAIT, self._cleanup.timeout / 5)
                    sent.deadline = min(wait, self._cleanup.deadline)
                    raise
        except anyio.get_cancelled_exc_class():
            if outcome and isinstance(outcome[0], dict):
                await answered_late(outcome[0])
            raise
        if not outcome:  # cut off by the wait above, which only a cancellation starts
            raise RuntimeError(f"{operation} ended without an answer")
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        return outcome[0]

    async def _abort_strays(self, took: float) -> bool:
        """Abort the uploads an earlier attempt of this creation opened (its answer lost, botocore
        sent it again): those at this very key that S3 started in the `took` seconds before this
        one (a margin on either side; another writer of the same key within them is a conflict
        already).  Returns whether none can be left; if the listing or an abort fails, says so."""
        bucket, key = self.location.bucket, self.location.key
        try:
            uploads = await uploads_at(self._s3, self.location)
            ours = next((u for u in uploads if u.get("UploadId") == self.upload_id), None)
            if ours is None:
                raise StorageError(
                    f"{self.location}: this upload is not among those listed", operation="ListMultipartUploads"
                )
            if not all(isinstance(u.get("Initiated"), datetime) for u in uploads):
                raise StorageError(
                    f"{self.location}: the listing says no start times", operation="ListMultipartUploads"
                )
            until = ours["Initiated"].timestamp()
            since = until - took - 2.0
            strays = [u["UploadId"] for u in uploads if u is not ours and since <= u["Initiated"].timestamp() <= until]
            for stray in strays:
                with storage_errors("AbortMultipartUpload", bucket, key):
                    await self._s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=stray)
                log.info("aborted an upload to %s that an earlier attempt of its creation opened", self.location)
        except StorageError as exc:
            log.warning(
                "CreateMultipartUpload to %s was sent again after an answer was lost, and the upload that "
                "attempt may have opened could not be looked for (%s); %s",
                self.location,
                exc.message.splitlines()[0],
                "the cleanup names the place"
                if self._ledger is not None
                else "if one is there, abort it (aws s3api list-multipart-uploads) or let the bucket's "
                "lifecycle rule do it",
            )
            return False
        return True

    async def upload_part(
        self,
        number: int,
        data: bytes | bytearray | memoryview,
        *,
        checksum: str | None = None,
        payload_sha256: str | None = None,
    ) -> bool:
        """Upload part `number` (1-based); S3 verifies its checksum (`checksum` if given, else
        botocore's); a signed payload is signed with `payload_sha256`, the part's, if given.

        Returns whether it was sent more than once (botocore's retries, or sent again after
        S3 found it damaged): an attempt given up on may still be sending from `data` (uvloop,
        and asyncio from Python 3.12, send what the socket has not taken yet from the caller's
        buffer, not a copy), so that buffer must not be refilled."""
        extra = _checksum_args(self._checksum, checksum)
        size = len(data)
        for attempt in range(1, DAMAGED_PART_ATTEMPTS + 1):
            self._sending.add(number)
            try:
                with storage_errors(f"UploadPart (part {number})", self.location.bucket, self.location.key):
                    response = await self._s3.upload_part(
                        Bucket=self.location.bucket,
                        Key=self.location.key,
                        UploadId=self.upload_id,
                        PartNumber=number,
                        Body=PartBody(data, payload_sha256),
                        **extra,
                    )
                break
            except StorageError as exc:
                self._sending.discard(number)  # answered: `_explain_dropped` waits on the others only
                if exc.code in DAMAGED_PART_CODES:
                    self._damaged.add(number)
                elif exc.code == "NoSuchUpload" and attempt == 1:
                    await self._explain_dropped(number, exc)
                if attempt > 1 and exc.code not in DAMAGED_PART_CODES:
                    # `rclone serve s3` drops the whole upload with a damaged part: the part sent
                    # again gets NoSuchUpload (or, answered before its body was read, a reset).
                    raise exc.restated(
                        f"part {number} of {self.location} arrived damaged, and sending it again failed: {exc}. "
                        "Some servers (`rclone serve s3`) drop the whole multipart upload when a part arrives "
                        "damaged; nothing damaged was kept: run again",
                    ) from exc
                # S3 found the part damaged on its way (its checksum or Content-MD5 did not
                # match): a one-off corruption in transit is sent again, like a 5xx.
                if exc.code not in DAMAGED_PART_CODES:
                    raise
                if attempt == DAMAGED_PART_ATTEMPTS:
                    raise _damaged_every_time(exc, f"part {number}") from exc
                log.info("part %d of %s arrived damaged (%s); sending it again", number, self.location, exc.code)
            finally:
                self._sending.discard(number)
                if self._answer is not None:
                    self._answer.set()
        self._damaged.discard(number)  # sent again whole: no longer a reason for a NoSuchUpload
        etag = response.get("ETag")
        if not etag:
            # CompleteMultipartUpload needs each part's ETag: without one the upload cannot be
            # completed, and the server is not answering as S3 does.
            raise StorageError(
                f"part {number} of {self.location} was accepted without an ETag (UploadPart's answer "
                "had no ETag header), so the upload cannot be completed: the S3 server, or a proxy in "
                "front of it, does not answer as S3 does; check the endpoint (REGISTRAR_S3_ENDPOINT_URL)",
                operation="UploadPart",
                bucket=self.location.bucket,
                key=self.location.key,
            )
        part: dict[str, Any] = {"PartNumber": number, "ETag": etag}
        if self._checksum == "MD5" and checksum:
            self._md5s[number] = checksum
            # S3's ETag convention (an MD5 of the parts' MD5s) holds only where each part's ETag
            # is its MD5: a server that encrypts at rest answers opaque ETags.
            if etag.strip('"') != base64.b64decode(checksum).hex():
                self._opaque_etags = True
        elif self._checksum:
            value = response.get(f"Checksum{self._checksum}") or checksum
            if value:
                part[f"Checksum{self._checksum}"] = value
        self._parts[number] = part
        self._sizes[number] = size
        return attempt > 1 or bool(response.get("ResponseMetadata", {}).get("RetryAttempts"))

    async def _explain_dropped(self, number: int, exc: StorageError) -> None:
        """Part `number` got NoSuchUpload: if another part of this upload arrived damaged, the
        server dropped the whole upload for it (`rclone serve s3` does), and that is the error to
        report, whichever part's answer came first.  The damaged part's answer was sent first
        but may be read later, on its own connection: the parts still on their way are given
        up to `DAMAGE_SETTLE` to answer (they do at once, the upload being gone)."""
        with anyio.move_on_after(DAMAGE_SETTLE):
            while not self._damaged and self._sending:
                if self._answer is None or self._answer.is_set():  # one event for every part waiting
                    self._answer = anyio.Event()
                await self._answer.wait()
        if self._damaged:
            damaged = min(self._damaged)
            raise exc.restated(
                f"part {damaged} of {self.location} arrived damaged, and the server dropped the whole multipart "
                f"upload (part {number} then got NoSuchUpload). Some servers (`rclone serve s3`) do so when a part "
                "arrives damaged; nothing damaged was kept: run again",
            ) from exc

    async def copy_part(self, number: int, source: S3Location, first: int, last: int, etag: str | None) -> None:
        """Make part `number` (1-based) a server-side copy of bytes `first`..`last` (inclusive) of
        `source`, as it was when its ETag was `etag`: no byte passes through this process."""
        extra = {"CopySourceIfMatch": etag} if etag else {}
        with storage_errors(f"UploadPartCopy (part {number}, from {source})", self.location.bucket, self.location.key):
            response = await self._s3.upload_part_copy(
                Bucket=self.location.bucket,
                Key=self.location.key,
                UploadId=self.upload_id,
                PartNumber=number,
                CopySource={"Bucket": source.bucket, "Key": source.key},
                CopySourceRange=f"bytes={first}-{last}",
                **extra,
            )
        self._parts[number] = {"PartNumber": number, "ETag": response["CopyPartResult"]["ETag"]}
        self._sizes[number] = last - first + 1

    @property
    def completed(self) -> bool:
        """Whether the upload was completed (its exit then aborts nothing)."""
        return self._completed

    @property
    def size(self) -> int:
        """The bytes uploaded in all parts."""
        return sum(self._sizes.values())

    @property
    def expected_checksum(self) -> str | None:
        """The object's checksum as S3 will report it (base64, without a "-N" suffix), if known:
        the composite of the parts' CRC32s, or the whole-object CRC64NVME given to `complete`."""
        if self._full_object:
            return self._whole
        if self._checksum != "CRC32" or not self._parts:  # composite_crc32 knows CRC32 only
            return None
        values: list[str] = [self._parts[n].get("ChecksumCRC32") or "" for n in sorted(self._parts)]
        return composite_crc32(values) if all(values) else None

    @property
    def expected_etag(self) -> str | None:
        """With Content-MD5 parts: the ETag S3's convention gives the object ("<md5 of the
        parts' MD5s>-N"), if every part's MD5 is known and each part's ETag was its MD5 (a
        server that encrypts at rest answers other ETags: nothing to compare)."""
        if self._checksum != "MD5" or not self._parts or len(self._md5s) != len(self._parts):
            return None
        if self._opaque_etags:
            return None
        return multipart_etag([self._md5s[n] for n in sorted(self._md5s)])

    async def complete(self, whole: str | None = None) -> None:
        """Complete the upload from the parts uploaded so far, in order.

        With CRC64NVME, `whole` is the object's checksum: S3 checks it, and the object size,
        before it completes.

        If completing reports an error (S3 can answer 200 with an error body, and a retry of
        a completion that did succeed gets NoSuchUpload), the object is checked with
        HeadObject: when it is whole (size and checksum), the upload did complete.
        """
        parts = [self._parts[n] for n in sorted(self._parts)]
        if [p["PartNumber"] for p in parts] != list(range(1, len(parts) + 1)):
            raise StorageError(
                f"multipart upload to {self.location} is missing parts; it was aborted",
                operation="CompleteMultipartUpload",
                bucket=self.location.bucket,
                key=self.location.key,
            )
        extra: dict[str, Any] = {}
        if self._full_object and whole:
            self._whole = whole
            extra = {f"Checksum{self._checksum}": whole, "ChecksumType": "FULL_OBJECT", "MpuObjectSize": self.size}
        self._completion_sent = True
        try:
            await self._complete(parts, extra)
        except StorageError as error:
            problem, _ = await check_object(
                self._s3,
                self.location,
                self.size,
                self.expected_checksum,
                algorithm=self._checksum,
                composite=not self._full_object,
                etag=self.expected_etag,
            )
            if problem is not None or not await self._closed_by_completion():
                raise error from None
            log.warning("%s; but %s is whole (size and checksum), so the upload did complete", error, self.location)
        self._done()

    def _done(self) -> None:
        """The upload is completed: its exit aborts nothing."""
        self._completed = True
        if self._ledger is not None and self.upload_id is not None:
            self._ledger.closed(self.upload_id)

    async def _complete(self, parts: list[dict[str, Any]], extra: dict[str, Any]) -> None:
        """CompleteMultipartUpload, seen through to its answer (see `_seen_through`): S3 goes on
        completing it, and the object may land only after the cleanup looked for it (an abort then
        finds NoSuchUpload, and nothing else tells).  If it answers in time, the upload counts as
        completed: the object is there for whoever cleans up the place (a run's temporary prefix
        removes it; an `upload`'s target keeps it, logged)."""

        async def completed(_: dict[str, Any]) -> None:  # after a cancellation
            self._done()
            log.warning("stopped as its upload completed: %s is there", self.location)

        await self._seen_through(
            "CompleteMultipartUpload",
            functools.partial(
                self._s3.complete_multipart_upload,
                Bucket=self.location.bucket,
                Key=self.location.key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": parts},
                **extra,
            ),
            completed,
        )

    async def _closed_by_completion(self) -> bool:
        """After a completion that reported an error, with the object found whole: whether this
        upload is the one that completed, told by aborting it.  NoSuchUpload says it is closed, so
        a completion went through; an abort that succeeds says it was still open, so the object
        found is an earlier one (the same bytes uploaded to the same key before) and this
        completion failed.  An abort that fails tells nothing: the exit tries it again."""
        assert self.upload_id is not None
        try:
            with storage_errors("AbortMultipartUpload", self.location.bucket, self.location.key):
                await self._s3.abort_multipart_upload(
                    Bucket=self.location.bucket, Key=self.location.key, UploadId=self.upload_id
                )
        except StorageError as exc:
            return exc.code == "NoSuchUpload"
        log.debug("aborted multipart upload to %s: its completion had failed", self.location)
        self._closed()
        return False

    def _closed(self) -> None:
        """The upload is closed (aborted): its exit has nothing left to do."""
        self._aborted = True
        if self._ledger is not None and self.upload_id is not None:
            self._ledger.closed(self.upload_id)

    async def _confirm_aborted(self) -> None:
        """Abort once more: S3 documents that a part still on its way may land after an abort
        (and a proxy may answer for a server), so an upload is known closed only once an abort
        gets NoSuchUpload.  Another success means it was still open: closed now.  A failure
        raises (the upload is then named as left open)."""
        assert self.upload_id is not None
        try:
            await self._s3.abort_multipart_upload(
                Bucket=self.location.bucket, Key=self.location.key, UploadId=self.upload_id
            )
        except ClientError as exc:
            if error_code(exc) in ("NoSuchUpload", "404"):
                return
            raise
        log.info(
            "the multipart upload to %s (upload id %s) was still open after it was aborted; aborted again",
            self.location,
            self.upload_id,
        )

    @property
    def left_open(self) -> str | None:
        """The upload, if its exit could not abort it and no cleanup will look for it (without a
        ledger, no listing of a prefix of the run's own does): `s3://bucket/key (upload id ...)`."""
        if not self._abort_failed or self._ledger is not None:
            return None
        return f"{self.location.uri} (upload id {self.upload_id})"

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._completed or self._aborted or self.upload_id is None:
            return
        with self._cleanup.shield() as scope:
            try:
                await self._s3.abort_multipart_upload(
                    Bucket=self.location.bucket, Key=self.location.key, UploadId=self.upload_id
                )
                log.debug("aborted multipart upload to %s", self.location)
                await self._confirm_aborted()
                self._closed()
                return
            except Exception as abort_error:  # the original error is the one to report
                if isinstance(abort_error, ClientError) and error_code(abort_error) == "NoSuchUpload":
                    # No longer open, nothing left to abort: the server dropped it (`rclone
                    # serve s3` does with a damaged part), or a completion went through.
                    if self._completion_sent:  # unanswered: the object may have landed
                        log.warning(
                            "the multipart upload to %s (upload id %s) was no longer open: its completion, sent "
                            "as it stopped, may have gone through, and the object may be there",
                            self.location,
                            self.upload_id,
                        )
                    else:
                        log.info(
                            "the multipart upload to %s (upload id %s) was no longer open: the server dropped it",
                            self.location,
                            self.upload_id,
                        )
                    self._closed()
                    return
                log.warning(
                    "could not abort the multipart upload to %s (upload id %s): %s",
                    self.location,
                    self.upload_id,
                    abort_error,
                )
        self._abort_failed = True
        if scope.cancelled_caught:
            log.warning("aborting the multipart upload to %s (upload id %s) timed out", self.location, self.upload_id)


class MultipartUploads:
    """One object sent to several places: a `MultipartUpload` each, created on entry and, unless
    completed, aborted together on exit (at once, so that each gets its share of the deadline)."""

    def __init__(
        self,
        targets: Sequence[tuple[S3Client, S3Location]],
        *,
        checksum: str | None,
        cleanup: CleanupDeadline,
        ledger: OpenUploads | None = None,
    ) -> None:
        self._uploads = [
            MultipartUpload(s3, location, checksum=checksum, cleanup=cleanup, ledger=ledger) for s3, location in targets
        ]
        self._cleanup = cleanup
        self._entered: list[MultipartUpload] = []

    async def __aenter__(self) -> list[MultipartUpload]:
        try:
            for upload in self._uploads:
                await upload.__aenter__()
                self._entered.append(upload)
        except BaseException:
            await self._abort_all()
            raise
        return self._uploads

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._abort_all()
        left = [upload.left_open for upload in self._entered if upload.left_open]
        if left and isinstance(exc, Exception):  # said on the error the caller gets
            exc.add_note(f"a multipart upload could not be aborted; {REMOVE_BY_HAND} {', '.join(left)}")

    async def _abort_all(self) -> None:
        unfinished = [upload for upload in self._entered if not upload.completed]
        if not unfinished:  # a success is no exit: it must not start the exit's deadline
            return
        with self._cleanup.shield():
            async with anyio.create_task_group() as tg:
                for upload in unfinished:
                    tg.start_soon(upload.__aexit__, None, None, None)


async def put_object(
    s3: S3Client,
    location: S3Location,
    data: bytes,
    *,
    checksum: str | None,
    value: str | None = None,
    payload_sha256: str | None = None,
) -> None:
    """Upload a small artifact in one request, with its `checksum` algorithm's `value` if computed
    (and its sha256, for a signed payload, if known).  Refused as damaged on its way (its
    checksum, Content-MD5 or signed sha256 did not match), it is sent again, as a part is
    (`DAMAGED_PART_ATTEMPTS` in all): a one-off corruption in transit did not fail the run."""
    extra = _checksum_args(checksum, value)
    for attempt in range(1, DAMAGED_PART_ATTEMPTS + 1):
        body = PartBody(data, payload_sha256) if payload_sha256 is not None else data
        try:
            with storage_errors("PutObject", location.bucket, location.key):
                await s3.put_object(Bucket=location.bucket, Key=location.key, Body=body, **extra)
            return
        except StorageError as exc:
            if exc.code not in DAMAGED_PART_CODES:
                raise
            if attempt == DAMAGED_PART_ATTEMPTS:
                raise _damaged_every_time(exc, str(location)) from exc
            log.info("%s arrived damaged (%s); sending it again", location, exc.code)


def _damaged_every_time(exc: StorageError, what: str) -> StorageError:
    """`exc`, the last of `DAMAGED_PART_ATTEMPTS` refusals of `what` as damaged, saying so.

    Without `exc`'s own hint: for XAmzContentSHA256Mismatch (a signed payload found damaged,
    which is also how a server without aws-chunked trailers refuses one) it says to set
    `when_required`, which signs payloads too and would not help."""
    where = f"s3://{exc.bucket}/{exc.key}" if exc.key else f"s3://{exc.bucket}"
    return exc.restated(
        f"S3 {exc.operation} failed for {where}: {exc.code}; {what} arrived damaged {DAMAGED_PART_ATTEMPTS} "
        "times in a row: something on the way alters it (a proxy, faulty memory or network card)",
    )


#: The algorithms sent as an x-amz-checksum-* header (MD5 goes as Content-MD5).
_CRC = ("CRC32", "CRC64NVME")

#: The bytes of each checksum algorithm's value.
_CHECKSUM_BYTES = {"CRC32": 4, "CRC32C": 4, "CRC64NVME": 8, "SHA1": 20, "SHA256": 32}


def _has_length(value: str, algorithm: str) -> bool:
    """Whether a base64 checksum `value` has the length of `algorithm`'s."""
    try:
        return len(base64.b64decode(value, validate=True)) == _CHECKSUM_BYTES.get(algorithm, 0)
    except ValueError:
        return False


async def uploads_at(s3: S3Client, location: S3Location) -> list[dict[str, Any]]:
    """The multipart uploads open at exactly `location`'s key, every page of them (a
    `StorageError` if they cannot be listed)."""
    found: list[dict[str, Any]] = []
    with storage_errors("ListMultipartUploads", location.bucket, location.key):
        paginator = s3.get_paginator("list_multipart_uploads")
        async for page in paginator.paginate(Bucket=location.bucket, Prefix=location.key):
            found += [u for u in page.get("Uploads", []) if u.get("Key") == location.key]
    return found


def _retried(response: object) -> bool:
    """Whether botocore sent the request more than once before this answer (a response or a
    ClientError): an attempt whose answer was lost may have been carried out."""
    if isinstance(response, ClientError):
        response = response.response
    if not isinstance(response, dict):
        return False
    attempts: int = response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
    return attempts > 0


def _refused(error: StorageError) -> bool:
    """Whether S3 answered a request with a client error (so it did nothing)."""
    cause = error.__cause__
    if not isinstance(cause, ClientError):
        return False
    status: int = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500)
    return status < 500


def _checksum_args(algorithm: str | None, value: str | None) -> dict[str, str]:
    """The checksum parameters: the algorithm, and the value when it was computed already
    (with MD5: the Content-MD5 header alone)."""
    if not algorithm:
        return {}
    if algorithm == "MD5":
        return {"ContentMD5": value} if value else {}
    if value:
        return {"ChecksumAlgorithm": algorithm, f"Checksum{algorithm}": value}
    return {"ChecksumAlgorithm": algorithm}


@dataclass(frozen=True, slots=True)
class StoredObject:
    """What S3 reports about an object: its size, ETag and checksum (as S3 shows it, with
    any "-N" part count), read back after an upload and compared again on resume."""

    size: int
    etag: str | None
    checksum: str | None
    checksum_type: str | None


async def check_object(
    s3: S3Client,
    location: S3Location,
    size: int,
    checksum: str | None,
    *,
    algorithm: str | None = "CRC32",
    composite: bool = False,
    etag: str | None = None,
) -> tuple[str | None, StoredObject | None]:
    """What is wrong with the object at `location` (missing, wrong size, or a `checksum` of
    `algorithm` that differs from the one S3 reports), or None; and what S3 reported.

    `composite` says which kind `checksum` is: of the parts' checksums or of the whole object
    (S3 reports the kind as ChecksumType, and a composite value with a "-N" part count; moto
    reports neither).  A server that says it made the other kind than was asked for gives
    nothing to compare: that is logged, not taken for damage.
    """
    try:
        # No checksum header of any kind when no algorithm is used (REGISTRAR_S3_CHECKSUMS=when_required)
        mode = {"ChecksumMode": "ENABLED"} if algorithm in _CRC else {}
        head = await s3.head_object(Bucket=location.bucket, Key=location.key, **mode)
    except ClientError as exc:
        code = error_code(exc)  # a HEAD's error has no body: botocore gives its HTTP status
        if code in ("403", "AccessDenied"):
            return (
                f"it cannot be read back: HeadObject answered 403 AccessDenied (the job's role needs "
                f"s3:GetObject on {location})",
                None,
            )
        if code in ("404", "NoSuchKey", "NotFound"):
            return "it cannot be read back: HeadObject answered 404 NotFound (the object is not there)", None
        return f"it cannot be read back: HeadObject answered {code}", None
    except (BotoCoreError, RuntimeError, json.JSONDecodeError) as exc:  # the last two: refreshing credentials
        if is_credential_failure(exc):
            return f"it cannot be read back: {credential_problem(exc).message}", None
        if not isinstance(exc, BotoCoreError):
            raise
        return f"it cannot be read back ({type(exc).__name__})", None
    stored = head.get(f"Checksum{algorithm}") if algorithm in _CRC else None
    found = StoredObject(head["ContentLength"], head.get("ETag"), stored, head.get("ChecksumType"))
    if found.size != size:
        return f"it holds {found.size} bytes, {size} were sent", found
    reported = (found.etag or "").strip('"')
    # Only a server that follows S3's ETag convention is compared: an MD5 for one PutObject, the
    # MD5 of the parts' MD5s with "-N" for a multipart upload (rclone gives a multipart object
    # the whole object's MD5, without "-N": nothing to compare, its Content-MD5 checks held).
    convention = re.fullmatch(r"[0-9a-f]{32}(-\d+)?", reported) and ("-" in reported) == ("-" in (etag or ""))
    if etag and convention and reported != etag:
        return f"its ETag is {reported}, the parts sent make {etag}", found
    if not (checksum and stored):
        return None, found
    value, _, parts = stored.partition("-")
    if algorithm and not _has_length(value, algorithm):
        # moto without the CRT stores a 4-byte CRC32 under the name CRC64NVME: a server that
        # does not really compute the algorithm, not damage.  The size was checked.
        log.warning(
            "%s: the server reports a %s that is not one (%r): it does not really support that "
            "algorithm, so the object was checked by its size only; set REGISTRAR_S3_CHECKSUM_ALGORITHM=CRC32 "
            "or, if it verifies no checksum at all, REGISTRAR_S3_CHECKSUMS=when_required",
            location,
            algorithm,
            stored,
        )
        return None, found
    # The kind S3 says it made; a "-N" part count also means composite; else taken as asked for.
    kind = found.checksum_type or ("COMPOSITE" if parts else None)
    if kind is not None and (kind == "COMPOSITE") != composite:
        log.warning("%s: the server reports a %s %s (%s); it was not compared", location, kind, algorithm, stored)
        return None, found
    if value != checksum:
        return f"its {algorithm} is {stored}, the parts sent make {checksum}", found
    return None, found
