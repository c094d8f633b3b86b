"""A server that refuses S3's flexible-checksum headers, as Backblaze B2 does (issue 17).

B2 answers 400 InvalidArgument "Unsupported header 'x-amz-checksum-crc32'" to any request
carrying one.  A proxy in front of the moto server does the same (`b2_rule`); with
`REGISTRAR_S3_CHECKSUMS=when_required` every operation the registrar uses must get through
it: no `x-amz-checksum-*`, `x-amz-sdk-checksum-algorithm` or `x-amz-trailer` header on any
request, HeadObject included, and Content-MD5 where S3 requires a checksum (DeleteObjects,
a lifecycle configuration).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from async_registrar import Registrar, RegistrationTimeout, Settings, UploadProgress
from async_registrar._local import LocalStack

from .conftest import (
    MiB,
    Recorder,
    environment,
    final_status,
    late_registry,
    leftovers,
    make_job,
    mims_server,
    on,
    release_when_submitted,
    request_for,
)
from .fault_proxy import FaultProxy, b2_rule
from .test_cli import run
from .test_s3_source import model_archive, put_training_output, registry_object

FLEXIBLE = ("x-amz-checksum-", "x-amz-sdk-checksum-", "x-amz-trailer")


@pytest.fixture
def b2(stack: LocalStack) -> Iterator[FaultProxy]:
    with FaultProxy(stack.s3_endpoint, b2_rule, with_headers=True) as proxy:
        yield proxy


def through(settings: Settings, proxy: FaultProxy, **changes: Any) -> Settings:
    return settings.model_copy(update={"s3_endpoint_url": proxy.endpoint, "s3_checksums": "when_required", **changes})


def flexible_headers(proxy: FaultProxy) -> list[str]:
    return sorted({name for headers in proxy.headers for name in headers if name.startswith(FLEXIBLE)})


async def test_uploads_of_every_size_get_through_with_when_required(
    tmp_path: Path, b2: FaultProxy, s3: Any, settings: Settings
) -> None:
    """A multipart upload (HeadObject after it), and one small enough for a single PutObject."""
    big = tmp_path / "big"
    big.mkdir()
    (big / "weights.bin").write_bytes(os.urandom(20 * MiB))
    small = tmp_path / "small"
    small.mkdir()
    (small / "config.json").write_text('{"layers": 2}')
    async with Registrar(through(settings, b2, part_size=5 * MiB)) as registrar:
        for name, path in (("big", big), ("small", small)):
            result = await registrar.upload(path, f"s3://{settings.s3_bucket}/{settings.s3_prefix}{name}.tar.gz")
            body = await s3.get_object(Bucket=settings.s3_bucket, Key=f"{settings.s3_prefix}{name}.tar.gz")
            assert hashlib.sha256(await body["Body"].read()).hexdigest() == result.sha256
    assert b2.count("PUT", "partNumber=") >= 4
    assert b2.count("HEAD", "big.tar.gz") >= 1
    assert flexible_headers(b2) == []
    for name in ("big", "small"):
        await s3.delete_object(Bucket=settings.s3_bucket, Key=f"{settings.s3_prefix}{name}.tar.gz")


async def test_a_registration_sweep_and_lifecycle_get_through_with_when_required(
    tmp_path: Path, b2: FaultProxy, s3: Any, settings: Settings, stack: LocalStack
) -> None:
    """Register (upload, check, clean up), sweep stale runs (DeleteObjects) and install the
    lifecycle rule: each checksum-required request carries Content-MD5 instead."""
    stale = f"{settings.s3_prefix}run-20200101T000000Z-000000000000/a1/model.tar.gz"
    await s3.put_object(Bucket=settings.s3_bucket, Key=stale, Body=b"x")
    job = make_job(tmp_path, model_bytes=12 * MiB)
    with mims_server(stack) as registry:
        async with Registrar(on(through(settings, b2, part_size=5 * MiB), registry)) as registrar:
            result = await registrar.register(request_for(job))
            assert await final_status(registry, result.registration_id) == "SUCCEEDED"
            report = await registrar.sweep(older_than=0)
            rule = await registrar.install_lifecycle()
    assert report.objects_removed == 1
    assert rule["Filter"]["Prefix"] == settings.s3_prefix
    assert flexible_headers(b2) == []
    deletes = [h for (method, target), h in zip(b2.seen, b2.headers, strict=True) if "delete" in target]
    assert deletes, b2.seen
    assert all("content-md5" in h for h in deletes)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    await s3.delete_bucket_lifecycle(Bucket=settings.s3_bucket)  # the session's bucket had none


async def test_the_default_settings_find_out_and_send_no_checksum_header_after_the_probe(
    tmp_path: Path, b2: FaultProxy, s3: Any, settings: Settings
) -> None:
    """With the default settings, the preflight's probe finds the headers refused: the uploads,
    the HeadObject and the cleanup's DeleteObjects then carry none (only the probe's one
    request with a CRC header is refused)."""
    stale = f"{settings.s3_prefix}run-20200101T000000Z-000000000000/a1/model.tar.gz"
    await s3.put_object(Bucket=settings.s3_bucket, Key=stale, Body=b"x")
    model = tmp_path / "m"
    model.mkdir()
    (model / "weights.bin").write_bytes(os.urandom(12 * MiB))
    key = f"{settings.s3_prefix}m.tar.gz"
    async with Registrar(through(settings, b2, s3_checksums="when_supported", part_size=5 * MiB)) as registrar:
        result = await registrar.upload(model, f"s3://{settings.s3_bucket}/{key}")
        with_header = len([h for h in b2.headers if any(n.startswith(FLEXIBLE) for n in h)])
        report = await registrar.sweep(older_than=0)
    assert result.integrity == "size-only"  # moto behind the proxy checks nothing
    assert with_header == 1  # the probe's
    assert report.objects_removed == 1
    assert len([h for h in b2.headers if any(n.startswith(FLEXIBLE) for n in h)]) == 1
    await s3.delete_object(Bucket=settings.s3_bucket, Key=key)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


@pytest.mark.parametrize("checksums", ["when_supported", "when_required"])
async def test_a_kept_run_is_resumed_and_swept_on_a_server_refusing_checksum_headers(
    tmp_path: Path, stack: LocalStack, s3: Any, settings: Settings, checksums: str
) -> None:
    """With the default `when_supported`, botocore asks every GetObject for the object's
    checksum (`x-amz-checksum-mode`), which B2 refuses: a re-run could read no run manifest
    (it uploaded everything again, and left the kept run there), and neither could a sweep.
    The manifest is read again without it (a sweep reads it the same way)."""
    with FaultProxy(stack.s3_endpoint, b2_rule, with_headers=True) as proxy:
        b2 = settings.model_copy(update={"s3_endpoint_url": proxy.endpoint, "s3_checksums": checksums})
        request = request_for(make_job(tmp_path), workflow_execution_id=f"b2-resume-{checksums}")
        with late_registry(stack) as registry:
            async with Registrar(on(b2, registry, wait_timeout=0.3)) as registrar:
                with pytest.raises(RegistrationTimeout):
                    await registrar.register(request)
            seen = Recorder()
            async with Registrar(on(b2, registry), on_progress=release_when_submitted(registry, seen)) as registrar:
                result = await registrar.register(request)
            assert all(r.resumed for r in result.registrations)
            assert seen.of(UploadProgress) == []  # resumed from the manifest: nothing uploaded again
            assert registry.registration_count == 1
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_model_and_metadata_in_s3_are_read_with_the_default_settings(
    tmp_path: Path, stack: LocalStack, s3: Any, settings: Settings
) -> None:
    """With the default `when_supported`, botocore asks every GetObject for the object's
    checksum (`x-amz-checksum-mode`), which B2 refuses: a model in S3 (read in ranges for its
    sha256) and performance metadata in S3 could not be read at all.  A range has no checksum
    to check, so the ranges ask for none; the metadata is read again without it."""
    archive = model_archive()
    model = await put_training_output(s3, f"{tmp_path.name}/output/model.tar.gz", archive)
    metadata = await put_training_output(s3, f"{tmp_path.name}/output/perf.json", b'{"auc": 0.91}')
    job = make_job(tmp_path)
    with FaultProxy(stack.s3_endpoint, b2_rule, with_headers=True) as proxy:
        env = environment(
            stack,
            settings,
            job,
            REGISTRAR_MODEL_PATH=model,
            PERFORMANCE_METADATA_PATH=metadata,
            AWS_ENDPOINT_URL_S3=proxy.endpoint,
        )
        result = run(env, "register")
        refused = proxy.count("GET", "perf.json")
    assert result.returncode == 0, result.stderr
    model_id = result.stdout.splitlines()[1].rsplit(" ", 1)[1]
    assert await registry_object(s3, stack, model_id) == archive
    assert refused == 2  # asked with the checksum mode, refused, asked again without
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
