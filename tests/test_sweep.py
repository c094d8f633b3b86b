"""The sweep: what SIGKILL leaves behind is removed, what a running registration reads is not.

Real parts: the CLI in subprocesses killed with SIGKILL, the moto server (through a fault
proxy where timing matters), the reference MIMS over HTTP; every assertion on what is left
uses ListObjectsV2 and ListMultipartUploads (`leftovers`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from async_registrar import ConfigurationError, Registrar, Settings
from async_registrar._lifecycle import rule_id
from async_registrar._local import LocalStack
from async_registrar._request import new_run_id

from .conftest import (
    MiB,
    final_status,
    kept_by_a_timeout,
    late_registry,
    leftovers,
    make_job,
    on,
    remove_all,
    request_for,
)
from .fault_proxy import FaultProxy, Hold, Reply, Stall, s3_error
from .test_cli import environment, run
from .test_signals import start


def slow_parts(seconds: float) -> Callable[[str, str], object]:
    """A proxy rule that holds every UploadPart for `seconds` (a slow link)."""

    def rule(method: str, target: str) -> object:
        return Stall(seconds) if method == "PUT" and "partNumber=" in target else None

    return rule


def kill_when(process: subprocess.Popen[str], needle: str, timeout: float = 30) -> str:
    """SIGKILL the process once `needle` shows on its stderr; return what it printed."""
    assert process.stderr is not None
    seen = []
    deadline = time.monotonic() + timeout
    for line in process.stderr:
        seen.append(line)
        if needle in line:
            process.send_signal(signal.SIGKILL)
            process.communicate(timeout=10)
            return "".join(seen)
        if time.monotonic() > deadline:
            break
    process.kill()
    process.communicate(timeout=10)
    raise AssertionError(f"{needle!r} never appeared:\n{''.join(seen)}")


def run_prefixes(keys: list[str], prefix: str) -> set[str]:
    """The run prefixes ({group}/{attempt}) the keys (and 'upload:' entries) belong to."""
    return {"/".join(k.removeprefix("upload:").removeprefix(prefix).split("/")[:2]) for k in keys}


async def test_sigkill_leftovers_are_swept_and_a_running_registration_is_spared(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """SIGKILL during the upload (parts in flight), after the registry accepted (still running),
    and during the cleanup: `sweep --older-than 0s` removes the first and the last, spares the
    running one (naming it); once it is final, a second sweep removes it too."""
    prefix = settings.s3_prefix
    # Held (late_registry), but for the registration of 2., which must finish by itself: 3.'s stays
    # unfinished through its kill and the first sweep, however slow the machine.
    with late_registry(stack) as registry:
        base = environment(stack, settings, make_job(tmp_path, model_bytes=12 * MiB))
        base["REGISTRAR_MIMS_ENDPOINT"] = registry.endpoint

        # 1. During the upload, parts held in flight by a slow link.
        with FaultProxy(stack.s3_endpoint, slow_parts(30)) as slow:
            process = start({**base, "AWS_ENDPOINT_URL_S3": slow.endpoint})
            deadline = time.monotonic() + 30
            while slow.count("PUT", "partNumber=") < 2 and time.monotonic() < deadline:
                await anyio.sleep(0.05)
            process.send_signal(signal.SIGKILL)
            process.communicate(timeout=10)
        during_upload = await leftovers(s3, settings.s3_bucket, prefix)
        assert any(k.startswith("upload:") for k in during_upload), during_upload

        # 2. During the cleanup after SUCCEEDED: every delete and abort stalls.
        def slow_deletes(method: str, target: str) -> object:
            return Stall(30) if method == "DELETE" else None

        registry.finish_processing()
        with FaultProxy(stack.s3_endpoint, slow_deletes) as stalled:
            kill_when(start({**base, "AWS_ENDPOINT_URL_S3": stalled.endpoint}), "cleaning up the temporary objects")
        registry.hold_processing()  # that registration is SUCCEEDED (the run said so): the next one is held
        after_cleanup = await leftovers(s3, settings.s3_bucket, prefix)
        assert len(run_prefixes(after_cleanup, prefix)) == 2, after_cleanup

        # 3. After the registry accepted, while the registration runs.
        printed = kill_when(start({**base, "MODS_WORKFLOW_EXECUTION_ID": "sweep-running"}), "submitted: registration")
        registration_id = re.findall(r"submitted: registration (reg-\w+)", printed)[0]
        everything = await leftovers(s3, settings.s3_bucket, prefix)
        running = run_prefixes(everything, prefix) - run_prefixes(after_cleanup, prefix)
        assert len(running) == 1, everything

        swept = run(base, "sweep", "--older-than", "0s")
        assert swept.returncode == 0, swept.stderr
        assert "3 run(s) seen, 2 removed, 1 spared" in swept.stdout, swept.stdout
        assert f"registration {registration_id} (" in swept.stdout
        assert "the registry reports it" in swept.stdout
        left = await leftovers(s3, settings.s3_bucket, prefix)
        assert run_prefixes(left, prefix) == running, left

        registry.finish_processing()
        assert await final_status(registry, registration_id, timeout=30) == "SUCCEEDED"
        again = run(base, "sweep", "--older-than", "0s")
        assert again.returncode == 0, again.stderr
        assert "1 run(s) seen, 1 removed, 0 spared" in again.stdout, again.stdout
    assert await leftovers(s3, settings.s3_bucket, prefix) == []


async def test_a_sweep_leaves_a_young_run_that_is_uploading_alone(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """A registration uploading (parts held 3 s) while a sweep with a 10-minute threshold runs:
    it is seen, judged young, untouched, and the registration succeeds."""
    env = environment(stack, settings, make_job(tmp_path, model_bytes=12 * MiB))
    with FaultProxy(stack.s3_endpoint, slow_parts(3)) as slow:
        process = start({**env, "AWS_ENDPOINT_URL_S3": slow.endpoint})
        deadline = time.monotonic() + 30
        while slow.count("PUT", "partNumber=") < 1 and time.monotonic() < deadline:
            await anyio.sleep(0.05)
        async with Registrar(settings) as registrar:
            report = await registrar.sweep(older_than=600)
        stdout, stderr = process.communicate(timeout=60)
    assert [r.outcome for r in report.runs] == ["young"]
    assert report.removed == ()
    assert process.returncode == 0, stderr
    assert len(stdout.splitlines()) == 2
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


RUNS = 1001


@pytest.mark.timeout(300)
async def test_a_thousand_and_one_stale_runs_are_swept_in_one_call(settings: Settings, s3: Any) -> None:
    """Paginated listing (1,000 keys a page: 2,002 keys are three pages), DeleteObjects batches
    of 1,000 (1,000, 1,000 and 2), several at once."""
    prefix = settings.s3_prefix
    limiter = anyio.CapacityLimiter(32)

    async def put(index: int) -> None:
        async with limiter:
            for name in ("model.tar.gz", "registration.json.partial"):
                await s3.put_object(Bucket=settings.s3_bucket, Key=f"{prefix}run-{index:04d}/a1/{name}", Body=b"x")

    async with anyio.create_task_group() as tg:
        for index in range(RUNS):
            tg.start_soon(put, index)
    started = time.monotonic()
    async with Registrar(settings) as registrar:
        report = await registrar.sweep(older_than=0)
    took = time.monotonic() - started
    assert len(report.removed) == RUNS
    assert report.objects_removed == 2 * RUNS
    assert report.leftovers == ()
    assert took < 60, took
    assert await leftovers(s3, settings.s3_bucket, prefix) == []


async def test_dry_run_removes_nothing_and_keys_outside_the_layout_are_left_alone(settings: Settings, s3: Any) -> None:
    prefix = settings.s3_prefix
    await s3.put_object(Bucket=settings.s3_bucket, Key=f"{prefix}run-abc/a1/model.tar.gz", Body=b"x" * 10)
    await s3.put_object(Bucket=settings.s3_bucket, Key=f"{prefix}notes.txt", Body=b"mine")
    await s3.put_object(Bucket=settings.s3_bucket, Key="elsewhere/run-abc/a1/model.tar.gz", Body=b"x")
    async with Registrar(settings) as registrar:
        dry = await registrar.sweep(older_than=0, dry_run=True)
        assert [r.outcome for r in dry.runs] == ["removed"]
        assert dry.bytes_freed == 10
        assert "would be removed" in "\n".join(dry.lines())
        assert len(await leftovers(s3, settings.s3_bucket, prefix)) == 2
        real = await registrar.sweep(older_than=0)
    assert real.objects_removed == 1
    assert real.not_runs == (f"{prefix}notes.txt",)
    assert await leftovers(s3, settings.s3_bucket, prefix) == [f"{prefix}notes.txt"]
    await s3.delete_object(Bucket=settings.s3_bucket, Key=f"{prefix}notes.txt")
    assert (await s3.get_object(Bucket=settings.s3_bucket, Key="elsewhere/run-abc/a1/model.tar.gz"))["ContentLength"]
    await s3.delete_object(Bucket=settings.s3_bucket, Key="elsewhere/run-abc/a1/model.tar.gz")


def test_an_empty_prefix_is_refused(tmp_path: Path, stack: LocalStack, settings: Settings) -> None:
    job = make_job(tmp_path)
    env = environment(stack, settings, job, REGISTRAR_S3_PREFIX="/")
    result = run(env, "sweep", "--older-than", "0s")
    assert result.returncode == 2, result.stderr
    assert "REGISTRAR_S3_PREFIX: is empty" in result.stderr
    bad = run(environment(stack, settings, job), "sweep", "--older-than", "soon")
    assert bad.returncode == 2
    assert "is not a duration" in bad.stderr


async def test_the_library_refuses_an_empty_prefix(settings: Settings) -> None:
    async with Registrar(settings.model_copy(update={"s3_prefix": ""})) as registrar:
        with pytest.raises(ConfigurationError, match="empty prefix"):
            await registrar.sweep(older_than=0)


async def test_the_lifecycle_rule_is_merged_and_installed_once(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    bucket = f"lifecycle-{os.getpid()}-{time.monotonic_ns() % 100000}"
    await s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
    unrelated = {
        "ID": "logs-expire",
        "Filter": {"Prefix": "logs/"},
        "Status": "Enabled",
        "Expiration": {"Days": 30},
    }
    await s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": [unrelated]})
    env = environment(stack, settings, make_job(tmp_path), REGISTRAR_S3_BUCKET=bucket)
    for _ in range(2):
        result = run(env, "sweep", "--install-lifecycle")
        assert result.returncode == 0, result.stderr
        assert '"DaysAfterInitiation": 1' in result.stdout
    rules = (await s3.get_bucket_lifecycle_configuration(Bucket=bucket))["Rules"]
    assert sorted(r["ID"] for r in rules) == sorted(["logs-expire", rule_id(settings.s3_prefix)])
    ours = next(r for r in rules if r["ID"] == rule_id(settings.s3_prefix))
    assert ours["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}
    assert ours["Expiration"]["Days"] == 7
    assert ours["NoncurrentVersionExpiration"]["NoncurrentDays"] == 7  # a versioned bucket's deleted objects
    await s3.delete_bucket_lifecycle(Bucket=bucket)
    await s3.delete_bucket(Bucket=bucket)


async def test_sweep_on_start_removes_stale_runs_before_the_first_registration(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REGISTRAR_SWEEP_ON_START: the registrar sweeps once, before its first registration (the
    threshold lowered to 0 here: moto's objects are all new)."""
    from async_registrar import _registrar

    from .conftest import request_for

    monkeypatch.setattr(_registrar, "SWEEP_ON_START_AGE", 0.0)
    stale = f"{settings.s3_prefix}run-stale/a1/model.tar.gz"
    await s3.put_object(Bucket=settings.s3_bucket, Key=stale, Body=b"x")
    async with Registrar(on_start := settings.model_copy(update={"sweep_on_start": True})) as registrar:
        assert on_start.sweep_on_start
        result = await registrar.register(request_for(make_job(tmp_path)))
    assert result.model_id.startswith("model-")
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


