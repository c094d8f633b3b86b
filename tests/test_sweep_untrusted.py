"""`sweep` treats what it finds under the prefix as untrusted input.

The bucket may be shared, its objects corrupt, hand-edited, written by another version or
malicious.  Whatever it finds, a sweep must not crash (a documented exit code, no traceback),
must not remove what a registration may still read (in doubt: spare, and say why), must ask no
host but the configured registry, and must stay bounded in time and memory.

Real parts: moto S3 and the reference MIMS on loopback (the session's `stack`), the CLI in
subprocesses, `FaultProxy` in front of the registry where its answers are the fault.  Manifests
are written by hand (as a person, another version or an attacker would), in runs whose attempt
names carry no time, so that `--older-than 0s` judges them at once.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from async_registrar import Registrar, Settings
from async_registrar._errors import redact
from async_registrar._local import REGION, LocalStack

from .conftest import leftovers, make_job, remove_all
from .fault_proxy import FaultProxy, Reply, Stall
from .test_cli import environment, run

NOT_FOUND = b'{"message": "no such registration"}'


def manifest(
    settings: Settings,
    *,
    registration_id: str | None = "reg-untrusted",
    status: str = "IN_PROGRESS",
    region: str = REGION,
    endpoint: str | None = None,
    updated_at: str | None = None,
) -> dict[str, Any]:
    """A run manifest as a run writes it once the registry accepted (a plain dict, to be bent)."""
    stamp = updated_at or (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat()
    return {
        "format": 1,
        "state": "accepted" if registration_id is not None else "submitting",
        "group": "run-untrusted",
        "attempt": "a1",
        "region": region,
        "regions": [region],
        "endpoint": endpoint if endpoint is not None else redact(settings.endpoint_for(region)),
        "workflow_execution_id": "wf-untrusted",
        "idempotency_key": "key-untrusted",
        "generation": 1,
        "artifacts": {
            "model": {
                "s3_uri": f"s3://{settings.s3_bucket}/{settings.s3_prefix}run-untrusted/a1/model.tar.gz",
                "size_bytes": 1,
                "sha256": "0" * 64,
            }
        },
        "registration": None
        if registration_id is None
        else {
            "registration_id": registration_id,
            "model_id": "model-untrusted",
            "workflow_execution_arn": "arn:aws:states:us-west-2:0:execution:x:y",
            "status": status,
        },
        "created_at": stamp,
        "updated_at": stamp,
    }


async def put_run(s3: Any, settings: Settings, group: str, body: bytes | None) -> str:
    """A run `{group}/a1/` with an artifact and (unless None) `body` as its manifest; its key prefix."""
    where = f"{settings.s3_prefix}{group}/a1/"
    await s3.put_object(Bucket=settings.s3_bucket, Key=f"{where}model.tar.gz", Body=b"m")
    if body is not None:
        await s3.put_object(Bucket=settings.s3_bucket, Key=f"{where}registration.json", Body=body)
    return where


async def sweep_with(settings: Settings, **options: Any) -> Any:
    async with Registrar(settings) as registrar:
        return await registrar.sweep(**{"older_than": 0, **options})


def outcome_of(report: Any, where: str) -> Any:
    (found,) = [r for r in report.runs if r.prefix.endswith("/" + where)]
    return found


async def test_manifests_that_are_not_ours_spare_their_runs_until_max_age_and_say_why(
    settings: Settings, s3: Any
) -> None:
    """Not JSON, truncated, a list, 100k-deep nesting, format 2, an unknown status, 3 MiB: spared, named."""
    good = json.dumps(manifest(settings)).encode()
    bodies = {
        "run-notjson": b"\x00\xff garbage, not json",
        "run-truncated": good[: len(good) // 2],
        "run-list": b"[1, 2, 3]",
        "run-deep": b"[" * 100_000 + b"]" * 100_000,
        "run-newer": json.dumps({**manifest(settings), "format": 2}).encode(),
        "run-status": json.dumps(
            {**manifest(settings), "registration": {**manifest(settings)["registration"], "status": "PAUSED"}}
        ).encode(),
        "run-huge": b" " * (3 * 1024 * 1024) + good,
        "run-empty": b"",
    }
    wheres = {group: await put_run(s3, settings, group, body) for group, body in bodies.items()}
    started = time.monotonic()
    report = await sweep_with(settings)
    took = time.monotonic() - started
    lines = "\n".join(report.lines())
    try:
        for group, where in wheres.items():
            run_ = outcome_of(report, where)
            assert run_.outcome == "spared", (group, lines)
            assert "manifest" in run_.reason, (group, run_.reason)
            assert "max-age" in run_.reason, (group, run_.reason)
            assert f"spared s3://{settings.s3_bucket}/{where}" in lines
        assert "too large" in outcome_of(report, wheres["run-huge"]).reason
        assert len(await leftovers(s3, settings.s3_bucket, settings.s3_prefix)) == 2 * len(bodies)
        assert took < 10, took
        # Past --max-age nothing proves a registration: removed.
        aged = await sweep_with(settings, max_age=0)
        assert {r.outcome for r in aged.runs} == {"removed"}, aged.lines()
        assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    finally:
        await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_a_manifest_with_extra_fields_is_read_and_its_running_registration_spared(
    settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Fields a newer version adds are ignored; the registry (here: IN_PROGRESS) is asked."""
    registration = {
        "registration_id": "reg-extra",
        "model_id": "model-x",
        "workflow_execution_arn": "arn:aws:states:us-west-2:0:execution:x:y",
        "status": "IN_PROGRESS",
    }

    def running(method: str, target: str) -> object:
        if method == "GET" and target.endswith("/v1/registrations/reg-extra"):
            return Reply(200, json.dumps(registration).encode(), "OK")
        return None

    with FaultProxy(stack.mims_endpoint, running) as proxy:
        through = settings.model_copy(update={"mims_endpoint": proxy.endpoint})
        body = {**manifest(through, registration_id="reg-extra"), "future_field": {"a": [1, 2]}, "tags": None}
        where = await put_run(s3, settings, "run-extra", json.dumps(body).encode())
        try:
            report = await sweep_with(through)
            run_ = outcome_of(report, where)
            assert (run_.outcome, run_.status) == ("spared", "IN_PROGRESS"), report.lines()
            assert proxy.count("GET", "/v1/registrations/reg-extra") >= 1
        finally:
            await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


