"""Several regions, tested from the README's promises alone (black box).

"Several regions: `"model_registration_region": ["us-west-2", "eu-west-1"]` builds the archives once and
uploads them to every region at once (`s3_bucket="models-tmp-{region}"`, and `mims_endpoint` may hold
`{region}` too), submits one registration per region (each with its region's name) and waits for all.
A region whose submission fails is cleaned; the regions already accepted are waited for (or, if the
run is interrupted, kept), and the error names each of them. The CLI prints the two lines once per
region."

Everything runs against the session's moto S3 and reference MIMS services over real HTTP; the only
extra server is `RegionRouter`, a small HTTP front that gives each region an endpoint of its own
(`{router}/{region}`), so that a `{region}` endpoint template can be told apart per region.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from async_registrar import (
    Registrar,
    RegistrarError,
    RegistrationFailed,
    RegistrationKept,
    RegistrationPlan,
    RegistrationRejected,
    RegistrationStatusChanged,
    RegistrationSubmitted,
    RegistrationSucceeded,
    RegistryError,
    Settings,
)
from async_registrar._local import LocalStack

from .conftest import (
    environment,
    final_status,
    late_registry,
    leftovers,
    make_job,
    mims_server,
    on,
    registration_config,
    release_when_submitted,
    remove_all,
    request_for,
)
from .fault_proxy import FaultProxy

TWO = ["us-west-2", "eu-west-1"]
THREE = ["us-west-2", "eu-west-1", "ap-south-1"]
ARTIFACTS = ["model.tar.gz", "payload.tar.gz", "registration.json"]


def bucket(region: str) -> str:
    return f"registrar-mr-{region}"


def described(exc: BaseException) -> str:
    """An error's message with its notes."""
    return "\n".join([str(exc), *getattr(exc, "__notes__", [])])


async def left_in(regional_s3: dict[str, Any], region: str, prefix: str) -> list[str]:
    return await leftovers(regional_s3[region], bucket(region), prefix)


async def clean_everywhere(regional_s3: dict[str, Any], prefix: str) -> None:
    for region, client in regional_s3.items():
        await remove_all(client, bucket(region), prefix)


def cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "async_registrar", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def json_records(stderr: str) -> list[dict[str, Any]]:
    """The JSON log records of a `--log-format json` run (one object per line)."""
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def submitted_records(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """region -> its `registration_submitted` record."""
    return {r["region"]: r for r in records if r.get("event") == "registration_submitted"}


def no_s3_writes(proxy: FaultProxy) -> list[tuple[str, str]]:
    """Every request through `proxy` that could have written to S3 (PUT, POST, DELETE)."""
    return [(m, t) for m, t in proxy.seen if m in ("PUT", "POST", "DELETE")]


def forward(method: str, target: str) -> object:
    return None


class RegionRouter:
    """`http://127.0.0.1:<port>/{region}/...` forwarded to `upstream` as `/...`: an endpoint per
    region in front of one reference MIMS.  `behaviour[region]` is "forward" (the default),
    "not-mims" (a web server's own HTML 404 page) or "silent" (the connection closed unanswered).
    Records (region of the path, method, path, region named by a POST's body)."""

    def __init__(self, upstream: str, behaviour: dict[str, str] | None = None) -> None:
        self.upstream = upstream.removeprefix("http://").rstrip("/")
        self.behaviour = behaviour or {}
        self.seen: list[tuple[str, str, str, str | None]] = []
        router = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                region, _, rest = self.path.lstrip("/").partition("/")
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                named = None
                if self.command == "POST" and body:
                    with contextlib.suppress(ValueError, AttributeError):
                        named = json.loads(body).get("model_registration_region")
                router.seen.append((region, self.command, "/" + rest, named))
                what = router.behaviour.get(region, "forward")
                if what == "silent":
                    self.close_connection = True
                    return
                if what == "not-mims":
                    page = b"<html><body><h1>404 Not Found</h1></body></html>"
                    self.send_response(404)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                    return
                host, port = router.upstream.split(":")
                connection = http.client.HTTPConnection(host, int(port), timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                    connection.request(self.command, "/" + rest, body=body or None, headers=headers)
                    answer = connection.getresponse()
                    data = answer.read()
                finally:
                    connection.close()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("connection", "transfer-encoding", "content-length", "date", "server"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _quietly(self) -> None:
                # A client that gave up (another region's preflight failed first) closed its end.
                with contextlib.suppress(OSError):
                    self._handle()

            do_GET = do_POST = _quietly

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> RegionRouter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


# --- success in every region ----------------------------------------------------------------------


async def test_library_three_regions_one_registration_each_and_nothing_left(
    tmp_path: Path, settings: Settings, stack: LocalStack, regional_s3: dict[str, Any]
) -> None:
    """Three regions: one registration per region, each made with its region's name and artifacts in
    its region's bucket (under a `{region}/` folder of the run), one archive (one sha256) for all;
    a RegistrationSubmitted per region, one RegistrationSucceeded naming all three, then every
    region's bucket is empty under the prefix."""
    job = make_job(tmp_path, config=registration_config(model_registration_region=THREE))
    events: list[Any] = []
    try:
        with mims_server(stack) as registry:
            regional = on(settings, registry, s3_bucket="registrar-mr-{region}")
            async with Registrar(regional, on_progress=events.append) as registrar:
                result = await registrar.register(request_for(job, workflow_execution_id="mr-bb-three"))
            assert registry.registration_count == 3
            for registration in result.registrations:
                assert await final_status(registry, registration.registration_id) == "SUCCEEDED"
        assert sorted(r.region for r in result.registrations) == sorted(THREE)
        assert len({r.registration_id for r in result.registrations}) == 3
        assert len({r.model_artifact.sha256 for r in result.registrations}) == 1
        for registration in result.registrations:
            region = registration.region
            assert not registration.resumed
            assert registration.model_artifact.location.bucket == bucket(region)
            assert registration.payload_artifact is not None
            assert registration.payload_artifact.location.bucket == bucket(region)
            assert f"/{region}/" in registration.model_artifact.location.key
            assert registration.workflow_execution_arn.startswith(f"arn:aws:states:{region}:")
        submitted = [e for e in events if isinstance(e, RegistrationSubmitted)]
        assert sorted(e.region for e in submitted) == sorted(THREE)
        (succeeded,) = [e for e in events if isinstance(e, RegistrationSucceeded)]
        assert sorted(r.region for r in succeeded.registrations) == sorted(THREE)
        assert not [e for e in events if isinstance(e, RegistrationKept)]
        for region in THREE:
            assert await left_in(regional_s3, region, settings.s3_prefix) == []
    finally:
        await clean_everywhere(regional_s3, settings.s3_prefix)


async def test_cli_two_regions_prints_the_two_lines_once_per_region(
    tmp_path: Path, settings: Settings, stack: LocalStack, regional_s3: dict[str, Any]
) -> None:
    """The command line with two regions: exit 0, the original's two lines once per region (an ARN in
    that region, the model id the registry gave it), nothing left in either bucket."""
    job = make_job(tmp_path, config=registration_config(model_registration_region=TWO))
    try:
        with mims_server(stack) as registry:
            env = environment(
                stack,
                settings,
                job,
                REGISTRAR_S3_BUCKET="registrar-mr-{region}",
                REGISTRAR_MIMS_ENDPOINT=registry.endpoint,
                REGISTRAR_LOG_FORMAT="json",
            )
            result = cli(env, "register")
            assert result.returncode == 0, result.stderr
            assert registry.registration_count == 2
        submitted = submitted_records(json_records(result.stderr))
        assert sorted(submitted) == sorted(TWO)
        lines = result.stdout.splitlines()
        assert len(lines) == 4, result.stdout
        arns = [line for line in lines if line.startswith("Workflow execution arn for model registration process: ")]
        models = [line for line in lines if line.startswith("Model id for model being registered: ")]
        assert len(arns) == 2, result.stdout
        assert len(models) == 2, result.stdout
        for region in TWO:
            assert any(f"arn:aws:states:{region}:" in line for line in arns), result.stdout
            assert f"Model id for model being registered: {submitted[region]['model_id']}" in models
        for region in TWO:
            assert await left_in(regional_s3, region, settings.s3_prefix) == []
    finally:
        await clean_everywhere(regional_s3, settings.s3_prefix)


# --- one region's registry refuses or fails --------------------------------------------------------


async def test_library_one_region_rejected_the_others_are_waited_for_and_named(
    tmp_path: Path, settings: Settings, stack: LocalStack, regional_s3: dict[str, Any]
) -> None:
    """ap-south-1's registry refuses the submission (422), us-west-2 and eu-west-1 accept.  The accepted
    registrations are held unfinished by a registry that reads the artifacts only when it finishes:
    while held, their artifacts are all still in place, and they end SUCCEEDED (a run that deleted
    them early would see them FAILED).  The error is RegistrationRejected with the registry's
    reason, naming each accepted registration (none kept); afterwards every bucket is empty."""
    job = make_job(tmp_path, config=registration_config(model_registration_region=THREE))
    accepted = ["us-west-2", "eu-west-1"]
    while_held: dict[str, list[str]] = {}
    try:
        with late_registry(stack, reject_regions=["ap-south-1"]) as registry:
            regional = on(settings, registry, s3_bucket="registrar-mr-{region}")
            caught: list[BaseException] = []

            async def run() -> None:
                async with Registrar(regional) as registrar:
                    try:
                        await registrar.register(request_for(job, workflow_execution_id="mr-bb-reject"))
                    except RegistrarError as exc:
                        caught.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                with anyio.fail_after(20):
                    while registry.registration_count < 2:
                        await anyio.sleep(0.02)
                    await anyio.sleep(0.3)  # the run is waiting for the two accepted ones
                for region in accepted:
                    while_held[region] = await left_in(regional_s3, region, settings.s3_prefix)
                registry.finish_processing()
            (error,) = caught
            assert isinstance(error, RegistrationRejected), described(error)
            assert "registrations in ap-south-1 are not accepted" in described(error)
            named = {r.region: r for r in error.registrations}
            assert sorted(named) == sorted(accepted)
            for region in accepted:
                registration = named[region]
                assert registration.status == "SUCCEEDED"
                assert registration.kept_prefix is None
                assert registration.registration_id in described(error)
                assert await final_status(registry, registration.registration_id) == "SUCCEEDED"
            assert registry.registration_count == 2
        for region in accepted:
            names = sorted(key.rsplit("/", 1)[1] for key in while_held[region])
            assert names == ARTIFACTS, while_held
        for region in THREE:
            assert await left_in(regional_s3, region, settings.s3_prefix) == []
    finally:
        await clean_everywhere(regional_s3, settings.s3_prefix)


async def test_cli_one_region_rejected_exits_5_with_the_reason_and_the_accepted_named(
    tmp_path: Path, settings: Settings, stack: LocalStack, regional_s3: dict[str, Any]
) -> None:
    """The same from the command line: exit 5, the registry's reason shown, each accepted region's
    registration named on stderr (an `error` record with exit code 5, `exit` last), nothing left."""
    job = make_job(tmp_path, config=registration_config(model_registration_region=THREE))
    try:
        with mims_server(stack, reject_regions=["eu-west-1"]) as registry:
            env = environment(
                stack,
                settings,
                job,
                REGISTRAR_S3_BUCKET="registrar-mr-{region}",
                REGISTRAR_MIMS_ENDPOINT=registry.endpoint,
                REGISTRAR_LOG_FORMAT="json",
                MODS_WORKFLOW_EXECUTION_ID="mr-bb-cli-reject",
            )
            result = cli(env, "register")
            assert result.returncode == 5, result.stderr
            # The two lines mean "registered": none while a region's registration is not.
            assert result.stdout == "", result.stdout
            records = json_records(result.stderr)
            submitted = submitted_records(records)
            assert sorted(submitted) == ["ap-south-1", "us-west-2"], result.stderr
            for record in submitted.values():
                assert await final_status(registry, record["registration_id"]) == "SUCCEEDED"
            assert registry.registration_count == 2
        errors = [r for r in records if r.get("event") == "error"]
        assert errors, result.stderr
        assert errors[-1]["exit_code"] == 5, result.stderr
        assert records[-1]["event"] == "exit"
        assert records[-1]["exit_code"] == 5
        assert "registrations in eu-west-1 are not accepted" in result.stderr
        for record in submitted.values():
            assert record["registration_id"] in errors[-1]["message"] + json.dumps(errors[-1]), errors[-1]
        for region in THREE:
            assert await left_in(regional_s3, region, settings.s3_prefix) == []
    finally:
        await clean_everywhere(regional_s3, settings.s3_prefix)


async def test_library_one_region_failed_is_named_with_its_reason_and_nothing_is_left(
    tmp_path: Path, settings: Settings, stack: LocalStack, regional_s3: dict[str, Any]
) -> None:
    """eu-west-1's registration ends FAILED, us-west-2's SUCCEEDED (read only once finished: not
    deleted under it).  RegistrationFailed carries the FAILED registration's id and the registry's
    reason; a status change to FAILED is reported for eu-west-1; both registrations are named on
    the error, neither kept; both buckets end empty."""
    job = make_job(tmp_path, config=registration_config(model_registration_region=TWO))
    events: list[Any] = []
    try:
        with late_registry(stack, fail_regions=["eu-west-1"]) as registry:
            regional = on(settings, registry, s3_bucket="registrar-mr-{region}")
            callback = release_when_submitted(registry, events.append, count=2)
            async with Registrar(regional, on_progress=callback) as registrar:
                with pytest.raises(RegistrationFailed) as caught:
                    await registrar.register(request_for(job, workflow_execution_id="mr-bb-failed"))
            error = caught.value
            ids = {e.region: e.registration_id for e in events if isinstance(e, RegistrationSubmitted)}
            assert sorted(ids) == sorted(TWO)
            assert error.registration_id == ids["eu-west-1"]
            assert error.failure_reason is not None
            assert "registrations in eu-west-1 are failing" in error.failure_reason
            assert "registrations in eu-west-1 are failing" in described(error)
            assert await final_status(registry, ids["us-west-2"]) == "SUCCEEDED"
            assert (await final_status(registry, ids["eu-west-1"])).startswith("FAILED")
        failed = [e for e in events if isinstance(e, RegistrationStatusChanged) and e.status == "FAILED"]
        assert [e.region for e in failed] == ["eu-west-1"]
        named = {r.region: r for r in error.registrations}
        assert sorted(named) == sorted(TWO)
        assert named["eu-west-1"].status == "FAILED"
        assert named["us-west-2"].status == "SUCCEEDED"
        assert all(r.kept_prefix is None for r in error.registrations)
        assert not error.kept
        for region in TWO:
            assert await left_in(regional_s3, region, settings.s3_prefix) == []
    finally:
        await clean_everywhere(regional_s3, settings.s3_prefix)


# --- interrupted after the registries accepted -----------------------------------------------------


async def test_library_cancelled_after_two_accepted_and_one_rejected_keeps_only_the_accepted(
    tmp_path: Path, settings: Settings, stack: LocalStack, regional_s3: dict[str, Any]
) -> None:
    """Three regions: us-west-2 and eu-west-1 accepted (held unfinished), ap-south-1 refused; then the
    caller cancels.  CancelledError propagates; RegistrationKept names exactly the two accepted
    registrations with a kept prefix in each one's own bucket, where the artifacts stay; the refused
    region is empty.  A re-run with the same lineage id follows both (resumed, no new registration)
    and again reports the refusal; then every bucket is empty."""
    job = make_job(tmp_path, config=registration_config(model_registration_region=THREE))
    request = request_for(job, workflow_execution_id="mr-bb-cancel")
    accepted = ["us-west-2", "eu-west-1"]
    events: list[Any] = []
    refused = threading.Event()

    async def note(response: httpx.Response) -> None:
        if response.request.method == "POST" and response.status_code == 422:
            refused.set()

    try:
        with late_registry(stack, reject_regions=["ap-south-1"]) as registry:
            regional = on(settings, registry, s3_bucket="registrar-mr-{region}")
            async with (
                httpx.AsyncClient(event_hooks={"response": [note]}) as http,
                Registrar(regional, http_client=http, on_progress=events.append) as registrar,
            ):
                with anyio.CancelScope() as scope:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(registrar.register, request)
                        with anyio.fail_after(20):
                            while not (
                                refused.is_set()
                                and len([e for e in events if isinstance(e, RegistrationSubmitted)]) >= 2
                            ):
                                await anyio.sleep(0.02)
                        await anyio.sleep(0.3)  # the refusal handled; the accepted two waited for
                        scope.cancel()
                assert scope.cancelled_caught
            kept_events = [e for e in events if isinstance(e, RegistrationKept)]
            assert kept_events, events
            kept = {r.region: r for e in kept_events for r in e.registrations}
            assert sorted(kept) == sorted(accepted)
            ids = {e.region: e.registration_id for e in events if isinstance(e, RegistrationSubmitted)}
            for region in accepted:
                registration = kept[region]
                assert registration.registration_id == ids[region]
                assert registration.kept_prefix is not None
                assert registration.kept_prefix.startswith(f"s3://{bucket(region)}/{settings.s3_prefix}")
                left = await left_in(regional_s3, region, settings.s3_prefix)
                folder = registration.kept_prefix.removeprefix(f"s3://{bucket(region)}/")
                assert sorted(left) == sorted(folder + name for name in ARTIFACTS), left
            assert await left_in(regional_s3, "ap-south-1", settings.s3_prefix) == []
            assert registry.registration_count == 2

            again: list[Any] = []
            callback = release_when_submitted(registry, again.append, count=2)
            async with Registrar(regional, on_progress=callback) as registrar:
                with pytest.raises(RegistrationRejected) as caught:
                    await registrar.register(request)
            assert registry.registration_count == 2
            resumed = {e.region: e for e in again if isinstance(e, RegistrationSubmitted)}
            assert sorted(resumed) == sorted(accepted)
            assert all(e.resumed for e in resumed.values())
            assert {e.region: e.registration_id for e in resumed.values()} == {r: ids[r] for r in accepted}
            assert sorted((r.region, r.registration_id, r.status) for r in caught.value.registrations) == sorted(
                (r, ids[r], "SUCCEEDED") for r in accepted
            )
        for region in THREE:
            assert await left_in(regional_s3, region, settings.s3_prefix) == []
    finally:
        await clean_everywhere(regional_s3, settings.s3_prefix)


async def test_cli_sigterm_after_both_regions_accepted_keeps_both_and_a_rerun_resumes(
    tmp_path: Path, settings: Settings, stack: LocalStack, regional_s3: dict[str, Any]
) -> None:
    """SIGTERM once both regions' registries accepted (held unfinished): exit 143, each region's
    registration id and kept `s3://` prefix (in its own bucket) named on stderr, the artifacts kept
    in both buckets, complete enough for the registry to finish both from them.  A re-run with the
    same MODS_WORKFLOW_EXECUTION_ID makes no new registration, prints the two lines for each region's
    same registration, and leaves nothing."""
    job = make_job(tmp_path, config=registration_config(model_registration_region=TWO))
    try:
        with late_registry(stack) as registry:
            env = environment(
                stack,
                settings,
                job,
                REGISTRAR_S3_BUCKET="registrar-mr-{region}",
                REGISTRAR_MIMS_ENDPOINT=registry.endpoint,
                REGISTRAR_LOG_FORMAT="json",
                MODS_WORKFLOW_EXECUTION_ID="mr-bb-sigterm",
            )
            process = subprocess.Popen(
                [sys.executable, "-m", "async_registrar", "register"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert process.stderr is not None
            seen: list[str] = []
            submitted: dict[str, dict[str, Any]] = {}
            try:
                for line in process.stderr:
                    seen.append(line)
                    if line.startswith("{"):
                        record = json.loads(line)
                        if record.get("event") == "registration_submitted":
                            submitted[record["region"]] = record
                    if len(submitted) == 2:
                        process.send_signal(signal.SIGTERM)
                        break
                stdout, rest = process.communicate(timeout=30)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.communicate()
            stderr = "".join(seen) + rest
            assert sorted(submitted) == sorted(TWO), stderr
            assert process.returncode == 143, stderr
            assert stdout == ""
            assert "terminated by SIGTERM" in stderr
            records = json_records(stderr)
            assert records[-1]["event"] == "exit"
            assert records[-1]["exit_code"] == 143
            for region in TWO:
                record = submitted[region]
                assert record["registration_id"] in rest, rest
                left = await left_in(regional_s3, region, settings.s3_prefix)
                assert sorted(key.rsplit("/", 1)[1] for key in left) == ARTIFACTS, left
                folder = left[0].rsplit("/", 1)[0] + "/"
                assert all(key.startswith(folder) for key in left)
                assert f"s3://{bucket(region)}/{folder}" in rest, rest
            assert registry.registration_count == 2

            # The registry finishes them now, reading what was kept (it is all still there).
            registry.finish_processing()
            for region in TWO:
                assert await final_status(registry, submitted[region]["registration_id"]) == "SUCCEEDED"
            rerun = cli(env, "register")
            assert rerun.returncode == 0, rerun.stderr
            assert registry.registration_count == 2
            out = rerun.stdout
            lines = out.splitlines()
            assert len(lines) == 4, out
            for region in TWO:
                assert f"Model id for model being registered: {submitted[region]['model_id']}" in lines
                assert any(line.endswith(submitted[region]["registration_id"]) for line in lines), out
        for region in TWO:
            assert await left_in(regional_s3, region, settings.s3_prefix) == []
    finally:
        await clean_everywhere(regional_s3, settings.s3_prefix)


# --- {region} templates, the plan, the preflight ---------------------------------------------------


async def test_region_templated_endpoint_check_plan_and_registration_per_region(
    tmp_path: Path, settings: Settings, stack: LocalStack, regional_s3: dict[str, Any]
) -> None:
    """`s3_bucket` and `mims_endpoint` both hold `{region}`: `check()` plans each region with its own
    bucket, prefix and endpoint and writes nothing; the CLI's `check` prints each region's line; then
    `register` sends each region's registration (one region name per POST) to that region's endpoint
    and to no other."""
    job = make_job(tmp_path, config=registration_config(model_registration_region=TWO))
    try:
        with (
            mims_server(stack, signing_secrets=None) as registry,  # the path it sees is not the signed one
            RegionRouter(registry.endpoint) as router,
            FaultProxy(stack.s3_endpoint, forward) as proxy,
        ):
            regional = settings.model_copy(
                update={
                    "s3_bucket": "registrar-mr-{region}",
                    "mims_endpoint": router.endpoint + "/{region}",
                    "s3_endpoint_url": proxy.endpoint,
                }
            )
            async with Registrar(regional) as registrar:
                plan = await registrar.check(request_for(job, workflow_execution_id="mr-bb-plan"))
            assert isinstance(plan, RegistrationPlan)
            assert sorted(r.region for r in plan.regions) == sorted(TWO)
            for planned in plan.regions:
                assert planned.bucket == bucket(planned.region)
                assert planned.prefix.startswith(f"s3://{bucket(planned.region)}/{settings.s3_prefix}")
                assert planned.endpoint.rstrip("/") == f"{router.endpoint}/{planned.region}"
            assert plan.resumable
            text = "\n".join(plan.lines())
            for region in TWO:
                assert f"{region}: temporary prefix s3://{bucket(region)}/{settings.s3_prefix}" in text, text
            assert no_s3_writes(proxy) == []
            assert registry.registration_count == 0
            # Every region's registry was probed at its own endpoint.
            assert {region for region, method, _, _ in router.seen if method == "GET"} == set(TWO)

            env = environment(
                stack,
                settings,
                job,
                AWS_ENDPOINT_URL_S3=proxy.endpoint,
                REGISTRAR_S3_BUCKET="registrar-mr-{region}",
                REGISTRAR_MIMS_ENDPOINT=router.endpoint + "/{region}",
                MODS_WORKFLOW_EXECUTION_ID="mr-bb-plan",
            )
            checked = cli(env, "check")
            assert checked.returncode == 0, checked.stderr
            for region in TWO:
                pattern = (
                    rf"^{re.escape(region)}: temporary prefix s3://{re.escape(bucket(region))}/"
                    rf"{re.escape(settings.s3_prefix)}[^;]*; "
                    rf"registry {re.escape(router.endpoint)}/{re.escape(region)}/?$"
                )
                assert re.search(pattern, checked.stdout, re.MULTILINE), checked.stdout
            assert no_s3_writes(proxy) == []

            async with Registrar(regional) as registrar:
                result = await registrar.register(request_for(job, workflow_execution_id="mr-bb-plan"))
            assert sorted(r.region for r in result.registrations) == sorted(TWO)
            posts = [(region, named) for region, method, _, named in router.seen if method == "POST"]
            assert sorted(posts) == sorted((region, region) for region in TWO), router.seen
            assert registry.registration_count == 2
        for region in TWO:
            assert await left_in(regional_s3, region, settings.s3_prefix) == []
    finally:
        await clean_everywhere(regional_s3, settings.s3_prefix)


@pytest.mark.parametrize("fault", ["not-mims", "silent"])
async def test_one_regions_registry_endpoint_bad_at_preflight_uploads_nothing_anywhere(
    tmp_path: Path, settings: Settings, stack: LocalStack, regional_s3: dict[str, Any], fault: str
) -> None:
    """A `{region}` endpoint where ap-south-1's is a web server's 404 page ("is it a MIMS endpoint?")
    or never answers (retried until the preflight timeout): a RegistryError naming that endpoint,
    from `check` and `register` alike, within the preflight's bound; no registration and not one
    S3 write in any region."""
    job = make_job(tmp_path, config=registration_config(model_registration_region=THREE))
    timeout = 1.5
    try:
        with (
            mims_server(stack, signing_secrets=None) as registry,
            RegionRouter(registry.endpoint, {"ap-south-1": fault}) as router,
            FaultProxy(stack.s3_endpoint, forward) as proxy,
        ):
            regional = settings.model_copy(
                update={
                    "s3_bucket": "registrar-mr-{region}",
                    "mims_endpoint": router.endpoint + "/{region}",
                    "s3_endpoint_url": proxy.endpoint,
                    "preflight_timeout": timeout,
                }
            )
            async with Registrar(regional) as registrar:
                with pytest.raises(RegistryError) as checked:
                    await registrar.check(request_for(job))
                started = time.monotonic()
                with pytest.raises(RegistryError) as caught:
                    await registrar.register(request_for(job))
                took = time.monotonic() - started
            assert f"{router.endpoint}/ap-south-1" in described(checked.value)
            assert f"{router.endpoint}/ap-south-1" in described(caught.value)
            if fault == "not-mims":
                assert "a MIMS endpoint" in described(caught.value)
            assert took <= timeout + 5, f"{took:.1f} s"
            assert registry.registration_count == 0
            assert not [s for s in router.seen if s[1] == "POST"]
            assert no_s3_writes(proxy) == [], proxy.seen
        for region in THREE:
            assert await left_in(regional_s3, region, settings.s3_prefix) == []
    finally:
        await clean_everywhere(regional_s3, settings.s3_prefix)


@pytest.mark.parametrize("command", ["check", "register"])
async def test_cli_one_regions_bucket_missing_exits_4_with_nothing_written_anywhere(
    tmp_path: Path, settings: Settings, stack: LocalStack, regional_s3: dict[str, Any], command: str
) -> None:
    """Three regions, the `{region}` bucket of eu-central-1 does not exist: exit 4 naming it, for
    `check` and `register` alike; no registration, no S3 write in any region."""
    regions = ["us-west-2", "eu-central-1", "ap-south-1"]
    job = make_job(tmp_path, config=registration_config(model_registration_region=regions))
    try:
        with mims_server(stack) as registry, FaultProxy(stack.s3_endpoint, forward) as proxy:
            env = environment(
                stack,
                settings,
                job,
                AWS_ENDPOINT_URL_S3=proxy.endpoint,
                REGISTRAR_S3_BUCKET="registrar-mr-{region}",
                REGISTRAR_MIMS_ENDPOINT=registry.endpoint,
                REGISTRAR_PREFLIGHT_TIMEOUT="3",
            )
            result = cli(env, command)
            assert result.returncode == 4, result.stderr
            assert "registrar-mr-eu-central-1" in result.stderr
            assert result.stdout.count("Workflow execution arn") == 0
            assert registry.registration_count == 0
            assert no_s3_writes(proxy) == [], proxy.seen
        for region in ("us-west-2", "ap-south-1"):
            assert await left_in(regional_s3, region, settings.s3_prefix) == []
    finally:
        await clean_everywhere(regional_s3, settings.s3_prefix)
