"""The reference registry checks what it claims to (issue 19): the payload hash is the body's,
the credential scope's region is the registration's, Idempotency-Key is signed, bodies are
bounded before they are read, and two instances may start at once on a new bucket."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials, ReadOnlyCredentials
from pydantic import SecretStr

from async_registrar._local import ACCESS_KEY, REGION, SECRET_KEY, LocalStack
from async_registrar._s3 import make_session, open_s3_client
from async_registrar._sigv4 import SigV4
from async_registrar.reference_mims._app import _ensure_bucket

from .conftest import mims_server, registration_config
from .fault_proxy import FaultProxy, Reply


def signed_headers(
    url: str, body: bytes, *, region: str = REGION, extra: dict[str, str] | None = None, method: str = "POST"
) -> dict[str, str]:
    """SigV4 headers for `body` at `url` (botocore's signer), over `extra` too."""
    request = AWSRequest(
        method=method, url=url, data=body, headers={"content-type": "application/json", **(extra or {})}
    )
    SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "mims", region).add_auth(request)
    return dict(request.headers.items())


def submission(prefix: str = "hardening") -> bytes:
    body = {
        **registration_config(),
        "model_artifact": {
            "s3_uri": f"s3://registrar-local-tmp/{prefix}/model.tar.gz",
            "sha256": "0" * 64,
            "size_bytes": 10,
        },
    }
    return json.dumps(body).encode()


@pytest.fixture
async def endpoint(stack: LocalStack) -> AsyncIterator[str]:
    with mims_server(stack, max_body_bytes=16384) as registry:
        yield registry.endpoint


