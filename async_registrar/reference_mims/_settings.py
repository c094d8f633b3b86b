"""Settings of the reference MIMS service: where its registry bucket is, its pace, its faults."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, StringConstraints, ValidationError

from .._config import describe_validation_errors
from .._errors import ConfigurationError

__all__ = ["ReferenceMimsSettings"]

Delay = Annotated[float, Field(ge=0, le=3600)]


class ReferenceMimsSettings(BaseModel):
    """How the reference service behaves.

    The fault knobs exist for tests and demos: they make the service answer the way a
    busy or broken registry would, on purpose.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Where registered artifacts are copied; created at start-up if missing.
    registry_bucket: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")] = "mims-registry"
    service_name: str = "mims"
    account_id: Annotated[str, StringConstraints(pattern=r"^\d{12}$")] = "012345678910"

    # S3 access (the standard AWS chain when these are unset).
    s3_endpoint_url: str | None = None
    aws_region: str = "us-east-1"
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None

    #: Access key id -> secret key.  When set, signatures are verified (403 on a mismatch);
    #: otherwise only their form is checked.
    signing_secrets: dict[str, SecretStr] | None = None

    #: The buckets artifacts may be read from (MIMS_ALLOWED_BUCKETS, comma-separated); None:
    #: any bucket the registry's credentials can read (a confused deputy: warned at start).
    allowed_buckets: list[str] | None = None
    #: Requests with a larger body are refused (413) before more of it is read.
    max_body_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024

    # Pace: how long a registration stays PENDING, and how long verification takes at least.
    pending_delay: Delay = 0.2
    processing_delay: Delay = 0.0
    #: When the artifacts are read: right after IN_PROGRESS, or only once `processing_delay`
    #: is over (as an asynchronous workflow does): then a client that deleted them while
    #: the registration was unfinished sees it end FAILED.
    read_artifacts: Literal["on_accept", "at_finish"] = "on_accept"

    # Faults.
    fail_submissions: Annotated[int, Field(ge=0)] = 0  # the first N submissions get 503
    throttle_polls: Annotated[int, Field(ge=0)] = 0  # the first N polls get 429
    retry_after: Delay = 1.0  # the Retry-After sent with those answers
    stall_poll: Delay = 0.0  # every poll waits this long before answering
    stall_submissions: Annotated[int, Field(ge=0)] = 0  # the first N accepted submissions answer late...
    stall_seconds: Delay = 5.0  # ...by this long (the registration exists already: a client timeout)
    fail_registrations: str | None = None  # end every registration FAILED with this reason
    fail_regions: list[str] = []  # end registrations for these regions FAILED
    reject_regions: list[str] = []  # refuse submissions for these regions (422)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ReferenceMimsSettings:
        """Settings from `MIMS_*` variables (and the standard AWS ones), overrides first."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            var = f"MIMS_{name.upper()}"
            if env.get(var):
                listed = ("fail_regions", "reject_regions", "allowed_buckets")
                values[name] = [v.strip() for v in env[var].split(",")] if name in listed else env[var]
        if env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"):
            values.setdefault("s3_endpoint_url", env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"))
        if env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"):
            values.setdefault("aws_region", env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"))
        if env.get("MIMS_SIGNING_KEY") and env.get("MIMS_SIGNING_SECRET"):
            values.setdefault("signing_secrets", {env["MIMS_SIGNING_KEY"]: env["MIMS_SIGNING_SECRET"]})
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = describe_validation_errors(exc, known=list(cls.model_fields))
            raise ConfigurationError("invalid reference MIMS settings (MIMS_* variables):", problems) from None
