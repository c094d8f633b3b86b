"""Cancel points and late answers at the S3 boundary: what the cleanup finds, and what it misses.

Each test stops a run (or lets it go on) at a request whose answer is lost, late or held on
the way, against the moto server and the reference MIMS over HTTP, and then looks at what is
left under the test's prefix.  The cleanup depends on state the run records around awaits:
the ledger of the multipart uploads it opened (`OpenUploads`), which vouches for a prefix
when S3 cannot list its uploads; the listing itself, which only sees what reached S3 before
it; and the exit's one cleanup deadline (`CleanupDeadline`).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from async_registrar import (
    CleanupFinished,
    ProgressEvent,
    Registrar,
    RegistrationSubmitted,
    Settings,
    StorageError,
)
from async_registrar._local import LocalStack

from .conftest import (
    Recorder,
    cancel_when,
    kept_then_failed,
    late_registry,
    leftovers,
    make_job,
    mims_server,
    on,
    remove_all,
    request_for,
)
from .fault_proxy import Cut, FaultProxy, HoldingProxy, Late, is_creation, is_listing, refuse_copies, s3_error


async def open_uploads(s3: Any, settings: Settings) -> list[str]:
    """The keys of the multipart uploads open under the test's prefix (one entry per upload)."""
    listed = await s3.list_multipart_uploads(Bucket=settings.s3_bucket, Prefix=settings.s3_prefix)
    return [u["Key"] for u in listed.get("Uploads", [])]


# --- a completion under way when the run is stopped -----------------------------------------


