"""The library's guarantees on uvloop, the event loop uvicorn runs whenever it is installed.

A service that embeds a `Registrar` under uvicorn runs it on `uvloop.Loop`, not on asyncio's own
loop: its sockets, executors, callbacks and cancellation are uvloop's.  Every test here runs on
uvloop (the module's `event_loop_policy`; `on_uvloop` checks it in each test) and mirrors an
asyncio test of the suite: a registration that succeeds leaves nothing; one cancelled mid-upload
leaves no object and no open multipart upload; one cancelled after the registry accepted keeps
and names what the registry reads, and a re-run of its lineage resumes it; several uploads at once
finish while the host's own `to_thread` work holds all of anyio's 40 shared tokens; and
`Registrar.upload` cancelled mid-stream aborts its multipart upload.

Real parts only, as in the rest of the suite: moto's S3 server and the reference MIMS over HTTP.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

uvloop = pytest.importorskip("uvloop")

from async_registrar import (  # noqa: E402 (after the skip: nothing here runs without uvloop)
    CleanupFinished,
    ProgressEvent,
    Registrar,
    RegistrationKept,
    RegistrationSubmitted,
    RegistrationSucceeded,
    Settings,
    UploadProgress,
)
from async_registrar._local import LocalStack  # noqa: E402

from .conftest import (  # noqa: E402
    MiB,
    Recorder,
    final_status,
    late_registry,
    leftovers,
    make_job,
    names_under,
    on,
    request_for,
)
from .test_embedding_blackbox import (  # noqa: E402
    KEPT_NAMES,
    Tee,
    assert_succeeded_once_before_cleanup,
    rerun_resumes,
)

#: pytest-asyncio 1.x warns that overriding `event_loop_policy` is deprecated (in favour of a
#: conftest-wide `pytest_asyncio_loop_factories` hook, which would parametrize every async test of
#: the suite); the override is the per-module way, and the warnings are errors here.
pytestmark = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy" fixture:DeprecationWarning')

#: Bound on every wait: CI machines are loaded.
BOUND = 60


@pytest.fixture(scope="module")
def event_loop_policy() -> Any:
    """Every test of this module, and its async fixtures, on uvloop."""
    return uvloop.EventLoopPolicy()


@pytest.fixture(autouse=True)
async def on_uvloop() -> None:
    """Each test really runs on uvloop's loop (the tests would prove nothing on asyncio's)."""
    assert type(asyncio.get_running_loop()) is uvloop.Loop


def no_registration_left_running() -> None:
    """Nothing of a registration runs on: no task but the test's, no gzip or checking thread."""
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert not [t.name for t in threading.enumerate() if t.name.startswith("registrar-")]


async def test_a_registration_succeeds_and_leaves_nothing(tmp_path: Path, settings: Settings, s3: Any) -> None:
    """A multi-part registration on uvloop: registered, one RegistrationSucceeded before the
    CleanupFinished, and nothing under the temporary prefix (test_registrar's end-to-end test)."""
    job = make_job(tmp_path, model_bytes=5 * MiB)
    events = Recorder()
    async with Registrar(settings, on_progress=events) as registrar:
        with anyio.fail_after(BOUND):
            result = await registrar.register(request_for(job, workflow_execution_id=f"wf-{secrets.token_hex(4)}"))
    assert result.model_id.startswith("model-")
    assert result.model_artifact.parts == 3  # the example's weights and 5 MiB more, in 5 MiB parts
    assert_succeeded_once_before_cleanup(events, result)
    (cleanup,) = events.of(CleanupFinished)
    assert cleanup.deleted == 3  # the two archives and the run manifest
    assert result.leftovers == ()
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    no_registration_left_running()


async def test_a_registration_cancelled_mid_upload_leaves_nothing(tmp_path: Path, settings: Settings, s3: Any) -> None:
    """Cancelled once the model's first part is in: CancelledError propagates, no object and no
    open multipart upload is left, and no task or thread of it runs on."""
    job = make_job(tmp_path, model_bytes=20 * MiB)
    seen: list[UploadProgress] = []
    with anyio.CancelScope() as scope:

        def on_progress(event: ProgressEvent) -> None:
            if isinstance(event, UploadProgress) and event.artifact == "model":
                seen.append(event)
                scope.cancel()

        async with Registrar(settings, on_progress=on_progress) as registrar:
            with anyio.fail_after(BOUND):
                await registrar.register(request_for(job))
    assert scope.cancelled_caught
    assert seen
    assert not any(event.done for event in seen)  # cancelled mid-upload, not after it
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    no_registration_left_running()


