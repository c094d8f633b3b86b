"""What an upload that fails at its end leaves, and says: a completion that failed beside an
identical object, a damaged object that cannot be deleted, an exit during a late creation,
an abort that fails."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from async_registrar import Settings, StorageError
from async_registrar._artifacts import inspect_artifact
from async_registrar._multipart import DAMAGE_SETTLE
from async_registrar._upload import upload_artifact

from .conftest import MiB, hooked, leftovers
from .test_upload import client_error, model_dir, model_location


async def open_uploads(s3: Any, settings: Settings) -> list[str]:
    listed = await s3.list_multipart_uploads(Bucket=settings.s3_bucket, Prefix=settings.s3_prefix)
    return [f"{u['Key']} {u['UploadId']}" for u in listed.get("Uploads", [])]


async def test_a_failed_completion_is_not_taken_for_done_because_an_identical_object_is_there(
    tmp_path: Path, s3: Any, settings: Settings
) -> None:
    """The same directory uploaded again to the same key (the archive is deterministic), and its
    CompleteMultipartUpload really fails: HeadObject finds the earlier, identical object, so the
    failure is taken for a completion whose answer was lost; the upload is never aborted."""
    root = model_dir(tmp_path / "model", 12 * MiB)
    source = inspect_artifact(root, role="model")
    location = model_location(settings)
    await upload_artifact(s3, source, location, settings)  # the earlier upload: whole, at the key

    def fail(**_: Any) -> None:  # before it is sent: S3 never completes this one
        raise client_error("InternalError", "CompleteMultipartUpload")

    with (
        hooked(s3, ("before-call.s3.CompleteMultipartUpload", fail)),
        pytest.raises(StorageError, match=r"CompleteMultipartUpload failed .*InternalError"),
    ):
        await upload_artifact(s3, source, location, settings)
    left = await open_uploads(s3, settings)
    for entry in left:
        key, upload_id = entry.split()
        await s3.abort_multipart_upload(Bucket=settings.s3_bucket, Key=key, UploadId=upload_id)
    assert left == [], f"an incomplete multipart upload was left behind: {left}"


async def test_a_damaged_object_that_cannot_be_deleted_is_still_reported_as_damaged(
    tmp_path: Path, s3: Any, settings: Settings
) -> None:
    """The object is found not whole after completion, and deleting it fails (403): the error must
    still say the object is damaged (and that it is still there), not only that a delete failed."""
    root = model_dir(tmp_path / "model", 12 * MiB)
    location = model_location(settings)

    def corrupt(parsed: dict[str, Any], **_: Any) -> None:
        parsed["ContentLength"] = 17

    def deny(**_: Any) -> None:
        raise client_error("AccessDenied", "DeleteObject")

    try:
        with (
            hooked(s3, ("after-call.s3.HeadObject", corrupt), ("before-call.s3.DeleteObject", deny)),
            pytest.raises(StorageError) as caught,
        ):
            await upload_artifact(s3, inspect_artifact(root, role="model"), location, settings)
    finally:  # the hooks are gone: the object goes
        await s3.delete_object(Bucket=location.bucket, Key=location.key)
    message = caught.value.message
    assert "is not what was uploaded: it holds 17 bytes" in message, message
    assert "it could not be deleted" in message, message


async def test_a_damaged_object_whose_delete_times_out_is_not_said_to_be_deleted(
    tmp_path: Path, s3: Any, settings: Settings
) -> None:
    """The object is found not whole, and its DeleteObject is never answered within the cleanup
    deadline: the object is still there, so the error must not say it was deleted."""
    settings = settings.model_copy(update={"cleanup_timeout": 0.5})
    root = model_dir(tmp_path / "model", 12 * MiB)
    location = model_location(settings)

    def corrupt(parsed: dict[str, Any], **_: Any) -> None:
        parsed["ContentLength"] = 17

    async def hang(**_: Any) -> None:
        await anyio.sleep(30)

    with (
        hooked(s3, ("after-call.s3.HeadObject", corrupt), ("before-call.s3.DeleteObject", hang)),
        pytest.raises(StorageError) as caught,
    ):
        await upload_artifact(s3, inspect_artifact(root, role="model"), location, settings)
    still_there = location.key in await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    await s3.delete_object(Bucket=location.bucket, Key=location.key)
    assert still_there  # the delete never happened
    assert "the object was deleted" not in caught.value.message, caught.value.message


async def test_an_exit_during_a_late_creation_stays_within_the_cleanup_timeout(
    tmp_path: Path, s3: Any, settings: Settings
) -> None:
    """Cancelled (SIGTERM) while CreateMultipartUpload is on its way and answered late, then the abort
    hangs: the whole exit must end within REGISTRAR_CLEANUP_TIMEOUT (the container's grace period is
    sized for it), not the creation's wait plus a whole cleanup timeout after it."""
    timeout = 5.0
    settings = settings.model_copy(update={"cleanup_timeout": timeout})
    root = model_dir(tmp_path / "model", 12 * MiB)
    location = model_location(settings)
    cancelled_at: list[float] = []

    with anyio.CancelScope() as scope:

        async def late_creation(**_: Any) -> None:
            scope.cancel()  # the caller is cancelled as the creation goes out
            cancelled_at.append(anyio.current_time())
            await anyio.sleep(0.95)  # answered within the creation's wait (a fifth of the timeout)

        async def hang(**_: Any) -> None:
            await anyio.sleep(60)

        with hooked(
            s3,
            ("before-send.s3.CreateMultipartUpload", late_creation),
            ("before-call.s3.AbortMultipartUpload", hang),
        ):
            await upload_artifact(s3, inspect_artifact(root, role="model"), location, settings)
    took = anyio.current_time() - cancelled_at[0]
    for entry in await open_uploads(s3, settings):
        key, upload_id = entry.split()
        await s3.abort_multipart_upload(Bucket=settings.s3_bucket, Key=key, UploadId=upload_id)
    assert scope.cancelled_caught
    assert took <= timeout + 0.5, f"the exit took {took:.2f} s, past its cleanup timeout of {timeout:g} s"


