"""A host application that misuses the library, or shuts down around it: `asyncio.run` returning
while a registration runs in a background task, Ctrl-C, native asyncio cancellation
(`asyncio.timeout`, `wait_for`, `task.cancel()` repeated while the cleanup runs, a TaskGroup
sibling failing), a registrar used from another event loop or after its block, a callback that
raises KeyboardInterrupt, resources counted after many runs, and a registrar or a coroutine
dropped on the floor.

Only what README.md ("As a library", "What a run does") promises is asserted.  Real parts only:
moto's S3 server and the reference MIMS over HTTP (see conftest)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import secrets
import signal
import socket
import threading
import warnings
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import httpx
import pytest
from pydantic import SecretStr

from async_registrar import (
    ProgressEvent,
    Registrar,
    RegistrarError,
    RegistrationFailed,
    RegistrationKept,
    RegistrationResult,
    RegistrationSubmitted,
    Settings,
    UploadProgress,
)
from async_registrar._local import ACCESS_KEY, REGION, SECRET_KEY, LocalStack
from async_registrar._s3 import make_session, open_s3_client

from .conftest import (
    MiB,
    Recorder,
    final_status,
    hooked,
    late_registry,
    leftovers,
    make_job,
    mims_server,
    on,
    remove_all,
    request_for,
)
from .test_embedding_blackbox import KEPT_NAMES, names

BOUND = 30


def registrar_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("registrar-")]


def when_uploading(then: Callable[[], None], recorder: Recorder | None = None) -> Callable[[ProgressEvent], None]:
    """A progress callback that calls `then()` once the model's first part is in."""
    done = [False]

    def callback(event: ProgressEvent) -> None:
        if recorder is not None:
            recorder(event)
        if isinstance(event, UploadProgress) and event.artifact == "model" and not done[0]:
            done[0] = True
            then()

    return callback


def in_s3(stack: LocalStack, settings: Settings, action: Callable[[Any], Coroutine[Any, Any, Any]]) -> Any:
    """Run `action(s3_client)` on a loop of its own (for the tests that run `asyncio.run` themselves)."""

    async def run() -> Any:
        session = make_session(SecretStr(ACCESS_KEY), SecretStr(SECRET_KEY))
        async with open_s3_client(session, region=REGION, endpoint_url=stack.s3_endpoint) as client:
            return await action(client)

    return asyncio.run(run())


def left_in(stack: LocalStack, settings: Settings) -> list[str]:
    return in_s3(stack, settings, lambda s3: leftovers(s3, settings.s3_bucket, settings.s3_prefix))


@contextlib.contextmanager
def recorded_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Every warning in the block, also those `gc.collect()` raises from finalizers at its end."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
        gc.collect()


def loud(caught: list[warnings.WarningMessage]) -> list[str]:
    """The warnings of a resource left open or a task destroyed pending."""
    return [
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if issubclass(w.category, ResourceWarning | RuntimeWarning) or "Unclosed" in str(w.message)
    ]


# --- the host shuts down around a registration ------------------------------------------


def test_asyncio_run_returning_while_a_background_task_uploads_leaves_nothing(
    tmp_path: Path, settings: Settings, stack: LocalStack
) -> None:
    """`asyncio.run(main())` whose main returns while its background task's registration uploads:
    the shutdown cancels that task, which cleans up (no object, no open upload), ends cancelled,
    and leaves no thread, no loop error and no warning behind."""
    job = make_job(tmp_path, model_bytes=12 * MiB)
    loop_errors: list[dict[str, Any]] = []
    ended: list[str] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: loop_errors.append(context))
        uploading = asyncio.Event()

        async def background() -> None:
            try:
                async with Registrar(settings, on_progress=when_uploading(uploading.set)) as registrar:
                    await registrar.register(request_for(job))
                ended.append("registered")
            except BaseException as exc:
                ended.append(type(exc).__name__)
                raise

        task = asyncio.create_task(background())
        await asyncio.wait_for(uploading.wait(), BOUND)
        assert not task.done()
        # main returns: asyncio.run cancels the background task and runs it to its end.

    with recorded_warnings() as caught:
        asyncio.run(main())
    assert ended == ["CancelledError"]
    assert loop_errors == []
    assert loud(caught) == []
    assert registrar_threads() == []
    assert left_in(stack, settings) == []


