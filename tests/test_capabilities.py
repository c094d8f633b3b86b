"""Capability probing and the integrity ladder (issue 17).

moto checks nothing of what it receives; a proxy in front of it (`S3Server`) makes it check
what a given server checks (a CRC header, Content-MD5, a signed payload's sha256), refuse
the checksum headers as Backblaze B2 does, and damage a body on the way.  For each kind of
server: the probe finds what it checks, the uploads use the strongest of it, a part damaged
on the way is caught and sent again, and a server that checks nothing gets `size-only` and
one WARNING.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import SecretStr

from async_registrar import Registrar, Settings
from async_registrar._capabilities import probe_capabilities
from async_registrar._local import ACCESS_KEY, REGION, SECRET_KEY, LocalStack
from async_registrar._s3 import make_session, open_s3_client

from .conftest import MiB, final_status, leftovers, make_job, mims_server, on, request_for
from .fault_proxy import FaultProxy, S3Server, b2_rule

FLEXIBLE = ("x-amz-checksum-", "x-amz-sdk-checksum-", "x-amz-trailer")


def forward(method: str, target: str) -> None:
    return None


@asynccontextmanager
async def emulated(stack: LocalStack, server: S3Server, *, b2: bool = False) -> AsyncIterator[FaultProxy]:
    rule: Callable[..., Any] = b2_rule if b2 else forward
    with FaultProxy(stack.s3_endpoint, rule, with_headers=b2, body_rule=server) as proxy:
        yield proxy


def through(settings: Settings, proxy: FaultProxy, **changes: Any) -> Settings:
    return settings.model_copy(update={"s3_endpoint_url": proxy.endpoint, "part_size": 5 * MiB, **changes})


def weights(root: Path, size: int = 12 * MiB) -> Path:
    root.mkdir()
    (root / "weights.bin").write_bytes(os.urandom(size))
    return root


async def read_back(s3: Any, bucket: str, key: str) -> str:
    body = await s3.get_object(Bucket=bucket, Key=key)
    return hashlib.sha256(await body["Body"].read()).hexdigest()


LADDER = [
    (frozenset({"crc", "md5", "sha256"}), "crc32"),  # AWS S3
    (frozenset({"md5", "sha256"}), "sigv4-payload"),  # JuiceFS-like: the CRC header ignored
    (frozenset({"md5"}), "md5"),
    (frozenset({"sha256"}), "sigv4-payload"),
    (frozenset(), "size-only"),  # moto, rclone
]


@pytest.mark.parametrize(("checks", "integrity"), LADDER, ids=[level for _, level in LADDER])
async def test_the_probe_finds_what_the_server_checks_and_a_damaged_part_is_caught(
    tmp_path: Path, stack: LocalStack, s3: Any, settings: Settings, checks: frozenset[str], integrity: str
) -> None:
    server = S3Server(checks)
    async with emulated(stack, server) as proxy:
        server.damage("partNumber=2", times=1)
        key = f"{settings.s3_prefix}model.tar.gz"
        async with Registrar(through(settings, proxy)) as registrar:
            result = await registrar.upload(weights(tmp_path / "m"), f"s3://{settings.s3_bucket}/{key}")
    assert result.integrity == integrity
    assert server.damaged == 1
    stored = await read_back(s3, settings.s3_bucket, key)
    if integrity == "size-only":  # taken damaged: only the size matched; the registry's sha256 check catches it
        assert stored != result.sha256
        assert proxy.count("PUT", "partNumber=2") == 1
    else:  # refused, sent again
        assert stored == result.sha256
        assert proxy.count("PUT", "partNumber=2") == 2
    await s3.delete_object(Bucket=settings.s3_bucket, Key=key)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_server_that_checks_nothing_gets_one_warning(
    tmp_path: Path, stack: LocalStack, s3: Any, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    async with emulated(stack, S3Server()) as proxy:
        key = f"{settings.s3_prefix}model.tar.gz"
        with caplog.at_level(logging.INFO, logger="async_registrar"):
            async with Registrar(through(settings, proxy)) as registrar:
                result = await registrar.upload(weights(tmp_path / "m"), f"s3://{settings.s3_bucket}/{key}")
    assert result.integrity == "size-only"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "rests on its size and on the registry's sha256 check" in warnings[0]
    found = [r.getMessage() for r in caplog.records if "checks: CRC headers" in r.getMessage()]
    assert len(found) == 1, found
    assert "uploads are checked by size-only" in found[0]
    await s3.delete_object(Bucket=settings.s3_bucket, Key=key)


async def test_when_required_sends_no_checksum_header_and_gets_the_signed_payload_checked(
    tmp_path: Path, stack: LocalStack, s3: Any, settings: Settings
) -> None:
    """B2-like: the flexible-checksum headers refused, signed payloads checked."""
    server = S3Server(frozenset({"sha256"}))
    async with emulated(stack, server, b2=True) as proxy:
        server.damage("partNumber=2", times=1)
        key = f"{settings.s3_prefix}model.tar.gz"
        async with Registrar(through(settings, proxy, s3_checksums="when_required")) as registrar:
            result = await registrar.upload(weights(tmp_path / "m"), f"s3://{settings.s3_bucket}/{key}")
    assert result.integrity == "sigv4-payload"
    assert await read_back(s3, settings.s3_bucket, key) == result.sha256
    assert sorted({n for h in proxy.headers for n in h if n.startswith(FLEXIBLE)}) == []
    await s3.delete_object(Bucket=settings.s3_bucket, Key=key)


async def test_the_probe_runs_once_per_endpoint_and_leaves_nothing(stack: LocalStack, settings: Settings) -> None:
    async with emulated(stack, S3Server(frozenset({"crc"}))) as proxy:
        session = make_session(SecretStr(ACCESS_KEY), SecretStr(SECRET_KEY))
        async with open_s3_client(session, region=REGION, endpoint_url=proxy.endpoint) as client:
            first = await probe_capabilities(
                client, settings.s3_bucket, settings.s3_prefix, checksums="when_supported", algorithm="CRC32"
            )
            requests = len(proxy.seen)
            again = await probe_capabilities(
                client, settings.s3_bucket, settings.s3_prefix, checksums="when_supported", algorithm="CRC32"
            )
            assert again is first
            assert len(proxy.seen) == requests
            assert await leftovers(client, settings.s3_bucket, settings.s3_prefix) == []
    assert first.integrity == "crc32"
    assert (first.checksum_headers, first.verifies_checksum, first.reports_checksum) == (True, True, True)
    assert (first.verifies_md5, first.verifies_payload_hash, first.lists_uploads) == (False, False, True)


async def test_a_registration_records_the_integrity_and_check_shows_what_s3_checks(
    tmp_path: Path, stack: LocalStack, s3: Any, settings: Settings
) -> None:
    """A damaged part under a JuiceFS-like server: sent again, registered, SUCCEEDED."""
    server = S3Server(frozenset({"md5", "sha256"}))
    job = make_job(tmp_path, model_bytes=12 * MiB)
    async with emulated(stack, server) as proxy:
        with mims_server(stack) as registry:
            async with Registrar(on(through(settings, proxy), registry)) as registrar:
                unknown = await registrar.check(request_for(job))  # writes nothing: probes nothing
                server.damage("partNumber=2", times=1)
                result = await registrar.register(request_for(job))
                plan = await registrar.check(request_for(job))  # what the registration found
            assert await final_status(registry, result.registration_id) == "SUCCEEDED"
    assert unknown.regions[0].integrity is None
    assert "probed just before the first one" in "\n".join(unknown.lines())
    assert plan.regions[0].integrity == "sigv4-payload"
    assert "uploads are checked by sigv4-payload" in "\n".join(plan.lines())
    assert result.model_artifact.integrity == "sigv4-payload"
    assert server.damaged == 1
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


class _Head:
    """An S3 client whose HeadObject answers `answer`."""

    def __init__(self, answer: dict[str, Any]) -> None:
        self.answer = answer

    async def head_object(self, **_: Any) -> dict[str, Any]:
        return self.answer


@pytest.mark.parametrize(
    ("reported", "problem"),
    [
        ('"7972b1efdba60f4b2e77c817dcbead84-6"', None),  # S3's convention, the same
        ('"00000000000000000000000000000000-6"', "its ETag is 00000000000000000000000000000000-6"),
        ('"90fde50905b1bff6bb717ebb18d9459b"', None),  # rclone: the whole object's MD5, no "-N"
        ('"not-an-md5"', None),
    ],
)
async def test_the_multipart_etag_is_compared_only_where_the_server_follows_s3s_convention(
    reported: str, problem: str | None
) -> None:
    from async_registrar._multipart import check_object
    from async_registrar._s3 import S3Location

    found, _ = await check_object(
        _Head({"ContentLength": 10, "ETag": reported}),
        S3Location("b", "k"),
        10,
        None,
        algorithm="MD5",
        etag="7972b1efdba60f4b2e77c817dcbead84-6",
    )
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert problem in found


async def test_a_registration_cancelled_while_the_probe_waits_leaves_nothing(
    tmp_path: Path, stack: LocalStack, s3: Any, settings: Settings
) -> None:
    """The probe's requests held by a slow link, the registration cancelled meanwhile: the
    probe's objects (one of them arriving after the cancellation) and the run's prefix are
    gone once the server has settled; the registry never saw a submission."""
    from .fault_proxy import Stall

    def slow_probe(method: str, target: str) -> object:
        return Stall(1.5) if method == "PUT" and "-crc-damaged" in target else None

    job = make_job(tmp_path, model_bytes=6 * MiB)
    with FaultProxy(stack.s3_endpoint, slow_probe) as proxy, mims_server(stack) as registry:
        async with Registrar(on(through(settings, proxy), registry)) as registrar:
            with anyio.move_on_after(10) as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(registrar.register, request_for(job))
                    while proxy.count("PUT", "-crc-damaged") < 1:
                        await anyio.sleep(0.02)
                    tg.cancel_scope.cancel()
            assert not scope.cancelled_caught
        await anyio.sleep(2.5)  # the held PUT reaches moto after the cancellation
        assert registry.registration_count == 0
    left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    assert [k for k in left if ".capabilities-" not in k] == []
    assert len(left) <= 1, left  # at most the PUT that arrived after every delete
    for key in left:
        await s3.delete_object(Bucket=settings.s3_bucket, Key=key)


async def test_a_probe_that_gets_no_answer_is_not_cached_and_the_settings_level_is_used(
    stack: LocalStack, settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from async_registrar import _capabilities

    from .fault_proxy import Stall

    monkeypatch.setattr(_capabilities, "PROBE_TIMEOUT", 1.0)

    def silent(method: str, target: str) -> object:
        return Stall(3) if method == "PUT" and ".capabilities-" in target else None

    with FaultProxy(stack.s3_endpoint, silent) as proxy:
        session = make_session(SecretStr(ACCESS_KEY), SecretStr(SECRET_KEY))
        async with open_s3_client(session, region=REGION, endpoint_url=proxy.endpoint) as client:
            found = await probe_capabilities(
                client,
                settings.s3_bucket,
                settings.s3_prefix,
                checksums="when_supported",
                algorithm="CRC32",
                removal_timeout=1.0,
            )
            assert found.integrity == "crc32"
            assert _capabilities.known_capabilities(client, settings) is None
    assert "did not answer the capability probe within 1 s" in caplog.text


#: Keys with characters botocore percent-encodes in the request's URL (Hive-style partitions,
#: a semicolon, a space, a plus, a non-ASCII letter).
ENCODED_PREFIXES = ["models/date=2026-11-30/", "runs/a;b/", "my models/v1+2/", "modèles/"]


@pytest.mark.parametrize("where", ENCODED_PREFIXES)
@pytest.mark.parametrize(("checks", "integrity"), [(frozenset({"md5", "sha256"}), "sigv4-payload"), *LADDER[:1]])
async def test_the_probe_finds_what_the_server_checks_whatever_the_key_is_made_of(
    stack: LocalStack, s3: Any, settings: Settings, where: str, checks: frozenset[str], integrity: str
) -> None:
    """The probe's damaged requests are picked out by their key in the request's URL, where
    botocore has percent-encoded it: a key with `=` or `;` found a server that checks signed
    payloads to check nothing (and the uploads went out unchecked, `size-only`)."""
    async with emulated(stack, S3Server(checks)) as proxy:
        session = make_session(SecretStr(ACCESS_KEY), SecretStr(SECRET_KEY))
        async with open_s3_client(session, region=REGION, endpoint_url=proxy.endpoint) as client:
            found = await probe_capabilities(
                client, settings.s3_bucket, settings.s3_prefix + where, checksums="when_supported", algorithm="CRC32"
            )
            assert await leftovers(client, settings.s3_bucket, settings.s3_prefix) == []
    assert found.integrity == integrity
    assert found.verifies_payload_hash is ("sha256" in checks)
    assert found.verifies_md5 is ("md5" in checks)


@pytest.mark.parametrize("failing", ["sha256-damaged", "md5-damaged", "crc-damaged", "crc"])
async def test_a_probe_request_that_fails_for_another_reason_is_not_taken_as_no_check(
    stack: LocalStack,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    failing: str,
) -> None:
    """A server error (after botocore's retries) on one of the probe's requests says nothing
    of what the server checks.  Taken as "not checked", it was cached for the process: every
    later upload of a service went out with a weaker check (or none, with a warning that the
    server checks nothing), though the server was only briefly unwell.  Now the probe is
    inconclusive: the settings' level is used, unverified, with a warning naming the request,
    and the next upload asks again."""
    import botocore.retries.standard

    from async_registrar import _capabilities

    from .fault_proxy import s3_error

    monkeypatch.setattr(botocore.retries.standard.ExponentialBackoff, "delay_amount", lambda self, context: 0.0)
    server = S3Server(frozenset({"md5", "sha256"}))
    unwell = [True]

    def rule(method: str, target: str) -> object:
        if unwell[0] and method == "PUT" and target.split("?")[0].endswith("-" + failing):
            return s3_error(500, "InternalError")
        return None

    with FaultProxy(stack.s3_endpoint, rule, body_rule=server) as proxy:
        session = make_session(SecretStr(ACCESS_KEY), SecretStr(SECRET_KEY))
        async with open_s3_client(session, region=REGION, endpoint_url=proxy.endpoint) as client:

            async def probe() -> Any:
                return await probe_capabilities(
                    client, settings.s3_bucket, settings.s3_prefix, checksums="when_supported", algorithm="CRC32"
                )

            with caplog.at_level(logging.WARNING, logger="async_registrar"):
                found = await probe()
            assert found.integrity == "crc32"  # what the settings ask for
            assert _capabilities.known_capabilities(client, settings) is None
            (warning,) = [
                r.getMessage() for r in caplog.records if r.name == "async_registrar" and r.levelno >= logging.WARNING
            ]
            assert "InternalError" in warning
            assert "the uploads carry what the settings ask for (crc32), unverified" in warning
            assert "checks no CRC, Content-MD5 or signed payload" not in caplog.text

            unwell[0] = False
            again = await probe()
            assert again.integrity == "sigv4-payload"
            assert _capabilities.known_capabilities(client, settings) is again
            assert await leftovers(client, settings.s3_bucket, settings.s3_prefix) == []


@pytest.mark.parametrize("checksums", ["when_supported", "when_required"])
async def test_the_probe_makes_its_first_object_alone(stack: LocalStack, settings: Settings, checksums: str) -> None:
    """`rclone serve s3` makes a key's directory as it stores it, and several PutObjects making
    one directory at once got 500s (12 in 180 probes measured; once, an object whose first
    attempt failed so turned up after the run's cleanup).  No other probe PutObject is sent
    until the first is answered, and each check's undamaged twin goes before its damaged one."""
    import threading

    from .fault_proxy import Hold

    release = threading.Event()
    early: list[str] = []
    first = "-crc" if checksums == "when_supported" else "-sha256"

    def rule(method: str, target: str) -> object:
        path = target.split("?")[0]
        if method != "PUT" or ".capabilities-" not in path:
            return None
        if path.endswith(first) and not release.is_set():
            threading.Timer(0.5, release.set).start()
            return Hold(release)
        if not release.is_set():
            early.append(path.rsplit("-", 1)[-1])
        return None

    with FaultProxy(stack.s3_endpoint, rule, body_rule=S3Server(frozenset({"md5", "sha256"}))) as proxy:
        session = make_session(SecretStr(ACCESS_KEY), SecretStr(SECRET_KEY))
        async with open_s3_client(session, region=REGION, endpoint_url=proxy.endpoint) as client:
            found = await probe_capabilities(
                client, settings.s3_bucket, settings.s3_prefix, checksums=checksums, algorithm="CRC32"
            )
            assert await leftovers(client, settings.s3_bucket, settings.s3_prefix) == []
        puts = [
            t.split("?")[0].rsplit(".capabilities-", 1)[1].split("-", 1)[1]
            for m, t in proxy.seen
            if m == "PUT" and ".capabilities-" in t
        ]
    assert early == []
    assert found.integrity == "sigv4-payload"
    for check in ("md5", "sha256"):
        if check in puts:
            assert puts.index(check) < puts.index(f"{check}-damaged")
