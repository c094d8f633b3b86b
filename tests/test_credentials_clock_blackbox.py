"""Credentials and clocks, black-box: written from README.md and docs/faults.md alone.

Credentials that rotate or expire mid-run (a container credentials endpoint of the test's own,
`AWS_CONTAINER_CREDENTIALS_FULL_URI`, and S3 answering 403 ExpiredToken through a proxy), a
clock S3 calls skewed, a registry refusing the signature of the POST, credentials from
`AWS_PROFILE` and its config file, and that no secret reaches the log.  Every run is the
command as a subprocess against moto S3 and the reference MIMS on loopback.
"""

from __future__ import annotations

import datetime
import json
import re
import secrets
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from async_registrar import Settings
from async_registrar._local import ACCESS_KEY, SECRET_KEY, LocalStack

from .conftest import (
    MiB,
    environment,
    final_status,
    late_registry,
    leftovers,
    make_job,
    mims_server,
    remove_all,
)
from .fault_proxy import FaultProxy, Reply, s3_error

DOCUMENTED = {0, 2, 3, 4, 5, 6, 130, 143, 120}
TOKEN = "SESSION-TOKEN-c0ffee-7e57-do-not-print"
AUTH_TOKEN = "container-auth-token-5ecre7-do-not-print"
#: Keys the container credentials endpoint hands out in turn; the registry knows them all.
ROTATING = {f"ASIAROTATE{i:06d}": f"rotating-secret-{i:06d}-do-not-print" for i in range(3000)}


