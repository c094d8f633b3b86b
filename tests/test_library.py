"""The library in an async service: handles, many registrations at once, several regions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from async_registrar import (
    CleanupFinished,
    ConfigurationError,
    ProgressEvent,
    Registrar,
    RegistrationFailed,
    RegistrationRequest,
    RegistrationResult,
    RegistrationSucceeded,
    Settings,
    UploadProgress,
)
from async_registrar._artifacts import inspect_artifact
from async_registrar._local import REGION, LocalStack
from async_registrar._request import run_identity

from .conftest import HELD, MiB, final_status, leftovers, make_job, mims_server, registration_config, remove_all


async def request_for(job: dict[str, Path], **options: Any) -> RegistrationRequest:
    return await RegistrationRequest.from_files(job["config"], job["model"], payload=job["payload"], **options)


async def test_submit_returns_a_handle_to_wait_on(tmp_path: Path, settings: Settings, s3: Any) -> None:
    """submit() returns once accepted (objects still there for the registry); wait() ends and cleans."""
    async with Registrar(settings) as registrar:
        handle = await registrar.submit(await request_for(make_job(tmp_path)))
        (accepted,) = handle.accepted
        assert accepted.status == "PENDING"
        assert len(await leftovers(s3, settings.s3_bucket, settings.s3_prefix)) == 3  # and the run manifest
        result = await handle.wait()
        with pytest.raises(RuntimeError, match="already waited"):
            await handle.wait()
    assert result.registration_id == accepted.registration_id
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_the_result_is_sent_before_the_cleanup(tmp_path: Path, settings: Settings, s3: Any) -> None:
    """`RegistrationSucceeded` carries the result's registrations before the temporary objects are
    removed (a process killed during a slow cleanup has its result), then `CleanupFinished`."""
    events: list[ProgressEvent] = []
    async with Registrar(settings) as registrar:
        result = await registrar.register(await request_for(make_job(tmp_path)), on_progress=events.append)
    kinds = [type(e) for e in events if isinstance(e, RegistrationSucceeded | CleanupFinished)]
    assert kinds == [RegistrationSucceeded, CleanupFinished]
    (succeeded,) = [e for e in events if isinstance(e, RegistrationSucceeded)]
    assert succeeded.registrations == result.registrations
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_handle_never_waited_for_is_cleaned_at_exit_once_final(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Leaving the registrar closes open handles: a registration final by then loses its objects."""
    async with Registrar(settings) as registrar:
        handle = await registrar.submit(await request_for(make_job(tmp_path)))
        assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
        assert await final_status(stack.mims_server, handle.accepted[0].registration_id) == "SUCCEEDED"
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_handle_never_waited_for_keeps_an_unfinished_registration(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """An unfinished registration's artifacts outlive the registrar (the registry reads them), and it
    succeeds; the warning names it."""
    # Held until the registrar is left and the kept artifacts checked: one that found it final
    # then would rightly remove them.
    with mims_server(stack, read_artifacts="at_finish", processing_delay=HELD) as late:
        async with Registrar(settings.model_copy(update={"mims_endpoint": late.endpoint})) as registrar:
            handle = await registrar.submit(await request_for(make_job(tmp_path)))
        assert len(await leftovers(s3, settings.s3_bucket, settings.s3_prefix)) == 3
        late.finish_processing()
        assert await final_status(late, handle.accepted[0].registration_id) == "SUCCEEDED"
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_two_registrars_with_different_settings(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Two registrars in one process, each with its own prefix and registry, side by side."""
    other_prefix = settings.s3_prefix.rstrip("/") + "-other/"
    results: dict[str, RegistrationResult] = {}
    with mims_server(stack) as first, mims_server(stack) as second:

        async def run(name: str, settings: Settings) -> None:
            async with Registrar(settings) as registrar:
                results[name] = await registrar.register(await request_for(make_job(tmp_path / name)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "a", settings.model_copy(update={"mims_endpoint": first.endpoint}))
            tg.start_soon(
                run, "b", settings.model_copy(update={"mims_endpoint": second.endpoint, "s3_prefix": other_prefix})
            )
        assert (first.registration_count, second.registration_count) == (1, 1)
    assert results["a"].model_id != results["b"].model_id
    assert results["a"].model_artifact.uri.startswith(f"s3://{settings.s3_bucket}/{settings.s3_prefix}")
    assert results["b"].model_artifact.uri.startswith(f"s3://{settings.s3_bucket}/{other_prefix}")
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    assert await leftovers(s3, settings.s3_bucket, other_prefix) == []


async def test_cancelling_one_of_ten_leaves_the_others_alone(tmp_path: Path, settings: Settings, s3: Any) -> None:
    """Ten registrations share one registrar; one is cancelled mid-upload: nine succeed."""
    results: dict[int, RegistrationResult] = {}
    victim = anyio.CancelScope()
    victim_job = make_job(tmp_path / "victim", model_bytes=6 * MiB)
    victim_request = await request_for(victim_job, workflow_execution_id="the-victim")
    victim_run = run_identity(
        victim_request,
        inspect_artifact(victim_job["model"], role="model"),
        inspect_artifact(victim_job["payload"], role="payload"),
        None,
        settings,
    ).group

    def on_progress(event: ProgressEvent) -> None:
        if isinstance(event, UploadProgress) and f"/{victim_run}/" in event.uri:
            victim.cancel()

    async with Registrar(settings, on_progress=on_progress) as registrar:

        async def run(index: int) -> None:
            if index == 3:
                with victim:
                    await registrar.register(victim_request)
                return
            job = make_job(tmp_path / str(index), model_bytes=6 * MiB)
            results[index] = await registrar.register(await request_for(job))

        async with anyio.create_task_group() as tg:
            for index in range(10):
                tg.start_soon(run, index)
    assert victim.cancelled_caught
    assert sorted(results) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert len({r.model_id for r in results.values()}) == 9
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_three_regions(
    tmp_path: Path, settings: Settings, stack: LocalStack, regional_s3: dict[str, Any]
) -> None:
    """One archive, uploaded to three regions' buckets, registered three times, all cleaned."""
    regions = list(regional_s3)
    job = make_job(tmp_path, config=registration_config(model_registration_region=regions))
    with mims_server(stack) as registry:
        regional = settings.model_copy(
            update={"s3_bucket": "registrar-mr-{region}", "mims_endpoint": registry.endpoint}
        )
        async with Registrar(regional) as registrar:
            result = await registrar.register(await request_for(job))
        assert registry.registration_count == 3
    assert [r.region for r in result.registrations] == regions
    assert len({r.model_id for r in result.registrations}) == 3
    assert len({r.model_artifact.sha256 for r in result.registrations}) == 1
    for registration in result.registrations:
        assert registration.model_artifact.location.bucket == f"registrar-mr-{registration.region}"
        assert registration.workflow_execution_arn.startswith(f"arn:aws:states:{registration.region}:")
    for region, client in regional_s3.items():
        assert await leftovers(client, f"registrar-mr-{region}", settings.s3_prefix) == []


async def test_one_failing_region_leaves_nothing_anywhere(
    tmp_path: Path, settings: Settings, stack: LocalStack, regional_s3: dict[str, Any]
) -> None:
    """eu-west-1's registry fails the registration: the error names it; no region keeps objects."""
    regions = list(regional_s3)
    job = make_job(tmp_path, config=registration_config(model_registration_region=regions))
    with mims_server(stack, fail_regions=["eu-west-1"]) as registry:
        regional = settings.model_copy(
            update={"s3_bucket": "registrar-mr-{region}", "mims_endpoint": registry.endpoint}
        )
        async with Registrar(regional) as registrar:
            with pytest.raises(RegistrationFailed, match="registrations in eu-west-1 are failing"):
                await registrar.register(await request_for(job))
        assert registry.registration_count == 3
    for region, client in regional_s3.items():
        assert await leftovers(client, f"registrar-mr-{region}", settings.s3_prefix) == []


def test_the_example_config_has_one_region() -> None:
    """The shipped example stays single-region (the CLI's two lines)."""
    assert (
        json.loads((Path(__file__).parent.parent / "examples/demo/registration.json").read_text())[
            "model_registration_region"
        ]
        == REGION
    )


async def test_upload_is_public_with_the_commands_guarantees(tmp_path: Path, settings: Settings, s3: Any) -> None:
    """`Registrar.upload`: a typed result whose sha256 is the object's; a missing bucket fails
    before a byte is sent; a cancellation mid-upload leaves no open multipart upload."""
    import hashlib

    from async_registrar import StorageError, UploadedArtifact

    job = make_job(tmp_path, model_bytes=12 * MiB)
    key = f"{settings.s3_prefix}direct/model.tar.gz"
    seen: list[Any] = []
    async with Registrar(settings) as registrar:
        uploaded = await registrar.upload(job["model"], f"s3://{settings.s3_bucket}/{key}", on_progress=seen.append)
        assert isinstance(uploaded, UploadedArtifact)
        body = await (await s3.get_object(Bucket=settings.s3_bucket, Key=key))["Body"].read()
        assert hashlib.sha256(body).hexdigest() == uploaded.sha256
        assert uploaded.size == len(body)
        assert uploaded.parts >= 3
        assert seen
        await s3.delete_object(Bucket=settings.s3_bucket, Key=key)

        with pytest.raises(StorageError, match="does not exist"):
            await registrar.upload(job["model"], "s3://no-such-bucket-for-upload/x.tar.gz")

        with anyio.CancelScope() as scope:  # cancelled once the first part is in

            def cancel_after_a_part(event: Any) -> None:
                if getattr(event, "parts_done", 0) >= 1:
                    scope.cancel()

            await registrar.upload(job["model"], f"s3://{settings.s3_bucket}/{key}", on_progress=cancel_after_a_part)
        assert scope.cancelled_caught
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_an_upload_needs_no_registry_and_registering_without_one_names_it(
    tmp_path: Path, settings: Settings, s3: Any
) -> None:
    """Settings without a MIMS endpoint serve `upload`; `register`, `check` and `sweep` raise a
    ConfigurationError that names the setting, before anything is uploaded."""
    from async_registrar import ConfigurationError

    job = make_job(tmp_path, model_bytes=MiB)
    alone = settings.model_copy(update={"mims_endpoint": None})
    key = f"{settings.s3_prefix}no-registry/model.tar.gz"
    async with Registrar(alone) as registrar:
        uploaded = await registrar.upload(job["model"], f"s3://{settings.s3_bucket}/{key}")
        assert uploaded.size > 0
        await s3.delete_object(Bucket=settings.s3_bucket, Key=key)
        request = await RegistrationRequest.from_files(job["config"], job["model"])
        for call in (registrar.register(request), registrar.check(request), registrar.sweep()):
            with pytest.raises(ConfigurationError, match="mims_endpoint: required to register or sweep"):
                await call
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_an_upload_opens_no_http_client_and_a_registration_opens_one_once(
    tmp_path: Path, settings: Settings, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registry's HTTP client (its TLS setup and imports cost ~60 ms of a start) is opened
    when a registry is first used, once, and closed with the registrar."""
    import httpx

    from async_registrar import _registrar

    opened: list[httpx.AsyncClient] = []

    class Counted(httpx.AsyncClient):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            opened.append(self)

    monkeypatch.setattr(_registrar.httpx, "AsyncClient", Counted)
    job = make_job(tmp_path, model_bytes=MiB)
    key = f"{settings.s3_prefix}no-http/model.tar.gz"
    async with Registrar(settings) as registrar:
        await registrar.upload(job["model"], f"s3://{settings.s3_bucket}/{key}")
        await s3.delete_object(Bucket=settings.s3_bucket, Key=key)
        assert opened == []
        async with anyio.create_task_group() as tg:  # two at once: still one client
            for n in range(2):
                tg.start_soon(registrar.register, await request_for(make_job(tmp_path / f"job-{n}")))
        assert len(opened) == 1
        assert not opened[0].is_closed
    assert opened[0].is_closed
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


# --- papercuts an embedding service met (black-box trial) -------------------------------------


async def test_an_async_progress_callback_is_refused_at_once(settings: Settings) -> None:
    """An `async def` callback was called, its coroutine never run, the registration none the
    wiser: it is a TypeError where it is given (the Registrar, or the call)."""

    async def callback(event: object) -> None:
        pass  # pragma: no cover

    class Handler:
        async def __call__(self, event: object) -> None:
            pass  # pragma: no cover

    for wrong in (callback, Handler()):
        with pytest.raises(TypeError, match="is an async function"):
            Registrar(settings, on_progress=wrong)
    async with Registrar(settings) as registrar:
        with pytest.raises(TypeError, match="is an async function"):
            await registrar.upload("/nonexistent", f"s3://{settings.s3_bucket}/x.tar.gz", on_progress=callback)


async def test_a_callback_that_returns_an_awaitable_is_warned_about_once(
    tmp_path: Path, settings: Settings, s3: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A plain function returning a coroutine (a lambda around an async function) cannot be told
    beforehand: its coroutine is closed (no "never awaited" warning) and it is said once."""

    async def later(event: object) -> None:
        pass  # pragma: no cover

    job = make_job(tmp_path, model_bytes=MiB)
    async with Registrar(settings, on_progress=lambda event: later(event)) as registrar:
        await registrar.upload(job["model"], f"s3://{settings.s3_bucket}/{settings.s3_prefix}m.tar.gz")
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    assert caplog.text.count("returned an awaitable, which is never awaited") == 1


async def test_from_files_takes_the_payload_by_its_fields_name_too(tmp_path: Path) -> None:
    """`from_files(..., payload_path=...)` was a TypeError ("multiple values"): options are the
    other fields, and payload_path is one."""
    job = make_job(tmp_path)
    by_field = await RegistrationRequest.from_files(job["config"], job["model"], payload_path=job["payload"])
    by_argument = await RegistrationRequest.from_files(job["config"], job["model"], payload=job["payload"])
    assert by_field.payload_path == by_argument.payload_path == job["payload"]
    with pytest.raises(TypeError, match="takes the payload once"):
        await RegistrationRequest.from_files(
            job["config"], job["model"], payload=job["payload"], payload_path=job["payload"]
        )


def test_a_first_poll_later_than_the_longest_wait_is_refused() -> None:
    """poll_initial=20 with poll_max=0.5 was accepted, and the first poll came after 20 s."""
    with pytest.raises(
        ConfigurationError, match=r"poll_max: must be at least the first poll's delay, poll_initial \(20 s\)"
    ):
        Settings(s3_bucket="bucket", poll_initial=20, poll_max=0.5)


def test_the_library_says_it_needs_asyncio() -> None:
    """Under trio, aiofiles and aiobotocore failed deep inside with "no running event loop"; the
    library says what it needs where it is entered (here: no asyncio loop at all)."""
    from async_registrar._concurrency import require_asyncio

    with pytest.raises(RuntimeError, match="runs on asyncio only"):
        require_asyncio("the Registrar")


async def test_botocores_data_files_are_read_off_the_event_loop(settings: Settings) -> None:
    """Entering a Registrar made its S3 client on the event loop, reading and parsing botocore's
    JSON there: 40-100 ms of a stalled loop for a service that opens one per request.  The files
    are read on the registrar's threads now; what stays on the loop finds them loaded."""
    import threading

    from botocore.loaders import Loader

    loop_thread = threading.get_ident()
    readers: list[tuple[str, bool]] = []
    load = Loader.load_service_model

    def recording(self: Loader, service_name: str, type_name: str, api_version: str | None = None) -> Any:
        readers.append((type_name, threading.get_ident() == loop_thread))
        return load(self, service_name, type_name, api_version)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Loader, "load_service_model", recording)
        async with Registrar(settings):
            pass
    first = dict(reversed(readers))  # the first read of each file
    assert first["service-2"] is False
    assert first["endpoint-rule-set-1"] is False