def test_asyncio_run_returning_while_a_background_task_waits_keeps_and_names(
    tmp_path: Path, settings: Settings, stack: LocalStack
) -> None:
    """`asyncio.run(main())` returning once the registry accepted a background task's registration:
    the artifacts are kept for the registry and named (RegistrationKept), and it succeeds later."""
    recorder = Recorder()

    with late_registry(stack) as registry:

        async def main() -> None:
            submitted = asyncio.Event()

            def progress(event: ProgressEvent) -> None:
                recorder(event)
                if isinstance(event, RegistrationSubmitted):
                    submitted.set()

            async def background() -> None:
                async with Registrar(on(settings, registry), on_progress=progress) as registrar:
                    await registrar.register(request_for(make_job(tmp_path), workflow_execution_id="wf-host-run"))

            asyncio.create_task(background())  # noqa: RUF006 - left to asyncio.run's shutdown on purpose
            await asyncio.wait_for(submitted.wait(), BOUND)

        with recorded_warnings() as caught:
            asyncio.run(main())
        (submitted,) = recorder.of(RegistrationSubmitted)
        (kept,) = recorder.of(RegistrationKept)
        assert [r.registration_id for r in kept.registrations] == [submitted.registration_id]
        assert names(left_in(stack, settings)) == KEPT_NAMES
        assert loud(caught) == []
        registry.finish_processing()
        assert asyncio.run(final_status(registry, submitted.registration_id)) == "SUCCEEDED"
    in_s3(stack, settings, lambda s3: remove_all(s3, settings.s3_bucket, settings.s3_prefix))


def test_ctrl_c_under_asyncio_run_cleans_up_then_raises_keyboardinterrupt(
    tmp_path: Path, settings: Settings, stack: LocalStack
) -> None:
    """SIGINT while `asyncio.run` (whose runner turns Ctrl-C into a cancellation of the main task)
    registers: the upload is cleaned up, and the host gets its KeyboardInterrupt."""
    job = make_job(tmp_path, model_bytes=12 * MiB)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # what a plain `python app.py` has

    async def main() -> None:
        async with Registrar(settings, on_progress=when_uploading(lambda: signal.raise_signal(signal.SIGINT))) as r:
            await r.register(request_for(job))

    try:
        with recorded_warnings() as caught, pytest.raises(KeyboardInterrupt):
            asyncio.run(main())
    finally:
        signal.signal(signal.SIGINT, previous)
    assert loud(caught) == []
    assert registrar_threads() == []
    assert left_in(stack, settings) == []


# --- native asyncio cancellation ---------------------------------------------------------


