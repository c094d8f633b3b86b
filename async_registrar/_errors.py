"""One error tree for everything a registration can run into.

The subclasses are split by what the caller can do about the failure: fix the
configuration, fix the input artifacts, look at the storage, look at the
registry, or wait longer.  Messages name the file, field, key or URL involved
(never a credential, never a query string) and say what to do.

Misuse of the API (entering a context twice, say) raises `RuntimeError`, which
is outside this tree on purpose: it is a bug in the caller, not a condition to
handle.
"""

from __future__ import annotations

import re
import resource
from collections.abc import Sequence
from dataclasses import dataclass

#: What the message of a failed cleanup tells an operator to do, before naming what was left.
REMOVE_BY_HAND = "remove these by hand (aws s3 rm / aws s3api abort-multipart-upload):"

__all__ = [
    "AcceptedRegistration",
    "CleanupError",
    "ConfigurationError",
    "IdempotencyConflict",
    "InputError",
    "RegistrarError",
    "RegistrationFailed",
    "RegistrationInterrupted",
    "RegistrationRejected",
    "RegistrationTimeout",
    "RegistryError",
    "RegistryUnavailable",
    "StorageError",
    "out_of_descriptors",
    "redact",
]


_URL_QUERY = re.compile(r"""(\b[a-z][a-z0-9+.-]*://[^\s"'<>?#]*)[?#][^\s"'<>]*""", re.IGNORECASE)
_USERINFO = re.compile(r"""(\b[a-z][a-z0-9+.-]*://)[^\s"'<>/@]*@""", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with every URL's query string, fragment and credentials removed.

    Presigned URLs carry signatures and tokens in their query strings; text bound for a
    log, a message or an exit file goes through this first.
    """
    return _USERINFO.sub(r"\1", _URL_QUERY.sub(r"\1", text))


@dataclass(frozen=True, slots=True)
class AcceptedRegistration:
    """A registration the registry accepted during a run, as the run last saw it.

    Once the registry has accepted a registration it reads the artifacts on its own
    time, so a run that stops before the registration is final keeps them:
    `kept_prefix` then names the `s3://` prefix left in place (and `manifest_uri` the
    run manifest in it, which a re-run with the same lineage id resumes from).
    """

    region: str
    registration_id: str
    model_id: str
    workflow_execution_arn: str
    #: The last status seen: PENDING, IN_PROGRESS, SUCCEEDED or FAILED.
    status: str
    #: The `s3://bucket/prefix/` kept for this registration, or None if nothing was kept.
    kept_prefix: str | None = None
    #: The run manifest (`s3://.../registration.json`) in the kept prefix.
    manifest_uri: str | None = None

    def describe(self) -> str:
        """One line: which registration, where, its status, and what was kept."""
        line = f"registration {self.registration_id} (model id {self.model_id}, {self.region}) is {self.status}"
        if self.kept_prefix:
            line += f"; its artifacts are kept under {self.kept_prefix}"
        return line


class RegistrarError(Exception):
    """Base class of every error this package raises on purpose."""

    #: Every registration the registry accepted before this error ended the run (with
    #: what was kept for each); empty when the run never got that far.
    registrations: tuple[AcceptedRegistration, ...] = ()
    #: How to pick up the registrations that were kept, when there are any.
    resume_hint: str | None = None

    @property
    def message(self) -> str:
        """The human-readable message, as passed to the constructor."""
        return str(self.args[0]) if self.args else ""

    @property
    def kept(self) -> tuple[AcceptedRegistration, ...]:
        """The accepted, unfinished registrations whose artifacts were kept for the registry."""
        return tuple(r for r in self.registrations if r.kept_prefix)


class ConfigurationError(RegistrarError):
    """The registration configuration or the settings are invalid.

    `problems` lists every problem found, one line each, so a user can fix them
    all in one go.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        full = message
        if self.problems:
            full += "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(full)


def out_of_descriptors(what: str, exc: OSError) -> ConfigurationError:
    """The error for `what` failing with EMFILE or ENFILE: the process (or the system) has no
    file descriptor left, a limit of the job's to raise, not an input to fix."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return ConfigurationError(
        f"{what} ({exc.strerror}): the job has no file descriptor left (its open-file limit is {soft}); "
        "raise it (ulimit -n, or the container's nofile limit) to 1024 or more, or run fewer uploads "
        "at once (REGISTRAR_MAX_PARALLEL_UPLOADS)"
    )


class InputError(RegistrarError):
    """A model, payload or metadata input is missing, empty or malformed.

    `paths` names each offending file or object.
    """

    def __init__(self, message: str, paths: Sequence[str] = ()) -> None:
        self.paths: tuple[str, ...] = tuple(paths)
        super().__init__(message)


class StorageError(RegistrarError):
    """An S3 operation failed (after any retries the S3 client made)."""

    def __init__(
        self,
        message: str,
        *,
        operation: str | None = None,
        bucket: str | None = None,
        key: str | None = None,
        code: str | None = None,
    ) -> None:
        self.operation = operation
        self.bucket = bucket
        self.key = key
        self.code = code
        super().__init__(message)

    def restated(self, message: str) -> StorageError:
        """The same failure (operation, place, code), told with `message`."""
        return StorageError(message, operation=self.operation, bucket=self.bucket, key=self.key, code=self.code)


class CleanupError(StorageError):
    """Temporary objects or multipart uploads could not be removed.

    `leftovers` names each `s3://bucket/key` (and upload id) left behind, so an
    operator can remove them by hand.
    """

    def __init__(self, message: str, leftovers: Sequence[str] = ()) -> None:
        self.leftovers: tuple[str, ...] = tuple(leftovers)
        full = message
        if self.leftovers:
            full += "\n" + "\n".join(f"  - {item}" for item in self.leftovers)
        super().__init__(full, operation="cleanup")


class RegistryError(RegistrarError):
    """The registry (MIMS) did not register the model."""

    #: Whether a request of this exchange may have reached the registry without its answer
    #: reaching us (a read timeout, a reset after the request was sent, a 500, 502 or 504): a
    #: submission may then have been accepted after all, whatever came after it.
    may_have_arrived: bool = False

    def __init__(self, message: str, *, url: str | None = None) -> None:
        self.url = url
        super().__init__(message)


class RegistrationRejected(RegistryError):
    """The registry refused the request (a 4xx answer other than 429)."""

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        status_code: int | None = None,
        errors: Sequence[str] = (),
    ) -> None:
        self.status_code = status_code
        self.errors: tuple[str, ...] = tuple(errors)
        full = message
        if self.errors:
            full += "\n" + "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(full, url=url)


class IdempotencyConflict(RegistrationRejected):
    """The Idempotency-Key is already held by another registration (409).

    `holder` is that registration's id, when the registry names it.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        errors: Sequence[str] = (),
        holder: str | None = None,
    ) -> None:
        self.holder = holder
        super().__init__(message, url=url, status_code=409, errors=errors)


class RegistrationFailed(RegistryError):
    """The registry accepted the registration, then ended it FAILED."""

    def __init__(
        self, message: str, *, registration_id: str, failure_reason: str | None, url: str | None = None
    ) -> None:
        self.registration_id = registration_id
        self.failure_reason = failure_reason
        super().__init__(message, url=url)


class RegistryUnavailable(RegistryError):
    """The registry could not be reached, or kept failing or throttling until the deadline."""

    def __init__(self, message: str, *, url: str | None = None, may_have_arrived: bool = False) -> None:
        super().__init__(message, url=url)
        self.may_have_arrived = may_have_arrived


class RegistrationInterrupted(RegistryError):
    """The registry accepted the registration, but the run stopped before it was final.

    Its artifacts are kept for the registry (see `kept` and `resume_hint`): a re-run with
    the same lineage id resumes it.
    """


class RegistrationTimeout(RegistrationInterrupted):
    """The registration did not finish within the wait timeout (or the registry stayed
    unreachable until then)."""

    def __init__(self, message: str, *, registration_id: str, last_status: str | None, url: str | None = None) -> None:
        self.registration_id = registration_id
        self.last_status = last_status
        super().__init__(message, url=url)
