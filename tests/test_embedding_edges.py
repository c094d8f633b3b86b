"""The library embedded in an async service, attacked at its edges: handles used in odd
orders, the registrar left while its work still runs in sibling tasks, clients shared and
closed under a registration, many registrations with one cancelled mid-wait, callbacks
that block or re-enter, and a library that must not print or touch signal handlers.

Real parts only: moto's S3 server and the reference MIMS over HTTP (see conftest)."""

from __future__ import annotations

import gc
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from async_registrar import (
    ProgressEvent,
    Registrar,
    RegistrationInterrupted,
    RegistrationKept,
    RegistrationResult,
    RegistrationSubmitted,
    Settings,
    UploadProgress,
)
from async_registrar._local import LocalStack

from .conftest import (
    MiB,
    Recorder,
    final_status,
    late_registry,
    leftovers,
    make_job,
    mims_server,
    on,
    release_when_submitted,
    remove_all,
    request_for,
)

KEPT_NAMES = ["model.tar.gz", "payload.tar.gz", "registration.json"]


def names(keys: list[str]) -> list[str]:
    return sorted(key.rsplit("/", 1)[1] for key in keys)


def kept_key(kept: RegistrationKept) -> str:
    """The key prefix (no s3://bucket/) of the one prefix a RegistrationKept event names."""
    (prefix,) = kept.prefixes
    return prefix.split("/", 3)[3]


# --- handles used in odd orders -------------------------------------------------------


