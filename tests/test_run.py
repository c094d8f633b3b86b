"""The run lifecycle at the registry boundary: what is kept, what is removed, and resuming.

Against the moto server and the reference MIMS over HTTP; the reference reads the artifacts
only when a registration finishes (`read_artifacts="at_finish"`), as an asynchronous
workflow does, so a run that deleted them under an accepted registration is caught by the
registration ending FAILED.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from botocore.exceptions import ClientError
from pydantic import SecretStr

from async_registrar import (
    CleanupError,
    CleanupFinished,
    ConfigurationError,
    IdempotencyConflict,
    ProgressEvent,
    Registrar,
    RegistrationFailed,
    RegistrationKept,
    RegistrationRejected,
    RegistrationRequest,
    RegistrationStatusChanged,
    RegistrationSubmitted,
    RegistrationTimeout,
    RegistryUnavailable,
    Settings,
    UploadProgress,
)
from async_registrar._local import LocalStack
from async_registrar.reference_mims import ThreadedMimsServer

from .conftest import (
    MiB,
    Recorder,
    cancel_when,
    final_status,
    kept_by_a_timeout,
    kept_then_failed,
    late_registry,
    leftovers,
    make_job,
    mims_server,
    names_under,
    on,
    registration_config,
    release_when_submitted,
    remove_all,
    request_for,
)
from .fault_proxy import RESET, FaultProxy, Hold, HoldingProxy, Reply, Stall, refuse_copies


async def resume(
    settings: Settings, request: RegistrationRequest, registration_id: str, registry: ThreadedMimsServer
) -> Recorder:
    """Re-run with the same request: the kept registration is followed to SUCCEEDED, nothing uploaded
    (held unfinished by `registry` until the re-run follows it, then let finish)."""
    seen = Recorder()
    async with Registrar(settings, on_progress=release_when_submitted(registry, seen)) as registrar:
        result = await registrar.register(request)
    assert result.registration_id == registration_id
    assert result.registrations[0].resumed
    assert seen.of(UploadProgress) == []
    assert [e.resumed for e in seen.of(RegistrationSubmitted)] == [True]
    assert "digest" in result.timings
    return seen


async def rerun_cancelled_while_held(
    settings: Settings, registry: ThreadedMimsServer, request: RegistrationRequest, proxy: HoldingProxy, s3: Any
) -> tuple[Recorder, list[str]]:
    """Re-run `request` with its S3 requests through `proxy`, cancel it from outside once `proxy` holds
    one, then let the held requests reach S3 and wait for their answers.  The events, and what was
    under the test's prefix at the moment of the cancellation."""
    seen = Recorder()
    at_cancel: list[str] = []

    async def held() -> None:
        await proxy.arrived.wait()
        at_cancel.extend(await leftovers(s3, settings.s3_bucket, settings.s3_prefix))

    async with Registrar(on(settings, registry, s3_endpoint_url=proxy.endpoint), on_progress=seen) as registrar:
        await cancel_when(registrar, request, held)
    proxy.release()  # after the run's cleanup: what was held reaches S3 only now
    with anyio.fail_after(30):
        await proxy.answered.wait()
    return seen, at_cancel


# --- after the point of no return: kept, named, resumed --------------------------------------


