"""The MIMS HTTP contract, shared by the client and the reference service.

    POST /v1/registrations                   submit (SigV4, Idempotency-Key)
    GET  /v1/registrations/{registration_id} status

Errors are 4xx/5xx with `{"message", "errors": [...]}`; 429 and 503 may carry
`Retry-After` and mean the registration was not accepted; a 409 (the
Idempotency-Key already holds another body) names the holder's
`registration_id`.  One registration is one region: `model_registration_region`
is a region name.  The reference service serves the full document at
`/openapi.json`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints

from ._config import Region, RegistrationConfig

__all__ = [
    "REGISTRATIONS_PATH",
    "TERMINAL_STATUSES",
    "ArtifactRef",
    "ErrorBody",
    "Registration",
    "RegistrationStatus",
    "RegistrationSubmission",
]

REGISTRATIONS_PATH = "/v1/registrations"
IDEMPOTENCY_HEADER = "Idempotency-Key"

RegistrationStatus = Literal["PENDING", "IN_PROGRESS", "SUCCEEDED", "FAILED"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"SUCCEEDED", "FAILED"})

S3Uri = Annotated[
    str, StringConstraints(pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/[^\x00-\x1f]+$", max_length=1100)
]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class ArtifactRef(BaseModel):
    """Where an uploaded archive is, and what the registry must find there."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    s3_uri: S3Uri
    size_bytes: Annotated[StrictInt, Field(ge=0, le=5 * 1024**4)]  # no true, "1" or 12.0
    sha256: Sha256


class RegistrationSubmission(RegistrationConfig):
    """The body of `POST /v1/registrations`: the configuration plus the uploaded artifacts.

    Unlike a configuration, which may name several regions, a submission registers the
    model in one: `model_registration_region` is a region name (a string).
    """

    model_registration_region: Region  # type: ignore[assignment]  # one region, not a list
    model_artifact: ArtifactRef
    payload_artifact: ArtifactRef | None = None
    performance_metadata: dict[str, Any] | None = None
    workflow_execution_id: Annotated[str, StringConstraints(min_length=1, max_length=1024)] | None = None

    @property
    def regions(self) -> tuple[str, ...]:
        """The one region of this registration."""
        return (self.model_registration_region,)


class Registration(BaseModel):
    """A registration as the registry reports it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    registration_id: Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.:-]+$")]
    model_id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    workflow_execution_arn: Annotated[str, StringConstraints(min_length=1, max_length=2048)]
    status: RegistrationStatus
    failure_reason: str | None = None
    #: What the registration registers, as submitted (a registry may leave these out).
    model_artifact: ArtifactRef | None = None
    payload_artifact: ArtifactRef | None = None


class ErrorBody(BaseModel):
    """An error answer: a message and one line per problem (each naming its field)."""

    message: str
    errors: list[str] = []
    #: With a 409: the registration that already holds the Idempotency-Key.
    registration_id: str | None = None
