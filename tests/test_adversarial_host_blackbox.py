"""Black-box: the library embedded in an async host service that misbehaves.

Written from README.md ("As a library"), docs/faults.md, CHANGELOG.md and the public API alone:
progress callbacks that raise, block, are slow or call back into the registrar; cancellation
from outside at a sweep of delays and on each progress event; lifecycle misuse (closed, never
entered, entered twice or nested, handles never awaited, one S3 client shared by two registrars,
a registrar dropped unclosed); the host hygiene the README promises (nothing printed, no signal
handler, no logging configuration, no environment variable read behind `Settings`, no exit);
a host keeping the shared thread pools busy.  Real S3 (moto on loopback) and the reference MIMS
over real HTTP throughout; no mock.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import logging
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from async_registrar import (
    CleanupFinished,
    InputError,
    ProgressEvent,
    Registrar,
    RegistrarError,
    RegistrationKept,
    RegistrationRequest,
    RegistrationStatusChanged,
    RegistrationSubmitted,
    RegistrationSucceeded,
    Settings,
    UploadProgress,
)
from async_registrar._local import ACCESS_KEY, SECRET_KEY, LocalStack

from .conftest import (
    MiB,
    Recorder,
    default_executor_filled,
    late_registry,
    leftovers,
    make_job,
    on,
    release_when_submitted,
    remove_all,
    request_for,
)

UNFINISHED = ("PENDING", "IN_PROGRESS")


def keys_of(prefixes: tuple[str, ...], bucket: str) -> list[str]:
    """The S3 keys of `s3://bucket/...` prefixes."""
    return [p.removeprefix(f"s3://{bucket}/") for p in prefixes]


def library_records(caplog: pytest.LogCaptureFixture, *needles: str) -> list[logging.LogRecord]:
    """The library's log records whose message holds every needle."""
    return [
        r for r in caplog.records if r.name.startswith("async_registrar") and all(n in r.getMessage() for n in needles)
    ]


async def assert_kept_and_named(s3: Any, settings: Settings, kept: RegistrationKept, registry: Any) -> None:
    """What a `RegistrationKept` names is exactly what is left: its prefixes hold the artifacts and
    the manifest, nothing else is left under the test's prefix, and each registration it names is
    one the registry holds unfinished."""
    left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    prefixes = keys_of(kept.prefixes, settings.s3_bucket)
    assert prefixes, kept
    assert left, f"{kept} names prefixes, but nothing is left under {settings.s3_prefix}"
    assert not [k for k in left if k.startswith("upload:")], left
    strays = [k for k in left if not any(k.startswith(p) for p in prefixes)]
    assert strays == [], f"left outside the kept prefixes {prefixes}: {strays}"
    for prefix in prefixes:
        names = sorted(k.removeprefix(prefix) for k in left if k.startswith(prefix))
        assert "model.tar.gz" in names, (prefix, names)
        assert "registration.json" in names, (prefix, names)
    assert kept.resume_hint, kept
    for accepted in kept.registrations:
        assert accepted.kept_prefix in kept.prefixes, (accepted, kept.prefixes)
        held = registry.registration(accepted.registration_id)
        assert held is not None, f"{accepted.registration_id} named as kept is unknown to the registry"
        assert held.status in UNFINISHED, (accepted.registration_id, held.status)


# ---------------------------------------------------------------------------------------------
# Progress callbacks that misbehave
# ---------------------------------------------------------------------------------------------