async def test_two_concurrent_waits_on_one_handle_the_second_refused_the_first_finishes(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """wait() from two tasks at once: the second is a RuntimeError at once (it does not start a
    second wait or cleanup), the first follows the registration to the end and cleans."""
    with late_registry(stack) as registry:
        async with Registrar(on(settings, registry)) as registrar:
            handle = await registrar.submit(request_for(make_job(tmp_path)))
            results: list[RegistrationResult] = []
            waiting = anyio.Event()

            async def first() -> None:
                waiting.set()
                results.append(await handle.wait())

            async with anyio.create_task_group() as tg:
                tg.start_soon(first)
                await waiting.wait()
                await anyio.lowlevel.checkpoint()  # `first` has taken the run
                with pytest.raises(RuntimeError, match="already waited for or closed"):
                    await handle.wait()
                registry.finish_processing()
        assert [r.registration_id for r in results] == [handle.accepted[0].registration_id]
        assert registry.registration_count == 1
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_aclose_while_another_task_waits_is_a_no_op_and_the_wait_finishes(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """aclose() on a handle whose wait() runs in another task neither raises nor breaks that
    wait: the wait still ends SUCCEEDED and removes everything."""
    with late_registry(stack) as registry:
        async with Registrar(on(settings, registry)) as registrar:
            handle = await registrar.submit(request_for(make_job(tmp_path)))
            results: list[RegistrationResult] = []
            waiting = anyio.Event()

            async def wait() -> None:
                waiting.set()
                results.append(await handle.wait())

            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                await waiting.wait()
                await anyio.lowlevel.checkpoint()
                await handle.aclose()
                assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix)  # still read by the registry
                registry.finish_processing()
        assert len(results) == 1
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_cancelled_wait_keeps_and_the_handle_is_spent_also_after_the_registrar_closed(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """wait() cancelled: the artifacts are kept and named once (RegistrationKept); a second
    wait() is a RuntimeError, before and after the registrar closed, and so is a register()
    on the closed registrar; the registrar's exit does not clean the kept prefix behind the
    caller's back; the registry then reads the kept artifacts and succeeds."""
    recorder = Recorder()
    with late_registry(stack) as registry:
        async with Registrar(on(settings, registry), on_progress=recorder) as registrar:
            handle = await registrar.submit(request_for(make_job(tmp_path), workflow_execution_id="wf-spent"))
            with anyio.CancelScope() as scope:

                async def cancel_soon() -> None:
                    scope.cancel()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(cancel_soon)
                    await handle.wait()
            assert scope.cancelled_caught
            with pytest.raises(RuntimeError, match="already waited for or closed"):
                await handle.wait()
        with pytest.raises(RuntimeError, match="already waited for or closed"):
            await handle.wait()
        await handle.aclose()  # closing a spent handle is harmless
        with pytest.raises(RuntimeError, match="closed"):
            await registrar.register(request_for(make_job(tmp_path / "again")))
        (kept,) = recorder.of(RegistrationKept)
        assert kept.registrations[0].registration_id == handle.accepted[0].registration_id
        left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
        assert names(left) == KEPT_NAMES
        assert all(key.startswith(kept_key(kept)) for key in left)
        registry.finish_processing()
        assert await final_status(registry, handle.accepted[0].registration_id) == "SUCCEEDED"
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


# --- the registrar left while its work runs on in a sibling task ------------------------


async def test_leaving_the_registrar_while_a_sibling_task_uploads_leaves_nothing(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """The `async with Registrar` block is left while register() in a sibling task still uploads:
    the exit stops that run and waits for its cleanup before it closes the clients (it used to
    close them under the run, whose POST then failed unsent and was kept as 'may have arrived').
    The sibling gets a RuntimeError saying the registrar was closed; nothing is kept or left."""
    job = make_job(tmp_path, model_bytes=24 * MiB)

    async def scenario() -> dict[str, Any]:
        """Everything that holds the registrar lives here, so that it can be collected after."""
        recorder = Recorder()
        outcome: list[str] = []
        uploading = anyio.Event()

        def progress(event: ProgressEvent) -> None:
            recorder(event)
            if isinstance(event, UploadProgress) and event.artifact == "model":
                uploading.set()

        with mims_server(stack) as registry:

            async def register(registrar: Registrar) -> None:
                try:
                    await registrar.register(request_for(job), on_progress=progress)
                    outcome.append("registered")
                except Exception as exc:  # what the sibling sees, whatever it is
                    outcome.append(f"{type(exc).__name__}: {exc}")

            async with anyio.create_task_group() as tg, Registrar(on(settings, registry)) as registrar:
                tg.start_soon(register, registrar)
                await uploading.wait()
                # The block is left now; the registration's task runs on in the caller's task group.
            return {
                "outcome": outcome,
                "accepted": registry.registration_count,
                "submitted": len(recorder.of(RegistrationSubmitted)),
                "kept": len(recorder.of(RegistrationKept)),
            }

    seen = await scenario()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    assert (seen["accepted"], seen["submitted"]) == (0, 0)  # nothing reached the registry
    assert len(seen["outcome"]) == 1
    assert seen["outcome"][0].startswith("RuntimeError: the Registrar was closed while this ran"), seen
    # Nothing was accepted: nothing may be kept or left, and no client left open.
    assert seen["kept"] == 0, seen
    assert left == [], seen
    assert unclosed == []


async def test_leaving_the_registrar_while_a_sibling_task_waits_keeps_and_names(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """The block is left while register() in a sibling task waits for an accepted registration:
    that run stops with an error, its artifacts are kept and named (RegistrationKept), and the
    registry, reading them later, succeeds."""
    recorder = Recorder()
    outcome: list[BaseException] = []
    submitted = anyio.Event()

    def progress(event: ProgressEvent) -> None:
        recorder(event)
        if isinstance(event, RegistrationSubmitted):
            submitted.set()

    with late_registry(stack) as registry:

        async def register(registrar: Registrar) -> None:
            try:
                await registrar.register(
                    request_for(make_job(tmp_path), workflow_execution_id="wf-left"), on_progress=progress
                )
            except Exception as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg, Registrar(on(settings, registry)) as registrar:
            tg.start_soon(register, registrar)
            await submitted.wait()
        (registration,) = recorder.of(RegistrationSubmitted)
        assert len(outcome) == 1  # not a result: it could not follow the registration any more
        (kept,) = recorder.of(RegistrationKept)
        assert kept.registrations[0].registration_id == registration.registration_id
        assert names(await leftovers(s3, settings.s3_bucket, settings.s3_prefix)) == KEPT_NAMES
        registry.finish_processing()
        assert await final_status(registry, registration.registration_id) == "SUCCEEDED"
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


# --- clients shared between registrars, and closed under them -------------------------


async def test_a_shared_http_client_closed_during_the_wait_is_a_typed_interruption(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    recorder = Recorder()
    submitted = anyio.Event()
    caught: list[BaseException] = []

    def progress(event: ProgressEvent) -> None:
        recorder(event)
        if isinstance(event, RegistrationSubmitted):
            submitted.set()

    with late_registry(stack) as registry:
        http = httpx.AsyncClient()
        try:
            async with Registrar(on(settings, registry), http_client=http, s3_client=s3) as registrar:

                async def register() -> None:
                    try:
                        request = request_for(make_job(tmp_path), workflow_execution_id="wf-http")
                        await registrar.register(request, on_progress=progress)
                    except Exception as exc:
                        caught.append(exc)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(register)
                    await submitted.wait()
                    await http.aclose()  # the service shuts its client down first
            (kept,) = recorder.of(RegistrationKept)
            assert names(await leftovers(s3, settings.s3_bucket, settings.s3_prefix)) == KEPT_NAMES
            (error,) = caught
            assert isinstance(error, RegistrationInterrupted), repr(error)
            assert [k.kept_prefix for k in error.kept] == list(kept.prefixes)
        finally:
            registry.finish_processing()
            await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_two_registrars_sharing_clients_one_leaving_early_leaves_the_other_working(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Two registrars on one injected S3 client and one injected HTTP client: the first leaves its
    block (closing its never-waited handle) while the second still waits; the second succeeds,
    and both leave the shared clients open for their owner."""
    first_prefix = settings.s3_prefix + "first/"
    second_prefix = settings.s3_prefix + "second/"
    with late_registry(stack) as registry:
        async with httpx.AsyncClient() as http:
            second_submitted = anyio.Event()
            results: list[RegistrationResult] = []

            def on_second(event: ProgressEvent) -> None:
                if isinstance(event, RegistrationSubmitted):
                    second_submitted.set()

            async def second() -> None:
                async with Registrar(
                    on(settings, registry, s3_prefix=second_prefix), s3_client=s3, http_client=http
                ) as registrar:
                    results.append(
                        await registrar.register(request_for(make_job(tmp_path / "b")), on_progress=on_second)
                    )

            async with anyio.create_task_group() as tg:
                tg.start_soon(second)
                async with Registrar(
                    on(settings, registry, s3_prefix=first_prefix), s3_client=s3, http_client=http
                ) as registrar:
                    handle = await registrar.submit(request_for(make_job(tmp_path / "a")))
                    await second_submitted.wait()
                # The first is closed (its handle kept: unfinished); the shared clients are not.
                assert not http.is_closed
                assert names(await leftovers(s3, settings.s3_bucket, first_prefix)) == KEPT_NAMES
                registry.finish_processing()
            assert not http.is_closed
            (result,) = results
            assert await final_status(registry, handle.accepted[0].registration_id) == "SUCCEEDED"
            assert result.registration_id != handle.accepted[0].registration_id
    assert await leftovers(s3, settings.s3_bucket, second_prefix) == []
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


# --- many registrations, one cancelled mid-wait -----------------------------------------


async def test_five_at_once_one_cancelled_mid_wait_keeps_exactly_its_prefix(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Five registrations (five lineages) in one registrar; one is cancelled once the registry
    accepted it: the four others succeed and clean up, exactly the victim's prefix is kept (and
    named), and the registry reads it and succeeds too."""
    victim = anyio.CancelScope()
    victim_recorder = Recorder()
    victim_kept = anyio.Event()
    results: dict[int, RegistrationResult] = {}

    def on_victim(event: ProgressEvent) -> None:
        victim_recorder(event)
        if isinstance(event, RegistrationSubmitted):
            victim.cancel()
        if isinstance(event, RegistrationKept):
            victim_kept.set()

    with late_registry(stack) as registry:
        async with Registrar(on(settings, registry)) as registrar:

            async def run(index: int) -> None:
                request = request_for(
                    make_job(tmp_path / str(index), model_bytes=MiB), workflow_execution_id=f"wf-{index}"
                )
                if index == 2:
                    with victim:
                        await registrar.register(request, on_progress=on_victim)
                    return
                results[index] = await registrar.register(request)

            async with anyio.create_task_group() as tg:
                for index in range(5):
                    tg.start_soon(run, index)
                await victim_kept.wait()
                registry.finish_processing()  # the others may finish now
        assert victim.cancelled_caught
        assert sorted(results) == [0, 1, 3, 4]
        (submitted,) = victim_recorder.of(RegistrationSubmitted)
        (kept,) = victim_recorder.of(RegistrationKept)
        left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
        assert names(left) == KEPT_NAMES
        assert all(key.startswith(kept_key(kept)) for key in left)
        assert await final_status(registry, submitted.registration_id) == "SUCCEEDED"
        assert registry.registration_count == 5
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


# --- callbacks that block or re-enter, and a library that stays quiet ---------------------


async def test_a_blocking_callback_and_a_reentrant_one_change_nothing_and_run_on_the_loop_thread(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """A callback that blocks (a sync sleep on each upload event) and one that, on the first
    registration's submission, starts a second registration on the same registrar: both
    registrations succeed and leave nothing, and every event arrives on the event loop's thread."""
    loop_thread = threading.get_ident()
    threads: set[int] = set()
    results: list[RegistrationResult] = []

    def blocking(event: ProgressEvent) -> None:
        threads.add(threading.get_ident())
        if isinstance(event, UploadProgress):
            time.sleep(0.02)

    with mims_server(stack) as registry:
        async with (
            Registrar(on(settings, registry), on_progress=blocking) as registrar,
            anyio.create_task_group() as tg,
        ):

            async def second() -> None:
                results.append(await registrar.register(request_for(make_job(tmp_path / "b"))))

            def reenter(event: ProgressEvent) -> None:
                if isinstance(event, RegistrationSubmitted):
                    tg.start_soon(second)

            results.append(
                await registrar.register(
                    request_for(make_job(tmp_path / "a", model_bytes=2 * MiB)), on_progress=reenter
                )
            )
        assert registry.registration_count == 2
    assert len(results) == 2
    assert threads == {loop_thread}
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_the_library_prints_nothing_and_leaves_signal_handlers_alone(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack, capfd: pytest.CaptureFixture[str]
) -> None:
    """A registration that succeeds, one cancelled mid-upload and one kept by a cancellation
    mid-wait: nothing reaches stdout or stderr through the file descriptors (the library only
    logs), and no signal handler changes, before, during or after."""
    watched = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1]
    before = {s: signal.getsignal(s) for s in watched}
    seen_during: list[dict[Any, Any]] = []
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    capfd.readouterr()

    def look(event: ProgressEvent) -> None:
        seen_during.append({s: signal.getsignal(s) for s in watched})

    with late_registry(stack) as registry:
        async with Registrar(on(settings, registry), on_progress=look) as registrar:
            # One cancelled during its upload.
            with anyio.CancelScope() as upload_scope:

                def cancel_uploading(event: ProgressEvent) -> None:
                    if isinstance(event, UploadProgress):
                        upload_scope.cancel()

                await registrar.register(
                    request_for(make_job(tmp_path / "a", model_bytes=12 * MiB)), on_progress=cancel_uploading
                )
            # One cancelled during its wait (kept).
            with anyio.CancelScope() as wait_scope:

                def cancel_waiting(event: ProgressEvent) -> None:
                    if isinstance(event, RegistrationSubmitted):
                        wait_scope.cancel()

                await registrar.register(
                    request_for(make_job(tmp_path / "b"), workflow_execution_id="wf-quiet"), on_progress=cancel_waiting
                )
            # One that succeeds.
            result = await registrar.register(
                request_for(make_job(tmp_path / "c")), on_progress=release_when_submitted(registry)
            )
    assert upload_scope.cancelled_caught
    assert wait_scope.cancelled_caught
    assert result.model_id
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert {s: signal.getsignal(s) for s in watched} == before
    assert seen_during
    assert all(during == before for during in seen_during)
    current = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(current)
    assert current == wakeup
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
