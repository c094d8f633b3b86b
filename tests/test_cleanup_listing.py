"""The cleanup when a server cannot list multipart uploads (issue 17).

rclone's `serve s3` answers ListMultipartUploads with NoSuchUpload until it has seen a
multipart upload, and a role may lack s3:ListBucketMultipartUploads.  The listing is how
the cleanup finds an upload whose CreateMultipartUpload reached S3 as the run was
cancelled; when it fails, the run's own ledger of what it opened says whether anything can
be open there.  Emulated with the fault proxy in front of the moto server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from async_registrar import Registrar, Settings
from async_registrar._local import LocalStack

from .conftest import MiB, leftovers, make_job, mims_server, on, remove_all, request_for
from .fault_proxy import FaultProxy, Stall, is_listing, s3_error


@pytest.mark.parametrize(
    ("answer", "model_bytes"),
    [("NoSuchUpload", 0), ("NoSuchUpload", 12 * MiB), ("AccessDenied", 0), ("AccessDenied", 12 * MiB)],
    ids=["rclone-small", "rclone-multipart", "denied-small", "denied-multipart"],
)
async def test_a_listing_that_fails_is_no_leftover_when_the_run_closed_every_upload(
    tmp_path: Path, settings: Settings, stack: LocalStack, s3: Any, answer: str, model_bytes: int
) -> None:
    """A small model (one PutObject) and a multi-part one: the registration succeeds with no
    leftover reported, and nothing is left under the prefix."""
    job = make_job(tmp_path, model_bytes=model_bytes)
    status = 404 if answer == "NoSuchUpload" else 403

    def rule(method: str, target: str) -> object:
        return s3_error(status, answer) if is_listing(method, target) else None

    with FaultProxy(stack.s3_endpoint, rule) as proxy, mims_server(stack) as registry:
        async with Registrar(on(settings, registry, s3_endpoint_url=proxy.endpoint)) as registrar:
            result = await registrar.register(request_for(job))
        assert proxy.count("GET", "uploads") >= 1  # the cleanup did try to list
    assert result.leftovers == ()
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


async def test_a_listing_that_fails_is_a_leftover_when_a_creation_went_unanswered(
    tmp_path: Path, settings: Settings, stack: LocalStack, s3: Any
) -> None:
    """Cancelled while CreateMultipartUpload is on its way (S3 may have opened it): with the
    listing denied, the cleanup cannot rule out an open upload, and says so."""
    job = make_job(tmp_path, model_bytes=12 * MiB)

    def rule(method: str, target: str) -> object:
        if is_listing(method, target):
            return s3_error(403, "AccessDenied")
        if method == "POST" and target.endswith("?uploads"):
            return Stall(30)
        return None

    from async_registrar import CleanupFinished, ProgressEvent

    cleanups: list[CleanupFinished] = []

    def watch(event: ProgressEvent) -> None:
        if isinstance(event, CleanupFinished):
            cleanups.append(event)

    with FaultProxy(stack.s3_endpoint, rule) as proxy, mims_server(stack) as registry:
        async with Registrar(on(settings, registry, s3_endpoint_url=proxy.endpoint), on_progress=watch) as registrar:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(registrar.register, request_for(job))
                    with anyio.fail_after(10):
                        while proxy.count("POST", "?uploads") < 1:
                            await anyio.sleep(0.02)
                    await anyio.sleep(0.2)
                    scope.cancel()
    assert cleanups
    assert any("multipart uploads could not be listed: AccessDenied" in x for x in cleanups[-1].leftovers)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
