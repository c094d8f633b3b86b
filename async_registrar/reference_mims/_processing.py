"""What the reference registry does with an accepted registration.

It reads each artifact back from S3 and checks its size, its sha256 and that
it is a readable tar.gz whose members would pass `tarfile`'s `data` filter;
then it copies it into the registry bucket.  Only then is the registration
SUCCEEDED (the worker deletes its originals right after); any mismatch ends
it FAILED with the reason.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import tarfile
import zlib
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
from botocore.exceptions import BotoCoreError, ClientError

from .._members import MemberCheck
from .._members import members as tar_members
from .._mims_contract import ArtifactRef
from .._s3 import S3Client, S3Location

__all__ = ["ArtifactProblem", "copy_object", "verify_artifact"]

log = logging.getLogger("async_registrar.reference_mims")

#: S3's largest single CopyObject; larger objects are copied in parts.
MAX_COPY_OBJECT = 5 * 1024**3
COPY_PART = 512 * 1024**2


class ArtifactProblem(Exception):
    """An artifact is missing, different from what was announced, or not a usable tar.gz."""


class _BodyReader:
    """A blocking file object over an S3 body, for a worker thread; hashes what it reads."""

    def __init__(self, body: Any) -> None:
        self._body = body
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data: bytes = anyio.from_thread.run(self._body.read, size if size >= 0 else None)
        self.sha256.update(data)
        self.size += len(data)
        return data

    def readable(self) -> bool:
        return True


async def verify_artifact(s3: S3Client, ref: ArtifactRef, name: str) -> S3Location:
    """Check the artifact at `ref.s3_uri` against `ref`; raise `ArtifactProblem` with the reason."""
    location = S3Location.parse(ref.s3_uri)  # the contract's pattern already checked it
    try:
        response = await s3.get_object(Bucket=location.bucket, Key=location.key)
    except (ClientError, BotoCoreError) as exc:
        raise ArtifactProblem(f"{name} artifact {location} cannot be read: {_code(exc)}") from None
    if response["ContentLength"] != ref.size_bytes:
        response["Body"].close()
        raise ArtifactProblem(
            f"{name} artifact {location} holds {response['ContentLength']} bytes, "
            f"the registration says {ref.size_bytes}"
        )
    reader = _BodyReader(response["Body"])

    def check() -> int:
        members = 0
        with gzip.GzipFile(fileobj=reader, mode="rb") as gz, tarfile.open(fileobj=gz, mode="r|") as tar:  # type: ignore[call-overload]
            inspector = MemberCheck()
            for member in tar_members(tar):
                members += 1
                problem = inspector.problem(member)
                if problem is not None:
                    raise ArtifactProblem(f"{name} artifact {location} holds an unsafe member: {problem}")
        while reader.read(1024 * 1024):
            pass
        return members

    try:
        async with response["Body"]:
            members = await anyio.to_thread.run_sync(check)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ArtifactProblem(f"{name} artifact {location} is not a readable tar.gz: {exc}") from None
    if reader.size != ref.size_bytes:
        raise ArtifactProblem(f"{name} artifact {location}: read {reader.size} bytes, expected {ref.size_bytes}")
    if reader.sha256.hexdigest() != ref.sha256:
        raise ArtifactProblem(
            f"{name} artifact {location} has sha256 {reader.sha256.hexdigest()}, the registration says {ref.sha256}"
        )
    if members == 0:
        raise ArtifactProblem(f"{name} artifact {location} is an empty archive")
    return location


async def copy_object(s3: S3Client, source: S3Location, target: S3Location, size: int) -> None:
    """Copy server-side: one CopyObject, or a multipart copy above 5 GiB."""
    copy_source = {"Bucket": source.bucket, "Key": source.key}
    if size <= MAX_COPY_OBJECT:
        await s3.copy_object(CopySource=copy_source, Bucket=target.bucket, Key=target.key)
        return
    upload = await s3.create_multipart_upload(Bucket=target.bucket, Key=target.key)
    upload_id = upload["UploadId"]
    try:
        parts = []
        for number, start in enumerate(range(0, size, COPY_PART), start=1):
            end = min(start + COPY_PART, size) - 1
            part = await s3.upload_part_copy(
                Bucket=target.bucket,
                Key=target.key,
                UploadId=upload_id,
                PartNumber=number,
                CopySource=copy_source,
                CopySourceRange=f"bytes={start}-{end}",
            )
            parts.append({"PartNumber": number, "ETag": part["CopyPartResult"]["ETag"]})
        await s3.complete_multipart_upload(
            Bucket=target.bucket, Key=target.key, UploadId=upload_id, MultipartUpload={"Parts": parts}
        )
    except BaseException:
        with anyio.move_on_after(30, shield=True):
            await s3.abort_multipart_upload(Bucket=target.bucket, Key=target.key, UploadId=upload_id)
        raise


def _code(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", "error"))
    return type(exc).__name__
