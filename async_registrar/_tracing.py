"""OpenTelemetry spans for a registration and its phases, where `opentelemetry-api` is installed.

A registration is one span (`async_registrar.register`) and each phase a child:
`async_registrar.preflight`, `.upload` (and `.upload_artifact` per artifact), `.submit`,
`.wait`, `.cleanup` (`.resume` when a re-run finds an earlier attempt). Attributes are named
`async_registrar.*`: run id, region, artifact, registration and model id, status, bytes,
parts, integrity level. A span that ends with an exception records it and has status ERROR.

The library only uses the API: spans go wherever the host's tracer provider sends them, and
are no-ops without one. Without the package nothing is imported beyond one failed lookup,
done once, and every call here returns at once.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
from collections.abc import Iterator
from typing import Any

from ._version import __version__

__all__ = ["annotate", "span"]

PREFIX = "async_registrar."


@functools.cache
def _trace() -> Any:
    """The `opentelemetry.trace` module, or None where the API is not installed."""
    try:
        if importlib.util.find_spec("opentelemetry.trace") is None:
            return None
        return importlib.import_module("opentelemetry.trace")
    except (ImportError, ValueError):  # absent, or blocked (`sys.modules["opentelemetry"] = None`)
        return None


def _attributes(values: dict[str, object]) -> dict[str, Any]:
    return {PREFIX + name: value for name, value in values.items() if value is not None}


@contextlib.contextmanager
def span(name: str, **attributes: object) -> Iterator[None]:
    """A span `async_registrar.<name>` around the block (a child of the current one), with
    `attributes` (those not None); an exception leaving the block is recorded on it."""
    trace = _trace()
    if trace is None:
        yield
        return
    tracer = trace.get_tracer("async_registrar", __version__)
    with tracer.start_as_current_span(PREFIX + name, attributes=_attributes(attributes)):
        yield


def annotate(**attributes: object) -> None:
    """Set `attributes` (those not None) on the current span, if one is recording."""
    trace = _trace()
    if trace is None:
        return
    current = trace.get_current_span()
    if current.is_recording():
        current.set_attributes(_attributes(attributes))
