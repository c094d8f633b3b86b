"""Black-box probes of the library as an async orchestration service embeds it: the
`RegistrationSucceeded` progress event (README "As a library", Progress), the handle API
(`submit()` / `wait()` / `aclose()`) cancelled at different moments, several handles in one
registrar, and a progress callback that raises.

Only what README.md promises is asserted.  Every wait is event-driven (progress events, the
held registry's release), under generous bounds.  Real parts only: moto's S3 server and the
reference MIMS over HTTP (see conftest)."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from async_registrar import (
    CleanupFinished,
    ProgressEvent,
    Registrar,
    RegistrationHandle,
    RegistrationKept,
    RegistrationRequest,
    RegistrationResult,
    RegistrationStatusChanged,
    RegistrationSubmitted,
    RegistrationSucceeded,
    Settings,
)
from async_registrar._local import LocalStack

from .conftest import (
    Recorder,
    final_status,
    late_registry,
    leftovers,
    make_job,
    on,
    release_when_submitted,
    remove_all,
    request_for,
)

KEPT_NAMES = ["model.tar.gz", "payload.tar.gz", "registration.json"]
BOUND = 60


def names(keys: list[str]) -> list[str]:
    return sorted(key.rsplit("/", 1)[1] for key in keys)


def lineage(tag: str) -> str:
    return f"wf-{tag}-{secrets.token_hex(4)}"


def key_of(prefix_uri: str) -> str:
    """`s3://bucket/some/prefix/` -> `some/prefix/`."""
    return prefix_uri.split("/", 3)[3]


def kinds(recorder: Recorder) -> list[type[Any]]:
    """The order of the outcome events (no upload progress, no status changes)."""
    wanted = (RegistrationSubmitted, RegistrationSucceeded, CleanupFinished, RegistrationKept)
    return [type(e) for e in recorder.events if isinstance(e, wanted)]


async def rerun_resumes(
    settings: Settings, registry: Any, request: RegistrationRequest, registration_id: str
) -> RegistrationResult:
    """A re-run of the kept lineage in a new registrar: it resumes the one registration (no
    second one), succeeds once before its cleanup, and leaves nothing it could not remove."""
    second = Recorder()
    async with Registrar(on(settings, registry)) as registrar:
        with anyio.fail_after(BOUND):
            result = await registrar.register(request, on_progress=release_when_submitted(registry, second))
    assert registry.registration_count == 1
    (resumed,) = second.of(RegistrationSubmitted)
    assert resumed.resumed
    assert resumed.registration_id == registration_id
    assert result.registration_id == registration_id
    assert [r.resumed for r in result.registrations] == [True]
    assert_succeeded_once_before_cleanup(second, result)
    assert result.leftovers == ()
    return result


def assert_succeeded_once_before_cleanup(recorder: Recorder, result: RegistrationResult) -> None:
    """One RegistrationSucceeded equal to the result's registrations, before the one CleanupFinished;
    nothing kept."""
    succeeded = recorder.of(RegistrationSucceeded)
    assert len(succeeded) == 1, kinds(recorder)
    assert succeeded[0].registrations == result.registrations
    assert recorder.of(RegistrationKept) == []
    order = [k for k in kinds(recorder) if k in (RegistrationSucceeded, CleanupFinished)]
    assert order == [RegistrationSucceeded, CleanupFinished], order


class Tee(Recorder):
    """A recorder that also runs `hook` on every event (after recording it)."""

    def __init__(self, hook: Callable[[ProgressEvent], None]) -> None:
        super().__init__()
        self.hook = hook

    def __call__(self, event: ProgressEvent) -> None:
        super().__call__(event)
        self.hook(event)


async def wait_in_scope(handle: RegistrationHandle, scope: anyio.CancelScope, out: list[Any]) -> None:
    """`handle.wait()` inside `scope`; its result, or the exception it raised, goes to `out`."""
    with scope:
        try:
            out.append(await handle.wait())
        except Exception as exc:
            out.append(exc)


# --- RegistrationSucceeded: once, before CleanupFinished, equal to the result -------------------


async def test_succeeded_event_once_with_handle_wait_to_both_callbacks(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """submit() + wait(): the registrar's callback and the submit's own each get exactly one
    RegistrationSucceeded, equal to the result's registrations, before one CleanupFinished."""
    registrar_events, call_events = Recorder(), Recorder()
    with late_registry(stack) as registry:
        async with Registrar(on(settings, registry), on_progress=registrar_events) as registrar:
            handle = await registrar.submit(
                request_for(make_job(tmp_path), workflow_execution_id=lineage("wait")), on_progress=call_events
            )
            assert names(await leftovers(s3, settings.s3_bucket, settings.s3_prefix)) == KEPT_NAMES
            registry.finish_processing()
            with anyio.fail_after(BOUND):
                result = await handle.wait()
    assert result.registration_id == handle.accepted[0].registration_id
    for recorder in (registrar_events, call_events):
        assert_succeeded_once_before_cleanup(recorder, result)
    assert result.leftovers == ()
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


