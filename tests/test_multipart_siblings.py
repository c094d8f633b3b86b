"""How parts of one multipart upload read each other's answers when the upload is gone: interleavings
no server produces on demand, so the S3 client is a stand-in (the rest of the suite uses moto)."""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import pytest
from botocore.exceptions import ClientError

from async_registrar import StorageError
from async_registrar._concurrency import CleanupDeadline
from async_registrar._multipart import MultipartUpload
from async_registrar._s3 import S3Location


def client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "injected"}}, "UploadPart")


class ScriptedS3:
    """Answers UploadPart as `answer(number, attempt)` says, after its awaits."""

    def __init__(self, answer: Any) -> None:
        self._answer = answer
        self.attempts: dict[int, int] = {}

    async def create_multipart_upload(self, **_: Any) -> dict[str, Any]:
        return {"UploadId": "u1"}

    async def abort_multipart_upload(self, **_: Any) -> None:
        raise client_error("NoSuchUpload")

    async def upload_part(self, PartNumber: int, **_: Any) -> dict[str, Any]:  # botocore's name
        self.attempts[PartNumber] = self.attempts.get(PartNumber, 0) + 1
        return await self._answer(PartNumber, self.attempts[PartNumber])  # type: ignore[no-any-return]


async def test_two_parts_answered_no_such_upload_both_end_as_their_sibling_answers() -> None:
    """Parts 1 and 2 get NoSuchUpload (the upload was aborted from elsewhere) while part 3 is still on
    its way: both wait for it.  The second to wait replaced the event the first waited on, and the
    first sat out the whole DAMAGE_SETTLE (5 s) after part 3 had answered."""
    ended: dict[int, float] = {}

    async def answer(number: int, attempt: int) -> dict[str, Any]:
        await anyio.sleep({1: 0.0, 2: 0.05, 3: 0.5}[number])
        if number == 3:
            return {"ETag": '"e"'}
        raise client_error("NoSuchUpload")

    started = anyio.current_time()
    async with MultipartUpload(
        ScriptedS3(answer), S3Location("b", "k"), checksum=None, cleanup=CleanupDeadline(5)
    ) as upload:

        async def part(number: int) -> None:
            with pytest.raises(StorageError) if number != 3 else contextlib.nullcontext():
                await upload.upload_part(number, b"x")
            ended[number] = anyio.current_time() - started

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:  # no sibling cancelled: each ends on its own
                for number in (1, 2, 3):
                    tg.start_soon(part, number)
    assert max(ended.values()) < 2, ended


async def test_a_part_resent_whole_after_damage_does_not_explain_a_later_no_such_upload() -> None:
    """Part 1 arrives damaged once and is sent again whole (AWS keeps the upload); later part 2 gets
    NoSuchUpload (the upload aborted from elsewhere).  The run blamed the damage: "part 1 arrived
    damaged, and the server dropped the whole multipart upload"."""
    part_one_done = anyio.Event()

    async def answer(number: int, attempt: int) -> dict[str, Any]:
        if number == 1 and attempt == 1:
            raise client_error("BadDigest")
        if number == 1:
            part_one_done.set()
            return {"ETag": '"e"'}
        await part_one_done.wait()
        raise client_error("NoSuchUpload")

    errors: list[StorageError] = []

    async def part(number: int) -> None:
        try:
            await upload.upload_part(number, b"x")
        except StorageError as exc:
            errors.append(exc)

    with anyio.fail_after(30):
        async with (
            MultipartUpload(
                ScriptedS3(answer), S3Location("b", "k"), checksum=None, cleanup=CleanupDeadline(5)
            ) as upload,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(part, 1)
            tg.start_soon(part, 2)
    (error,) = errors
    assert "arrived damaged" not in str(error), error
    assert "NoSuchUpload" in str(error)


async def test_an_exit_after_an_unanswered_completion_warns_that_the_object_may_be_there(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Stopped while CompleteMultipartUpload goes unanswered (S3 may still complete it), the exit's
    abort gets NoSuchUpload: the completion may have gone through, and for `upload` the object may
    now be at its target, over an older one.  That is a warning, not an info line about a server
    that dropped the upload."""

    async def answer(number: int, attempt: int) -> dict[str, Any]:
        return {"ETag": '"e"'}

    s3 = ScriptedS3(answer)

    async def never_answered(**_: Any) -> None:
        await anyio.sleep(60)

    s3.complete_multipart_upload = never_answered  # type: ignore[attr-defined]
    with anyio.fail_after(30), anyio.move_on_after(0.2):
        async with MultipartUpload(s3, S3Location("b", "k"), checksum=None, cleanup=CleanupDeadline(1)) as upload:
            await upload.upload_part(1, b"x")
            await upload.complete()
    (said,) = [r for r in caplog.records if "no longer open" in r.getMessage()]
    assert said.levelname == "WARNING"
    assert "may have gone through" in said.getMessage()
