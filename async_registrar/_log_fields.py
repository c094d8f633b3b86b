"""What a log line is about: the run, its phase, the region, the artifact, the registration.

The library sets these fields around each phase of a registration with `log_fields(...)`;
they live in a context variable, so they follow the tasks a phase starts (anyio copies the
context into each task and worker thread). The library's own log lines stay plain text;
a formatter reads the fields when it writes a record: `JsonFormatter` (the command's
`--log-format json`, and for services that embed the library) puts them on every line.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

from ._errors import redact

__all__ = ["FIELD_NAMES", "JsonFormatter", "current_log_fields", "log_fields"]

#: The fields the library sets, in the order a JSON line shows them.
FIELD_NAMES = (
    "event",
    "run_id",
    "attempt",
    "phase",
    "region",
    "artifact",
    "registration_id",
    "model_id",
    "status",
    "bytes",
    "bytes_read",
    "parts",
    "rate",
    "done",
    "exit_code",
)

_EMPTY: Mapping[str, object] = MappingProxyType({})
_FIELDS: ContextVar[Mapping[str, object]] = ContextVar("async_registrar_log_fields", default=_EMPTY)


@contextlib.contextmanager
def log_fields(**fields: object) -> Iterator[None]:
    """Add `fields` (those not None) to every log line written in the block, and in the tasks
    and threads it starts."""
    added = {name: value for name, value in fields.items() if value is not None}
    token = _FIELDS.set(MappingProxyType({**_FIELDS.get(), **added}))
    try:
        yield
    finally:
        _FIELDS.reset(token)


def current_log_fields() -> dict[str, object]:
    """The fields of the current context (a copy)."""
    return dict(_FIELDS.get())


class JsonFormatter(logging.Formatter):
    """One JSON object per record: `time` (UTC, ISO 8601), `level`, `logger`, `message`, then the
    fields of the context the record was written in and the record's own (`extra={"fields":
    {...}}`), and `exception` when there is one. Messages, field values and tracebacks go
    through the same redaction as the command's text (no URL query string or credentials).
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        fields = {**_FIELDS.get(), **(getattr(record, "fields", None) or {})}
        for name in sorted(fields, key=lambda n: FIELD_NAMES.index(n) if n in FIELD_NAMES else len(FIELD_NAMES)):
            value = fields[name]
            entry[name] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=lambda value: redact(str(value)), ensure_ascii=False)