async def test_a_wait_timeout_keeps_names_and_a_rerun_resumes(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """RegistrationTimeout carries the kept registration (typed) and how to resume; the manifest says
    what was submitted; the re-run makes no second registration and uploads nothing."""
    request = request_for(make_job(tmp_path), workflow_execution_id="wf-timeout")
    with late_registry(stack) as registry:
        async with Registrar(on(settings, registry, wait_timeout=0.5)) as registrar:
            with pytest.raises(RegistrationTimeout) as caught:
                await registrar.register(request)
        error = caught.value
        (kept,) = error.kept
        assert kept.status in ("PENDING", "IN_PROGRESS")
        assert kept.region == "us-west-2"
        assert kept.registration_id == error.registration_id
        assert registry.registration(kept.registration_id).model_id == kept.model_id  # type: ignore[union-attr]
        assert kept.kept_prefix is not None
        assert kept.kept_prefix.startswith(f"s3://{settings.s3_bucket}/{settings.s3_prefix}run-")
        assert kept.manifest_uri == kept.kept_prefix + "registration.json"
        assert error.resume_hint is not None
        assert "MODS_WORKFLOW_EXECUTION_ID=wf-timeout" in error.resume_hint
        assert any(kept.registration_id in note and kept.kept_prefix in note for note in error.__notes__)
        assert await names_under(s3, settings) == ["model.tar.gz", "payload.tar.gz", "registration.json"]

        manifest_key = kept.manifest_uri.removeprefix(f"s3://{settings.s3_bucket}/")
        answer = await s3.get_object(Bucket=settings.s3_bucket, Key=manifest_key)
        async with answer["Body"] as body:
            manifest = json.loads(await body.read())
        assert manifest["state"] == "accepted"
        assert manifest["registration"]["registration_id"] == kept.registration_id
        assert manifest["workflow_execution_id"] == "wf-timeout"
        assert manifest["idempotency_key"].startswith("registrar-")
        assert set(manifest["artifacts"]) == {"model", "payload"}
        assert manifest["artifacts"]["model"]["s3_uri"] == kept.kept_prefix + "model.tar.gz"

        await resume(on(settings, registry), request, kept.registration_id, registry)
        assert registry.registration_count == 1
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_poll_failing_past_its_deadline_keeps_and_a_rerun_resumes(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Every poll reset (a broken load balancer) until the wait deadline: a wait timeout that says the
    registry stayed unreachable; kept; resumed once the registry answers again."""
    request = request_for(make_job(tmp_path), workflow_execution_id="wf-unreachable")
    with late_registry(stack) as registry:

        def polls_reset(method: str, target: str) -> object:  # the preflight's probe gets through
            return RESET if method == "GET" and "/preflight-" not in target else None

        with FaultProxy(registry.endpoint, polls_reset) as proxy:
            async with Registrar(on(settings, registry, mims_endpoint=proxy.endpoint, wait_timeout=1)) as registrar:
                with pytest.raises(RegistrationTimeout, match="stayed unreachable until then") as caught:
                    await registrar.register(request)
            assert proxy.count("GET", "/v1/registrations/") > 1
        (kept,) = caught.value.kept
        assert len(await leftovers(s3, settings.s3_bucket, settings.s3_prefix)) == 3
        await resume(on(settings, registry), request, kept.registration_id, registry)
        assert registry.registration_count == 1
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_library_cancellation_during_the_wait_keeps_and_a_rerun_resumes(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Cancelled while the registration runs: CancelledError propagates, a RegistrationKept event names
    what was kept; the re-run resumes it."""
    request = request_for(make_job(tmp_path), workflow_execution_id="wf-cancelled")
    seen = Recorder()
    with late_registry(stack) as registry:
        with anyio.CancelScope() as scope:

            def cancel_once_accepted(event: ProgressEvent) -> None:
                seen(event)
                if isinstance(event, RegistrationStatusChanged):
                    scope.cancel()

            async with Registrar(on(settings, registry), on_progress=cancel_once_accepted) as registrar:
                await registrar.register(request)
        assert scope.cancelled_caught
        (event,) = seen.of(RegistrationKept)
        (kept,) = event.registrations
        assert event.reason == "cancelled"
        assert event.prefixes == (kept.kept_prefix,)
        assert seen.of(CleanupFinished) == []
        await resume(on(settings, registry), request, kept.registration_id, registry)
        assert registry.registration_count == 1
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_post_cancelled_in_flight_is_kept_and_resubmitted(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Cancelled while the POST is in flight (the registry has it, the answer is late): the artifacts
    stay; the re-run submits the same key again and gets that registration, not a second."""
    request = request_for(make_job(tmp_path), workflow_execution_id="wf-in-flight")
    seen = Recorder()
    with late_registry(stack, stall_submissions=1, stall_seconds=5) as registry:
        async with Registrar(on(settings, registry), on_progress=seen) as registrar:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(registrar.register, request)
                    with anyio.fail_after(10):
                        while registry.registration_count == 0:
                            await anyio.sleep(0.02)
                    scope.cancel()
        (event,) = seen.of(RegistrationKept)
        assert event.registrations == ()  # no answer: no registration id known
        (prefix,) = event.prefixes
        assert await names_under(s3, settings) == ["model.tar.gz", "payload.tar.gz", "registration.json"]

        again = Recorder()  # held (late_registry) until the re-run has submitted it again
        async with Registrar(on(settings, registry), on_progress=release_when_submitted(registry, again)) as registrar:
            result = await registrar.register(request)
        assert registry.registration_count == 1
        assert again.of(UploadProgress) == []
        assert result.model_artifact.uri.startswith(prefix)
        assert await final_status(registry, result.registration_id) == "SUCCEEDED"
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_registration_found_failed_is_tried_again_with_a_new_key(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """A kept registration whose artifacts someone removed ends FAILED; the re-run makes a new
    registration (key generation 2) from a prefix of its own: the removed model uploaded again, the
    payload, still whole, copied there inside S3; it succeeds and both prefixes are removed."""
    request = request_for(make_job(tmp_path), workflow_execution_id="wf-generation")
    keys: list[str] = []

    async def record(outgoing: httpx.Request) -> None:
        if outgoing.method == "POST":
            keys.append(outgoing.headers["Idempotency-Key"])

    # Held unfinished through the timeout and the removal: it reads its artifacts only after both.
    with late_registry(stack) as registry:
        failed, earlier = await kept_then_failed(settings, registry, request, s3)  # the model removed

        async with (
            httpx.AsyncClient(event_hooks={"request": [record]}) as http,
            Registrar(on(settings, registry), http_client=http) as registrar,
        ):
            seen = Recorder()
            result = await registrar.register(request, on_progress=seen)
        assert result.registration_id != failed
        assert registry.registration_count == 2
        assert [e.artifact for e in seen.of(UploadProgress) if e.done] == ["model"]  # the payload was whole
        payload = result.payload_artifact
        assert payload is not None
        assert payload.integrity == "server-copy"
        for artifact in (result.model_artifact, payload):  # never the earlier run's prefix, used in place
            assert not artifact.uri.startswith(f"s3://{settings.s3_bucket}/{earlier}")
        assert len(keys) == 1
        assert keys[0].endswith("-g2")
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_an_artifact_that_cannot_be_copied_after_a_failed_registration_is_uploaded(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """After a FAILED registration, a whole artifact the re-run cannot copy inside S3 (the earlier
    run removed it meanwhile, say: 404 on UploadPartCopy) is uploaded instead; the new registration
    succeeds and nothing is left, the earlier prefix included."""
    request = request_for(make_job(tmp_path), workflow_execution_id="wf-copy-fails")
    with late_registry(stack) as registry:
        failed, _ = await kept_then_failed(settings, registry, request, s3)

        with FaultProxy(stack.s3_endpoint, refuse_copies, with_headers=True) as proxy:
            async with Registrar(on(settings, registry, s3_endpoint_url=proxy.endpoint)) as registrar:
                seen = Recorder()
                result = await registrar.register(request, on_progress=seen)
            assert any("x-amz-copy-source" in h for h in proxy.headers)  # the copy was tried
        assert sorted(e.artifact for e in seen.of(UploadProgress) if e.done) == ["model", "payload"]
        assert result.registration_id != failed
        assert await final_status(registry, result.registration_id) == "SUCCEEDED"
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_rerun_cancelled_while_it_copies_inside_s3_leaves_nothing(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """After a FAILED registration, the re-run is cancelled while its copy of the whole payload inside
    S3 (UploadPartCopy) is held on the way: no second registration, nothing kept; the multipart copy
    is aborted and both prefixes (its own, the FAILED registration's) are removed; the part copy
    that reaches S3 after the cleanup lands in no upload, and nothing is left."""
    request = request_for(make_job(tmp_path), workflow_execution_id="wf-copy-cancelled")
    with late_registry(stack) as registry:
        failed, earlier = await kept_then_failed(settings, registry, request, s3)

        def copies(method: str, target: str, headers: dict[str, str]) -> bool:
            return method == "PUT" and "x-amz-copy-source" in headers

        with HoldingProxy(stack.s3_endpoint, copies) as proxy:
            seen, at_cancel = await rerun_cancelled_while_held(settings, registry, request, proxy, s3)
            copied_from = {h["x-amz-copy-source"] for h in proxy.headers if "x-amz-copy-source" in h}
        assert len(copied_from) == 1
        assert f"{earlier}payload.tar.gz" in copied_from.pop()  # the earlier run's payload, whole
        (copy,) = [key for key in at_cancel if key.startswith("upload:")]  # the copy in flight: open
        assert copy.endswith("/payload.tar.gz")
        assert not copy.startswith(f"upload:{earlier}")  # in the re-run's own prefix
        own = copy.removeprefix("upload:").removesuffix("payload.tar.gz")
        assert len(proxy.answers) == 1  # the held part copy reached S3, after the run's cleanup
        assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []  # objects and open uploads
        # Taken by no upload (moto: 404 NoSuchKey, its source being removed already; or 500 for an
        # aborted upload, where S3 answers 404 NoSuchUpload).
        assert not proxy.answers[0].split()[1].startswith("2"), proxy.answers
        assert seen.of(RegistrationKept) == []
        assert seen.of(RegistrationSubmitted) == []
        cleaned = {e.prefix_uri: e.leftovers for e in seen.of(CleanupFinished)}
        assert cleaned == {f"s3://{settings.s3_bucket}/{own}": (), f"s3://{settings.s3_bucket}/{earlier}": ()}
        assert registry.registration_count == 1
        assert (await final_status(registry, failed)).startswith("FAILED")


async def test_a_rerun_cancelled_while_it_checks_a_failed_registrations_artifacts_leaves_nothing(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """After a FAILED registration, the re-run is cancelled while it checks the earlier artifacts
    (HeadObject, before it copies them): no second registration, nothing kept, and nothing left:
    the FAILED registration's prefix is no registration's any more."""
    request = request_for(make_job(tmp_path), workflow_execution_id="wf-check-cancelled")
    with late_registry(stack) as registry:
        failed, earlier = await kept_then_failed(settings, registry, request, s3)

        def checks(method: str, target: str, headers: dict[str, str]) -> bool:
            return method == "HEAD" and earlier in target

        with HoldingProxy(stack.s3_endpoint, checks) as proxy:
            seen, at_cancel = await rerun_cancelled_while_held(settings, registry, request, proxy, s3)
            assert proxy.count("PUT", "") == proxy.count("POST", "?uploads") == 0  # nothing written yet
        assert sorted(at_cancel) == [f"{earlier}payload.tar.gz", f"{earlier}registration.json"]
        assert seen.of(RegistrationKept) == []
        assert seen.of(RegistrationSubmitted) == []
        assert registry.registration_count == 1
        assert (await final_status(registry, failed)).startswith("FAILED")
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


# --- before the point of no return, and after a final status: nothing left -------------------


async def test_a_rejected_submission_leaves_nothing(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """A 4xx from the registry (a definite no): the artifacts and the manifest are removed."""
    with mims_server(stack, reject_regions=["us-west-2"]) as registry:
        async with Registrar(on(settings, registry)) as registrar:
            with pytest.raises(RegistrationRejected, match="422") as caught:
                await registrar.register(request_for(make_job(tmp_path), workflow_execution_id="wf-rejected"))
        assert registry.registration_count == 0
    assert caught.value.kept == ()
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_cleanup_denied_after_success_is_still_a_success(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack, caplog: pytest.LogCaptureFixture
) -> None:
    """A role without s3:DeleteObject: the result comes back, with the keys left listed on it and named
    in a warning."""

    def deny(**_: Any) -> None:
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "DeleteObject")

    s3.meta.events.register("before-parameter-build.s3.DeleteObject", deny)
    try:
        async with Registrar(settings, s3_client=s3) as registrar:
            result = await registrar.register(request_for(make_job(tmp_path)))
    finally:
        s3.meta.events.unregister("before-parameter-build.s3.DeleteObject", deny)
    prefix = result.model_artifact.uri.rsplit("/", 1)[0] + "/"
    assert sorted(result.leftovers) == [prefix + n for n in ("model.tar.gz", "payload.tar.gz", "registration.json")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(prefix + "model.tar.gz" in w and "remove these by hand" in w for w in warnings), warnings
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


@pytest.mark.parametrize(
    "kind",
    [UploadProgress, RegistrationSubmitted, RegistrationStatusChanged, CleanupFinished],
    ids=lambda k: k.__name__,
)
async def test_a_raising_callback_changes_nothing(
    tmp_path: Path, settings: Settings, s3: Any, kind: type[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A progress callback that raises at every event of one kind: the registration ends as it would
    have, the other callbacks still get every event, and the failure is logged once."""
    others = Recorder()

    def broken(event: ProgressEvent) -> None:
        if isinstance(event, kind):
            raise RuntimeError("a broken progress bar")

    async with Registrar(settings, on_progress=broken) as registrar:
        result = await registrar.register(request_for(make_job(tmp_path, model_bytes=12 * MiB)), on_progress=others)
    assert result.model_id.startswith("model-")
    assert others.of(kind)
    assert isinstance(others.events[-1], CleanupFinished)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    complaints = [r for r in caplog.records if "progress callback" in r.getMessage() and r.levelno == logging.WARNING]
    assert len(complaints) == 1


async def test_a_callback_raising_when_artifacts_are_kept_changes_nothing(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Even on the RegistrationKept event: the error stays the wait timeout, the artifacts stay."""

    def broken(event: ProgressEvent) -> None:
        if isinstance(event, RegistrationKept):
            raise RuntimeError("boom")

    with late_registry(stack) as registry:
        async with Registrar(on(settings, registry, wait_timeout=0.3), on_progress=broken) as registrar:
            with pytest.raises(RegistrationTimeout) as caught:
                await registrar.register(request_for(make_job(tmp_path)))
        registry.finish_processing()  # held (late_registry) past the timeout
        assert await final_status(registry, caught.value.registration_id) == "SUCCEEDED"
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


# --- identity: different contents never collide; the same inputs always resume --------------


async def test_two_models_of_the_same_shapes_in_one_lineage_are_two_registrations(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Same names, sizes, config and lineage id, other weights: at once, then one after the other
    while the first is kept; neither touches the other's artifacts, all succeed."""
    first = request_for(make_job(tmp_path / "a", model_bytes=5 * MiB), workflow_execution_id="wf-twins")
    second = request_for(make_job(tmp_path / "b", model_bytes=5 * MiB), workflow_execution_id="wf-twins")
    with late_registry(stack, processing_delay=0.5) as registry:  # these two finish by themselves
        results = {}
        async with Registrar(on(settings, registry)) as registrar:

            async def register(name: str, request: RegistrationRequest) -> None:
                results[name] = await registrar.register(request)

            async with anyio.create_task_group() as tg:
                tg.start_soon(register, "a", first)
                tg.start_soon(register, "b", second)
        assert results["a"].registration_id != results["b"].registration_id
        assert results["a"].model_artifact.sha256 != results["b"].model_artifact.sha256
        assert registry.registration_count == 2

    first, second = (
        request_for(make_job(tmp_path / name, model_bytes=5 * MiB), workflow_execution_id="wf-twins-again")
        for name in ("c", "d")
    )
    # A registry of its own that holds the kept one unfinished through its timeout and the second
    # run's look at the lineage, upload and submission; from there both may finish.
    with late_registry(stack) as registry:
        timed_out = await kept_by_a_timeout(on(settings, registry), first)
        async with Registrar(on(settings, registry), on_progress=release_when_submitted(registry)) as registrar:
            third = await registrar.register(second)  # the kept one is another model: not resumed
        assert not third.registrations[0].resumed
        assert third.registration_id != timed_out.registration_id
        assert await names_under(s3, settings) == ["model.tar.gz", "payload.tar.gz", "registration.json"]  # the kept
        assert await final_status(registry, timed_out.registration_id) == "SUCCEEDED"
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_a_changed_compression_level_is_another_registration(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """The same lineage id with REGISTRAR_COMPRESSION_LEVEL changed: other archive bytes, another key,
    no 409."""
    request = request_for(make_job(tmp_path, model_bytes=5 * MiB), workflow_execution_id="wf-level")
    with mims_server(stack) as registry:
        async with Registrar(on(settings, registry)) as registrar:
            one = await registrar.register(request)
        async with Registrar(on(settings, registry, compression_level=3)) as registrar:
            three = await registrar.register(request)
        assert registry.registration_count == 2
    assert one.model_artifact.sha256 != three.model_artifact.sha256
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


# --- several regions ------------------------------------------------------------------------------


async def test_one_region_rejected_while_another_was_accepted(
    tmp_path: Path, settings: Settings, stack: LocalStack, regional_s3: dict[str, Any]
) -> None:
    """eu-west-1 refuses the submission, us-west-2 accepts: us-west-2 is waited for (the registry reads
    its artifacts) and named on the error; then both regions are clean."""
    job = make_job(tmp_path, config=registration_config(model_registration_region=["us-west-2", "eu-west-1"]))
    with late_registry(stack, processing_delay=1.0, reject_regions=["eu-west-1"]) as registry:
        regional = on(settings, registry, s3_bucket="registrar-mr-{region}")
        async with Registrar(regional) as registrar:
            with pytest.raises(RegistrationRejected, match="registrations in eu-west-1 are not accepted") as caught:
                await registrar.register(request_for(job, workflow_execution_id="wf-regions"))
        (accepted,) = caught.value.registrations
        assert (accepted.region, accepted.status, accepted.kept_prefix) == ("us-west-2", "SUCCEEDED", None)
        assert any(accepted.registration_id in note for note in caught.value.__notes__)
        assert await final_status(registry, accepted.registration_id) == "SUCCEEDED"
    for region in ("us-west-2", "eu-west-1"):
        assert await leftovers(regional_s3[region], f"registrar-mr-{region}", settings.s3_prefix) == []


async def test_two_regions_interrupted_are_both_kept_and_resumed(
    tmp_path: Path, settings: Settings, stack: LocalStack, regional_s3: dict[str, Any]
) -> None:
    """A wait timeout with two accepted regions keeps both, names both; the re-run resumes both."""
    regions = ["us-west-2", "eu-west-1"]
    job = make_job(tmp_path, config=registration_config(model_registration_region=regions))
    request = request_for(job, workflow_execution_id="wf-two-regions")
    with late_registry(stack) as registry:
        regional = on(settings, registry, s3_bucket="registrar-mr-{region}")
        async with Registrar(regional.model_copy(update={"wait_timeout": 0.5})) as registrar:
            with pytest.raises(RegistrationTimeout) as caught:
                await registrar.register(request)
        assert sorted(k.region for k in caught.value.kept) == sorted(regions)
        # Held (late_registry): both unfinished at the timeout, and until the re-run follows both.
        async with Registrar(regional, on_progress=release_when_submitted(registry, count=2)) as registrar:
            result = await registrar.register(request)
        assert all(r.resumed for r in result.registrations)
        assert {r.registration_id for r in result.registrations} == {k.registration_id for k in caught.value.kept}
        assert registry.registration_count == 2
    for region in regions:
        assert await leftovers(regional_s3[region], f"registrar-mr-{region}", settings.s3_prefix) == []


@pytest.mark.parametrize("exit_by", ["cancellation during the upload", "a rejected submission"])
async def test_one_cleanup_deadline_for_every_region_of_an_exit(
    tmp_path: Path, settings: Settings, stack: LocalStack, regional_s3: dict[str, Any], exit_by: str
) -> None:
    """Two regions, an S3 that stalls every abort, delete and listing: the exit's whole cleanup (the
    multipart aborts, then both prefixes) ends within REGISTRAR_CLEANUP_TIMEOUT plus 1 s, and says
    what it left."""
    regions = ["us-west-2", "eu-west-1"]
    job = make_job(tmp_path, model_bytes=12 * MiB, config=registration_config(model_registration_region=regions))
    cancelling = exit_by.startswith("cancellation")

    uploaded = threading.Event()  # set by the run's progress callback, read in the proxy's thread
    #: When each abort, delete or listing stalled after the upload reached S3: the exit's cleanup
    #: (the capability probes' removal, stalled too and waited for briefly, comes before the upload).
    stalled_cleanup_at: list[float] = []

    def stalling(method: str, target: str) -> object:
        if method == "DELETE" or (method == "GET" and "uploads" in target):
            if uploaded.is_set():
                stalled_cleanup_at.append(time.monotonic())  # anyio's clock, on asyncio
            return Stall(30)
        if cancelling and method == "PUT" and "partNumber=" in target:
            return Stall(30)
        return None

    timeout = 2.0
    cleanups: list[CleanupFinished] = []

    def watch(event: ProgressEvent) -> None:
        if isinstance(event, UploadProgress) and event.done:
            uploaded.set()
        if isinstance(event, CleanupFinished):
            cleanups.append(event)

    with (
        FaultProxy(stack.s3_endpoint, stalling) as proxy,
        mims_server(stack, reject_regions=regions) as registry,
    ):
        regional = on(
            settings,
            registry,
            s3_bucket="registrar-mr-{region}",
            s3_endpoint_url=proxy.endpoint,
            cleanup_timeout=timeout,
        )
        async with Registrar(regional, on_progress=watch) as registrar:
            if cancelling:
                with anyio.CancelScope() as scope:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(registrar.register, request_for(job))
                        with anyio.fail_after(10):
                            while proxy.count("PUT", "partNumber=") < 4:  # parts on their way to both regions
                                await anyio.sleep(0.02)
                        started = anyio.current_time()
                        scope.cancel()
                assert proxy.count("DELETE", "uploadId=") == 2  # both aborts were tried, at once
            else:
                with pytest.raises(RegistrationRejected):
                    await registrar.register(request_for(job))
                # The cleanup's first stalled request: only the (quick) manifest reads come before
                # it in the cleanup, and none of the run's upload and submission, however slow.
                started = stalled_cleanup_at[0]
            took = anyio.current_time() - started
    assert took <= timeout + 1, f"the cleanup took {took:.1f} s"
    assert len(cleanups) == 2
    assert all(c.leftovers for c in cleanups)
    for region in regions:
        await remove_all(regional_s3[region], f"registrar-mr-{region}", settings.s3_prefix)


# --- API points -----------------------------------------------------------------------------------


def test_settings_built_directly_raise_configuration_error() -> None:
    """Settings(...) with bad values is a ConfigurationError listing every problem, like from_env."""
    with pytest.raises(ConfigurationError) as caught:
        Settings(s3_bucket="Bad_Bucket", mims_endpoint="ftp://x", part_size="1MiB", cleanup_timeout=0)
    problems = "\n".join(caught.value.problems)
    for field in ("s3_bucket", "mims_endpoint", "part_size", "cleanup_timeout"):
        assert field in problems


async def test_the_registrar_closes_every_handle_and_raises_what_failed(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Two handles never waited for, both final, neither removable: both are tried, the registrar's own
    clients are closed, and both failures come out together."""

    def deny(**_: Any) -> None:
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "DeleteObject")

    registrar = Registrar(settings, s3_client=s3)
    s3.meta.events.register("before-parameter-build.s3.DeleteObject", deny)
    try:
        with pytest.raises(ExceptionGroup) as caught:
            async with registrar:
                handles = [
                    await registrar.submit(request_for(make_job(tmp_path / name), workflow_execution_id=name))
                    for name in ("one", "two")
                ]
                for handle in handles:
                    assert await final_status(stack.mims_server, handle.accepted[0].registration_id) == "SUCCEEDED"
    finally:
        s3.meta.events.unregister("before-parameter-build.s3.DeleteObject", deny)
    errors = caught.value.exceptions
    assert len(errors) == 2
    assert all(isinstance(e, CleanupError) for e in errors), errors
    # Each names its three objects (and the capability probe's, when this process probed here first).
    names = [sorted({u.rsplit("/", 1)[1] for u in e.leftovers if "/.capabilities-" not in u}) for e in errors]
    assert names == [["model.tar.gz", "payload.tar.gz", "registration.json"]] * 2
    assert registrar._http is not None
    assert registrar._http.is_closed  # its own HTTP client, closed despite the failures
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_registration_failed_still_leaves_nothing(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """FAILED is final: the artifacts go, kept is empty, the registration is listed on the error."""
    with late_registry(stack, processing_delay=0.2, fail_registrations="rejected by policy") as registry:
        async with Registrar(on(settings, registry)) as registrar:
            with pytest.raises(RegistrationFailed) as caught:
                await registrar.register(request_for(make_job(tmp_path), workflow_execution_id="wf-failed"))
    assert caught.value.kept == ()
    assert [r.status for r in caught.value.registrations] == ["FAILED"]
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


# --- found by review: each of these once went wrong ------------------------------------------------


async def test_a_slow_registration_after_a_multipart_upload_is_still_cleaned(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """A successful multipart upload is no exit: it must not start the cleanup deadline, or a
    registration slower than REGISTRAR_CLEANUP_TIMEOUT would leave everything behind."""
    request = request_for(make_job(tmp_path, model_bytes=12 * MiB), workflow_execution_id="wf-slow")
    with late_registry(stack, processing_delay=2.0) as registry:
        async with Registrar(on(settings, registry, cleanup_timeout=1.0)) as registrar:
            result = await registrar.register(request)
    assert result.model_artifact.parts > 1
    assert result.leftovers == ()
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_rerun_stopped_while_it_checks_kept_artifacts_keeps_them(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """A re-run cancelled while it checks the kept artifacts (HeadObject) of an unfinished registration
    must not remove them: the registration, reading them late, succeeds."""
    request = request_for(make_job(tmp_path), workflow_execution_id="wf-takeover")
    # Held unfinished (late_registry) through the timeout and the cancelled re-run: a re-run that
    # found it final would rightly remove the artifacts.
    with late_registry(stack) as registry:
        timed_out = await kept_by_a_timeout(on(settings, registry), request)

        def slow_heads(method: str, target: str) -> object:  # not the preflight's HeadBucket, which comes first
            return Stall(3) if method == "HEAD" and ".tar.gz" in target else None

        with FaultProxy(stack.s3_endpoint, slow_heads) as proxy:
            async with Registrar(on(settings, registry, s3_endpoint_url=proxy.endpoint)) as registrar:
                with anyio.CancelScope() as scope:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(registrar.register, request)
                        with anyio.fail_after(20):
                            while proxy.count("HEAD", ".tar.gz") == 0:  # checking a kept artifact
                                await anyio.sleep(0.01)
                        scope.cancel()
        assert await names_under(s3, settings) == ["model.tar.gz", "payload.tar.gz", "registration.json"]
        registry.finish_processing()
        assert await final_status(registry, timed_out.registration_id) == "SUCCEEDED"
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_a_rejected_resubmission_keeps_what_an_unanswered_post_may_use(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """An earlier POST went unanswered (the registry has it); the re-run's POST is refused (a wrong
    secret): that says nothing of the earlier one, so its artifacts stay, and a later re-run with the
    right secret resumes it."""
    request = request_for(make_job(tmp_path), workflow_execution_id="wf-403")
    # Held (late_registry) until the last re-run has submitted it again: it reads the artifacts only
    # after the refused re-run.  The first POST's answer is late by 5 s (as in the sister tests):
    # the run is cancelled well before it, however loaded the machine, so the POST stays unanswered.
    with late_registry(stack, stall_submissions=1, stall_seconds=5) as registry:
        async with Registrar(on(settings, registry)) as registrar:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(registrar.register, request)
                    with anyio.fail_after(10):
                        while registry.registration_count == 0:
                            await anyio.sleep(0.02)
                    scope.cancel()
        async with Registrar(on(settings, registry, aws_secret_access_key=SecretStr("wrong-secret"))) as registrar:
            with pytest.raises(RegistrationRejected, match="403"):
                await registrar.register(request)
        assert await names_under(s3, settings) == ["model.tar.gz", "payload.tar.gz", "registration.json"]
        async with Registrar(on(settings, registry), on_progress=release_when_submitted(registry)) as registrar:
            result = await registrar.register(request)
        assert registry.registration_count == 1
        assert await final_status(registry, result.registration_id) == "SUCCEEDED"
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_replayed_failed_registration_is_not_a_success(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """The key of an unanswered POST turns out to hold a registration that ended FAILED: the re-run
    tries a new one (generation 2) and reports its outcome; it never returns the FAILED one."""
    request = request_for(make_job(tmp_path), workflow_execution_id="wf-replayed")
    seen = Recorder()
    # The first POST's answer is late by 5 s (as in the sister tests): the run is cancelled well
    # before it, however loaded the machine, so the POST stays unanswered.
    with late_registry(
        stack, stall_submissions=1, stall_seconds=5, processing_delay=0.1, fail_registrations="bad model"
    ) as registry:
        async with Registrar(on(settings, registry), on_progress=seen) as registrar:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(registrar.register, request)
                    with anyio.fail_after(10):
                        while registry.registration_count == 0:
                            await anyio.sleep(0.02)
                    scope.cancel()
        (event,) = seen.of(RegistrationKept)
        assert event.registrations == ()  # the POST went unanswered: no registration id known
        (first,) = registry.app.state.registry.records  # type: ignore[union-attr]
        assert (await final_status(registry, first)).startswith("FAILED")
        async with Registrar(on(settings, registry)) as registrar:
            with pytest.raises(RegistrationFailed, match="bad model") as caught:
                await registrar.register(request)
        assert registry.registration_count == 2
        assert caught.value.registration_id != first
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_an_explicit_key_never_adopts_another_models_registration(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """REGISTRAR_IDEMPOTENCY_KEY reused for retrained weights: the registry's holder registered other
    contents, so the run refuses (exit 5) instead of reporting the old model; the same contents again
    are that registration."""
    job = make_job(tmp_path, model_bytes=1000)
    request = request_for(job, idempotency_key="my-job-key")
    with mims_server(stack) as registry:
        async with Registrar(on(settings, registry)) as registrar:
            first = await registrar.register(request)
            again = await registrar.register(request)
            assert (again.registration_id, again.registrations[0].resumed) == (first.registration_id, True)
            (job["model"] / "extra.f32").write_bytes(os.urandom(1000))  # retrained: same shapes, new weights
            with pytest.raises(IdempotencyConflict, match="of other contents") as caught:
                await registrar.register(request)
        assert caught.value.holder == first.registration_id
        assert registry.registration_count == 1
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_registry_that_does_not_know_a_registration_yet_is_given_time(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Right after a kept run, the registry answers 404 for a while (eventual consistency): the re-run
    waits for it instead of making a second registration."""
    request = request_for(make_job(tmp_path), workflow_execution_id="wf-404")
    not_found = [2]
    with late_registry(stack) as registry, FaultProxy(registry.endpoint, lambda m, t: None) as proxy:
        through_proxy = on(settings, registry, mims_endpoint=proxy.endpoint)
        async with Registrar(through_proxy.model_copy(update={"wait_timeout": 0.3})) as registrar:
            with pytest.raises(RegistrationTimeout) as caught:
                await registrar.register(request)

        def forgetful(method: str, target: str) -> object:
            if method == "GET" and caught.value.registration_id in target and not_found[0] > 0:
                not_found[0] -= 1
                return Reply(404, b'{"message": "no such registration"}', "Not Found")
            return None

        proxy.rule = forgetful
        await resume(through_proxy, request, caught.value.registration_id, registry)
        assert registry.registration_count == 1
    assert not_found == [0]
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_kept_run_of_another_registry_is_not_touched(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """The same lineage pointed at another registry: it is a registration of its own there, and the
    first registry's kept artifacts stay until that registration succeeds."""
    request = request_for(make_job(tmp_path), workflow_execution_id="wf-two-registries")
    with late_registry(stack) as first, mims_server(stack) as second:
        timed_out = await kept_by_a_timeout(on(settings, first), request)
        async with Registrar(on(settings, second)) as registrar:
            result = await registrar.register(request)
        assert not result.registrations[0].resumed
        assert second.registration_count == 1
        first.finish_processing()  # held (late_registry) until the other registry's run is over
        assert await final_status(first, timed_out.registration_id) == "SUCCEEDED"
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_a_rerun_with_nothing_to_follow_probes_the_registry_before_it_uploads(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """The lineage has an earlier run (kept) of other inputs; the re-run, with a registry endpoint
    where nothing listens, finds nothing to follow there and fails the preflight before uploading
    anything; the earlier run's prefix is not touched."""
    job = make_job(tmp_path)
    with late_registry(stack) as registry:
        timeout = await kept_by_a_timeout(on(settings, registry), request_for(job, workflow_execution_id="wf-probe"))
        kept = await names_under(s3, settings)
        weights = next(p for p in sorted(job["model"].iterdir()) if p.is_file())
        weights.write_bytes(os.urandom(weights.stat().st_size))  # other contents: same names and sizes
        with FaultProxy(stack.s3_endpoint, lambda method, target: None) as watched:
            closed = settings.model_copy(
                update={
                    "mims_endpoint": "http://127.0.0.1:9",
                    "s3_endpoint_url": watched.endpoint,
                    "preflight_timeout": 1.0,
                }
            )
            async with Registrar(closed) as registrar:
                with pytest.raises(RegistryUnavailable, match="did not answer within the preflight's 1 s"):
                    await registrar.register(request_for(job, workflow_execution_id="wf-probe"))
            assert watched.count("PUT", "") == 0
            assert watched.count("POST", "?uploads") == 0
            assert watched.count("GET", "registration.json") >= 1  # it did look for earlier runs
        assert await names_under(s3, settings) == kept
        registry.finish_processing()  # held (late_registry) past the timeout and the refused re-run
        assert await final_status(registry, timeout.kept[0].registration_id) == "SUCCEEDED"
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_a_run_that_saw_its_registration_fail_does_not_remove_a_concurrent_takeover(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Two runs of one lineage at once (an orchestrator's retry while the first still runs): run A's
    registration ends FAILED and A cleans up (its listing slow); meanwhile run B resumes, finds
    A's manifest and the registration FAILED, and makes a new one (generation 2).  B's
    registration must succeed: B copies A's whole artifacts into a prefix of its own instead of
    working in A's, which A empties."""
    request = request_for(make_job(tmp_path), workflow_execution_id="wf-adv-concurrent-takeover")
    with late_registry(stack) as registry, FaultProxy(stack.s3_endpoint, lambda m, t: None) as a_s3:
        async with Registrar(on(settings, registry, s3_endpoint_url=a_s3.endpoint)) as a:
            a_handle = await a.submit(request)
            (first,) = a_handle.accepted
            under = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
            (manifest_key,) = [k for k in under if k.endswith(".json")]
            model_key = manifest_key.replace("registration.json", "model.tar.gz")
            await s3.delete_object(Bucket=settings.s3_bucket, Key=model_key)  # so that it ends FAILED
            listed = [0]
            release = threading.Event()

            def held_listing(method: str, target: str) -> object:
                if method == "GET" and "?uploads" in target and listed[0] == 0:
                    listed[0] += 1
                    return Hold(release)  # until B is done, however long that takes
                return None

            a_s3.rule = held_listing
            registry.finish_processing()
            assert (await final_status(registry, first.registration_id)).startswith("FAILED")
            registry.hold_processing()  # B's registration is held
            outcome: list[BaseException] = []

            async def a_waits() -> None:
                try:
                    await a_handle.wait()
                except Exception as exc:
                    outcome.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(a_waits)
                try:
                    with anyio.fail_after(20):  # A saw FAILED and is cleaning up (its listing held)
                        while listed[0] == 0:
                            await anyio.sleep(0.01)
                    async with Registrar(on(settings, registry)) as b:
                        b_handle = await b.submit(request)
                        (second,) = b_handle.accepted
                        await b_handle.aclose()  # kept: unfinished
                    b_done_before_a_listed = not outcome
                finally:
                    release.set()  # A's listing goes on (well within its S3 client's 120 s read timeout)
        left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
        registry.finish_processing()
        status = await final_status(registry, second.registration_id)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    assert b_done_before_a_listed
    assert second.registration_id != first.registration_id
    assert status == "SUCCEEDED", (status, left)
