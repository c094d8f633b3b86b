"""One S3 multipart upload, driven by hand so that it is always finished or aborted.

aioboto3's `upload_fileobj` buffers up to 100 parts and does not abort when it
is cancelled; this drives `create_multipart_upload` / `upload_part` /
`complete_multipart_upload` / `abort_multipart_upload` itself.  Leaving the
context without completing (an error, a cancellation) aborts the upload,
shielded from cancellation and bounded in time.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

import anyio

from ._errors import StorageError
from ._s3 import S3Client, S3Location, storage_errors

__all__ = ["MultipartUpload", "put_object"]

log = logging.getLogger("async_registrar.upload")


class MultipartUpload:
    """A multipart upload to `location`: created on entry, aborted on exit unless completed."""

    def __init__(
        self,
        s3: S3Client,
        location: S3Location,
        *,
        checksum: str | None,
        abort_timeout: float,
    ) -> None:
        self._s3 = s3
        self.location = location
        self._checksum = checksum
        self._abort_timeout = abort_timeout
        self.upload_id: str | None = None
        self._parts: dict[int, dict[str, Any]] = {}
        self._completed = False
        self._entered = False

    async def __aenter__(self) -> MultipartUpload:
        if self._entered:
            raise RuntimeError("a MultipartUpload can be entered only once")
        self._entered = True
        extra = {"ChecksumAlgorithm": self._checksum} if self._checksum else {}
        with storage_errors("CreateMultipartUpload", self.location.bucket, self.location.key):
            response = await self._s3.create_multipart_upload(
                Bucket=self.location.bucket, Key=self.location.key, **extra
            )
        self.upload_id = response["UploadId"]
        log.debug("started multipart upload to %s", self.location)
        return self

    async def upload_part(self, number: int, data: bytes) -> None:
        """Upload part `number` (1-based); S3 verifies its checksum."""
        extra = {"ChecksumAlgorithm": self._checksum} if self._checksum else {}
        with storage_errors(f"UploadPart (part {number})", self.location.bucket, self.location.key):
            response = await self._s3.upload_part(
                Bucket=self.location.bucket,
                Key=self.location.key,
                UploadId=self.upload_id,
                PartNumber=number,
                Body=data,
                **extra,
            )
        part: dict[str, Any] = {"PartNumber": number, "ETag": response["ETag"]}
        if self._checksum:
            value = response.get(f"Checksum{self._checksum}")
            if value:
                part[f"Checksum{self._checksum}"] = value
        self._parts[number] = part

    async def complete(self) -> None:
        """Complete the upload from the parts uploaded so far, in order."""
        parts = [self._parts[n] for n in sorted(self._parts)]
        if [p["PartNumber"] for p in parts] != list(range(1, len(parts) + 1)):
            raise StorageError(
                f"multipart upload to {self.location} is missing parts; it was aborted",
                operation="CompleteMultipartUpload",
                bucket=self.location.bucket,
                key=self.location.key,
            )
        with storage_errors("CompleteMultipartUpload", self.location.bucket, self.location.key):
            await self._s3.complete_multipart_upload(
                Bucket=self.location.bucket,
                Key=self.location.key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": parts},
            )
        self._completed = True

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._completed or self.upload_id is None:
            return
        with anyio.move_on_after(self._abort_timeout, shield=True) as scope:
            try:
                await self._s3.abort_multipart_upload(
                    Bucket=self.location.bucket, Key=self.location.key, UploadId=self.upload_id
                )
                log.debug("aborted multipart upload to %s", self.location)
                return
            except Exception as abort_error:  # the original error is the one to report
                log.warning("could not abort the multipart upload to %s: %s", self.location, abort_error)
        if scope.cancelled_caught:
            log.warning("aborting the multipart upload to %s timed out", self.location)


async def put_object(s3: S3Client, location: S3Location, data: bytes, *, checksum: str | None) -> None:
    """Upload a small artifact in one request."""
    extra = {"ChecksumAlgorithm": checksum} if checksum else {}
    with storage_errors("PutObject", location.bucket, location.key):
        await s3.put_object(Bucket=location.bucket, Key=location.key, Body=data, **extra)