def test_sweep_is_in_the_help() -> None:
    result = run({"PATH": "/usr/bin:/bin"}, "sweep", "--help")
    assert result.returncode == 0
    assert "--older-than" in result.stdout
    assert "--install-lifecycle" in result.stdout


async def test_a_sweep_that_cannot_read_a_manifest_spares_the_run(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """A kept run (registration unfinished) whose manifest the sweep cannot read (403 AccessDenied:
    a cleanup role without s3:GetObject) is spared until --max-age, not taken for a run without
    a manifest: the registration still reads it."""
    request = request_for(make_job(tmp_path), workflow_execution_id="wf-adv-sweep-unreadable")

    def manifest_denied(method: str, target: str) -> object:
        return s3_error(403, "AccessDenied") if method == "GET" and "registration.json" in target else None

    with late_registry(stack) as registry:
        timed_out = await kept_by_a_timeout(on(settings, registry), request)
        (kept,) = timed_out.kept
        with FaultProxy(stack.s3_endpoint, manifest_denied) as proxy:
            async with Registrar(on(settings, registry, s3_endpoint_url=proxy.endpoint)) as registrar:
                report = await registrar.sweep(older_than=0)
            assert proxy.count("GET", "registration.json") >= 1
        left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
        registry.finish_processing()
        status = await final_status(registry, kept.registration_id)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    assert status == "SUCCEEDED", (status, report.lines(), left)
    assert [r.outcome for r in report.runs] == ["spared"], report.lines()
    assert len(left) == 3, left


async def test_a_sweep_does_not_remove_a_run_a_rerun_took_over_meanwhile(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """A sweep judges a kept run whose registration ended FAILED (its question to the registry is
    slow); meanwhile a re-run of the lineage makes a new registration (generation 2) from what
    that run left.  The new registration must succeed: the sweep lists again before it removes,
    and the re-run works in a prefix of its own."""
    request = request_for(make_job(tmp_path), workflow_execution_id="wf-adv-sweep-race")
    with late_registry(stack) as registry, FaultProxy(registry.endpoint, lambda m, t: None) as proxy:
        # One endpoint for all (a sweep asks only the registry the manifest names); the proxy
        # makes the sweep's question about the old registration slow, and nothing else.
        through = on(settings, registry, mims_endpoint=proxy.endpoint)
        timed_out = await kept_by_a_timeout(through, request)
        (kept,) = timed_out.kept
        model_key = f"{kept.kept_prefix}model.tar.gz".removeprefix(f"s3://{settings.s3_bucket}/")
        await s3.delete_object(Bucket=settings.s3_bucket, Key=model_key)  # so that it ends FAILED
        registry.finish_processing()
        assert (await final_status(registry, kept.registration_id)).startswith("FAILED")
        registry.hold_processing()  # the registrations to come are held again

        held, release = hold_first_question(proxy, kept.registration_id)
        reports: list[Any] = []

        async def sweep() -> None:
            async with Registrar(through) as registrar:
                reports.append(await registrar.sweep(older_than=0))

        async with anyio.create_task_group() as tg:
            tg.start_soon(sweep)
            try:
                with anyio.fail_after(20):  # the sweep has listed and read the manifest: it asks now
                    while held[0] == 0:
                        await anyio.sleep(0.01)
                async with Registrar(through) as registrar:
                    handle = await registrar.submit(request)  # resumes: generation 2, from the kept artifacts
                    (accepted,) = handle.accepted
                    await handle.aclose()  # kept: the registration is unfinished
                resubmitted_before_the_sweep_ended = not reports
            finally:
                release.set()  # the sweep's question goes on (well within its 30 s look-up deadline)
        outcomes = [r.outcome for r in reports[0].runs]
        left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
        registry.finish_processing()
        status = await final_status(registry, accepted.registration_id)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    assert resubmitted_before_the_sweep_ended
    assert accepted.registration_id != kept.registration_id
    assert status == "SUCCEEDED", (status, outcomes, left)


async def test_a_sweep_gives_a_just_accepted_registration_the_registrys_grace(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """`sweep --older-than 0s` right after a run was kept, against a registry that does not know a
    registration for a moment after accepting it: within NOT_FOUND_GRACE of the acceptance the
    run is spared (as `MimsClient.look_up` waits), and the registration succeeds."""
    request = request_for(make_job(tmp_path), workflow_execution_id="wf-adv-sweep-404")
    with late_registry(stack) as registry, FaultProxy(registry.endpoint, lambda m, t: None) as proxy:
        through = on(settings, registry, mims_endpoint=proxy.endpoint)
        timed_out = await kept_by_a_timeout(through, request)
        (kept,) = timed_out.kept
        not_found = [1]

        def forgetful(method: str, target: str) -> object:
            if method == "GET" and kept.registration_id in target and not_found[0] > 0:
                not_found[0] -= 1
                return Reply(404, b'{"message": "no such registration"}', "Not Found")
            return None

        proxy.rule = forgetful
        async with Registrar(through) as registrar:
            report = await registrar.sweep(older_than=0)
        left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
        registry.finish_processing()
        status = await final_status(registry, kept.registration_id)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    assert status == "SUCCEEDED", (status, [r.outcome for r in report.runs], left)


async def test_a_run_that_changes_while_the_sweep_judges_it_is_spared(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """A run the sweep would remove (its registration SUCCEEDED) gets a new object while the sweep
    asks the registry about it (slow): the sweep lists again before it removes, sees the change
    and spares the run for the next sweep, whatever wrote there."""
    request = request_for(make_job(tmp_path), workflow_execution_id="wf-sweep-changed")
    with late_registry(stack) as registry, FaultProxy(registry.endpoint, lambda m, t: None) as proxy:
        through = on(settings, registry, mims_endpoint=proxy.endpoint)
        timed_out = await kept_by_a_timeout(through, request)
        (kept,) = timed_out.kept
        registry.finish_processing()
        assert await final_status(registry, kept.registration_id) == "SUCCEEDED"
        asked, release = hold_first_question(proxy, kept.registration_id)
        reports: list[Any] = []

        async def sweep() -> None:
            async with Registrar(through) as registrar:
                reports.append(await registrar.sweep(older_than=0))

        added = f"{kept.kept_prefix}late.json".removeprefix(f"s3://{settings.s3_bucket}/")
        async with anyio.create_task_group() as tg:
            tg.start_soon(sweep)
            try:
                with anyio.fail_after(20):
                    while asked[0] == 0:
                        await anyio.sleep(0.01)
                await s3.put_object(Bucket=settings.s3_bucket, Key=added, Body=b"{}")
            finally:
                release.set()  # the sweep gets its answer only once the object was added
        (report,) = reports
        (run,) = report.runs
        assert run.outcome == "spared", report.lines()
        assert "changed while the sweep judged it" in run.reason
        assert len(await leftovers(s3, settings.s3_bucket, settings.s3_prefix)) == 4
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


def hold_first_question(proxy: FaultProxy, registration_id: str) -> tuple[list[int], threading.Event]:
    """Hold the first question about `registration_id` (through `proxy`) on its way to the
    registry until the test sets the returned event; the returned counter says how many questions
    were held (0 or 1).  Held, not stalled for a time: the test does what it must do meanwhile
    however slow the machine, then releases it."""
    held = [0]
    release = threading.Event()

    def rule(method: str, target: str) -> object:
        if method == "GET" and registration_id in target and held[0] == 0:
            held[0] += 1
            return Hold(release)
        return None

    proxy.rule = rule
    return held, release


async def test_the_lifecycle_rule_dry_run_writes_nothing(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """`sweep --install-lifecycle --dry-run` prints the rule it would install and names the rule it
    would replace, exit 0, and leaves the bucket's lifecycle configuration as it was (none, or
    the old one)."""
    bucket = f"lifecycle-dry-{os.getpid()}-{time.monotonic_ns() % 100000}"
    await s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
    env = environment(stack, settings, make_job(tmp_path), REGISTRAR_S3_BUCKET=bucket)
    try:
        fresh = run(env, "sweep", "--install-lifecycle", "--dry-run")
        assert fresh.returncode == 0, fresh.stderr
        with pytest.raises(s3.exceptions.ClientError, match="NoSuchLifecycleConfiguration"):
            await s3.get_bucket_lifecycle_configuration(Bucket=bucket)
        assert '"DaysAfterInitiation": 1' in fresh.stdout
        said = f"dry run: nothing written; the lifecycle rule for s3://{bucket}/{settings.s3_prefix} would be added"
        assert said in fresh.stderr, fresh.stderr

        installed = run(env, "sweep", "--install-lifecycle")
        assert installed.returncode == 0, installed.stderr
        before = (await s3.get_bucket_lifecycle_configuration(Bucket=bucket))["Rules"]
        changed = run(env, "sweep", "--install-lifecycle", "--dry-run", "--abort-after-days", "3")
        assert changed.returncode == 0, changed.stderr
        assert (await s3.get_bucket_lifecycle_configuration(Bucket=bucket))["Rules"] == before
        assert '"DaysAfterInitiation": 3' in changed.stdout
        (replacing,) = [line for line in changed.stderr.splitlines() if "dry run: nothing written" in line]
        (ours,) = [r for r in before if r["ID"] == rule_id(settings.s3_prefix)]
        assert json.loads(replacing.split(" would replace ", 1)[1]) == ours, replacing
        assert ours["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}
    finally:
        with contextlib.suppress(Exception):
            await s3.delete_bucket_lifecycle(Bucket=bucket)
        await s3.delete_bucket(Bucket=bucket)


async def test_a_default_sweep_spares_a_just_started_run_whatever_its_uploads_initiated_says(
    tmp_path: Path, settings: Settings, s3: Any
) -> None:
    """moto says every multipart upload was initiated on 2010-11-10: a run with nothing but an
    open upload under a fresh attempt prefix (its first part in flight) must still be young to a
    default (24 h) sweep, by the start time in its prefix name; so must one whose name is in the
    future (clock skew).  A run whose name and upload are old is removed; an old-named run with
    a new object is young, as before.  The sweep before a registration spares the fresh one too."""
    bucket, prefix = settings.s3_bucket, settings.s3_prefix
    now = dt.datetime.now(dt.UTC)

    def attempt(at: dt.datetime) -> str:
        return f"{at:%Y%m%dT%H%M%SZ}-{secrets.token_hex(6)}"

    fresh = f"{prefix}run-{secrets.token_hex(4)}/{new_run_id()}/"
    future = f"{prefix}run-{secrets.token_hex(4)}/{attempt(now + dt.timedelta(hours=1))}/"
    stale = f"{prefix}run-{secrets.token_hex(4)}/{attempt(now - dt.timedelta(days=3))}/"
    touched = f"{prefix}run-{secrets.token_hex(4)}/{attempt(now - dt.timedelta(days=3))}/"
    try:
        for run_prefix in (fresh, future, stale):
            await s3.create_multipart_upload(Bucket=bucket, Key=f"{run_prefix}model.tar.gz")
        await s3.put_object(Bucket=bucket, Key=f"{touched}model.tar.gz", Body=b"x")
        uploads = (await s3.list_multipart_uploads(Bucket=bucket, Prefix=fresh))["Uploads"]
        # What this reproduces: the server reports the fresh upload as older than the threshold.
        assert [now - u["Initiated"] > dt.timedelta(days=1) for u in uploads] == [True], uploads
        async with Registrar(settings) as registrar:
            report = await registrar.sweep()
        outcomes = {r.prefix.removeprefix(f"s3://{bucket}/"): r.outcome for r in report.runs}
        assert outcomes == {fresh: "young", future: "young", stale: "removed", touched: "young"}, report.lines()
        assert {"upload:" + k for k in (f"{fresh}model.tar.gz", f"{future}model.tar.gz")} <= set(
            await leftovers(s3, bucket, prefix)
        )

        async with Registrar(settings.model_copy(update={"sweep_on_start": True})) as registrar:
            await registrar.register(request_for(make_job(tmp_path)))
        assert f"upload:{fresh}model.tar.gz" in await leftovers(s3, bucket, prefix)
    finally:
        await remove_all(s3, bucket, prefix)
