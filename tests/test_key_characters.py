"""Prefixes and keys with characters S3 clients percent-encode in a request's URL.

A Hive-style partition (`team=ml/`), a semicolon, a space, a plus, a non-ASCII letter: S3
takes them all in keys, and botocore sends them encoded.  The capability probe once picked
its requests out by the encoded key, missed, and found every server to check nothing.  Here
each path that names keys (the upload and its read-back, the registry reading the s3:// URIs
it is given, the manifest, a kept run, its resumption, the sweep) runs under such a prefix.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from async_registrar import Registrar, RegistrationTimeout, Settings
from async_registrar._local import LocalStack

from .conftest import (
    MiB,
    final_status,
    late_registry,
    leftovers,
    make_job,
    names_under,
    on,
    release_when_submitted,
    request_for,
)

#: Each with characters botocore percent-encodes in the URL's path.
PREFIXES = ["team=ml/date=2026-11-30/", "runs;x/", "my models/v1+2/", "modèles/ünïcode/"]

KEPT = ["model.tar.gz", "payload.tar.gz", "registration.json"]


def under(settings: Settings, where: str) -> Settings:
    return settings.model_copy(update={"s3_prefix": settings.s3_prefix + where})


@pytest.mark.parametrize("where", PREFIXES)
async def test_an_upload_to_such_a_key_is_checked_and_read_back(
    tmp_path: Path, settings: Settings, s3: Any, where: str
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(bytes(range(256)) * (24 * 1024))
    key = f"{settings.s3_prefix}{where}model.tar.gz"
    async with Registrar(settings) as registrar:
        uploaded = await registrar.upload(model, f"s3://{settings.s3_bucket}/{key}")
    assert uploaded.uri == f"s3://{settings.s3_bucket}/{key}"
    body = await s3.get_object(Bucket=settings.s3_bucket, Key=key)
    async with body["Body"] as stream:
        assert hashlib.sha256(await stream.read()).hexdigest() == uploaded.sha256
    await s3.delete_object(Bucket=settings.s3_bucket, Key=key)
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


@pytest.mark.parametrize("where", PREFIXES)
async def test_a_registration_under_such_a_prefix_is_kept_resumed_and_cleaned(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack, where: str
) -> None:
    """Kept by a wait timeout (the registry reads the artifacts only when it finishes), resumed
    by a re-run of the same lineage, SUCCEEDED from the kept artifacts, nothing left."""
    settings = under(settings, where)
    request = request_for(make_job(tmp_path, model_bytes=6 * MiB), workflow_execution_id=f"keys-{len(where)}")
    with late_registry(stack) as registry:
        async with Registrar(on(settings, registry, wait_timeout=0.3)) as registrar:
            with pytest.raises(RegistrationTimeout) as kept:
                await registrar.register(request)
        (accepted,) = kept.value.kept
        assert accepted.kept_prefix is not None
        assert accepted.kept_prefix.startswith(f"s3://{settings.s3_bucket}/{settings.s3_prefix}run-")
        assert await names_under(s3, settings) == KEPT

        async with Registrar(on(settings, registry), on_progress=release_when_submitted(registry)) as registrar:
            result = await registrar.register(request)
        assert result.registration_id == accepted.registration_id
        assert all(r.resumed for r in result.registrations)
        assert registry.registration_count == 1
        assert registry.registration(result.registration_id).status == "SUCCEEDED"  # type: ignore[union-attr]
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


@pytest.mark.parametrize("where", PREFIXES[:2])
async def test_the_sweep_removes_a_stale_run_under_such_a_prefix(
    tmp_path: Path, settings: Settings, s3: Any, stack: LocalStack, where: str
) -> None:
    """A run kept by a timeout whose registration then ended: the sweep judges it by its
    manifest (read under the encoded prefix) and removes it."""
    settings = under(settings, where)
    request = request_for(make_job(tmp_path), workflow_execution_id="keys-sweep")
    with late_registry(stack) as registry:
        async with Registrar(on(settings, registry, wait_timeout=0.3)) as registrar:
            with pytest.raises(RegistrationTimeout) as kept:
                await registrar.register(request)
        assert await names_under(s3, settings) == KEPT
        registry.finish_processing()
        (accepted,) = kept.value.kept
        assert await final_status(registry, accepted.registration_id) == "SUCCEEDED"  # read from the kept artifacts
        async with Registrar(on(settings, registry)) as registrar:
            report = await registrar.sweep(older_than=0)
    assert len(report.removed) == 1, report
    assert report.leftovers == ()
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
