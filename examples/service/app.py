"""A small registration service that embeds the registrar.

    POST /registrations  {"config": {...}, "model_path": "...", "payload_path": "..."}

answers with a stream of newline-delimited JSON events (upload progress, submitted,
status changes, cleanup) and ends with {"event": "registered", ...} or {"event": "error",
...}. One Registrar (one S3 client, one HTTP client) serves every request; a client that
disconnects cancels its registration, quietly (no traceback): its temporary objects are removed,
unless the registry already accepted it (then they are kept for the registry, and re-posting the
same request with the same workflow_execution_id resumes it).

Run it:  REGISTRAR_S3_BUCKET=... REGISTRAR_MIMS_ENDPOINT=... uvicorn --factory examples.service.app:main
Its log is JSON lines with the registrar's fields; OTEL_TRACES_EXPORTER=console prints each
registration's OpenTelemetry spans (with opentelemetry-sdk installed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from async_registrar import (
    ConfigurationError,
    JsonFormatter,
    ProgressEvent,
    Registrar,
    RegistrarError,
    RegistrationConfig,
    RegistrationRequest,
    Settings,
)

log = logging.getLogger("examples.service")


def create_app(settings: Settings) -> Starlette:
    registrar = Registrar(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with registrar:
            yield

    async def register(request: Request) -> Response:
        try:
            body = await request.json()
            registration = RegistrationRequest(
                config=RegistrationConfig.from_mapping(body.get("config")),
                model_path=Path(body["model_path"]),
                payload_path=Path(body["payload_path"]) if body.get("payload_path") else None,
                workflow_execution_id=body.get("workflow_execution_id"),
            )
        except ConfigurationError as exc:
            return JSONResponse({"message": "invalid configuration", "errors": list(exc.problems)}, status_code=422)
        except (ValueError, KeyError, TypeError) as exc:
            return JSONResponse({"message": f"bad request: {exc!r}"}, status_code=400)
        return _RegistrationEvents(registrar, registration)

    return Starlette(routes=[Route("/registrations", register, methods=["POST"])], lifespan=lifespan)


class _RegistrationEvents(Response):
    """A registration, run while its events are sent as NDJSON, one line each.

    The registration runs in a task group of the request's own task, beside a listener for
    the client leaving: leaving (an `http.disconnect`, or a send the server refuses) cancels
    the registration, and the response ends there, quietly. Nothing is sent into a stream
    nobody reads, and no generator is left suspended with tasks of its own still running.
    """

    media_type = "application/x-ndjson"

    def __init__(self, registrar: Registrar, registration: RegistrationRequest) -> None:
        # Like StreamingResponse: no body, so no Content-Length; the lines are sent as they come.
        self.status_code = 200
        self.background = None
        self.init_headers()
        self._registrar = registrar
        self._registration = registration

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sender, events = anyio.create_memory_object_stream[dict[str, Any]](256)
        finished = left = False

        async def watch(scope: anyio.CancelScope) -> None:
            nonlocal left
            while (await receive())["type"] != "http.disconnect":
                pass
            left = not finished
            scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(_register, self._registrar, self._registration, sender)
            tg.start_soon(watch, tg.cancel_scope)
            try:
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                async with events:
                    async for event in events:
                        line = (json.dumps(event) + "\n").encode()
                        await send({"type": "http.response.body", "body": line, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                finished = True
            except OSError:  # a server on ASGI 2.4 refuses to send to a client that left
                left = True
            tg.cancel_scope.cancel()  # the registration is over, or nobody waits for it any more
        if left:
            log.info("the client left: its registration was stopped (the registrar logged what it kept or removed)")


async def _register(
    registrar: Registrar, registration: RegistrationRequest, sender: MemoryObjectSendStream[dict[str, Any]]
) -> None:
    """Run the registration, sending its events and then its outcome to `sender`."""

    def forward(event: ProgressEvent) -> None:
        # A slow reader loses progress ticks, not results; a reader that left, everything.
        with contextlib.suppress(anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
            sender.send_nowait({"event": type(event).__name__, **dataclasses.asdict(event)})

    async with sender:
        try:
            result = await registrar.register(registration, on_progress=forward)
        except RegistrarError as exc:
            outcome: dict[str, Any] = {"event": "error", "kind": type(exc).__name__, "message": str(exc)}
        else:
            outcome = {
                "event": "registered",
                "registrations": [
                    {"region": r.region, "model_id": r.model_id, "workflow_execution_arn": r.workflow_execution_arn}
                    for r in result.registrations
                ],
            }
        with contextlib.suppress(anyio.BrokenResourceError):  # the client left: nobody to tell
            await sender.send(outcome)


def observe(environ: Mapping[str, str] = os.environ) -> None:
    """The service's log as JSON lines carrying the registrar's fields (run id, phase, region,
    artifact, registration id), and, where the OpenTelemetry SDK is installed and
    OTEL_TRACES_EXPORTER=console, each registration's spans printed as they end (a real
    service sends them to its collector instead: only the provider changes)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    if environ.get("OTEL_TRACES_EXPORTER") != "console":
        return
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        log.warning("OTEL_TRACES_EXPORTER=console needs opentelemetry-sdk (pip install opentelemetry-sdk)")
        return
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)


def main() -> Starlette:
    """The app for `uvicorn examples.service.app:app`, configured from the environment."""
    observe()
    return create_app(Settings.from_env())


if __name__ != "__main__":  # imported by uvicorn or a test: build the app only when asked

    def __getattr__(name: str) -> Any:
        if name == "app":
            return main()
        raise AttributeError(name)
