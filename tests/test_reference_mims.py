"""The reference MIMS service over real HTTP, on the session's moto S3."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from botocore.credentials import ReadOnlyCredentials
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate

from async_registrar._local import ACCESS_KEY, SECRET_KEY, LocalStack
from async_registrar._sigv4 import SigV4

from .conftest import registration_config, tar_gz


async def credentials() -> ReadOnlyCredentials:
    return ReadOnlyCredentials(ACCESS_KEY, SECRET_KEY, None)


@pytest.fixture
async def mims(stack: LocalStack) -> AsyncIterator[httpx.AsyncClient]:
    auth = SigV4(credentials, region="us-west-2", service="mims")
    async with httpx.AsyncClient(base_url=stack.mims_endpoint, auth=auth) as client:
        yield client


async def put_artifact(s3: Any, bucket: str, key: str, data: bytes) -> dict[str, Any]:
    await s3.put_object(Bucket=bucket, Key=key, Body=data)
    return {"s3_uri": f"s3://{bucket}/{key}", "size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


async def poll_until_done(mims: httpx.AsyncClient, registration_id: str) -> dict[str, Any]:
    import anyio

    with anyio.fail_after(10):
        while True:
            body: dict[str, Any] = (await mims.get(f"/v1/registrations/{registration_id}")).json()
            if body["status"] in ("SUCCEEDED", "FAILED"):
                return body
            await anyio.sleep(0.02)


async def test_a_registration_is_verified_and_copied(
    mims: httpx.AsyncClient, s3: Any, stack: LocalStack, prefix: str
) -> None:
    """PENDING, then SUCCEEDED with both artifacts copied byte for byte into the registry bucket."""
    model = tar_gz({"weights.bin": b"w" * 5000})
    payload = tar_gz({"sample.csv": b"a,b\n1,2\n"})
    body = {
        **registration_config(),
        "model_artifact": await put_artifact(s3, stack.temporary_bucket, prefix + "model.tar.gz", model),
        "payload_artifact": await put_artifact(s3, stack.temporary_bucket, prefix + "payload.tar.gz", payload),
    }
    response = await mims.post("/v1/registrations", json=body, headers={"Idempotency-Key": prefix})
    assert response.status_code == 202
    accepted = response.json()
    assert accepted["status"] == "PENDING"
    assert accepted["workflow_execution_arn"].startswith("arn:aws:states:us-west-2:")
    done = await poll_until_done(mims, accepted["registration_id"])
    assert done["status"] == "SUCCEEDED", done
    for name, data in (("model", model), ("payload", payload)):
        obj = await s3.get_object(Bucket=stack.registry_bucket, Key=f"models/{accepted['model_id']}/{name}.tar.gz")
        async with obj["Body"] as stream:
            assert await stream.read() == data


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"sha256": "0" * 64}, "has sha256"),
        ({"size_bytes": 1}, "holds"),
        ({"s3_uri": "s3://registrar-local-tmp/does/not/exist.tar.gz"}, "cannot be read: NoSuchKey"),
    ],
)
async def test_mismatches_end_failed_with_the_reason(
    mims: httpx.AsyncClient, s3: Any, stack: LocalStack, prefix: str, change: dict[str, Any], reason: str
) -> None:
    """A wrong sha256 or size, or a missing object, ends FAILED naming the problem."""
    artifact = await put_artifact(s3, stack.temporary_bucket, prefix + "model.tar.gz", tar_gz({"a": b"1"}))
    body = {**registration_config(), "model_artifact": {**artifact, **change}}
    accepted = (await mims.post("/v1/registrations", json=body, headers={"Idempotency-Key": prefix})).json()
    done = await poll_until_done(mims, accepted["registration_id"])
    assert done["status"] == "FAILED"
    assert reason in done["failure_reason"]


async def test_not_a_tar_gz_ends_failed(mims: httpx.AsyncClient, s3: Any, stack: LocalStack, prefix: str) -> None:
    """An artifact that is not a readable tar.gz is FAILED."""
    artifact = await put_artifact(s3, stack.temporary_bucket, prefix + "model.tar.gz", b"plain bytes, not gzip")
    body = {**registration_config(), "model_artifact": artifact}
    accepted = (await mims.post("/v1/registrations", json=body, headers={"Idempotency-Key": prefix})).json()
    done = await poll_until_done(mims, accepted["registration_id"])
    assert "not a readable tar.gz" in done["failure_reason"]


async def test_idempotency(mims: httpx.AsyncClient, s3: Any, stack: LocalStack, prefix: str) -> None:
    """The same key and body return the same registration; a different body with that key is 409."""
    artifact = await put_artifact(s3, stack.temporary_bucket, prefix + "model.tar.gz", tar_gz({"a": b"1"}))
    body = {**registration_config(), "model_artifact": artifact}
    first = await mims.post("/v1/registrations", json=body, headers={"Idempotency-Key": prefix})
    again = await mims.post("/v1/registrations", json=body, headers={"Idempotency-Key": prefix})
    assert first.status_code == 202
    assert again.status_code == 200
    assert first.json()["registration_id"] == again.json()["registration_id"]
    other = await mims.post(
        "/v1/registrations", json={**body, "model_owner": "someone-else"}, headers={"Idempotency-Key": prefix}
    )
    assert other.status_code == 409
    assert "already used for a different registration" in other.json()["message"]
    assert other.json()["registration_id"] == first.json()["registration_id"]  # the key's holder


async def test_a_list_of_regions_is_400(mims: httpx.AsyncClient, s3: Any, stack: LocalStack, prefix: str) -> None:
    """One registration is in one region: model_registration_region must be a name, not a list."""
    artifact = await put_artifact(s3, stack.temporary_bucket, prefix + "model.tar.gz", tar_gz({"a": b"1"}))
    body = {**registration_config(model_registration_region=["us-west-2"]), "model_artifact": artifact}
    response = await mims.post("/v1/registrations", json=body, headers={"Idempotency-Key": prefix})
    assert response.status_code == 400
    assert "one region name" in response.json()["message"]
    assert response.json()["errors"] == ["model_registration_region: must be a string such as 'us-west-2', got a list"]


async def test_invalid_bodies_name_each_field(mims: httpx.AsyncClient) -> None:
    """422 lists every bad field; non-JSON and a missing key are 400."""
    response = await mims.post(
        "/v1/registrations",
        json={**registration_config(model_owner=""), "model_artifact": {"s3_uri": "http://x", "size_bytes": -1}},
        headers={"Idempotency-Key": "k-invalid"},
    )
    assert response.status_code == 422
    errors = response.json()["errors"]
    assert any(e.startswith("model_owner:") for e in errors)
    assert any(e.startswith("model_artifact['s3_uri']:") for e in errors)
    assert any(e.startswith("model_artifact['size_bytes']:") for e in errors)
    assert any(e.startswith("model_artifact['sha256']: required") for e in errors)
    not_json = await mims.post("/v1/registrations", content=b"{", headers={"Idempotency-Key": "k"})
    assert not_json.status_code == 400
    no_key = await mims.post("/v1/registrations", json={})
    assert no_key.status_code == 400
    assert "Idempotency-Key" in no_key.json()["message"]


async def test_unsigned_requests_are_401_and_badly_signed_ones_403(stack: LocalStack) -> None:
    """No credentials at all is 401 (with WWW-Authenticate, as HTTP has it for a request
    without credentials); a malformed signature, or one made with the wrong secret, 403."""

    async def wrong() -> ReadOnlyCredentials:
        return ReadOnlyCredentials(ACCESS_KEY, "not-the-secret", None)

    async with httpx.AsyncClient(base_url=stack.mims_endpoint) as plain:
        response = await plain.get("/v1/registrations/reg-x")
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == "AWS4-HMAC-SHA256"
        assert "no Authorization header" in response.json()["message"]
        malformed = await plain.get("/v1/registrations/reg-x", headers={"Authorization": "Bearer x"})
        assert malformed.status_code == 403
        assert "missing or malformed SigV4" in malformed.json()["message"]
        badly = await plain.get("/v1/registrations/reg-x", auth=SigV4(wrong, region="us-west-2", service="mims"))
        assert badly.status_code == 403
        assert "does not match" in badly.json()["message"]


async def test_unknown_registrations_are_404(mims: httpx.AsyncClient) -> None:
    """A registration id the service never issued is 404 with a message."""
    response = await mims.get("/v1/registrations/reg-unknown")
    assert response.status_code == 404
    assert "reg-unknown" in response.json()["message"]


async def test_openapi_document_is_served(stack: LocalStack) -> None:
    """The contract is published at /openapi.json."""
    async with httpx.AsyncClient(base_url=stack.mims_endpoint) as plain:
        document = (await plain.get("/openapi.json")).json()
    assert set(document["paths"]) == {"/v1/registrations", "/v1/registrations/{registration_id}"}
    assert "RegistrationSubmission" in document["components"]["schemas"]
    validate(document)  # a valid OpenAPI 3.1 document (links, patterns and all)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.one_of(
        json_values,
        st.fixed_dictionaries({}, optional=dict.fromkeys([*registration_config(), "model_artifact"], json_values)),
    )
)
def test_no_body_makes_the_service_fail(stack: LocalStack, body: object) -> None:
    """Arbitrary JSON bodies, signed, never get a 5xx."""
    import anyio

    async def post() -> int:
        auth = SigV4(credentials, region="us-west-2", service="mims")
        async with httpx.AsyncClient(base_url=stack.mims_endpoint, auth=auth) as client:
            response = await client.post(
                "/v1/registrations", content=json.dumps(body).encode(), headers={"Idempotency-Key": "fuzz"}
            )
            return response.status_code

    assert anyio.run(post) < 500
