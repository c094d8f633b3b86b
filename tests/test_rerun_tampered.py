"""A re-run that finds the kept state tampered with between the stopped run and it.

The first run is stopped after the registry accepted (a wait timeout, `kept_by_a_timeout`) by a
registry that reads the artifacts only when it finishes and holds every registration until the
test lets it (`late_registry`): a re-run that registered or let the registry read other bytes
than its input is caught by the reference checking each artifact's sha256, and one that removed
what the registration still reads by the registration ending FAILED.  Then S3 or the registry is
changed, and the re-run (same lineage id) must register exactly its input, or refuse clearly.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from async_registrar import (
    Registrar,
    RegistrarError,
    RegistrationRequest,
    RegistrationTimeout,
    Settings,
    UploadProgress,
)
from async_registrar._local import LocalStack
from async_registrar.reference_mims import ThreadedMimsServer

from .conftest import (
    Recorder,
    environment,
    final_status,
    kept_by_a_timeout,
    late_registry,
    leftovers,
    make_job,
    on,
    release_when_submitted,
    remove_all,
    request_for,
)
from .test_cli import run
from .test_https_review import read_back


async def kept(settings: Settings, registry: ThreadedMimsServer, request: RegistrationRequest) -> tuple[str, str]:
    """Stop a run after the registry accepted (wait timeout): the registration id and the kept prefix's key."""
    timed_out: RegistrationTimeout = await kept_by_a_timeout(on(settings, registry), request)
    (registration,) = timed_out.kept
    assert registration.kept_prefix is not None
    return registration.registration_id, registration.kept_prefix.removeprefix(f"s3://{settings.s3_bucket}/")


async def edit_manifest(s3: Any, bucket: str, prefix: str, change: Any) -> None:
    """Apply `change` (a function of the manifest's JSON object) to the kept manifest."""
    key = f"{prefix}registration.json"
    manifest = json.loads(await read_back(s3, bucket, key))
    change(manifest)
    await s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(manifest).encode())


async def resume(
    settings: Settings, registry: ThreadedMimsServer, request: RegistrationRequest, *, after_upload: bool = False
) -> tuple[Any, Recorder]:
    """The re-run, letting the registry finish once it submitted or followed a registration (or, with
    `after_upload`, once it uploaded an artifact again: a registry reading it meanwhile fails)."""
    seen = Recorder()
    if after_upload:

        def callback(event: Any) -> None:
            seen(event)
            if isinstance(event, UploadProgress) and event.done:
                registry.finish_processing()

    else:
        callback = release_when_submitted(registry, seen)
    async with Registrar(on(settings, registry), on_progress=callback) as registrar:
        result = await registrar.register(request)
    return result, seen


# --- a kept artifact damaged while its registration is pending ---------------------------------


async def _delete(s3: Any, bucket: str, key: str) -> None:
    await s3.delete_object(Bucket=bucket, Key=key)


async def _truncate(s3: Any, bucket: str, key: str) -> None:
    data = await read_back(s3, bucket, key)
    await s3.put_object(Bucket=bucket, Key=key, Body=data[: len(data) // 2])


async def _same_size_other_bytes(s3: Any, bucket: str, key: str) -> None:
    data = await read_back(s3, bucket, key)
    await s3.put_object(Bucket=bucket, Key=key, Body=bytes(b ^ 0x55 for b in data))


async def _same_bytes_other_layout(s3: Any, bucket: str, key: str) -> None:
    """The identical bytes again, in the other layout (one PutObject <-> a one-part multipart upload)."""
    head = await s3.head_object(Bucket=bucket, Key=key)
    data = await read_back(s3, bucket, key)
    if "-" in head["ETag"]:
        await s3.put_object(Bucket=bucket, Key=key, Body=data)
    else:
        upload = await s3.create_multipart_upload(Bucket=bucket, Key=key)
        part = await s3.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=data)
        await s3.complete_multipart_upload(
            Bucket=bucket,
            Key=key,
            UploadId=upload["UploadId"],
            MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]},
        )
    assert (await s3.head_object(Bucket=bucket, Key=key))["ETag"] != head["ETag"]
    assert await read_back(s3, bucket, key) == data