async def test_callbacks_raising_on_every_event_of_an_upload_change_nothing_and_are_logged_once(
    settings: Settings, s3: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """README: "A callback that raises is logged once and ignored: it never changes the outcome"
    -- for `Registrar.upload` as well, through both the registrar's callback and the call's."""
    job = make_job(tmp_path, model_bytes=6 * MiB)
    calls: list[str] = []

    def registrar_level(event: ProgressEvent) -> None:
        calls.append("registrar")
        raise ValueError("host bug in the registrar-wide callback")

    def call_level(event: ProgressEvent) -> None:
        calls.append("call")
        raise KeyError("host bug in the per-call callback")

    key = f"{settings.s3_prefix}raising/model.tar.gz"
    caplog.set_level(logging.DEBUG, logger="async_registrar")
    async with Registrar(settings, on_progress=registrar_level) as registrar:
        uploaded = await registrar.upload(job["model"], f"s3://{settings.s3_bucket}/{key}", on_progress=call_level)
    head = await s3.head_object(Bucket=settings.s3_bucket, Key=key)
    assert head["ContentLength"] == uploaded.size
    assert uploaded.location.key == key
    assert calls.count("registrar") >= 2, calls
    assert calls.count("call") >= 2, calls
    assert len(library_records(caplog, "ValueError")) == 1, [r.getMessage() for r in caplog.records]
    assert len(library_records(caplog, "KeyError")) == 1, [r.getMessage() for r in caplog.records]
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == [key]
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_blocking_and_slow_callbacks_delay_but_change_nothing(
    settings: Settings, s3: Any, tmp_path: Path
) -> None:
    """A callback that blocks the loop for a while (0.3 s on the first upload progress, on the
    submission and on the success) and one that is slow on every event: the registration finishes,
    every event arrives in order on the loop's thread, and nothing is left."""
    job = make_job(tmp_path)
    loop_thread = threading.get_ident()
    threads: set[int] = set()
    kinds: list[str] = []
    blocked: set[str] = set()

    def blocking(event: ProgressEvent) -> None:
        threads.add(threading.get_ident())
        kind = type(event).__name__
        kinds.append(kind)
        if kind in ("UploadProgress", "RegistrationSubmitted", "RegistrationSucceeded") and kind not in blocked:
            blocked.add(kind)
            time.sleep(0.3)

    def slow(event: ProgressEvent) -> None:
        threads.add(threading.get_ident())
        time.sleep(0.01)

    async with Registrar(settings, on_progress=slow) as registrar:
        with anyio.fail_after(60):
            result = await registrar.register(request_for(job), on_progress=blocking)
    assert result.model_id
    assert blocked == {"UploadProgress", "RegistrationSubmitted", "RegistrationSucceeded"}
    assert threads == {loop_thread}
    assert kinds.index("RegistrationSubmitted") < kinds.index("RegistrationSucceeded") < kinds.index("CleanupFinished")
    assert kinds.count("RegistrationSucceeded") == 1
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_callback_that_starts_another_registration_and_an_upload_from_inside_both_finish(
    settings: Settings, s3: Any, tmp_path: Path
) -> None:
    """README: "for slow or async work, start a task from it".  The first registration's callback
    starts a second registration on its first upload progress and an upload on its submission,
    on the same registrar: all three finish, nothing of the registrations is left."""
    first = request_for(make_job(tmp_path / "a"))
    second = request_for(make_job(tmp_path / "b"))
    upload_dir = make_job(tmp_path / "c")["model"]
    upload_key = f"{settings.s3_prefix}from-callback/model.tar.gz"
    results: dict[str, Any] = {}

    async with Registrar(settings) as registrar, anyio.create_task_group() as tg:

        async def run_second() -> None:
            results["second"] = await registrar.register(second)

        async def run_upload() -> None:
            results["upload"] = await registrar.upload(upload_dir, f"s3://{settings.s3_bucket}/{upload_key}")

        def callback(event: ProgressEvent) -> None:
            if isinstance(event, UploadProgress) and "second" not in started:
                started.add("second")
                tg.start_soon(run_second)
            if isinstance(event, RegistrationSubmitted) and "upload" not in started:
                started.add("upload")
                tg.start_soon(run_upload)

        started: set[str] = set()
        with anyio.fail_after(60):
            results["first"] = await registrar.register(first, on_progress=callback)
    assert started == {"second", "upload"}
    assert results["first"].registration_id != results["second"].registration_id
    assert results["upload"].location.key == upload_key
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == [upload_key]
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


class AsyncCallable:
    async def __call__(self, event: ProgressEvent) -> None:
        return None


async def async_callback(event: ProgressEvent, tag: str = "") -> None:
    return None


@pytest.mark.parametrize(
    "callback",
    [async_callback, functools.partial(async_callback, tag="x"), AsyncCallable()],
    ids=["async-def", "partial-of-async-def", "object-with-async-call"],
)
async def test_async_callbacks_are_a_typeerror_where_given_and_nothing_is_written(
    settings: Settings, s3: Any, tmp_path: Path, callback: Any
) -> None:
    """README: "An `async def` callback is a `TypeError` where it is given" (CHANGELOG: for
    `Registrar(on_progress=...)`, `register`, `submit` and `upload`)."""
    job = make_job(tmp_path)
    with pytest.raises(TypeError, match="async"):
        Registrar(settings, on_progress=callback)
    async with Registrar(settings) as registrar:
        with pytest.raises(TypeError, match="async"):
            await registrar.register(request_for(job), on_progress=callback)
        with pytest.raises(TypeError, match="async"):
            await registrar.submit(request_for(job), on_progress=callback)
        with pytest.raises(TypeError, match="async"):
            await registrar.upload(
                job["model"], f"s3://{settings.s3_bucket}/{settings.s3_prefix}x.tar.gz", on_progress=callback
            )
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


# ---------------------------------------------------------------------------------------------
# Cancellation from outside
# ---------------------------------------------------------------------------------------------


def first_of(kind: type[Any], *, done: bool | None = None) -> Callable[[ProgressEvent], bool]:
    def match(event: ProgressEvent) -> bool:
        return isinstance(event, kind) and (done is None or getattr(event, "done", None) is done)

    return match


CANCEL_POINTS: dict[str, tuple[Callable[[ProgressEvent], bool], bool, bool]] = {
    # name: (the event to cancel on, whether the registry lets it finish, whether it is kept)
    "first-upload-progress": (first_of(UploadProgress), False, False),
    "an-upload-done": (first_of(UploadProgress, done=True), False, False),
    "submitted": (first_of(RegistrationSubmitted), False, True),
    "status-changed": (first_of(RegistrationStatusChanged), False, True),
    "succeeded": (first_of(RegistrationSucceeded), True, False),
    "cleanup-finished": (first_of(CleanupFinished), True, False),
}


def recording_and_cancelling(
    recorder: Recorder, scope: anyio.CancelScope, when: Callable[[ProgressEvent], bool]
) -> Callable[[ProgressEvent], None]:
    """A progress callback that records each event and cancels `scope` on those `when` picks."""

    def callback(event: ProgressEvent) -> None:
        recorder(event)
        if when(event):
            scope.cancel()

    return callback


@pytest.mark.parametrize("point", list(CANCEL_POINTS))
async def test_cancelling_the_registrars_block_from_a_callback_on_each_event(
    settings: Settings, s3: Any, stack: LocalStack, tmp_path: Path, point: str
) -> None:
    """A callback that cancels the host's scope around the whole `async with Registrar` block (so
    it closes the registrar too) on one progress event.  Before the registry accepted: nothing
    left, no registration.  After it accepted and before it finished: a `RegistrationKept` names
    the registration and its prefix, which is exactly what is left.  From the success on: the
    shielded cleanup still leaves nothing (README, `RegistrationSucceeded`)."""
    matches, finishes, kept_expected = CANCEL_POINTS[point]
    job = make_job(tmp_path)
    recorder = Recorder()
    with late_registry(stack) as registry:
        with anyio.fail_after(60), anyio.CancelScope() as scope:
            cancelling = recording_and_cancelling(recorder, scope, matches)
            callback = release_when_submitted(registry, cancelling) if finishes else cancelling
            async with Registrar(on(settings, registry), on_progress=callback) as registrar:
                await registrar.register(request_for(job))
            # After the success the cancellation may land at the caller's next checkpoint (README,
            # `RegistrationSucceeded`): this one.
            await anyio.sleep(30)
            pytest.fail("the registration was not cancelled")
        assert scope.cancelled_caught
        kept = recorder.of(RegistrationKept)
        submitted = recorder.of(RegistrationSubmitted)
        if kept_expected:
            (event,) = kept
            assert [r.registration_id for r in event.registrations] == [s.registration_id for s in submitted]
            await assert_kept_and_named(s3, settings, event, registry)
            await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
        else:
            assert kept == []
            assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
            assert registry.registration_count == len(submitted)
            if finishes:
                assert len(recorder.of(RegistrationSucceeded)) == 1
                assert len(recorder.of(CleanupFinished)) == 1


async def test_a_sweep_of_outside_cancellations_leaves_nothing_or_keeps_and_names_an_accepted_registration(
    settings: Settings, s3: Any, stack: LocalStack, tmp_path: Path
) -> None:
    """`anyio.move_on_after` around `register` at delays spanning the preflight, the uploads, the
    submission and the wait, on a registry that never finishes: each time either nothing is left
    (and no registration was made), or one `RegistrationKept` names what is left.  The registry
    never holds a registration whose artifacts were not kept."""
    job = make_job(tmp_path, model_bytes=4 * MiB)
    request = request_for(job)
    recorder = Recorder()
    with late_registry(stack) as registry:
        async with Registrar(on(settings, registry), on_progress=recorder) as registrar:
            # How long this machine takes to the submission, to spread the delays over it.
            started = time.monotonic()
            with anyio.fail_after(60), anyio.CancelScope() as scope:

                def cancel_on_submitted(event: ProgressEvent) -> None:
                    if isinstance(event, RegistrationSubmitted):
                        scope.cancel()

                await registrar.register(request, on_progress=cancel_on_submitted)
            to_submission = time.monotonic() - started
            assert len(recorder.of(RegistrationKept)) == 1
            # Each run makes at most one registration; a kept run whose POST went unanswered names
            # none (its `registrations` is empty) but may have made one.
            kept_runs = 1
            await remove_all(s3, settings.s3_bucket, settings.s3_prefix)

            outcomes: list[str] = []
            fractions = [0, 0.1, 0.3, 0.5, 0.65, 0.8, 0.88, 0.94, 1.0, 1.06, 1.3]
            for fraction in fractions:
                delay = to_submission * fraction
                recorder.events.clear()
                registered_before = registry.registration_count
                with anyio.move_on_after(delay) as sweep_scope:
                    await registrar.register(request)
                assert sweep_scope.cancelled_caught, f"registered within {delay:.3f} s on a registry that holds it"
                kept = recorder.of(RegistrationKept)
                if kept:
                    (event,) = kept
                    await assert_kept_and_named(s3, settings, event, registry)
                    kept_runs += 1
                    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
                    outcomes.append(f"{delay:.3f}: kept")
                else:
                    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == [], f"after {delay:.3f} s"
                    assert registry.registration_count == registered_before, (
                        f"cancelled after {delay:.3f} s: the registry accepted a registration whose artifacts "
                        f"were removed, and no RegistrationKept was sent"
                    )
                    outcomes.append(f"{delay:.3f}: clean")
        # A POST still on its way when its run ended would be counted by now.
        assert registry.registration_count <= kept_runs, (
            f"the registry holds {registry.registration_count} registrations, {kept_runs} runs kept: {outcomes}"
        )
    assert outcomes[0].endswith("clean"), outcomes


async def test_a_sweep_of_cancelled_uploads_never_leaves_an_open_upload_and_names_a_target_it_keeps(
    settings: Settings, s3: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`Registrar.upload` under `move_on_after` at delays spanning its whole run.  README: "the
    multipart upload aborted on any failure or cancellation"; CHANGELOG: one cancelled while its
    object was read back leaves it, logged ("... is there").  So: never an open multipart upload;
    a cancelled upload leaves either nothing or the whole object, named in the log."""
    job = make_job(tmp_path, model_bytes=9 * MiB)
    caplog.set_level(logging.INFO, logger="async_registrar")
    bucket = settings.s3_bucket
    async with Registrar(settings) as registrar:
        started = time.monotonic()
        whole = await registrar.upload(job["model"], f"s3://{bucket}/{settings.s3_prefix}whole.tar.gz")
        duration = time.monotonic() - started
        assert whole.parts >= 3, whole
        outcomes: list[str] = []
        for index, fraction in enumerate([0, 0.1, 0.25, 0.4, 0.55, 0.7, 0.8, 0.9, 0.97, 1.1]):
            key = f"{settings.s3_prefix}swept-{index}.tar.gz"
            uri = f"s3://{bucket}/{key}"
            returned = None
            with anyio.move_on_after(duration * fraction) as scope:
                returned = await registrar.upload(job["model"], uri)
            left = await leftovers(s3, bucket, key)
            assert not [k for k in left if k.startswith("upload:")], (fraction, left)
            if scope.cancelled_caught and returned is None:
                if left:
                    head = await s3.head_object(Bucket=bucket, Key=key)
                    assert head["ContentLength"] == whole.size, "a cancelled upload left a partial object"
                    assert library_records(caplog, uri), f"{uri} was left by a cancelled upload without a word"
                    outcomes.append("kept-target")
                else:
                    outcomes.append("nothing")
            else:
                assert returned is not None
                assert left == [key]
                assert returned.size == whole.size
                assert returned.sha256 == whole.sha256
                outcomes.append("uploaded")
            await remove_all(s3, bucket, key)
    assert outcomes[0] == "nothing", outcomes
    await remove_all(s3, bucket, settings.s3_prefix)


async def test_uploads_run_beside_registrations_and_a_cancelled_one_touches_only_its_own(
    settings: Settings, s3: Any, tmp_path: Path
) -> None:
    """The public upload API concurrent with registrations on one registrar (sharing
    `max_parallel_uploads`, here 2): one upload cancelled on its first progress, one finished, two
    registrations finished; only the finished upload's object is left."""
    bucket = settings.s3_bucket
    jobs = [make_job(tmp_path / name, model_bytes=3 * MiB) for name in ("r1", "r2", "u1", "u2")]
    done_key = f"{settings.s3_prefix}beside/done.tar.gz"
    cancelled_key = f"{settings.s3_prefix}beside/cancelled.tar.gz"
    results: dict[str, Any] = {}
    cancelled = anyio.CancelScope()

    async with Registrar(settings.model_copy(update={"max_parallel_uploads": 2})) as registrar:

        async def register(name: str, job: dict[str, Path]) -> None:
            results[name] = await registrar.register(request_for(job))

        async def upload_done() -> None:
            results["done"] = await registrar.upload(jobs[2]["model"], f"s3://{bucket}/{done_key}")

        async def upload_cancelled() -> None:
            def cancel(event: ProgressEvent) -> None:
                cancelled.cancel()

            with cancelled:
                await registrar.upload(jobs[3]["model"], f"s3://{bucket}/{cancelled_key}", on_progress=cancel)
            results["cancelled"] = cancelled.cancelled_caught

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(register, "r1", jobs[0])
                tg.start_soon(upload_cancelled)
                tg.start_soon(register, "r2", jobs[1])
                tg.start_soon(upload_done)
    assert results["cancelled"] is True
    assert results["r1"].registration_id != results["r2"].registration_id
    assert results["done"].location.key == done_key
    left = await leftovers(s3, bucket, settings.s3_prefix)
    assert left in ([done_key], sorted([done_key, cancelled_key])), left
    await remove_all(s3, bucket, settings.s3_prefix)


# ---------------------------------------------------------------------------------------------
# Lifecycle misuse
# ---------------------------------------------------------------------------------------------


def every_call(registrar: Registrar, request: RegistrationRequest, model: Path, uri: str) -> dict[str, Any]:
    return {
        "register": lambda: registrar.register(request),
        "submit": lambda: registrar.submit(request),
        "upload": lambda: registrar.upload(model, uri),
        "check": lambda: registrar.check(request),
        "sweep": lambda: registrar.sweep(dry_run=True),
        "install_lifecycle": lambda: registrar.install_lifecycle(dry_run=True),
    }


async def test_a_registrar_never_entered_or_already_closed_refuses_every_call_and_writes_nothing(
    settings: Settings, s3: Any, tmp_path: Path
) -> None:
    """Every method of a registrar that was never entered, or that was closed, raises a
    `RuntimeError` at once (README: work on a closed registrar "raises `RuntimeError` saying the
    registrar was closed"); nothing is written."""
    job = make_job(tmp_path)
    uri = f"s3://{settings.s3_bucket}/{settings.s3_prefix}misuse.tar.gz"
    fresh = Registrar(settings)
    for name, call in every_call(fresh, request_for(job), job["model"], uri).items():
        with anyio.fail_after(10), pytest.raises(RuntimeError, match="async with") as caught:
            await call()
        assert "Registrar" in str(caught.value), name
    async with Registrar(settings) as closed:
        pass
    for name, call in every_call(closed, request_for(job), job["model"], uri).items():
        with anyio.fail_after(10), pytest.raises(RuntimeError, match="closed") as caught:
            await call()
        assert caught.type is RuntimeError, name
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_entering_a_registrar_twice_nested_after_exit_or_at_once_is_refused_and_the_first_works(
    settings: Settings, s3: Any, tmp_path: Path
) -> None:
    """README: "Entering it twice is a `RuntimeError`" -- nested inside its own block (which must
    not close the outer block's registrar), again after its exit, and from two tasks at once (one
    wins and registers)."""
    job = make_job(tmp_path)
    async with Registrar(settings) as registrar:
        with pytest.raises(RuntimeError, match="once"):
            async with registrar:
                pytest.fail("entered a second time")
        result = await registrar.register(request_for(job))
        assert result.model_id
    with pytest.raises(RuntimeError, match="once"):
        async with registrar:
            pytest.fail("entered again after its exit")

    shared = Registrar(settings)
    outcomes: list[str] = []

    async def enter_and_register() -> None:
        try:
            async with shared:
                await shared.register(request_for(job))
                outcomes.append("registered")
        except RuntimeError as exc:
            outcomes.append(f"refused: {exc}")

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(enter_and_register)
            tg.start_soon(enter_and_register)
    assert sorted(o.split(":")[0] for o in outcomes) == ["refused", "registered"], outcomes
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_handles_never_awaited_are_kept_and_named_at_exit_and_spent_afterwards(
    settings: Settings, s3: Any, stack: LocalStack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """README: "A handle never waited for is closed when the registrar exits: ... kept (and named
    in a warning and a `RegistrationKept` event)" if not final; `__aexit__` closes every handle,
    here with a callback that raises on each `RegistrationKept`.  Afterwards the handles are spent:
    `wait()` is a `RuntimeError` at once (no hang), `aclose()` a no-op."""
    job = make_job(tmp_path)
    caplog.set_level(logging.WARNING, logger="async_registrar")
    recorder = Recorder()

    def raising(event: ProgressEvent) -> None:
        recorder(event)
        if isinstance(event, RegistrationKept):
            raise RuntimeError("host bug while reporting a kept registration")

    with late_registry(stack) as registry:
        async with Registrar(on(settings, registry), on_progress=raising) as registrar:
            handles = [await registrar.submit(request_for(job)), await registrar.submit(request_for(job))]
        submitted = [e.registration_id for e in recorder.of(RegistrationSubmitted)]
        kept = recorder.of(RegistrationKept)
        assert len(submitted) == 2
        assert sorted(r.registration_id for e in kept for r in e.registrations) == sorted(submitted)
        for registration_id in submitted:
            assert [r for r in caplog.records if registration_id in r.getMessage() and r.levelno >= logging.WARNING]
        left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
        prefixes = [p for e in kept for p in keys_of(e.prefixes, settings.s3_bucket)]
        assert len(set(prefixes)) == 2
        assert sorted(k.rsplit("/", 1)[1] for k in left) == sorted(
            ["model.tar.gz", "payload.tar.gz", "registration.json"] * 2
        )
        assert all(any(k.startswith(p) for p in prefixes) for k in left), left
        for handle in handles:
            with anyio.fail_after(5), pytest.raises(RuntimeError):
                await handle.wait()
            with anyio.fail_after(5):
                await handle.aclose()
        assert registry.registration_count == 2
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def until_final(registry: Any, recorder: Recorder) -> None:
    """Wait until every registration the recorder saw submitted is final at the registry."""
    for event in recorder.of(RegistrationSubmitted):
        while (held := registry.registration(event.registration_id)) is None or held.status in UNFINISHED:
            await anyio.sleep(0.02)


async def test_leaving_by_cancellation_with_final_handles_never_awaited_leaves_nothing(
    settings: Settings, s3: Any, stack: LocalStack, tmp_path: Path
) -> None:
    """Handles never awaited whose registrations the registry has finished, and a host that
    leaves the block by a cancellation: the exit (its cleanup shielded and bounded) removes their
    objects, as README promises for a handle "final by then"."""
    job = make_job(tmp_path)
    recorder = Recorder()
    with late_registry(stack) as registry:
        with anyio.fail_after(60), anyio.CancelScope() as scope:
            async with Registrar(on(settings, registry), on_progress=recorder) as registrar:
                await registrar.submit(request_for(job))
                await registrar.submit(request_for(job))
                registry.finish_processing()
                await until_final(registry, recorder)
                scope.cancel()
                await anyio.sleep(30)
        assert scope.cancelled_caught
        assert recorder.of(RegistrationKept) == []
        assert len(recorder.of(CleanupFinished)) == 2
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_cancellation_during_the_exit_still_closes_every_handle(
    settings: Settings, s3: Any, stack: LocalStack, tmp_path: Path
) -> None:
    """Three handles never awaited (two final, one unfinished), and a host callback that cancels
    the block's scope as the exit reports its first `CleanupFinished`: the exit still closes every
    handle (README: `__aexit__` "closes every handle ... even when one cleanup fails"): the final
    ones removed, the unfinished one kept and named."""
    job = make_job(tmp_path)
    recorder = Recorder()
    with late_registry(stack) as registry:
        with anyio.fail_after(60), anyio.CancelScope() as scope:
            cancel_on_cleanup = recording_and_cancelling(recorder, scope, lambda e: isinstance(e, CleanupFinished))
            async with Registrar(on(settings, registry), on_progress=cancel_on_cleanup) as registrar:
                await registrar.submit(request_for(job))
                await registrar.submit(request_for(job))
                registry.finish_processing()
                await until_final(registry, recorder)
                registry.hold_processing()
                await registrar.submit(request_for(job))
            await anyio.sleep(30)
        assert scope.cancelled_caught
        submitted = [e.registration_id for e in recorder.of(RegistrationSubmitted)]
        assert len(submitted) == 3
        assert len(recorder.of(CleanupFinished)) == 2
        (kept,) = recorder.of(RegistrationKept)
        assert [r.registration_id for r in kept.registrations] == submitted[2:]
        await assert_kept_and_named(s3, settings, kept, registry)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_a_submit_cancelled_as_the_registry_accepts_keeps_and_names_what_it_never_returned(
    settings: Settings, s3: Any, stack: LocalStack, tmp_path: Path
) -> None:
    """`submit()` cancelled from its own callback on `RegistrationSubmitted`, before it returns
    the handle: the registry accepted, so (README, "the point of no return") the artifacts are kept
    and a `RegistrationKept` names the registration, though the host never got a handle."""
    job = make_job(tmp_path)
    recorder = Recorder()
    handle = None
    with late_registry(stack) as registry:
        async with Registrar(on(settings, registry), on_progress=recorder) as registrar:
            with anyio.fail_after(60), anyio.CancelScope() as scope:

                def cancel(event: ProgressEvent) -> None:
                    if isinstance(event, RegistrationSubmitted):
                        scope.cancel()

                handle = await registrar.submit(request_for(job), on_progress=cancel)
            assert scope.cancelled_caught
            assert handle is None
            (submitted,) = recorder.of(RegistrationSubmitted)
            (kept,) = recorder.of(RegistrationKept)
            assert [r.registration_id for r in kept.registrations] == [submitted.registration_id]
            await assert_kept_and_named(s3, settings, kept, registry)
        assert len(recorder.of(RegistrationKept)) == 1, "the exit reported the registration a second time"
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_two_registrars_sharing_one_s3_client_one_cancelled_the_other_finishes_and_the_client_survives(
    settings: Settings, s3: Any, tmp_path: Path
) -> None:
    """One S3 client injected into two registrars (README: `s3_client=` to use your own; the
    registrar leaves it open).  One registration is cancelled mid-upload and its registrar left
    first, while the other registers: "Cancelling one registration cancels only it and touches
    only its own temporary objects"; the host's client still works after both exits."""
    jobs = [make_job(tmp_path / "a", model_bytes=4 * MiB), make_job(tmp_path / "b", model_bytes=4 * MiB)]
    results: dict[str, Any] = {}
    other_uploading = anyio.Event()

    async def cancelled_one() -> None:
        async with Registrar(settings, s3_client=s3) as registrar:
            with anyio.CancelScope() as scope:

                def cancel(event: ProgressEvent) -> None:
                    if isinstance(event, UploadProgress) and other_uploading.is_set():
                        scope.cancel()

                await registrar.register(request_for(jobs[0]), on_progress=cancel)
            results["cancelled"] = scope.cancelled_caught

    async def finishing_one() -> None:
        def seen(event: ProgressEvent) -> None:
            if isinstance(event, UploadProgress):
                other_uploading.set()

        async with Registrar(settings, s3_client=s3) as registrar:
            results["finished"] = await registrar.register(request_for(jobs[1]), on_progress=seen)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(finishing_one)
            tg.start_soon(cancelled_one)
    assert results["cancelled"] is True
    assert results["finished"].model_id
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    await s3.head_bucket(Bucket=settings.s3_bucket)


async def test_a_registrar_dropped_without_being_closed_hangs_nothing_and_leaks_no_thread(
    settings: Settings, s3: Any, tmp_path: Path
) -> None:
    """A host that enters a registrar by hand, uploads, and drops it without `__aexit__` (its own
    event loop, in a thread): the docs say nothing, so: that loop still ends (no hang), no thread
    of it outlives the loop, no multipart upload is left open, and nothing is reported but (at
    most) a `ResourceWarning`."""
    job = make_job(tmp_path)
    key = f"{settings.s3_prefix}dropped/model.tar.gz"
    before = set(threading.enumerate())
    reported: list[str] = []

    def host() -> None:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            loop.set_exception_handler(lambda _, context: reported.append(f"loop: {context.get('message')}"))
            registrar = Registrar(settings)
            await registrar.__aenter__()
            await registrar.upload(job["model"], f"s3://{settings.s3_bucket}/{key}")
            del registrar

        asyncio.run(main())
        gc.collect()

    previous_hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: reported.append(f"unraisable: {unraisable.exc_value!r}")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            thread = threading.Thread(target=host, name="host-loop")
            thread.start()
            with anyio.fail_after(30):
                while thread.is_alive():
                    await anyio.sleep(0.02)
            gc.collect()
            with anyio.move_on_after(10):
                while threads_of_it(before):
                    await anyio.sleep(0.05)
    finally:
        sys.unraisablehook = previous_hook
    assert threads_of_it(before) == [], "threads outlive the dropped registrar's loop"
    assert not [w for w in caught if not issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]
    assert not [r for r in reported if "ResourceWarning" not in r], reported
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == [key]
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


def threads_of_it(before: set[threading.Thread]) -> list[str]:
    """Threads started since `before` and still alive, but the S3 server's per-request ones."""
    return [t.name for t in set(threading.enumerate()) - before if t.is_alive() and "process_request" not in t.name]


# ---------------------------------------------------------------------------------------------
# Host hygiene
# ---------------------------------------------------------------------------------------------

HOST_SCRIPT = r'''
import asyncio, faulthandler, gc, json, logging, os, resource, signal, socket, sys, threading

args = json.loads(sys.argv[1])
if args["configure_logging"]:
    logging.basicConfig(filename=args["log_file"], level=logging.DEBUG)


def handler(h):
    """A handler by identity (a repr can change with the state of the object it is bound to)."""
    return repr(h) if h is None or isinstance(h, signal.Handlers) else f"{type(h).__qualname__}@{id(h)}"


def snapshot():
    old_fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(old_fd)
    root = logging.getLogger()
    return {
        "signal handlers": {str(int(s)): handler(signal.getsignal(s)) for s in signal.valid_signals()
                            if s not in (signal.SIGKILL, signal.SIGSTOP)},
        "signal wakeup fd": old_fd,
        "root logger handlers": [repr(h) for h in root.handlers],
        "root logger level": root.level,
        "logging disabled": logging.root.manager.disable,
        "log record factory": repr(logging.getLogRecordFactory()),
        "logger class": repr(logging.getLoggerClass()),
        "gc enabled": gc.isenabled(),
        "gc frozen": gc.get_freeze_count(),
        "gc threshold": gc.get_threshold(),
        "switch interval": sys.getswitchinterval(),
        "recursion limit": sys.getrecursionlimit(),
        "environment": dict(os.environ),
        "sys.excepthook": repr(sys.excepthook),
        "threading.excepthook": repr(threading.excepthook),
        "sys.unraisablehook": repr(sys.unraisablehook),
        "stdout": repr(sys.stdout),
        "stderr": repr(sys.stderr),
        "cwd": os.getcwd(),
        "umask": os.umask(os.umask(0o022)),
        "open-file limit": resource.getrlimit(resource.RLIMIT_NOFILE),
        "socket default timeout": socket.getdefaulttimeout(),
        "faulthandler": faulthandler.is_enabled(),
        "sys.path": list(sys.path),
        "event loop policy": type(asyncio.get_event_loop_policy()).__name__,
    }


async def main():
    loop = asyncio.get_running_loop()
    before = snapshot()
    before["loop exception handler"] = repr(loop.get_exception_handler())
    before["loop debug"] = loop.get_debug()
    from pathlib import Path
    from pydantic import SecretStr
    import anyio
    from async_registrar import (
        InputError, Registrar, RegistrationKept, RegistrationRequest, RegistrationTimeout, Settings, UploadProgress,
    )

    settings = Settings(
        s3_bucket=args["bucket"], s3_prefix=args["prefix"], mims_endpoint=args["mims"],
        s3_endpoint_url=args["s3"], aws_region="us-west-2", aws_access_key_id=SecretStr(args["key"]),
        aws_secret_access_key=SecretStr(args["secret"]), part_size="5MiB", poll_initial=0.02, poll_max=0.2,
    )
    request = await RegistrationRequest.from_files(
        Path(args["config"]), Path(args["model"]), payload=Path(args["payload"])
    )
    outcomes = {}
    events = []
    async with Registrar(settings, on_progress=events.append) as registrar:
        outcomes["registered"] = (await registrar.register(request)).model_id
        try:
            await registrar.register(await RegistrationRequest.from_files(Path(args["config"]), Path(args["missing"])))
        except InputError as exc:
            outcomes["input error"] = type(exc).__name__
        with anyio.CancelScope() as scope:
            await registrar.register(request, on_progress=lambda e: isinstance(e, UploadProgress) and scope.cancel())
        outcomes["cancelled"] = scope.cancelled_caught
    async with Registrar(settings.model_copy(update={"wait_timeout": 0.001})) as registrar:
        try:
            await registrar.register(request)
        except RegistrationTimeout as exc:
            outcomes["timed out, kept"] = [k.kept_prefix for k in exc.kept]
    after = snapshot()
    after["loop exception handler"] = repr(loop.get_exception_handler())
    after["loop debug"] = loop.get_debug()
    changed = {k: [before[k], after[k]] for k in before if before[k] != after[k]}
    if "signal handlers" in changed:
        b, a = changed["signal handlers"]
        changed["signal handlers"] = {s: [b.get(s), a.get(s)] for s in set(b) | set(a) if b.get(s) != a.get(s)}
    return outcomes, changed


outcomes, changed = asyncio.run(main())
with open(args["report"], "w") as report:
    json.dump({"outcomes": outcomes, "changed": changed, "exited": False}, report)
'''


def run_host(stack: LocalStack, settings: Settings, tmp_path: Path, *, configure_logging: bool) -> dict[str, Any]:
    """Run HOST_SCRIPT in a fresh interpreter (a clean process state): a success, an input error,
    a cancellation and a wait timeout that keeps; return its report, stdout and stderr."""
    job = make_job(tmp_path)
    script = tmp_path / "host.py"
    script.write_text(HOST_SCRIPT)
    report = tmp_path / "report.json"
    log_file = tmp_path / "host.log"
    args = {
        "configure_logging": configure_logging,
        "log_file": str(log_file),
        "report": str(report),
        "bucket": settings.s3_bucket,
        "prefix": settings.s3_prefix,
        "mims": stack.mims_endpoint,
        "s3": stack.s3_endpoint,
        "key": ACCESS_KEY,
        "secret": SECRET_KEY,
        "config": str(job["config"]),
        "model": str(job["model"]),
        "payload": str(job["payload"]),
        "missing": str(tmp_path / "no-such-model"),
    }
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    process = subprocess.run(
        [sys.executable, str(script), json.dumps(args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert process.returncode == 0, process.stderr
    assert report.exists(), f"the host process ended before its report: {process.stderr}"
    return {
        **json.loads(report.read_text()),
        "stdout": process.stdout,
        "stderr": process.stderr,
        "log": log_file.read_text() if log_file.exists() else "",
    }


async def test_a_host_that_configures_logging_sees_no_output_and_no_process_state_changed(
    stack: LocalStack, settings: Settings, s3: Any, tmp_path: Path
) -> None:
    """README: the library "installs no signal handler, prints nothing and keeps no global
    state", "never configures logging", "leaves [the GIL switch interval] alone", reads no
    environment variable, and does not exit the process.  A host that sends logging to a file runs
    a success, an input error, a cancellation and a kept wait timeout: stdout and stderr stay
    empty, the process goes on to the end, and none of the process-wide state listed in
    `HOST_SCRIPT`'s snapshot changed."""
    report = await anyio.to_thread.run_sync(
        functools.partial(run_host, stack, settings, tmp_path, configure_logging=True)
    )
    outcomes = report["outcomes"]
    assert outcomes["registered"].startswith("model-")
    assert outcomes["input error"] == "InputError"
    assert outcomes["cancelled"] is True
    assert outcomes["timed out, kept"], outcomes
    assert report["changed"] == {}
    assert report["stdout"] == ""
    assert report["stderr"] == ""
    assert "async_registrar" in report["log"], "the library's log did not reach the host's handler"
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_a_host_that_configures_no_logging_gets_nothing_on_stderr(
    stack: LocalStack, settings: Settings, s3: Any, tmp_path: Path
) -> None:
    """README: the library "prints nothing" and "never configures logging".  A plain host
    (`asyncio.run`, no logging set up) registers, gets an input error, cancels, and has a
    registration kept by a wait timeout: nothing may appear on its stdout or stderr."""
    report = await anyio.to_thread.run_sync(
        functools.partial(run_host, stack, settings, tmp_path, configure_logging=False)
    )
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    assert report["outcomes"]["registered"].startswith("model-")
    assert report["changed"] == {}
    assert report["stdout"] == ""
    assert report["stderr"] == ""


async def test_environment_variables_changed_after_settings_are_built_have_no_effect(
    settings: Settings, s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: "`Settings(...)` is a plain object ...; `Settings.from_env()` is what the CLI uses.
    The library reads no environment variable on its own".  Every variable the command reads is
    set, to values that would change or break the run, after the settings are built: the
    registrations go where the settings say, as new registrations (no lineage, no key taken from
    the environment), with the same archive as before (no `SOURCE_DATE_EPOCH`, no compression
    level), no metadata from `PERFORMANCE_METADATA_PATH`, no message file written."""
    job = make_job(tmp_path)
    output_dir = tmp_path / "output"
    output_dir.mkdir()
    async with Registrar(settings) as registrar:
        baseline = await registrar.upload(
            job["model"], f"s3://{settings.s3_bucket}/{settings.s3_prefix}baseline/model.tar.gz"
        )
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)

    hostile = {
        "REGISTRAR_S3_BUCKET": "no-such-bucket-anywhere",
        "REGISTRAR_S3_PREFIX": "elsewhere/",
        "REGISTRAR_MIMS_ENDPOINT": "http://127.0.0.1:9",
        "REGISTRAR_WAIT_TIMEOUT": "0.001",
        "REGISTRAR_WAIT_TIMOUT": "1",
        "REGISTRAR_PART_SIZE": "1",
        "REGISTRAR_PREFLIGHT": "bogus",
        "REGISTRAR_PREFLIGHT_TIMEOUT": "0.001",
        "REGISTRAR_CLEANUP_TIMEOUT": "0.001",
        "REGISTRAR_COMPRESSION_LEVEL": "3",
        "REGISTRAR_COMPRESSION_MIN_SAVING": "0",
        "REGISTRAR_MAX_PARALLEL_UPLOADS": "0",
        "REGISTRAR_LOG_LEVEL": "bogus",
        "REGISTRAR_LOG_FORMAT": "bogus",
        "REGISTRAR_IDEMPOTENCY_KEY": "fixed-key-from-the-environment",
        "REGISTRAR_SWEEP_ON_START": "bogus",
        "REGISTRAR_OUTPUT_DIR": str(output_dir),
        "REGISTRAR_MODEL_PATH": str(tmp_path / "nothing-here"),
        "REGISTRAR_CONFIG_PATH": str(tmp_path / "nothing-here.json"),
        "MODS_WORKFLOW_EXECUTION_ID": "wf-from-the-environment",
        "PERFORMANCE_METADATA_PATH": "s3://no-such-bucket-anywhere/metadata.json",
        "SOURCE_DATE_EPOCH": "1700000000",
    }
    for name, value in hostile.items():
        monkeypatch.setenv(name, value)
    async with Registrar(settings) as registrar:
        first = await registrar.register(request_for(job))
        second = await registrar.register(request_for(job))
        with pytest.raises(InputError):
            await registrar.register(
                RegistrationRequest(
                    config=request_for(job).config, model_path=tmp_path / "missing-model", payload_path=None
                )
            )
    assert first.registration_id != second.registration_id
    assert not first.registrations[0].resumed
    assert not second.registrations[0].resumed
    for result in (first, second):
        artifact = result.model_artifact
        assert artifact.location.bucket == settings.s3_bucket
        assert artifact.location.key.startswith(settings.s3_prefix)
        assert artifact.sha256 == baseline.sha256
        assert artifact.size == baseline.size
    assert list(output_dir.iterdir()) == []
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


# ---------------------------------------------------------------------------------------------
# A host keeping the shared thread pools busy
# ---------------------------------------------------------------------------------------------


async def test_registrations_finish_while_the_host_holds_all_of_anyios_default_thread_tokens(
    settings: Settings, s3: Any, tmp_path: Path
) -> None:
    """README: the registrar's blocking work runs on its own thread tokens, "never on anyio's
    process-wide 40: ... a host application busy with `to_thread` [cannot] starve" it.  With all
    40 tokens held by blocked `anyio.to_thread.run_sync` calls, a registration, an upload and a
    check run at once and finish."""
    jobs = [make_job(tmp_path / name) for name in ("reg", "up", "check")]
    limiter = anyio.to_thread.current_default_thread_limiter()
    release = threading.Event()
    results: dict[str, Any] = {}
    async with Registrar(settings) as registrar, anyio.create_task_group() as host:
        for _ in range(int(limiter.total_tokens)):
            host.start_soon(functools.partial(anyio.to_thread.run_sync, release.wait, abandon_on_cancel=True))
        try:
            with anyio.fail_after(10):
                while limiter.borrowed_tokens < limiter.total_tokens:
                    await anyio.sleep(0.01)
            assert limiter.available_tokens == 0

            async def register() -> None:
                results["register"] = await registrar.register(request_for(jobs[0]))

            async def upload() -> None:
                results["upload"] = await registrar.upload(
                    jobs[1]["model"], f"s3://{settings.s3_bucket}/{settings.s3_prefix}busy/model.tar.gz"
                )

            async def check() -> None:
                results["check"] = await registrar.check(request_for(jobs[2]))

            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(register)
                    tg.start_soon(upload)
                    tg.start_soon(check)
            assert limiter.available_tokens == 0, "the host's blockers were released early"
        finally:
            release.set()
    assert results["register"].model_id
    assert results["upload"].size > 0
    assert results["check"].artifacts
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == [f"{settings.s3_prefix}busy/model.tar.gz"]
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_a_registration_finishes_while_the_host_fills_asyncios_default_executor(
    settings: Settings, s3: Any, tmp_path: Path
) -> None:
    """README: "a host application busy with `to_thread`" cannot starve a registrar.  An asyncio
    host's `asyncio.to_thread` (the loop's default executor) is as common as anyio's: with its
    workers all blocked, a registration (about a second on its own here) still finishes, or at
    worst fails within its `preflight_timeout` (2 s) naming what it waited for."""
    job = make_job(tmp_path)
    outcome = ""
    async with default_executor_filled():
        with anyio.move_on_after(6):
            async with Registrar(settings.model_copy(update={"preflight_timeout": 2.0})) as registrar:
                try:
                    outcome = (await registrar.register(request_for(job))).model_id
                except RegistrarError as exc:
                    outcome = f"{type(exc).__name__}: {exc}"
    assert outcome, "register() neither returned nor raised within 6 s"
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