async def test_asyncio_timeout_mid_upload_is_a_timeouterror_and_leaves_nothing(
    tmp_path: Path, settings: Settings, s3: Any
) -> None:
    """`async with asyncio.timeout()` expiring while the model uploads: the host sees TimeoutError
    (the library neither swallows nor replaces the cancellation), its task is not left
    cancelling, and nothing is left in S3."""
    job = make_job(tmp_path, model_bytes=12 * MiB)
    async with Registrar(settings) as registrar:
        async with asyncio.timeout(BOUND) as deadline:

            def expire() -> None:
                deadline.reschedule(asyncio.get_running_loop().time())

            with pytest.raises(TimeoutError):
                async with asyncio.timeout(BOUND) as deadline:
                    await registrar.register(request_for(job), on_progress=when_uploading(expire))
        task = asyncio.current_task()
        assert task is not None
        assert task.cancelling() == 0
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_task_running_wait_for_cancelled_mid_upload_leaves_nothing(
    tmp_path: Path, settings: Settings, s3: Any
) -> None:
    """A host task awaiting `asyncio.wait_for(register(...), timeout)` (which runs the registration
    in a task of its own) is cancelled mid-upload: it ends cancelled, and nothing is left."""
    job = make_job(tmp_path, model_bytes=12 * MiB)
    async with Registrar(settings) as registrar:
        holder: list[asyncio.Task[Any]] = []
        callback = when_uploading(lambda: holder[0].cancel("host stopping"))
        registration = registrar.register(request_for(job), on_progress=callback)
        holder.append(asyncio.create_task(asyncio.wait_for(registration, BOUND)))
        done, _ = await asyncio.wait(holder, timeout=BOUND)
        assert done
        assert holder[0].cancelled()
        assert asyncio.all_tasks() == {asyncio.current_task()}
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


def cancel_again(task: asyncio.Task[Any], times: int, log: list[str]) -> Callable[..., Coroutine[Any, Any, None]]:
    """A botocore hook that cancels `task` `times` more times, natively, while the call it hooks
    (a cleanup's abort or delete) is under way, and lets each cancellation land."""

    async def hook(**_: Any) -> None:
        for i in range(times):
            log.append(f"cancel {i}")
            task.cancel(f"host cancels again ({i})")
            await asyncio.sleep(0)

    return hook


async def test_task_cancel_repeated_while_the_upload_cleanup_runs_leaves_nothing(
    tmp_path: Path, settings: Settings, s3: Any
) -> None:
    """A host cancels the registering task mid-upload, then three more times while the cleanup
    aborts the multipart uploads (task.cancel(), as asyncio hosts do): the cleanup still runs to its
    end (no object, no open upload), and the task ends cancelled."""
    job = make_job(tmp_path, model_bytes=12 * MiB)
    log: list[str] = []
    async with Registrar(settings, s3_client=s3) as registrar:
        holder: list[asyncio.Task[Any]] = []
        callback = when_uploading(lambda: holder[0].cancel("host stopping"))
        holder.append(asyncio.create_task(registrar.register(request_for(job), on_progress=callback)))
        hook = cancel_again(holder[0], 3, log)
        with hooked(s3, ("before-call.s3.AbortMultipartUpload", hook), ("before-call.s3.DeleteObjects", hook)):
            await asyncio.wait(holder, timeout=BOUND)
        assert holder[0].done()
        assert holder[0].cancelled()
    assert log  # the hook ran: cancellations did arrive during the cleanup
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_task_cancel_repeated_while_the_final_cleanup_deletes_leaves_nothing(
    tmp_path: Path, settings: Settings, s3: Any
) -> None:
    """Cancelled three times (natively) while the cleanup after SUCCEEDED deletes the temporary
    objects: the registration is final, so nothing may be kept; the prefix ends empty."""
    job = make_job(tmp_path)
    log: list[str] = []
    async with Registrar(settings, s3_client=s3) as registrar:
        task = asyncio.create_task(registrar.register(request_for(job)))
        hook = cancel_again(task, 3, log)
        with hooked(s3, ("before-call.s3.DeleteObjects", hook), ("before-call.s3.DeleteObject", hook)):
            await asyncio.wait([task], timeout=BOUND)
        assert task.done()
    assert log
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


# --- misuse of the API ---------------------------------------------------------------------