@pytest.mark.parametrize(
    ("artifact", "tamper", "why"),
    [
        ("model", _delete, "it is gone"),
        ("model", _truncate, "bytes, the upload"),
        ("model", _same_size_other_bytes, "its ETag is"),
        ("model", _same_bytes_other_layout, "its ETag is"),
    ],
)
async def test_a_damaged_kept_artifact_is_uploaded_again_under_the_pending_registration(
    tmp_path: Path,
    settings: Settings,
    s3: Any,
    stack: LocalStack,
    caplog: pytest.LogCaptureFixture,
    tamper: Any,
    why: str,
    artifact: str,
) -> None:
    """A kept artifact deleted, truncated or rewritten: named, uploaded again, the one registration succeeds."""
    caplog.set_level(logging.INFO, logger="async_registrar")
    request = request_for(make_job(tmp_path), workflow_execution_id=f"wf-damaged-{artifact}")
    with late_registry(stack) as registry:
        registration_id, prefix = await kept(settings, registry, request)
        key = f"{prefix}{artifact}.tar.gz"
        await tamper(s3, settings.s3_bucket, key)
        result, seen = await resume(settings, registry, request, after_upload=True)
        assert result.registration_id == registration_id
        assert registry.registration_count == 1
        assert [e.artifact for e in seen.of(UploadProgress) if e.done] == [artifact]
        # The registry read the artifacts only now (at finish) and checked their sha256.
        assert await final_status(registry, registration_id) == "SUCCEEDED"
    named = [r.getMessage() for r in caplog.records if "not whole" in r.getMessage()]
    assert any(key in m and why in m for m in named), named
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_stray_object_and_an_open_upload_in_the_kept_prefix_are_removed_once_final(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Another object and an incomplete multipart upload in the kept prefix: the resumed run leaves nothing."""
    request = request_for(make_job(tmp_path), workflow_execution_id="wf-stray")
    with late_registry(stack) as registry:
        registration_id, prefix = await kept(settings, registry, request)
        await s3.put_object(Bucket=settings.s3_bucket, Key=f"{prefix}stray.bin", Body=b"stray")
        await s3.create_multipart_upload(Bucket=settings.s3_bucket, Key=f"{prefix}model.tar.gz")
        result, seen = await resume(settings, registry, request)
        assert result.registration_id == registration_id
        assert seen.of(UploadProgress) == []
        assert await final_status(registry, registration_id) == "SUCCEEDED"
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


# --- the manifest damaged or edited ---------------------------------------------------------------


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
async def test_a_lost_manifest_makes_no_second_registration_and_removes_nothing_the_registration_reads(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack, damage: str
) -> None:
    """The manifest deleted or cut in half: the same key finds the one registration, which still reads its artifacts."""
    request = request_for(make_job(tmp_path), workflow_execution_id=f"wf-manifest-{damage}")
    with late_registry(stack) as registry:
        registration_id, prefix = await kept(settings, registry, request)
        key = f"{prefix}registration.json"
        if damage == "deleted":
            await s3.delete_object(Bucket=settings.s3_bucket, Key=key)
        else:
            data = await read_back(s3, settings.s3_bucket, key)
            await s3.put_object(Bucket=settings.s3_bucket, Key=key, Body=data[: len(data) // 2])
        result, _ = await resume(settings, registry, request)
        assert result.registration_id == registration_id
        assert registry.registration_count == 1
        assert await final_status(registry, registration_id) == "SUCCEEDED"
    # Without a readable manifest the kept prefix is not known as this lineage's: documented as sweep's.
    left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    assert all(k.startswith(prefix) for k in left), left
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_a_manifest_with_another_sha256_makes_no_second_registration(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """The manifest's model sha256 edited: the same key still finds the one registration, which succeeds."""
    request = request_for(make_job(tmp_path), workflow_execution_id="wf-manifest-sha")

    def other_sha(manifest: dict[str, Any]) -> None:
        manifest["artifacts"]["model"]["sha256"] = "0" * 64

    with late_registry(stack) as registry:
        registration_id, prefix = await kept(settings, registry, request)
        await edit_manifest(s3, settings.s3_bucket, prefix, other_sha)
        result, _ = await resume(settings, registry, request)
        assert result.registration_id == registration_id
        assert registry.registration_count == 1
        assert await final_status(registry, registration_id) == "SUCCEEDED"
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


@pytest.mark.parametrize("state", ["pending", "succeeded"])
async def test_a_manifest_naming_an_object_outside_its_prefix_never_touches_that_object(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack, state: str
) -> None:
    """The manifest's model s3_uri edited to another object of the bucket: the re-run neither writes nor removes it."""
    request = request_for(make_job(tmp_path), workflow_execution_id=f"wf-manifest-uri-{state}")
    precious = f"{settings.s3_prefix}precious/model.tar.gz"
    await s3.put_object(Bucket=settings.s3_bucket, Key=precious, Body=b"not yours")

    def elsewhere(manifest: dict[str, Any]) -> None:
        manifest["artifacts"]["model"]["s3_uri"] = f"s3://{settings.s3_bucket}/{precious}"

    with late_registry(stack) as registry:
        registration_id, prefix = await kept(settings, registry, request)
        if state == "succeeded":
            registry.finish_processing()
            assert await final_status(registry, registration_id) == "SUCCEEDED"
        await edit_manifest(s3, settings.s3_bucket, prefix, elsewhere)
        result, _ = await resume(settings, registry, request)
        assert result.registration_id == registration_id
        assert await final_status(registry, registration_id) == "SUCCEEDED"
    assert await read_back(s3, settings.s3_bucket, precious) == b"not yours"
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_a_manifest_naming_another_models_registration_is_not_reported_as_this_one(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """The manifest names a SUCCEEDED registration of other artifacts: never reported as this input's."""
    other_job = make_job(tmp_path / "other", model_bytes=1000)
    request = request_for(make_job(tmp_path / "mine"), workflow_execution_id="wf-manifest-id")
    with late_registry(stack) as registry:
        registry.finish_processing()
        async with Registrar(on(settings, registry)) as registrar:
            other = await registrar.register(request_for(other_job, workflow_execution_id="wf-other"))
        registry.hold_processing()
        registration_id, prefix = await kept(settings, registry, request)

        def other_id(manifest: dict[str, Any]) -> None:
            manifest["registration"]["registration_id"] = other.registration_id

        await edit_manifest(s3, settings.s3_bucket, prefix, other_id)
        refused = ""
        try:
            result, _ = await resume(settings, registry, request)
        except RegistrarError as exc:  # a refusal is fine, if it names the registration
            refused = str(exc)
        if refused:
            assert other.registration_id in refused
        else:
            assert result.registration_id != other.registration_id
        # Whatever the re-run did, the real registration still reads its artifacts.
        registry.finish_processing()
        assert await final_status(registry, registration_id) == "SUCCEEDED"
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


# --- the input changed between the runs ----------------------------------------------------------


async def test_an_input_changed_while_the_kept_registration_is_pending_is_registered_as_it_is_now(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """The model edited between the runs: a new registration of the new bytes; the pending one still succeeds."""
    job = make_job(tmp_path, model_bytes=1000)
    request = request_for(job, workflow_execution_id="wf-changed-input")
    with late_registry(stack) as registry:
        registration_id, prefix = await kept(settings, registry, request)
        (job["model"] / "extra.f32").write_bytes(os.urandom(1000))  # retrained: same shapes
        result, seen = await resume(settings, registry, request)
        assert result.registration_id != registration_id
        assert not result.registrations[0].resumed
        assert registry.registration_count == 2
        assert {e.artifact for e in seen.of(UploadProgress) if e.done} == {"model", "payload"}
        assert await final_status(registry, result.registration_id) == "SUCCEEDED"
        new = registry.registration(result.registration_id)
        old = registry.registration(registration_id)
        assert new is not None
        assert old is not None
        assert new.model_artifact is not None
        assert old.model_artifact is not None
        assert new.model_artifact.sha256 != old.model_artifact.sha256
        assert new.model_artifact.sha256 == result.model_artifact.sha256  # type: ignore[union-attr]
        assert sorted(k.rsplit("/", 1)[1] for k in await leftovers(s3, settings.s3_bucket, prefix)) == [
            "model.tar.gz",
            "payload.tar.gz",
            "registration.json",
        ]
        assert await final_status(registry, registration_id) == "SUCCEEDED"
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


# --- the registry changed its mind --------------------------------------------------------------


async def test_a_registration_the_registry_forgot_is_made_again_from_the_input(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """The registry forgot the kept registration (404 past its grace): a new registration of the input succeeds."""
    request = request_for(make_job(tmp_path), workflow_execution_id="wf-forgotten")
    with late_registry(stack) as registry:
        registration_id, prefix = await kept(settings, registry, request)

        def aged(manifest: dict[str, Any]) -> None:  # past the 30 s a registry may not know it yet
            manifest["updated_at"] = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat()

        await edit_manifest(s3, settings.s3_bucket, prefix, aged)

        state = registry.app.state.registry  # type: ignore[union-attr]
        record = state.records.pop(registration_id)  # restarted with an empty memory, say
        state.by_key = {k: v for k, v in state.by_key.items() if v != registration_id}
        result, _ = await resume(settings, registry, request)
        assert result.registration_id != registration_id
        assert record.registration.registration_id == registration_id
        assert await final_status(registry, result.registration_id) == "SUCCEEDED"
        new = registry.registration(result.registration_id)
        assert new is not None
        assert new.model_artifact is not None
        assert new.model_artifact.sha256 == result.model_artifact.sha256  # type: ignore[union-attr]
        assert not new.model_artifact.s3_uri.startswith(f"s3://{settings.s3_bucket}/{prefix}")
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_a_kept_registration_that_succeeded_with_other_bytes_than_the_input_is_not_reported(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """The kept registration SUCCEEDED with another model sha256 than the input's: the re-run refuses, naming it."""
    request = request_for(make_job(tmp_path), workflow_execution_id="wf-other-sha")
    with late_registry(stack) as registry:
        registration_id, _ = await kept(settings, registry, request)
        registry.finish_processing()
        assert await final_status(registry, registration_id) == "SUCCEEDED"
        record = registry.app.state.registry.records[registration_id]  # type: ignore[union-attr]
        reported = record.registration.model_artifact
        assert reported is not None
        record.registration = record.registration.model_copy(
            update={"model_artifact": reported.model_copy(update={"sha256": "f" * 64})}
        )
        with pytest.raises(RegistrarError, match=registration_id):
            await resume(settings, registry, request)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_the_cli_rerun_of_a_manifest_naming_another_models_registration_does_not_exit_0(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """As a subprocess: a manifest edited to name another model's registration is not a success of this input."""
    job = make_job(tmp_path / "mine")
    request = request_for(job, workflow_execution_id="wf-cli-manifest-id")
    with late_registry(stack) as registry:
        registry.finish_processing()
        async with Registrar(on(settings, registry)) as registrar:
            other = await registrar.register(
                request_for(make_job(tmp_path / "other", model_bytes=1000), workflow_execution_id="wf-cli-other")
            )
        registry.hold_processing()
        registration_id, prefix = await kept(settings, registry, request)

        def other_id(manifest: dict[str, Any]) -> None:
            manifest["registration"]["registration_id"] = other.registration_id

        await edit_manifest(s3, settings.s3_bucket, prefix, other_id)
        env = environment(
            stack,
            settings,
            job,
            MODS_WORKFLOW_EXECUTION_ID="wf-cli-manifest-id",
            REGISTRAR_MIMS_ENDPOINT=registry.endpoint,
            REGISTRAR_WAIT_TIMEOUT="2",  # the true registration is held: following it ends in a timeout
        )
        done = await anyio.to_thread.run_sync(lambda: run(env, "register"))
        assert other.registration_id not in done.stdout
        assert done.returncode != 0 or registration_id in done.stdout
        registry.finish_processing()
        assert await final_status(registry, registration_id) == "SUCCEEDED"
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