async def test_a_run_stopped_while_s3_commits_its_completion_leaves_nothing(
    tmp_path: Path, settings: Settings, stack: LocalStack, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while S3 is completing an upload: the server has dropped the upload (an abort gets
    NoSuchUpload) and commits the object a moment later, after the cleanup listed the prefix: the
    object stayed, and the run said nothing was left.  The completion's answer is now waited for
    (within the cleanup deadline), so the object is there to be removed.  moto commits at once, so
    its commit is slowed down here: a large object's, or another server's, takes that long."""
    from moto.s3.models import S3Backend

    committing = threading.Event()
    inside = threading.local()
    complete, put = S3Backend.complete_multipart_upload, S3Backend.put_object

    def slow_complete(self: Any, *args: Any, **kwargs: Any) -> Any:
        inside.completing = True
        try:
            return complete(self, *args, **kwargs)
        finally:
            inside.completing = False

    def slow_put(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(inside, "completing", False):  # the upload is gone; the object is not there yet
            committing.set()
            time.sleep(1.0)
        return put(self, *args, **kwargs)

    monkeypatch.setattr(S3Backend, "complete_multipart_upload", slow_complete)
    monkeypatch.setattr(S3Backend, "put_object", slow_put)

    async def commit_under_way() -> None:
        while not committing.is_set():
            await anyio.sleep(0.005)

    with mims_server(stack) as registry:
        async with Registrar(on(settings, registry)) as registrar:
            await cancel_when(registrar, request_for(make_job(tmp_path)), commit_under_way)
    await anyio.sleep(1.5)  # any commit still under way has landed
    assert await open_uploads(s3, settings) == []
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []


# --- the ledger vouches for a prefix whose uploads cannot be listed ---------------------------


async def test_a_creation_sent_again_after_its_answer_was_lost_leaves_no_open_upload(
    tmp_path: Path, settings: Settings, stack: LocalStack, s3: Any
) -> None:
    """The first CreateMultipartUpload reaches S3 (which opens an upload) and its answer breaks off;
    botocore sends it again and gets a second upload, which the run completes.  The role may not
    list multipart uploads (403).  The registration succeeds; the first upload must not stay open,
    or must at least be named as a leftover: it is neither."""
    job = make_job(tmp_path)  # the demo model: two 5 MiB parts, a multipart upload
    creations = [0]

    def rule(method: str, target: str) -> object:
        if is_listing(method, target):
            return s3_error(403, "AccessDenied")
        if is_creation(method, target):
            creations[0] += 1
            if creations[0] == 1:
                return Cut(0)  # forwarded whole: S3 opens the upload; its answer breaks off
        return None

    with FaultProxy(stack.s3_endpoint, rule) as proxy, mims_server(stack) as registry:
        async with Registrar(on(settings, registry, s3_endpoint_url=proxy.endpoint)) as registrar:
            result = await registrar.register(request_for(job))
        assert creations[0] == 2  # the answer was lost, and botocore sent the creation again
    left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    assert result.leftovers != () or left == [], left


async def test_a_creation_refused_after_a_lost_answer_is_no_proof_that_nothing_is_open(
    tmp_path: Path, settings: Settings, stack: LocalStack, s3: Any
) -> None:
    """The first CreateMultipartUpload reaches S3 and its answer breaks off; botocore's second is
    refused (403, say a policy or credentials that changed).  The run fails (exit 4) and cleans up
    with the listing denied: the upload the first attempt opened must be aborted or named."""
    job = make_job(tmp_path)
    creations = [0]
    cleanups: list[CleanupFinished] = []

    def rule(method: str, target: str) -> object:
        if is_listing(method, target):
            return s3_error(403, "AccessDenied")
        if is_creation(method, target):
            creations[0] += 1
            return Cut(0) if creations[0] == 1 else s3_error(403, "AccessDenied")
        return None

    def watch(event: ProgressEvent) -> None:
        if isinstance(event, CleanupFinished):
            cleanups.append(event)

    with FaultProxy(stack.s3_endpoint, rule) as proxy, mims_server(stack) as registry:
        settings_ = on(settings, registry, s3_endpoint_url=proxy.endpoint)
        async with Registrar(settings_, on_progress=watch) as registrar:
            with pytest.raises(StorageError, match="CreateMultipartUpload"):
                await registrar.register(request_for(job))
        assert creations[0] == 2
    left = await open_uploads(s3, settings)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    (cleanup,) = cleanups
    assert cleanup.leftovers != () or left == [], left


# --- a creation whose answer is late: the listing finds the upload ----------------------------


async def test_cancelled_while_a_creations_answer_is_late_the_listing_finds_the_upload(
    tmp_path: Path, settings: Settings, stack: LocalStack, s3: Any
) -> None:
    """S3 opened the model's multipart upload, and its answer is held back (Late): the run is
    cancelled meanwhile.  It never learnt the upload id; the cleanup's listing finds the upload
    and aborts it, and nothing is left (not covered elsewhere: the other tests stall the
    creation before it reaches S3)."""
    job = make_job(tmp_path)

    def rule(method: str, target: str) -> object:
        return Late(60) if is_creation(method, target) else None

    async def opened() -> None:
        while not await open_uploads(s3, settings):
            await anyio.sleep(0.01)

    seen = Recorder()
    with FaultProxy(stack.s3_endpoint, rule) as proxy, mims_server(stack) as registry:
        async with Registrar(on(settings, registry, s3_endpoint_url=proxy.endpoint), on_progress=seen) as registrar:
            await cancel_when(registrar, request_for(job), opened)
        assert proxy.count("POST", "?uploads") == 1
    assert await leftovers(s3, settings.s3_bucket, settings.s3_prefix) == []
    (cleanup,) = seen.of(CleanupFinished)
    assert cleanup.aborted_uploads >= 1
    assert cleanup.leftovers == ()


# --- a request held on its way, reaching S3 only after the cleanup ---------------------------


class SentWholeProxy(HoldingProxy):
    """A `HoldingProxy` that takes each request's whole body from the client first (answering its
    `Expect: 100-continue` itself), then holds the request: the client has sent everything and
    waits for the answer, as one whose request is held up on the network or queued at S3 does."""

    def __init__(self, upstream: str, holds: Any) -> None:
        super().__init__(upstream, holds)
        self._body_rule = lambda method, target, headers, body: body


async def cancelled_while_held(
    settings: Settings,
    stack: LocalStack,
    s3: Any,
    tmp_path: Path,
    holds: Any,
    *,
    proxy_type: type[HoldingProxy] = HoldingProxy,
) -> tuple[HoldingProxy, Recorder, list[str]]:
    """Register the demo job with its S3 requests through a `HoldingProxy` holding what `holds` picks;
    cancel it once one is held; then let the held requests reach S3 (after the run's cleanup, as a
    request held up on the network does) and wait for S3's answers.  The proxy, the run's events,
    and what is left under the test's prefix then."""
    seen = Recorder()
    proxy: HoldingProxy = proxy_type(stack.s3_endpoint, holds)
    with proxy, mims_server(stack) as registry:
        async with Registrar(on(settings, registry, s3_endpoint_url=proxy.endpoint), on_progress=seen) as registrar:
            await cancel_when(registrar, request_for(make_job(tmp_path)), proxy.arrived.wait)
        proxy.release()
        with anyio.fail_after(30):
            await proxy.answered.wait()
    left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    return proxy, seen, left


@pytest.mark.xfail(
    strict=True,
    reason="a known limit: a CreateMultipartUpload that reaches S3 after the cleanup listed the prefix "
    "opens an upload nothing in the run can abort (it never learns its id); sweep or the lifecycle rule does",
)
async def test_a_creation_reaching_s3_after_the_cleanup_leaves_no_open_upload(
    tmp_path: Path, settings: Settings, stack: LocalStack, s3: Any
) -> None:
    """Cancelled while the model's CreateMultipartUpload is held on its way to S3: the cleanup lists
    the prefix (nothing open yet) and ends; then the creation reaches S3, which opens the upload."""
    proxy, seen, left = await cancelled_while_held(
        settings, stack, s3, tmp_path, lambda method, target, headers: is_creation(method, target)
    )
    assert [a.split()[1] for a in proxy.answers] == ["200"]  # S3 did open it
    assert seen.of(RegistrationSubmitted) == []
    assert left == [], left


