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

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, field_validator

from ._config import Region, RegistrationConfig

__all__ = [
    "REGISTRATIONS_PATH",
    "TERMINAL_STATUSES",
    "ArtifactRef",
    "ErrorBody",
    "Registration",
    "RegistrationStatus",
    "RegistrationSubmission",
    "unsafe_key",
]

REGISTRATIONS_PATH = "/v1/registrations"
IDEMPOTENCY_HEADER = "Idempotency-Key"


def idempotency_key_problem(key: str) -> str | None:
    """What is wrong with a caller-chosen Idempotency-Key, if anything: it goes in an HTTP
    header as it is, so it must be visible ASCII (no spaces or accents), 1 to 256 characters."""
    if not re.fullmatch(r"[!-~]{1,256}", key):
        return (
            "must be 1 to 256 visible ASCII characters (letters, digits, punctuation; no spaces or "
            "accents): it is sent as the Idempotency-Key header as it is"
        )
    return None


RegistrationStatus = Literal["PENDING", "IN_PROGRESS", "SUCCEEDED", "FAILED"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"SUCCEEDED", "FAILED"})

S3Uri = Annotated[
    str, StringConstraints(pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/[^\x00-\x1f]+$", max_length=1100)
]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


def unsafe_key(key: str) -> bool:
    """Whether an S3 key has an empty, `.` or `..` segment: the registry takes plain keys only."""
    return any(segment in ("", ".", "..") for segment in key.split("/"))


def _json_integer(value: Any) -> Any:
    """What JSON Schema calls an integer: a number without a fraction (`12`, and `12.0` as
    12); never a boolean or a string, which pydantic would otherwise convert."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a whole number (not a string or a boolean)")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be a whole number")
        return int(value)
    return value


class ArtifactRef(BaseModel):
    """Where an uploaded archive is, and what the registry must find there."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    s3_uri: S3Uri
    size_bytes: Annotated[int, Field(ge=0, le=5 * 1024**4), BeforeValidator(_json_integer)]
    sha256: Sha256


#: The configuration's text fields, which a configuration file may pad with white space.
_TRIMMED = ("model_domain", "model_objective", "model_owner", "source_model_inference_image_arn")


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

    @field_validator(*_TRIMMED, mode="before")
    @classmethod
    def _no_padding(cls, value: Any) -> Any:
        """On the wire, text comes trimmed (a configuration file may pad it; the client trims)."""
        if isinstance(value, str) and value != value.strip():
            raise ValueError("must not begin or end with white space")
        return value

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
