"""Capability probe: wrong conclusions it drew (and cached) that weakened the uploads' check
silently.  A real moto server behind `FaultProxy`/`S3Server`, as in test_capabilities.py."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import SecretStr

from async_registrar import Registrar, Settings, StorageError, _capabilities
from async_registrar._capabilities import adapt_uploads
from async_registrar._local import ACCESS_KEY, REGION, SECRET_KEY, LocalStack
from async_registrar._s3 import make_session, open_s3_client

from .conftest import leftovers
from .fault_proxy import FaultProxy, Hold, S3Server, s3_error
from .test_capabilities import through, weights


async def test_two_uploads_probing_one_client_at_once_cache_what_the_server_checks(
    stack: LocalStack, settings: Settings
) -> None:
    """Two uploads of one registrar (one client) probe the same endpoint at once.  The first
    to finish made the client sign every PutObject's payload and drop its CRC header
    (`prepare_uploads`); the other's CRC probe, sent after that, went out without a CRC and
    signed, was refused by the signed-payload check, and found the server 'verifies CRC
    headers': it cached crc32 for the endpoint, so every later client (the next registrar of
    a service) sent CRC32 only, which this server does not check: no check at all."""
    server = S3Server(frozenset({"sha256"}))  # JuiceFS-like: signed payloads only
    release = threading.Event()

    def rule(method: str, target: str) -> object:
        path = target.split("?")[0]
        if method == "PUT" and "/b/.capabilities-" in path and path.endswith("-crc"):
            return Hold(release)  # the second probe's first request waits for the first probe
        return None

    with FaultProxy(stack.s3_endpoint, rule, body_rule=server) as proxy:
        session = make_session(SecretStr(ACCESS_KEY), SecretStr(SECRET_KEY))
        async with open_s3_client(session, region=REGION, endpoint_url=proxy.endpoint) as client:
            found: dict[str, Any] = {}

            async def adapt(name: str) -> None:
                found[name] = await adapt_uploads(
                    client, settings.s3_bucket, f"{settings.s3_prefix}{name}/", settings, where=name, removal_timeout=5
                )
                if name == "a":
                    release.set()

            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(adapt, "a")
                    await anyio.sleep(0)
                    tg.start_soon(adapt, "b")
            known = _capabilities.known_capabilities(client, settings)
            assert await leftovers(client, settings.s3_bucket, settings.s3_prefix) == []
    release.set()
    assert found["a"].integrity == "sigv4-payload"
    assert found["b"].integrity == "sigv4-payload", found["b"].describe()
    assert known is not None
    assert known.integrity == "sigv4-payload", known.describe()


async def test_a_server_that_refuses_every_probe_request_is_not_found_to_check_signed_payloads(
    tmp_path: Path, stack: LocalStack, s3: Any, settings: Settings
) -> None:
    """AWS refuses a key longer than 1024 bytes with 400 KeyTooLongError.  `upload` probes
    under the target's key, so a target key of ~1000 bytes made every probe request (the
    undamaged one too) too long: each damaged request was 'refused', so the server 'checks
    Content-MD5 and signed payloads'.  Here the server checks nothing: the upload said
    'sigv4-payload', and a part damaged on the way was taken without a word.  (A server
    that refuses every PutObject with a 400 for any reason gets the same.)"""
    server = S3Server()  # checks nothing

    def aws_key_limit(method: str, target: str) -> object:
        path = target.split("?")[0]
        key = path.split("/", 2)[2] if path.count("/") >= 2 else ""
        if method == "PUT" and len(key.encode()) > 1024:  # percent-encoded: only ASCII letters here
            return s3_error(400, "KeyTooLongError")
        return None

    key = f"{settings.s3_prefix}{'m' * (1000 - len(settings.s3_prefix) - 7)}.tar.gz"
    assert len(key) == 1000
    with FaultProxy(stack.s3_endpoint, aws_key_limit, body_rule=server) as proxy:
        server.damage("partNumber=2", times=1)
        async with Registrar(through(settings, proxy)) as registrar:
            # Inconclusive now: the uploads carry the settings' CRC32, and the object read back
            # (moto reports the CRC of what it stored) is found damaged.  Before: 'sigv4-payload',
            # the upload returned, the damaged object was left in place.
            with pytest.raises(StorageError, match="is not what was uploaded"):
                await registrar.upload(weights(tmp_path / "m"), f"s3://{settings.s3_bucket}/{key}")
        known = [c for k, c in _capabilities._FOUND.items() if k[0] == proxy.endpoint]
    assert server.damaged == 1
    assert known == [], [c.describe() for c in known]
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


class _Answer:
    """A response body for `_https_server`'s answers."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    async def read(self) -> bytes:
        return self._body


def _https_server(checks: frozenset[str], seen: list[tuple[str, dict[str, str]]]) -> Any:
    """A before-send handler answering in place of an HTTPS S3 (the loopback moto speaks no
    TLS): like `S3Server`, it checks what `checks` names, and takes everything else."""
    import base64
    import zlib

    from aiobotocore.awsrequest import AioAWSResponse

    def answer(request: Any, **_: Any) -> Any:
        headers = {k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()}
        seen.append((f"{request.method} {request.url}", headers))
        body = request.body
        if not isinstance(body, bytes | bytearray):
            body = body.getvalue() if hasattr(body, "getvalue") else b""
        crc = headers.get("x-amz-checksum-crc32")
        if "crc" in checks and crc and crc != base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode():
            error = b"<Error><Code>BadDigest</Code><Message>crc</Message></Error>"
            return AioAWSResponse(request.url, 400, {}, _Answer(error))
        return AioAWSResponse(request.url, 200, {}, _Answer(b""))

    return answer


async def test_the_probe_works_over_https_and_probes_the_crc_header_the_uploads_send() -> None:
    """Over HTTPS botocore puts a CRC it computes in an aws-chunked trailer, and the body is an
    async stream: the probe's damage hook called its `read()` and got a coroutine, and the
    probe (so every upload and registration to an HTTPS endpoint, AWS's included, with the
    default REGISTRAR_S3_CHECKSUMS) failed with a TypeError.  The uploads' parts carry their
    CRC as a header; the probe now does the same."""
    seen: list[tuple[str, dict[str, str]]] = []
    session = make_session(SecretStr(ACCESS_KEY), SecretStr(SECRET_KEY))
    async with open_s3_client(session, region=REGION, endpoint_url="https://s3.tls.invalid") as client:
        client.meta.events.register_last("before-send.s3", _https_server(frozenset({"crc"}), seen))
        found = await _capabilities.probe_capabilities(
            client, "bucket", "p/", checksums="when_supported", algorithm="CRC32", removal_timeout=5
        )
    assert found.integrity == "crc32", found.describe()
    (damaged,) = [h for url, h in seen if url.startswith("PUT ") and url.endswith("-crc-damaged")]
    assert "x-amz-checksum-crc32" in damaged
    assert "x-amz-trailer" not in damaged