async def test_cancelled_after_the_registry_accepted_keeps_then_a_rerun_resumes(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Cancelled once the registry accepted (it holds the registration unfinished and reads the
    artifacts only when it finishes): one RegistrationKept names the kept prefix and the
    registration; the archives and the manifest stay.  A re-run of the lineage follows the same
    registration (resumed, no second one) to SUCCEEDED and leaves nothing."""
    request = request_for(make_job(tmp_path), workflow_execution_id=f"wf-uvloop-{secrets.token_hex(4)}")
    with late_registry(stack) as registry:
        scope = anyio.CancelScope()

        def cancel_on_submitted(event: ProgressEvent) -> None:
            if isinstance(event, RegistrationSubmitted):
                scope.cancel()

        first = Tee(cancel_on_submitted)
        with scope:
            async with Registrar(on(settings, registry), on_progress=first) as registrar:
                with anyio.fail_after(BOUND):
                    await registrar.register(request)
        assert scope.cancelled_caught
        assert first.of(RegistrationSucceeded) == []
        (kept,) = first.of(RegistrationKept)
        (accepted,) = kept.registrations
        assert accepted.status == "PENDING"
        (prefix,) = kept.prefixes
        assert accepted.kept_prefix == prefix
        assert prefix.startswith(f"s3://{settings.s3_bucket}/{settings.s3_prefix}run-")
        assert f"MODS_WORKFLOW_EXECUTION_ID={request.workflow_execution_id}" in kept.resume_hint
        assert await names_under(s3, settings) == KEPT_NAMES
        assert registry.registration(accepted.registration_id).status not in ("SUCCEEDED", "FAILED")

        await rerun_resumes(settings, registry, request, accepted.registration_id)
        assert await final_status(registry, accepted.registration_id) == "SUCCEEDED"
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_uploads_at_once_finish_while_the_host_holds_every_shared_thread_token(
    tmp_path: Path, settings: Settings, s3: Any
) -> None:
    """The host's own `anyio.to_thread.run_sync` work holds all 40 of anyio's default tokens (for
    uvloop's loop: the limiter is per loop); three registrations of multi-part models and a
    `Registrar.upload`, at once from one registrar, still finish on the registrar's own tokens
    (test_threads' test, with the real 40 tokens rather than 2)."""
    shared = anyio.to_thread.current_default_thread_limiter()
    release = threading.Event()
    results: list[Any] = []
    async with anyio.create_task_group() as host:
        for _ in range(int(shared.total_tokens)):
            host.start_soon(anyio.to_thread.run_sync, release.wait)
        try:
            with anyio.fail_after(BOUND):
                while shared.borrowed_tokens < shared.total_tokens:
                    await anyio.sleep(0.01)
            assert shared.total_tokens == 40
            jobs = [make_job(tmp_path / str(i), model_bytes=11 * MiB) for i in range(4)]
            key = f"{settings.s3_prefix}direct/model.tar.gz"
            with anyio.fail_after(BOUND):
                async with Registrar(settings.model_copy(update={"max_parallel_uploads": 4})) as registrar:

                    async def register(job: dict[str, Path]) -> None:
                        results.append(await registrar.register(request_for(job)))

                    async def upload(job: dict[str, Path]) -> None:
                        results.append(await registrar.upload(job["model"], f"s3://{settings.s3_bucket}/{key}"))

                    async with anyio.create_task_group() as tg:
                        for job in jobs[:3]:
                            tg.start_soon(register, job)
                        tg.start_soon(upload, jobs[3])
            assert shared.borrowed_tokens == 40  # the host's work held them all along
        finally:
            release.set()  # the host's threads end (they cannot be cancelled)
    registered = [r for r in results if hasattr(r, "model_id")]
    (uploaded,) = [r for r in results if not hasattr(r, "model_id")]
    assert len({r.model_id for r in registered}) == 3
    assert all(r.model_artifact.parts >= 3 for r in registered)
    assert uploaded.parts >= 3
    await s3.delete_object(Bucket=settings.s3_bucket, Key=key)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_an_upload_cancelled_mid_stream_aborts_its_multipart_upload(
    tmp_path: Path, settings: Settings, s3: Any
) -> None:
    """`Registrar.upload` cancelled once a part is in: the multipart upload is aborted (none open
    under the prefix), no object is left, and nothing of the upload runs on."""
    job = make_job(tmp_path, model_bytes=20 * MiB)
    key = f"{settings.s3_prefix}direct/model.tar.gz"
    seen: list[UploadProgress] = []
    async with Registrar(settings) as registrar:
        with anyio.CancelScope() as scope:

            def cancel_after_a_part(event: ProgressEvent) -> None:
                if isinstance(event, UploadProgress) and event.parts_done >= 1:
                    seen.append(event)
                    scope.cancel()

            with anyio.fail_after(BOUND):
                await registrar.upload(
                    job["model"], f"s3://{settings.s3_bucket}/{key}", on_progress=cancel_after_a_part
                )
        assert scope.cancelled_caught
        assert seen
        assert not any(event.done for event in seen)
        open_uploads = await s3.list_multipart_uploads(Bucket=settings.s3_bucket, Prefix=settings.s3_prefix)
        assert open_uploads.get("Uploads", []) == []
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    no_registration_left_running()