async def test_an_upload_whose_abort_failed_is_named_to_the_caller(tmp_path: Path, s3: Any, settings: Settings) -> None:
    """A part fails and then the abort is refused: the multipart upload stays open at the caller's
    key (`Registrar.upload` has no temporary prefix to sweep it), so the error raised must name it
    (its upload id, as the temporary prefix's notes do), not only a log line."""
    root = model_dir(tmp_path / "model", 16 * MiB)
    location = model_location(settings)

    def fail_part_two(params: dict[str, Any], **_: Any) -> None:
        if params.get("PartNumber") == 2:
            raise client_error("InternalError", "UploadPart")

    def deny(**_: Any) -> None:
        raise client_error("AccessDenied", "AbortMultipartUpload")

    with (
        hooked(
            s3, ("before-parameter-build.s3.UploadPart", fail_part_two), ("before-call.s3.AbortMultipartUpload", deny)
        ),
        pytest.raises(StorageError) as caught,
    ):
        await upload_artifact(s3, inspect_artifact(root, role="model"), location, settings)
    left = await open_uploads(s3, settings)
    for entry in left:
        key, upload_id = entry.split()
        await s3.abort_multipart_upload(Bucket=settings.s3_bucket, Key=key, UploadId=upload_id)
    assert len(left) == 1
    upload_id = left[0].split()[1]
    told = str(caught.value) + "".join(getattr(caught.value, "__notes__", []))
    assert upload_id in told, f"the open upload {upload_id} is not named: {told}"


