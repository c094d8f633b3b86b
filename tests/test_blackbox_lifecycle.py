"""Black-box acceptance tests for issue 12, "An accepted registration is never lost".

Written against the public API and the CLI only: the point of no return is the registry's
2xx to the POST; after it, only a final status removes the run's objects, every other exit
keeps them and says so, and a re-run with the same lineage id resumes instead of registering
again.  The registries here read the artifacts only when a registration finishes
(`read_artifacts="at_finish"`), so a run that loses or deletes them is caught by a FAILED.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import async_registrar
from async_registrar import (
    AcceptedRegistration,
    ConfigurationError,
    ProgressEvent,
    Registrar,
    RegistrarError,
    RegistrationInterrupted,
    RegistrationKept,
    RegistrationRejected,
    RegistrationRequest,
    RegistrationResult,
    RegistrationStatusChanged,
    RegistrationSubmitted,
    RegistrationTimeout,
    Settings,
    UploadProgress,
)
from async_registrar._local import LocalStack
from async_registrar.reference_mims import ThreadedMimsServer

from .conftest import (
    Recorder,
    final_status,
    kept_by_a_timeout,
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
from .fault_proxy import RESET, FaultProxy, Stall
from .test_cli import environment, run, run_releasing
from .test_signals import start, wait_for

# --- helpers ------------------------------------------------------------------------------------


KEPT = ["model.tar.gz", "payload.tar.gz", "registration.json"]


async def resumed_to_the_end(
    settings: Settings,
    request: RegistrationRequest,
    registration_id: str,
    registry: ThreadedMimsServer,
    on_progress: Callable[[ProgressEvent], None] | None = None,
) -> RegistrationResult:
    """A re-run follows `registration_id`: no upload, no second registration, SUCCEEDED (a registration
    `registry` holds unfinished is let finish once the re-run follows it)."""
    seen = Recorder()
    count = registry.registration_count
    async with Registrar(settings, on_progress=release_when_submitted(registry, seen)) as registrar:
        result = await registrar.register(request, on_progress=on_progress)
    assert result.registration_id == registration_id
    assert all(r.resumed for r in result.registrations)
    assert seen.of(UploadProgress) == []
    assert registry.registration_count == count
    assert registry.registration(registration_id).status == "SUCCEEDED"  # type: ignore[union-attr]
    return result


def cli_environment(stack: LocalStack, settings: Settings, job: dict[str, Path], **extra: str) -> dict[str, str]:
    """What a registration job is given, nothing more."""
    return environment(stack, settings, job, **extra)


#: The time a log line starts with (HH:MM:SS).
STAMP = re.compile(r"^(\d\d):(\d\d):(\d\d) ", re.MULTILINE)


def cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run(env, "register", *args, timeout=timeout)


async def named_as_kept(stderr: str, registry: ThreadedMimsServer, lineage: str, s3: Any, settings: Settings) -> str:
    """The stderr names the registration, its model id, region, the s3:// prefix kept and how to resume."""
    ids = set(re.findall(r"\breg-\w+", stderr))
    assert len(ids) == 1, stderr
    (registration_id,) = ids
    held = registry.registration(registration_id)
    assert held is not None, stderr
    assert held.model_id in stderr
    assert "us-west-2" in stderr
    kept = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    assert sorted(k.rsplit("/", 1)[1] for k in kept) == KEPT, kept
    (directory,) = {k.rsplit("/", 1)[0] for k in kept}
    assert f"s3://{settings.s3_bucket}/{directory}/" in stderr, stderr
    assert f"MODS_WORKFLOW_EXECUTION_ID={lineage}" in stderr
    return registration_id


async def manifest_of(s3: Any, settings: Settings, kept: AcceptedRegistration) -> dict[str, Any]:
    assert kept.manifest_uri is not None
    key = kept.manifest_uri.removeprefix(f"s3://{settings.s3_bucket}/")
    answer = await s3.get_object(Bucket=settings.s3_bucket, Key=key)
    async with answer["Body"] as body:
        return json.loads(await body.read())  # type: ignore[no-any-return]


# --- library: cancelled at different moments after the point of no return ---------------------------


