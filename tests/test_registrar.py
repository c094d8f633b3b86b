"""The whole registration as a library call, on moto S3 and the reference MIMS."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from async_registrar import (
    CleanupFinished,
    InputError,
    ProgressEvent,
    Registrar,
    RegistrationConfig,
    RegistrationFailed,
    RegistrationKept,
    RegistrationStatusChanged,
    RegistrationSubmitted,
    Settings,
    UploadProgress,
)
from async_registrar._local import LocalStack

from .conftest import (
    HELD,
    MiB,
    final_status,
    leftovers,
    make_job,
    mims_server,
    registration_config,
    remove_all,
    request_for,
)
from .test_key_characters import PREFIXES, under


def recording_client(bodies: list[dict[str, Any]]) -> httpx.AsyncClient:
    """An HTTP client that keeps the JSON body of every POST it sends (the submissions)."""

    async def record(request: httpx.Request) -> None:
        if request.method == "POST":
            bodies.append(json.loads(request.content))

    return httpx.AsyncClient(event_hooks={"request": [record]})


async def registry_sha256(s3: Any, bucket: str, key: str) -> str:
    obj = await s3.get_object(Bucket=bucket, Key=key)
    async with obj["Body"] as body:
        return hashlib.sha256(await body.read()).hexdigest()


async def test_register_end_to_end(tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack) -> None:
    """Uploads, submits, waits, reports, cleans: the registry holds exactly what was uploaded."""
    job = make_job(tmp_path, model_bytes=5 * MiB)
    events: list[ProgressEvent] = []
    bodies: list[dict[str, Any]] = []

    async with (
        recording_client(bodies) as http,
        Registrar(settings, http_client=http, on_progress=events.append) as registrar,
    ):
        result = await registrar.register(request_for(job, workflow_execution_id="wf-7"))

    assert result.model_id.startswith("model-")
    assert result.workflow_execution_arn.endswith(result.registration_id)
    assert result.model_artifact.parts == 3
    assert result.payload_artifact is not None
    assert set(result.timings) == {"validate", "preflight", "upload", "register", "total"}
    prefix = f"models/{result.model_id}/"
    assert await registry_sha256(s3, stack.registry_bucket, prefix + "model.tar.gz") == result.model_artifact.sha256
    assert await registry_sha256(s3, stack.registry_bucket, prefix + "payload.tar.gz") == (
        result.payload_artifact.sha256
    )
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []

    (body,) = bodies
    assert body["workflow_execution_id"] == "wf-7"
    assert body["model_registration_region"] == "us-west-2"  # one region's registration: a name, not a list
    assert body["performance_metadata"] is None
    assert body["model_artifact"]["size_bytes"] == result.model_artifact.size
    kinds = [type(e).__name__ for e in events]
    assert kinds.index("UploadProgress") < kinds.index("RegistrationSubmitted") < kinds.index("CleanupFinished")
    statuses = [e.status for e in events if isinstance(e, RegistrationStatusChanged)]
    assert statuses[-1] == "SUCCEEDED"
    assert any(isinstance(e, UploadProgress) and e.done and e.artifact == "payload" for e in events)
    assert isinstance(events[-1], CleanupFinished)
    assert events[-1].deleted == 3  # the two archives and the run manifest
    assert events[-1].leftovers == ()
    assert result.leftovers == ()
    assert not any(r.resumed for r in result.registrations)


async def test_metadata_is_sent(tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack) -> None:
    """Performance metadata from S3 (PERFORMANCE_METADATA_PATH) reaches the registry."""
    job = make_job(tmp_path)
    key = settings.s3_prefix + "meta/perf.json"
    await s3.put_object(Bucket=settings.s3_bucket, Key=key, Body=json.dumps({"auc": 0.91}).encode())
    bodies: list[dict[str, Any]] = []

    async with (
        recording_client(bodies) as http,
        Registrar(settings, http_client=http) as registrar,
    ):
        await registrar.register(request_for(job, performance_metadata_uri=f"s3://{settings.s3_bucket}/{key}"))
    assert bodies[0]["performance_metadata"] == {"auc": 0.91}
    await s3.delete_object(Bucket=settings.s3_bucket, Key=key)


async def test_failed_registration_still_cleans(tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack) -> None:
    """FAILED raises with the reason, and the temporary prefix is emptied."""
    with mims_server(stack, fail_registrations="model rejected by policy") as failing:
        async with Registrar(settings.model_copy(update={"mims_endpoint": failing.endpoint})) as registrar:
            with pytest.raises(RegistrationFailed, match="model rejected by policy"):
                await registrar.register(request_for(make_job(tmp_path)))
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


@pytest.mark.parametrize("where", ["", *PREFIXES])
async def test_cancelled_during_upload_leaves_nothing(tmp_path: Path, settings: Settings, s3: Any, where: str) -> None:
    """Cancelling after the first part: CancelledError propagates and the prefix is empty (also
    under prefixes S3 clients percent-encode: the cleanup lists objects and open uploads by it)."""
    settings = under(settings, where)
    job = make_job(tmp_path, model_bytes=20 * MiB)
    with anyio.CancelScope() as scope:

        def on_progress(event: ProgressEvent) -> None:
            if isinstance(event, UploadProgress) and event.artifact == "model":
                scope.cancel()

        async with Registrar(settings, on_progress=on_progress) as registrar:
            await registrar.register(request_for(job))
    assert scope.cancelled_caught
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    # Nothing of the registration runs on: no task, no gzip or checking thread.
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert not [t.name for t in threading.enumerate() if t.name.startswith("registrar-")]


async def test_cancelled_during_the_wait_keeps_what_the_registry_reads(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Cancelled once the registry accepted: the artifacts and the manifest stay, named in an event;
    the registry, reading them late, still ends SUCCEEDED."""
    job = make_job(tmp_path)
    kept: list[RegistrationKept] = []
    # Held until the cancelled run's kept artifacts are checked: it reads them only after that.
    with mims_server(stack, read_artifacts="at_finish", processing_delay=HELD) as late:
        with anyio.CancelScope() as scope:

            def on_progress(event: ProgressEvent) -> None:
                if isinstance(event, RegistrationSubmitted):
                    scope.cancel()
                if isinstance(event, RegistrationKept):
                    kept.append(event)

            async with Registrar(
                settings.model_copy(update={"mims_endpoint": late.endpoint}), on_progress=on_progress
            ) as registrar:
                await registrar.register(request_for(job, workflow_execution_id="wf-cancel"))
        assert scope.cancelled_caught
        (event,) = kept
        (registration,) = event.registrations
        assert registration.status == "PENDING"
        assert registration.kept_prefix is not None
        assert registration.kept_prefix.startswith(f"s3://{settings.s3_bucket}/{settings.s3_prefix}run-")
        assert "MODS_WORKFLOW_EXECUTION_ID=wf-cancel" in event.resume_hint
        names = sorted(key.rsplit("/", 1)[1] for key in await leftovers(s3, settings.s3_bucket, settings.s3_prefix))
        assert names == ["model.tar.gz", "payload.tar.gz", "registration.json"]
        late.finish_processing()
        assert await final_status(late, registration.registration_id) == "SUCCEEDED"
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_bad_input_fails_before_any_upload(tmp_path: Path, settings: Settings, s3: Any) -> None:
    """An empty model directory is an InputError, and nothing was written to S3."""
    job = make_job(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    writes: list[str] = []
    s3.meta.events.register("before-call.s3", lambda **kw: writes.append(kw["model"].name))
    async with Registrar(settings, s3_client=s3) as registrar:
        with pytest.raises(InputError, match="holds no files"):
            await registrar.register(request_for({**job, "model": empty}))
    assert writes == []


async def test_a_registrar_is_entered_once(tmp_path: Path, settings: Settings) -> None:
    """Entering twice, using it before entering or after its block ended are usage errors, outside
    the error tree (after the block, a client opened would never be closed)."""
    job = make_job(tmp_path)
    registrar = Registrar(settings)
    async with registrar:
        with pytest.raises(RuntimeError, match="only once"):
            await registrar.__aenter__()
    with pytest.raises(RuntimeError, match="async context manager"):
        await Registrar(settings).register(request_for(job))
    with pytest.raises(RuntimeError, match="is closed"):
        await registrar.register(request_for(job))
    with pytest.raises(RuntimeError, match="is closed"):
        await registrar.upload(job["model"], f"s3://{settings.s3_bucket}/{settings.s3_prefix}model.tar.gz")


def test_example_request_matches_the_example_config() -> None:
    """The example's config is what the tests build on."""
    assert RegistrationConfig.from_mapping(registration_config()).model_owner == "ml-platform-team"