def test_a_manifest_with_a_timestamp_without_offset_does_not_crash_the_cli_sweep(
    tmp_path: Path, stack: LocalStack, settings: Settings
) -> None:
    """A manifest's `updated_at` without a UTC offset: `sweep` ends with 0 or 4, no traceback."""

    async def setup() -> None:
        from pydantic import SecretStr

        from async_registrar._local import ACCESS_KEY, SECRET_KEY
        from async_registrar._s3 import make_session, open_s3_client

        session = make_session(SecretStr(ACCESS_KEY), SecretStr(SECRET_KEY))
        async with open_s3_client(session, region=REGION, endpoint_url=stack.s3_endpoint) as s3:
            naive = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).replace(tzinfo=None).isoformat()
            # The reference MIMS does not know this id: a contract 404, past the grace.
            await put_run(s3, settings, "run-naive", json.dumps(manifest(settings, updated_at=naive)).encode())

    anyio.run(setup)
    result = run(environment(stack, settings, make_job(tmp_path)), "sweep", "--older-than", "0s")
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.returncode in (0, 4), (result.returncode, result.stderr[-2000:])


async def test_a_404_page_that_is_not_the_registrys_does_not_get_a_kept_run_removed(
    settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """An ingress's HTML 404 (service down behind it) is no answer about the registration: spared."""

    def ingress_404(method: str, target: str) -> object:
        return Reply(404, b"<html><body>404 page not found</body></html>", "Not Found") if method == "GET" else None

    with FaultProxy(stack.mims_endpoint, ingress_404) as proxy:
        through = settings.model_copy(update={"mims_endpoint": proxy.endpoint})
        where = await put_run(s3, settings, "run-ingress", json.dumps(manifest(through)).encode())
        try:
            report = await sweep_with(through)
            assert proxy.count("GET", "/v1/registrations/reg-untrusted") >= 1
            assert outcome_of(report, where).outcome == "spared", report.lines()
            spared = [line for line in report.lines() if line.startswith("spared ")]
            assert spared, report.lines()
            assert all("registration reg-untrusted: " in line for line in spared), spared  # no "(None)"
        finally:
            await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


@pytest.mark.parametrize("registration_id", ["..", "."])
async def test_a_registration_id_made_of_dots_asks_no_other_url(
    registration_id: str, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """A manifest naming registration '..' or '.' makes the sweep ask no other URL than
    /v1/registrations/<id> (it asks none: no registry names a registration so), and spares it."""
    with FaultProxy(stack.mims_endpoint, lambda m, t: None) as proxy:
        through = settings.model_copy(update={"mims_endpoint": proxy.endpoint})
        body = json.dumps(manifest(through, registration_id=registration_id)).encode()
        where = await put_run(s3, settings, "run-dots", body)
        try:
            report = await sweep_with(through)
            asked = [t for m, t in proxy.seen if m == "GET"]
            assert all(t.startswith("/v1/registrations/") for t in asked), asked
            assert all(len(t) > len("/v1/registrations/") for t in asked), asked
            assert outcome_of(report, where).outcome == "spared", report.lines()
        finally:
            await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_registration_ids_with_path_characters_stay_one_encoded_segment(
    settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """Ids holding '../', '?', '#', spaces, '%' and unicode are asked as one percent-encoded segment."""
    ids = ["../../admin", "a?b=c#d", "with space", "100%", "régistration/ü", "reg-x/../reg-y"]
    with FaultProxy(stack.mims_endpoint, lambda m, t: Reply(404, NOT_FOUND, "Not Found")) as proxy:
        through = settings.model_copy(update={"mims_endpoint": proxy.endpoint})
        for index, registration_id in enumerate(ids):
            body = json.dumps(manifest(through, registration_id=registration_id)).encode()
            await put_run(s3, settings, f"run-id{index}", body)
        try:
            report = await sweep_with(through, dry_run=True)
            asked = sorted(t for m, t in proxy.seen if m == "GET")
            assert len(asked) == len(ids), asked
            for target in asked:
                segment = target.removeprefix("/v1/registrations/")
                assert target.startswith("/v1/registrations/"), target
                assert segment, target
                assert not set("/?# ") & set(segment), target
            assert len(report.runs) == len(ids)
        finally:
            await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_a_manifest_region_cannot_steer_a_templated_endpoint_to_another_host(
    settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """A forged `region` of 'x@127.0.0.1:<port>/?' sends no request to that port."""
    with FaultProxy(stack.mims_endpoint, lambda m, t, h: Reply(404, NOT_FOUND, "Not Found"), with_headers=True) as evil:
        port = evil.endpoint.rsplit(":", 1)[1]
        templated = settings.model_copy(update={"mims_endpoint": "http://mims-{region}.invalid:9"})
        region = f"x@127.0.0.1:{port}/?"
        body = json.dumps(manifest(templated, region=region)).encode()
        await put_run(s3, settings, "run-forged", body)
        try:
            report = await sweep_with(templated, dry_run=True)
            leaked = [h.get("authorization", "") for h in evil.headers]
            assert evil.seen == [], (evil.seen, [a[:40] for a in leaked], report.lines())
        finally:
            await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (Reply(500, b'{"message": "boom"}', "Internal Server Error"), "cannot be asked"),
        (Reply(302, b"", "Found"), "cannot be asked"),
        (Reply(403, b'{"message": "expired token"}', "Forbidden"), "cannot be asked"),
        (Stall(30), "no answer in time"),
        (
            Reply(
                200,
                json.dumps(
                    {
                        "registration_id": "reg-untrusted",
                        "model_id": "m",
                        "workflow_execution_arn": "arn:x",
                        "status": "PAUSED",
                    }
                ).encode(),
                "OK",
            ),
            "cannot be asked",
        ),
        (
            Reply(
                200,
                json.dumps(
                    {
                        "registration_id": "reg-other",
                        "model_id": "m",
                        "workflow_execution_arn": "arn:x",
                        "status": "SUCCEEDED",
                    }
                ).encode(),
                "OK",
            ),
            "cannot be asked",
        ),
    ],
    ids=["500", "302", "403", "silent", "unknown-status", "another-registration"],
)
async def test_a_registry_answering_badly_spares_the_run_and_says_why(
    answer: object, why: str, settings: Settings, s3: Any, stack: LocalStack
) -> None:
    """500 (after retries), 302, 403, no answer, an unknown status, another id: spared, reason given."""
    with FaultProxy(stack.mims_endpoint, lambda m, t: answer if m == "GET" else None) as proxy:
        through = settings.model_copy(update={"mims_endpoint": proxy.endpoint, "submit_timeout": 1.0})
        where = await put_run(s3, settings, "run-badregistry", json.dumps(manifest(through)).encode())
        try:
            started = time.monotonic()
            report = await sweep_with(through)
            took = time.monotonic() - started
            run_ = outcome_of(report, where)
            assert run_.outcome == "spared", report.lines()
            assert why in run_.reason, run_.reason
            assert "max-age" in run_.reason, run_.reason
            assert run_.registration_id == "reg-untrusted"
            assert took < 8, took
            assert len(await leftovers(s3, settings.s3_bucket, settings.s3_prefix)) == 2
        finally:
            await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_odd_keys_markers_and_a_sibling_prefix(settings: Settings, s3: Any) -> None:
    """Odd characters and folder markers go with their run; `{prefix}-old/` and non-run keys stay."""
    base = settings.s3_prefix
    sibling = base.rstrip("/") + "-old/run-g/a1/model.tar.gz"
    odd = [
        f"{base}run-g/a1/",
        f"{base}run-g/a1/we ird ?#%&+=.bin",
        f"{base}run-g/a1/ünïcødé/日本.bin",
        f"{base}run-g/a1/deeper/nested/registration.json.bak",
        f"{base}run-g/a1/%2e%2e/x",
    ]
    mine = [f"{base}run-g/", f"{base}run-notes.txt", f"{base}folder/"]
    for key in [*odd, *mine, sibling]:
        await s3.put_object(Bucket=settings.s3_bucket, Key=key, Body=b"x")
    try:
        report = await sweep_with(settings)
        assert [r.outcome for r in report.runs] == ["removed"], report.lines()
        assert report.objects_removed == len(odd)
        assert sorted(report.not_runs) == sorted(mine)
        assert sorted(await leftovers(s3, settings.s3_bucket, base)) == sorted(mine)
        head = await s3.head_object(Bucket=settings.s3_bucket, Key=sibling)
        assert head["ContentLength"] == 1
    finally:
        await remove_all(s3, settings.s3_bucket, base)
        await s3.delete_object(Bucket=settings.s3_bucket, Key=sibling)


async def test_two_sweeps_at_once_remove_everything_once_and_report_no_leftovers(settings: Settings, s3: Any) -> None:
    """Two concurrent sweeps of 60 stale runs (with open uploads): all gone, no leftovers, no error."""
    for index in range(60):
        where = f"{settings.s3_prefix}run-{index:03d}/a1/"
        await s3.put_object(Bucket=settings.s3_bucket, Key=f"{where}model.tar.gz", Body=b"x")
        await s3.create_multipart_upload(Bucket=settings.s3_bucket, Key=f"{where}payload.tar.gz")
    reports: list[Any] = []

    async def one() -> None:
        reports.append(await sweep_with(settings))

    async with anyio.create_task_group() as tg:
        tg.start_soon(one)
        tg.start_soon(one)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    for report in reports:
        assert report.leftovers == (), report.lines()
        assert {r.outcome for r in report.runs} <= {"removed", "spared"}
    # Each run was removed by at least one of them; one that vanished under the other is spared.
    removed = {r.prefix for report in reports for r in report.removed}
    assert len(removed) == 60


async def test_a_sweep_stopped_by_sigterm_exits_143_and_a_second_sweep_finishes(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """SIGTERM while the sweep waits on the registry: 143, no traceback; run again: removes the stale run."""
    where = await put_run(s3, settings, "run-sigterm", None)
    await put_run(s3, settings, "run-plain", None)
    with FaultProxy(stack.mims_endpoint, lambda m, t: Stall(30) if m == "GET" else None) as proxy:
        job = make_job(tmp_path)
        env = environment(stack, settings, job, REGISTRAR_MIMS_ENDPOINT=proxy.endpoint)
        # The manifest names the configured endpoint: the proxy's.
        forged = manifest(settings.model_copy(update={"mims_endpoint": proxy.endpoint}), registration_id="reg-x")
        await s3.put_object(Bucket=settings.s3_bucket, Key=f"{where}registration.json", Body=json.dumps(forged))
        process = subprocess.Popen(
            [sys.executable, "-m", "async_registrar", "sweep", "--older-than", "0s"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            with anyio.fail_after(20):
                while proxy.count("GET", "/v1/registrations/reg-x") == 0:
                    await anyio.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=20)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    try:
        assert process.returncode == 143, stderr[-2000:]
        assert "Traceback" not in stderr, stderr[-2000:]
        assert len(await leftovers(s3, settings.s3_bucket, settings.s3_prefix)) == 3  # nothing removed yet
        # Run again (the proxy is gone: its registry is another; past --max-age 0s): both removed.
        again = run(environment(stack, settings, job), "sweep", "--older-than", "0s", "--max-age", "0s")
        assert again.returncode == 0, again.stderr[-2000:]
        assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    finally:
        await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_a_manifest_dated_in_the_future_does_not_pin_its_run_past_max_age(settings: Settings, s3: Any) -> None:
    """`updated_at` in 2100, a registration the registry does not know: past --max-age it goes."""
    future = dt.datetime(2100, 1, 1, tzinfo=dt.UTC).isoformat()
    where = await put_run(s3, settings, "run-future", json.dumps(manifest(settings, updated_at=future)).encode())
    try:
        report = await sweep_with(settings, max_age=0)
        run_ = outcome_of(report, where)
        assert run_.outcome == "removed", (run_.reason, report.lines())
    finally:
        await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