async def test_cancelled_inside_the_submitted_callback_keeps_an_accepted_manifest(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Cancelled the instant the 2xx is reported: kept, the manifest already says accepted, the re-run resumes."""
    request = request_for(make_job(tmp_path), workflow_execution_id="bb-at-submit")
    seen = Recorder()
    with late_registry(stack) as registry:
        with anyio.CancelScope() as scope:

            def cancel_on_submit(event: ProgressEvent) -> None:
                seen(event)
                if isinstance(event, RegistrationSubmitted):
                    scope.cancel()

            async with Registrar(on(settings, registry), on_progress=cancel_on_submit) as registrar:
                await registrar.register(request)
        assert scope.cancelled_caught
        (event,) = seen.of(RegistrationKept)
        (kept,) = event.registrations
        assert kept.registration_id == seen.of(RegistrationSubmitted)[0].registration_id
        assert event.prefixes == (kept.kept_prefix,)
        assert "MODS_WORKFLOW_EXECUTION_ID=bb-at-submit" in event.resume_hint
        assert await names_under(s3, settings) == KEPT
        manifest = await manifest_of(s3, settings, kept)
        assert manifest["state"] == "accepted"
        assert manifest["registration"]["registration_id"] == kept.registration_id
        await resumed_to_the_end(on(settings, registry), request, kept.registration_id, registry)
        assert registry.registration_count == 1
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_interrupted_three_times_then_resumed_is_still_one_registration(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Timeout, timeout again on the re-run, then a deadline-scope cancellation: one id, one prefix, no upload."""
    request = request_for(make_job(tmp_path), workflow_execution_id="bb-thrice")
    # Unfinished through all three interruptions (a 3 s delay ran out before the third on a
    # slow run, which then rightly removed the artifacts); let finish once the resume follows it.
    with late_registry(stack) as registry:
        first = await kept_by_a_timeout(on(settings, registry), request)
        (kept,) = first.kept
        assert isinstance(first, RegistrationInterrupted)

        again = Recorder()
        async with Registrar(on(settings, registry, wait_timeout=0.3), on_progress=again) as registrar:
            with pytest.raises(RegistrationTimeout) as second:
                await registrar.register(request)
        assert [(k.registration_id, k.kept_prefix, k.manifest_uri) for k in second.value.kept] == [
            (kept.registration_id, kept.kept_prefix, kept.manifest_uri)
        ]
        assert second.value.resume_hint is not None
        assert again.of(UploadProgress) == []
        assert [e.resumed for e in again.of(RegistrationSubmitted)] == [True]

        third = Recorder()
        with anyio.CancelScope() as deadline:

            def cancel_once_following(event: ProgressEvent) -> None:
                third(event)
                if isinstance(event, RegistrationSubmitted):  # it follows the kept one: stop it now
                    deadline.cancel()

            async with Registrar(on(settings, registry), on_progress=cancel_once_following) as registrar:
                await registrar.register(request)
        assert deadline.cancelled_caught
        (event,) = third.of(RegistrationKept)
        assert [k.registration_id for k in event.registrations] == [kept.registration_id]
        assert event.prefixes == (kept.kept_prefix,)
        assert third.of(UploadProgress) == []
        assert await names_under(s3, settings) == KEPT
        assert registry.registration_count == 1

        await resumed_to_the_end(on(settings, registry), request, kept.registration_id, registry)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_rerun_after_the_kept_registration_already_succeeded(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Cancelled in the wait; the registry finishes; the re-run (its callback raising) returns that and cleans."""
    request = request_for(make_job(tmp_path), workflow_execution_id="bb-late-rerun")
    seen = Recorder()
    # Held (late_registry) until the cancelled run's kept artifacts are checked: a run that saw it
    # final before its cancellation would rightly remove them.
    with late_registry(stack) as registry:
        with anyio.CancelScope() as deadline:

            def cancel_in_the_wait(event: ProgressEvent) -> None:
                seen(event)
                if isinstance(event, RegistrationStatusChanged):
                    deadline.cancel()

            async with Registrar(on(settings, registry), on_progress=cancel_in_the_wait) as registrar:
                await registrar.register(request)
        assert deadline.cancelled_caught
        (submitted,) = seen.of(RegistrationSubmitted)
        assert [k.registration_id for e in seen.of(RegistrationKept) for k in e.registrations] == [
            submitted.registration_id
        ]
        assert await names_under(s3, settings) == KEPT
        registry.finish_processing()
        assert await final_status(registry, submitted.registration_id) == "SUCCEEDED"  # its artifacts were there
        raised: list[str] = []

        def broken(event: ProgressEvent) -> None:
            raised.append(type(event).__name__)
            raise RuntimeError("a broken progress bar")

        result = await resumed_to_the_end(
            on(settings, registry), request, submitted.registration_id, registry, on_progress=broken
        )
        assert "RegistrationSubmitted" in raised
        assert "CleanupFinished" in raised
        assert result.model_id == submitted.model_id
        assert result.workflow_execution_arn == submitted.workflow_execution_arn
        assert result.leftovers == ()
        assert registry.registration_count == 1
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


# --- library: re-runs that overlap or differ --------------------------------------------------------


async def test_two_concurrent_reruns_of_one_kept_registration(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Two re-runs at once with the same lineage and inputs: both follow the kept one, neither registers again."""
    request = request_for(make_job(tmp_path), workflow_execution_id="bb-twin-reruns")
    # Held (late_registry) past the timeout and until both re-runs follow it; then it finishes
    # while both wait for it.
    with late_registry(stack) as registry:
        timed_out = await kept_by_a_timeout(on(settings, registry), request)
        (kept,) = timed_out.kept
        results: list[RegistrationResult] = []
        uploads = Recorder()
        both_follow = release_when_submitted(registry, uploads, count=2)

        async def rerun() -> None:
            async with Registrar(on(settings, registry), on_progress=both_follow) as registrar:
                results.append(await registrar.register(request))

        async with anyio.create_task_group() as tg:
            tg.start_soon(rerun)
            tg.start_soon(rerun)
        assert [r.registration_id for r in results] == [kept.registration_id] * 2
        assert uploads.of(UploadProgress) == []
        assert registry.registration_count == 1
        assert await final_status(registry, kept.registration_id) == "SUCCEEDED"
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_two_identical_first_runs_at_once_lose_no_accepted_registration(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """The same inputs and lineage submitted twice at once: whatever the registry accepted ends SUCCEEDED."""
    request = request_for(make_job(tmp_path), workflow_execution_id="bb-same-twice")
    seen = Recorder()
    outcomes: list[RegistrationResult | BaseException] = []
    with late_registry(stack, processing_delay=1.0) as registry:
        async with Registrar(on(settings, registry), on_progress=seen) as registrar:

            async def register() -> None:
                try:
                    outcomes.append(await registrar.register(request))
                except RegistrarError as error:
                    outcomes.append(error)

            async with anyio.create_task_group() as tg:
                tg.start_soon(register)
                tg.start_soon(register)
        accepted = {e.registration_id for e in seen.of(RegistrationSubmitted)}
        assert accepted
        for registration_id in accepted:
            assert await final_status(registry, registration_id) == "SUCCEEDED", registration_id
        results = [o for o in outcomes if isinstance(o, RegistrationResult)]
        assert results, outcomes
        assert registry.registration_count == len(accepted) == 1
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_changed_config_in_the_same_lineage_leaves_the_kept_run_resumable(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Kept run A; run B (other owner, same lineage) registers anew without touching A; A then resumes."""
    job = make_job(tmp_path)
    first = request_for(job, workflow_execution_id="bb-config-change")
    other = make_job(tmp_path / "other", config=registration_config(model_owner="another-team"))
    second = request_for({**job, "config": other["config"]}, workflow_execution_id="bb-config-change")
    # Held (late_registry): A unfinished through its timeout and B's look at the lineage, upload and
    # submission (B must leave it alone, not take it for final); from there both may finish.
    with late_registry(stack) as registry:
        timed_out = await kept_by_a_timeout(on(settings, registry), first)
        (kept,) = timed_out.kept
        async with Registrar(on(settings, registry), on_progress=release_when_submitted(registry)) as registrar:
            changed = await registrar.register(second)
        assert not changed.registrations[0].resumed
        assert changed.registration_id != kept.registration_id
        assert registry.registration_count == 2
        assert await final_status(registry, kept.registration_id) == "SUCCEEDED"  # B did not delete A's objects
        assert await names_under(s3, settings) == KEPT  # A's, still there for its re-run
        await resumed_to_the_end(on(settings, registry), first, kept.registration_id, registry)
        assert registry.registration_count == 2
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_rerun_cancelled_at_any_moment_before_its_wait_never_removes_the_kept_artifacts(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """A re-run cancelled while each of its S3 requests is held, then at growing delays: the kept stay."""
    request = request_for(make_job(tmp_path), workflow_execution_id="bb-scan")
    # Unfinished for the whole scan (about 10 s here, 30 s and more on a busy machine): a re-run
    # that sees it final would rightly remove the artifacts. Let finish once the resume follows it.
    with late_registry(stack) as registry:
        async with Registrar(on(settings, registry, wait_timeout=0.2)) as registrar:
            with pytest.raises(RegistrationTimeout) as caught:
                await registrar.register(request)
        (kept,) = caught.value.kept

        async def cancelled_rerun(s3_endpoint: str, ready: Callable[[], bool]) -> Recorder:
            seen = Recorder()
            async with Registrar(on(settings, registry, s3_endpoint_url=s3_endpoint), on_progress=seen) as registrar:
                with anyio.CancelScope() as scope:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(registrar.register, request)
                        with anyio.fail_after(5):
                            while not (ready() or seen.of(RegistrationSubmitted)):
                                await anyio.sleep(0.002)
                        scope.cancel()
            return seen

        reached_the_wait = False
        for held in range(12):  # hold the re-run's request number `held` and cancel while it hangs
            count = [0]

            def hold(method: str, target: str, count: list[int] = count, held: int = held) -> object:
                count[0] += 1
                return Stall(5) if count[0] == held + 1 else None

            with FaultProxy(stack.s3_endpoint, hold) as proxy:
                seen = await cancelled_rerun(proxy.endpoint, lambda proxy=proxy, held=held: len(proxy.seen) > held)
                where = proxy.seen[held] if len(proxy.seen) > held else "its wait"
            assert await names_under(s3, settings) == KEPT, f"a re-run cancelled at {where} removed the kept artifacts"
            assert seen.of(UploadProgress) == []
            if seen.of(RegistrationSubmitted):
                reached_the_wait = True
                break
        assert reached_the_wait

        started = [0.0]
        for step in range(40):  # then by time, from the very start to its wait
            delay = step * 0.01
            started[0] = anyio.current_time()
            seen = await cancelled_rerun(
                stack.s3_endpoint, lambda delay=delay: anyio.current_time() - started[0] >= delay
            )
            assert await names_under(s3, settings) == KEPT, f"a re-run cancelled after {delay:.2f} s removed them"
            if seen.of(RegistrationSubmitted):
                break
        assert registry.registration(kept.registration_id).status == "IN_PROGRESS"  # type: ignore[union-attr]
        assert registry.registration_count == 1
        await resumed_to_the_end(on(settings, registry), request, kept.registration_id, registry)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_rerun_cancelled_while_it_asks_the_registry_says_what_it_kept(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """A re-run cancelled while the registry answers its status request late: kept, and a RegistrationKept says so."""
    request = request_for(make_job(tmp_path), workflow_execution_id="bb-ask")
    try:
        with late_registry(stack) as registry:  # held past the timeout and the cancelled re-run
            async with Registrar(on(settings, registry, wait_timeout=0.2)) as registrar:
                with pytest.raises(RegistrationTimeout) as caught:
                    await registrar.register(request)
            (kept,) = caught.value.kept
            slow_polls = lambda method, target: Stall(3) if method == "GET" else None  # noqa: E731
            with FaultProxy(registry.endpoint, slow_polls) as slow:
                seen = Recorder()
                async with Registrar(
                    on(settings, registry, mims_endpoint=slow.endpoint), on_progress=seen
                ) as registrar:
                    with anyio.CancelScope() as scope:
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(registrar.register, request)
                            with anyio.fail_after(5):
                                while not slow.count("GET", kept.registration_id):
                                    await anyio.sleep(0.005)
                            scope.cancel()
            assert await names_under(s3, settings) == KEPT
            registry.finish_processing()
            assert await final_status(registry, kept.registration_id) == "SUCCEEDED"
            (event,) = seen.of(RegistrationKept)
            assert [k.registration_id for k in event.registrations] == [kept.registration_id]
            assert event.prefixes == (kept.kept_prefix,)
    finally:
        await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


# --- cleanup bounded; several regions -------------------------------------------------------------


async def test_after_success_a_stalled_cleanup_is_bounded_and_reported(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """SUCCEEDED, then S3 stalls every request: the result comes within cleanup_timeout + 1 s, with leftovers."""
    finished_at: list[float] = []
    stalling = lambda method, target: Stall(30) if finished_at else None  # noqa: E731

    def watch(event: ProgressEvent) -> None:
        if isinstance(event, RegistrationStatusChanged) and event.status == "SUCCEEDED":
            finished_at.append(anyio.current_time())

    timeout = 1.5
    with FaultProxy(stack.s3_endpoint, stalling) as proxy, mims_server(stack) as registry:
        slow = on(settings, registry, s3_endpoint_url=proxy.endpoint, cleanup_timeout=timeout)
        async with Registrar(slow, on_progress=watch) as registrar:
            result = await registrar.register(request_for(make_job(tmp_path), workflow_execution_id="bb-stall"))
            returned = anyio.current_time()
        assert finished_at
        assert returned - finished_at[0] <= timeout + 1, f"{returned - finished_at[0]:.1f} s"
        run_prefix = result.model_artifact.uri.rsplit("/", 1)[0] + "/"
        assert result.leftovers, "nothing was removed, yet no leftovers are reported"
        assert all(item.startswith(run_prefix) for item in result.leftovers), result.leftovers
        assert registry.registration(result.registration_id).status == "SUCCEEDED"  # type: ignore[union-attr]
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_one_region_rejected_one_unfinished_keeps_only_the_accepted_region(
    tmp_path: Path, settings: Settings, stack: LocalStack, regional_s3: dict[str, Any]
) -> None:
    """eu-west-1 rejected, us-west-2 unfinished at the timeout: only it is kept and named; one region per POST."""
    regions = ["us-west-2", "eu-west-1"]
    job = make_job(tmp_path, config=registration_config(model_registration_region=regions))
    request = request_for(job, workflow_execution_id="bb-mixed-regions")
    bodies: list[dict[str, Any]] = []

    async def record(outgoing: httpx.Request) -> None:
        if outgoing.method == "POST":
            bodies.append(json.loads(outgoing.content))

    with late_registry(stack, reject_regions=["eu-west-1"]) as registry:  # held past the timeout
        regional = on(settings, registry, s3_bucket="registrar-mr-{region}")
        async with (
            httpx.AsyncClient(event_hooks={"request": [record]}) as http,
            Registrar(regional.model_copy(update={"wait_timeout": 0.3}), http_client=http) as registrar,
        ):
            with pytest.raises(RegistrarError) as caught:
                await registrar.register(request)
        error = caught.value
        assert {b["model_registration_region"] for b in bodies} >= set(regions)
        assert all(isinstance(b["model_registration_region"], str) for b in bodies)
        (kept,) = error.kept
        assert kept.region == "us-west-2"
        assert kept.kept_prefix is not None
        assert kept.kept_prefix.startswith(f"s3://registrar-mr-us-west-2/{settings.s3_prefix}")
        assert kept.registration_id in str(error) + "".join(getattr(error, "__notes__", []))
        assert error.resume_hint is not None
        assert await leftovers(regional_s3["eu-west-1"], "registrar-mr-eu-west-1", settings.s3_prefix) == []
        assert len(await leftovers(regional_s3["us-west-2"], "registrar-mr-us-west-2", settings.s3_prefix)) == 3
        registry.finish_processing()
        assert await final_status(registry, kept.registration_id) == "SUCCEEDED"

        with pytest.raises(RegistrationRejected) as again:
            async with Registrar(regional) as registrar:
                await registrar.register(request)
        assert [(r.region, r.registration_id, r.status) for r in again.value.registrations] == [
            ("us-west-2", kept.registration_id, "SUCCEEDED")
        ]
        assert registry.registration_count == 1
    for region in regions:
        assert await leftovers(regional_s3[region], f"registrar-mr-{region}", settings.s3_prefix) == []


# --- the CLI ----------------------------------------------------------------------------------------


async def test_cli_registry_unreachable_until_the_deadline_exits_6_and_a_rerun_resumes(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """Every poll reset: exit 6, everything named; the re-run (registry back) uploads nothing and prints the lines."""
    job = make_job(tmp_path)
    # Every poll of the registration (the preflight's probe, before the upload, gets through).
    resets = lambda method, target: RESET if method == "GET" and "/preflight-" not in target else None  # noqa: E731
    with late_registry(stack) as registry:  # held until the re-run follows it
        with FaultProxy(registry.endpoint, resets) as broken:
            env = cli_environment(
                stack, settings, job, REGISTRAR_MIMS_ENDPOINT=broken.endpoint, MODS_WORKFLOW_EXECUTION_ID="bb-cli-6"
            )
            result = cli(env, "--wait-timeout", "1")
        assert result.returncode == 6, result.stderr
        assert result.stdout == ""
        registration_id = await named_as_kept(result.stderr, registry, "bb-cli-6", s3, settings)

        uploads = lambda method, target: None  # noqa: E731
        with FaultProxy(stack.s3_endpoint, uploads) as watched:
            env.update(REGISTRAR_MIMS_ENDPOINT=registry.endpoint, AWS_ENDPOINT_URL_S3=watched.endpoint)
            again = run_releasing(env, registry, "register")
            archive_writes = watched.count("PUT", ".tar.gz") + watched.count("POST", ".tar.gz")
        assert again.returncode == 0, again.stderr
        lines = again.stdout.splitlines()
        assert len(lines) == 2, again.stdout
        assert lines[1].endswith(registry.registration(registration_id).model_id)  # type: ignore[union-attr]
        assert archive_writes == 0
        assert registry.registration_count == 1
        assert registry.registration(registration_id).status == "SUCCEEDED"  # type: ignore[union-attr]
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_cli_a_rerun_while_the_registry_is_unreachable_exits_6_at_its_wait_timeout(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """Kept (exit 6); the re-run finds the registry unreachable: exit 6 at --wait-timeout, the registration named."""
    job = make_job(tmp_path)
    try:
        with late_registry(stack) as registry:  # held past the first run's --wait-timeout and the re-run
            env = cli_environment(
                stack,
                settings,
                job,
                REGISTRAR_MIMS_ENDPOINT=registry.endpoint,
                MODS_WORKFLOW_EXECUTION_ID="bb-cli-away",
            )
            first = cli(env, "--wait-timeout", "0.5")
            assert first.returncode == 6, first.stderr
            registration_id = await named_as_kept(first.stderr, registry, "bb-cli-away", s3, settings)
            with FaultProxy(registry.endpoint, lambda method, target: RESET) as away:
                env["REGISTRAR_MIMS_ENDPOINT"] = away.endpoint
                # A hang guard, not the measure: the whole subprocess (interpreter start-up, S3
                # look-ups, then the 1 s wait) on a loaded machine. That it stopped at the wait's
                # deadline is what its stderr says; a re-run retrying an unreachable registry
                # without a deadline never ends, and hits this.
                try:
                    again = cli(env, "--wait-timeout", "1", timeout=60)
                except subprocess.TimeoutExpired:
                    pytest.fail("the re-run was still retrying the registry 60 s in, with --wait-timeout 1")
            assert again.returncode == 6, again.stderr
            said = f"error: registration {registration_id} did not finish within 1 s (last status: PENDING); "
            assert said + "the registry stayed unreachable until then" in again.stderr, again.stderr
            # From its first log line to its last, on its own clock (to the second; start-up not
            # counted): the look-up and the wait, each bounded by --wait-timeout 1, take ~2 s. 15 s
            # is slack for a loaded machine, still below any other deadline a regression would
            # apply (the 30 s preflight and request timeouts, the 300 s submit timeout).
            stamps = [int(h) * 3600 + int(m) * 60 + int(s) for h, m, s in STAMP.findall(again.stderr)]
            assert (stamps[-1] - stamps[0]) % 86400 <= 15, again.stderr
            assert registration_id == await named_as_kept(again.stderr, registry, "bb-cli-away", s3, settings)
            registry.finish_processing()
            assert await final_status(registry, registration_id) == "SUCCEEDED"
    finally:
        await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_cli_sigterm_then_a_rerun_after_the_registration_succeeded(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """SIGTERM during the wait: 143, kept and named; the registry finishes; the re-run prints that result, exit 0."""
    job = make_job(tmp_path)
    with late_registry(stack) as registry:  # held until the signalled run's kept artifacts are checked
        env = cli_environment(
            stack, settings, job, REGISTRAR_MIMS_ENDPOINT=registry.endpoint, MODS_WORKFLOW_EXECUTION_ID="bb-cli-term"
        )
        process = start(env)
        seen: list[str] = []
        wait_for(process, "submitted:", seen)
        before = "".join(seen)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
        assert process.returncode == 143, before + stderr
        assert stdout == ""
        registration_id = await named_as_kept(stderr, registry, "bb-cli-term", s3, settings)
        registry.finish_processing()
        assert await final_status(registry, registration_id) == "SUCCEEDED"

        again = cli(env)
        assert again.returncode == 0, again.stderr
        lines = again.stdout.splitlines()
        assert len(lines) == 2, again.stdout
        assert lines[1].endswith(registry.registration(registration_id).model_id)  # type: ignore[union-attr]
        assert registry.registration_count == 1
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_cli_sigint_during_the_wait_with_s3_stalled_exits_promptly_and_keeps(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """S3 stalls everything once accepted; SIGINT: exit 130 within REGISTRAR_CLEANUP_TIMEOUT + 1 s, nothing deleted."""
    job = make_job(tmp_path)
    stalled = {"on": False}
    rule = lambda method, target: Stall(30) if stalled["on"] else None  # noqa: E731
    timeout = 2.0
    # Held (late_registry) until the interrupted run's kept artifacts are checked.
    with late_registry(stack) as registry, FaultProxy(stack.s3_endpoint, rule) as proxy:
        env = cli_environment(
            stack,
            settings,
            job,
            AWS_ENDPOINT_URL_S3=proxy.endpoint,
            REGISTRAR_MIMS_ENDPOINT=registry.endpoint,
            REGISTRAR_CLEANUP_TIMEOUT=str(timeout),
            MODS_WORKFLOW_EXECUTION_ID="bb-cli-int",
        )
        process = start(env)
        seen: list[str] = []
        wait_for(process, "submitted:", seen)
        before = "".join(seen)
        stalled["on"] = True
        sent = time.monotonic()
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
        took = time.monotonic() - sent
        assert process.returncode == 130, before + stderr
        assert took <= timeout + 1, f"{took:.1f} s"
        registration_id = await named_as_kept(stderr, registry, "bb-cli-int", s3, settings)
        registry.finish_processing()
        assert await final_status(registry, registration_id) == "SUCCEEDED"
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


# --- API surface ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"wait_timeout": 0},
        {"cleanup_timeout": -1},
        {"compression_level": 99},
        {"mims_endpoint": "registry.example.com"},
        {"s3_bucket": "UPPER_case"},
    ],
    ids=lambda bad: next(iter(bad)),
)
def test_bad_settings_raise_configuration_error_and_the_types_are_public(bad: dict[str, Any]) -> None:
    """Settings(...) with a bad value is a ConfigurationError naming the field; the issue's types are exported."""
    with pytest.raises(ConfigurationError) as caught:
        Settings(**{"s3_bucket": "fine-bucket", "mims_endpoint": "http://127.0.0.1:9", **bad})
    assert any(next(iter(bad)) in problem for problem in caught.value.problems)
    for name in (
        "Registration",
        "S3Location",
        "AcceptedRegistration",
        "RegistrationKept",
        "RegistrationInterrupted",
        "IdempotencyConflict",
        "RegistrationResult",
        "RegionRegistration",
        "UploadedArtifact",
    ):
        assert name in async_registrar.__all__
        assert isinstance(getattr(async_registrar, name), type)
    assert issubclass(RegistrationTimeout, RegistrationInterrupted)
    assert issubclass(async_registrar.IdempotencyConflict, RegistrarError)