@pytest.mark.xfail(
    strict=True,
    reason="a known limit: a small artifact goes up in one PutObject, and one that reaches S3 after the "
    "cleanup lands to stay (a multipart upload's late part lands in no upload); sweep or the lifecycle rule removes it",
)
async def test_a_small_artifact_reaching_s3_after_the_cleanup_is_not_left(
    tmp_path: Path, settings: Settings, stack: LocalStack, s3: Any
) -> None:
    """Cancelled while the payload's PutObject (145 bytes: one request) is held on its way: the cleanup
    empties the prefix, then the PutObject reaches S3 and the payload is there to stay."""
    proxy, _, left = await cancelled_while_held(
        settings,
        stack,
        s3,
        tmp_path,
        lambda method, target, headers: method == "PUT" and target.endswith("/payload.tar.gz"),
        proxy_type=SentWholeProxy,
    )
    assert [a.split()[1] for a in proxy.answers] == ["200"]
    assert left == [], left


@pytest.mark.xfail(
    strict=True,
    reason="a known limit: the run manifest is one PutObject; written before the POST and held on its "
    "way, it lands after the cleanup, a `submitting` manifest that sweep spares until --max-age",
)
async def test_a_manifest_reaching_s3_after_the_cleanup_is_not_left(
    tmp_path: Path, settings: Settings, stack: LocalStack, s3: Any
) -> None:
    """Cancelled while the `submitting` manifest's PutObject is held (before the POST: the registry
    never hears of it): the cleanup empties the prefix, then the manifest lands there."""
    proxy, seen, left = await cancelled_while_held(
        settings,
        stack,
        s3,
        tmp_path,
        lambda method, target, headers: method == "PUT" and target.endswith("/registration.json"),
        proxy_type=SentWholeProxy,
    )
    assert [a.split()[1] for a in proxy.answers] == ["200"]
    assert seen.of(RegistrationSubmitted) == []
    assert left == [], left


# --- the exit's one cleanup deadline ------------------------------------------------------------


async def test_a_failed_copy_the_run_recovers_from_does_not_start_the_cleanup_deadline(
    tmp_path: Path, settings: Settings, stack: LocalStack, s3: Any
) -> None:
    """A kept registration ends FAILED (its model removed); the re-run's copy of the whole payload
    fails (404 on UploadPartCopy: its run removed it meanwhile), so it uploads it instead, submits,
    and its registration takes longer than the cleanup timeout (3 s here, 25 s by default) to
    succeed.  A success must leave nothing: its own prefix and the FAILED one's removed.  (With
    1 s, the cleanup itself, two prefixes through the proxy to moto, once took longer than that
    on a loaded 2-core machine.)"""
    request = request_for(make_job(tmp_path), workflow_execution_id="wf-copy-deadline")
    with late_registry(stack) as registry:
        failed, _ = await kept_then_failed(settings, registry, request, s3)
        registry.hold_processing()  # the re-run's registration stays unfinished until released below

        with FaultProxy(stack.s3_endpoint, refuse_copies, with_headers=True) as proxy:
            rerun = on(settings, registry, s3_endpoint_url=proxy.endpoint, cleanup_timeout=3.0)
            async with Registrar(rerun) as registrar:
                handle = await registrar.submit(request)
                assert any("x-amz-copy-source" in h for h in proxy.headers)  # the copy was tried, and failed
                # The registration is slower than the cleanup timeout: a lower bound, not a race.
                await anyio.sleep(rerun.cleanup_timeout + 0.5)
                registry.finish_processing()
                result = await handle.wait()
    left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    assert result.registration_id != failed
    assert result.leftovers == ()
    assert left == []


# --- the upload engine alone: no prefix of its own to list ---------------------------------------


async def test_an_upload_whose_creation_was_sent_again_leaves_no_open_upload(
    tmp_path: Path, settings: Settings, stack: LocalStack, s3: Any
) -> None:
    """`async-registrar upload` (`Registrar.upload`): the first CreateMultipartUpload reaches S3 and its
    answer breaks off; botocore's second opens the upload that is completed.  The object is there;
    no multipart upload may stay open at its key."""
    job = make_job(tmp_path)
    key = f"{settings.s3_prefix}uploaded/model.tar.gz"
    creations = [0]

    def rule(method: str, target: str) -> object:
        if is_creation(method, target):
            creations[0] += 1
            if creations[0] == 1:
                return Cut(0)
        return None

    with FaultProxy(stack.s3_endpoint, rule) as proxy:
        async with Registrar(settings.model_copy(update={"s3_endpoint_url": proxy.endpoint})) as registrar:
            uploaded = await registrar.upload(job["model"], f"s3://{settings.s3_bucket}/{key}")
    assert uploaded.parts == 2
    assert creations[0] == 2
    left = await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    assert left == [key], left