def run(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "async_registrar", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def shown(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stderr:\n{result.stderr}\n--- stdout:\n{result.stdout}"


def no_static_credentials(tmp_path: Path, env: dict[str, str], **extra: str) -> dict[str, str]:
    """`env` without the credential variables or any AWS file: only what `extra` provides."""
    out = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    out.update(
        {
            "HOME": str(tmp_path),
            "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    out.update(extra)
    return out


class CredentialEndpoint:
    """A container credentials endpoint (ECS / EKS Pod Identity style) on loopback: every fetch
    hands out the next key of `ROTATING`, expiring `lifetime` seconds later (under botocore's
    10-minute mandatory refresh window, so every use fetches again); `failing` set, it answers 500."""

    def __init__(self, lifetime: float = 300) -> None:
        self.lifetime = lifetime
        self.failing = threading.Event()
        #: set: every fetch answers 200 with keys that expired a minute ago (a stale cache)
        self.stale = threading.Event()
        self.fetches = 0
        self.failures = 0
        self.authorizations: list[str | None] = []
        self.issued: list[str] = []
        outer = self
        self._keys = iter(ROTATING.items())

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.authorizations.append(self.headers.get("Authorization"))
                if outer.failing.is_set():
                    outer.failures += 1
                    body = b'{"code": "InternalError", "message": "role session unavailable"}'
                    self.send_response(500)
                else:
                    outer.fetches += 1
                    key, secret = next(outer._keys)
                    outer.issued.append(key)
                    lifetime = -60 if outer.stale.is_set() else outer.lifetime
                    expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=lifetime)
                    body = json.dumps(
                        {
                            "AccessKeyId": key,
                            "SecretAccessKey": secret,
                            "Token": TOKEN,
                            "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
                        }
                    ).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self._server.server_address[1]}/v2/credentials/{secrets.token_hex(4)}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> CredentialEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def env(self) -> dict[str, str]:
        return {"AWS_CONTAINER_CREDENTIALS_FULL_URI": self.uri, "AWS_CONTAINER_AUTHORIZATION_TOKEN": AUTH_TOKEN}


@pytest.fixture
def endpoint() -> Iterator[CredentialEndpoint]:
    with CredentialEndpoint() as running:
        yield running


def is_part(method: str, target: str) -> bool:
    return method == "PUT" and "partNumber=" in target and "uploadId=" in target


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in (SECRET_KEY, TOKEN, AUTH_TOKEN, "rotating-secret-", "Signature=", "X-Amz-Security-Token"):
            assert secret not in text, f"{secret!r} printed"


def key_ids(headers: list[dict[str, str]]) -> list[str]:
    ids = []
    for h in headers:
        found = re.search(r"Credential=([A-Z0-9]+)/", h.get("authorization", ""))
        if found:
            ids.append(found.group(1))
    return ids


def assert_leftovers_named(left: list[str], stderr: str) -> None:
    """Each key left (object or open upload) is named in the message, by its key or its run's folder."""
    for item in left:
        key = item.removeprefix("upload:")
        folder = key.rsplit("/", 1)[0] + "/"
        assert key in stderr or folder in stderr, f"{item} left but not named:\n{stderr}"


# --- rotating and expiring credentials from a container credentials endpoint ---------------------


async def test_rotating_container_credentials_are_picked_up_for_s3_and_the_registry(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, endpoint: CredentialEndpoint
) -> None:
    """Credentials that expire in 5 minutes are fetched again on use: S3 and the signed registry
    requests both use the refreshed keys (README: "fetched per request (so refreshed role
    credentials are picked up)"); exit 0, nothing left, the token never printed."""
    job = make_job(tmp_path, model_bytes=6 * MiB)
    registry_keys = {k: SecretStr(v) for k, v in ROTATING.items()}
    with (
        mims_server(stack, signing_secrets=registry_keys) as registry,
        FaultProxy(registry.endpoint, lambda m, t, h: None, with_headers=True) as proxy,
    ):
        env = no_static_credentials(
            tmp_path,
            environment(stack, settings, job, REGISTRAR_MIMS_ENDPOINT=proxy.endpoint, REGISTRAR_LOG_LEVEL="DEBUG"),
            **endpoint.env(),
        )
        result = run(env, "register")
    assert result.returncode == 0, shown(result)
    assert len(result.stdout.splitlines()) == 2
    used = key_ids(proxy.headers)
    assert used, "no signed request reached the registry"
    assert set(used) <= set(endpoint.issued)
    assert len(set(used)) > 1, f"the registry's requests all used one key: {used}"
    assert all(a == AUTH_TOKEN for a in endpoint.authorizations)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    assert_no_secret(result.stdout, result.stderr)


@pytest.mark.parametrize(
    "log_format",
    [
        pytest.param(
            "text",
        ),
        "json",
    ],
)
async def test_credentials_that_stop_refreshing_mid_upload_fail_clearly_and_name_what_is_left(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, endpoint: CredentialEndpoint, log_format: str
) -> None:
    """The credential source fails from the first part on (the role's session revoked): the run
    ends with a documented exit code and one error, no secret, and whatever the cleanup could not
    remove without credentials is named (faults.md: "If the cleanup itself fails, the message
    names each key and upload id left behind"); `sweep` with working credentials removes it.
    At the default log level (text), stderr holds no traceback: nothing here is a bug."""
    job = make_job(tmp_path, model_bytes=12 * MiB)

    def rule(method: str, target: str) -> None:
        if is_part(method, target):
            endpoint.failing.set()

    registry_keys = {k: SecretStr(v) for k, v in ROTATING.items()}
    with mims_server(stack, signing_secrets=registry_keys) as registry, FaultProxy(stack.s3_endpoint, rule) as proxy:
        base = environment(
            stack,
            settings,
            job,
            AWS_ENDPOINT_URL_S3=proxy.endpoint,
            REGISTRAR_MIMS_ENDPOINT=registry.endpoint,
            REGISTRAR_LOG_FORMAT=log_format,
            REGISTRAR_CLEANUP_TIMEOUT="3",
        )
        env = no_static_credentials(tmp_path, base, **endpoint.env())
        result = run(env, "register")
    left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    try:
        assert endpoint.failures > 0, shown(result) + f"\nfetches {endpoint.fetches}"
        assert result.returncode == 4, shown(result)
        assert "error: S3 UploadPart" in result.stderr or '"exit_code": 4' in result.stderr, shown(result)
        assert "CredentialRetrievalError" in result.stderr
        assert result.stdout == ""
        assert_no_secret(result.stderr)
        assert_leftovers_named(left, result.stderr)
        for upload in (await s3.list_multipart_uploads(Bucket=settings.s3_bucket, Prefix=settings.s3_prefix)).get(
            "Uploads", []
        ):
            assert upload["UploadId"] in result.stderr, f"open upload {upload['Key']} not named:\n{result.stderr}"
        if log_format == "json":
            records = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
            assert [r["exit_code"] for r in records if r.get("event") == "error"] == [4]
            assert records[-1]["event"] == "exit"
            assert records[-1]["exit_code"] == 4
        if log_format == "json":  # what is left goes with a sweep that has working credentials
            sweep = run(environment(stack, settings, job), "sweep", "--older-than", "0s")
            assert sweep.returncode == 0, shown(sweep)
            assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
        if log_format == "text":
            assert "Traceback" not in result.stderr, shown(result)
    finally:
        await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_credentials_that_stop_refreshing_during_the_wait_keep_the_registration(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, endpoint: CredentialEndpoint
) -> None:
    """The registry accepted, then the credential source fails: the run cannot sign its polls
    nor its manifest update.  Past the point of no return the artifacts must be kept (README),
    named, and the registration must reach SUCCEEDED; a re-run with working credentials and the
    same lineage id follows it and leaves nothing."""
    job = make_job(tmp_path)
    lineage = f"wf-cred-{secrets.token_hex(4)}"
    registry_keys = {**{k: SecretStr(v) for k, v in ROTATING.items()}, ACCESS_KEY: SecretStr(SECRET_KEY)}

    def rule(method: str, target: str) -> None:
        if method == "POST" and target.endswith("/v1/registrations"):
            endpoint.failing.set()

    with late_registry(stack, signing_secrets=registry_keys) as registry, FaultProxy(registry.endpoint, rule) as proxy:
        base = environment(
            stack,
            settings,
            job,
            REGISTRAR_MIMS_ENDPOINT=proxy.endpoint,  # the re-run goes to the same endpoint
            MODS_WORKFLOW_EXECUTION_ID=lineage,
            REGISTRAR_WAIT_TIMEOUT="10",
        )
        result = run(no_static_credentials(tmp_path, base, **endpoint.env()), "register")
        kept = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
        registry.finish_processing()
        assert registry.registration_count == 1
        try:
            names = sorted(k.rsplit("/", 1)[1] for k in kept)
            assert "model.tar.gz" in names, names
            assert "payload.tar.gz" in names, names
            assert_leftovers_named(kept, result.stderr)
            assert "reg-" in result.stderr  # the registration is named
            ids = set(re.findall(r"reg-[0-9a-zA-Z-]+", result.stderr))
            statuses = [await final_status(registry, rid) for rid in ids if registry.registration(rid) is not None]
            assert statuses == ["SUCCEEDED"], statuses
            again = run(base, "register")  # static credentials that work
            assert again.returncode == 0, shown(again)
            assert registry.registration_count == 1
            assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == [], shown(again)
            # accepted, not seen to finish: README's exit 6, not 1 ("an unexpected error: a bug")
            assert result.returncode == 6, shown(result)
            assert "unexpected error" not in result.stderr, shown(result)
        finally:
            await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


# --- S3 refusing credentials or the clock mid-run -----------------------------------------------


def _refusing_parts(code: str) -> Any:
    def rule(method: str, target: str) -> Reply | None:
        return s3_error(403, code) if is_part(method, target) else None

    return rule


@pytest.mark.parametrize("code", ["ExpiredToken", "RequestTimeTooSkewed"])
async def test_parts_refused_for_credentials_or_clock_are_exit_4_naming_the_code_and_leave_nothing(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, code: str
) -> None:
    """S3 refuses every part with 403 `code` (the session token expired, the clock drifted past 15
    minutes): exit 4, the S3 error code named, no traceback, the uploads aborted (the aborts are
    answered), nothing left.  At DEBUG in JSON: every line a JSON object, one error record with
    exit code 4, the session token nowhere."""
    job = make_job(tmp_path, model_bytes=12 * MiB)
    with FaultProxy(stack.s3_endpoint, _refusing_parts(code)) as proxy:
        env = environment(
            stack,
            settings,
            job,
            AWS_ENDPOINT_URL_S3=proxy.endpoint,
            AWS_SESSION_TOKEN=TOKEN,
            REGISTRAR_LOG_LEVEL="DEBUG",
            REGISTRAR_LOG_FORMAT="json",
        )
        result = run(env, "register", timeout=50)
    assert "Traceback" not in result.stderr, shown(result)
    assert result.returncode == 4, shown(result)
    assert code in result.stderr, shown(result)
    assert result.stdout == ""
    assert_no_secret(result.stderr)
    records = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert [r["exit_code"] for r in records if r.get("event") == "error"] == [4]
    assert records[-1] == {**records[-1], "event": "exit", "exit_code": 4}
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_token_expiring_for_every_request_after_the_first_part_names_what_is_left(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """From the first part on, S3 answers every request 403 ExpiredToken (HEAD: a bare 403): the
    cleanup cannot abort or delete either.  Exit 4, the open uploads and objects left named
    (faults.md), and a sweep with fresh credentials removes them."""
    job = make_job(tmp_path, model_bytes=12 * MiB)
    expired = threading.Event()

    def rule(method: str, target: str) -> Reply | None:
        if is_part(method, target):
            expired.set()
        if not expired.is_set():
            return None
        return Reply(403, b"", "Forbidden") if method == "HEAD" else s3_error(403, "ExpiredToken")

    with FaultProxy(stack.s3_endpoint, rule) as proxy:
        env = environment(stack, settings, job, AWS_ENDPOINT_URL_S3=proxy.endpoint, REGISTRAR_CLEANUP_TIMEOUT="8")
        result = run(env, "register", timeout=50)
    left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    try:
        assert "Traceback" not in result.stderr, shown(result)
        assert result.returncode == 4, shown(result)
        assert "ExpiredToken" in result.stderr
        assert left, "the proxy refused every abort and delete, yet nothing was left?"
        assert_leftovers_named(left, result.stderr)
        uploads = (await s3.list_multipart_uploads(Bucket=settings.s3_bucket, Prefix=settings.s3_prefix)).get(
            "Uploads", []
        )
        for upload in uploads:
            assert upload["UploadId"] in result.stderr, f"open upload {upload['Key']} not named:\n{result.stderr}"
        sweep = run(environment(stack, settings, job), "sweep", "--older-than", "0s")
        assert sweep.returncode == 0, shown(sweep)
        assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    finally:
        await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


# --- the registry refusing the signature ---------------------------------------------------------


def _json_reply(status: int, message: str) -> Reply:
    return Reply(status, json.dumps({"message": message, "errors": []}).encode(), "Refused")


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (403, "Signature expired: 20261201T000000Z is now earlier than 20261201T001500Z (clock skew)"),
        (401, "ExpiredToken: the security token included in the request is expired"),
    ],
    ids=["clock-skew-403", "expired-token-401"],
)
async def test_a_post_refused_for_its_signature_is_exit_5_not_retried_and_leaves_nothing(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, status: int, message: str
) -> None:
    """The preflight passed; the POST is refused 401/403 (not a registration): README "Other 4xx
    fail at once with the server's message": exit 5, one POST, the registry's message shown, the
    artifacts removed (nothing was accepted)."""
    job = make_job(tmp_path)

    def rule(method: str, target: str) -> Reply | None:
        return _json_reply(status, message) if method == "POST" else None

    with FaultProxy(stack.mims_endpoint, rule) as proxy:
        env = environment(stack, settings, job, REGISTRAR_MIMS_ENDPOINT=proxy.endpoint)
        result = run(env, "register")
    assert "Traceback" not in result.stderr, shown(result)
    assert result.returncode == 5, shown(result)
    assert proxy.count("POST", "/v1/registrations") == 1
    assert message.split(":")[0] in result.stderr, shown(result)
    assert str(status) in result.stderr
    assert result.stdout == ""
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


@pytest.mark.parametrize(
    ("preflight", "needle"),
    [("false", "execute-api")],
    ids=["at-the-post"],
)
async def test_a_signing_name_the_registry_refuses_is_exit_5_and_leaves_nothing(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, preflight: str, needle: str
) -> None:
    """`REGISTRAR_MIMS_SERVICE_NAME` the registry does not take is 403: at the preflight exit 5
    naming the setting (README), before any upload; with the preflight off, at the POST: exit 5
    with the registry's message (which names the service), nothing left."""
    job = make_job(tmp_path)
    env = environment(stack, settings, job, REGISTRAR_PREFLIGHT=preflight, REGISTRAR_MIMS_SERVICE_NAME="execute-api")
    result = run(env, "register")
    assert "Traceback" not in result.stderr, shown(result)
    assert result.returncode == 5, shown(result)
    assert needle in result.stderr, shown(result)
    assert "403" in result.stderr
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


# --- credentials from a profile -----------------------------------------------------------------


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "aws-config"
    path.write_text(text)
    return path


async def test_credentials_from_a_named_profile_with_a_session_token_register(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """AWS_PROFILE naming a profile of AWS_CONFIG_FILE (keys and a session token there, none in the
    environment): S3 and the registry are signed with it; exit 0; nothing left; the token never printed."""
    job = make_job(tmp_path)
    config = write_config(
        tmp_path,
        f"[profile pipeline]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
        f"aws_session_token = {TOKEN}\nregion = us-west-2\n",
    )
    env = no_static_credentials(
        tmp_path,
        environment(stack, settings, job, REGISTRAR_LOG_LEVEL="DEBUG"),
        AWS_PROFILE="pipeline",
        AWS_CONFIG_FILE=str(config),
    )
    result = run(env, "register")
    assert result.returncode == 0, shown(result)
    assert len(result.stdout.splitlines()) == 2
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    assert_no_secret(result.stdout, result.stderr)


_PROC_FAILS = "[profile proc]\ncredential_process = sh -c 'echo denied-by-broker >&2; exit 1'\n"
_LOOP = (
    "[profile a]\nrole_arn = arn:aws:iam::123456789012:role/x\nsource_profile = b\n"
    "[profile b]\nrole_arn = arn:aws:iam::123456789012:role/y\nsource_profile = a\n"
)
_OTHER = "[profile other]\naws_access_key_id = A\naws_secret_access_key = B\n"


@pytest.mark.parametrize(
    ("command", "profile", "text", "needles"),
    [
        ("register", "proc", _PROC_FAILS, ["proc"]),
        ("register", "a", _LOOP, ["AWS_PROFILE"]),
        ("register", "missing", _OTHER, ["missing", "AWS_PROFILE"]),
    ],
    ids=["credential-process-fails", "source-profile-loop", "profile-not-in-file"],
)
async def test_a_profile_whose_credentials_cannot_be_had_is_exit_2_naming_it(
    tmp_path: Path,
    stack: LocalStack,
    settings: Settings,
    s3: Any,
    profile: str,
    text: str,
    needles: list[str],
    command: str,
) -> None:
    """README preflight: an AWS_PROFILE that names no profile, or whose credential source fails, is
    2 naming what to fix, before anything is uploaded or listed; `sweep` checks the same first."""
    job = make_job(tmp_path)
    config = write_config(tmp_path, text)
    env = no_static_credentials(
        tmp_path, environment(stack, settings, job), AWS_PROFILE=profile, AWS_CONFIG_FILE=str(config)
    )
    result = run(env, command)
    assert "Traceback" not in result.stderr, shown(result)
    assert result.returncode == 2, shown(result)
    assert "error" in result.stderr.lower()
    for needle in needles:
        assert needle in result.stderr, f"{needle!r} not named\n{shown(result)}"
    assert result.stdout == ""
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


@pytest.mark.parametrize("command", ["register"])
async def test_a_credential_process_that_prints_no_json_is_exit_2_naming_the_profile(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, command: str
) -> None:
    """A profile's `credential_process` that prints something other than its JSON (a login prompt,
    an error on stdout): its credential source fails, so README's preflight says exit 2 naming
    what to fix (the profile), no traceback, nothing written."""
    job = make_job(tmp_path)
    config = write_config(tmp_path, "[profile broker]\ncredential_process = sh -c 'echo please log in first'\n")
    env = no_static_credentials(
        tmp_path, environment(stack, settings, job), AWS_PROFILE="broker", AWS_CONFIG_FILE=str(config)
    )
    result = run(env, command)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    assert result.stdout == ""
    assert result.returncode == 2, shown(result)
    assert "Traceback" not in result.stderr, shown(result)
    assert "broker" in result.stderr, shown(result)


async def test_a_failing_container_credentials_endpoint_is_not_blamed_on_a_profile(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, endpoint: CredentialEndpoint
) -> None:
    """No profile is set; the credentials come from the container endpoint, which answers 500.
    The message should send the user to that endpoint's variable, not to AWS_PROFILE."""
    endpoint.failing.set()
    job = make_job(tmp_path)
    env = no_static_credentials(tmp_path, environment(stack, settings, job), **endpoint.env())
    result = run(env, "register")
    assert result.returncode == 2, shown(result)
    assert "AWS_CONTAINER_CREDENTIALS_FULL_URI" in result.stderr or endpoint.uri in result.stderr, shown(result)
    assert "check AWS_PROFILE" not in result.stderr, shown(result)


async def test_an_unreachable_container_credentials_endpoint_is_exit_2_within_seconds(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """Nothing listens at AWS_CONTAINER_CREDENTIALS_FULL_URI: the chain does not resolve; exit 2
    saying the credentials could not be had, no traceback, nothing written, no hang."""
    with CredentialEndpoint() as closed:
        uri = closed.uri
    job = make_job(tmp_path)
    env = no_static_credentials(
        tmp_path,
        environment(stack, settings, job),
        AWS_CONTAINER_CREDENTIALS_FULL_URI=uri,
        AWS_CONTAINER_AUTHORIZATION_TOKEN=AUTH_TOKEN,
    )
    result = run(env, "register", timeout=40)
    assert "Traceback" not in result.stderr, shown(result)
    assert result.returncode == 2, shown(result)
    assert "credentials" in result.stderr
    assert result.stdout == ""
    assert_no_secret(result.stderr)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


def _expire_after_first_part() -> Any:
    expired = threading.Event()

    def rule(method: str, target: str) -> Reply | None:
        if is_part(method, target):
            expired.set()
        if not expired.is_set():
            return None
        return Reply(403, b"", "Forbidden") if method == "HEAD" else s3_error(403, "ExpiredToken")

    return rule


async def test_upload_whose_token_expires_mid_way_names_the_open_upload(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """`upload` (no temporary prefix to sweep): S3 answers ExpiredToken from the first part on, the
    abort included: exit 4, and the error names the open upload (bucket, key, upload id: faults.md)."""
    job = make_job(tmp_path, model_bytes=12 * MiB)
    key = f"{settings.s3_prefix}direct/model.tar.gz"
    with FaultProxy(stack.s3_endpoint, _expire_after_first_part()) as proxy:
        env = environment(stack, settings, job, AWS_ENDPOINT_URL_S3=proxy.endpoint)
        result = run(env, "upload", str(job["model"]), f"s3://{settings.s3_bucket}/{key}", timeout=50)
    try:
        uploads = (await s3.list_multipart_uploads(Bucket=settings.s3_bucket, Prefix=settings.s3_prefix)).get(
            "Uploads", []
        )
        assert "Traceback" not in result.stderr, shown(result)
        assert result.returncode == 4, shown(result)
        assert "ExpiredToken" in result.stderr
        assert uploads, "the abort was refused, yet no upload is open?"
        for upload in uploads:
            assert upload["UploadId"] in result.stderr, shown(result)
            assert upload["Key"] in result.stderr, shown(result)
    finally:
        await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_sweep_with_an_expired_token_is_exit_4_naming_the_bucket(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """`sweep` whose listing is refused 403 ExpiredToken: README "4 if something could not be
    removed or listed", naming the bucket and the code; nothing removed."""
    await s3.put_object(
        Bucket=settings.s3_bucket, Key=f"{settings.s3_prefix}grp/20200101T000000Z-aaaaaaaaaaaa/model.tar.gz", Body=b"x"
    )

    def rule(method: str, target: str) -> Reply | None:
        if method == "HEAD":
            return None
        return s3_error(403, "ExpiredToken") if method == "GET" else None

    try:
        with FaultProxy(stack.s3_endpoint, rule) as proxy:
            env = environment(stack, settings, make_job(tmp_path), AWS_ENDPOINT_URL_S3=proxy.endpoint)
            result = run(env, "sweep", "--older-than", "0s", timeout=50)
        assert "Traceback" not in result.stderr, shown(result)
        assert result.returncode == 4, shown(result)
        assert "ExpiredToken" in result.stderr, shown(result)
        assert settings.s3_bucket in result.stderr
        assert len(await leftovers(s3, settings.s3_bucket, settings.s3_prefix)) == 1
    finally:
        await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


def register_going_stale(
    tmp_path: Path,
    stack: LocalStack,
    settings: Settings,
    endpoint: CredentialEndpoint,
    when: Callable[[str, str], bool],
) -> subprocess.CompletedProcess[str]:
    """`register` (a 12 MiB model, credentials from the container endpoint) whose keys go stale
    from the first S3 request `when` picks on."""

    def rule(method: str, target: str) -> None:
        if when(method, target):
            endpoint.stale.set()

    registry_keys = {k: SecretStr(v) for k, v in ROTATING.items()}
    with mims_server(stack, signing_secrets=registry_keys) as registry, FaultProxy(stack.s3_endpoint, rule) as proxy:
        base = environment(
            stack,
            settings,
            make_job(tmp_path, model_bytes=12 * MiB),
            AWS_ENDPOINT_URL_S3=proxy.endpoint,
            REGISTRAR_MIMS_ENDPOINT=registry.endpoint,
            REGISTRAR_CLEANUP_TIMEOUT="3",
        )
        return run(no_static_credentials(tmp_path, base, **endpoint.env()), "register")


async def test_a_credential_source_handing_out_expired_keys_mid_upload_is_a_storage_failure(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, endpoint: CredentialEndpoint
) -> None:
    """From the first part on, the container endpoint answers with keys that expired already (a
    stale cache): botocore cannot get valid credentials.  A documented exit code (4, or 2 for
    credentials), not 1; no traceback; what is left named."""
    result = register_going_stale(tmp_path, stack, settings, endpoint, is_part)
    left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    try:
        assert_leftovers_named(left, result.stderr)
        assert result.stdout == ""
        assert result.returncode in (2, 4), shown(result)
        assert "unexpected error" not in result.stderr, shown(result)
    finally:
        await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


async def test_keys_expiring_once_the_upload_is_completed_fail_the_check_with_a_storage_exit(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, endpoint: CredentialEndpoint
) -> None:
    """The keys go stale as CompleteMultipartUpload goes out: the HeadObject that checks the
    stored model is the first call that cannot be signed (CI saw this order by chance, exit 1
    with a traceback).  Exit 4 naming the credential source, no traceback, what is left named."""
    result = register_going_stale(
        tmp_path, stack, settings, endpoint, lambda method, target: method == "POST" and "uploadId=" in target
    )
    left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    try:
        assert_leftovers_named(left, result.stderr)
        assert result.stdout == ""
        assert result.returncode == 4, shown(result)
        assert "Traceback" not in result.stderr, shown(result)
        assert "refreshed, but their source gave keys already expired" in result.stderr, shown(result)
    finally:
        await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


def test_a_credential_failure_no_handler_covers_is_exit_2_not_an_unexpected_error() -> None:
    """The command line's last net: aiobotocore's refresh failure raised from any call no
    narrower handler maps (a fault no server makes appear at will, so the command raises it
    itself) is the credential problem, exit 2, one message, no traceback."""
    code = (
        "import sys, io\n"
        "from async_registrar._cli import _run\n"
        "from async_registrar._console import ProgressDisplay, configure_logging\n"
        "async def command():\n"
        "    raise RuntimeError('Credentials were refreshed, but the refreshed credentials are still expired.')\n"
        "console = configure_logging('INFO', sys.stderr, 'text')\n"
        "sys.exit(_run(command, ProgressDisplay(console)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, shown(result)
    assert "Traceback" not in result.stderr, shown(result)
    assert "unexpected error" not in result.stderr, shown(result)
    assert "their source gave keys already expired" in result.stderr, shown(result)