async def test_every_method_of_a_closed_registrar_is_a_runtimeerror_outside_the_tree(
    tmp_path: Path, settings: Settings, s3: Any
) -> None:
    """After its block: submit, check, sweep, install_lifecycle and a new `async with` are usage
    errors (RuntimeError, not a RegistrarError), and none of them writes to S3."""
    job = make_job(tmp_path)
    registrar = Registrar(settings)
    async with registrar:
        pass
    calls: dict[str, Callable[[], Coroutine[Any, Any, Any]]] = {
        "submit": lambda: registrar.submit(request_for(job)),
        "check": lambda: registrar.check(request_for(job)),
        "sweep": lambda: registrar.sweep(),
        "install_lifecycle": lambda: registrar.install_lifecycle(dry_run=True),
        "aenter": registrar.__aenter__,
    }
    seen: dict[str, str] = {}
    for name, call in calls.items():
        try:
            await asyncio.wait_for(call(), BOUND)
            seen[name] = "returned"
        except BaseException as exc:
            is_usage = isinstance(exc, RuntimeError) and not isinstance(exc, RegistrarError)
            seen[name] = "usage error" if is_usage else f"{type(exc).__name__}: {exc}"
    assert seen == dict.fromkeys(calls, "usage error")
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


def test_a_registrar_entered_on_one_loop_and_used_on_another_is_a_usage_error(
    tmp_path: Path, settings: Settings, stack: LocalStack, no_backoff: None
) -> None:
    """A registrar entered on one thread's event loop, called from another thread's `asyncio.run`:
    a RuntimeError outside the error tree (not a hang, not a StorageError), and the registrar still
    works on its own loop afterwards and exits cleanly."""
    job = make_job(tmp_path)
    other: list[str] = []
    own: list[str] = []

    def other_thread(registrar: Registrar) -> None:
        try:
            asyncio.run(asyncio.wait_for(registrar.register(request_for(job)), BOUND))
            other.append("registered")
        except BaseException as exc:
            is_usage = isinstance(exc, RuntimeError) and not isinstance(exc, RegistrarError)
            other.append("usage error" if is_usage else f"{type(exc).__name__}: {exc}")

    async def main() -> None:
        try:
            async with Registrar(settings) as registrar:
                thread = threading.Thread(target=other_thread, args=(registrar,))
                thread.start()
                await asyncio.to_thread(thread.join, BOUND * 2)
                assert not thread.is_alive()
                if other != ["usage error"]:
                    return  # failed already (below); its next S3 call would spend ~10 s in botocore's retries
                await registrar.register(request_for(job))
            own.append("registered")
        except Exception as exc:
            own.append(f"{type(exc).__name__}: {exc}")

    with recorded_warnings() as caught:
        asyncio.run(main())
    assert other == ["usage error"]
    assert own == ["registered"]
    assert loud(caught) == []
    assert left_in(stack, settings) == []


def stop_stranded_anyio_workers() -> int:
    """Stop anyio worker threads whose event loop was closed under them (they would hold the
    interpreter's exit forever: they are not daemons); how many there were."""
    stranded = [t for t in threading.enumerate() if t.name == "AnyIO worker thread" and t.loop.is_closed()]
    for thread in stranded:
        thread.queue.put_nowait(None)  # the worker's own shutdown command
        thread.join(5)
    return len(stranded)


def test_a_callback_raising_keyboardinterrupt_mid_upload_lets_the_host_shut_down(
    tmp_path: Path, settings: Settings, stack: LocalStack
) -> None:
    """A progress callback that raises KeyboardInterrupt (a host's Ctrl-C landing in it) mid-upload:
    whatever it does to the run, asyncio.run's shutdown finishes every task, no thread is left to
    hold the process's exit, no transport is left open, and no object or open upload is left."""
    job = make_job(tmp_path, model_bytes=12 * MiB)
    main_task: list[asyncio.Task[Any]] = []

    def interrupt() -> None:
        raise KeyboardInterrupt

    async def main() -> None:
        main_task.append(asyncio.current_task())  # type: ignore[arg-type]
        async with Registrar(settings, on_progress=when_uploading(interrupt)) as registrar:
            await registrar.register(request_for(job))

    try:
        with recorded_warnings() as caught, contextlib.suppress(KeyboardInterrupt):
            asyncio.run(main())
    finally:
        stranded = stop_stranded_anyio_workers()
    left = left_in(stack, settings)
    in_s3(stack, settings, lambda s3: remove_all(s3, settings.s3_bucket, settings.s3_prefix))
    assert main_task[0].done()
    assert stranded == 0
    assert loud(caught) == []
    assert registrar_threads() == []
    assert left == []