async def test_an_upload_cancelled_while_it_looks_for_a_lost_creations_upload_aborts_its_own(
    tmp_path: Path, settings: Settings, stack: LocalStack, s3: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """As above, but cancelled while it lists the uploads at its key (held on the way): its own upload
    is aborted all the same (a failed entry has no exit of its own), and the one the lost attempt
    opened, which it had no time to find, is named in a warning with what to do."""
    job = make_job(tmp_path)
    key = f"{settings.s3_prefix}uploaded/model.tar.gz"
    creations = [0]

    def rule(method: str, target: str) -> object:
        if is_creation(method, target):
            creations[0] += 1
            if creations[0] == 1:
                return Cut(0)
        return None

    def listing(method: str, target: str, headers: dict[str, str]) -> bool:
        return is_listing(method, target) and creations[0] == 2  # not the preflight's probe

    with (
        FaultProxy(stack.s3_endpoint, rule) as cutter,
        HoldingProxy(cutter.endpoint, listing) as holder,
    ):
        async with Registrar(settings.model_copy(update={"s3_endpoint_url": holder.endpoint})) as registrar:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(registrar.upload, job["model"], f"s3://{settings.s3_bucket}/{key}")
                    with anyio.fail_after(30):
                        await holder.arrived.wait()
                    scope.cancel()
            assert scope.cancelled_caught
        holder.release()
        with anyio.fail_after(30):
            await holder.answered.wait()
    assert creations[0] == 2
    still_open = await open_uploads(s3, settings)
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
    assert still_open == [key]  # the lost attempt's alone: its own was aborted
    assert any("a lost attempt of its creation" in r.getMessage() and key in r.getMessage() for r in caplog.records)


# --- a re-run of an unanswered POST, stopped before it knows anything -----------------------


async def test_a_rerun_of_an_unanswered_post_cancelled_while_it_checks_the_artifacts_keeps_them(
    tmp_path: Path, settings: Settings, stack: LocalStack, s3: Any
) -> None:
    """A POST cancelled in flight (the registry has the registration; the run kept its prefix); the
    re-run takes that prefix over and is cancelled while it checks the artifacts (HeadObject held):
    it must keep them (`earlier_unanswered` is set before that await), and the registration, reading
    them late, succeeds.  Covers the take-over branch of `_resume`, which no other test stops."""
    request = request_for(make_job(tmp_path), workflow_execution_id="wf-unanswered-check")
    with late_registry(stack, stall_submissions=1, stall_seconds=5) as registry:
        async with Registrar(on(settings, registry)) as registrar:

            async def accepted() -> None:
                while registry.registration_count == 0:
                    await anyio.sleep(0.01)

            await cancel_when(registrar, request, accepted)
        kept = sorted(await leftovers(s3, settings.s3_bucket, settings.s3_prefix))
        assert [k.rsplit("/", 1)[1] for k in kept] == ["model.tar.gz", "payload.tar.gz", "registration.json"]
        kept_targets = [f"/{settings.s3_bucket}/{key}" for key in kept]

        def checks(method: str, target: str, headers: dict[str, str]) -> bool:
            return method == "HEAD" and target.endswith(".tar.gz")

        seen = Recorder()
        proxy = HoldingProxy(stack.s3_endpoint, checks)
        with proxy:
            async with Registrar(on(settings, registry, s3_endpoint_url=proxy.endpoint), on_progress=seen) as registrar:
                await cancel_when(registrar, request, proxy.arrived.wait)
            # Nothing written but the manifest, made the re-run's own before the checks.
            assert [t for m, t in proxy.seen if m == "PUT"] == [t for t in kept_targets if "registration" in t]
            assert proxy.count("POST", "?uploads") == 0
        assert sorted(await leftovers(s3, settings.s3_bucket, settings.s3_prefix)) == kept
        assert seen.of(CleanupFinished) == []
        (record,) = registry.app.state.registry.records  # type: ignore[union-attr]
        registry.finish_processing()
        with anyio.fail_after(15):
            while (found := registry.registration(record)) is None or found.status not in ("SUCCEEDED", "FAILED"):
                await anyio.sleep(0.05)
        assert found.status == "SUCCEEDED", found.failure_reason
    await remove_all(s3, settings.s3_bucket, settings.s3_prefix)
