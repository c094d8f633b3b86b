"""The example service (examples/service/app.py) when an HTTP client leaves in the middle of its
stream: over real HTTP (uvicorn on loopback), so that the server sees a real disconnect.

Leaving cancels the registration: before the registry accepted it, its temporary objects are
removed; after, they are kept for the registry (the registrar's own warning says so). Either
way the service says nothing more: no traceback, no ERROR, no BrokenResourceError from a
stream nobody reads any more.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn

from async_registrar import Settings
from async_registrar._local import LocalStack
from examples.service.app import create_app

from .conftest import HELD, MiB, leftovers, make_job, mims_server, registration_config, remove_all


@contextlib.contextmanager
def serving(settings: Settings) -> Iterator[str]:
    """The example service under uvicorn, in a thread of its own; its URL. Leaving waits for the
    server to finish every request (uvicorn waits for their tasks) and its lifespan."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="example-service", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive(), "the example service did not start"
            assert time.monotonic() < deadline, "the example service did not start in time"
            time.sleep(0.01)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the example service did not stop"


async def leave_at(url: str, body: dict[str, Any], leave: Any) -> list[dict[str, Any]]:
    """POST a registration, read its events until `leave(event)` holds, then drop the connection."""
    seen: list[dict[str, Any]] = []
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream("POST", f"{url}/registrations", json=body) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            seen.append(json.loads(line))
            if leave(seen[-1]):
                return seen  # leaving the block closes the connection mid-stream
    raise AssertionError(f"the stream ended before the moment to leave: {[e['event'] for e in seen]}")


def noise(records: list[logging.LogRecord]) -> list[str]:
    """What a client leaving must not log: errors, tracebacks, and broken streams."""
    return [
        f"{r.levelname} {r.name}: {r.getMessage()}"
        for r in records
        if r.levelno >= logging.ERROR
        or r.exc_info
        or "BrokenResource" in r.getMessage()
        or "ClosedResource" in r.getMessage()
        or "Traceback" in r.getMessage()
    ]


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO)
    return caplog


async def test_a_client_leaving_during_the_upload_cancels_it_quietly(
    tmp_path: Path,
    stack: LocalStack,
    settings: Settings,
    s3: Any,
    logs: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Left while the model uploads: the registration is cancelled before anything is submitted,
    its objects and multipart uploads are removed, and nothing but INFO and WARNING is logged."""
    job = make_job(tmp_path, model_bytes=64 * MiB)  # over a second of upload with one part in flight
    body = {"config": registration_config(), "model_path": str(job["model"]), "payload_path": str(job["payload"])}
    with mims_server(stack) as registry:
        service = settings.model_copy(update={"mims_endpoint": registry.endpoint, "upload_concurrency": 1})
        with serving(service) as url:
            seen = await leave_at(url, body, lambda e: e["event"] == "UploadProgress" and e["artifact"] == "model")
        assert registry.registration_count == 0, "the registration went on after the client left"
    assert seen[-1]["done"] is False
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    assert any("removed the temporary objects" in r.getMessage() for r in logs.records), logs.text
    assert any(r.name == "examples.service" and "the client left" in r.getMessage() for r in logs.records)
    assert noise(logs.records) == []
    assert "Traceback" not in capfd.readouterr().err


async def test_a_client_leaving_after_submission_keeps_it_quietly(
    tmp_path: Path,
    stack: LocalStack,
    settings: Settings,
    s3: Any,
    logs: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Left once the registry accepted: the registration's artifacts are kept for the registry
    (the registrar's warning names them), and nothing else is said."""
    job = make_job(tmp_path)
    body = {"config": registration_config(), "model_path": str(job["model"]), "payload_path": str(job["payload"])}
    # Held until the client has left: a registration the service saw final would be cleaned, not kept.
    with mims_server(stack, processing_delay=HELD) as registry:
        with serving(settings.model_copy(update={"mims_endpoint": registry.endpoint})) as url:
            seen = await leave_at(url, body, lambda e: e["event"] == "RegistrationSubmitted")
        registration_id = seen[-1]["registration_id"]
        registry.finish_processing()
        with anyio.fail_after(10):  # the registry goes on and finishes it with the kept artifacts
            while (held := registry.registration(registration_id)) is None or held.status != "SUCCEEDED":
                await anyio.sleep(0.05)
    kept = [r.getMessage() for r in logs.records if r.levelno == logging.WARNING and "kept under" in r.getMessage()]
    assert len(kept) == 1, logs.text
    assert registration_id in kept[0]
    assert len(await leftovers(s3, settings.s3_bucket, settings.s3_prefix)) == 3
    assert any(r.name == "examples.service" and "the client left" in r.getMessage() for r in logs.records)
    assert noise(logs.records) == []
    assert "Traceback" not in capfd.readouterr().err
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
