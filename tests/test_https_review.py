"""More of what differs over HTTPS, each through the TLS relay (`tls_relay`), as AWS S3 is reached.

`test_https` covers an upload, a registration and a cancellation over TLS.  Here: the other
requests whose form botocore changes over HTTPS (small PutObjects of an artifact and of the
run manifest, which go aws-chunked with a CRC trailer; the operations that require a
checksum: DeleteObjects, PutBucketLifecycleConfiguration; HeadObject/GetObject in checksum
mode), the settings that change them (`when_required`, CRC64NVME), inputs read from S3, and
the CLI as a subprocess that trusts the relay through AWS_CA_BUNDLE.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
from awscrt import checksums as crt_checksums

from async_registrar import Registrar, Settings
from async_registrar._local import LocalStack

from .conftest import MiB, environment, kept_by_a_timeout, leftovers, make_job, mims_server, on, remove_all, request_for
from .fault_proxy import FaultProxy, Reply, S3Server, Stall, s3_error
from .test_capabilities import forward
from .test_cli import run
from .test_https import over_tls
from .test_signals import wait_for
from .tls_relay import TlsRelay

AWS_LIKE = frozenset({"crc", "md5", "sha256"})


class AwsLike(S3Server):
    """`S3Server` checking every check AWS S3 makes: its CRC64NVME header as well."""

    def __init__(self) -> None:
        super().__init__(AWS_LIKE)
        self._ends: str | None = None

    def damage_object(self, key: str) -> None:
        """Damage the next PUT of exactly `key` (not the capability probe's `{key}.capabilities-*`)."""
        self._ends = "/" + key

    def __call__(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Reply | bytes:
        if self._ends is not None and method == "PUT" and target.endswith(self._ends) and body:
            self._ends = None
            self.damaged += 1
            body = body[:-1] + bytes([body[-1] ^ 0xFF])
        outcome = super().__call__(method, target, headers, body)
        crc64 = headers.get("x-amz-checksum-crc64nvme")
        if (
            method == "PUT"
            and isinstance(outcome, bytes)
            and crc64
            and headers.get("content-encoding") != "aws-chunked"
        ):
            value = base64.b64encode(crt_checksums.crc64nvme(outcome).to_bytes(8, "big")).decode()
            if value != crc64:
                return s3_error(400, "BadDigest")
        return outcome


async def read_back(s3: Any, bucket: str, key: str) -> bytes:
    answer = await s3.get_object(Bucket=bucket, Key=key)
    async with answer["Body"] as body:
        return bytes(await body.read())


def model_dir(tmp_path: Path, size: int) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(os.urandom(size))
    return model


@pytest.mark.parametrize("algorithm", ["CRC32", "CRC64NVME"])
@pytest.mark.parametrize("checksums", ["when_supported", "when_required"])
async def test_a_damaged_part_over_https_is_refused_and_sent_again(
    tmp_path: Path,
    stack: LocalStack,
    s3: Any,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    checksums: str,
    algorithm: str,
) -> None:
    """AWS-like server over TLS, every combination of the checksum settings: the part damaged on
    the way is refused (its CRC, or its signed sha256 with `when_required`) and sent again."""
    server = AwsLike()
    model = model_dir(tmp_path, 12 * MiB)
    key = f"{settings.s3_prefix}model.tar.gz"
    with (
        FaultProxy(stack.s3_endpoint, forward, body_rule=server) as proxy,
        TlsRelay(proxy.endpoint, tmp_path) as relay,
    ):
        server.damage("partNumber=2", times=1)
        tls = over_tls(settings, relay, monkeypatch).model_copy(
            update={"s3_checksums": checksums, "s3_checksum_algorithm": algorithm}
        )
        async with Registrar(tls) as registrar:
            uploaded = await registrar.upload(model, f"s3://{settings.s3_bucket}/{key}")
        assert proxy.count("PUT", "partNumber=2") == 2
    assert server.damaged == 1
    expected = {"when_required": "sigv4-payload", "when_supported": algorithm.lower()}[checksums]
    assert uploaded.integrity == expected
    assert hashlib.sha256(await read_back(s3, settings.s3_bucket, key)).hexdigest() == uploaded.sha256
    await s3.delete_object(Bucket=settings.s3_bucket, Key=key)


@pytest.mark.parametrize("checksums", ["when_supported", "when_required"])
async def test_a_small_artifact_damaged_over_https_is_not_taken(
    tmp_path: Path,
    stack: LocalStack,
    s3: Any,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    checksums: str,
) -> None:
    """An artifact smaller than a part goes in one PutObject: damaged on the way over TLS, the
    AWS-like server refuses it, and it is sent again, as a part is (it failed the run at once)."""
    server = AwsLike()
    model = model_dir(tmp_path, 256 * 1024)
    key = f"{settings.s3_prefix}small.tar.gz"
    with (
        FaultProxy(stack.s3_endpoint, forward, body_rule=server) as proxy,
        TlsRelay(proxy.endpoint, tmp_path) as relay,
    ):
        server.damage_object(key)
        tls = over_tls(settings, relay, monkeypatch).model_copy(update={"s3_checksums": checksums})
        async with Registrar(tls) as registrar:
            uploaded = await registrar.upload(model, f"s3://{settings.s3_bucket}/{key}")
        assert sum(1 for m, t in proxy.seen if m == "PUT" and t.endswith("/small.tar.gz")) == 2
    assert server.damaged == 1
    assert hashlib.sha256(await read_back(s3, settings.s3_bucket, key)).hexdigest() == uploaded.sha256
    await s3.delete_object(Bucket=settings.s3_bucket, Key=key)


@pytest.mark.parametrize("checksums", ["when_supported", "when_required"])
async def test_the_lifecycle_rule_is_installed_over_https(
    tmp_path: Path, stack: LocalStack, s3: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch, checksums: str
) -> None:
    """PutBucketLifecycleConfiguration requires a checksum: over TLS it carries one (a CRC32
    header, or Content-MD5 with `when_required`) that the AWS-like server checks, and it lands."""
    server = AwsLike()
    with (
        FaultProxy(
            stack.s3_endpoint, lambda method, target, headers: None, with_headers=True, body_rule=server
        ) as proxy,
        TlsRelay(proxy.endpoint, tmp_path) as relay,
    ):
        tls = over_tls(settings, relay, monkeypatch).model_copy(update={"s3_checksums": checksums})
        async with Registrar(tls) as registrar:
            rule = await registrar.install_lifecycle()
        (put,) = [h for (m, t), h in zip(proxy.seen, proxy.headers, strict=True) if m == "PUT" and "lifecycle" in t]
    assert "content-md5" in put or any(name.startswith("x-amz-checksum-") for name in put), put
    current = await s3.get_bucket_lifecycle_configuration(Bucket=settings.s3_bucket)
    assert rule["ID"] in [r["ID"] for r in current["Rules"]]
    others = [r for r in current["Rules"] if r["ID"] != rule["ID"]]
    if others:
        await s3.put_bucket_lifecycle_configuration(Bucket=settings.s3_bucket, LifecycleConfiguration={"Rules": others})
    else:
        await s3.delete_bucket_lifecycle(Bucket=settings.s3_bucket)


@pytest.mark.parametrize("checksums", ["when_supported", "when_required"])
async def test_a_run_kept_by_a_timeout_over_https_is_resumed_and_swept(
    tmp_path: Path, stack: LocalStack, s3: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch, checksums: str
) -> None:
    """The run manifest is a small PutObject read back with GetObject (checksum mode) over TLS;
    the artifacts are checked with HeadObject in checksum mode: a re-run over TLS resumes the
    registration kept by a wait timeout, uploading nothing again, and a sweep over TLS
    (DeleteObjects) removes what is left."""
    job = make_job(tmp_path, model_bytes=6 * MiB)
    with TlsRelay(stack.s3_endpoint, tmp_path) as relay, mims_server(stack, processing_delay=1.0) as registry:
        tls = on(over_tls(settings, relay, monkeypatch), registry, s3_checksums=checksums)
        request = request_for(job, workflow_execution_id=f"resume-{checksums}")
        (kept,) = (await kept_by_a_timeout(tls, request)).kept
        assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) != []
        async with Registrar(tls) as registrar:
            result = await registrar.register(request)
        assert result.registration_id == kept.registration_id  # followed, not made again
        assert registry.registration(result.registration_id).status == "SUCCEEDED"  # type: ignore[union-attr]
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_sweep_over_https_removes_what_a_killed_run_left(
    tmp_path: Path, stack: LocalStack, s3: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeleteObjects (a checksum required) and the aborts over TLS, `when_required` and not."""
    prefix = settings.s3_prefix
    for checksums in ("when_supported", "when_required"):
        group = f"{prefix}run-{checksums}/20260101T000000Z-00000000/"
        for name in ("model.tar.gz", "payload.tar.gz"):
            await s3.put_object(Bucket=settings.s3_bucket, Key=group + name, Body=b"x")
        await s3.create_multipart_upload(Bucket=settings.s3_bucket, Key=group + "other.tar.gz")
        with TlsRelay(stack.s3_endpoint, tmp_path) as relay, mims_server(stack) as registry:
            tls = on(over_tls(settings, relay, monkeypatch), registry, s3_checksums=checksums)
            async with Registrar(tls) as registrar:
                report = await registrar.sweep(older_than=0)
        assert report.leftovers == (), report
        assert report.objects_removed == 2, report
        assert await leftovers(s3, settings.s3_bucket, prefix) == [], checksums


def prebuilt(path: Path, size: int) -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as archive:
        info = tarfile.TarInfo("weights.bin")
        info.size = size
        archive.addfile(info, io.BytesIO(os.urandom(size)))
    path.mkdir()
    (path / "model.tar.gz").write_bytes(buffer.getvalue())
    return path / "model.tar.gz"


async def test_a_prebuilt_archive_and_a_model_in_s3_are_registered_over_https(
    tmp_path: Path, stack: LocalStack, s3: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prebuilt .tar.gz uploaded as it is, and an s3:// model read with ranged GETs (and
    copied) over TLS: both registered, nothing left."""
    job = make_job(tmp_path, model_bytes=0)
    archive = prebuilt(tmp_path / "prebuilt", 7 * MiB)
    source_key = f"{settings.s3_prefix}source/model.tar.gz"
    await s3.put_object(Bucket=settings.s3_bucket, Key=source_key, Body=archive.read_bytes())
    with TlsRelay(stack.s3_endpoint, tmp_path) as relay, mims_server(stack) as registry:
        tls = on(over_tls(settings, relay, monkeypatch), registry)
        for model in (archive.parent, f"s3://{settings.s3_bucket}/{source_key}"):
            job["model"] = model  # type: ignore[assignment]
            async with Registrar(tls) as registrar:
                result = await registrar.register(request_for(job, workflow_execution_id=f"p-{len(str(model))}"))
            assert registry.registration(result.registration_id).status == "SUCCEEDED"  # type: ignore[union-attr]
    await s3.delete_object(Bucket=settings.s3_bucket, Key=source_key)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


def tls_environment(
    stack: LocalStack, settings: Settings, job: dict[str, Path], relay: TlsRelay, **extra: str
) -> dict[str, str]:
    return environment(
        stack, settings, job, AWS_ENDPOINT_URL_S3=relay.endpoint, AWS_CA_BUNDLE=str(relay.ca_file), **extra
    )


async def test_the_cli_uploads_and_registers_over_https(
    tmp_path: Path, stack: LocalStack, s3: Any, settings: Settings
) -> None:
    """`upload` and `register` as subprocesses, S3 over TLS (AWS_CA_BUNDLE): exit 0, the object
    read back is the one printed, nothing of the registration left."""
    job = make_job(tmp_path, model_bytes=6 * MiB)
    key = f"{settings.s3_prefix}cli.tar.gz"
    with TlsRelay(stack.s3_endpoint, tmp_path) as relay:
        env = tls_environment(stack, settings, job, relay)
        upload = run(env, "upload", str(job["model"]), f"s3://{settings.s3_bucket}/{key}")
        assert upload.returncode == 0, upload.stderr
        register = run(env, "register")
        assert register.returncode == 0, register.stderr
        check = run(env, "check")
        assert check.returncode == 0, check.stderr
    assert hashlib.sha256(await read_back(s3, settings.s3_bucket, key)).hexdigest() == upload.stdout.split()[2]
    await s3.delete_object(Bucket=settings.s3_bucket, Key=key)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_sigterm_during_an_upload_over_https_is_143_and_leaves_nothing(
    tmp_path: Path, stack: LocalStack, s3: Any, settings: Settings
) -> None:
    """SIGTERM while the parts are stuck on the way (behind the TLS relay): exit 143, aborted."""
    job = make_job(tmp_path, model_bytes=12 * MiB)
    slow = lambda method, target: Stall(30) if method == "PUT" and "partNumber=" in target else None  # noqa: E731
    target = f"s3://{settings.s3_bucket}/{settings.s3_prefix}up.tar.gz"
    with FaultProxy(stack.s3_endpoint, slow) as proxy, TlsRelay(proxy.endpoint, tmp_path) as relay:
        process = subprocess.Popen(
            [sys.executable, "-m", "async_registrar", "upload", str(job["model"]), target],
            env=tls_environment(stack, settings, job, relay),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        seen: list[str] = []
        wait_for(process, "uploading", seen)
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 143, "".join(seen) + stderr
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)


def no_trailers(method: str, target: str, headers: dict[str, str]) -> Reply | None:
    """A server that takes (and checks) the x-amz-checksum-* headers but not the aws-chunked
    trailer botocore sends them in over HTTPS (S3-compatible servers older than botocore 1.36's
    default checksums answer so): 400 InvalidArgument naming x-amz-trailer."""
    if "x-amz-trailer" in headers or headers.get("x-amz-content-sha256", "").startswith("STREAMING-"):
        body = (
            '<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidArgument</Code>'
            "<Message>Unsupported header 'x-amz-trailer' received for this API call.</Message></Error>"
        )
        return Reply(400, body.encode(), "Bad Request")
    return None


async def test_a_server_without_aws_chunked_trailers_is_served_as_probed_over_https(
    tmp_path: Path, stack: LocalStack, s3: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe sends its CRC as a header (what the parts carry) and finds it checked; every
    request of the run must then carry it so.  Over HTTPS botocore put the CRC of the run
    manifest (a PutObject whose checksum it computes itself) in an aws-chunked trailer
    instead, which such a server refuses: every registration failed at its manifest, over
    HTTPS only (over HTTP botocore sends a header)."""
    job = make_job(tmp_path, model_bytes=6 * MiB)
    server = AwsLike()
    with (
        FaultProxy(stack.s3_endpoint, no_trailers, with_headers=True, body_rule=server) as proxy,
        TlsRelay(proxy.endpoint, tmp_path) as relay,
        mims_server(stack) as registry,
    ):
        tls = on(over_tls(settings, relay, monkeypatch), registry)
        async with Registrar(tls) as registrar:
            result = await registrar.register(request_for(job, workflow_execution_id="no-trailers"))
        assert registry.registration(result.registration_id).status == "SUCCEEDED"  # type: ignore[union-attr]
        assert not any("x-amz-trailer" in h for h in proxy.headers)
    assert result.model_artifact.integrity == "crc32"
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