async def test_an_upload_stopped_after_it_completed_says_the_object_is_there(
    tmp_path: Path, s3: Any, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Cancelled once S3 holds the whole object, while it is read back: the caller gets the
    cancellation and the object stays at its target (for `upload`, nothing removes it); that was
    said nowhere, neither as done nor as stopped."""
    root = model_dir(tmp_path / "model", 12 * MiB)
    location = model_location(settings)
    with anyio.CancelScope() as scope:

        def stop(**_: Any) -> None:  # the read-back: the object is complete by now
            scope.cancel()

        with hooked(s3, ("before-call.s3.HeadObject", stop)):
            await upload_artifact(s3, inspect_artifact(root, role="model"), location, settings)
    assert scope.cancelled_caught
    assert await open_uploads(s3, settings) == []
    assert location.key in await leftovers(s3, settings.s3_bucket, settings.s3_prefix)
    await s3.delete_object(Bucket=location.bucket, Key=location.key)
    assert f"before it was read back: {location.uri} is there" in caplog.text


async def assert_the_damage_is_reported(
    tmp_path: Path, s3: Any, settings: Settings, upload_part_hook: Callable[..., Awaitable[None]]
) -> None:
    """Upload a 12 MiB model with `upload_part_hook` answering its parts as a server that drops the
    upload for a damaged part 2 would: the error names the damage, and nothing stays open."""
    root = model_dir(tmp_path / "model", 12 * MiB)
    location = model_location(settings)
    with (
        hooked(s3, ("before-parameter-build.s3.UploadPart", upload_part_hook)),
        pytest.raises(StorageError) as caught,
    ):
        await upload_artifact(s3, inspect_artifact(root, role="model"), location, settings)
    assert await open_uploads(s3, settings) == []
    assert f"part 2 of {location} arrived damaged, and the server dropped" in caught.value.message


async def test_a_part_that_meets_an_upload_dropped_for_a_damaged_part_reports_the_damage(
    tmp_path: Path, s3: Any, settings: Settings
) -> None:
    """`rclone serve s3` drops the whole upload when a part arrives damaged: another part still on
    its way then gets NoSuchUpload, and when its answer was read first the run said only "UploadPart
    (part 3) failed: NoSuchUpload" (a compat cell failed on it).  The damage is what is reported."""
    sent: list[int] = []

    async def rclone_like(params: dict[str, Any], **_: Any) -> None:
        number = params.get("PartNumber")
        sent.append(number)
        if number == 2 and sent.count(2) == 1:
            await anyio.sleep(0.05)  # its answer is read after the other part's
            raise client_error("BadDigest", "UploadPart")
        if number == 2:  # sent again: its whole body on the way first, then the same answer
            await anyio.sleep(2)
        if number in (2, 3):
            raise client_error("NoSuchUpload", "UploadPart")

    await assert_the_damage_is_reported(tmp_path, s3, settings, rclone_like)


async def test_a_damaged_answer_read_a_second_after_a_siblings_no_such_upload_is_still_reported(
    tmp_path: Path, s3: Any, settings: Settings
) -> None:
    """The same as above, with the damaged part's answer read a second after its sibling's
    NoSuchUpload (a loaded machine, a bigger part still on its way): a fixed 0.2 s wait for it
    was past, and the run said only "UploadPart (part 3) failed: NoSuchUpload".  The parts still
    on their way are waited for."""

    async def rclone_like(params: dict[str, Any], **_: Any) -> None:
        number = params.get("PartNumber")
        if number == 2:
            await anyio.sleep(1)  # its answer is read a second after the other part's
            raise client_error("BadDigest", "UploadPart")
        if number == 3:
            raise client_error("NoSuchUpload", "UploadPart")

    await assert_the_damage_is_reported(tmp_path, s3, settings, rclone_like)


async def test_an_upload_the_server_dropped_is_not_named_as_left_open(
    tmp_path: Path, s3: Any, settings: Settings
) -> None:
    """The server drops the multipart upload under a running upload (`rclone serve s3` does when
    a part arrives damaged): the parts get NoSuchUpload, and so does the exit's abort.  That abort
    was counted as failed, and the error told the caller to remove "by hand" an upload id that no
    longer exists; nothing is open, and nothing must be asked of the caller."""
    root = model_dir(tmp_path / "model", 16 * MiB)
    location = model_location(settings)

    async def drop(params: dict[str, Any], **_: Any) -> None:
        if params.get("PartNumber") == 2:  # the server drops the upload as part 2 arrives
            await s3.abort_multipart_upload(Bucket=location.bucket, Key=location.key, UploadId=params["UploadId"])

    with (
        hooked(s3, ("before-parameter-build.s3.UploadPart", drop)),
        pytest.raises(StorageError) as caught,  # NoSuchUpload on S3; moto answers a 500
    ):
        await upload_artifact(s3, inspect_artifact(root, role="model"), location, settings)
    assert await open_uploads(s3, settings) == []
    told = str(caught.value) + "".join(getattr(caught.value, "__notes__", []))
    assert "could not be aborted" not in told, told


async def test_an_upload_cancelled_while_a_part_waits_on_its_siblings_leaves_nothing(
    tmp_path: Path, s3: Any, settings: Settings
) -> None:
    """Part 3 got NoSuchUpload and waits for part 2, still on its way, to say whether it arrived
    damaged (up to DAMAGE_SETTLE): cancelled there, the upload is aborted at once and nothing
    stays open; the cancellation is not held up by that wait."""
    root = model_dir(tmp_path / "model", 12 * MiB)
    location = model_location(settings)
    waiting = anyio.Event()

    async def rclone_like(params: dict[str, Any], **_: Any) -> None:
        number = params.get("PartNumber")
        if number == 2:
            await anyio.sleep(60)  # on its way, not answered
        if number == 3:
            waiting.set()
            raise client_error("NoSuchUpload", "UploadPart")

    with hooked(s3, ("before-parameter-build.s3.UploadPart", rclone_like)), anyio.fail_after(30):
        async with anyio.create_task_group() as tg:

            async def upload() -> None:
                await upload_artifact(s3, inspect_artifact(root, role="model"), location, settings)

            tg.start_soon(upload)
            await waiting.wait()
            await anyio.sleep(0.1)  # part 3 is in its wait by now (it has nothing else to await)
            cancelled_at = anyio.current_time()
            tg.cancel_scope.cancel()
    assert anyio.current_time() - cancelled_at < DAMAGE_SETTLE  # the wait gave way (part 2 holds 60 s)
    assert await open_uploads(s3, settings) == []
