"""The run's temporary prefix, and removing what is under it.

Everything a registration run uploads lives under one prefix of its own.
`remove()` aborts every multipart upload still open under it and deletes every
object under it, shielded from cancellation and bounded by the exit's cleanup
deadline.  Listing the prefix, not only remembering keys, also catches an upload
whose CreateMultipartUpload reached S3 just as the run was cancelled.

Whether to remove is the run's decision (see `_run`): a prefix that an accepted,
unfinished registration still reads is kept.  Used as a context manager, the
prefix is removed on every way out: if something can't be removed, the original
error stays the one raised and a note names each key and upload id left behind;
after a success a `CleanupError` names them.
"""

from __future__ import annotations

import logging
from types import TracebackType

from ._concurrency import CleanupDeadline
from ._errors import REMOVE_BY_HAND, CleanupError, StorageError
from ._multipart import OpenUploads
from ._progress import CleanupFinished, ProgressCallback
from ._s3 import S3Client, storage_errors

__all__ = ["TemporaryPrefix"]

log = logging.getLogger("async_registrar.cleanup")


class TemporaryPrefix:
    """A prefix that belongs to one run: `remove()` empties it.

    `cleanup` is the deadline of the exit the removal is part of (a fresh one of `timeout`
    seconds when not given).
    """

    def __init__(
        self,
        s3: S3Client,
        bucket: str,
        prefix: str,
        *,
        timeout: float | None = None,
        cleanup: CleanupDeadline | None = None,
        on_progress: ProgressCallback | None = None,
        ledger: OpenUploads | None = None,
    ) -> None:
        if not prefix.endswith("/") or len(prefix) < 2:
            raise ValueError(f"a temporary prefix must be a non-empty folder, got {prefix!r}")
        if cleanup is None and timeout is None:
            raise ValueError("give a TemporaryPrefix a cleanup deadline or a timeout")
        self._s3 = s3
        self.bucket = bucket
        self.prefix = prefix
        self._cleanup = cleanup
        self._timeout = timeout
        self._on_progress = on_progress
        self._ledger = ledger
        self._known: set[str] = set()
        self._entered = False

    @property
    def uri(self) -> str:
        """`s3://bucket/prefix`."""
        return f"s3://{self.bucket}/{self.prefix}"

    def key(self, name: str) -> str:
        """The key of `name` under the prefix; remembered, so it is deleted even if listing fails."""
        key = self.prefix + name
        self._known.add(key)
        return key

    async def remove(self) -> tuple[str, ...]:
        """Abort the open uploads and delete the objects under the prefix; return what is left
        (each `s3://` key or upload id, for a person to remove), reported as `CleanupFinished`."""
        cleanup = self._cleanup or CleanupDeadline(self._timeout or 0.0)
        leftovers: list[str] = []
        counts = [0, 0]
        log.info("cleaning up the temporary objects under %s", self.uri)
        with cleanup.shield() as scope:
            leftovers = await self._empty(counts)
        if scope.cancelled_caught:
            leftovers = [f"{self.uri} (cleanup timed out after {cleanup.timeout:g} s)"]
        if self._on_progress is not None:
            self._on_progress(CleanupFinished(self.uri, counts[0], counts[1], tuple(leftovers)))
        if not leftovers:
            log.info("removed the temporary objects under %s", self.uri)
        return tuple(leftovers)

    async def __aenter__(self) -> TemporaryPrefix:
        if self._entered:
            raise RuntimeError("a TemporaryPrefix can be entered only once")
        self._entered = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        leftovers = await self.remove()
        if not leftovers:
            return
        message = f"could not remove everything under {self.uri}; {REMOVE_BY_HAND}"
        if exc is None:
            raise CleanupError(message, leftovers)
        log.error("%s %s", message, "; ".join(leftovers))
        exc.add_note(CleanupError(message, leftovers).message)

    async def _empty(self, counts: list[int]) -> list[str]:
        """Abort the open uploads and delete the objects; return what is left."""
        leftovers: list[str] = []
        try:
            uploads = await self._list_uploads()
        except StorageError as exc:
            uploads = []
            if exc.code == "NoSuchUpload":  # rclone's answer until it has seen a multipart upload
                log.debug("%s: no multipart upload to list (%s)", self.uri, exc.code)
            elif self._ledger is not None and self._ledger.none_open_under(self.bucket, self.prefix):
                # The run completed or aborted every upload it opened here (or opened none).
                log.info("%s: multipart uploads could not be listed (%s); this run left none open", self.uri, exc.code)
            else:
                log.warning("%s", exc)
                leftovers.append(f"{self.uri} (multipart uploads could not be listed: {exc.code})")
        for key, upload_id in uploads:
            try:
                with storage_errors("AbortMultipartUpload", self.bucket, key):
                    await self._s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
                counts[1] += 1
            except StorageError as exc:
                log.warning("%s", exc)
                leftovers.append(f"s3://{self.bucket}/{key} (open multipart upload, upload id {upload_id})")
        try:
            keys = await self._list_keys()
        except StorageError as exc:
            log.warning("%s", exc)
            keys = set()
            if not self._known:
                leftovers.append(f"{self.uri} (objects could not be listed: {exc.code})")
        for key in sorted(keys | self._known):
            try:
                with storage_errors("DeleteObject", self.bucket, key):
                    await self._s3.delete_object(Bucket=self.bucket, Key=key)
                counts[0] += key in keys
            except StorageError as exc:
                log.warning("%s", exc)
                leftovers.append(f"s3://{self.bucket}/{key}")
        return leftovers + await self._remove_versions()

    async def _remove_versions(self) -> list[str]:
        """On a bucket with versioning, a deletion adds a delete marker and keeps the data as a
        noncurrent version (still stored, still billed): each version and marker under the
        prefix is deleted too; return those that could not be.  Where versions cannot be listed
        (a server without them, a policy without s3:ListBucketVersions) nothing more is done."""
        try:
            versions = await self._list_versions()
        except StorageError as exc:
            log.debug("%s: object versions not listed (%s)", self.uri, exc.code)
            return []
        leftovers = []
        for key, version_id in versions:
            try:
                with storage_errors("DeleteObject", self.bucket, key):
                    await self._s3.delete_object(Bucket=self.bucket, Key=key, VersionId=version_id)
            except StorageError as exc:
                log.warning("%s (version %s; the role needs s3:DeleteObjectVersion)", exc, version_id)
                leftovers.append(f"s3://{self.bucket}/{key} (version {version_id})")
        if versions:
            log.debug("%s: deleted %d object versions and delete markers", self.uri, len(versions))
        return leftovers

    async def _list_uploads(self) -> list[tuple[str, str]]:
        found = []
        with storage_errors("ListMultipartUploads", self.bucket, self.prefix):
            paginator = self._s3.get_paginator("list_multipart_uploads")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                found += [(u["Key"], u["UploadId"]) for u in page.get("Uploads", [])]
        return found

    async def _list_versions(self) -> list[tuple[str, str]]:
        found = []
        with storage_errors("ListObjectVersions", self.bucket, self.prefix):
            paginator = self._s3.get_paginator("list_object_versions")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                # A current version is an object the plain delete left (named already); what
                # remains to delete are the older versions and the delete markers.
                versions = [v for v in page.get("Versions", []) if not v.get("IsLatest", False)]
                for entry in [*versions, *page.get("DeleteMarkers", [])]:
                    found.append((entry["Key"], entry["VersionId"]))
        return found

    async def _list_keys(self) -> set[str]:
        found = set()
        with storage_errors("ListObjectsV2", self.bucket, self.prefix):
            paginator = self._s3.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                found |= {o["Key"] for o in page.get("Contents", [])}
        return found