def test_a_callback_raising_systemexit_after_submission_keeps_and_names(
    tmp_path: Path, settings: Settings, stack: LocalStack
) -> None:
    """A progress callback that raises SystemExit on RegistrationSubmitted: whatever it does to the
    run, the accepted registration's artifacts are kept (the registry reads them later) and named,
    and it succeeds."""
    recorder = Recorder()

    with late_registry(stack) as registry:

        def progress(event: ProgressEvent) -> None:
            recorder(event)
            if isinstance(event, RegistrationSubmitted):
                raise SystemExit(3)

        async def main() -> None:
            async with Registrar(on(settings, registry), on_progress=progress) as registrar:
                await registrar.register(request_for(make_job(tmp_path), workflow_execution_id="wf-exit"))

        with recorded_warnings() as caught, contextlib.suppress(SystemExit):
            asyncio.run(main())
        (submitted,) = recorder.of(RegistrationSubmitted)
        assert loud(caught) == []
        assert registrar_threads() == []
        left = left_in(stack, settings)
        if not recorder.of(RegistrationKept):  # the callback was ignored: the run went on to the end
            registry.finish_processing()
        assert names(left) in (KEPT_NAMES, [])
        registry.finish_processing()
        assert asyncio.run(final_status(registry, submitted.registration_id)) == "SUCCEEDED"
    in_s3(stack, settings, lambda s3: remove_all(s3, settings.s3_bucket, settings.s3_prefix))


async def test_a_native_cancel_during_the_final_cleanup_is_not_swallowed(
    tmp_path: Path, settings: Settings, s3: Any
) -> None:
    """A host worker task (`while True: await registrar.register(next_job)`) cancelled natively
    while the cleanup after SUCCEEDED deletes: the cleanup ends, and the cancellation still stops
    the task (asyncio delivers a `task.cancel()` once: a run that swallowed it would let the
    worker go on to its next job)."""
    job = make_job(tmp_path)
    after: list[str] = []
    log: list[str] = []
    async with Registrar(settings, s3_client=s3) as registrar:

        async def worker() -> None:
            await registrar.register(request_for(job))
            after.append("returned")
            await asyncio.sleep(0)
            after.append("went on to the next job")

        task = asyncio.create_task(worker())
        hook = cancel_again(task, 1, log)
        with hooked(s3, ("before-call.s3.DeleteObjects", hook), ("before-call.s3.DeleteObject", hook)):
            await asyncio.wait([task], timeout=BOUND)
    assert set(log) == {"cancel 0"}
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    assert "went on to the next job" not in after
    assert task.cancelled()