async def post(endpoint: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.post(f"{endpoint}/v1/registrations", content=body, headers=headers)


async def test_a_signed_payload_hash_must_be_the_bodys(endpoint: str) -> None:
    """Signed with x-amz-content-sha256 for one body, sent with another: 403 (it was 202)."""
    url = f"{endpoint}/v1/registrations"
    signed_for = submission("signed")
    sent = submission("sent-instead")
    headers = signed_headers(
        url,
        signed_for,
        extra={"Idempotency-Key": "k-swap", "X-Amz-Content-SHA256": hashlib.sha256(signed_for).hexdigest()},
    )
    response = await post(endpoint, sent, headers)
    assert response.status_code == 403
    assert "x-amz-content-sha256" in response.json()["message"]


async def test_unsigned_payloads_are_refused(endpoint: str) -> None:
    url = f"{endpoint}/v1/registrations"
    body = submission("unsigned")
    headers = signed_headers(
        url, body, extra={"Idempotency-Key": "k-unsigned", "X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"}
    )
    response = await post(endpoint, body, headers)
    assert response.status_code == 403
    assert "unsigned payloads are not accepted" in response.json()["message"]


@pytest.mark.parametrize("region", ["eu-west-1", "xx-bogus-1"])
async def test_the_signature_region_must_be_the_registrations(endpoint: str, region: str) -> None:
    """A us-west-2 registration signed for another region: 403 naming both (it was 202)."""
    url = f"{endpoint}/v1/registrations"
    body = submission(f"region-{region}")
    response = await post(
        endpoint, body, signed_headers(url, body, region=region, extra={"Idempotency-Key": f"k-{region}"})
    )
    assert response.status_code == 403
    assert f"signed for region {region!r}, but the registration is in 'us-west-2'" in response.json()["message"]


async def test_a_status_poll_signed_for_another_region_is_refused(endpoint: str) -> None:
    url = f"{endpoint}/v1/registrations"
    body = submission("poll-region")
    accepted = await post(endpoint, body, signed_headers(url, body, extra={"Idempotency-Key": "k-poll-region"}))
    assert accepted.status_code == 202, accepted.text
    status_url = f"{url}/{accepted.json()['registration_id']}"
    async with httpx.AsyncClient() as client:
        good = await client.get(status_url, headers=signed_headers(status_url, b"", method="GET"))
        wrong = await client.get(status_url, headers=signed_headers(status_url, b"", method="GET", region="eu-west-1"))
    assert good.status_code == 200
    assert wrong.status_code == 403


async def test_idempotency_key_must_be_signed(endpoint: str) -> None:
    """An Idempotency-Key added after signing (a captured request replayed under a new key): 403."""
    url = f"{endpoint}/v1/registrations"
    body = submission("replay")
    headers = {**signed_headers(url, body), "Idempotency-Key": "k-added-later"}
    response = await post(endpoint, body, headers)
    assert response.status_code == 403
    assert "idempotency-key" in response.json()["message"]


async def test_the_registrars_own_client_signs_what_the_service_requires(endpoint: str) -> None:
    """The registrar's SigV4 signs Idempotency-Key and the body: the service accepts it."""
    from botocore.credentials import ReadOnlyCredentials

    async def credentials() -> ReadOnlyCredentials:
        return ReadOnlyCredentials(ACCESS_KEY, SECRET_KEY, None)

    async with httpx.AsyncClient(auth=SigV4(credentials, region=REGION, service="mims")) as client:
        response = await client.post(
            f"{endpoint}/v1/registrations", content=submission("own-client"), headers={"Idempotency-Key": "k-own"}
        )
    assert response.status_code == 202, response.text


async def test_a_body_over_the_limit_is_413_before_it_is_read(endpoint: str) -> None:
    """MIMS_MAX_BODY_BYTES (16 KiB here): a larger body is 413, by its Content-Length or, sent
    chunked without one, as soon as it passes the limit; unsigned, it never reaches the check."""
    big = b"x" * 20_000
    response = await post(endpoint, big, {"content-type": "application/json"})
    assert response.status_code == 413
    assert "larger than 16384 bytes" in response.json()["message"]

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"y" * 1024

    async with httpx.AsyncClient() as client:
        streamed = await client.post(f"{endpoint}/v1/registrations", content=chunks())
    assert streamed.status_code == 413


async def test_a_bucket_created_meanwhile_is_no_error(stack: LocalStack) -> None:
    """Two instances starting at once on a new registry bucket: the one whose CreateBucket
    comes second gets BucketAlreadyOwnedByYou, and starts all the same (it exited before)."""
    bucket = "mims-registry-race"

    def head_says_missing(method: str, target: str) -> Any:
        return Reply(404, b"", "Not Found") if method == "HEAD" and target.rstrip("/") == f"/{bucket}" else None

    session = make_session(SecretStr(ACCESS_KEY), SecretStr(SECRET_KEY))
    with FaultProxy(stack.s3_endpoint, head_says_missing) as proxy:
        async with open_s3_client(session, region=REGION, endpoint_url=proxy.endpoint) as s3:
            async with anyio.create_task_group() as tg:  # the first one creates it
                tg.start_soon(_ensure_bucket, s3, bucket, REGION)
            await _ensure_bucket(s3, bucket, REGION)  # HEAD says missing, CREATE says it exists
    assert proxy.count("PUT", f"/{bucket}") == 2


def submission_with(**changes: Any) -> bytes:
    body = json.loads(submission("limits"))
    body.update(changes)
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (submission("x")[:-1] + b', "performance_metadata": {"n": ' + b"9" * 5000 + b"}}", "more than 30 digits"),
        (submission("x")[:-1] + b', "performance_metadata": {"s": "\\ud800"}}', "lone surrogate"),
        (
            submission("x")[:-1] + b', "performance_metadata": {"d": ' + b"[" * 300 + b"]" * 300 + b"}}",
            "nested deeper than 64",
        ),
    ],
    ids=["5000-digit-integer", "lone-surrogate", "depth-300"],
)
async def test_hostile_json_is_400_not_500(endpoint: str, body: bytes, says: str) -> None:
    """Each was a 500 with a plain-text body."""
    url = f"{endpoint}/v1/registrations"
    response = await post(endpoint, body, signed_headers(url, body, extra={"Idempotency-Key": f"k-{says[:8]}"}))
    assert response.status_code == 400, response.text
    assert says in response.json()["message"]


