"""What the command writes on stderr: log lines and, on a terminal, one live progress line.

The library only emits progress events (see `_progress`); the command shows them.  Off a
terminal (a container's log, a file, a pipe) upload progress is a log line every few
seconds.  On a terminal it is a status line redrawn in place, at most ten times a second,
under the log lines: each log record clears it, is written, and redraws it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import TextIO

from ._log_fields import JsonFormatter
from ._mims_contract import TERMINAL_STATUSES
from ._progress import (
    CleanupFinished,
    ProgressEvent,
    RegistrationKept,
    RegistrationStatusChanged,
    RegistrationSubmitted,
    UploadProgress,
)

__all__ = ["Console", "ProgressDisplay", "configure_logging"]

log = logging.getLogger("async_registrar.cli")

_CLEAR_LINE = "\r\x1b[K"
_BAR = 20  # characters of the bar itself


class Console(logging.StreamHandler[TextIO]):
    """A log handler that can keep one status line below the records (`live` terminals only)."""

    def __init__(self, stream: TextIO, *, live: bool) -> None:
        super().__init__(stream)
        self.live = live
        self._status = ""
        self._shown = False

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held
        self._clear()
        super().emit(record)
        self._draw()

    def set_status(self, text: str) -> None:
        """Show `text` as the status line (an empty text removes it)."""
        if not self.live:
            return
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            self._clear()
            self._status = text
            self._draw()

    def _clear(self) -> None:
        if self._shown:
            self.stream.write(_CLEAR_LINE)
            self.stream.flush()
            self._shown = False

    def _draw(self) -> None:
        if self._status:
            # One screen row: a wrapped line could not be erased in place.
            self.stream.write(self._status[: max(1, self._width() - 1)])
            self.stream.flush()
            self._shown = True

    def _width(self) -> int:
        """The terminal's width: stderr's own (stdout is often a pipe), else COLUMNS or 80."""
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is an OSError
            columns = 0
        return columns or shutil.get_terminal_size().columns


def _one_line_from_libraries(record: logging.LogRecord) -> bool:
    """A library's record (aiobotocore's "Refreshing temporary credentials failed during
    mandatory refresh period", say) keeps its exception as one line, not a traceback of many
    frames: the run's own error says what failed.  DEBUG shows the traceback."""
    if record.exc_info and record.exc_info[1] is not None and not record.name.startswith("async_registrar"):
        error = record.exc_info[1]
        record.msg = f"{record.getMessage()} ({type(error).__name__}: {error})"
        record.args = None
        record.exc_info = record.exc_text = None
    return True