async def test_a_taskgroup_siblings_failure_cancels_the_registration_cleanly(
    tmp_path: Path, settings: Settings, s3: Any
) -> None:
    """An `asyncio.TaskGroup` whose other task fails while the registration uploads: the group
    raises only the sibling's error (the registration's cancellation is not turned into an error
    of its own), and nothing is left in S3."""
    job = make_job(tmp_path, model_bytes=12 * MiB)
    uploading = asyncio.Event()

    async def sibling() -> None:
        await uploading.wait()
        raise ValueError("the host's other work failed")

    async with Registrar(settings) as registrar:
        with pytest.raises(ExceptionGroup) as caught:
            async with asyncio.timeout(BOUND), asyncio.TaskGroup() as tg:
                tg.create_task(registrar.register(request_for(job), on_progress=when_uploading(uploading.set)))
                tg.create_task(sibling())
    assert [type(e) for e in caught.value.exceptions] == [ValueError]
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_shielded_registration_under_an_expiring_asyncio_timeout_leaves_nothing(
    tmp_path: Path, settings: Settings, s3: Any
) -> None:
    """`anyio.CancelScope(shield=True)` around register() inside an `asyncio.timeout` that expires
    mid-upload (native cancellation, which anyio's shield may or may not hold off): either the run
    finishes or it is cancelled, and nothing is left in S3 either way."""
    job = make_job(tmp_path, model_bytes=12 * MiB)
    outcome: list[str] = []
    async with Registrar(settings) as registrar:
        try:
            async with asyncio.timeout(BOUND) as deadline:

                def expire() -> None:
                    deadline.reschedule(asyncio.get_running_loop().time())

                with anyio.CancelScope(shield=True):
                    await registrar.register(request_for(job), on_progress=when_uploading(expire))
                outcome.append("registered")
        except TimeoutError:
            outcome.append("timed out")
    assert len(outcome) == 1
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_the_same_lineage_registered_twice_at_once_is_one_registration(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """A host that registers the same request (same lineage id) twice at once on one registrar
    (a retried job message): the registry makes one registration, both calls end (a result, or a
    RegistrarError), no result names another model, and nothing is left."""
    request = request_for(make_job(tmp_path), workflow_execution_id=f"wf-twice-{secrets.token_hex(4)}")
    with mims_server(stack) as registry:
        async with Registrar(on(settings, registry)) as registrar:
            async with asyncio.timeout(BOUND):
                outcomes = await asyncio.gather(
                    registrar.register(request), registrar.register(request), return_exceptions=True
                )
        count = registry.registration_count
    results = [o for o in outcomes if isinstance(o, RegistrationResult)]
    errors = [o for o in outcomes if not isinstance(o, RegistrationResult)]
    assert all(isinstance(e, RegistrarError) for e in errors), errors
    assert results, errors
    assert len({r.model_id for r in results}) == 1
    assert count == 1
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


# --- resources after many runs, and things dropped on the floor ------------------------------


def resources() -> dict[str, int]:
    """What a leak would grow: open file descriptors and threads other than anyio's idle workers
    (reused, pruned).  Not moto's anonymous temporary files: the S3 server runs in this process and
    keeps each object the registry stores in one."""
    fds = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if not re.fullmatch(r"/tmp/#\d+ \(deleted\)", os.readlink(f"/proc/self/fd/{fd}")):
                fds += 1
    threads = [t for t in threading.enumerate() if t.name != "AnyIO worker thread"]
    return {"fds": fds, "threads": len(threads)}


async def settled(baseline: dict[str, int]) -> dict[str, int]:
    """The resources once closed connections have wound down on the server's side (polled, bounded)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(10):
            while any(v > baseline[k] for k, v in resources().items()):
                await asyncio.sleep(0.05)
    return resources()


async def test_many_registrations_leak_no_fd_thread_task_or_warning(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Rounds of a registration that succeeds, one the registry fails and one cancelled mid-upload,
    each in a registrar of its own: after the first round, further rounds leave no file
    descriptor, thread or task behind, and nothing warns of an unclosed client or a pending task."""
    small = request_for(make_job(tmp_path / "small"))
    big = request_for(make_job(tmp_path / "big", model_bytes=12 * MiB))
    with mims_server(stack, fail_registrations="rejected by policy") as failing:

        async def one_round() -> None:
            async with Registrar(settings) as registrar:
                await registrar.register(small)
            async with Registrar(on(settings, failing)) as registrar:
                with pytest.raises(RegistrationFailed):
                    await registrar.register(small)
            async with Registrar(settings) as registrar:
                task = asyncio.create_task(registrar.register(big, on_progress=when_uploading(lambda: task.cancel())))
                await asyncio.wait([task], timeout=BOUND)
                assert task.cancelled()

        with recorded_warnings() as caught:
            await one_round()  # imports, botocore's data, the server's first connections
            gc.collect()
            baseline = await settled(resources())
            for _ in range(2):
                await one_round()
            gc.collect()
            after = await settled(baseline)
    assert {k: min(v, baseline[k]) for k, v in after.items()} == after, (baseline, after)  # none grew
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert registrar_threads() == []
    assert loud(caught) == []
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_registration_never_awaited_uploads_nothing_and_the_exit_is_clean(
    tmp_path: Path, settings: Settings, s3: Any
) -> None:
    """A host that makes `registrar.register(request)` and drops it unawaited: nothing is uploaded,
    the registrar's exit neither hangs nor raises, and the only warning is Python's own "never
    awaited" one."""
    job = make_job(tmp_path)
    with recorded_warnings() as caught:
        async with asyncio.timeout(BOUND), Registrar(settings) as registrar:
            registrar.register(request_for(job))  # type: ignore[unused-coroutine]  # noqa: RUF100
            submit = registrar.submit(request_for(job))
            del submit
    assert sorted({str(w.message).split("'")[1] for w in caught}) == ["Registrar.register", "Registrar.submit"]
    assert all(w.category is RuntimeWarning and "never awaited" in str(w.message) for w in caught)
    assert registrar_threads() == []
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_registrar_entered_in_one_task_and_left_in_another_works(
    tmp_path: Path, settings: Settings, s3: Any
) -> None:
    """A host whose startup and shutdown hooks run in different tasks (`__aenter__` in one,
    `__aexit__` in another, register() in a third): it registers, exits without error, and leaves
    nothing and no open client."""
    registrar = Registrar(settings)
    with recorded_warnings() as caught:
        async with asyncio.timeout(BOUND):
            await asyncio.create_task(registrar.__aenter__())
            result = await asyncio.create_task(registrar.register(request_for(make_job(tmp_path))))
            await asyncio.create_task(registrar.__aexit__(None, None, None))
    assert result.model_id
    assert loud(caught) == []
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_the_hosts_proxy_variables_reach_the_registry_client_unless_the_host_gives_its_own(
    tmp_path: Path, settings: Settings, s3: Any, monkeypatch: pytest.MonkeyPatch, no_backoff: None
) -> None:
    """The host's proxy variables (a dead proxy here) apply to the registrar's own registry
    client, as to every httpx and botocore client (README), and the failure names them; a host
    that gives its own `httpx.AsyncClient(trust_env=False)` is not rerouted.  (S3 goes through a
    client made before, given as `s3_client`.)"""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, dead)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    settings = settings.model_copy(update={"preflight_timeout": 1.0})
    async with asyncio.timeout(BOUND), Registrar(settings, s3_client=s3) as registrar:
        with pytest.raises(RegistrarError) as refused:
            await registrar.register(request_for(make_job(tmp_path / "proxied")))
    assert f"HTTP_PROXY={dead}" in str(refused.value), str(refused.value)
    async with (
        asyncio.timeout(BOUND),
        httpx.AsyncClient(trust_env=False) as own,
        Registrar(settings, s3_client=s3, http_client=own) as registrar,
    ):
        result = await registrar.register(request_for(make_job(tmp_path)))
    assert result.model_id
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_host_thread_registers_through_the_loop_with_anyio_from_thread(
    tmp_path: Path, settings: Settings, s3: Any
) -> None:
    """A host's worker thread (no event loop of its own) hands the registration to the registrar's
    loop with `anyio.from_thread.run`, the supported way across threads: it registers and leaves
    nothing."""
    request = request_for(make_job(tmp_path))
    async with asyncio.timeout(BOUND), Registrar(settings) as registrar:

        def in_a_thread() -> str:
            assert not _has_running_loop()
            return anyio.from_thread.run(registrar.register, request).model_id

        model_id = await anyio.to_thread.run_sync(in_a_thread)
    assert model_id
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


def _has_running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