@pytest.mark.parametrize("size", [True, "1", 12.5], ids=["bool", "string", "fraction"])
async def test_size_bytes_is_a_strict_integer(endpoint: str, size: object) -> None:
    url = f"{endpoint}/v1/registrations"
    artifact = json.loads(submission("strict"))["model_artifact"]
    body = submission_with(model_artifact={**artifact, "size_bytes": size})
    response = await post(endpoint, body, signed_headers(url, body, extra={"Idempotency-Key": f"k-size-{size!r}"}))
    assert response.status_code == 422, response.text
    assert any("size_bytes" in e for e in response.json()["errors"]), response.json()


async def test_a_whole_float_size_is_that_integer(endpoint: str) -> None:
    """JSON Schema's `integer` takes 12.0 (a number without a fraction): so does the service."""
    url = f"{endpoint}/v1/registrations"
    artifact = json.loads(submission("whole"))["model_artifact"]
    body = submission_with(model_artifact={**artifact, "size_bytes": 12.0})
    response = await post(endpoint, body, signed_headers(url, body, extra={"Idempotency-Key": "k-size-whole"}))
    assert response.status_code == 202, response.text
    assert response.json()["model_artifact"]["size_bytes"] == 12


@pytest.mark.parametrize("key", ["a/../model.tar.gz", "a//model.tar.gz", "./model.tar.gz"])
async def test_keys_with_dot_segments_are_400(endpoint: str, key: str) -> None:
    url = f"{endpoint}/v1/registrations"
    artifact = json.loads(submission("keys"))["model_artifact"]
    body = submission_with(model_artifact={**artifact, "s3_uri": f"s3://registrar-local-tmp/{key}"})
    response = await post(endpoint, body, signed_headers(url, body, extra={"Idempotency-Key": f"k-key-{key}"}))
    assert response.status_code == 400, response.text
    assert "not a plain S3 key" in response.json()["message"]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_a_500_mb_unsigned_post_costs_the_service_no_memory(stack: LocalStack, unused_tcp_port: int) -> None:
    """The service as it runs (uvicorn, its own process), sent 500 MB unsigned and chunked (no
    Content-Length): 413 once it passes 1 MiB, and its RSS stays within 20 MiB of before (an
    unsigned 500 MB POST raised it by 1.3 GB)."""
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL_S3": stack.s3_endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": REGION,
        "MIMS_REGISTRY_BUCKET": "mims-registry",
    }
    command = [sys.executable, "-m", "async_registrar", "--log-level", "WARNING", "mims-server"]
    server = subprocess.Popen([*command, "--port", str(unused_tcp_port)], env=env)
    try:
        endpoint = f"http://127.0.0.1:{unused_tcp_port}"
        async with httpx.AsyncClient() as client:
            for _ in range(100):
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"{endpoint}/health")).status_code == 200:
                        break
                await anyio.sleep(0.1)
            before = _rss_kib(server.pid)

            async def body() -> AsyncIterator[bytes]:
                chunk = b"z" * (1024 * 1024)
                for _ in range(500):
                    yield chunk

            status = None
            with contextlib.suppress(httpx.TransportError):  # the service may close while we still send
                status = (await client.post(f"{endpoint}/v1/registrations", content=body(), timeout=60)).status_code
            after = _rss_kib(server.pid)
        assert status in (413, None)
        assert after - before < 20 * 1024, f"RSS grew by {(after - before) / 1024:.0f} MiB"
    finally:
        server.terminate()
        server.wait(10)


async def test_artifacts_only_from_allowed_buckets(endpoint: str) -> None:
    """Confused deputy: an artifact in a bucket the registry may read but was not configured
    to take artifacts from (MIMS_ALLOWED_BUCKETS) is 403 naming it (it was accepted and copied)."""
    url = f"{endpoint}/v1/registrations"
    artifact = json.loads(submission("deputy"))["model_artifact"]
    body = submission_with(model_artifact={**artifact, "s3_uri": "s3://mims-registry/models/someone-else/model.tar.gz"})
    response = await post(endpoint, body, signed_headers(url, body, extra={"Idempotency-Key": "k-deputy"}))
    assert response.status_code == 403, response.text
    assert "does not read artifacts from bucket(s) mims-registry" in response.json()["message"]
    assert "MIMS_ALLOWED_BUCKETS" in response.json()["message"]
