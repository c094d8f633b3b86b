"""The reference registry checks what it claims to (issue 19): the payload hash is the body's,
the credential scope's region is the registration's, Idempotency-Key is signed, bodies are
bounded before they are read, and two instances may start at once on a new bucket."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from pydantic import SecretStr

from async_registrar._local import ACCESS_KEY, REGION, SECRET_KEY, LocalStack
from async_registrar._s3 import make_session, open_s3_client
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
    with mims_server(stack, max_body_bytes=4096) as registry:
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

    from async_registrar._sigv4 import SigV4

    async def credentials() -> ReadOnlyCredentials:
        return ReadOnlyCredentials(ACCESS_KEY, SECRET_KEY, None)

    async with httpx.AsyncClient(auth=SigV4(credentials, region=REGION, service="mims")) as client:
        response = await client.post(
            f"{endpoint}/v1/registrations", content=submission("own-client"), headers={"Idempotency-Key": "k-own"}
        )
    assert response.status_code == 202, response.text


async def test_a_body_over_the_limit_is_413_before_it_is_read(endpoint: str) -> None:
    """MIMS_MAX_BODY_BYTES (4096 here): a larger body is 413, by its Content-Length or, sent
    chunked without one, as soon as it passes the limit; unsigned, it never reaches the check."""
    big = b"x" * 10_000
    response = await post(endpoint, big, {"content-type": "application/json"})
    assert response.status_code == 413
    assert "larger than 4096 bytes" in response.json()["message"]

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
