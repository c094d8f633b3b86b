"""Signed payloads whose sha256 the part cutter computed already (issue 16: client CPU).

Where a server checks signed payloads (JuiceFS, B2 with `when_required`), every part's
sha256 goes into its signature. botocore's S3 signers hash the body again, and the CRT's
copies it into itself first; the cutter hashes each part anyway while its bytes are in the
cache, so the signer takes that value (`PartBody.payload_sha256`). These tests show the
value is the one signed (a wrong one is refused by a server that checks it), with the CRT's
signer and botocore's own, and that a body without one is signed as before.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import botocore.auth
import pytest
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from pydantic import SecretStr

from async_registrar import Registrar, Settings
from async_registrar._local import ACCESS_KEY, REGION, SECRET_KEY, LocalStack
from async_registrar._multipart import PartBody
from async_registrar._s3 import KNOWN_PAYLOAD_SIGNER, _known_payload_auth, make_session, open_s3_client

from .conftest import MiB, leftovers
from .fault_proxy import FaultProxy, S3Server

DATA = os.urandom(256 * 1024)
SHA256 = hashlib.sha256(DATA).hexdigest()


async def put_through_a_checking_server(
    stack: LocalStack, settings: Settings, body: Any
) -> tuple[Exception | None, list[dict[str, str]]]:
    """PutObject of `body` through a server that checks the signed payload's sha256."""
    session = make_session(SecretStr(ACCESS_KEY), SecretStr(SECRET_KEY))
    with FaultProxy(stack.s3_endpoint, lambda method, target: None, body_rule=S3Server(frozenset({"sha256"}))) as proxy:
        async with open_s3_client(
            session, region=REGION, endpoint_url=proxy.endpoint, checksums="when_required"
        ) as client:  # when_required signs payloads
            try:
                await client.put_object(Bucket=settings.s3_bucket, Key=f"{settings.s3_prefix}part", Body=body)
            except ClientError as exc:
                return exc, puts(proxy)
            finally:
                await client.delete_object(Bucket=settings.s3_bucket, Key=f"{settings.s3_prefix}part")
    return None, puts(proxy)


def puts(proxy: FaultProxy) -> list[dict[str, str]]:
    return [headers for (method, _), headers in zip(proxy.seen, proxy.headers, strict=True) if method == "PUT"]


async def test_the_known_sha256_is_the_one_signed(stack: LocalStack, settings: Settings) -> None:
    error, headers = await put_through_a_checking_server(stack, settings, PartBody(DATA, SHA256))
    assert error is None
    assert [h.get("x-amz-content-sha256") for h in headers] == [SHA256]


async def test_a_wrong_known_sha256_is_signed_as_it_is_and_refused(
    stack: LocalStack, settings: Settings, s3: Any
) -> None:
    """Proof that the signer did not hash the body itself: the value it was given went out."""
    wrong = hashlib.sha256(b"something else").hexdigest()
    error, headers = await put_through_a_checking_server(stack, settings, PartBody(DATA, wrong))
    assert isinstance(error, ClientError)
    assert error.response["Error"]["Code"] == "XAmzContentSHA256Mismatch"
    assert [h.get("x-amz-content-sha256") for h in headers] == [wrong]
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_body_without_a_known_sha256_is_hashed_as_before(stack: LocalStack, settings: Settings) -> None:
    for body in (DATA, PartBody(DATA)):
        error, headers = await put_through_a_checking_server(stack, settings, body)
        assert error is None
        assert [h.get("x-amz-content-sha256") for h in headers] == [SHA256]


@pytest.mark.parametrize("base", ["botocore", "table"], ids=["botocore-signer", "installed-s3v4-signer"])
def test_each_signer_takes_the_known_value_without_reading_the_body(base: str) -> None:
    """botocore's pure-Python S3 signer and whichever one the table holds for "s3v4" (the
    CRT's where installed): the known value is signed, and the body is never read."""

    class Unreadable(PartBody):
        def read(self, size: int | None = -1, /) -> memoryview:
            raise AssertionError("the signer read the body")

        def readinto(self, buffer: Any, /) -> int:
            raise AssertionError("the signer read the body")

    cls = botocore.auth.S3SigV4Auth if base == "botocore" else botocore.auth.AUTH_TYPE_MAPS["s3v4"]
    signer = _known_payload_auth(cls)(Credentials("AKID", "SECRET"), "s3", REGION)
    request = AWSRequest(method="PUT", url="http://127.0.0.1:1/bucket/key?partNumber=1", data=Unreadable(DATA, SHA256))
    request.context["client_config"] = type("Config", (), {"s3": {"payload_signing_enabled": True}})()
    signer.add_auth(request)
    assert request.headers["X-Amz-Content-SHA256"] == SHA256


async def test_an_upload_to_a_server_that_checks_signed_payloads_signs_the_cutters_hashes(
    tmp_path: Path, stack: LocalStack, settings: Settings, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the whole pipeline (probe, cutter, uploaders): every part is signed with the
    sha256 the cutter computed, and the server that checks them takes each one."""
    signer = botocore.auth.AUTH_TYPE_MAPS[KNOWN_PAYLOAD_SIGNER]
    given: list[str | None] = []
    for name in ("payload", "_get_existing_sha256"):
        original = getattr(signer, name)

        def recording(self: Any, request: Any, original: Any = original) -> Any:
            if "partNumber=" in request.url:
                given.append(getattr(request.body, "payload_sha256", None))
            return original(self, request)

        monkeypatch.setattr(signer, name, recording)
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(os.urandom(12 * MiB))
    key = f"{settings.s3_prefix}model.tar.gz"
    with FaultProxy(stack.s3_endpoint, lambda method, target: None, body_rule=S3Server(frozenset({"sha256"}))) as proxy:
        changed = settings.model_copy(update={"s3_endpoint_url": proxy.endpoint, "part_size": 5 * MiB})
        async with Registrar(changed) as registrar:
            result = await registrar.upload(model, f"s3://{settings.s3_bucket}/{key}")
    assert result.integrity == "sigv4-payload"
    assert result.parts == 3
    assert len(given) >= 3
    assert None not in given
    assert len(set(given)) == 3  # one per part (a part signed twice, by the CRT, gives the same)
    await s3.delete_object(Bucket=settings.s3_bucket, Key=key)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_presigned_uploads_are_left_to_botocore(stack: LocalStack, settings: Settings) -> None:
    """A presigned PUT URL or POST form from one of our clients (signature versions with a
    suffix): signed by botocore's own signers, not refused as an unknown version."""
    session = make_session(SecretStr(ACCESS_KEY), SecretStr(SECRET_KEY))
    async with open_s3_client(session, region=REGION, endpoint_url=stack.s3_endpoint) as client:
        params = {"Bucket": settings.s3_bucket, "Key": f"{settings.s3_prefix}presigned"}
        url = await client.generate_presigned_url("put_object", Params=params)
        part = await client.generate_presigned_url("upload_part", Params={**params, "UploadId": "x", "PartNumber": 1})
        form = await client.generate_presigned_post(settings.s3_bucket, f"{settings.s3_prefix}presigned")
    assert "Signature=" in url
    assert "Signature=" in part
    assert {"signature", "x-amz-signature"} & set(form["fields"])