@pytest.mark.parametrize("finished", ["during_the_rerun", "before_the_rerun"])
async def test_cancelled_wait_keeps_then_a_second_registrar_resumes_and_reports_succeeded(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack, finished: str
) -> None:
    """The wait is cancelled while the registry still holds the registration: kept and named (one
    RegistrationKept, no RegistrationSucceeded), the registrar's exit raises nothing.  A second
    Registrar re-runs the lineage: it follows the same registration (resumed), sends exactly one
    RegistrationSucceeded equal to its result before CleanupFinished, and leaves nothing."""
    request = request_for(make_job(tmp_path), workflow_execution_id=lineage("resume"))
    polled = anyio.Event()

    def on_status(event: ProgressEvent) -> None:
        if isinstance(event, RegistrationStatusChanged):
            polled.set()

    first = Tee(on_status)
    with late_registry(stack) as registry:
        async with Registrar(on(settings, registry), on_progress=first) as registrar:
            handle = await registrar.submit(request)
            (accepted,) = handle.accepted
            scope, out = anyio.CancelScope(), []
            with anyio.fail_after(BOUND):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(wait_in_scope, handle, scope, out)
                    await polled.wait()  # the wait follows the registration (PENDING -> IN_PROGRESS)
                    scope.cancel()
            assert scope.cancelled_caught
            assert out == []
        # the registrar's exit raised nothing; the registration is unfinished
        assert registry.registration(accepted.registration_id).status not in ("SUCCEEDED", "FAILED")
        assert first.of(RegistrationSucceeded) == []
        (kept,) = first.of(RegistrationKept)
        assert [k.registration_id for k in kept.registrations] == [accepted.registration_id]
        (prefix,) = kept.prefixes
        assert kept.registrations[0].kept_prefix == prefix
        left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
        assert names(left) == KEPT_NAMES
        assert all(k.startswith(key_of(prefix)) for k in left)

        if finished == "before_the_rerun":
            registry.finish_processing()
            assert await final_status(registry, accepted.registration_id) == "SUCCEEDED"
        await rerun_resumes(settings, registry, request, accepted.registration_id)
        assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


# --- a wait cancelled once the registry has finished ---------------------------------------------


