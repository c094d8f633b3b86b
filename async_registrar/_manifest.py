"""The run manifest: what a run tells the next one (and `sweep`) about its registration.

A run writes `registration.json` into its prefix just before it submits (state
`submitting`: the Idempotency-Key and the artifacts) and again once the
registry accepted (state `accepted`: the registration).  It goes with the rest
of the prefix when the registration is final.  A run that stops earlier leaves
it behind with the artifacts, and a re-run with the same lineage id reads it
to resume: it follows the registration instead of making a second, and
uploads nothing that is still there and whole.

    s3://{bucket}/{prefix}{group}/{attempt}/[{region}/]registration.json
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from ._config import RegionName
from ._mims_contract import Registration, RegistrationStatus
from ._s3 import (
    S3Client,
    S3Location,
    error_code,
    get_object,
    storage_errors,
)
from ._upload import UploadedArtifact

__all__ = [
    "MANIFEST_NAME",
    "Manifest",
    "ManifestArtifact",
    "ManifestRegistration",
    "find_manifests",
    "read_manifest",
    "write_manifest",
]

log = logging.getLogger("async_registrar.manifest")

MANIFEST_NAME = "registration.json"
#: A manifest is a few KiB; anything much larger under that name is not one of ours.
MAX_MANIFEST_BYTES = 1024 * 1024


class ManifestArtifact(BaseModel):
    """An uploaded archive, and what S3 said of it once it was whole."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    s3_uri: str
    size_bytes: Annotated[int, Field(ge=0)]
    sha256: str
    parts: int = 1
    etag: str | None = None
    checksum_algorithm: str | None = None
    checksum: str | None = None

    @classmethod
    def of(cls, artifact: UploadedArtifact) -> ManifestArtifact:
        return cls(
            s3_uri=artifact.uri,
            size_bytes=artifact.size,
            sha256=artifact.sha256,
            parts=artifact.parts,
            etag=artifact.etag,
            checksum_algorithm=artifact.checksum_algorithm,
            checksum=artifact.checksum,
        )

    def uploaded(self) -> UploadedArtifact:
        return UploadedArtifact(
            S3Location.parse(self.s3_uri, what="artifact in the run manifest"),
            self.size_bytes,
            self.sha256,
            self.parts,
            etag=self.etag,
            checksum=self.checksum,
            checksum_algorithm=self.checksum_algorithm,
        )

    async def problem(self, s3: S3Client) -> str | None:
        """Why the object is not the one uploaded (gone, another size, ETag or checksum), or None.

        An object that cannot be checked (a HeadObject error other than 404) is taken as whole:
        uploading it again would write under a registration that may be reading it.
        """
        location = self.uploaded().location
        try:
            # No checksum mode when the upload sent none (REGISTRAR_S3_CHECKSUMS=when_required)
            mode = {"ChecksumMode": "ENABLED"} if self.checksum_algorithm else {}
            head = await s3.head_object(Bucket=location.bucket, Key=location.key, **mode)
        except ClientError as exc:
            code = error_code(exc)
            if code in ("404", "NoSuchKey", "NotFound"):
                return "it is gone"
            log.warning("%s could not be checked (%s); taken as whole", location, code)
            return None
        except BotoCoreError as exc:
            log.warning("%s could not be checked (%s); taken as whole", location, type(exc).__name__)
            return None
        stored = head.get(f"Checksum{self.checksum_algorithm}") if self.checksum_algorithm else None
        if head["ContentLength"] != self.size_bytes:
            return f"it holds {head['ContentLength']} bytes, the upload {self.size_bytes}"
        if self.etag and head.get("ETag") and head["ETag"] != self.etag:
            return f"its ETag is {head['ETag']}, the upload's was {self.etag}"
        if self.checksum and stored and stored != self.checksum:
            return f"its {self.checksum_algorithm} is {stored}, the upload's was {self.checksum}"
        return None