def configure_logging(level: str, stream: TextIO, log_format: str = "text") -> Console:
    """Send the log to `stream`: text lines, with a live status line if it is a terminal and
    INFO is shown; or (`log_format="json"`) one JSON object per line, never a live line."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    json_lines = log_format == "json"
    console = Console(stream, live=not json_lines and stream.isatty() and root.level <= logging.INFO)
    if json_lines:
        console.setFormatter(JsonFormatter())
    else:
        console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.handlers[:] = [console]
    if root.level > logging.DEBUG:
        console.addFilter(_one_line_from_libraries)
    # Third-party loggers are loud and can echo request details; keep them to warnings.
    for name in ("botocore", "aiobotocore", "boto3", "aioboto3", "urllib3", "httpx", "httpcore", "werkzeug"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    # stamina logs each retry as a bare `stamina.retry_scheduled` warning; the registrar logs its
    # own line per retry (URL, reason, next delay) instead.
    logging.getLogger("stamina").setLevel(logging.ERROR)
    return console


class ProgressDisplay:
    """Shows a command's progress events on its console.

    Upload progress is a live line on a terminal (redrawn at most every `refresh`
    seconds) and otherwise a log line per artifact at most every `interval` seconds;
    either way each finished upload gets a log line.
    """

    def __init__(self, console: Console, interval: float = 5.0, refresh: float = 0.1) -> None:
        self._console = console
        self._interval = interval
        self._refresh = refresh
        self._logged: dict[str, float] = {}
        self._drawn = 0.0
        self._uploads: dict[str, UploadProgress] = {}  # in progress, for the live line
        #: What the cleanup could not remove, for the exit message.
        self.leftovers: tuple[str, ...] = ()
        #: What was kept for a registration the registry had accepted, for the exit message.
        self.kept: list[RegistrationKept] = []
        #: The registration succeeded and its result lines are out: a signal after that
        #: (during the cleanup) stops nothing the command reports.
        self.registered = False
        #: Registrations the run found already made (by another run of the same inputs) and
        #: followed, with the last status seen: they go on when this run stops.
        self._followed: dict[str, tuple[RegistrationSubmitted, str | None]] = {}

    def __call__(self, event: ProgressEvent) -> None:
        if isinstance(event, UploadProgress):
            self._upload(event)
        elif isinstance(event, CleanupFinished):
            self.leftovers += event.leftovers
        elif isinstance(event, RegistrationKept):
            self.kept.append(event)
        elif isinstance(event, RegistrationStatusChanged):
            if event.registration_id in self._followed:
                self._followed[event.registration_id] = (self._followed[event.registration_id][0], event.status)
        elif isinstance(event, RegistrationSubmitted):
            if event.resumed:
                self._followed[event.registration_id] = (event, None)
            how = "found" if event.resumed else "submitted"
            fields = {
                "event": "registration_found" if event.resumed else "registration_submitted",
                "registration_id": event.registration_id,
                "model_id": event.model_id,
                "region": event.region,
            }
            log.info(
                "%s: registration %s, model id %s",
                how,
                event.registration_id,
                event.model_id,
                extra={"fields": {k: v for k, v in fields.items() if v is not None}},
            )

    def followed_unfinished(self) -> list[str]:
        """A line for each followed registration not seen to end: what a stopped run names."""
        return [
            f"registration {found.registration_id} (model id {found.model_id}"
            f"{', ' + found.region if found.region else ''}) is {status or 'not final yet'}"
            for found, status in self._followed.values()
            if status not in TERMINAL_STATUSES
        ]

    def _upload(self, event: UploadProgress) -> None:
        now = time.monotonic()
        if event.done:
            self._uploads.pop(event.artifact, None)
            self._console.set_status(self.status_line())
            self._log(event)
            return
        if self._console.live:
            self._uploads[event.artifact] = event
            if now - self._drawn >= self._refresh:
                self._drawn = now
                self._console.set_status(self.status_line())
        elif now - self._logged.setdefault(event.artifact, now) >= self._interval:
            self._logged[event.artifact] = now
            self._log(event)

    def close(self) -> None:
        """Take the live line away (uploads that failed or were cancelled never said done)."""
        self._uploads.clear()
        self._console.set_status("")

    def status_line(self) -> str:
        """The live line: each upload in progress with its bar, the share and MiB acknowledged, its rate."""
        return "  ".join(_status(event) for event in self._uploads.values())

    @staticmethod
    def _log(event: UploadProgress) -> None:
        fields = {
            "fields": {
                "event": "upload_progress",
                "artifact": event.artifact,
                "bytes": event.bytes_uploaded,
                "bytes_read": event.bytes_read,
                "parts": event.parts_done,
                "rate": round(event.rate),
                "done": event.done,
            }
        }
        if event.done:
            log.info(
                "%s: %s uploaded in %.1f s, %d part(s), %.1f MiB/s (done)",
                event.artifact,
                _mib(event.bytes_uploaded),
                event.elapsed,
                event.parts_done,
                event.rate / 2**20,
                extra=fields,
            )
            return
        log.info(
            "%s: %d%%, %s of about %s uploaded (%s read), %d part(s), %.1f MiB/s",
            event.artifact,
            int(event.fraction * 100),
            _mib(event.bytes_uploaded),
            _mib(event.archive_estimate),
            _mib(event.bytes_read),
            event.parts_done,
            event.rate / 2**20,
            extra=fields,
        )


def _status(event: UploadProgress) -> str:
    """The bar follows what S3 acknowledged, against the archive's expected size; MiB throughout."""
    filled = int(event.fraction * _BAR)
    return (
        f"{event.artifact} [{'#' * filled}{'-' * (_BAR - filled)}] {int(event.fraction * 100):3d}% "
        f"{event.bytes_uploaded / 2**20:.0f}/{event.archive_estimate / 2**20:.0f} MiB, "
        f"{event.rate / 2**20:.0f} MiB/s"
    )


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"
