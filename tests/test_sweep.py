"""The sweep: what SIGKILL leaves behind is removed, what a running registration reads is not.

Real parts: the CLI in subprocesses killed with SIGKILL, the moto server (through a fault
proxy where timing matters), the reference MIMS over HTTP; every assertion on what is left
uses ListObjectsV2 and ListMultipartUploads (`leftovers`).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from async_registrar import ConfigurationError, Registrar, Settings
from async_registrar._lifecycle import rule_id
from async_registrar._local import LocalStack

from .conftest import MiB, final_status, late_registry, leftovers, make_job, remove_all
from .fault_proxy import FaultProxy, Stall
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
    with late_registry(stack, processing_delay=6) as registry:
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

        with FaultProxy(stack.s3_endpoint, slow_deletes) as stalled:
            kill_when(start({**base, "AWS_ENDPOINT_URL_S3": stalled.endpoint}), "cleaning up the temporary objects")
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


@pytest.mark.timeout(300)
async def test_two_thousand_stale_runs_are_swept_in_one_call(settings: Settings, s3: Any) -> None:
    """Paginated listing (1,000 keys a page), DeleteObjects batches of 1,000, several at once."""
    prefix = settings.s3_prefix
    limiter = anyio.CapacityLimiter(32)

    async def put(index: int) -> None:
        async with limiter:
            for name in ("model.tar.gz", "registration.json.partial"):
                await s3.put_object(Bucket=settings.s3_bucket, Key=f"{prefix}run-{index:04d}/a1/{name}", Body=b"x")

    async with anyio.create_task_group() as tg:
        for index in range(2000):
            tg.start_soon(put, index)
    started = time.monotonic()
    async with Registrar(settings) as registrar:
        report = await registrar.sweep(older_than=0)
    took = time.monotonic() - started
    assert len(report.removed) == 2000
    assert report.objects_removed == 4000
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
    assert "refuses an empty prefix" in result.stderr
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