class ManifestRegistration(BaseModel):
    """The registration the registry accepted."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    registration_id: str
    model_id: str
    workflow_execution_arn: str
    status: RegistrationStatus

    @classmethod
    def of(cls, registration: Registration) -> ManifestRegistration:
        return cls(
            registration_id=registration.registration_id,
            model_id=registration.model_id,
            workflow_execution_arn=registration.workflow_execution_arn,
            status=registration.status,
        )

    def as_registration(self) -> Registration:
        """As the registry last reported it (to this run's knowledge)."""
        return Registration(
            registration_id=self.registration_id,
            model_id=self.model_id,
            workflow_execution_arn=self.workflow_execution_arn,
            status=self.status,
        )


class Manifest(BaseModel):
    """One region's registration by one run attempt."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    format: Literal[1] = 1
    #: `submitting`: written before the POST (the registry may or may not have it);
    #: `accepted`: the registry answered with `registration`.
    state: Literal["submitting", "accepted"]
    group: str
    attempt: str
    #: Of a region name's form: a manifest is data in a bucket, and its region goes into the
    #: configured endpoint's `{region}` (a name like "x@host/?" would steer it elsewhere).
    region: RegionName
    #: Every region the run registers in.
    regions: list[RegionName]
    endpoint: str
    workflow_execution_id: str | None
    idempotency_key: str
    generation: Annotated[int, Field(ge=1)] = 1
    artifacts: dict[str, ManifestArtifact]
    registration: ManifestRegistration | None = None
    #: With their UTC offset: one without could not be compared with the clock (or each other).
    created_at: AwareDatetime
    updated_at: AwareDatetime
    #: The attempt of the run that wrote it last: the prefix's own (`attempt`), or a later run's
    #: that took it over (an earlier POST unanswered), which that earlier run then leaves alone.
    owner: str | None = None

    def sha256s(self) -> dict[str, str]:
        """Each artifact's sha256: what tells whether a re-run registers the same inputs."""
        return {name: artifact.sha256 for name, artifact in self.artifacts.items()}


async def write_manifest(s3: S3Client, location: S3Location, manifest: Manifest) -> None:
    """Put the manifest at `location` (raises `StorageError`)."""
    with storage_errors("PutObject", location.bucket, location.key):
        await s3.put_object(
            Bucket=location.bucket,
            Key=location.key,
            Body=manifest.model_dump_json(indent=1).encode(),
            ContentType="application/json",
        )


async def find_manifests(s3: S3Client, bucket: str, prefix: str) -> list[tuple[S3Location, Manifest]]:
    """Every run manifest under `prefix`, newest first; unreadable ones are logged and skipped.

    Raises `StorageError` if the prefix can't be listed.
    """
    keys: list[str] = []
    with storage_errors("ListObjectsV2", bucket, prefix):
        paginator = s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", []) if o["Key"].endswith("/" + MANIFEST_NAME)]
    found = []
    for key in keys:
        location = S3Location(bucket, key)
        manifest = await read_manifest(s3, location)
        if manifest is not None:
            found.append((location, manifest))
    found.sort(key=lambda item: item[1].updated_at, reverse=True)
    return found


async def read_manifest(s3: S3Client, location: S3Location, *, problems: list[str] | None = None) -> Manifest | None:
    """The run manifest at `location`, or None (logged, and why appended to `problems`) if it
    cannot be read or is not one."""
    try:
        answer = await get_object(s3, Bucket=location.bucket, Key=location.key)
        async with answer["Body"] as body:
            if answer["ContentLength"] > MAX_MANIFEST_BYTES:
                why = "too large to be a run manifest"
                log.warning("%s is %s; skipped", location, why)
                if problems is not None:
                    problems.append(why)
                return None
            data = await body.read()
        return Manifest.model_validate_json(data)
    except (ClientError, BotoCoreError) as exc:
        code = exc.response.get("Error", {}).get("Code") if isinstance(exc, ClientError) else None
        why = f"cannot be read: {code or type(exc).__name__}"
        log.warning("the run manifest %s cannot be read (%s); skipped", location, code or type(exc).__name__)
    except ValidationError as exc:
        why = f"not a run manifest this version reads ({exc.error_count()} problem(s))"
        log.warning("%s is %s; skipped", location, why)
    if problems is not None:
        problems.append(why)
    return None
