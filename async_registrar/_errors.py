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
from collections.abc import Sequence

__all__ = [
    "CleanupError",
    "ConfigurationError",
    "InputError",
    "RegistrarError",
    "RegistrationFailed",
    "RegistrationRejected",
    "RegistrationTimeout",
    "RegistryError",
    "RegistryUnavailable",
    "StorageError",
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


class RegistrarError(Exception):
    """Base class of every error this package raises on purpose."""

    @property
    def message(self) -> str:
        """The human-readable message, as passed to the constructor."""
        return str(self.args[0]) if self.args else ""


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


class RegistrationTimeout(RegistryError):
    """The registration did not finish within the wait timeout."""

    def __init__(self, message: str, *, registration_id: str, last_status: str | None, url: str | None = None) -> None:
        self.registration_id = registration_id
        self.last_status = last_status
        super().__init__(message, url=url)