@pytest.mark.parametrize("canceller", ["callback", "sibling"])
async def test_wait_cancelled_right_after_succeeded_still_cleans_everything(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack, canceller: str
) -> None:
    """The task awaiting wait() is cancelled as RegistrationSucceeded arrives (during the cleanup):
    the registration is final, so nothing is kept (no RegistrationKept) and, the cleanup running to
    its end shielded, nothing is left once the cancelled call is over; the registrar's exit raises
    nothing and the handle is spent."""
    scope, out = anyio.CancelScope(), []
    succeeded = anyio.Event()

    def hook(event: ProgressEvent) -> None:
        if isinstance(event, RegistrationSucceeded):
            succeeded.set()
            if canceller == "callback":
                scope.cancel()

    recorder = Tee(hook)
    with late_registry(stack) as registry:
        async with Registrar(on(settings, registry), on_progress=recorder) as registrar:
            handle = await registrar.submit(request_for(make_job(tmp_path), workflow_execution_id=lineage("late")))
            with anyio.fail_after(BOUND):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(wait_in_scope, handle, scope, out)
                    registry.finish_processing()
                    await succeeded.wait()
                    scope.cancel()
            # the cancelled call is over: the shielded cleanup has run to its end
            left_after_call = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
            with pytest.raises(RuntimeError, match="already waited for or closed"):
                await handle.wait()
        assert await final_status(registry, handle.accepted[0].registration_id) == "SUCCEEDED"
    assert [e for e in out if isinstance(e, BaseException)] == []
    (event,) = recorder.of(RegistrationSucceeded)
    assert [r.registration_id for r in event.registrations] == [handle.accepted[0].registration_id]
    # Either the cancellation reached the caller, or the call (its cleanup shielded) returned the
    # result before it could: observed, the latter when the callback cancels, never an exception.
    assert (scope.cancelled_caught and out == []) or [r.registrations for r in out] == [event.registrations]
    assert recorder.of(RegistrationKept) == []
    assert left_after_call == []
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_register_cancelled_from_the_callback_on_succeeded_leaves_nothing(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """register() (not a handle) whose caller's scope is cancelled as RegistrationSucceeded arrives:
    no exception but the cancellation (or the result), nothing kept, nothing left; exit clean."""
    scope = anyio.CancelScope()
    out: list[Any] = []

    def hook(event: ProgressEvent) -> None:
        if isinstance(event, RegistrationSucceeded):
            scope.cancel()

    recorder = Tee(hook)
    with late_registry(stack) as registry:
        async with Registrar(on(settings, registry)) as registrar:
            with anyio.fail_after(BOUND), scope:
                out.append(
                    await registrar.register(
                        request_for(make_job(tmp_path), workflow_execution_id=lineage("reg-cancel")),
                        on_progress=release_when_submitted(registry, recorder),
                    )
                )
            left_after_call = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    (event,) = recorder.of(RegistrationSucceeded)
    assert (scope.cancelled_caught and out == []) or [r.registrations for r in out] == [event.registrations]
    assert recorder.of(RegistrationKept) == []
    assert left_after_call == []
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_wait_cancelled_as_the_succeeded_status_is_seen_leaves_nothing_once_final(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Cancelled from the callback at the RegistrationStatusChanged that reports SUCCEEDED (the
    registry has finished reading): the README keeps only what an accepted registration *not yet
    finished* still reads, so the run may not leave its objects behind; the exit raises nothing."""
    scope, out = anyio.CancelScope(), []

    def hook(event: ProgressEvent) -> None:
        if isinstance(event, RegistrationStatusChanged) and event.status == "SUCCEEDED":
            scope.cancel()

    recorder = Tee(hook)
    with late_registry(stack) as registry:
        async with Registrar(on(settings, registry), on_progress=recorder) as registrar:
            handle = await registrar.submit(request_for(make_job(tmp_path), workflow_execution_id=lineage("seen")))
            with anyio.fail_after(BOUND):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(wait_in_scope, handle, scope, out)
                    registry.finish_processing()
        assert await final_status(registry, handle.accepted[0].registration_id) == "SUCCEEDED"
    left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    assert [e for e in out if isinstance(e, BaseException)] == []
    assert recorder.of(RegistrationKept) == [], kinds(recorder)
    assert left == []


# --- several handles in one registrar ---------------------------------------------------------


async def test_two_handles_waited_concurrently_one_cancelled_the_other_finishes(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Two handles of one registrar waited in two tasks; A's task is cancelled while the registry
    holds both: A alone is kept and named (its own RegistrationKept, its prefix only), B goes on,
    succeeds once the registry is released (one RegistrationSucceeded, its own) and leaves nothing
    of its own; the registrar's exit raises nothing."""
    a_events, b_events, all_events = Recorder(), Recorder(), Recorder()
    with late_registry(stack) as registry:
        async with Registrar(on(settings, registry), on_progress=all_events) as registrar:
            a = await registrar.submit(
                request_for(make_job(tmp_path / "a"), workflow_execution_id=lineage("a")), on_progress=a_events
            )
            b = await registrar.submit(
                request_for(make_job(tmp_path / "b"), workflow_execution_id=lineage("b")), on_progress=b_events
            )
            a_scope, b_scope = anyio.CancelScope(), anyio.CancelScope()
            a_out: list[Any] = []
            b_out: list[Any] = []
            a_done = anyio.Event()

            async def wait_a() -> None:
                await wait_in_scope(a, a_scope, a_out)
                a_done.set()

            with anyio.fail_after(BOUND):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(wait_a)
                    tg.start_soon(wait_in_scope, b, b_scope, b_out)
                    await anyio.lowlevel.checkpoint()
                    await anyio.lowlevel.checkpoint()  # both waits have begun
                    a_scope.cancel()
                    await a_done.wait()
                    assert registry.registration(a.accepted[0].registration_id).status not in ("SUCCEEDED", "FAILED")
                    registry.finish_processing()
        assert a_scope.cancelled_caught
        assert a_out == []
        assert not b_scope.cancelled_caught
        (result,) = b_out
        assert isinstance(result, RegistrationResult), result
        assert result.registration_id == b.accepted[0].registration_id
        assert_succeeded_once_before_cleanup(b_events, result)
        assert a_events.of(RegistrationSucceeded) == []
        assert a_events.of(CleanupFinished) == []
        (kept,) = a_events.of(RegistrationKept)
        assert [k.registration_id for k in kept.registrations] == [a.accepted[0].registration_id]
        assert all_events.of(RegistrationKept) == [kept]
        assert [e.registrations for e in all_events.of(RegistrationSucceeded)] == [result.registrations]
        (prefix,) = kept.prefixes
        left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
        assert names(left) == KEPT_NAMES
        assert all(k.startswith(key_of(prefix)) for k in left), (prefix, left)
        assert await final_status(registry, a.accepted[0].registration_id) == "SUCCEEDED"  # read the kept ones
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


@pytest.mark.parametrize("idle_state", ["unfinished", "final"])
async def test_a_handle_never_waited_beside_one_waited_is_kept_or_removed_at_exit(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack, caplog: pytest.LogCaptureFixture, idle_state: str
) -> None:
    """One handle waited to the end, another never waited.  The exit raises nothing; the waited
    one's objects are gone and its RegistrationSucceeded is the only one.  The idle one: unfinished
    at the exit, kept and named (a warning, one RegistrationKept to both callbacks, its prefix only);
    final by the exit, removed and not kept."""
    caplog.set_level(logging.WARNING, logger="async_registrar")
    events, idle_events = Recorder(), Recorder()

    def idle_request() -> Any:
        return request_for(make_job(tmp_path / "i"), workflow_execution_id=lineage("idle"))

    with late_registry(stack) as registry:
        async with Registrar(on(settings, registry), on_progress=events) as registrar:
            waited = await registrar.submit(
                request_for(make_job(tmp_path / "w"), workflow_execution_id=lineage("waited"))
            )
            if idle_state == "final":
                idle = await registrar.submit(idle_request(), on_progress=idle_events)
            registry.finish_processing()
            with anyio.fail_after(BOUND):
                result = await waited.wait()
            if idle_state == "final":
                assert await final_status(registry, idle.accepted[0].registration_id) == "SUCCEEDED"
            else:
                registry.hold_processing()
                idle = await registrar.submit(idle_request(), on_progress=idle_events)
        idle_id = idle.accepted[0].registration_id
        assert result.registration_id == waited.accepted[0].registration_id
        (succeeded,) = events.of(RegistrationSucceeded)
        assert succeeded.registrations == result.registrations
        assert idle_events.of(RegistrationSucceeded) == []
        left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
        if idle_state == "final":
            assert events.of(RegistrationKept) == []
            assert left == []
        else:
            assert registry.registration(idle_id).status not in ("SUCCEEDED", "FAILED")
            (kept,) = events.of(RegistrationKept)
            assert [k.registration_id for k in kept.registrations] == [idle_id]
            assert idle_events.of(RegistrationKept) == [kept]
            assert names(left) == KEPT_NAMES
            assert all(k.startswith(key_of(kept.prefixes[0])) for k in left)
            assert any(idle_id in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
            registry.finish_processing()
            assert await final_status(registry, idle_id) == "SUCCEEDED"
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_a_handle_never_waited_and_unfinished_at_exit_is_kept_named_and_resumable(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack, caplog: pytest.LogCaptureFixture
) -> None:
    """submit() then leave the registrar while the registry holds the registration: the exit raises
    nothing, keeps and names it (warning + RegistrationKept, to the registrar's callback and the
    submit's own); a re-run of the lineage resumes it and leaves nothing once final."""
    caplog.set_level(logging.WARNING, logger="async_registrar")
    request = request_for(make_job(tmp_path), workflow_execution_id=lineage("never"))
    events, call_events = Recorder(), Recorder()
    with late_registry(stack) as registry:
        async with Registrar(on(settings, registry), on_progress=events) as registrar:
            handle = await registrar.submit(request, on_progress=call_events)
        (accepted,) = handle.accepted
        for recorder in (events, call_events):
            (kept,) = recorder.of(RegistrationKept)
            assert [k.registration_id for k in kept.registrations] == [accepted.registration_id]
            assert recorder.of(RegistrationSucceeded) == []
        assert any(accepted.registration_id in r.getMessage() for r in caplog.records)
        assert names(await leftovers(s3, settings.s3_bucket, settings.s3_prefix)) == KEPT_NAMES
        rerun = Recorder()
        async with Registrar(on(settings, registry)) as registrar:
            with anyio.fail_after(BOUND):
                result = await registrar.register(request, on_progress=release_when_submitted(registry, rerun))
        assert result.registration_id == accepted.registration_id
        assert result.registrations[0].resumed
        assert_succeeded_once_before_cleanup(rerun, result)
        assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


# --- a progress callback that raises -------------------------------------------------------------


class Boom(Exception):
    pass


@pytest.mark.parametrize("how", ["register", "handle.wait"])
async def test_a_callback_raising_on_succeeded_is_logged_once_and_changes_nothing(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """A callback that raises on RegistrationSucceeded: logged once, ignored; the result is returned,
    CleanupFinished still reaches that callback, nothing is kept or left."""
    caplog.set_level(logging.DEBUG, logger="async_registrar")
    marker = f"boom-{secrets.token_hex(4)}"

    def hook(event: ProgressEvent) -> None:
        if isinstance(event, RegistrationSucceeded):
            raise Boom(marker)

    recorder, other = Tee(hook), Recorder()
    request = request_for(make_job(tmp_path), workflow_execution_id=lineage("boom"))
    with late_registry(stack) as registry:
        if how == "register":
            async with Registrar(on(settings, registry)) as registrar:
                with anyio.fail_after(BOUND):
                    result = await registrar.register(request, on_progress=release_when_submitted(registry, recorder))
        else:  # the registrar's callback raises; the submit's own still gets every event
            async with Registrar(on(settings, registry), on_progress=recorder) as registrar:
                handle = await registrar.submit(request, on_progress=other)
                registry.finish_processing()
                with anyio.fail_after(BOUND):
                    result = await handle.wait()
            assert_succeeded_once_before_cleanup(other, result)
        assert await final_status(registry, result.registration_id) == "SUCCEEDED"
    assert_succeeded_once_before_cleanup(recorder, result)
    assert result.leftovers == ()
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    # "logged once": one warning (a DEBUG record with the traceback may come with it)
    logged = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING
        and (marker in r.getMessage() or (r.exc_info and isinstance(r.exc_info[1], Boom)))
    ]
    assert len(logged) == 1, [r.getMessage() for r in logged]


async def test_a_callback_raising_on_every_event_is_logged_once(
    tmp_path: Path, settings: Settings, s3: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A callback that raises on every event is logged once (a warning), not once per event, and the
    registration succeeds and leaves nothing."""
    caplog.set_level(logging.WARNING, logger="async_registrar")
    marker = f"every-{secrets.token_hex(4)}"

    def callback(event: ProgressEvent) -> None:
        raise Boom(marker)

    async with Registrar(settings) as registrar:
        with anyio.fail_after(BOUND):
            result = await registrar.register(request_for(make_job(tmp_path)), on_progress=callback)
    assert result.leftovers == ()
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    assert len([r for r in caplog.records if marker in r.getMessage()]) == 1


async def test_a_callback_raising_on_registration_kept_does_not_replace_the_cancellation(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """The wait is cancelled during the registry's processing and the callback raises on the
    RegistrationKept that follows: the cancellation (not the callback's error) reaches the caller,
    the artifacts are kept, the registrar's exit raises nothing."""
    scope, out = anyio.CancelScope(), []
    polled = anyio.Event()

    def hook(event: ProgressEvent) -> None:
        if isinstance(event, RegistrationStatusChanged):
            polled.set()
        if isinstance(event, RegistrationKept):
            raise Boom("on kept")

    recorder = Tee(hook)
    with late_registry(stack) as registry:
        async with Registrar(on(settings, registry), on_progress=recorder) as registrar:
            handle = await registrar.submit(request_for(make_job(tmp_path), workflow_execution_id=lineage("kept")))
            with anyio.fail_after(BOUND):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(wait_in_scope, handle, scope, out)
                    await polled.wait()
                    scope.cancel()
        assert scope.cancelled_caught
        assert out == []
        assert len(recorder.of(RegistrationKept)) == 1
        assert names(await leftovers(s3, settings.s3_bucket, settings.s3_prefix)) == KEPT_NAMES
        registry.finish_processing()
        assert await final_status(registry, handle.accepted[0].registration_id) == "SUCCEEDED"
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


# --- the registrar left while a sibling task waits on a handle -----------------------------------


async def test_leaving_the_registrar_stops_a_sibling_wait_keeps_and_names_the_unfinished_registration(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """A sibling task waits on a handle (the registry holds it) when the `async with Registrar`
    block ends: that wait raises RuntimeError saying the registrar was closed, the exit raises
    nothing, the registration is kept and named (RegistrationKept, its prefix only)."""
    recorder = Recorder()
    out: list[Any] = []
    polled = anyio.Event()

    def hook(event: ProgressEvent) -> None:
        if isinstance(event, RegistrationStatusChanged):
            polled.set()

    tee = Tee(hook)
    with late_registry(stack) as registry:
        with anyio.fail_after(BOUND):
            async with (
                anyio.create_task_group() as tg,
                Registrar(on(settings, registry), on_progress=recorder) as registrar,
            ):
                handle = await registrar.submit(
                    request_for(make_job(tmp_path), workflow_execution_id=lineage("left")), on_progress=tee
                )
                tg.start_soon(wait_in_scope, handle, anyio.CancelScope(), out)
                await polled.wait()  # the sibling's wait follows the registration
        (accepted,) = handle.accepted
        (error,) = out
        assert isinstance(error, RuntimeError), repr(error)
        assert "closed" in str(error)
        assert recorder.of(RegistrationSucceeded) == []
        (kept,) = recorder.of(RegistrationKept)
        assert [k.registration_id for k in kept.registrations] == [accepted.registration_id]
        left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
        assert names(left) == KEPT_NAMES
        assert all(k.startswith(key_of(kept.prefixes[0])) for k in left)
        registry.finish_processing()
        assert await final_status(registry, accepted.registration_id) == "SUCCEEDED"
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_leaving_the_registrar_during_a_sibling_waits_cleanup_leaves_nothing(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """The `async with Registrar` block ends as the sibling's wait sends RegistrationSucceeded (its
    cleanup about to run): the registration is final, so its prefix is emptied, nothing is kept,
    the exit raises nothing; the wait returns its result or raises the registrar-closed
    RuntimeError."""
    recorder = Recorder()
    out: list[Any] = []
    succeeded = anyio.Event()

    def hook(event: ProgressEvent) -> None:
        if isinstance(event, RegistrationSucceeded):
            succeeded.set()

    tee = Tee(hook)
    with late_registry(stack) as registry:
        with anyio.fail_after(BOUND):
            async with (
                anyio.create_task_group() as tg,
                Registrar(on(settings, registry), on_progress=recorder) as registrar,
            ):
                handle = await registrar.submit(
                    request_for(make_job(tmp_path), workflow_execution_id=lineage("left-late")), on_progress=tee
                )
                tg.start_soon(wait_in_scope, handle, anyio.CancelScope(), out)
                registry.finish_processing()
                await succeeded.wait()
        (outcome,) = out
        assert isinstance(outcome, RegistrationResult) or (
            isinstance(outcome, RuntimeError) and "closed" in str(outcome)
        ), repr(outcome)
        assert recorder.of(RegistrationKept) == []
        assert await final_status(registry, handle.accepted[0].registration_id) == "SUCCEEDED"
    left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    assert left == []
