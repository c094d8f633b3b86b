"""Progress events: what a registration reports while it runs.

A caller passes a callback that receives these typed events and forwards them to
its own log, UI or metrics.  The callback runs on the event loop and must not block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "CleanupFinished",
    "ProgressCallback",
    "ProgressEvent",
    "RegistrationStatusChanged",
    "RegistrationSubmitted",
    "UploadProgress",
]


@dataclass(frozen=True, slots=True)
class UploadProgress:
    """An artifact's upload moved on: sent after each part, and once at the end."""

    artifact: str  # "model" or "payload"
    uri: str
    bytes_read: int  # uncompressed input consumed
    bytes_uploaded: int  # archive bytes S3 has acknowledged
    parts_done: int
    elapsed: float  # seconds since the upload started
    done: bool
    bytes_total: int = 0  # the input bytes_read will reach: the tar stream's length, or the archive's size

    @property
    def rate(self) -> float:
        """Archive bytes per second uploaded so far."""
        return self.bytes_uploaded / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def fraction(self) -> float:
        """How much of the input has been read, from 0 to 1 (1 once done)."""
        if self.done:
            return 1.0
        return min(1.0, self.bytes_read / self.bytes_total) if self.bytes_total > 0 else 0.0


@dataclass(frozen=True, slots=True)
class RegistrationSubmitted:
    """The registry accepted the registration."""

    registration_id: str
    model_id: str
    workflow_execution_arn: str
    region: str | None = None


@dataclass(frozen=True, slots=True)
class RegistrationStatusChanged:
    """The registration's status changed (PENDING, IN_PROGRESS, SUCCEEDED, FAILED)."""

    registration_id: str
    status: str
    failure_reason: str | None
    region: str | None = None


@dataclass(frozen=True, slots=True)
class CleanupFinished:
    """The temporary objects were removed (or could not all be: `leftovers` names them)."""

    prefix_uri: str
    deleted: int
    aborted_uploads: int
    leftovers: tuple[str, ...]


ProgressEvent = UploadProgress | RegistrationSubmitted | RegistrationStatusChanged | CleanupFinished
ProgressCallback = Callable[[ProgressEvent], None]
