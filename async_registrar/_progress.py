"""Progress events: what a registration reports while it runs.

A caller passes a callback that receives these typed events and forwards them to
its own log, UI or metrics.  The callback runs on the event loop and must not block.
A callback that raises is logged and ignored: it never changes the registration's
outcome (see `notify_all`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._errors import AcceptedRegistration

if TYPE_CHECKING:
    from ._results import RegionRegistration

__all__ = [
    "CleanupFinished",
    "ProgressCallback",
    "ProgressEvent",
    "RegistrationKept",
    "RegistrationStatusChanged",
    "RegistrationSubmitted",
    "RegistrationSucceeded",
    "UploadProgress",
    "check_callback",
    "notify_all",
]

log = logging.getLogger("async_registrar")


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
    bytes_archived: int = 0  # archive bytes made so far (acknowledged, in flight or queued)

    @property
    def rate(self) -> float:
        """Archive bytes per second acknowledged by S3, over the whole upload so far."""
        return self.bytes_uploaded / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def archive_estimate(self) -> int:
        """The archive's expected size: what was made so far, scaled to the whole input at the
        compression seen so far (exact for a prebuilt archive, and once done)."""
        if self.done:
            return self.bytes_uploaded
        if self.bytes_read <= 0 or self.bytes_total <= 0:
            return 0
        return max(self.bytes_archived, round(self.bytes_archived * self.bytes_total / self.bytes_read))

    @property
    def fraction(self) -> float:
        """How much of the archive S3 has acknowledged, from 0 to 1 (1 only once done): parts
        still in flight when the input has all been read do not count yet."""
        if self.done:
            return 1.0
        estimate = self.archive_estimate
        return min(0.999, self.bytes_uploaded / estimate) if estimate > 0 else 0.0


@dataclass(frozen=True, slots=True)
class RegistrationSubmitted:
    """The registry accepted the registration (or, `resumed`, the run found one it had accepted
    for the same inputs earlier, and follows it instead of making a second)."""

    registration_id: str
    model_id: str
    workflow_execution_arn: str
    region: str | None = None
    resumed: bool = False


@dataclass(frozen=True, slots=True)
class RegistrationStatusChanged:
    """The registration's status changed (PENDING, IN_PROGRESS, SUCCEEDED, FAILED)."""

    registration_id: str
    status: str
    failure_reason: str | None
    region: str | None = None


@dataclass(frozen=True, slots=True)
class RegistrationSucceeded:
    """Every region's registration is SUCCEEDED.  Sent before the temporary objects are removed,
    so that the result can be reported even if the cleanup is cut short (the process killed
    during it); the registration then returns it once the cleanup is over.  The cleanup is
    shielded: a cancellation that comes during it lets it run to its end, and the call then
    either raises the cancellation or returns the result (the cancellation then lands at the
    caller's next checkpoint)."""

    registrations: tuple[RegionRegistration, ...]


@dataclass(frozen=True, slots=True)
class CleanupFinished:
    """The temporary objects were removed (or could not all be: `leftovers` names them)."""

    prefix_uri: str
    deleted: int
    aborted_uploads: int
    leftovers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RegistrationKept:
    """The run stopped after the registry accepted, before the registration was final: its
    artifacts were kept for the registry.  A re-run with the same lineage id resumes it."""

    registrations: tuple[AcceptedRegistration, ...]
    #: Every `s3://` prefix kept (also one whose submission the registry may have taken
    #: without answering, which has no registration id yet).
    prefixes: tuple[str, ...]
    #: Why the run stopped (the error, or "cancelled").
    reason: str
    #: What to do next.
    resume_hint: str


ProgressEvent = (
    UploadProgress
    | RegistrationSubmitted
    | RegistrationStatusChanged
    | RegistrationSucceeded
    | CleanupFinished
    | RegistrationKept
)
ProgressCallback = Callable[[ProgressEvent], None]


def check_callback(callback: object) -> None:
    """Raise `TypeError` for a progress callback that cannot work: an async function (its
    coroutine would never run).  Callbacks are called on the event loop's thread, in turn,
    and must return at once; async work goes in a task the callback starts (or behind a
    memory stream it sends the event on)."""
    call = getattr(callback, "__call__", None)  # noqa: B004  (a callable object's own method)
    if inspect.iscoroutinefunction(callback) or inspect.iscoroutinefunction(call):
        raise TypeError(
            f"the progress callback {callback!r} is an async function: callbacks are called on the event "
            "loop, synchronously, and must return at once; pass a plain function (one that starts a task "
            "or sends the event on a memory stream, for async work)"
        )


def notify_all(callbacks: Sequence[ProgressCallback]) -> ProgressCallback:
    """One callback that calls each of `callbacks` in turn and isolates them.

    A callback that raises is logged (a warning the first time, its traceback at DEBUG)
    and the others still get the event: a broken progress bar must never fail, or
    worse half-fail, a registration.  An async function is a `TypeError` at once (see
    `check_callback`); a callback that returns an awaitable anyway is warned about once.
    """
    for callback in callbacks:
        check_callback(callback)
    failed: set[int] = set()

    def emit(event: ProgressEvent) -> None:
        for callback in callbacks:
            try:
                result: object = callback(event)
                if inspect.isawaitable(result):
                    if inspect.iscoroutine(result):
                        result.close()  # never run: no "never awaited" warning at garbage collection
                    raise TypeError("it returned an awaitable, which is never awaited: pass a plain function")
            except Exception as exc:
                if id(callback) not in failed:
                    failed.add(id(callback))
                    log.warning(
                        "the progress callback %r raised %s (%s) on %s; ignored, the registration goes on",
                        callback,
                        type(exc).__name__,
                        exc,
                        type(event).__name__,
                    )
                log.debug("progress callback %r failed on %r", callback, event, exc_info=True)

    return emit
