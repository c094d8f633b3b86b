"""Capability probe: wrong conclusions it drew (and cached) that weakened the uploads' check
silently.  A real moto server behind `FaultProxy`/`S3Server`, as in test_capabilities.py."""

from __future__ import annotations

import threading
from typing import Any

import anyio
from pydantic import SecretStr

from async_registrar import Settings, _capabilities
from async_registrar._capabilities import adapt_uploads
from async_registrar._local import ACCESS_KEY, REGION, SECRET_KEY, LocalStack
from async_registrar._s3 import make_session, open_s3_client

from .conftest import leftovers
from .fault_proxy import FaultProxy, Hold, S3Server


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
