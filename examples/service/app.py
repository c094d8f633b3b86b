"""A small registration service that embeds the registrar.

    POST /registrations  {"config": {...}, "model_path": "...", "payload_path": "..."}

answers with a stream of newline-delimited JSON events (upload progress, submitted,
status changes, cleanup) and ends with {"event": "registered", ...} or {"event": "error",
...}. One Registrar (one S3 client, one HTTP client) serves every request; a client that
disconnects cancels its registration: its temporary objects are removed, unless the registry
already accepted it (then they are kept for the registry, and re-posting the same request with
the same workflow_execution_id resumes it).

Run it:  REGISTRAR_S3_BUCKET=... REGISTRAR_MIMS_ENDPOINT=... uvicorn --factory examples.service.app:main
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from async_registrar import (
    ConfigurationError,
    ProgressEvent,
    Registrar,
    RegistrarError,
    RegistrationConfig,
    RegistrationRequest,
    Settings,
)


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
        return StreamingResponse(_events(registrar, registration), media_type="application/x-ndjson")

    return Starlette(routes=[Route("/registrations", register, methods=["POST"])], lifespan=lifespan)


async def _events(registrar: Registrar, registration: RegistrationRequest) -> AsyncIterator[str]:
    send, receive = anyio.create_memory_object_stream[dict[str, Any]](256)

    def forward(event: ProgressEvent) -> None:
        with contextlib.suppress(anyio.WouldBlock):  # a slow reader loses progress ticks, not results
            send.send_nowait({"event": type(event).__name__, **dataclasses.asdict(event)})

    async def run() -> None:
        async with send:
            try:
                result = await registrar.register(registration, on_progress=forward)
            except RegistrarError as exc:
                await send.send({"event": "error", "kind": type(exc).__name__, "message": str(exc)})
                return
            await send.send(
                {
                    "event": "registered",
                    "registrations": [
                        {"region": r.region, "model_id": r.model_id, "workflow_execution_arn": r.workflow_execution_arn}
                        for r in result.registrations
                    ],
                }
            )

    async with anyio.create_task_group() as tg:  # the response ending (or the client leaving) ends the registration
        tg.start_soon(run)
        async with receive:
            async for item in receive:
                yield json.dumps(item) + "\n"


def main() -> Starlette:
    """The app for `uvicorn examples.service.app:app`, configured from the environment."""
    return create_app(Settings.from_env())


if __name__ != "__main__":  # imported by uvicorn or a test: build the app only when asked

    def __getattr__(name: str) -> Any:
        if name == "app":
            return main()
        raise AttributeError(name)
