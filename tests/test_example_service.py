"""The example service (examples/service/app.py) embedding the registrar, run for real."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from async_registrar import Settings
from examples.service.app import create_app

from .conftest import leftovers, make_job, registration_config


async def post(settings: Settings, body: dict[str, Any]) -> httpx.Response:
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service") as client,
    ):
        return await client.post("/registrations", json=body, timeout=60)


async def test_the_service_streams_progress_and_the_result(tmp_path: Path, settings: Settings, s3: Any) -> None:
    """Progress events, then the registration; the temporary objects are gone afterwards."""
    job = make_job(tmp_path)
    response = await post(
        settings,
        {"config": registration_config(), "model_path": str(job["model"]), "payload_path": str(job["payload"])},
    )
    assert response.status_code == 200
    events = [json.loads(line) for line in response.text.splitlines()]
    kinds = [e["event"] for e in events]
    assert "UploadProgress" in kinds
    assert "RegistrationSubmitted" in kinds
    assert "CleanupFinished" in kinds
    assert kinds[-1] == "registered"
    assert events[-1]["registrations"][0]["model_id"].startswith("model-")
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_the_service_reports_errors(tmp_path: Path, settings: Settings) -> None:
    """An invalid configuration is a 422 naming the fields; a missing model is an error event."""
    bad = await post(settings, {"config": {"model_domain": 1}, "model_path": str(tmp_path)})
    assert bad.status_code == 422
    assert any(e.startswith("model_owner: required") for e in bad.json()["errors"])
    missing = await post(settings, {"config": registration_config(), "model_path": str(tmp_path / "none")})
    (event,) = [json.loads(line) for line in missing.text.splitlines()]
    assert event["event"] == "error"
    assert event["kind"] == "InputError"
