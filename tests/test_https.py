"""Uploads and registrations to an S3 endpoint over HTTPS, as AWS S3 is always reached.

Every other test talks plain HTTP to moto, and botocore behaves differently over TLS: it
stops signing payloads, and a CRC it computes itself goes in an aws-chunked trailer, the body
wrapped in an async stream.  The capability probe's damage hook read that body as bytes and
failed with a TypeError, so every upload and registration to an HTTPS endpoint failed before
its first part, unseen by the suite.  Here a TLS relay (`tls_relay`) stands in front of moto
(and, for an AWS-like server, of `S3Server` checking CRC headers).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from async_registrar import ProgressEvent, Registrar, Settings, UploadProgress
from async_registrar._local import LocalStack

from .conftest import MiB, leftovers, make_job, mims_server, on, request_for
from .fault_proxy import FaultProxy, S3Server
from .test_capabilities import forward
from .tls_relay import TlsRelay


def over_tls(settings: Settings, relay: TlsRelay, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """`settings` pointed at `relay`, whose certificate botocore trusts (AWS_CA_BUNDLE)."""
    monkeypatch.setenv("AWS_CA_BUNDLE", str(relay.ca_file))
    return settings.model_copy(update={"s3_endpoint_url": relay.endpoint, "part_size": 5 * MiB})


@pytest.mark.parametrize(
    ("checks", "integrity"),
    [({"crc", "md5", "sha256"}, "crc32"), ({"sha256"}, "sigv4-payload"), ({"md5"}, "md5")],
    ids=["aws-like", "sha256-only", "md5-only"],
)
async def test_an_upload_over_https_is_probed_checked_and_read_back(
    tmp_path: Path,
    stack: LocalStack,
    s3: Any,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    checks: set[str],
    integrity: str,
) -> None:
    """AWS-like (the CRC header checked), or a server that checks only a signed sha256
    (JuiceFS) or only Content-MD5 (rclone), though over TLS botocore signs no payload and
    sends no Content-MD5 of its own: the probe finds the check, the parts carry it, a part
    damaged on the way is refused and sent again, and the object read back is the archive."""
    server = S3Server(frozenset(checks))
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(os.urandom(12 * MiB))
    key = f"{settings.s3_prefix}model.tar.gz"
    with (
        FaultProxy(stack.s3_endpoint, forward, body_rule=server) as proxy,
        TlsRelay(proxy.endpoint, tmp_path) as relay,
    ):
        server.damage("partNumber=2", times=1)
        async with Registrar(over_tls(settings, relay, monkeypatch)) as registrar:
            uploaded = await registrar.upload(model, f"s3://{settings.s3_bucket}/{key}")
        assert proxy.count("PUT", "partNumber=2") == 2  # refused damaged, sent again
    assert uploaded.integrity == integrity
    assert server.damaged == 1
    body = await s3.get_object(Bucket=settings.s3_bucket, Key=key)
    async with body["Body"] as stream:
        assert hashlib.sha256(await stream.read()).hexdigest() == uploaded.sha256
    await s3.delete_object(Bucket=settings.s3_bucket, Key=key)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


@pytest.mark.parametrize("checksums", ["when_supported", "when_required"])
async def test_a_registration_over_https_succeeds_and_leaves_nothing(
    tmp_path: Path,
    stack: LocalStack,
    s3: Any,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    checksums: str,
) -> None:
    """The whole flow with S3 over TLS (moto behind the relay; the registry reads the
    artifacts back from S3 itself): SUCCEEDED, the registry's copies are the archives."""
    job = make_job(tmp_path, model_bytes=12 * MiB)
    with TlsRelay(stack.s3_endpoint, tmp_path) as relay, mims_server(stack) as registry:
        tls = over_tls(settings, relay, monkeypatch).model_copy(update={"s3_checksums": checksums})
        async with Registrar(on(tls, registry)) as registrar:
            result = await registrar.register(request_for(job, workflow_execution_id=f"https-{checksums}"))
        assert registry.registration(result.registration_id).status == "SUCCEEDED"  # type: ignore[union-attr]
    assert result.model_id.startswith("model-")
    assert result.model_artifact.parts >= 2
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_registration_with_the_registry_over_https_too(
    tmp_path: Path, stack: LocalStack, s3: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MIMS over TLS as well (httpx trusts the relay's certificate through SSL_CERT_FILE):
    the SigV4 signature names the relay's host, the registry verifies it, and the run ends
    SUCCEEDED with nothing left."""
    job = make_job(tmp_path, model_bytes=6 * MiB)
    (tmp_path / "s3").mkdir()
    (tmp_path / "mims").mkdir()
    with (
        TlsRelay(stack.s3_endpoint, tmp_path / "s3") as s3_relay,
        mims_server(stack) as registry,
        TlsRelay(registry.endpoint, tmp_path / "mims") as mims_relay,
    ):
        monkeypatch.setenv("SSL_CERT_FILE", str(mims_relay.ca_file))
        tls = over_tls(settings, s3_relay, monkeypatch).model_copy(update={"mims_endpoint": mims_relay.endpoint})
        async with Registrar(tls) as registrar:
            result = await registrar.register(request_for(job, workflow_execution_id="https-mims"))
        assert registry.registration(result.registration_id).status == "SUCCEEDED"  # type: ignore[union-attr]
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_registration_cancelled_mid_upload_over_https_leaves_nothing(
    tmp_path: Path, stack: LocalStack, s3: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The abort and the cleanup's deletes go over TLS as well: nothing is left."""
    job = make_job(tmp_path, model_bytes=20 * MiB)
    with TlsRelay(stack.s3_endpoint, tmp_path) as relay, anyio.CancelScope() as scope:

        def on_progress(event: ProgressEvent) -> None:
            if isinstance(event, UploadProgress) and event.artifact == "model":
                scope.cancel()

        async with Registrar(over_tls(settings, relay, monkeypatch), on_progress=on_progress) as registrar:
            await registrar.register(request_for(job))
    assert scope.cancelled_caught
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
